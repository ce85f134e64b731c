"""Wan video-to-video (`WanVideoToVideoPipeline`): Wan 2.1 text-to-video (`diffalign.families.wan`) started from a
prompt's condition video (its `video`, see `diffalign.prompts.ConditionedPrompt`) noised part of the way, as
SDEdit; trajectories with Flow-GRPO's SDE, as Wan text-to-video.

As `WanVideoToVideoPipeline` samples:

- **the condition**: the video's first `num_frames` frames (a video with fewer is refused in one line), resized to the
  sampled size (`video_processor.preprocess_video`), VAE-encoded (posterior mode) and normalised
  (`latents_mean`, `latents_std`). Encoded once per (video, size, frames) and cached, like text; it travels in the
  conditioning (`video_latents`, the same in the negative half) but the transformer never sees it: it only sets where
  a rollout starts.
- **strength** (`sample_strength`, the pipeline's `strength`, default 0.8): the rollout takes the run's
  `sample_num_steps` steps, the last ones of a schedule of `N` steps, `N` the smallest with `int(N * strength)`
  equal to them (`schedule_length`, the pipeline's `get_timesteps`); `WanVideoToVideoPipeline(num_inference_steps=N,
  strength=strength)` samples as the rollouts do (`pipeline_num_inference_steps`), so the trainers see a trajectory
  of `sample_num_steps` steps as for any family.
- **the start**: the noise drawn as the pipeline draws it (same generator, same numbers), mixed with the condition
  latents by the scheduler at the first kept timestep (`scale_noise`: `sigma noise + (1 - sigma) latents`,
  `start_latents`). That start is the trajectory's first latents, so a recorded trajectory is recomputed from it.

The transformer is the text-to-video one (no condition channels): the forward-process trainers (NFT, AWM), which
noise a final sample themselves, train it on the samples as for text-to-video. Every prompt needs a video
(`requires_condition_video`: a prompt without one is refused in one line when a run starts). The LoRA trains
`transformer`, as Wan's. RLG: diffalign's `WanVideoToVideoRLGPipeline` (diffusers' modular Wan has no
video-to-video blocks), which samples as `WanVideoToVideoPipeline` at w = 0 (base) and w = 1 (aligned); `diffalign
generate --video` calls it as the rollouts sample (`pipeline_condition_kwargs`, `pipeline_call_kwargs`,
`pipeline_num_inference_steps`).
"""

from typing import Dict, List, Optional, Tuple

import torch

from ..errors import ModelError, PromptError
from ..prompts import condition_videos_of
from .base import Conditioning
from .wan import WanFamily

DEFAULT_STRENGTH = 0.8  # WanVideoToVideoPipeline.__call__'s default `strength`


def check_strength(strength):
    """A one-line `ModelError` unless `0 < strength <= 1` (the share of the schedule a video-to-video rollout takes:
    1 starts from pure noise, small values stay near the condition video)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ModelError(f"strength must be in (0, 1] (the share of the schedule a video-to-video rollout takes); "
                         f"got {strength!r}")


def schedule_length(num_steps: int, strength: float) -> int:
    """The smallest `N` whose `WanVideoToVideoPipeline.get_timesteps` keeps `num_steps` steps at `strength`:
    `min(int(N * strength), N) == num_steps` (the pipeline's own float arithmetic). `int(N * strength)` grows by 0
    or 1 with `N` (strength <= 1), so every `num_steps` has one."""
    total = max(num_steps, int(num_steps / strength) - 2)  # just below it: the loops below take a step or two
    while min(int(total * strength), total) < num_steps:
        total += 1
    while total > num_steps and int((total - 1) * strength) >= num_steps:
        total -= 1
    return total


def read_condition_frames(path: str) -> list:
    """The RGB frames (`PIL.Image`) of a condition video: a GIF through PIL, anything else through imageio (MP4
    through imageio-ffmpeg), as `diffalign.prompts.check_condition_video` checked it."""
    import imageio
    import numpy as np
    from PIL import Image

    from ..plotting import read_video

    if path.endswith((".gif", ".mp4")):  # the videos diffalign writes, read as `read_video` reads them back
        return read_video(path)
    with imageio.get_reader(path) as reader:
        return [Image.fromarray(np.asarray(frame)).convert("RGB") for frame in reader]


class WanVideoToVideoFamily(WanFamily):
    name = "wan_v2v"
    pipeline_class = "WanVideoToVideoPipeline"
    # its prompt cleaning needs ftfy unconditionally (`WanFamily.clean_prompts`)
    prompt_cleaning_module = "diffusers.pipelines.wan.pipeline_wan_video2video"
    # RLG: diffalign's pipeline (diffusers' modular Wan has no video-to-video blocks); `WanFamily.rlg_pipeline`
    rlg_pipeline_class = "WanVideoToVideoRLGPipeline"
    modular_blocks_class = None
    hub_tags = ("wan", "video-to-video")
    max_condition_images = 0
    max_condition_videos = 1  # WanVideoToVideoPipeline takes one `video`
    requires_condition_video = True
    # the published models' UniPC flow scheduler beside the default tiny model (WanVideoToVideoPipeline has neither
    # TI2V-5B's `expand_timesteps` nor A14B's second expert)
    tiny_variants = {"unipc": {"unipc_scheduler": True}}
    strength = DEFAULT_STRENGTH

    def __init__(self, pipe, max_cache: int = 4096):
        super().__init__(pipe, max_cache)
        self._condition_cache: Dict[Tuple, torch.Tensor] = {}

    def configure(self, *, strength: Optional[float] = None, **settings):
        """As `WanFamily.configure`, plus the pipeline's `strength` (`sample_strength`; 0 < strength <= 1)."""
        super().configure(**settings)
        if strength is not None:
            check_strength(strength)
            self.strength = float(strength)

    # -------------------------------------------------------------------- prompts
    def encode_text(self, prompts: List[str], device) -> Conditioning:
        return super().encode_text([str(p) for p in prompts], device)  # the text alone reaches UMT5

    def pipeline_call_kwargs(self, height: Optional[int] = None, width: Optional[int] = None) -> dict:
        """The UMT5 length and the `strength` of the rollouts (the pipeline takes the number of frames from its
        video: `pipeline_condition_kwargs`)."""
        return {"max_sequence_length": self.max_sequence_length, "strength": self.strength}

    def pipeline_num_inference_steps(self, num_steps: int) -> int:
        """`schedule_length`: the pipeline's schedule whose last `num_steps` steps its `strength` keeps."""
        return schedule_length(num_steps, self.strength)

    def pipeline_condition_kwargs(self, prompt) -> Dict:
        """The pipeline's `video` for one prompt (its first `num_frames` frames, PIL): with `pipeline_call_kwargs`
        and `pipeline_num_inference_steps`, the call that samples as a rollout of that prompt does."""
        return {"video": self.condition_frames(condition_videos_of(prompt)[0])}

    def condition_frames(self, path: str) -> list:
        """The first `num_frames` frames of the video at `path`; a one-line `PromptError` when it has fewer."""
        frames = read_condition_frames(path)
        if len(frames) < self.num_frames:
            raise PromptError(f"condition video '{path}' has {len(frames)} frames; {self.name} samples "
                              f"{self.num_frames} (num_frames): give a longer video or fewer num_frames")
        return frames[: self.num_frames]

    def conditioning(self, prompts: List[str], negative_prompt: str, do_cfg: bool, height: int, width: int):
        """Wan's, plus each prompt's condition video latents (`video_latents`), also in the negative half (the
        conditioning's halves hold the same keys; the transformer reads neither)."""
        cond, negative = super().conditioning(prompts, negative_prompt, do_cfg, height, width)
        device = cond["encoder_hidden_states"].device
        paths = []
        for prompt in prompts:
            videos = condition_videos_of(prompt)
            if not videos:
                raise PromptError(f"{self.name} turns a video into a video: the prompt '{prompt}' has no 'video'")
            paths.append(videos[0])
        keys = [(path, int(height), int(width), self.num_frames) for path in paths]
        for key in dict.fromkeys(keys):
            if key not in self._condition_cache:
                if len(self._condition_cache) >= self.max_cache:
                    self._condition_cache.clear()
                self._condition_cache[key] = self.encode_condition_video(*key[:3])
        video_latents = torch.stack([self._condition_cache[key] for key in keys]).to(device)
        cond = {**cond, "video_latents": video_latents}
        if negative is not None:
            negative = {**negative, "video_latents": video_latents.clone()}
        return cond, negative

    @torch.no_grad()
    def encode_condition_video(self, path: str, height: int, width: int) -> torch.Tensor:
        """`(C, F, h, w)` float32: the normalised latents of the video at `path` (its first `num_frames` frames) for
        a `height x width` rollout, as `WanVideoToVideoPipeline` computes them (`video_processor.preprocess_video`,
        the VAE's posterior mode, `(latents - latents_mean) / latents_std`)."""
        from diffusers.pipelines.wan.pipeline_wan_video2video import retrieve_latents

        pipe, device = self.pipe, self.device
        vae = pipe.vae
        pixels = pipe.video_processor.preprocess_video(self.condition_frames(path), height=height, width=width)
        pixels = pixels.to(device, dtype=torch.float32).to(dtype=vae.dtype)
        latents = retrieve_latents(vae.encode(pixels), sample_mode="argmax").to(torch.float32)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(device, torch.float32)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(device, torch.float32)
        return ((latents - mean) * inverse_std)[0]

    # ----------------------------------------------------------- latents and time
    def prepare_latents(self, batch_size, height, width, dtype, device, generator, latents=None, denoiser=None):
        """`(B, C, F, h, w)` Gaussian noise drawn as `WanVideoToVideoPipeline.prepare_latents` draws it (float32, the
        same numbers for the same generator), in `dtype`; `start_latents` mixes it with the condition."""
        from diffusers.utils.torch_utils import randn_tensor

        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        frames = (self.num_frames - 1) // self.pipe.vae_scale_factor_temporal + 1
        shape = (batch_size, self.latent_channels(denoiser), frames, int(height) // self.vae_scale_factor,
                 int(width) // self.vae_scale_factor)
        return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=torch.float32).to(dtype)

    def set_timesteps(self, num_inference_steps: int, device, height: int, width: int) -> torch.Tensor:
        """The last `num_inference_steps` timesteps of the `schedule_length` schedule, as
        `WanVideoToVideoPipeline.get_timesteps` keeps them (the scheduler holds the whole schedule: the kernel finds
        each step's noise levels in it)."""
        total = schedule_length(num_inference_steps, self.strength)
        limit = self.scheduler.config.num_train_timesteps
        if total > limit:
            raise ModelError(f"strength {self.strength} keeps {num_inference_steps} steps of a {total}-step schedule, "
                             f"longer than the scheduler's {limit} timesteps: raise sample_strength or lower "
                             f"sample_num_steps")
        self.scheduler.set_timesteps(total, device=device)
        return self.scheduler.timesteps[total - num_inference_steps:]

    def start_latents(self, noise: torch.Tensor, cond: Conditioning, timesteps: torch.Tensor) -> torch.Tensor:
        """The condition video's latents noised to the first kept timestep by the scheduler (`scale_noise`), with
        `noise`, in float32 as the pipeline, then in `noise`'s dtype."""
        first = timesteps[:1].repeat(noise.shape[0])
        start = self.scheduler.scale_noise(cond["video_latents"].to(noise.device, torch.float32), first, noise.float())
        return start.to(noise.dtype)

    # ------------------------------------------------------------------------ RLG
    @classmethod
    def modular_blocks(cls):
        return None  # RLG runs in `rlg_pipeline_class` (and no import of Wan's modular encoders)

    # --------------------------------------------------------- tiny test models
    @classmethod
    def tiny_components(cls, seed: int = 0, unipc_scheduler: bool = False) -> dict:
        """Components of a tiny random `WanVideoToVideoPipeline`: Wan's tiny 2.1 components (`WanFamily`), the
        text-to-video transformer, VAE, UMT5 and scheduler the pipeline takes."""
        cls.clean_prompts()  # a tiny pipeline samples at once in the tests
        return WanFamily.tiny_components(seed, version="2.1", unipc_scheduler=unipc_scheduler)
