"""`diffalign generate`: sample a base model and its aligned version at several RLG scales, side by side.

The model directory's `model_index.json` (`_class_name`) picks the family and its RLG route: an RLG pipeline for
Stable Diffusion 1.x/2.x (`StableDiffusionRLGPipeline`), SDXL (`StableDiffusionXLRLGPipeline`), SD3 / SD3.5
(`StableDiffusion3RLGPipeline`) and FLUX.1 (`FluxRLGPipeline`; `--guidance-scale` is then its embedded guidance,
default 3.5); for a family with diffusers modular blocks and no RLG pipeline (Z-Image, Qwen-Image, FLUX.2
[klein]), the RLG guider (`diffalign.guiders.ReinforcementLearningGuidance`) in its modular pipeline, with the
model's own CFG inside each branch (`ModelFamily.rlg_pipeline`; `--guidance-scale` is the CFG argument of the family's
pipeline: ZImagePipeline's `guidance_scale`, QwenImagePipeline's `true_cfg_scale` against the empty negative prompt,
Flux2KleinPipeline's `guidance_scale`, which a step-distilled klein ignores). The guider route takes the aligned model
as a LoRA (`--lora`) and runs one denoiser forward per model and condition. An editing model (FLUX.1 Kontext:
`FluxKontextRLGPipeline`) edits the condition image `--image` (required for it, refused for text-to-image models), the
same image for every prompt, sampled as the family's rollouts do (`ModelFamily.pipeline_call_kwargs`: resized to the
sampled size, no rescale to 1024^2 pixels); a model that takes several (Qwen-Image-Edit-Plus: `max_condition_images`)
gets every repeated `--image a.png --image b.png` in order, as its pipeline's `image=[...]`.
Wan image-to-video (`WanImageToVideoRLGPipeline`) starts each video from
`--image` (and ends it on `--last-image`, Wan 2.1 FLF2V); Wan 2.2 TI2V-5B text-to-video takes `WanRLGPipeline`.
Wan video-to-video (`WanVideoToVideoRLGPipeline`) starts from `--video` noised by `--strength`, sampled as the
family's rollouts (`--steps` steps, the last ones of a longer schedule, as training's `sample_num_steps`).

Writes, under `--output-dir`:
- `rlg_grid.png`: one labelled row per RLG scale with the same images in every row (at most `GRID_PER_ROW` = 8: the
  first image of each prompt, then the second, ...), a picture of bounded size whatever `--num-images` is; with
  `--image`, each image after its condition images, as the training grids show edits;
- `rlg_images/w<scale>/p<prompt>_seed<seed>.png`: every image, and `rlg_images/index.json` (file, prompt, seed, scale);
- with `--reward NAME`: `rlg_rewards.json` (one entry per scale: mean, std and every image's reward), the same table
  on stdout, and `rlg_rewards.png` (reward against scale).
A progress bar per scale counts the images on stderr.

Example:
    diffalign generate --model digits --lora runs/digits-prdp/final --rlg-scale 0 0.5 1 1.5 2 \\
        --reward digit_correctness --num-images 4 --output-dir runs/rlg
"""

from __future__ import annotations  # torch loads when a command runs, not when the CLI builds its parser

import argparse
import inspect
import json
import logging
import math
import os
from typing import Dict, List, Optional

logger = logging.getLogger(__name__)

DEFAULT_SCALES = [0.0, 0.5, 1.0, 1.5, 2.0]
GRID_PER_ROW = 8  # images per scale in rlg_grid.png (all of them go to rlg_images/)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the `generate` options to `parser` (the CLI's `generate` subcommand)."""
    parser.add_argument("--model", default="digits",
                        help="diffusers model directory, or a bundled name (digits, digits-flow)")
    parser.add_argument("--lora", default=None, help="LoRA directory (pytorch_lora_weights.safetensors) = aligned")
    parser.add_argument(
        "--aligned-denoiser",
        "--aligned-unet",
        "--aligned-transformer",
        dest="aligned_denoiser",
        default=None,
        help="fully fine-tuned denoiser (UNet, or SD3 transformer) directory, or a model dir with unet/ or transformer/ "
        "(Wan 2.2 A14B: transformer/ and/or transformer_2/, each expert a full fine-tune wrote)",
    )
    parser.add_argument("--prompt", action="append", default=None, help="a prompt; repeat for several")
    parser.add_argument("--image", action="append", default=None, metavar="PATH",
                        help="condition image of an editing or image-to-video model, the same for every prompt; "
                             "repeat for a model that takes several, in order (Qwen-Image-Edit-Plus: --image a.png "
                             "--image b.png, at most 3)")
    parser.add_argument("--video", default=None, metavar="PATH",
                        help="condition video of a video-to-video model (wan_v2v: required; its first --num-frames "
                             "frames), the same for every prompt; other models refuse it")
    parser.add_argument("--strength", type=float, default=None,
                        help="video-to-video: how far --video is noised, 0 < s <= 1 (default the pipeline's 0.8); "
                             "--steps steps are sampled, the last ones of a schedule of about steps / strength")
    parser.add_argument("--last-image", default=None,
                        help="last frame of a first-last-frame video model (Wan 2.1 FLF2V), with --image as the first")
    parser.add_argument(
        "--rlg-scale", type=float, nargs="+", default=DEFAULT_SCALES, help="RLG scales, one grid row each"
    )
    parser.add_argument("--reward", default=None, help="reward name (see diffalign.rewards) to score every image")
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt (seeds seed..seed+N-1)")
    parser.add_argument("--steps", type=int, default=20,
                        help="denoising steps (video-to-video: the steps sampled, as training's sample_num_steps)")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance inside each model (default: the family pipeline's, 5 for SD); FLUX.1: the "
        "embedded guidance (default 3.5; FLUX.1 Kontext 2.5); FLUX.2 [dev]: the embedded guidance (default 4)",
    )
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--num-frames", type=int, default=None,
                        help="frames per video of video models (Wan: 4k + 1; default the pipeline's, 81)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (SD, SDXL; SD3 samples the ODE)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rlg-start", type=float, default=0.0, help="fraction of steps where RLG starts")
    parser.add_argument("--rlg-stop", type=float, default=1.0, help="fraction of steps where RLG stops")
    parser.add_argument(
        "--two-pass", action="store_true", help="one denoiser forward per model instead of one batched"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--threads", "--num-threads", dest="threads", type=int, default=None,
                        help="torch CPU threads, as the trainers' num_threads (default: 1 for the bundled models on a "
                             "CPU, the fastest on shared cores; other models keep torch's setting)")
    parser.add_argument("--output-dir", default=os.path.join("runs", "generate"))
    return parser


def _resolve_model(name_or_path: str) -> str:
    """The local diffusers directory of `name_or_path`: `digits` is the bundled model, anything else a directory.

    Raises a `ValueError` (`diffalign.errors.ModelError`) naming what is missing.
    """
    from diffalign.utils.hub_utils import resolve_model_path

    return resolve_model_path(name_or_path)


def _default_prompts(model: str) -> List[str]:
    from diffalign.prompts import PromptError
    from diffalign.rewards.digits import DIGIT_WORDS
    from diffalign.utils.hub_utils import BUNDLED_MODELS

    if model in BUNDLED_MODELS:  # digits and digits-flow were both trained on the digit prompts
        return [f"a handwritten digit {word}" for word in DIGIT_WORDS]
    raise PromptError(f"no --prompt given (only the bundled models, {', '.join(BUNDLED_MODELS)}, have default prompts)")


def rlg_family_for(path: str):
    """The model family (`diffalign.families.ModelFamily` subclass) of the diffusers model at `path`: from its
    `model_index.json`, which may name the family's pipeline or, for a directory saved from one, its RLG pipeline.

    Raises a `ModelError` naming the supported families for a model whose family has no RLG route (neither an RLG
    pipeline nor modular blocks that take the RLG guider: `ModelFamily.rlg_route`).
    """
    import diffusers

    from diffalign.errors import ModelError
    from diffalign.families import FAMILIES, family_class, pipeline_class_of

    if os.path.isdir(path):
        pipeline_class = pipeline_class_of(path)
    else:  # a hub id (hub reachable)
        pipeline_class = diffusers.DiffusionPipeline.load_config(path)["_class_name"]
    supported = [name for name, family in FAMILIES.items() if family.rlg_route()]
    try:
        family = family_class(pipeline_class, rlg=True)
    except ModelError:
        family = None
    if family is None or not family.rlg_route():
        raise ModelError(
            f"unsupported model: pipeline class '{pipeline_class}'; diffalign generate supports {', '.join(supported)}"
        )
    return family


def rlg_pipeline_for(path: str):
    """`(RLG pipeline class, denoiser attribute name, denoiser class)` for the diffusers model at `path`, from its
    family (`rlg_family_for`); the RLG pipeline class is the family's diffusers pipeline where its RLG route is the
    modular guider (`load_rlg_pipeline` wraps it).

    Raises a `ModelError` naming the supported pipeline classes for any other model.
    """
    return _rlg_classes(rlg_family_for(path))


def _rlg_classes(family):
    import diffusers

    import diffalign.pipelines

    pipeline_class = (getattr(diffalign.pipelines, family.rlg_pipeline_class) if family.rlg_pipeline_class
                      else getattr(diffusers, family.pipeline_class))
    return pipeline_class, family.denoiser_name, getattr(diffusers, family.denoiser_class)


def _safetensors_only(what: str, load):
    """`load()` with safetensors weights only (a pickle `.bin` can run code when loaded): a `ModelError` naming
    `what` when the weights are missing or pickled, as `diffalign train` refuses them."""
    from diffalign.errors import ModelError, first_line

    try:
        return load()
    except (OSError, EnvironmentError) as e:
        raise ModelError(f"{what} could not be loaded with safetensors weights only (pickle .bin weights are refused):"
                         f" {first_line(e, with_type=False)}") from None


def _load_aligned_denoiser(path: str, pipe, denoiser_name: str, denoiser_class, dtype: torch.dtype) -> Dict:
    """The fully fine-tuned aligned model(s) at `path`, as `pipe`'s components `{aligned_<expert>: model}`: a
    `denoiser_class` directory (its own `config.json`) is the denoiser's; a model directory, or a training run's
    `final/`, holds a folder per fine-tuned expert of the RLG pipeline (`_rlg_experts`): the denoiser's and, for Wan
    2.2 A14B, `transformer_2/` (`train_experts: low_noise | both`); either alone will do. Safetensors weights only.

    Raises a one-line `ModelError` for a directory with none of these, or with a folder for an expert `pipe` lacks
    (`transformer_2/` for a one-expert model)."""
    from diffalign.errors import ModelError
    from diffalign.utils.torch_utils import dtype_kwarg

    what = f"--aligned-denoiser '{path}'"
    experts = getattr(pipe, "_rlg_experts", None) or {denoiser_name: f"aligned_{denoiser_name}"}

    def load(**subfolder):
        return _safetensors_only(what, lambda: denoiser_class.from_pretrained(
            path, use_safetensors=True, **subfolder, **dtype_kwarg(dtype)))

    found = [expert for expert in experts if os.path.isfile(os.path.join(path, expert, "config.json"))]
    for expert in found:
        if getattr(pipe, expert, None) is None:
            raise ModelError(f"{what} has {expert}/, a second (low-noise) expert's fine-tune, but this model has one"
                             f" expert")
    if found:
        return {experts[expert]: load(subfolder=expert) for expert in found}
    if os.path.isfile(os.path.join(path, "config.json")):
        return {experts[denoiser_name]: load()}
    folders = " or ".join(f"{expert}/" for expert in experts if getattr(pipe, expert, None) is not None)
    raise ModelError(f"{what} is neither a {denoiser_class.__name__} directory nor a model directory with {folders}")


def _load_lora(pipe, directory: str, denoiser_name: str, adapter_name: str = "aligned"):
    """`pipe.load_lora_weights` of every expert's LoRA in `directory` (Wan 2.2 A14B's low-noise one into
    `transformer_2`), with one clear error when the LoRA is missing, unreadable or does not fit."""
    from diffalign.utils.peft_utils import load_expert_loras_into_pipeline

    return load_expert_loras_into_pipeline(pipe, directory, adapter_name, denoiser_name)


def load_rlg_pipeline(
    model: str,
    lora: Optional[str] = None,
    aligned_denoiser: Optional[str] = None,
    device: Optional[str] = None,
    dtype: str = "auto",
    aligned_unet: Optional[str] = None,
    num_threads: Optional[int] = None,
):
    """The RLG pipeline of `model`'s family with its aligned version (a LoRA and/or a fully fine-tuned denoiser); for
    a family whose RLG route is the modular guider, its `ModularRLGPipeline` on the family pipeline's components
    (`ModelFamily.rlg_pipeline`), which takes a LoRA only: a full fine-tune takes the family's
    `full_fine_tune_rlg_pipeline_class` instead (Wan: `WanRLGPipeline`), else a one-line `ModelError`.
    `aligned_denoiser` gives every expert the fine-tune wrote (`_load_aligned_denoiser`: Wan 2.2 A14B's
    `transformer/` and/or `transformer_2/`).

    `aligned_unet` is the former name of `aligned_denoiser` (a UNet or an SD3 transformer). `num_threads`: torch's
    CPU threads, as the trainers' `num_threads` (by default one for the bundled models on a CPU; see
    `diffalign.utils.torch_utils.apply_torch_threads`). Weights load from safetensors files only.
    """
    import torch

    from diffalign.utils.torch_utils import apply_torch_threads, dtype_kwarg

    aligned_denoiser = aligned_denoiser or aligned_unet
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    apply_torch_threads(model, num_threads, device)
    if dtype == "auto":
        dtype = "float16" if str(device).startswith("cuda") else "float32"
    torch_dtype = getattr(torch, dtype)
    path = _resolve_model(model)
    family = rlg_family_for(path)
    pipeline_class, denoiser_name, denoiser_class = _rlg_classes(family)
    # the modular guider switches LoRA adapters, not models: a full fine-tune takes the family's RLG pipeline for one
    # where it has one (Wan: `WanRLGPipeline`, both A14B experts)
    full_fine_tune_class = family.full_fine_tune_rlg_pipeline_class
    if aligned_denoiser and not family.rlg_pipeline_class:
        from diffalign.errors import ModelError

        if not full_fine_tune_class:
            raise ModelError(f"--aligned-denoiser: RLG for {family.name} models runs the guider in the modular"
                             f" pipeline, whose aligned model is a LoRA adapter; give the fine-tune as --lora DIR")
        import diffalign.pipelines

        pipeline_class = getattr(diffalign.pipelines, full_fine_tune_class)
    own_pipeline = bool(family.rlg_pipeline_class or aligned_denoiser)  # else the modular guider
    if lora and own_pipeline and "transformer_2" not in getattr(pipeline_class, "_rlg_experts", ()):
        from diffalign.utils.peft_utils import LOW_NOISE_LORA_WEIGHT_NAME

        if os.path.isfile(os.path.join(lora, LOW_NOISE_LORA_WEIGHT_NAME)):
            from diffalign.errors import ModelError

            # an RLG pipeline that mixes on `transformer` alone (the Wan ones guide both experts: `_rlg_experts`): an
            # adapter on `transformer_2` would stay on at every scale, so w = 0 would not be the base model
            raise ModelError(f"--lora: '{lora}' has a low-noise expert's LoRA ({LOW_NOISE_LORA_WEIGHT_NAME}), but "
                             f"{family.name}'s RLG pipeline ({family.rlg_pipeline_class}) guides the high-noise expert "
                             f"only; train with train_experts high_noise for it")
    # the family's arguments that switch off a safety checker or watermarker
    pipe = _safetensors_only(f"model '{model}'", lambda: pipeline_class.from_pretrained(
        path, use_safetensors=True, **dtype_kwarg(torch_dtype), **family.pipeline_init_kwargs,
        **family.loaded_components(path)))  # e.g. Qwen-Image-Edit's and QwenImage 2.1's processors without torchvision
    if aligned_denoiser:  # every expert the fine-tune wrote (Wan 2.2 A14B: transformer/ and/or transformer_2/)
        pipe.register_modules(**_load_aligned_denoiser(aligned_denoiser, pipe, denoiser_name, denoiser_class,
                                                       torch_dtype))
    if lora:
        _load_lora(pipe, lora, denoiser_name)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    # the modular route: the family's modular pipeline on these components, the LoRA its aligned model
    return pipe if own_pipeline else family.rlg_pipeline(pipe)


def sample_scales(
    pipe, prompts: List[str], scales: List[float], num_images: int, seed: int, progress: bool = False, **call_kwargs
) -> Dict:
    """Images `[len(prompts) * num_images, 3, H, W]` in [0, 1] for each scale (videos of a video model: `[N, F, 3,
    H, W]`); the same seeds at every scale.

    `progress`: a tqdm bar per scale (on stderr) counting its images.
    """
    import torch
    from tqdm.auto import tqdm

    parameters = inspect.signature(pipe.__call__).parameters
    if "eta" not in parameters:
        call_kwargs.pop("eta", None)  # flow-matching pipelines (SD3) sample the deterministic ODE: no eta
    if "rlg_single_pass" not in parameters:
        call_kwargs.pop("rlg_single_pass", None)  # the modular guider runs one forward per model and condition
    per_prompt = "num_videos_per_prompt" if "num_videos_per_prompt" in parameters else "num_images_per_prompt"
    device = pipe._execution_device
    generator_device = "cpu" if device.type == "mps" else device
    images = {}
    for scale in scales:
        rows = []
        with tqdm(total=len(prompts) * num_images, desc=f"w = {scale:g}", unit="img", disable=not progress) as bar:
            for prompt in prompts:
                generators = [torch.Generator(generator_device).manual_seed(seed + j) for j in range(num_images)]
                with torch.no_grad():
                    out = pipe(
                        prompt=prompt,
                        generator=generators,
                        rlg_scale=scale,
                        output_type="pt",
                        **{per_prompt: num_images},  # a video pipeline's name (Wan's RLG pipelines)
                        **call_kwargs,
                    )
                # a video pipeline's output (WanPipelineOutput) holds `.frames`
                rows.append((out.frames if hasattr(out, "frames") else out.images).float().cpu())
                bar.update(num_images)
        images[scale] = torch.cat(rows)
    return images


def grid_order(num_prompts: int, num_images: int) -> List[int]:
    """Image indices (prompt-major, as `sample_scales` returns them) for a grid row: the first image of each prompt,
    then the second, ..."""
    return [p * num_images + j for j in range(num_images) for p in range(num_prompts)]


def save_images(images: Dict, prompts: List[str], num_images: int, seed: int, directory: str) -> str:
    """Every image as `directory/w<scale>/p<prompt>_seed<seed>.png` (a video as `.mp4`, or `.gif` without
    imageio-ffmpeg: `diffalign.plotting.save_video`) plus `directory/index.json`; returns the index."""
    from PIL import Image

    from diffalign.plotting import save_video

    entries = []
    digits = max(2, len(str(len(prompts) - 1)))
    for scale, batch in images.items():
        folder = os.path.join(directory, f"w{scale:g}")
        os.makedirs(folder, exist_ok=True)
        # (N, [F,] H, W, 3) uint8
        array = (batch.clamp(0, 1).movedim(-3, -1).numpy() * 255).round().astype("uint8")
        for i, pixels in enumerate(array):
            p, j = divmod(i, num_images)
            name = os.path.join(f"w{scale:g}", f"p{p:0{digits}d}_seed{seed + j}.png")
            if pixels.ndim == 4:  # a video's frames
                written = save_video([Image.fromarray(frame) for frame in pixels], os.path.join(directory, name))
                name = os.path.relpath(written, directory)
            else:
                Image.fromarray(pixels).save(os.path.join(directory, name))
            entries.append({"file": name, "rlg_scale": scale, "prompt": prompts[p], "seed": seed + j})
    index = os.path.join(directory, "index.json")
    with open(index, "w") as f:
        json.dump(entries, f, indent=1)
    return index


def image_paths(image) -> List[str]:
    """`--image` as a list of paths: none, one path (a str, as callers before the flag was repeatable pass it) or
    the repeated flag's list."""
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def check_image_flag(family, image, last_image: Optional[str] = None):
    """Checks `--image` (none, a path, or the repeated flag's paths) and `--last-image` against `family` (a
    `ModelFamily` subclass) before anything loads: a one-line `PromptError` for a missing or unreadable file, a
    `ConfigError` for an image given to a text-to-image family, none given to an editing family, more than the family
    takes (`max_condition_images`), or a last frame given to a family that takes none (`takes_last_image`) or without
    `--image`."""
    from diffalign.errors import ConfigError
    from diffalign.prompts import check_condition_image

    paths = image_paths(image)
    if last_image is not None:
        if not family.takes_last_image:
            raise ConfigError(f"--last-image: {family.name} models take no last frame (Wan 2.1 FLF2V image-to-video "
                              f"models do); leave --last-image out")
        if not paths:
            raise ConfigError("--last-image is the last frame of a video that starts from --image: give --image too")
        check_condition_image(last_image, "--last-image")
    if not paths:
        if family.max_condition_images:
            raise ConfigError(f"{family.name} models edit an image: give the condition image with --image PATH")
        return
    if not family.max_condition_images:
        raise ConfigError(f"--image: {family.name} models take no condition image (text-to-image); leave --image "
                          f"out")
    if len(paths) > family.max_condition_images:
        takes = ("one condition image" if family.max_condition_images == 1
                 else f"at most {family.max_condition_images} condition images")
        raise ConfigError(f"--image: {family.name} models take {takes}; got {len(paths)}")
    for path in paths:
        check_condition_image(path, "--image")


def check_video_flag(family, video: Optional[str], strength: Optional[float] = None,
                     num_frames: Optional[int] = None):
    """Checks `--video` and `--strength` against `family` (a `ModelFamily` subclass) before anything loads: a
    `ConfigError` for a video or a strength given to a family that takes no video (`max_condition_videos`), no video
    for one that requires it (`requires_condition_video`), a strength outside (0, 1], or a video of fewer frames than
    the sampled `num_frames` (`--num-frames`, default the family's); a one-line `PromptError` for a missing or
    unreadable file."""
    from diffalign.errors import ConfigError
    from diffalign.prompts import check_condition_video

    if not family.max_condition_videos:
        for flag, value in (("--video", video), ("--strength", strength)):
            if value is not None:
                raise ConfigError(f"{flag}: {family.name} models take no condition video (only video-to-video "
                                  f"models, wan_v2v, do); leave {flag} out")
        return
    if strength is not None and not 0 < strength <= 1:
        raise ConfigError(f"--strength must be in (0, 1] (the share of the schedule sampled from the noised "
                          f"--video); got {strength}")
    if video is None:
        if family.requires_condition_video:
            raise ConfigError(f"{family.name} models turn a video into a video: give the condition video with "
                              f"--video PATH")
        return
    check_condition_video(video, "--video")
    from diffalign.families.wan_v2v import read_condition_frames

    frames, needed = len(read_condition_frames(video)), num_frames or family.num_frames
    if frames < needed:
        raise ConfigError(f"--video '{video}' has {frames} frames; {family.name} samples {needed} (--num-frames): "
                          f"give --num-frames 4k + 1 <= {frames} or a longer video")


def video_call_kwargs(family, pipe, video: str, resolution: Optional[int], num_frames: Optional[int] = None,
                      strength: Optional[float] = None, steps: int = 20) -> Dict:
    """The pipeline arguments with which `pipe` turns `video` (a path) into a video as `family`'s rollouts sample
    (`ModelFamily.pipeline_condition_kwargs`, `pipeline_call_kwargs`): the video's first `num_frames` frames (the
    family's default without), the sampled size (the model's default side without `resolution`), the `strength`
    (the pipeline's 0.8 without) and `num_inference_steps`, the schedule whose last `steps` steps the strength keeps
    (`pipeline_num_inference_steps`: `steps` means what training's `sample_num_steps` means). A one-line
    `ConfigError` when that schedule is longer than the scheduler's timesteps."""
    from diffalign.errors import ConfigError
    from diffalign.prompts import ConditionedPrompt

    sampler = family(pipe)
    sampler.configure(num_frames=num_frames, strength=strength)
    side = resolution or sampler.default_resolution()
    total, limit = sampler.pipeline_num_inference_steps(steps), pipe.scheduler.config.num_train_timesteps
    if total > limit:
        raise ConfigError(f"--strength {sampler.strength:g} samples --steps {steps} as the last steps of a "
                          f"{total}-step schedule, longer than the scheduler's {limit} timesteps: raise --strength or "
                          f"lower --steps")
    condition = sampler.pipeline_condition_kwargs(ConditionedPrompt("", (), (video,)))
    return {**condition, "height": side, "width": side, **sampler.pipeline_call_kwargs(side, side),
            "num_inference_steps": total}


def edit_call_kwargs(family, pipe, image, resolution: Optional[int], last_image: Optional[str] = None) -> Dict:
    """The pipeline arguments that edit `image` (a path, or a list of paths for a model that takes several) with
    `pipe` as `family`'s rollouts sample: the images as the family's pipeline takes them, the sampled size (the
    model's default side without `resolution`) and the family's call arguments (`ModelFamily.pipeline_call_kwargs`).
    FLUX.1 Kontext: the image resized to the sampled size, with its `max_area` and no resize to a preferred
    resolution; Qwen-Image-Edit and Wan image-to-video: the image as given (`pipeline_condition_kwargs`; Edit-Plus: a
    list of every image, in order, as training's `images` rows; Wan 2.1 FLF2V also `last_image`), which the
    pipelines resize themselves."""
    from diffalign.prompts import ConditionedPrompt

    paths = image_paths(image)
    sampler = family(pipe)
    side = resolution or sampler.default_resolution()
    condition = sampler.pipeline_condition_kwargs(ConditionedPrompt("", tuple(paths), last_image=last_image)) \
        or {"image": sampler.pipeline_image(paths[0], side, side)}
    return {**condition, "height": side, "width": side, **sampler.pipeline_call_kwargs(side, side)}


def check_device(name: Optional[str]):
    """Raises a one-line `ConfigError` for a `--device` that is not a torch device or not available here."""
    import torch

    from diffalign.errors import ConfigError

    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--device '{name}' is not a torch device ({str(e).strip().splitlines()[0]})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"--device {name}: {built}; use --device cpu (or leave --device out)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available here; use --device cpu")


def _plot_rewards(results: List[Dict], reward: str, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffalign.plotting import clipped_error_bars

    scales = [r["rlg_scale"] for r in results]
    means = [r["reward_mean"] for r in results]
    # mean +- std, clipped to the rewards seen: a probability's bar never leaves [0, 1]
    below, above = clipped_error_bars(means, [r["reward_std"] for r in results],
                                      [min(r["rewards"]) for r in results], [max(r["rewards"]) for r in results])
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.errorbar(scales, means, yerr=[below, above], marker="o", capsize=3)
    ax.axvline(1.0, color="gray", linestyle=":", linewidth=1)  # the aligned model without RLG
    ax.set_xlabel("RLG scale")
    ax.set_ylabel(reward)
    ax.set_title(f"{reward} vs RLG scale")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Runs `diffalign generate` with parsed `args`; returns the exit code."""
    from diffalign.errors import ConfigError, ModelError
    from diffalign.plotting import rows_grid

    from diffalign.families import check_model_resolution

    # the most basic problem first: the model, then the values, the device, the prompts, the aligned model
    model_path = _resolve_model(args.model)
    reward_fn = None
    if args.reward:  # a typo in the name is said before anything loads
        from diffalign.rewards import get_reward

        reward_fn = get_reward(args.reward)
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1; got {args.threads}")
    scales = [float(s) for s in args.rlg_scale]
    for flag, values in (("--rlg-scale", scales), ("--guidance-scale", [args.guidance_scale]), ("--eta", [args.eta]),
                         ("--rlg-start", [args.rlg_start]), ("--rlg-stop", [args.rlg_stop])):
        bad = [v for v in values if v is not None and not math.isfinite(v)]
        if bad:
            raise ConfigError(f"{flag} must be a finite number; got {bad[0]}")
    if args.num_images < 1 or args.steps < 1:
        raise ConfigError("--num-images and --steps must be at least 1")
    if args.resolution is not None and args.resolution < 1:
        raise ConfigError("--resolution must be a positive number of pixels")
    if args.num_frames is not None and (args.num_frames < 1 or (args.num_frames - 1) % 4):
        raise ConfigError(f"--num-frames must be 4k + 1 frames (1, 5, 9, ..., 81); got {args.num_frames}")
    check_model_resolution(args.model, args.resolution)  # from the model's configs: no weights loaded yet
    if not 0.0 <= args.rlg_start <= args.rlg_stop <= 1.0:
        raise ConfigError("need 0 <= --rlg-start <= --rlg-stop <= 1")
    check_device(args.device)
    prompts = args.prompt or _default_prompts(args.model)
    if not args.lora and not args.aligned_denoiser and any(s != 1.0 for s in scales):
        raise ConfigError("RLG needs an aligned model: pass --lora DIR or --aligned-denoiser DIR")
    for flag, path in (("--lora", args.lora), ("--aligned-denoiser", args.aligned_denoiser)):
        if path and not os.path.exists(path):
            raise ModelError(f"{flag} '{path}' does not exist")
        if path and not os.path.isdir(path):
            raise ModelError(f"{flag} '{path}' is {'a file' if os.path.isfile(path) else 'not a directory'}: give "
                             f"the directory that holds the weights")

    family = rlg_family_for(model_path)
    check_image_flag(family, args.image, args.last_image)
    check_video_flag(family, args.video, args.strength, args.num_frames)
    if args.num_frames is not None and family.output_kind != "video":
        raise ConfigError(f"--num-frames is for video models (wan); this {family.name} model samples images")

    from diffalign.utils.logging_utils import quiet_libraries

    quiet_libraries()
    pipe = load_rlg_pipeline(args.model, args.lora, args.aligned_denoiser, args.device, args.dtype,
                             num_threads=args.threads)
    size = {"height": args.resolution, "width": args.resolution} if args.resolution else {}
    if args.image:
        size = edit_call_kwargs(family, pipe, args.image, args.resolution, args.last_image)
    steps = args.steps
    if args.video:  # the video, its strength, and the schedule whose last --steps steps the strength keeps
        size = video_call_kwargs(family, pipe, args.video, args.resolution, args.num_frames, args.strength, args.steps)
        steps = size.pop("num_inference_steps")
    if args.num_frames and not args.video:  # over the family's default (image-to-video's call arguments name one)
        size["num_frames"] = args.num_frames
    images = sample_scales(
        pipe,
        prompts,
        scales,
        args.num_images,
        args.seed,
        progress=True,
        num_inference_steps=steps,
        guidance_scale=args.guidance_scale if args.guidance_scale is not None else family.default_guidance_scale,
        **size,
        eta=args.eta,
        rlg_start=args.rlg_start,
        rlg_stop=args.rlg_stop,
        rlg_single_pass=not args.two_pass,
    )

    os.makedirs(args.output_dir, exist_ok=True)
    shown = grid_order(len(prompts), args.num_images)[:GRID_PER_ROW]
    grid_path = os.path.join(args.output_dir, "rlg_grid.png")
    labels = [f"w = {s:g}" for s in scales]
    rows, per_sample = [images[s][shown] for s in scales], 1
    if args.image:  # each result after its inputs (a video's as still frames), as the training grids show them
        from diffalign.prompts import ConditionedPrompt
        from diffalign.trainers.evaluation import with_condition_images

        # the condition images, and a first-last-frame video's last frame after them
        inputs = tuple(os.path.abspath(path) for path in image_paths(args.image) + [args.last_image] if path)
        edited = [ConditionedPrompt(prompts[i // args.num_images], inputs) for i in shown]
        tiled = [with_condition_images(row, edited) for row in rows]
        rows, per_sample = [tiles for tiles, _ in tiled], tiled[0][1]  # per sample: its inputs and the result
    if family.output_kind == "video":  # an animated grid: frame f shows frame f of every video, a row per scale
        from diffalign.plotting import save_video

        frames = [rows_grid([row[:, f] for row in rows], labels, max_per_row=GRID_PER_ROW * per_sample)
                  for f in range(rows[0].shape[1])]
        grid_path = save_video(frames, grid_path)
    else:
        rows_grid(rows, labels, max_per_row=GRID_PER_ROW * per_sample).save(grid_path)
    index = save_images(images, prompts, args.num_images, args.seed, os.path.join(args.output_dir, "rlg_images"))
    total = len(prompts) * args.num_images
    print(f"wrote {grid_path} ({len(scales)} rows: RLG scales {', '.join(f'{s:g}' for s in scales)}; "
          f"{len(shown)} of {total} images per scale) and all {total * len(scales)} images under "
          f"{os.path.dirname(index)}")

    if reward_fn is not None:
        batch_prompts = [p for p in prompts for _ in range(args.num_images)]
        results = []
        from diffalign.rewards import call_reward

        for scale in scales:
            if family.output_kind == "video":  # an image reward scores each frame, averaged; a video-native one
                rewards = call_reward(reward_fn, images[scale], batch_prompts, None, name=args.reward,
                                      video_reduction="mean")
            else:
                rewards = reward_fn(images[scale], batch_prompts, None)
            rewards = rewards.float().cpu()
            results.append(
                {
                    "rlg_scale": scale,
                    "reward": args.reward,
                    "reward_mean": rewards.mean().item(),
                    "reward_std": rewards.std(unbiased=False).item(),
                    "rewards": rewards.tolist(),
                }
            )
        json_path = os.path.join(args.output_dir, "rlg_rewards.json")
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
        plot_path = os.path.join(args.output_dir, "rlg_rewards.png")
        _plot_rewards(results, args.reward, plot_path)

        print(f"\n{'rlg_scale':>9}  {args.reward + ' mean':>24}  {'std':>9}")
        for r in results:
            print(f"{r['rlg_scale']:>9g}  {r['reward_mean']:>24.4f}  {r['reward_std']:>9.4f}")
        print(f"\nwrote {json_path} and {plot_path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="diffalign generate", description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
