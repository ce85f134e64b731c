"""Evaluation of a run's weights: held-out rewards during training, the final base-vs-trained evaluation, and the
fixed-seed sample grids; and `sample_in_chunks`, the one sampling loop over `sample_batch_size` chunks that training,
evaluations and grids share.

`Evaluator` is handed what it needs (the model, its sampling settings, the prompt sources and the scoring and
gathering functions), so it imports nothing of the trainer (an object, not a mixin: no import cycle)."""

import contextlib
import json
import logging
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from ..plotting import find_video, grid_scale, image_grid, labelled_rows, read_video, save_video, video_grid
from ..rollout import Trajectories, concat_trajectories, sample_trajectories
from ..runlog import finite_json
from ..utils.peft_utils import reference_model
from ..utils.torch_utils import seed_for

logger = logging.getLogger("diffalign")


def sample_in_chunks(family, prompts: Sequence[str], batch_size: Optional[int],
                     generator: Union[torch.Generator, List[torch.Generator]], autocast: Callable,
                     context: Optional[Callable] = None, group_ids: Optional[torch.Tensor] = None,
                     progress: bool = False, desc: str = "sampling",
                     on_chunk: Optional[Callable[[Trajectories], None]] = None, **rollout_kwargs) -> Trajectories:
    """`diffalign.rollout.sample_trajectories` over `prompts` in chunks of `batch_size` (one chunk when None).

    `generator` is one generator the chunks draw from in turn, or one per prompt (sliced with the chunks, as are
    `group_ids`). Each chunk runs under `autocast()` and, when given, a fresh `context()` (adapters disabled, EMA
    weights swapped in); `on_chunk(chunk)` is told of each sampled chunk, outside both (the trainers score it)."""
    size = batch_size or len(prompts)
    batches = []
    for start in tqdm(range(0, len(prompts), size), desc=desc, leave=False, disable=not progress):
        chunk = list(prompts[start : start + size])
        kwargs = dict(rollout_kwargs)
        if group_ids is not None:
            kwargs["group_ids"] = group_ids[start : start + size]
        chunk_generator = generator[start : start + size] if isinstance(generator, list) else generator
        with context() if context is not None else contextlib.nullcontext(), autocast():
            batches.append(sample_trajectories(family, chunk, generator=chunk_generator, **kwargs))
        if on_chunk is not None:
            on_chunk(batches[-1])
    return concat_trajectories(batches)


class Evaluator:
    """Held-out evaluation, final evaluation and sample grids of a run's current weights (their EMA with
    `ema_decay`).

    Args:
        config (`TrainConfig`), accelerator (`accelerate.Accelerator`).
        family (`ModelFamily`), kernel (`TransitionKernel`), resolution (`int`): what to sample with.
        denoiser, ref_denoiser: the (prepared) policy and the frozen reference (`None` with LoRA).
        sharded (`bool`): whether the denoiser is sharded (then every process takes part in every sampling).
        prompts, heldout (`PromptSource`): the training and held-out prompts (`heldout` may be `None`).
        ema_weights (`() -> context`): swaps the EMA weights in.
        score (`(trajectories, metadata) -> {name: Tensor}`), gather (`Tensor -> Tensor`): the trainer's.
    """

    def __init__(self, *, config, accelerator, family, kernel, resolution: int, denoiser, ref_denoiser,
                 sharded: bool, prompts, heldout, ema_weights: Callable, score: Callable, gather: Callable):
        self.config, self.accelerator = config, accelerator
        self.family, self.kernel, self.resolution = family, kernel, resolution
        self.denoiser, self.ref_denoiser, self.sharded = denoiser, ref_denoiser, sharded
        self.prompts, self.heldout = prompts, heldout
        self.ema_weights, self.score, self.gather = ema_weights, score, gather
        self.device = accelerator.device

    def _sample(self, prompts, generator, batch_size=None, **kwargs) -> Trajectories:
        config = self.config
        return sample_in_chunks(self.family, prompts, batch_size, generator, self.accelerator.autocast,
                                num_inference_steps=config.evaluation_num_steps,
                                guidance_scale=config.sample_guidance_scale, height=self.resolution,
                                width=self.resolution, kernel=self.kernel, **kwargs)

    @property
    def takes_part(self) -> bool:
        """Whether this process runs the main process's sampling (grids, final evaluation): every process when the
        denoiser is sharded (each forward gathers the weights from all of them), else the main one alone."""
        return self.sharded or self.accelerator.is_main_process

    @torch.no_grad()
    def heldout_evaluation(self) -> Dict[str, float]:
        """Reward (and eval reward) of fixed-seed samples of the held-out prompts (`eval_prompts`, `eval_prompt_file`
        or `eval_dataset_split`), of the EMA weights when `ema_decay` is set.

        Image `i` is held-out prompt `i` (cycled) with the noise of seed `(seed, i)` whatever the epoch, so the same
        weights give the same images and numbers, and a resumed run the uninterrupted run's. The images are shared
        out over the processes (each samples as many, so a sharded denoiser runs the same forwards everywhere) and
        the scores gathered; the global RNG is left as it was, so evaluating does not change the training."""
        config, acc = self.config, self.accelerator
        t0 = time.perf_counter()
        n = config.eval_num_images or len(self.heldout.prompts)
        items = self.heldout.grid_items(n, config.seed)
        mine = list(range(acc.process_index, n, acc.num_processes))
        per_process = math.ceil(n / acc.num_processes)
        index = mine + [mine[-1] if mine else 0] * (per_process - len(mine))  # padding, dropped after the gather
        generators = [torch.Generator(self.device).manual_seed(seed_for(config.seed, 2**31, 11, i)) for i in index]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.ema_weights():
            self.denoiser.eval()
            trajectories = self._sample([items[i][0] for i in index], generators, config.sample_batch_size,
                                        denoiser=self.denoiser,
                                        group_ids=torch.tensor(index, dtype=torch.long) % len(self.heldout.prompts))
        scores = self.score(trajectories, [items[i][1] for i in index])
        real = torch.tensor([1.0] * len(mine) + [0.0] * (per_process - len(mine)))
        gathered_real = self.gather(real).bool()
        gathered_index = self.gather(torch.tensor(index, dtype=torch.long))[gathered_real]
        order = gathered_index.argsort()  # image order, whatever the number of processes
        metrics = {}
        for key, value in scores.items():
            values = self.gather(value.float())[gathered_real][order]
            name = {"reward": "heldout_reward", "eval": "heldout_eval"}.get(key, f"heldout_{key}")
            metrics[f"{name}_mean"] = values.mean().item()
            if key == "reward":
                metrics["heldout_reward_std"] = values.std().item() if len(values) > 1 else 0.0
        metrics["time_heldout"] = time.perf_counter() - t0
        return metrics

    @torch.no_grad()
    def final_evaluation(self) -> Dict[str, Dict[str, float]]:
        """Base vs trained model (its EMA with `ema_decay`) on the same prompts and seeds: mean reward, eval reward
        and KL to base, written to `final_eval.json`. The prompts are the held-out ones when the config has them,
        else the training prompts."""
        config = self.config
        if not self.takes_part:
            return {}
        n = config.final_eval_num_images
        source = self.heldout if self.heldout is not None else self.prompts
        items = source.grid_items(n, config.seed + 1)
        prompts, metadata = [prompt for prompt, _ in items], [row for _, row in items]
        results = {}
        ref_module, ref_context = reference_model(self.denoiser, self.ref_denoiser)
        for name in ("base", "trained"):
            generator = torch.Generator(self.device).manual_seed(seed_for(config.seed, 2**31, 7))
            base = name == "base"
            trajectories = self._sample(
                prompts, generator, config.sample_batch_size, context=ref_context if base else self.ema_weights,
                denoiser=ref_module if base else self.denoiser, ref_denoiser=self.ref_denoiser,
                compute_reference=not base)
            scores = self.score(trajectories, metadata)
            results[name] = {"reward_mean": scores["reward"].mean().item(), "reward_std": scores["reward"].std().item()}
            if "eval" in scores:
                results[name]["eval_mean"] = scores["eval"].mean().item()
            if trajectories.kl_to_ref is not None:
                results[name]["kl_to_base"] = trajectories.kl_to_ref.nanmean().item()
        results["num_images"] = n
        if not self.accelerator.is_main_process:
            return results
        with open(os.path.join(config.output_dir, "final_eval.json"), "w") as f:
            json.dump(finite_json(results), f, indent=1, allow_nan=False)  # a NaN reward is written as null
        logger.info("final evaluation (%d images, fixed seeds): %s", n, json.dumps(results))
        return results

    @torch.no_grad()
    def grid_trajectories(self) -> Trajectories:
        """The fixed-seed grid samples (`grid_num_images`, `grid_prompts`) of the current weights, in one batch."""
        config = self.config
        n = config.grid_num_images
        source = config.grid_prompts or self.prompts.grid_prompts(n, config.seed)
        prompts = [source[i % len(source)] for i in range(n)]
        generator = torch.Generator(self.device).manual_seed(seed_for(config.seed, 2**31))
        self.denoiser.eval()
        return self._sample(prompts, generator, context=self.ema_weights, denoiser=self.denoiser)

    def scored_grid(self) -> Optional[Tuple[Trajectories, Dict[str, torch.Tensor]]]:
        """The grid samples and their scores on the main process (`None` elsewhere; processes that take part sample
        too), leaving the global RNG as it was: logging changes no training. Call it on every process."""
        if not self.takes_part:
            return None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            trajectories = self.grid_trajectories()
            if not self.accelerator.is_main_process:
                return None
            return trajectories, self.score(trajectories)

    def save_grid(self, filename: str):
        """`<output_dir>/<filename>` of the grid samples (and `grid_before_after.png` next to `grid_before.png`); an
        edit is shown after its condition image (`with_condition_images`). Videos make animated grids instead:
        `<stem>.mp4` (`.gif` without imageio-ffmpeg, `diffalign.plotting.save_video`), and `grid_before_after.mp4`."""
        if not self.takes_part:
            return
        trajectories = self.grid_trajectories()
        if not self.accelerator.is_main_process:
            return
        images, per_sample = with_condition_images(trajectories.images, trajectories.prompts)
        output_dir = self.config.output_dir
        nrow = per_sample * math.ceil(math.sqrt(len(images) // per_sample))
        if images.ndim == 5:
            return save_video_grid(images, nrow, grid_scale(self.resolution), output_dir, filename)
        image_grid(images, nrow=nrow, scale=grid_scale(self.resolution)).save(os.path.join(output_dir, filename))
        before = os.path.join(output_dir, "grid_before.png")
        if filename == "grid_after.png" and os.path.exists(before):
            from PIL import Image

            combined = labelled_rows([Image.open(before).convert("RGB"), image_grid(images, nrow=nrow, scale=grid_scale(
                self.resolution))], ["before", "after"], label_width=60)
            combined.save(os.path.join(output_dir, "grid_before_after.png"))


def save_video_grid(videos: torch.Tensor, nrow: int, scale: int, output_dir: str, filename: str) -> str:
    """The animated grid of `videos` `(N, F, 3, H, W)` as `<output_dir>/<filename's stem>.mp4` (or `.gif`), and for
    `grid_after` also `grid_before_after.mp4`: each frame the frame of `grid_before` over the same frame of this grid
    (the before grid read back from its file, so a resumed run has it too). Returns the grid's path."""
    frames = video_grid(videos, nrow=nrow, scale=scale)
    path = save_video(frames, os.path.join(output_dir, filename))
    before = find_video(os.path.join(output_dir, "grid_before"))
    if os.path.splitext(filename)[0] == "grid_after" and before is not None:
        # an MP4 frame is padded to multiples of 16: crop back to the grid's size
        before_frames = [frame.crop((0, 0, after.width, after.height)) for frame, after in zip(read_video(before),
                                                                                                frames)]
        save_video([labelled_rows([b, a], ["before", "after"], label_width=60) for b, a in zip(before_frames, frames)],
                   os.path.join(output_dir, "grid_before_after"))
    return path


def with_condition_images(images: torch.Tensor, prompts: Sequence[str]) -> Tuple[torch.Tensor, int]:
    """`(tiles, tiles per sample)` of a grid: `images` `(N, 3, H, W)` alone (1) when no prompt has a condition image,
    else each sample's condition images (resized to the sample's size; blank for a prompt without) before it, so a
    grid shows input and edit side by side. Videos `(N, F, 3, H, W)` likewise, a condition image standing still
    through the `F` frames, a condition video (video-to-video) playing its first `F` frames beside the result."""
    from ..prompts import condition_images_of, condition_videos_of, load_condition_tensor, load_condition_video

    videos = images.dim() == 5
    conditions = [[(path, False) for path in condition_images_of(prompt)]
                  + [(path, True) for path in (condition_videos_of(prompt) if videos else ())] for prompt in prompts]
    count = max((len(paths) for paths in conditions), default=0)
    if count == 0:
        return images, 1
    height, width = images.shape[-2:]
    tiles = []
    for image, paths in zip(images, conditions):
        for k in range(count):
            if k < len(paths):
                path, is_video = paths[k]
                condition = load_condition_video(path) if is_video else load_condition_tensor(path)[None]
                condition = torch.nn.functional.interpolate(condition, size=(height, width), mode="bilinear",
                                                            antialias=True, align_corners=False).clamp(0, 1)
                # a video's first F frames (its last one held if it has fewer); an image's one
                frames = torch.arange(images.shape[1]).clamp(max=condition.shape[0] - 1) if is_video else 0
                tiles.append(condition[frames])
            else:
                tiles.append(torch.ones(image.shape[-3:], dtype=torch.float32))
        tiles.append(image.float())
    # a video's condition tile is its image repeated over the frames
    tiles = [tile.cpu().expand(images.shape[1:]) if tile.dim() < images.dim() - 1 else tile.cpu() for tile in tiles]
    return torch.stack(tiles).to(images.device), count + 1
