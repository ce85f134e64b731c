"""Wan image-to-video (`WanImageToVideoPipeline`): Wan (`diffalign.families.wan`) with a prompt's condition image
(its `image`, see `diffalign.prompts.ConditionedPrompt`) as the video's first frame; trajectories with Flow-GRPO's
SDE, as Wan text-to-video.

Two models, as `WanImageToVideoPipeline` conditions them:

- **Wan 2.2 TI2V-5B** (`expand_timesteps`; `ti2v_5b` tiny variant): the image, resized to the sampled size
  (`video_processor.preprocess`), is VAE-encoded (posterior mode, normalised) into one latent frame that is kept
  fixed: the transformer sees it as the first latent frame with timestep 0 on its tokens, the rest of the latents
  with the step's timestep (`forward`), and the decoded video starts from it (`final_latents`). The sampled first
  frame is not a random variable: the family predicts 0 there, so those entries add the same term to the policy's,
  the old policy's and the reference's log-probs and no gradient (the log-probs and the KL, averaged over every
  latent entry as for any video, weigh the sampled frames by `(F - 1) / F`); the forward-process losses count the
  frames after the first alone (`sampled_latents`).
- **Wan 2.1 I2V** (the transformer has `image_dim`; the tiny default): the image followed by `num_frames - 1` zero
  frames is VAE-encoded and concatenated on the channel axis after four mask channels (1 on the image's frames) to
  the latents, and its CLIP image embedding (the vision tower's second-to-last hidden states, `encode_image`) is
  given to every block's cross-attention (`encoder_hidden_states_image`), also in the negative half of CFG.
- **Wan 2.1 FLF2V** (first-last-frame: the transformer has `pos_embed_seq_len`): a prompt's `last_image` (a prompt
  row's field, `diffalign.prompts.ConditionedPrompt.last_image`) is the video's last frame, as the pipeline's
  `last_image`: the image, `num_frames - 2` zero frames and the last image are VAE-encoded (the mask is 1 on both
  ends), and the CLIP embeddings of both images form the image tokens (`(2, tokens, dim)` per prompt). An FLF2V model
  needs a `last_image` on every prompt, any other model refuses one (one line each).

Both are encoded once per (image, size, frames) and cached, like text; they travel in the conditioning
(`image_latents`, `image_embeds`), so a recorded trajectory is re-evaluated with the image it was sampled with.
Every prompt needs an image (`requires_condition_image`: a prompt without one is refused in one line when a run
starts). The LoRA trains `transformer`, as Wan's. RLG: diffalign's `WanImageToVideoRLGPipeline` (diffusers' modular
Wan image-to-video blocks resize the image to the target area at its aspect ratio, another video than this pipeline
samples, and have no TI2V-5B route).
"""

from typing import Dict, List, Optional, Tuple

import torch

from ..errors import PromptError
from ..prompts import condition_images_of, last_image_of, load_condition_image
from ..utils.peft_utils import unwrap
from .base import Conditioning
from .wan import WanFamily


def first_frame_mask(frames: int, rows: int, columns: int, device) -> torch.Tensor:
    """`(1, 1, frames, rows, columns)` float32: 0 on the first latent frame (the condition image's, kept fixed), 1 on
    the frames that are sampled, as `WanImageToVideoPipeline.prepare_latents` builds it for `expand_timesteps`."""
    mask = torch.ones(1, 1, frames, rows, columns, device=device)
    mask[:, :, 0] = 0
    return mask


def token_timesteps(timesteps: torch.Tensor, mask: torch.Tensor, patch_h: int, patch_w: int) -> torch.Tensor:
    """`(B, tokens)`: each latent token's timestep, the step's on sampled frames and 0 on the fixed first frame, as
    `WanImageToVideoPipeline` (`mask[0][0][:, ::patch_h, ::patch_w] * t`, flattened)."""
    per_token = mask[0, 0][:, ::patch_h, ::patch_w].flatten()
    return per_token[None] * timesteps[:, None].to(per_token.dtype)


class WanImageToVideoFamily(WanFamily):
    name = "wan_i2v"
    pipeline_class = "WanImageToVideoPipeline"
    # its prompt cleaning needs ftfy unconditionally (`WanFamily.clean_prompts`)
    prompt_cleaning_module = "diffusers.pipelines.wan.pipeline_wan_i2v"
    rlg_pipeline_class = "WanImageToVideoRLGPipeline"  # Wan 2.1 I2V, TI2V-5B and I2V-A14B alike
    modular_blocks_class = None  # its RLG pipeline, not the modular blocks (see the module's docstring)
    hub_tags = ("wan", "image-to-video")
    max_condition_images = 1  # WanImageToVideoPipeline takes one `image` (and a prompt's `last_image`: FLF2V)
    requires_condition_image = True
    takes_last_image = True  # Wan 2.1 FLF2V models (`takes_last_frame`); the others refuse one in `conditioning`
    # Wan 2.2 TI2V-5B beside the default tiny model, Wan 2.1 I2V (its 16x VAE samples 32 pixels a side at the least:
    # the family tester's 16-pixel checks run on Wan 2.1; tests/test_family_wan_i2v.py trains TI2V-5B)
    tiny_variants = {"ti2v_5b": {"version": "2.2-ti2v"}}

    def __init__(self, pipe, max_cache: int = 4096):
        super().__init__(pipe, max_cache)
        self._condition_cache: Dict[Tuple, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}

    def frozen_modules(self) -> list:
        """Wan's, plus the CLIP image encoder of Wan 2.1 I2V (placed on the run's device and dtype, never trained)."""
        encoder = getattr(self.pipe, "image_encoder", None)
        return super().frozen_modules() + ([encoder] if encoder is not None else [])

    def takes_image_embeds(self) -> bool:
        """Wan 2.1 I2V: the transformer has an image embedder (`image_dim`), fed the CLIP image embedding."""
        return self.pipe.transformer.config.get("image_dim") is not None

    def fixes_first_frame(self) -> bool:
        """Wan 2.2 TI2V-5B (`expand_timesteps`): the condition image is the first latent frame, kept fixed (not
        sampled); Wan 2.1 I2V and I2V-A14B sample every frame, conditioned through extra channels."""
        return bool(self.pipe.config.get("expand_timesteps"))

    def takes_last_frame(self) -> bool:
        """Wan 2.1 FLF2V: the image embedder has positions for two images' tokens (`pos_embed_seq_len`), the first and
        the last frame's."""
        return self.takes_image_embeds() and self.pipe.transformer.config.get("pos_embed_seq_len") is not None

    # -------------------------------------------------------------------- prompts
    def encode_text(self, prompts: List[str], device) -> Conditioning:
        return super().encode_text([str(p) for p in prompts], device)  # the text alone reaches UMT5

    def conditioning(self, prompts: List[str], negative_prompt: str, do_cfg: bool, height: int, width: int):
        """Wan's, plus each prompt's condition (`image_latents`) and, for Wan 2.1 I2V, its CLIP image embedding
        (`image_embeds`), the same in the negative half (as the pipeline gives both halves the image). FLF2V: with
        each prompt's `last_image` (required there, refused by every other model)."""
        cond, negative = super().conditioning(prompts, negative_prompt, do_cfg, height, width)
        device = cond["encoder_hidden_states"].device
        keys = []
        for prompt in prompts:
            self.check_condition(prompt)
            keys.append((condition_images_of(prompt)[0], last_image_of(prompt), int(height), int(width),
                         self.num_frames))
        for key in dict.fromkeys(keys):
            if key not in self._condition_cache:
                if len(self._condition_cache) >= self.max_cache:
                    self._condition_cache.clear()
                path, last, key_height, key_width, _ = key
                self._condition_cache[key] = self.encode_condition_image(path, key_height, key_width, last)
        extra = {"image_latents": torch.stack([self._condition_cache[key][0] for key in keys]).to(device)}
        if self.takes_image_embeds():
            extra["image_embeds"] = torch.stack([self._condition_cache[key][1] for key in keys]).to(device)
        cond = {**cond, **extra}
        if negative is not None:
            negative = {**negative, **{name: value.clone() for name, value in extra.items()}}
        return cond, negative

    def check_condition(self, prompt):
        """A one-line `PromptError` unless `prompt` has an image, and a `last_image` exactly where the model takes one
        (Wan 2.1 FLF2V: `takes_last_frame`)."""
        if not condition_images_of(prompt):
            raise PromptError(f"{self.name} turns an image into a video: the prompt '{prompt}' has no 'image'")
        if last_image_of(prompt) is not None and not self.takes_last_frame():
            raise PromptError(f"the prompt '{prompt}' has a 'last_image', but this Wan image-to-video model takes no "
                              f"last frame (Wan 2.1 FLF2V does: a transformer with pos_embed_seq_len)")
        if last_image_of(prompt) is None and self.takes_last_frame():
            raise PromptError(f"this Wan 2.1 FLF2V model ends every video on a last frame: the prompt '{prompt}' has "
                              f"no 'last_image'")

    def pipeline_condition_kwargs(self, prompt) -> Dict:
        """The pipeline's `image` (and `last_image`) for one prompt (PIL): with `pipeline_call_kwargs`, the call that
        samples as a rollout of that prompt does (`check_condition` first)."""
        self.check_condition(prompt)
        last = last_image_of(prompt)
        return {"image": load_condition_image(condition_images_of(prompt)[0]),
                **({"last_image": load_condition_image(last)} if last is not None else {})}

    @torch.no_grad()
    def encode_condition_image(self, path: str, height: int, width: int,
                               last_path: Optional[str] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`(condition latents, CLIP image embedding or None)` of the image at `path` (and the last frame at
        `last_path`, FLF2V) for a `height x width` video of `num_frames` frames, with the pipeline's own code:
        `video_processor.preprocess`, `prepare_latents` (given latents, so no noise is drawn) and `encode_image`.
        TI2V-5B: `(C, 1, h, w)`; Wan 2.1 I2V: `(4 + C, F, h, w)` (mask channels first) and `(tokens, dim)`; FLF2V:
        `(4 + C, F, h, w)` and `(2, tokens, dim)` (the first and the last image's)."""
        pipe, device = self.pipe, self.device
        image = load_condition_image(path)
        pixels = pipe.video_processor.preprocess(image, height=height, width=width).to(device, dtype=torch.float32)
        last = last_pixels = None
        if last_path is not None:
            last = load_condition_image(last_path)
            last_pixels = pipe.video_processor.preprocess(last, height=height, width=width).to(device,
                                                                                               dtype=torch.float32)
        channels = pipe.vae.config.z_dim
        frames = (self.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        shape = (1, channels, frames, height // self.vae_scale_factor, width // self.vae_scale_factor)
        outputs = pipe.prepare_latents(pixels, 1, channels, height, width, self.num_frames, torch.float32, device,
                                       None, torch.zeros(shape, device=device), last_pixels)
        embeds = None
        if self.takes_image_embeds():
            embeds = pipe.encode_image(image if last is None else [image, last], device)
            embeds = embeds[0] if last is None else embeds
        return outputs[1][0], embeds

    # ----------------------------------------------------------- latents and time
    def prepare_latents(self, batch_size, height, width, dtype, device, generator, latents=None, denoiser=None):
        """`(B, C, F, h, w)` Gaussian noise drawn as `WanImageToVideoPipeline.prepare_latents` draws it (float32, the
        same numbers for the same generator), in `dtype`; C is the VAE's `z_dim` (the transformer of Wan 2.1 I2V
        takes more channels: the condition's)."""
        from diffusers.utils.torch_utils import randn_tensor

        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        frames = (self.num_frames - 1) // self.pipe.vae_scale_factor_temporal + 1
        shape = (batch_size, self.pipe.vae.config.z_dim, frames, int(height) // self.vae_scale_factor,
                 int(width) // self.vae_scale_factor)
        return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=torch.float32).to(dtype)

    # ------------------------------------------------------------------ denoising
    def forward(self, denoiser, latents, timesteps, cond: Conditioning):
        """One transformer call, conditioned as `WanImageToVideoPipeline`'s loop: TI2V-5B sees the condition as the
        first latent frame with timestep 0 on its tokens (its prediction there is 0: the frame is not sampled);
        Wan 2.1 I2V sees the mask and condition channels after the latents, and the CLIP image embedding."""
        model = unwrap(denoiser)
        condition = cond["image_latents"].to(latents.dtype)
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        image_embeds = cond.get("image_embeds")
        if image_embeds is not None and image_embeds.ndim == 4:  # FLF2V: each row's two images, in order, as
            image_embeds = image_embeds.flatten(0, 1)  # the pipeline's `(2B, tokens, dim)`
        if self.fixes_first_frame():
            _, patch_h, patch_w = model.config.patch_size
            mask = first_frame_mask(*latents.shape[2:], latents.device)
            hidden_states = (1 - mask) * condition + mask * latents
            timestep = token_timesteps(timesteps, mask, patch_h, patch_w)
        else:
            hidden_states = torch.cat([latents, condition], dim=1)
            timestep = timesteps
        prediction = denoiser(hidden_states=hidden_states.to(model.dtype), timestep=timestep,
                              encoder_hidden_states=cond["encoder_hidden_states"].to(model.dtype),
                              encoder_hidden_states_image=image_embeds.to(model.dtype) if image_embeds is not None
                              else None, return_dict=False)[0]
        if self.fixes_first_frame():
            prediction = prediction * mask.to(prediction.dtype)  # the fixed first frame does not move
        return prediction

    def sampled_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """TI2V-5B: the latent frames after the first (a view), the first being the condition's (`first_frame_mask`):
        the forward-process losses count these alone."""
        return latents[:, :, 1:] if self.fixes_first_frame() else latents

    def final_latents(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """TI2V-5B: the sampled latents with the condition as their first frame, what the pipeline decodes."""
        if not self.fixes_first_frame():
            return latents
        mask = first_frame_mask(*latents.shape[2:], latents.device)
        return (1 - mask) * cond["image_latents"].to(latents.dtype) + mask * latents

    # ------------------------------------------------------------------------ RLG
    @classmethod
    def modular_blocks(cls):
        return None  # RLG runs in `rlg_pipeline_class` (and no import of Wan's modular encoders)

    # --------------------------------------------------------- tiny test models
    @classmethod
    def tiny_components(cls, seed: int = 0, version: str = "2.1-i2v", boundary_ratio: Optional[float] = None) -> dict:
        """Components of a tiny random `WanImageToVideoPipeline`. "2.2-ti2v": Wan's tiny TI2V-5B (the z_dim-48 VAE,
        `expand_timesteps`), no image encoder. "2.1-i2v" (default): Wan's tiny 2.1 components with a transformer taking
        the 36 input channels (latents, mask, condition) and a 4-wide image embedding from a tiny `CLIPVisionModel`
        (diffusers' Wan I2V tests' configs), with a `CLIPImageProcessor` built in code. "2.1-flf2v": that model with
        positions for two images' CLIP tokens (`pos_embed_seq_len`: Wan 2.1 FLF2V, a `last_image` on every prompt;
        not a `tiny_variants` entry, as the family tester's prompts have none). "2.2-i2v-a14b": Wan 2.2 I2V-A14B, two
        such 36-channel experts without an image embedding (no image encoder) and Wan's tiny A14B `boundary_ratio`
        (0.03: every step of a short run on `transformer`; a higher `boundary_ratio` reaches `transformer_2`)."""
        cls.clean_prompts()  # a tiny pipeline samples at once in the tests
        if version == "2.2-ti2v":
            return {**WanFamily.tiny_components(seed, version="2.2-ti2v"), "image_encoder": None,
                    "image_processor": None}
        if version not in ("2.1-i2v", "2.1-flf2v", "2.2-i2v-a14b"):
            raise ValueError(f"unknown tiny Wan image-to-video version {version!r}")
        from diffusers import WanTransformer3DModel
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        if version == "2.2-i2v-a14b":
            components = WanFamily.tiny_components(seed, version="2.2-a14b", boundary_ratio=boundary_ratio)
            for offset, name in enumerate(("transformer", "transformer_2")):
                torch.manual_seed(seed + offset)
                components[name] = WanTransformer3DModel(
                    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36,
                    out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
            return {**components, "image_encoder": None, "image_processor": None}
        components = WanFamily.tiny_components(seed, version="2.1")
        torch.manual_seed(seed)
        components["transformer"] = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=64, image_dim=4,
            # the CLIP tokens of two images (32 x 32 patches and a class token each)
            pos_embed_seq_len=2 * (32 * 32 + 1) if version == "2.1-flf2v" else None)
        torch.manual_seed(seed)
        components["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            intermediate_size=16, patch_size=1)).eval()
        components["image_processor"] = CLIPImageProcessor(crop_size=32, size=32)
        return components
