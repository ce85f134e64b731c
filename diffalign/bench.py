"""`diffalign bench`: speed and memory of rollouts, training epochs, learning, and RLG sampling.

Every figure is a ratio against a floor or a baseline measured **in the same run**, with the repeats interleaved
(alternating order) and the median taken, so that load from other processes shifts both sides alike.

* `rollout`: `diffalign.rollout.sample_trajectories` (trajectories with log-probs) against
  `StableDiffusionPipeline.__call__` with the same shapes (steps, CFG, eta=1, `output_type="pt"`).
* `train`: one PRDP and one DDPO epoch (`trainer.step(epoch)`, after a warm-up epoch) against the UNet forward and
  backward passes that epoch contains, replayed alone on random tensors of the same shapes; plus where the rest of
  the epoch goes (an instrumented extra epoch).
* `learn`: wall time to reach `--target` reward per trainer configuration (`LEARN_CONFIGS`, plain dicts of config
  overrides) against a DDPO baseline configured like the reference code.
* `rlg`: `StableDiffusionRLGPipeline` (single-pass and two-pass LoRA paths, step windows) against plain CFG sampling
  with `StableDiffusionPipeline` on the same (LoRA) model.

Each writes a JSON file (`--output`, default `bench_<sub>.json`) and prints a table. See docs/bench.md.
"""

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

SUBCOMMANDS = ("rollout", "train", "learn", "rlg")

# --------------------------------------------------------------------------------------------- configurations
# `learn`: each configuration is `(algorithm, overrides)`. The overrides go on top of the shared settings (the
# digits preset's sampling settings, or small ones; see `base_settings`), so every configuration samples the same
# number of images per epoch with the same sampler, except where a configuration reuses samples and draws fewer
# fresh ones. `{K}` in a name is `--prdp-inner-epochs`; the value `{half}` is half the shared value (at least 1).
BASELINE = "ddpo_baseline"
LEARN_CONFIGS: Dict[str, tuple] = {
    # DDPO as in the reference code (kvablack/ddpo-pytorch): every timestep trained, CFG recomputed in training
    # (the trainer always does this when sample_guidance_scale != 1), one inner epoch, no KL bookkeeping at sampling.
    BASELINE: ("ddpo", {"train_timestep_fraction": 1.0, "train_num_inner_epochs": 1, "sample_compute_kl": False}),
    "ddpo_half_steps_k2": (
        "ddpo", {"train_timestep_fraction": 0.5, "train_num_inner_epochs": 2, "sample_compute_kl": False}
    ),
    "ddpo_fifth_steps_k2": (
        "ddpo", {"train_timestep_fraction": 0.2, "train_num_inner_epochs": 2, "sample_compute_kl": False}
    ),
    "ddpo_tenth_steps_k2": (
        "ddpo", {"train_timestep_fraction": 0.1, "train_num_inner_epochs": 2, "sample_compute_kl": False}
    ),
    "ddpo_fifth_steps_k4": (
        "ddpo", {"train_timestep_fraction": 0.2, "train_num_inner_epochs": 4, "sample_compute_kl": False}
    ),
    # the cheapest configuration that learns at the baseline's pace, plus prompts of moderate difficulty first
    "ddpo_fifth_steps_k2_moderate": (
        "ddpo", {"train_timestep_fraction": 0.2, "train_num_inner_epochs": 2, "sample_compute_kl": False,
                 "sample_prompt_selection": "moderate"}
    ),
    # Reuse of recent rollouts: half the fresh images per epoch, each trained in two epochs (its own and the next),
    # so an epoch trains on as many samples as the baseline's at half the sampling cost.
    "ddpo_half_fresh_reuse": (
        "ddpo", {"train_timestep_fraction": 1.0, "train_num_inner_epochs": 1, "sample_compute_kl": False,
                 "sample_images_per_prompt": "{half}", "train_reuse_epochs": 1}
    ),
    "ddpo_fifth_steps_k2_reuse": (
        "ddpo", {"train_timestep_fraction": 0.2, "train_num_inner_epochs": 2, "sample_compute_kl": False,
                 "sample_images_per_prompt": "{half}", "train_reuse_epochs": 1}
    ),
    "prdp_k{K}": ("prdp", {"train_num_inner_epochs": "{K}"}),
    # PRDP's K updates per epoch on a third of the steps: about the baseline's training cost per epoch.
    "prdp_k{K}_third_steps": ("prdp", {"train_num_inner_epochs": "{K}", "train_timestep_fraction": 0.3}),
    # ... and on a fifth of the steps, with pi_ref computed for those steps only (no per-epoch KL log)
    "prdp_k{K}_fifth_steps": (
        "prdp", {"train_num_inner_epochs": "{K}", "train_timestep_fraction": 0.2, "sample_compute_kl": False}
    ),
    "ddpo_no_cfg": (
        "ddpo",
        {"train_timestep_fraction": 1.0, "train_num_inner_epochs": 1, "sample_compute_kl": False,
         "sample_guidance_scale": 1.0},
    ),
    "prdp_k{K}_no_cfg": ("prdp", {"train_num_inner_epochs": "{K}", "sample_guidance_scale": 1.0}),
}

# Settings of the `train` benchmark's trainers beyond the shared ones (the trainers' own defaults otherwise).
TRAIN_CONFIGS: Dict[str, tuple] = {
    "prdp": ("prdp", {}),
    "ddpo": ("ddpo", {}),
}

# `rlg`: (name, rlg_single_pass, rlg_start, rlg_stop)
RLG_CASES = [
    ("single_pass_0_1", True, 0.0, 1.0),
    ("two_pass_0_1", False, 0.0, 1.0),
    ("single_pass_0_0.5", True, 0.0, 0.5),
    ("single_pass_0.5_1", True, 0.5, 1.0),
    ("two_pass_0_0.5", False, 0.0, 0.5),
    ("two_pass_0.5_1", False, 0.5, 1.0),
]

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

DIGITS_PRESET = "digits-ddpo"
TINY_PROMPTS = ["a photo of a cat", "a photo of a dog", "a red car", "a blue house"]


class BenchError(ValueError):
    """A benchmark that cannot run with the given options (one line, exit code 2)."""


# ------------------------------------------------------------------------------------------------- arguments
def add_arguments(parser: argparse.ArgumentParser):
    """Adds `diffalign bench <sub>` and its options to the `bench` sub-parser of the CLI."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model and shapes")
    g.add_argument("--model", default="digits", help="bundled model name (digits) or a local diffusers directory")
    g.add_argument("--tiny", action="store_true", help="tiny random components (diffalign.testing), for smoke tests")
    g.add_argument("--sd15-random", action="store_true",
                   help="SD1.5-shaped UNet/VAE/CLIP text encoder with random weights (a GPU check; CPU needs --force)")
    g.add_argument("--batch-size", type=int, default=None, help="images per sampling batch (default 8, tiny 4)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: preset, else 20; tiny 10)")
    g.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    g.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: preset, else 5.0)")
    g.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 3; learn: seeds, 1)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="weights/mixed precision (fp16/bf16 only meaningful on CUDA)")
    g.add_argument("--xformers", action="store_true", help="xformers attention (CUDA with xformers installed only)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on a CPU: spinning intra-op threads on a shared machine slow "
                        "small models tenfold; 0 keeps torch's default)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--force", action="store_true", help="run SD1.5-sized models or fp16/bf16 on a CPU anyway")
    g.add_argument("--output", default=None, help="JSON file (default bench_<sub>.json)")
    t = common.add_argument_group("train and learn")
    t.add_argument("--prompts-per-epoch", type=int, default=None, help="prompts per epoch (default: preset, else 2)")
    t.add_argument("--images-per-prompt", type=int, default=None, help="images per prompt (default: preset, else 4)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every trainer (YAML value), e.g. --set train_micro_batch_size=8")

    sub = parser.add_subparsers(dest="bench_command", metavar="{rollout,train,learn,rlg}", required=True)
    sub.add_parser("rollout", parents=[common], help="trajectory sampling with log-probs vs plain pipeline sampling")
    train = sub.add_parser("train", parents=[common], help="epoch time of PRDP and DDPO vs their UNet passes alone")
    train.add_argument("--algorithms", default="prdp,ddpo", help="comma-separated: prdp, ddpo")
    learn = sub.add_parser("learn", parents=[common], help="time to reach a reward, per trainer configuration")
    learn.add_argument("--target", type=float, default=None, help="reward to reach (default 0.9 for digits)")
    learn.add_argument("--reward", default=None, help="reward name (default: digit_correctness, or "
                                                      "jpeg_compressibility for --tiny/other models)")
    learn.add_argument("--max-epochs", type=int, default=30, help="give up after this many epochs")
    learn.add_argument("--window", type=int, default=1,
                       help="the reward of an epoch is the mean reward_mean of the last WINDOW epochs")
    learn.add_argument("--eval-images", type=int, default=0,
                       help="judge the target on this many images of fixed prompts and seeds sampled after each epoch "
                            "(not timed); 0: on the epoch's own training samples")
    learn.add_argument("--prdp-inner-epochs", type=int, default=4, help="K of the PRDP configurations")
    learn.add_argument("--configs", default=None,
                       help=f"comma-separated subset of: {', '.join(LEARN_CONFIGS)} (the baseline always runs)")
    rlg = sub.add_parser("rlg", parents=[common], help="RLG sampling (single/two pass, windows) vs plain CFG")
    rlg.add_argument("--rlg-scale", type=float, default=1.5)
    rlg.add_argument("--lora-std", type=float, default=0.1, help="std of the random LoRA B weights")


def run(args) -> int:
    """Runs `args.bench_command`; writes the JSON and prints the table. Returns the exit code."""
    from diffalign.modeling import ModelError

    try:
        ctx = Context(args)
        fn = {"rollout": bench_rollout, "train": bench_train, "learn": bench_learn, "rlg": bench_rlg}[
            args.bench_command]
        result = fn(ctx)
    except (BenchError, ModelError) as e:
        print(f"diffalign: error: {e}", file=sys.stderr)
        return 2
    result = {
        "benchmark": args.bench_command,
        "command": ctx.command_line(),
        "machine": machine_info(ctx),
        "settings": ctx.settings,
        **result,
    }
    output = args.output or f"bench_{args.bench_command}.json"
    if os.path.dirname(output):
        os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(format_table(result))
    print(f"\nwritten {output}")
    return 0


# -------------------------------------------------------------------------------------------------- helpers
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
        self.preset = self._digits_preset() if self.is_digits else {}
        self.repeats = args.repeats or (1 if args.bench_command == "learn" else 3)
        self._template = None
        self.settings = {}

    # ---- the model
    @property
    def is_digits(self) -> bool:
        return not self.args.tiny and not self.args.sd15_random and self.args.model == "digits"

    @property
    def model_name(self) -> str:
        if self.args.tiny:
            return "tiny"
        if self.args.sd15_random:
            return "sd15-random"
        return self.args.model

    def _digits_preset(self) -> dict:
        import yaml

        from diffalign.config import ConfigError, preset_path

        try:
            path = preset_path(DIGITS_PRESET)
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
                from diffalign.modeling import load_pipeline

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

    # ---- shapes
    def resolution(self, pipe) -> int:
        if self.args.resolution:
            from diffalign.modeling import check_resolution

            check_resolution(pipe, self.args.resolution)
            return self.args.resolution
        return self.preset.get("sample_resolution") or pipe.unet.config.sample_size * pipe.vae_scale_factor

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
        if self.is_digits:
            from diffalign.prompts import BUILTIN_PROMPTS

            source = BUILTIN_PROMPTS["digits"]()
        else:
            source = TINY_PROMPTS
        return [source[i % len(source)] for i in range(n)]

    def command_line(self) -> str:
        if "bench" in sys.argv[1:]:
            return "diffalign " + " ".join(sys.argv[sys.argv.index("bench", 1):])
        return f"diffalign bench {self.args.bench_command} (in-process)"

    # ---- trainers
    def base_settings(self) -> dict:
        """Config values shared by every trainer of `train`/`learn`: the preset's sampling settings (digits), the
        shape options, then `--set` overrides."""
        from diffalign.config import _parse_cli_value

        values = {key: value for key, value in self.preset.items()
                  if key.startswith("sample_") or key in ("prompts", "prompt_fn", "prompt_file")}
        if not self.is_digits:
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
            values[key.strip().replace("-", "_")] = _parse_cli_value(text)
        return values

    def algorithm_preset(self, algorithm: str) -> dict:
        """Training settings of `digits-<algorithm>.yaml` (train_*/advantage/lora keys), when it exists."""
        if not self.is_digits:
            return {}
        import yaml

        from diffalign.config import ConfigError, preset_path

        try:
            path = preset_path(f"digits-{algorithm}")
        except ConfigError:
            return {}
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        import dataclasses

        from diffalign.config import CONFIG_CLASSES

        known = {f.name for f in dataclasses.fields(CONFIG_CLASSES[algorithm])}
        skip = ("sample_", "num_epochs", "output_dir", "model", "reward", "eval_", "prompt", "grid_", "checkpoint",
                "log_", "resume")
        return {k: v for k, v in data.items() if k in known and not k.startswith(skip)}

    def make_trainer(self, algorithm: str, overrides: dict, output_dir: str, reward_fn=None, reward: Optional[str] = None,
                     seed: Optional[int] = None):
        """A trainer on a fresh copy of the model; `overrides` win over `base_settings` and the algorithm preset."""
        from accelerate import Accelerator

        from diffalign.config import load_config
        from diffalign.trainers import DDPOTrainer, PRDPTrainer

        values = {**self.algorithm_preset(algorithm), **self.base_settings(), **overrides}
        values.update(model=self.model_name, output_dir=output_dir, num_epochs=10**6, checkpoint_every=10**6)
        if seed is not None:
            values["seed"] = seed
        if reward is not None:
            values["reward"] = reward
        # keep the batch arithmetic valid when the shape options shrink the preset's epoch
        if algorithm == "ddpo":
            local = values["sample_num_prompts_per_epoch"] * values["sample_images_per_prompt"]
            size = values.get("train_batch_size", 8)
            if local % size:
                values["train_batch_size"] = math.gcd(local, size)
        elif values.get("train_prompts_per_step"):
            values["train_prompts_per_step"] = math.gcd(values["sample_num_prompts_per_epoch"],
                                                        values["train_prompts_per_step"])
        config = load_config(algorithm, None, values)
        pipe = copy.deepcopy(self.template())
        accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=self.device.type == "cpu")
        if self.device.type == "cuda" and accelerator.device.type != "cuda":
            raise BenchError("accelerate did not select the CUDA device")
        cls = {"ddpo": DDPOTrainer, "prdp": PRDPTrainer}[algorithm]
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


# ---------------------------------------------------------------------------------------------------- rollout
def bench_rollout(ctx) -> dict:
    import torch

    from diffalign.rollout import sample_trajectories

    pipe = ctx.pipeline(copy_=False)
    steps, g, batch = ctx.steps, ctx.guidance_scale, ctx.batch_size
    res = ctx.resolution(pipe)
    prompts = ctx.prompts(batch)
    ctx.settings.update(model=ctx.model_name, batch_size=batch, steps=steps, guidance_scale=g, eta=1.0,
                        resolution=res, repeats=ctx.repeats)
    device = ctx.device

    def ours():
        generator = torch.Generator(device).manual_seed(ctx.args.seed)
        sample_trajectories(pipe, prompts, steps, g, eta=1.0, height=res, width=res, generator=generator)

    def plain():
        generator = torch.Generator(device).manual_seed(ctx.args.seed)
        pipe(prompts, num_inference_steps=steps, guidance_scale=g, eta=1.0, height=res, width=res,
             generator=generator, output_type="pt")

    meter = PeakMemory(device)
    timings = timed_interleaved({"ours": ours, "plain": plain}, ctx.repeats, device, meter)
    # where the difference goes: the same calls again, with the time inside UNet forwards and VAE decodes measured
    outside = {"ours": [], "plain": []}
    with _module_timer([pipe.unet, pipe.vae.decoder], device) as inside:
        for r in range(ctx.repeats):
            for name, fn in (("ours", ours), ("plain", plain))[:: 1 if r % 2 == 0 else -1]:
                inside.clear()
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                outside[name].append(time.perf_counter() - start - sum(inside.values()))
    figures = Figures()
    figures.add("rollout_images_per_s", batch / timings["ours"]["median"], "img/s")
    figures.add("plain_images_per_s", batch / timings["plain"]["median"], "img/s")
    r = paired_ratio(timings["ours"], timings["plain"])
    figures.add("rollout_time_ratio", r["ratio"], "ours/plain, medians (target <= 1.02)")
    figures.add("rollout_time_ratio_min", r["ratio_min"], "ours/plain, minima")
    figures.add("rollout_outside_unet_vae_s", median(outside["ours"]), "s per call outside UNet/VAE (median)")
    figures.add("plain_outside_unet_vae_s", median(outside["plain"]), "s per call outside UNet/VAE (median)")
    figures.add("rollout_peak_mem_mib", mib(timings["ours"]["peak_bytes"]), meter.kind)
    figures.add("plain_peak_mem_mib", mib(timings["plain"]["peak_bytes"]), meter.kind)
    return {"figures": figures, "timings": timings, "outside_unet_vae": outside}


@contextlib.contextmanager
def _module_timer(modules, device):
    """`{module index: seconds}` spent inside the forwards of `modules` (clear it between measurements)."""
    totals: Dict[int, float] = {}
    starts = {}

    def pre(index):
        def hook(module, args):
            sync(device)
            starts[index] = time.perf_counter()
        return hook

    def post(index):
        def hook(module, args, output):
            sync(device)
            totals[index] = totals.get(index, 0.0) + time.perf_counter() - starts.pop(index)
        return hook

    handles = []
    for i, m in enumerate(modules):
        handles += [m.register_forward_pre_hook(pre(i)), m.register_forward_hook(post(i))]
    try:
        yield totals
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------------------ train
class _UNetFloor:
    """Replays the UNet calls of one epoch of `trainer` on random tensors (same batch shapes, same module, same
    autocast and train/eval modes), with nothing else around them."""

    def __init__(self, trainer, num_samples: int, seed: int = 0):
        import torch

        self.trainer = trainer
        config = trainer.config
        self.config = config
        pipe = trainer.pipe
        self.unet = trainer.unet
        self.num_samples = num_samples
        self.cfg = config.sample_guidance_scale != 1.0
        generator = torch.Generator().manual_seed(seed)
        latent = trainer.resolution // pipe.vae_scale_factor
        self.latent_shape = (pipe.unet.config.in_channels, latent, latent)
        seq = trainer.prompt_encoder(["x"]).shape[1:]
        self.embed_shape = tuple(seq)
        pipe.scheduler.set_timesteps(config.sample_num_steps, device=trainer.device)
        self.timesteps = pipe.scheduler.timesteps
        self.generator = generator
        self.reference = trainer.needs_reference()
        self.plan = self._plan()

    def _inputs(self, rows: int):
        import torch

        dtype, device = self.trainer.weight_dtype, self.trainer.device
        n = 2 * rows if self.cfg else rows
        x = torch.randn((n, *self.latent_shape), generator=self.generator).to(device, dtype)
        e = torch.randn((n, *self.embed_shape), generator=self.generator).to(device, dtype)
        t = self.timesteps[torch.randint(len(self.timesteps), (n,), generator=self.generator)].to(device)
        return x, t, e

    def _plan(self) -> dict:
        """`sampling`: row counts of the no-grad sampling forwards (policy, then reference ones); `training`: a list
        of updates, each `(no_grad_rows, [[micro-batch rows of one backward], ...])`."""
        config, n = self.config, self.num_samples
        chunks = [min(config.sample_batch_size, n - s) for s in range(0, n, config.sample_batch_size)]
        sampling = [c for c in chunks for _ in range(config.sample_num_steps)]
        reference = list(sampling) if self.reference else []
        steps = config.num_train_steps
        micro = config.train_micro_batch_size
        split = lambda total: [min(micro, total - s) for s in range(0, total, micro)]
        updates = []
        lazy_reference = []
        if self.trainer.algorithm == "prdp" and not self.reference:
            # PRDP computes pi_ref in training for the union of the K inner epochs' planned steps (no grad)
            from diffalign.trainers.prdp import planned_steps

            plans = [self.trainer.train_step_plan(n, self.generator) for _ in range(config.train_num_inner_epochs)]
            lazy_reference = split(int(planned_steps(plans, config.sample_num_steps).sum()))
        if self.trainer.algorithm == "ddpo":
            for _ in range(config.train_num_inner_epochs):
                for s in range(0, n, config.train_batch_size):
                    rows = min(config.train_batch_size, n - s) * steps
                    updates.append((0, [[m] for m in split(rows)]))  # one backward per micro-batch
        else:
            groups = n // config.sample_images_per_prompt
            per_step = config.train_prompts_per_step or groups
            for _ in range(config.train_num_inner_epochs):
                for s in range(0, groups, per_step):
                    rows = min(per_step, groups - s) * config.sample_images_per_prompt * steps
                    if config.train_two_pass:
                        updates.append((rows, [[m] for m in split(rows)]))
                    else:
                        updates.append((0, [split(rows)]))  # one graph over all micro-batches, one backward
        return {"sampling": sampling, "reference": reference, "lazy_reference": lazy_reference, "training": updates}

    def _forward(self, rows: int):
        x, t, e = self._inputs(rows)
        return self.unet(x, t, encoder_hidden_states=e).sample

    def sampling(self):
        import torch

        from diffalign.rollout import reference_model

        trainer = self.trainer
        self.unet.eval()
        with torch.no_grad(), trainer.accelerator.autocast():
            for rows in self.plan["sampling"]:
                self._forward(rows)
            if self.plan["reference"]:
                module, context = reference_model(trainer.unet, trainer.ref_unet)
                for rows in self.plan["reference"]:
                    with context():
                        x, t, e = self._inputs(rows)
                        module(x, t, encoder_hidden_states=e)
        sync(trainer.device)

    def training(self):
        import torch

        from diffalign.rollout import reference_model

        trainer = self.trainer
        if self.plan["lazy_reference"]:
            self.unet.eval()
            module, context = reference_model(trainer.unet, trainer.ref_unet)
            with torch.no_grad(), trainer.accelerator.autocast(), context():
                for rows in self.plan["lazy_reference"]:
                    x, t, e = self._inputs(rows)
                    module(x, t, encoder_hidden_states=e)
        self.unet.train()
        for no_grad_rows, graphs in self.plan["training"]:
            if no_grad_rows:
                with torch.no_grad(), trainer.accelerator.autocast():
                    for start in range(0, no_grad_rows, self.config.train_micro_batch_size):
                        self._forward(min(self.config.train_micro_batch_size, no_grad_rows - start))
            for micro_batches in graphs:
                outputs = []
                for rows in micro_batches:
                    with trainer.accelerator.autocast():
                        outputs.append(self._forward(rows).float().square().mean())
                trainer.accelerator.backward(torch.stack(outputs).sum())
        for p in trainer.trainable_params:
            p.grad = None
        sync(trainer.device)

    def counts(self) -> dict:
        cfg = 2 if self.cfg else 1
        train_fwd = sum(sum(sum(m) for m in graphs) + nog for nog, graphs in self.plan["training"])
        train_fwd += sum(self.plan["lazy_reference"])
        return {
            "sampling_forwards": len(self.plan["sampling"]) + len(self.plan["reference"]),
            "sampling_unet_rows": cfg * (sum(self.plan["sampling"]) + sum(self.plan["reference"])),
            "training_forward_rows": cfg * train_fwd,
            "training_backwards": sum(len(graphs) for _, graphs in self.plan["training"]),
            "optimizer_steps": len(self.plan["training"]),
        }


@contextlib.contextmanager
def _instrumented(trainer, device):
    """Times the parts of `trainer.step` by wrapping them on this trainer instance only (CUDA is synchronised around
    every timed call, so use it for the breakdown, not for the headline time)."""
    import torch

    from diffalign.rollout import unwrap

    totals: Dict[str, float] = {}
    phase = {"name": "other"}

    def add(key, seconds):
        totals[key] = totals.get(key, 0.0) + seconds

    def wrap(obj, attr, key, set_phase=None):
        original = getattr(obj, attr)

        def wrapper(*a, **k):
            previous = phase["name"]
            if set_phase:
                phase["name"] = set_phase
            sync(device)
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                sync(device)
                add(key, time.perf_counter() - start)
                phase["name"] = previous

        setattr(obj, attr, wrapper)
        return lambda: obj.__dict__.pop(attr, None)

    starts = {}

    def pre_hook(module, args):
        sync(device)
        starts[id(module)] = time.perf_counter()

    def post_hook(module, args, output):
        sync(device)
        key = f"unet_forward_{phase['name']}" + ("" if torch.is_grad_enabled() else "_no_grad")
        add(key, time.perf_counter() - starts.pop(id(module)))

    unet = unwrap(trainer.unet)
    modules = [unet] + ([trainer.ref_unet] if trainer.ref_unet is not None else [])
    handles = [h for m in modules for h in (m.register_forward_pre_hook(pre_hook), m.register_forward_hook(post_hook))]
    restore = [
        wrap(trainer, "sample", "sampling_total", "sampling"),
        wrap(trainer, "train_on_samples", "training_total", "training"),
        wrap(trainer, "score", "reward"),
        wrap(trainer, "backward", "backward"),
        wrap(trainer, "optimizer_step", "optimizer_step"),
        wrap(trainer.pipe, "encode_prompt", "text_encoding"),
        wrap(trainer.pipe.vae, "decode", "vae_decode"),
    ]
    try:
        yield totals
    finally:
        for h in handles:
            h.remove()
        for r in restore:
            r()


def bench_train(ctx) -> dict:
    algorithms = [a.strip() for a in ctx.args.algorithms.split(",") if a.strip()]
    for a in algorithms:
        if a not in TRAIN_CONFIGS:
            raise BenchError(f"--algorithms: unknown '{a}'; choose from {', '.join(TRAIN_CONFIGS)}")
    reward_fn = None
    if not ctx.is_digits:
        from diffalign.rewards import get_reward

        reward_fn = get_reward("jpeg_compressibility")
    figures, details = Figures(), {}
    ctx.settings.update(model=ctx.model_name, repeats=ctx.repeats, shared=ctx.base_settings())
    meter = PeakMemory(ctx.device)
    with tempfile.TemporaryDirectory(prefix="diffalign-bench-") as tmp:
        for name in algorithms:
            algorithm, overrides = TRAIN_CONFIGS[name]
            trainer = ctx.make_trainer(algorithm, overrides, os.path.join(tmp, name), reward_fn=reward_fn)
            entry = _bench_train_one(ctx, trainer, meter)
            entry["config"] = trainer.config.to_dict()
            details[name] = entry
            b = entry["breakdown"]
            figures.add(f"{name}_epoch_s", entry["epoch_s"], "s (median)")
            figures.add(f"{name}_unet_floor_s", entry["floor_s"], "s, UNet fwd+bwd alone (median)")
            figures.add(f"{name}_epoch_over_unet", entry["ratio"], "epoch/floor (target <= 1.05)")
            figures.add(f"{name}_sampling_over_unet", entry["sampling_ratio"], "time_sample/sampling floor")
            figures.add(f"{name}_training_over_unet", entry["training_ratio"], "time_train/training floor")
            for part in ("unet_sampling", "unet_training", "text_encoding", "vae_decode", "reward", "optimizer_step",
                         "rest_sampling", "rest_training", "rest_epoch"):
                figures.add(f"{name}_share_{part}", b["shares"].get(part), "fraction of instrumented epoch")
            unet_share = b["shares"].get("unet_sampling", 0.0) + b["shares"].get("unet_training", 0.0)
            figures.add(f"{name}_outside_unet_share", 1.0 - unet_share, "fraction of instrumented epoch")
            figures.add(f"{name}_peak_mem_mib", mib(entry["peak_bytes"]), meter.kind)
            del trainer
    return {"figures": figures, "details": details}


def _bench_train_one(ctx, trainer, meter) -> dict:
    device = ctx.device
    epoch = 0
    trainer.step(epoch)  # warm-up: allocations, caches, prompt encodings
    num_samples = len(trainer.local_prompts(0))
    floor = _UNetFloor(trainer, num_samples, ctx.args.seed)
    floor.sampling()
    floor.training()  # warm-up of the replay
    epochs, floors_s, floors_t, peaks = [], [], [], []
    for r in range(ctx.repeats):
        def run_epoch():
            nonlocal epoch
            epoch += 1
            sync(device)
            meter.reset()
            metrics = trainer.step(epoch)
            sync(device)
            peaks.append(meter.peak() or 0)
            epochs.append(metrics)

        def run_floor():
            sync(device)
            start = time.perf_counter()
            floor.sampling()
            middle = time.perf_counter()
            floor.training()
            floors_s.append(middle - start)
            floors_t.append(time.perf_counter() - middle)

        for fn in ((run_epoch, run_floor) if r % 2 == 0 else (run_floor, run_epoch)):
            fn()
    epoch_times = [m["time_epoch"] for m in epochs]
    floor_times = [s + t for s, t in zip(floors_s, floors_t)]
    epoch += 1
    with _instrumented(trainer, device) as parts:
        start = time.perf_counter()
        instrumented = trainer.step(epoch)
        total = time.perf_counter() - start
    breakdown = _breakdown(parts, total, instrumented)
    return {
        "epoch_s": median(epoch_times),
        "epoch_times": epoch_times,
        "floor_s": median(floor_times),
        "floor_times": floor_times,
        "floor_sampling_times": floors_s,
        "floor_training_times": floors_t,
        "ratio": ratio(median(epoch_times), median(floor_times)),
        "ratio_min": ratio(min(epoch_times), min(floor_times)),
        "ratio_paired_median": median([e / f for e, f in zip(epoch_times, floor_times)]),
        "sampling_ratio": ratio(median([m["time_sample"] for m in epochs]), median(floors_s)),
        "training_ratio": ratio(median([m["time_train"] for m in epochs]), median(floors_t)),
        "time_sample": [m["time_sample"] for m in epochs],
        "time_reward": [m["time_reward"] for m in epochs],
        "time_train": [m["time_train"] for m in epochs],
        "unet_calls": floor.counts(),
        "breakdown": breakdown,
        "peak_bytes": max(peaks),
        "num_samples": num_samples,
    }


def _breakdown(parts: Dict[str, float], total: float, metrics: dict) -> dict:
    """Seconds and shares of one instrumented epoch: UNet (sampling forwards; training forwards + backwards), text
    encoding, VAE decode, reward, optimizer, and the rest of sampling, of training and of the epoch."""
    unet_sampling = sum(v for k, v in parts.items() if k.startswith("unet_forward_sampling"))
    unet_training = sum(v for k, v in parts.items() if k.startswith("unet_forward_training")) + parts.get(
        "backward", 0.0)
    seconds = {
        "unet_sampling": unet_sampling,
        "unet_training": unet_training,
        "text_encoding": parts.get("text_encoding", 0.0),
        "vae_decode": parts.get("vae_decode", 0.0),
        "reward": parts.get("reward", 0.0),
        "optimizer_step": parts.get("optimizer_step", 0.0),
    }
    sampling_total, training_total = parts.get("sampling_total", 0.0), parts.get("training_total", 0.0)
    seconds["rest_sampling"] = sampling_total - unet_sampling - seconds["text_encoding"] - seconds["vae_decode"]
    seconds["rest_training"] = training_total - unet_training - seconds["optimizer_step"]
    seconds["rest_epoch"] = total - sampling_total - training_total - seconds["reward"]
    return {
        "epoch_s": total,
        "seconds": seconds,
        "shares": {k: v / total for k, v in seconds.items()} if total else {},
        "raw": parts,
        "trainer_metrics": {k: v for k, v in metrics.items() if k.startswith("time_")},
    }


# ------------------------------------------------------------------------------------------------------ learn
def learn_configs(ctx) -> Dict[str, tuple]:
    k = ctx.args.prdp_inner_epochs
    shared = ctx.base_settings()

    def resolve(key, value):
        if value == "{K}":
            return k
        if value == "{half}":
            return max(1, shared[key] // 2)
        return value

    configs = {}
    for name, (algorithm, overrides) in LEARN_CONFIGS.items():
        name = name.replace("{K}", str(k))
        configs[name] = (algorithm, {key: resolve(key, value) for key, value in overrides.items()})
    if ctx.args.configs:
        wanted = [c.strip() for c in ctx.args.configs.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in configs]
        if unknown:
            raise BenchError(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(configs)}")
        configs = {name: value for name, value in configs.items() if name == BASELINE or name in wanted}
    return configs


def bench_learn(ctx) -> dict:
    args = ctx.args
    if args.sd15_random:
        raise BenchError("learn needs a trained model (random weights learn nothing meaningful); drop --sd15-random")
    reward = args.reward or ("digit_correctness" if ctx.is_digits else "jpeg_compressibility")
    target = args.target
    if target is None:
        if reward != "digit_correctness":
            raise BenchError(f"--target is required with reward '{reward}'")
        target = 0.9
    from diffalign.rewards import get_reward

    reward_fn = get_reward(reward)
    configs = learn_configs(ctx)
    ctx.settings.update(model=ctx.model_name, reward=reward, target=target, max_epochs=args.max_epochs,
                        window=args.window, eval_images=args.eval_images, seeds=ctx.repeats, shared=ctx.base_settings(),
                        configs={name: {"algorithm": a, **o} for name, (a, o) in configs.items()})
    meter = PeakMemory(ctx.device)
    details = {}
    with tempfile.TemporaryDirectory(prefix="diffalign-bench-") as tmp:
        for name, (algorithm, overrides) in configs.items():
            runs = []
            for s in range(ctx.repeats):
                trainer = ctx.make_trainer(algorithm, overrides, os.path.join(tmp, f"{name}-{s}"),
                                           reward_fn=reward_fn, reward=reward, seed=args.seed + s)
                meter.reset()
                evaluate = _evaluator(trainer, ctx.prompts(args.eval_images), reward_fn, args.seed) \
                    if args.eval_images else None
                runs.append(_learn_one(trainer, target, args.max_epochs, args.window, evaluate))
                runs[-1]["peak_bytes"] = meter.peak()
                del trainer
            details[name] = {"algorithm": algorithm, "overrides": overrides, "runs": runs}
    figures = Figures()
    base_time = _median_reached(details[BASELINE]["runs"], "time_to_target_s")
    base_epoch = median([x for r in details[BASELINE]["runs"] for x in r["epoch_times"]])
    for name, entry in details.items():
        runs = entry["runs"]
        reached = sum(r["reached"] for r in runs)
        t = _median_reached(runs, "time_to_target_s")
        e = _median_reached(runs, "epochs_to_target")
        entry.update(time_to_target_s=t, epochs_to_target=e, reached=reached, ratio_to_baseline=ratio(t, base_time))
        note = f"{reached}/{len(runs)} reached" if len(runs) > 1 else ("reached" if reached else
                                                                        f"not reached in {args.max_epochs} epochs")
        figures.add(f"{name}_epochs_to_target", e, note)
        figures.add(f"{name}_time_to_target_s", t, "s")
        figures.add(f"{name}_ratio_to_baseline", entry["ratio_to_baseline"],
                    "time/baseline time (target <= 0.5)" if name != BASELINE else "")
        entry["epoch_s"] = median([x for r in runs for x in r["epoch_times"]])
        figures.add(f"{name}_epoch_s", entry["epoch_s"], "s per epoch (median)")
        figures.add(f"{name}_epoch_ratio_to_baseline", ratio(entry["epoch_s"], base_epoch), "epoch time/baseline's")
        images = [x for r in runs for x in r["images"]]
        figures.add(f"{name}_fresh_images_per_epoch", median(images) if images else None, "sampled per epoch")
        figures.add(f"{name}_best_reward", max(r["best_reward"] for r in runs), "")
        figures.add(f"{name}_peak_mem_mib", mib(max(r["peak_bytes"] or 0 for r in runs)), meter.kind)
    return {"figures": figures, "details": details}


def _median_reached(runs: List[dict], key: str):
    """The median over seeds, counting a run that did not reach the target as infinitely slow (None if most
    did not)."""
    values = sorted(r[key] if r["reached"] else math.inf for r in runs)
    value = values[(len(values) - 1) // 2]
    return None if math.isinf(value) else value


def _evaluator(trainer, prompts: List[str], reward_fn, seed: int):
    """Mean reward of the current policy on fixed prompts and seeds (the same images for an unchanged policy)."""
    import torch

    from diffalign.rollout import sample_trajectories

    config = trainer.config

    @torch.no_grad()
    def evaluate() -> float:
        trainer.unet.eval()
        generator = torch.Generator(trainer.device).manual_seed(seed + 12345)
        scores = []
        for start in range(0, len(prompts), config.sample_batch_size):
            chunk = prompts[start : start + config.sample_batch_size]
            with trainer.accelerator.autocast():
                images = sample_trajectories(
                    trainer.pipe, chunk, config.sample_num_steps, config.sample_guidance_scale, config.sample_eta,
                    trainer.resolution, trainer.resolution, generator=generator, unet=trainer.unet,
                    prompt_encoder=trainer.prompt_encoder,
                ).images
            scores.append(torch.as_tensor(reward_fn(images, chunk, None), dtype=torch.float32).reshape(-1).cpu())
        return torch.cat(scores).mean().item()

    return evaluate


def _learn_one(trainer, target: float, max_epochs: int, window: int, evaluate=None) -> dict:
    """Epochs until the (windowed) reward reaches `target`.

    Without `evaluate` the reward of an epoch is `reward_mean` of its own samples, and the time counts every full
    epoch before plus the sampling and scoring of the epoch whose samples reach it (its update is not needed). With
    `evaluate` (fixed prompts and seeds, untimed) the policy is judged before training and after each epoch, and the
    time counts the full epochs up to the one after which it reaches the target.
    """
    elapsed, rewards, epoch_times, train_rewards, images = 0.0, [], [], [], []
    diagnostics = {}  # per-epoch update statistics, to see what happened when a curve falls

    def reached(values):
        return sum(values[-window:]) / len(values[-window:]) >= target

    def result(ok, epochs):
        out = {"reached": ok, "epochs_to_target": epochs, "time_to_target_s": elapsed if ok else None,
               "rewards": rewards, "epoch_times": epoch_times, "images": images, "best_reward": max(rewards),
               "elapsed_s": elapsed, "diagnostics": diagnostics}
        if evaluate is not None:
            out["train_rewards"] = train_rewards
        return out

    if evaluate is not None:
        rewards.append(evaluate())
        if reached(rewards):
            return result(True, 0)
    for epoch in range(max_epochs):
        start = time.perf_counter()
        metrics = trainer.step(epoch)
        wall = time.perf_counter() - start
        epoch_times.append(wall)
        images.append(metrics["images"])  # fresh images sampled this epoch
        for key in ("loss", "approx_kl", "clipfrac", "grad_norm", "implicit_reward_error", "log_ratio_to_old"):
            if key in metrics:
                diagnostics.setdefault(key, []).append(metrics[key])
        if evaluate is None:
            rewards.append(metrics["reward_mean"])
            if reached(rewards):
                elapsed += metrics["time_sample"] + metrics["time_reward"]
                return result(True, epoch + 1)
            elapsed += wall
        else:
            elapsed += wall
            train_rewards.append(metrics["reward_mean"])
            rewards.append(evaluate())
            if reached(rewards):
                return result(True, epoch + 1)
    return result(False, None)


# -------------------------------------------------------------------------------------------------------- rlg
def add_random_lora(unet, std: float = 0.1, seed: int = 0, adapter_name: str = "default"):
    """A peft LoRA (rank 4, attention projections) with random non-zero B weights, so it changes the model."""
    import torch
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=adapter_name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if f"lora_B.{adapter_name}." in name:
                param.copy_((std * torch.randn(param.shape, generator=generator)).to(param.device, param.dtype))
    return unet


def bench_rlg(ctx) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    from diffalign.pipelines import StableDiffusionRLGPipeline

    args = ctx.args
    base = ctx.pipeline(copy_=not args.sd15_random)
    add_random_lora(base.unet, args.lora_std, args.seed)
    base.unet.to(ctx.device, ctx.dtype).eval()
    components = {k: v for k, v in base.components.items()}
    rlg = StableDiffusionRLGPipeline(**components, requires_safety_checker=False)
    plain = StableDiffusionPipeline(**{k: v for k, v in components.items() if k != "aligned_unet"},
                                    requires_safety_checker=False)
    for p in (rlg, plain):
        p.set_progress_bar_config(disable=True)
    steps, g, batch = ctx.steps, ctx.guidance_scale, ctx.batch_size
    if g <= 1:
        raise BenchError("rlg compares against CFG sampling: use --guidance-scale > 1")
    res = ctx.resolution(base)
    prompts = ctx.prompts(batch)
    ctx.settings.update(model=ctx.model_name, batch_size=batch, steps=steps, guidance_scale=g, resolution=res,
                        rlg_scale=args.rlg_scale, lora_std=args.lora_std, repeats=ctx.repeats,
                        cases={n: {"rlg_single_pass": s, "rlg_start": a, "rlg_stop": b} for n, s, a, b in RLG_CASES})
    common = dict(num_inference_steps=steps, guidance_scale=g, height=res, width=res, output_type="pt")

    def generator():
        return torch.Generator(ctx.device).manual_seed(args.seed)

    fns = {"plain": lambda: plain(prompts, generator=generator(), **common)}
    for name, single, start, stop in RLG_CASES:
        fns[name] = (lambda single=single, start=start, stop=stop: rlg(
            prompts, generator=generator(), rlg_scale=args.rlg_scale, rlg_start=start, rlg_stop=stop,
            rlg_single_pass=single, **common))
    meter = PeakMemory(ctx.device)
    timings = timed_interleaved(fns, ctx.repeats, ctx.device, meter)
    figures = Figures()
    figures.add("plain_images_per_s", batch / timings["plain"]["median"], "img/s")
    for name, _, start, stop in RLG_CASES:
        figures.add(f"rlg_{name}_over_plain", paired_ratio(timings[name], timings["plain"])["ratio"],
                    f"time ratio, RLG in steps [{start}, {stop}) (2 UNet passes: ~{1 + (stop - start):.2g})")
    figures.add("plain_peak_mem_mib", mib(timings["plain"]["peak_bytes"]), meter.kind)
    for name, *_ in RLG_CASES:
        figures.add(f"rlg_{name}_peak_mem_mib", mib(timings[name]["peak_bytes"]), meter.kind)
    return {"figures": figures, "timings": timings}
