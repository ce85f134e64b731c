"""The model card of a trained run (`final/README.md`) and its upload to the Hub.

The card follows the Hub's and diffusers' conventions: YAML front matter (`base_model`, `library_name: diffusers`,
`license`, `tags`, `pipeline_tag`) written with `huggingface_hub.ModelCardData`, then a body with the algorithm, the
reward, the key settings, the `final_eval.json` table, the before/after grid (copied into `final/`) and a usage
snippet for the family's pipeline (`load_lora_weights`, or the trained denoiser of a full fine-tune) and for
diffalign's RLG pipeline (`rlg_scale`). `push_to_hub` uploads `final/` with `HfApi.upload_folder`; it runs after
everything is written, so a failed push (offline, no token, HTTP error) is one line and loses nothing.
"""

import inspect
import json
import logging
import os
import shutil
from typing import Dict, List, Optional, Union

import yaml

from .errors import HubError, first_line

logger = logging.getLogger("diffalign")

CARD = "README.md"
GRID = "grid_before_after.png"
CONFIG_COPY = "diffalign_config.json"

ALGORITHMS = {
    "prdp": ("PRDP", "Proximal Reward Difference Prediction, [Deng et al., CVPR 2024](https://arxiv.org/abs/2402.08714)"),
    "ddpo": ("DDPO", "Denoising Diffusion Policy Optimization, [Black et al., 2023](https://arxiv.org/abs/2305.13301)"),
}
# settings shown in the card, when the run's config has them
KEY_SETTINGS = [
    "num_epochs", "sample_num_steps", "eval_num_steps", "sample_guidance_scale", "sample_eta", "sample_noise_level",
    "sample_num_prompts_per_epoch", "sample_images_per_prompt", "sample_sde_window_size", "train_learning_rate",
    "train_num_inner_epochs", "train_timestep_fraction", "train_beta", "train_clip_eps", "train_prompts_per_step",
    "advantage_mode", "train_batch_size", "train_clip_range", "train_kl_coef", "lora_rank", "lora_alpha",
    "ema_decay", "mixed_precision", "seed",
]


def base_model_id(config) -> Optional[str]:
    """The card's `base_model`: `hub_base_model`; a bundled model's name; the hub id of a model given as a hub id or
    as a hub cache snapshot (`.../models--owner--name/snapshots/<rev>`); `None` for another local directory (a
    filesystem path is not valid Hub metadata)."""
    from .utils.hub_utils import BUNDLED_MODELS

    if config.hub_base_model:
        return config.hub_base_model
    model = str(config.model)
    if model in BUNDLED_MODELS:
        return model
    if os.path.isdir(model):
        parts = os.path.abspath(model).split(os.sep)
        if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
            return parts[-3][len("models--"):].replace("--", "/")
        return None
    return model


def base_license(config) -> str:
    """`hub_license`; else the base model's own (`license` in the front matter of its directory's README.md, as a
    hub snapshot has it; the bundled models are diffalign's, Apache-2.0); else `other`."""
    from .utils.hub_utils import BUNDLED_MODELS

    if config.hub_license:
        return config.hub_license
    if config.model in BUNDLED_MODELS:
        return "apache-2.0"
    readme = os.path.join(str(config.model), CARD)
    if os.path.isfile(readme):
        metadata = _front_matter(readme)
        if isinstance(metadata.get("license"), str):
            return metadata["license"]
    return "other"


def _front_matter(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.startswith("---"):
        return {}
    try:
        data = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _results_table(final_eval: Dict) -> List[str]:
    rows = [name for name in ("base", "trained") if isinstance(final_eval.get(name), dict)]
    if not rows:
        return []
    columns = [("reward", "reward_mean"), ("eval reward", "eval_mean"), ("KL to base", "kl_to_base")]
    columns = [(title, key) for title, key in columns if any(key in final_eval[r] for r in rows)]
    lines = ["| model | " + " | ".join(title for title, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name in rows:
        result = final_eval[name]
        cells = []
        for _, key in columns:
            cell = _number(result.get(key))
            if key == "reward_mean" and result.get("reward_std") is not None:
                cell += f" ± {_number(result['reward_std'])}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def kernel_settings(kernel_class) -> set:
    """The run settings a transition kernel reads: `sample_<argument>` of its constructor, as
    `TrainConfig.kernel_kwargs` names them (DDIM's `sample_eta`, the flow SDE's `sample_noise_level`)."""
    return {f"sample_{name}" for name in inspect.signature(kernel_class.__init__).parameters if name != "self"}


def _call_argument(name: str, value) -> str:
    return f"{name}={_py(value) if isinstance(value, str) else format(value, 'g')}"


def usage_snippets(config, family, prompt: str, weights: str, resolution: int) -> List[str]:
    """Runnable Python snippets: the family's diffusers pipeline with the trained weights, and (for a family with an
    RLG route, `ModelFamily.rlg_route`) RLG with `rlg_scale`, sampling as in training (steps, guidance as the family's
    pipeline takes it, image size): diffalign's RLG pipeline, or the family's modular pipeline with the RLG guider
    (`ModelFamily.rlg_pipeline`, a LoRA only). `family` is the run's `ModelFamily` (class or instance); `weights` is
    the Hub repo or the local `final/` directory.

    An editing family (`max_condition_images`: FLUX.1 Kontext) edits an image, resized to the trained size as the
    rollouts resize it, with the output at that size (`max_area`, no resize to a preferred resolution:
    `FluxKontextFamily.pipeline_call_kwargs`); Qwen-Image-Edit (`requires_condition_image`) gets the image as loaded,
    which its pipeline resizes as the rollouts do; the image file is the one of `prompt` (a `ConditionedPrompt`), by
    name (the card is shared), else `input.png`."""
    from .prompts import condition_images_of, condition_videos_of
    from .utils.hub_utils import BUNDLED_MODELS
    from .utils.peft_utils import LOW_NOISE_LORA_WEIGHT_NAME

    pipeline_class, denoiser_name, denoiser_class = family.pipeline_class, family.denoiser_name, family.denoiser_class
    rlg_class = family.rlg_pipeline_class
    ours = []  # diffalign imports, after the third-party ones
    if config.model in BUNDLED_MODELS:  # the bundled models ship inside the package
        ours.append("from diffalign.utils.hub_utils import resolve_model_path")
        base = f"resolve_model_path({_py(config.model)})"
    else:
        base = _py(base_model_id(config) or _local(config.model, config))
    call = [f"num_inference_steps={config.evaluation_num_steps}"]
    # CFG, or an embedded guidance plus the optional true CFG, as the family's pipeline takes them
    guidance = family.pipeline_guidance_kwargs(config.sample_guidance_scale,
                                               getattr(config, "sample_embedded_guidance", None))
    call += [_call_argument(name, value) for name, value in guidance.items()]
    call.append(f"height={resolution}, width={resolution}")  # the trained size, which may not be the pipeline's
    edit, edit_import = [], []
    if family.max_condition_images:  # the image to edit, at the trained size, as the rollouts sample
        source = os.path.basename(condition_images_of(prompt)[0]) if condition_images_of(prompt) else "input.png"
        edit_import = ["from diffusers.utils import load_image"]
        if family.requires_condition_image or family.output_kind == "video":  # Qwen-Image-Edit, Wan image-to-video:
            edit = [f"condition = load_image({_py(source)})"]  # the pipeline resizes the image itself, as rollouts do
        else:  # FLUX.1 Kontext: resized to the trained size, no resize to a preferred resolution
            edit = [f"condition = pipe.image_processor.resize(load_image({_py(source)}), {resolution}, {resolution})"]
            call.append(f"max_area={resolution * resolution}, _auto_resize=False")
        call.insert(0, "image=condition")
    if family.max_condition_videos:  # video-to-video: the video's first frames, the strength and its longer schedule
        from .families.wan_v2v import schedule_length

        source = os.path.basename(condition_videos_of(prompt)[0]) if condition_videos_of(prompt) else "input.mp4"
        strength = getattr(config, "sample_strength", None) or family.strength
        frames = getattr(config, "num_frames", None) or family.num_frames
        edit_import = ["from diffusers.utils import load_video"]
        edit = [f"condition = load_video({_py(source)})[:{frames}]  # the frames the rollouts start from"]
        call[0] = f"num_inference_steps={schedule_length(config.evaluation_num_steps, strength)}"
        call[:0] = ["video=condition"]
        call.append(f"strength={format(strength, 'g')}")
    elif family.output_kind == "video" and getattr(config, "num_frames", None):
        call.append(f"num_frames={config.num_frames}")
    call = ", ".join(call)
    prompt = str(prompt)
    # what the pipeline returns: an image, or a video's frames (Wan), written with diffusers' export_to_video
    output, result = ("video", ".frames[0]") if family.output_kind == "video" else ("image", ".images[0]")
    save = ['export_to_video(video, "video.mp4", fps=16)'] if output == "video" else []
    if save:
        loader = "load_video" if family.max_condition_videos else "load_image"
        edit_import = ([f"from diffusers.utils import export_to_video, {loader}"] if edit_import
                       else ["from diffusers.utils import export_to_video"])

    rlg_call = edit + ["# rlg_scale: 0 = the base model, 1 = this fine-tune, > 1 = stronger alignment",
                       f"{output} = pipe(prompt={_py(prompt)}, {call}, rlg_scale=1.5){result}"] + save
    rlg_import = f"from diffalign.pipelines import {rlg_class}"
    # Wan 2.2 A14B's experts (`train_experts`): the high-noise LoRA into `transformer`, the low-noise one into
    # `transformer_2`; the RLG route guides each expert that carries one
    experts = getattr(config, "train_experts", "high_noise")
    load_lora = [f"pipe.load_lora_weights({_py(weights)})"] if experts != "low_noise" else []
    if experts != "high_noise":
        load_lora.append(f"pipe.load_lora_weights({_py(weights)}, weight_name={_py(LOW_NOISE_LORA_WEIGHT_NAME)}, "
                         f"load_into_transformer_2=True)")
    if config.use_lora:
        plain = _snippet([f"from diffusers import {pipeline_class}"] + edit_import, ours, [
            f"pipe = {pipeline_class}.from_pretrained({base})",
            *load_lora,
            *edit,
            f"{output} = pipe(prompt={_py(prompt)}, {call}){result}",
            *save,
        ])
        if rlg_class:  # every trained expert's LoRA: the Wan RLG pipelines guide each expert that carries one
            rlg = _snippet(edit_import, ours + [rlg_import], [
                f"pipe = {rlg_class}.from_pretrained({base})",
                *load_lora,
            ] + rlg_call)
        elif family.rlg_route():  # the RLG guider in the family's modular pipeline
            family_name = (family if isinstance(family, type) else type(family)).__name__
            family_import = f"from diffalign.families import {family_name}"
            # the modular route returns a video's frames as `.images` too (`ModularRLGPipeline`); a model whose own
            # route is an RLG pipeline (Wan 2.2 TI2V-5B text-to-video: `WanRLGPipeline`) returns them as `.frames`
            own_pipeline = not isinstance(family, type) and family.rlg_route_for(family.pipe) == "pipeline"
            guider_call = [line.replace(f"{output} = pipe(", f"{output} = rlg(") for line in rlg_call]
            if not own_pipeline:
                guider_call = [line.replace(".frames[0]", ".images[0]") for line in guider_call]
            route = "diffalign's RLG pipeline" if own_pipeline else "the RLG guider in the modular pipeline"
            rlg = _snippet([f"from diffusers import {pipeline_class}"] + edit_import, ours + [family_import], [
                f"pipe = {pipeline_class}.from_pretrained({base})",
                *load_lora[:-1], load_lora[-1] + "  # adapter on = this fine-tune, off = the base model",
                f"rlg = {family_name}.rlg_pipeline(pipe)  # {route}, same weights",
            ] + guider_call)
        else:
            rlg = None
    else:  # the guider route takes a LoRA only: a full fine-tune has an RLG snippet where the family has a pipeline
        trained = {"high_noise": [denoiser_name], "low_noise": ["transformer_2"],
                   "both": [denoiser_name, "transformer_2"]}[experts]
        loads = [f"{name} = {denoiser_class}.from_pretrained({_py(weights)}, subfolder={_py(name)})"
                 for name in trained]
        plain = _snippet([f"from diffusers import {denoiser_class}, {pipeline_class}"] + edit_import, ours, [
            *loads,
            f"pipe = {pipeline_class}.from_pretrained({base}, {', '.join(f'{name}={name}' for name in trained)})",
            *edit,
            f"{output} = pipe(prompt={_py(prompt)}, {call}){result}",
            *save,
        ])
        # a family whose LoRA route is the modular guider may have an RLG pipeline for a full fine-tune (Wan:
        # `WanRLGPipeline`), the one `diffalign generate --aligned-denoiser` runs
        rlg_class = rlg_class or family.full_fine_tune_rlg_pipeline_class
        rlg = _snippet([f"from diffusers import {denoiser_class}"] + edit_import, ours + [
            f"from diffalign.pipelines import {rlg_class}"], [
            *loads,
            f"pipe = {rlg_class}.from_pretrained({base}, {', '.join(f'aligned_{name}={name}' for name in trained)})",
        ] + rlg_call) if rlg_class else None
    return [plain, rlg] if rlg else [plain]


def _snippet(third_party: List[str], ours: List[str], body: List[str]) -> str:
    """Python code: third-party imports, diffalign's imports, then the body, as blocks separated by a blank line."""
    return "\n\n".join("\n".join(block) for block in (third_party, sorted(ours), body) if block)


def _py(text: str) -> str:
    """A Python string literal (double-quoted, as the Hub's cards and diffusers' examples write them)."""
    return json.dumps(text, ensure_ascii=False)


def model_card(config, *, family, reward_label: str, prompt: str, resolution: int, final_eval: Optional[Dict] = None,
               history: Optional[List[Dict]] = None, has_grid: Union[bool, str] = False):
    """The `huggingface_hub.ModelCard` of a run (see the module docstring); `family` is the run's `ModelFamily`
    (class or instance): its pipeline, denoiser, Hub tags, guidance kind, kernel and RLG pipeline. `has_grid`: the
    before/after grid beside the card, True for `grid_before_after.png` or its file name (a video run's `.mp4`)."""
    pipeline_class, denoiser_name = family.pipeline_class, family.denoiser_name
    from huggingface_hub import ModelCard, ModelCardData

    algorithm = config.algorithm
    short, reference = ALGORITHMS.get(algorithm, (algorithm.upper(), algorithm))
    tags = ["diffalign", algorithm]
    if algorithm == "ddpo" and getattr(config, "advantage_mode", None) == "group":
        tags.append("grpo")
    tags += ["lora"] if config.use_lora else []
    task = "image-to-image" if family.max_condition_images else "text-to-image"  # an editing model: the Hub's task
    if family.max_condition_images and family.output_kind == "video":
        task = "image-to-video"
    if family.max_condition_videos:
        task = "video-to-video"
    tags += [*family.hub_tags, task, "diffusers", "reward-fine-tuning"]
    settings = shareable_settings(config)  # secrets redacted, paths relative to the run: the card is shared
    base = base_model_id(config)
    data = ModelCardData(base_model=base, library_name="diffusers", license=base_license(config), tags=tags,
                         pipeline_tag=task)

    weights = config.hub_model_id or "final"  # the card is shared: no local path, the run directory's `final/`
    title = config.hub_model_id or os.path.basename(os.path.normpath(os.path.abspath(config.output_dir)))
    kind = f"A LoRA (rank {config.lora_rank})" if config.use_lora else f"A fully fine-tuned `{denoiser_name}`"
    if base and base not in _bundled():
        base_text = f"[`{base}`](https://huggingface.co/{base})"
    elif base:
        base_text = f"diffalign's bundled `{base}` model"
    else:
        base_text = f"the local model `{_local(config.model, config)}`"
    lines = [f"# {title}", "",
             (f"{kind} of {base_text} ({pipeline_class}), fine-tuned with **{short}** ({reference}) by diffalign "
              f"to raise the reward **{reward_label}**."), "",
             "## Training", "",
             f"- reward: `{_describe(settings['reward'])}`" + (f" with `{json.dumps(settings['reward_kwargs'])}`"
                                                          if config.reward_kwargs else ""),
             ]
    if config.eval_reward:
        lines.append(f"- held-out scorer (logged, not trained on): `{_describe(settings['eval_reward'])}`")
    lines.append(f"- prompts: {_prompt_source(config)}")
    if history:
        first, last = history[0].get("reward_mean"), history[-1].get("reward_mean")
        lines.append(f"- training reward (epoch mean): {_number(first)} at epoch {history[0].get('epoch')} -> "
                     f"{_number(last)} at epoch {history[-1].get('epoch')}")
    lines += ["", "| setting | value |", "|---|---|"]
    irrelevant = {"sample_eta", "sample_noise_level"} - kernel_settings(family.kernel_class)  # another kernel's
    if not config.use_lora:
        irrelevant |= {"lora_rank", "lora_alpha"}
    if not settings.get("ema_decay"):
        irrelevant.add("ema_decay")
    shown = [k for k in KEY_SETTINGS if settings.get(k) is not None and k not in irrelevant]
    lines += [f"| `{key}` | {_number(settings[key])} |" for key in shown]
    lines += ["", f"All settings: [`{CONFIG_COPY}`]({CONFIG_COPY}).", ""]
    table = _results_table(final_eval or {})
    if table:
        lines += ["## Results", "",
                  (f"Base and fine-tuned model on the same {final_eval.get('num_images', '')} fixed-seed samples "
                   "(`final_eval.json`):"), ""] + table + [""]
    if has_grid:
        grid = has_grid if isinstance(has_grid, str) else GRID  # a video run's grid is grid_before_after.mp4 / .gif
        shown = (f'<video src="{grid}" controls autoplay loop muted></video>' if grid.endswith(".mp4")
                 else f"![before and after training]({grid})")
        lines += ["## Samples", "", shown, "",
                  "Fixed-seed samples of the base model (top) and the fine-tuned one (bottom).", ""]
    plain, *rlg = usage_snippets(config, family, prompt, weights, resolution)
    lines += ["## Usage", ""]
    if not config.hub_model_id:
        lines += ["Local paths are relative to the run directory (the one holding `final/`).", ""]
    lines += ["```python", plain, "```", ""]
    if rlg:
        lines += ["With reinforcement-learning guidance (RLG), which scales the fine-tune's effect at inference:", "",
                  "```python", rlg[0], "```", ""]
    from .utils.redaction import scrub

    return ModelCard(scrub(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))  # any remembered secret too


def shareable_settings(config) -> Dict:
    """The run's settings as they may be shared: secrets redacted and absolute paths relative to the run directory
    (`diffalign.utils.redaction.shareable`), so neither a token nor the user's home directory reaches the Hub."""
    from .utils.redaction import shareable

    return shareable(config.to_dict(), config.output_dir)


def _local(path, config) -> str:
    """A local model directory as the card names it: relative to the run directory."""
    from .utils.redaction import shareable_path

    return shareable_path(str(path), config.output_dir)


def _bundled():
    from .utils.hub_utils import BUNDLED_MODELS

    return BUNDLED_MODELS


def _describe(reward) -> str:
    return json.dumps(reward) if isinstance(reward, dict) else str(reward)


def _prompt_source(config) -> str:
    if config.prompt_fn:
        return f"`{config.prompt_fn}`"
    if getattr(config, "prompt_dataset", None):
        return f"the dataset `{os.path.basename(os.path.normpath(config.prompt_dataset))}`"
    if config.prompt_file:
        return f"the file `{os.path.basename(config.prompt_file)}`"
    if config.prompts:
        shown = ", ".join(f"\"{p}\"" for p in config.prompts[:5])
        return f"{len(config.prompts)} prompts ({shown}{', ...' if len(config.prompts) > 5 else ''})"
    return "the default prompts"


def write_model_card(config, family, reward_label: Optional[str], grid_prompt: str, resolution: int,
                     history: List[Dict]) -> str:
    """Writes `final/README.md` for a trained run (main process), with a copy of the before/after grid and of the
    run's config next to it; returns the card's path. `family`: the run's `ModelFamily`; `grid_prompt`: the prompt the
    card's example uses; `history`: every epoch's metrics."""
    final = os.path.join(config.output_dir, "final")
    from .plotting import find_video

    grid = GRID if os.path.isfile(os.path.join(config.output_dir, GRID)) else find_video(
        os.path.join(config.output_dir, GRID))
    has_grid = os.path.basename(grid) if grid else False
    if has_grid:
        shutil.copyfile(os.path.join(config.output_dir, has_grid), os.path.join(final, has_grid))
    with open(os.path.join(final, CONFIG_COPY), "w") as f:
        json.dump({"algorithm": config.algorithm, **shareable_settings(config)}, f, indent=1, default=str)
    final_eval = None
    path = os.path.join(config.output_dir, "final_eval.json")
    if os.path.isfile(path):
        with open(path) as f:
            final_eval = json.load(f)
    card = model_card(
        config, family=family, reward_label=reward_label or _describe(config.reward), prompt=grid_prompt,
        resolution=resolution, final_eval=final_eval, history=history, has_grid=has_grid,
    )
    card.save(os.path.join(final, CARD))
    return os.path.join(final, CARD)


def warn_if_offline(config):
    """A warning at the start of a run that will not be able to push (the push itself fails at the end, as one line,
    after every output is written)."""
    if not config.push_to_hub:
        return
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        logger.warning("push_to_hub: the Hub is offline (HF_HUB_OFFLINE); the run will train and save locally, "
                       "and the push at the end will fail")


def push_to_hub(config) -> str:
    """Uploads `final/` to the Hub repo `hub_model_id` (created if needed, `hub_private`); returns its URL. Any
    failure is a one-line `HubError` naming where the outputs are."""
    from huggingface_hub import HfApi

    final = os.path.join(config.output_dir, "final")
    try:
        api = HfApi()
        repo = api.create_repo(config.hub_model_id, private=config.hub_private, exist_ok=True, repo_type="model")
        message = f"diffalign {config.algorithm}: {os.path.basename(os.path.abspath(config.output_dir))}"
        api.upload_folder(repo_id=repo.repo_id, folder_path=final, repo_type="model", commit_message=message)
    except Exception as e:  # offline, no token, no rights, network or HTTP error: the run itself succeeded
        reason = first_line(e).rstrip(".")
        raise HubError(f"could not push {final} to the Hub ({config.hub_model_id}): {reason}; the run's outputs are "
                       f"in {config.output_dir}") from e
    url = str(repo)
    logger.info("pushed %s to %s", final, url)
    return url
