"""Shared pieces of the benchmarks: options context, timing, memory, tables, models."""

import copy
import dataclasses
import inspect
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple


# Stable Diffusion 1.5's architecture (random weights) for GPU checks without downloading the model.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5, center_input_sample=False,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
SD15_TEXT = dict(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77,
    hidden_act="quick_gelu", projection_dim=768,
)
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
    steps_offset=1,
)

# The bundled models and their presets per algorithm (data, not branches: an algorithm without a preset trains with
# its own defaults); the shared sampling settings come from the first one listed.
# The bundled models, whose presets give the benchmarks their settings: `<model>-<algorithm>` (`digits-nft`), except
# where a preset is named after the paper's name of the algorithm on that model (Flow-GRPO is `ddpo` on a flow model).
BUNDLED_MODELS = ("digits", "digits-flow")
_PRESET_ALIASES = {("digits-flow", "ddpo"): "digits-flow-grpo"}


def bundled_preset(model: str, algorithm: str) -> Optional[str]:
    """The shipped preset of `algorithm` on the bundled `model`, or None if there is none (a new algorithm needs only
    its preset file to be benchmarked with its settings)."""
    from diffalign.cli.parser import preset_path
    from diffalign.errors import ConfigError

    if model not in BUNDLED_MODELS:
        return None
    name = _PRESET_ALIASES.get((model, algorithm), f"{model}-{algorithm}")
    try:
        preset_path(name)
    except ConfigError:
        return None
    return name


TINY_PROMPTS = ["a photo of a cat", "a photo of a dog", "a red car", "a blue house"]
GENERATED_IMAGE = "generated-condition.png"  # the condition image written when --image is not given


class BenchError(ValueError):
    """A benchmark that cannot run with the given options (one line, exit code 2)."""


# -------------------------------------------------------------------------------------------------- helpers
def yaml_value(text: str):
    """A `--set KEY=VALUE` value, read as the CLI reads config values: a YAML scalar or flow (`3e-4`, `true`,
    `[a, b]`), else the text itself."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def median(values: List[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


class PeakMemory:
    """Peak memory of a stretch of code: `torch.cuda.max_memory_allocated` on CUDA; on a CPU the resident set's
    high-water mark (VmHWM, reset through /proc/self/clear_refs on Linux, so each stretch gets its own peak), else
    the process-lifetime `ru_maxrss`."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.can_reset = False
        if self.cuda:
            self.kind = "cuda_max_memory_allocated"
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.can_reset = self._vm("VmHWM") is not None
            except OSError:
                pass
            self.kind = "rss_high_water_mark" if self.can_reset else "ru_maxrss_process_lifetime"

    @staticmethod
    def _vm(key: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def reset(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.can_reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self) -> int:
        """Bytes."""
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        if self.can_reset:
            return self._vm("VmHWM")
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, kB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def current(self) -> int:
        import torch

        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return self._vm("VmRSS") or 0


def mib(value: Optional[int]) -> Optional[float]:
    return None if value is None else value / 2**20


def sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_interleaved(fns: Dict[str, Callable[[], None]], repeats: int, device, meter: PeakMemory,
                      warmup: int = 1) -> Dict[str, dict]:
    """Times each function `repeats` times, alternating the order every round; `{name: {times, median, min,
    peak_bytes}}` (peak over the timed calls)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    out = {name: {"times": [], "peak_bytes": 0} for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            meter.reset()
            start = time.perf_counter()
            fns[name]()
            sync(device)
            out[name]["times"].append(time.perf_counter() - start)
            out[name]["peak_bytes"] = max(out[name]["peak_bytes"], meter.peak() or 0)
    for entry in out.values():
        entry["median"] = median(entry["times"])
        entry["min"] = min(entry["times"])
    return out


def paired_ratio(a: dict, b: dict) -> Dict[str, Optional[float]]:
    """Ratios of medians and of minima, and the median of the per-round ratios."""
    return {
        "ratio": ratio(a["median"], b["median"]),
        "ratio_min": ratio(a["min"], b["min"]),
        "ratio_paired_median": median([x / y for x, y in zip(a["times"], b["times"]) if y]),
    }


def machine_info(ctx) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(ctx.device),
        "dtype": ctx.args.dtype,
        "memory_measure": PeakMemory(ctx.device).kind,
    }
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    if ctx.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(ctx.device)
    for name in ("diffusers", "transformers", "peft", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    return info


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


def format_table(result: dict) -> str:
    """The `figures` of a result as a table: one row per figure, `name | value | unit`."""
    rows = [(name, format_value(entry["value"]), entry.get("unit", "")) for name, entry in result["figures"].items()]
    header = ("figure", "value", "unit")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    out = [f"diffalign bench {result['benchmark']}  ({result['machine']['device']}, {result['machine']['dtype']})",
           line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


class Figures(dict):
    """Ordered `{name: {"value": v, "unit": u}}`: the rows of the table, also stored in the JSON."""

    def add(self, name: str, value, unit: str = ""):
        self[name] = {"value": value, "unit": unit}


# ------------------------------------------------------------------------------------------ condition images
def write_condition_image(path: str, side: int, seed: int) -> str:
    """A `side x side` RGB PNG of uniform noise drawn with `seed` (numpy's default generator) at `path`: the condition
    image of an editing or image-to-video model when the bench is given none. Its content does not change the work
    (the VAE and image encoders cost the same on any pixels); its size is the sampled size."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def pipeline_condition(family, prompt, height: int, width: int) -> Dict:
    """The pipeline's condition-image arguments that sample `prompt` as a rollout of it does (none for a text
    prompt): the family's `pipeline_condition_kwargs` (Qwen-Image-Edit, Wan image-to-video), else FLUX.1 Kontext's
    image resized to the sampled size (`pipeline_image`)."""
    from diffalign.prompts import condition_images_of

    paths = condition_images_of(prompt)
    if not paths:
        return {}
    return family.pipeline_condition_kwargs(prompt) or {"image": family.pipeline_image(paths[0], height, width)}


def prompt_batches(pipe, prompts: List[str]) -> List[List[str]]:
    """The prompt lists of the pipeline calls that sample `prompts` (as text): one call, or one call per prompt where
    the pipeline's text encoder sees the call's condition images (its `encode_prompt` takes `image`:
    Qwen-Image-Edit and -Edit-Plus, which would give every prompt of a call all of the call's images and refuse a
    batch) and the prompts carry images."""
    from diffalign.prompts import condition_images_of

    texts = [str(prompt) for prompt in prompts]
    encode = getattr(pipe, "encode_prompt", None)
    sees_images = encode is not None and "image" in inspect.signature(encode).parameters
    if sees_images and any(condition_images_of(prompt) for prompt in prompts):
        return [[text] for text in texts]
    return [texts]


# ---------------------------------------------------------------------------------------------------- context
class Context:
    """Options, device and models shared by the benchmarks."""

    def __init__(self, args):
        import torch

        self.args = args
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        threads = args.threads if args.threads is not None else (1 if device == "cpu" else 0)
        if threads:
            torch.set_num_threads(threads)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BenchError("--device cuda but CUDA is not available")
        self.device = torch.device(device)
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        if self.device.type == "cpu" and args.dtype != "fp32" and not args.force:
            raise BenchError(f"--dtype {args.dtype} on a CPU is slow or unsupported and says nothing about a GPU: "
                             "use --device cuda, or --force")
        if args.xformers:
            if self.device.type != "cuda":
                raise BenchError("--xformers needs --device cuda")
            try:
                import xformers  # noqa: F401
            except ImportError:
                raise BenchError("--xformers: xformers is not installed (pip install diffalign[xformers])") from None
        if args.tiny and args.sd15_random:
            raise BenchError("give only one of --tiny and --sd15-random")
        if args.sd15_random and self.device.type == "cpu" and not args.force:
            raise BenchError("--sd15-random on a CPU takes minutes per image (an SD1.5-sized UNet, 860M parameters): "
                             "run it with --device cuda, or pass --force")
        if args.repeats is not None and args.repeats < 1:
            raise BenchError("--repeats must be >= 1")
        if args.resolution and not args.tiny and not args.sd15_random:  # from the model's configs, before it loads
            from diffalign.families import check_model_resolution

            check_model_resolution(args.model, args.resolution)
        self.preset = self._digits_preset() if self.is_digits else {}
        self.repeats = args.repeats or (1 if args.bench_command == "learn" else 3)
        self._template = None
        self._workdir = None  # a temporary folder for the generated condition image and prompt file (`close`)
        self._condition_images = None
        self.settings = {}
        self.images = [os.path.abspath(path) for path in getattr(args, "image", None) or []]
        if self.images:  # before the model loads: the files, and the count against the model's family
            from diffalign.prompts import check_condition_image

            for path in self.images:
                check_condition_image(path, "--image")
            family = self._configured_family()
            if family is not None:
                self._check_image_count(family)

    def close(self):
        """Removes the temporary folder (generated condition image, prompt file), if any."""
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    # ---- the model
    @property
    def is_digits(self) -> bool:
        return not self.args.tiny and not self.args.sd15_random and self.args.model in BUNDLED_MODELS

    @property
    def model_name(self) -> str:
        if self.args.tiny:
            return "tiny"
        if self.args.sd15_random:
            return "sd15-random"
        return self.args.model

    def _digits_preset(self) -> dict:
        import yaml

        from diffalign.cli.parser import preset_path
        from diffalign.errors import ConfigError

        try:
            path = preset_path(bundled_preset(self.args.model, "ddpo"))  # the shared sampling settings
        except ConfigError:
            return {}
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        return data if isinstance(data, dict) else {}

    def template(self):
        """The benchmark's pipeline in fp32 on the CPU (or on the device for --sd15-random), loaded once."""
        if self._template is None:
            if self.args.tiny:
                from diffalign.testing import tiny_sd_pipeline

                self._template = tiny_sd_pipeline(self.args.seed)
            elif self.args.sd15_random:
                self._template = sd15_random_pipeline(self.device, self.dtype, self.args.seed)
            else:
                from diffalign.families import load_pipeline

                self._template = load_pipeline(self.args.model)
            self._template.set_progress_bar_config(disable=True)
        return self._template

    def pipeline(self, copy_: bool = True):
        """A pipeline on the device in `--dtype` (a fresh copy unless `copy_=False`)."""
        pipe = copy.deepcopy(self.template()) if copy_ else self.template()
        pipe.to(self.device, self.dtype)
        if self.args.xformers:
            pipe.enable_xformers_memory_efficient_attention()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _configured_family(self):
        """The family class of the model from its config files (no weights), or None for a hub id (checked once
        loaded)."""
        from diffalign.families import StableDiffusionFamily, family_class, pipeline_class_of
        from diffalign.utils.hub_utils import resolve_model_path

        if self.args.tiny or self.args.sd15_random:
            return StableDiffusionFamily
        path = resolve_model_path(self.args.model)
        return family_class(pipeline_class_of(path)) if os.path.isdir(path) else None

    def _check_image_count(self, family):
        count, takes = len(self.images), family.max_condition_images
        if count and not takes:
            raise BenchError(f"--image: {family.name} models take no condition image (text-to-image); leave --image "
                             "out")
        if count > takes:
            what = "one condition image" if takes == 1 else f"at most {takes} condition images"
            raise BenchError(f"--image: {family.name} models take {what}; got {count}")

    def family_class(self):
        """The family class of the benchmark's pipeline."""
        from diffalign.families import family_class

        return family_class(type(self.template()).__name__)

    def condition_images(self) -> Tuple[str, ...]:
        """The condition images every prompt of the benchmark carries, for a family that takes them (an editing or
        image-to-video model: `max_condition_images`; none for text-to-image): the `--image` paths in order, else
        one generated image (`write_condition_image`: noise of the sampled size, `--seed`), written once to a
        temporary folder. Recorded in the result's settings."""
        if self._condition_images is None:
            family = self.family_class()
            self._check_image_count(family)
            images = tuple(self.images)
            if family.max_condition_images and not images:
                side = self.resolution(self.template())
                path = os.path.join(self.workdir(), GENERATED_IMAGE)
                images = (write_condition_image(path, side, self.args.seed),)
                self.settings["condition_images"] = [f"generated: {side}x{side} RGB noise, seed {self.args.seed}"]
            elif images:
                self.settings["condition_images"] = list(images)
            self._condition_images = images
        return self._condition_images

    def workdir(self) -> str:
        if self._workdir is None:
            self._workdir = tempfile.mkdtemp(prefix="diffalign-bench-")
        return self._workdir

    # ---- shapes
    def resolution(self, pipe) -> int:
        if self.args.resolution:
            from diffalign.families import family_for_pipeline

            family_for_pipeline(pipe).check_resolution(self.args.resolution)
            return self.args.resolution
        from diffalign.families import family_for_pipeline

        return self.preset.get("sample_resolution") or family_for_pipeline(pipe).default_resolution()

    @property
    def steps(self) -> int:
        if self.args.steps:
            return self.args.steps
        if self.args.tiny:
            return 10
        if self.args.sd15_random:
            return 50
        return int(self.preset.get("sample_num_steps", 20))

    @property
    def batch_size(self) -> int:
        return self.args.batch_size or (4 if self.args.tiny else 8)

    @property
    def guidance_scale(self) -> float:
        if self.args.guidance_scale is not None:
            return self.args.guidance_scale
        # the preset's scale only if it is a CFG scale: the CFG configurations must differ from the no-CFG ones
        preset = float(self.preset.get("sample_guidance_scale", 5.0))
        return preset if preset != 1.0 else 5.0

    def prompts(self, n: int) -> List[str]:
        """`n` prompts (the digit prompts, else `TINY_PROMPTS`, cycled), each with the benchmark's condition images
        (`condition_images`) for a family that takes them (`ConditionedPrompt`s)."""
        if self.is_digits:
            from diffalign.prompts import BUILTIN_PROMPTS

            source = BUILTIN_PROMPTS["digits"]()
        else:
            source = TINY_PROMPTS
        prompts = [source[i % len(source)] for i in range(n)]
        images = () if self.is_digits else self.condition_images()
        if images:
            from diffalign.prompts import ConditionedPrompt

            prompts = [ConditionedPrompt(prompt, images) for prompt in prompts]
        return prompts

    def prompt_file(self, prompts: List[str]) -> str:
        """A JSONL prompt file of `prompts` with the benchmark's condition images (`image`, or `images` for several:
        the prompt files' convention), in the temporary folder: how the trainers of `train` and `learn` get them."""
        images = self.condition_images()
        path = os.path.join(self.workdir(), "prompts.jsonl")
        with open(path, "w") as f:
            for prompt in prompts:
                row = {"prompt": prompt, **({"image": images[0]} if len(images) == 1 else {"images": list(images)})}
                f.write(json.dumps(row) + "\n")
        return path

    def command_line(self) -> str:
        if "bench" in sys.argv[1:]:
            return "diffalign " + " ".join(sys.argv[sys.argv.index("bench", 1):])
        if sys.argv and os.path.basename(sys.argv[0]) == f"{self.args.bench_command}.py":  # a script (examples/)
            return " ".join(["python", *sys.argv])
        return f"diffalign bench {self.args.bench_command} (in-process)"

    # ---- trainers
    def base_settings(self) -> dict:
        """Config values shared by every trainer of `train`/`learn`: the preset's sampling settings (digits), the
        shape options, then `--set` overrides."""

        values = {key: value for key, value in self.preset.items()
                  if key.startswith("sample_") or key in ("prompts", "prompt_fn", "prompt_file")}
        if not self.is_digits:
            if self.condition_images():  # an editing / image-to-video model: the prompts with their images
                values.update(prompt_file=self.prompt_file(TINY_PROMPTS[:2]))
            else:
                values.update(prompts=TINY_PROMPTS[:2])
        values.update(
            sample_num_steps=self.steps,
            sample_guidance_scale=self.guidance_scale,
            sample_batch_size=self.args.batch_size or values.get("sample_batch_size", self.batch_size),
            sample_num_prompts_per_epoch=self.args.prompts_per_epoch or values.get("sample_num_prompts_per_epoch", 2),
            sample_images_per_prompt=self.args.images_per_prompt or values.get("sample_images_per_prompt", 4),
            mixed_precision={"fp32": "no"}.get(self.args.dtype, self.args.dtype),
            enable_xformers=self.args.xformers,
            seed=self.args.seed,
        )
        if self.args.resolution:
            values["sample_resolution"] = self.args.resolution
        for item in self.args.overrides:
            key, sep, text = item.partition("=")
            if not sep:
                raise BenchError(f"--set {item}: expected KEY=VALUE")
            values[key.strip().replace("-", "_")] = yaml_value(text)
        return values

    def algorithm_preset(self, algorithm: str) -> dict:
        """Training settings of the bundled model's preset of `algorithm` (train_*/advantage/lora keys), when it
        exists."""
        if not self.is_digits:
            return {}
        import yaml

        from diffalign.cli.parser import preset_path
        from diffalign.errors import ConfigError

        preset = bundled_preset(self.args.model, algorithm)
        if preset is None:  # an algorithm without a preset for this model: its own defaults
            return {}
        try:
            path = preset_path(preset)
        except ConfigError:
            return {}
        with open(path) as f:
            data = yaml.safe_load(f) or {}

        from diffalign.trainers import CONFIG_CLASSES

        known = {f.name for f in dataclasses.fields(CONFIG_CLASSES[algorithm])}
        skip = ("sample_", "num_epochs", "output_dir", "model", "reward", "eval_", "prompt", "grid_", "checkpoint",
                "log_", "resume")
        return {k: v for k, v in data.items() if k in known and not k.startswith(skip)}

    def make_trainer(self, algorithm: str, overrides: dict, output_dir: str, reward_fn=None, reward: Optional[str] = None,
                     seed: Optional[int] = None):
        """A trainer on a fresh copy of the model; `overrides` win over `base_settings` and the algorithm preset."""
        from accelerate import Accelerator

        from diffalign.cli.parser import load_config
        from diffalign.trainers import CONFIG_CLASSES

        values = {**self.algorithm_preset(algorithm), **self.base_settings(), **overrides}
        values.update(model=self.model_name, output_dir=output_dir, num_epochs=10**6, checkpoint_every=10**6)
        if seed is not None:
            values["seed"] = seed
        if reward is not None:
            values["reward"] = reward
        # keep the batch arithmetic valid when the shape options shrink the preset's epoch (whichever of these
        # fields the algorithm's config has)
        fields = {f.name: f.default for f in dataclasses.fields(CONFIG_CLASSES[algorithm])}
        samples = values["sample_num_prompts_per_epoch"] * values["sample_images_per_prompt"]
        if "train_batch_size" in fields:
            size = values.get("train_batch_size", fields["train_batch_size"])
            if isinstance(size, int) and size > 0 and samples % size:
                values["train_batch_size"] = math.gcd(samples, size)
        if "train_prompts_per_step" in fields and values.get("train_prompts_per_step"):
            values["train_prompts_per_step"] = math.gcd(values["sample_num_prompts_per_epoch"],
                                                        values["train_prompts_per_step"])
        config = load_config(algorithm, None, CONFIG_CLASSES[algorithm].fit_to_shapes(values))
        pipe = copy.deepcopy(self.template())
        accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=self.device.type == "cpu")
        if self.device.type == "cuda" and accelerator.device.type != "cuda":
            raise BenchError("accelerate did not select the CUDA device")
        from diffalign.trainers import trainer_class

        cls = trainer_class(algorithm)
        return cls(config, pipeline=pipe, reward_fn=reward_fn, accelerator=accelerator)


def sd15_random_pipeline(device, dtype, seed: int = 0):
    """A `StableDiffusionPipeline` with SD1.5's architecture and random weights, built directly on `device`."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffalign.tokenization import BOS_TOKEN_ID, EOS_TOKEN_ID, VOCAB_SIZE, offline_clip_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            **SD15_TEXT, vocab_size=VOCAB_SIZE, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
            pad_token_id=EOS_TOKEN_ID,
        ))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=offline_clip_tokenizer(77), unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(device, dtype)


