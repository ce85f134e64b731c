"""The tradeoff experiment: reward hacking, the KL dial, and whether RLG's scale w acts like dividing the KL coefficient.

On a bundled digits model, several LoRA fine-tunes ("arms") are trained on a hackable reward (default
`jpeg_compressibility`: small files, which blank or smudged digits also give) while an independent judge (default
`digit_judge`, digit accuracy) and the KL to the base model are logged every epoch:

* `ddpo_kl{c}`: the model's DDPO/GRPO preset with a KL penalty `train_kl_coef = c` (`c = 0`: none);
* `prdp_beta{b}`: the PRDP preset with `train_beta = b`;
* any other algorithm's arms with `--arm ALGORITHM:KEY=V1,V2,...` (e.g. `--arm nft:train_kl_coef=0,0.01,0.02`: the
  forward-process trainers, whose KL dial is the weight of their squared distance to the base model's output),
  named `{algorithm}_{kl|beta|key}{value}`.

Then every trained adapter is sampled with RLG at several scales w on fixed prompts and seeds (the same images'
noise for every w and arm), recording reward, judge accuracy and the KL of the w-guided sampler to the base one.

**The beta/w test.** For a KL-optimal fine-tune, `p_beta ∝ p_ref exp(R / beta)`, so guiding it with scale w gives
`p_ref exp(w R / beta)`: the model trained at beta sampled at w = 2 should behave like the model trained at beta / 2
(and at w = 0.5 like the one at 2 beta; Jin et al. 2025, "Reinforcement learning guidance"). For every pair of arms
of one kind whose coefficients are in ratio 2, the two samplers are compared on the same prompts and seeds (reward,
judge, KL and the mean per-image pixel distance), next to the same distances between the two trained models at w = 1.
The numbers are reported as they come out; nothing is called a pass or a fail.

Outputs in `--output-dir` (default `runs/bench/tradeoff`): one run directory per arm (a normal `diffalign train` run:
metrics.jsonl, checkpoints, final/ LoRA, reward_curve.png, plus arm.json and rlg_grid.png), `tradeoff.json`,
`tradeoff.png` and the printed tables. An arm whose run directory already holds a finished run with the same
settings is reused; an interrupted one resumes from its last checkpoint. Results: README.md beside this file.

A research experiment, not part of the package: it runs on the package's public API (the trainers, the rollout,
`diffalign.guiders.rlg_mix` for RLG's mixing, and the bench's shared options and context), from a checkout:

    python examples/research/tradeoff/tradeoff.py --model digits --seed 0 --output-dir runs/bench/tradeoff
"""

import copy
import json
import math
import os
import sys
import time
from collections.abc import Sequence

from diffalign.bench.common import BUNDLED_MODELS, BenchError, bundled_preset, Figures, yaml_value

DEFAULT_OUTPUT_DIR = os.path.join("runs", "bench", "tradeoff")
# Defaults in the digits presets' log-prob convention (per-step log-probs averaged over the 4x8x8 latent dims), for
# the JPEG reward (per-image differences ~0.01 kB), calibrated in 8-epoch runs (docs/bench.md): PRDP betas 1, 2, 4 are
# where beta binds (0.01 to 0.4 all trained alike: targets 0.01 / beta out of reach, Adam's steps ignore their size);
# DDPO: no penalty and two weights in ratio 2 that bind, so the beta/w test can also be read on the penalised arms.
DEFAULT_BETA = 2.0
DEFAULT_KL_COEFS = (0.0, 0.1, 0.2)
DEFAULT_RLG_SCALES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
PAIR_SCALES = (0.5, 1.0, 2.0)  # always swept: w = 1 is the trained model, 0.5 and 2 are the beta/w test's samplers
ARM_FILE = "arm.json"  # written into an arm's run directory when its training is complete
# keys the bench sets itself: `--set` must not change them (each has its own option)
OWN_KEYS = {
    "train_kl_coef": "--kl-coefs", "train_beta": "--prdp-betas / --beta", "reward": "--reward",
    "eval_reward": "--judge", "num_epochs": "--epochs", "output_dir": "--output-dir", "seed": "--seed",
    "resume_from": "(arms resume by themselves)", "model": "--model",
}


# ------------------------------------------------------------------------------------------- the guided sampler
def mix_outputs(base, aligned, scale: float):
    """RLG's mixing (`diffalign.guiders.rlg_mix`) of two denoiser outputs of the same structure (a tensor, a tuple
    whose first element is the prediction, or a diffusers `BaseOutput` whose first field is)."""
    import torch

    from diffalign.guiders import rlg_mix

    if isinstance(base, torch.Tensor):
        return rlg_mix(base, [(aligned, scale)])
    if isinstance(base, tuple):
        return (mix_outputs(base[0], aligned[0], scale),) + tuple(base[1:])
    key = next(iter(base.keys()))
    return type(base)(**{**base, key: mix_outputs(base[key], aligned[key], scale)})


class RLGDenoiser:
    """A LoRA denoiser and its base model (adapters off) combined as RLG combines them, as one denoiser.

    Called like the denoiser, it returns `out_base + scale * (out_aligned - out_base)`. Classifier-free guidance
    (`u + g (c - u)`, applied by the family after the denoiser) is linear in the outputs, so this equals RLG's
    `pred_base + scale * (pred_aligned - pred_base)` with CFG inside each model (the RLG pipelines), up to rounding.
    `scale = 0` runs the base model alone and `scale = 1` the adapter alone (bit-identical to sampling them
    directly); other scales run both. Given to `diffalign.rollout.sample_trajectories` as `denoiser`, with
    `RLGDenoiser(denoiser, 0.0)` as `ref_denoiser` and `compute_reference=True`, the trajectories' `kl_to_ref` is the
    per-step Gaussian KL of the w-guided sampler to the base sampler along the guided trajectory, in the package's
    convention (mean over latent dimensions).

    Args:
        denoiser: a UNet/transformer with one active peft LoRA adapter (the aligned model).
        scale (`float`): RLG's w.
    """

    def __init__(self, denoiser, scale: float):
        from diffalign.utils.peft_utils import has_lora

        if not has_lora(denoiser):
            raise ValueError("RLGDenoiser needs a denoiser with a LoRA adapter (the aligned model)")
        self.denoiser = denoiser
        self.scale = float(scale)

    @property
    def config(self):
        from diffalign.utils.peft_utils import unwrap

        return unwrap(self.denoiser).config

    @property
    def dtype(self):
        from diffalign.utils.peft_utils import unwrap

        return unwrap(self.denoiser).dtype

    def __call__(self, *args, **kwargs):
        from diffalign.utils.peft_utils import adapters_disabled

        if self.scale == 1.0:
            return self.denoiser(*args, **kwargs)
        with adapters_disabled(self.denoiser):
            base = self.denoiser(*args, **kwargs)
        if self.scale == 0.0:
            return base
        return mix_outputs(base, self.denoiser(*args, **kwargs), self.scale)


def sample_guided(family, kernel, denoiser, scale: float, prompts: list[str], seeds: list[int], num_steps: int,
                  guidance_scale: float, resolution: int, batch_size: int, autocast=None) -> dict:
    """Samples `prompts` (one image each, noise from its own `seeds[i]`) with RLG scale `scale` on a LoRA
    `denoiser`; every step's KL to the base sampler is recorded.

    Returns `{"images": (N, 3, H, W) CPU float32, "kl": (N,) per-image KL averaged over the stochastic steps}`. The
    same prompt and seed give the same initial noise and step noise at every scale, so images are paired across
    scales and adapters.
    """
    import contextlib

    import torch

    from diffalign.rollout import sample_trajectories

    guided, base = RLGDenoiser(denoiser, scale), RLGDenoiser(denoiser, 0.0)
    device = family.device
    images, kls = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator(device).manual_seed(s) for s in seeds[start : start + batch_size]]
        with torch.no_grad(), (autocast() if autocast is not None else contextlib.nullcontext()):
            trajectories = sample_trajectories(
                family, chunk, num_steps, guidance_scale, height=resolution, width=resolution, generator=generators,
                denoiser=guided, ref_denoiser=base, compute_reference=True, kernel=kernel,
            )
        images.append(trajectories.images.float().cpu())
        kls.append(trajectories.kl_to_ref.float().nanmean(dim=1).cpu())
    return {"images": torch.cat(images), "kl": torch.cat(kls)}


# ---------------------------------------------------------------------------------------------------- options
def add_arguments(parser):
    """The `tradeoff` options (on top of the shared bench options)."""
    parser.add_argument("--reward", default="jpeg_compressibility",
                        help="the trained (hackable) reward (default jpeg_compressibility)")
    parser.add_argument("--judge", default="digit_judge",
                        help="the independent judge, logged as eval_reward every epoch and in the w sweeps")
    parser.add_argument("--epochs", type=int, default=30,
                        help="epochs of every arm (one number for all, whatever the presets' num_epochs)")
    parser.add_argument("--kl-coefs", type=float, nargs="*", default=list(DEFAULT_KL_COEFS), metavar="C",
                        help="DDPO/GRPO arms, one per train_kl_coef (0: no KL penalty); default "
                             f"{' '.join(f'{c:g}' for c in DEFAULT_KL_COEFS)}; none: --kl-coefs with no value")
    parser.add_argument("--prdp-betas", type=float, nargs="*", default=None, metavar="B",
                        help="PRDP arms, one per train_beta; at least two in ratio 2 (the beta/w test); default: "
                             "--beta / 2, --beta, 2 --beta; none: --prdp-betas with no value")
    parser.add_argument("--beta", type=float, default=None,
                        help=f"the middle beta of the default PRDP arms (default {DEFAULT_BETA:g})")
    parser.add_argument("--arm", dest="arms", action="append", default=[], metavar="ALGORITHM:KEY=V1,V2,...",
                        help="more arms: the bundled model's preset of ALGORITHM with KEY at each value (repeatable; "
                             "e.g. nft:train_kl_coef=0,0.01,0.02)")
    parser.add_argument("--rlg-scales", type=float, nargs="+", default=list(DEFAULT_RLG_SCALES), metavar="W",
                        help="RLG scales of the sweeps (0.5, 1 and 2 are always added: the beta/w test's)")
    parser.add_argument("--rlg-prompts", type=int, default=10, help="digits sampled in the sweeps (1-10)")
    parser.add_argument("--rlg-seeds", type=int, default=20, help="images per digit in the sweeps (fixed seeds)")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                        help="arm run directories, tradeoff.json and tradeoff.png (--output moves the JSON only)")


_KEY_NAMES = {"train_kl_coef": "kl", "train_beta": "beta"}


def _arm_name(kind: str, value: float, key: str | None = None) -> str:
    key = key or ("train_kl_coef" if kind == "ddpo" else "train_beta")
    return f"{kind}_{_KEY_NAMES.get(key, key)}{value:g}"


def _extra_arms(items: Sequence[str]) -> dict[str, tuple[str, str, float]]:
    """`--arm ALGORITHM:KEY=V1,V2,...` as arm specs (checked: a registered algorithm with a preset for the model is
    checked when its config is built; here the spelling and the numbers)."""
    from diffalign.trainers import CONFIG_CLASSES

    specs = {}
    for item in items:
        algorithm, sep, rest = item.partition(":")
        key, sep2, values = rest.partition("=")
        algorithm, key = algorithm.strip(), key.strip().replace("-", "_")
        if not (sep and sep2 and algorithm and key and values.strip()):
            raise BenchError(f"--arm {item}: expected ALGORITHM:KEY=V1,V2,...")
        if algorithm not in CONFIG_CLASSES:
            raise BenchError(f"--arm {item}: unknown algorithm '{algorithm}'; choose from {', '.join(CONFIG_CLASSES)}")
        import dataclasses

        if key not in {f.name for f in dataclasses.fields(CONFIG_CLASSES[algorithm])}:
            raise BenchError(f"--arm {item}: '{key}' is not a config key of {algorithm}")
        try:
            numbers = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise BenchError(f"--arm {item}: the values must be numbers") from None
        bad = [v for v in numbers if not math.isfinite(v) or v < 0]
        if bad:
            raise BenchError(f"--arm {item}: {bad[0]:g} is not a non-negative number")
        for v in numbers:
            specs[_arm_name(algorithm, v, key)] = (algorithm, key, v)
    return specs


def arm_specs(args) -> dict[str, tuple[str, str, float]]:
    """`{arm name: (algorithm, coefficient key, value)}` from the options (checked)."""
    kl_coefs = list(args.kl_coefs or [])
    if args.prdp_betas is not None and args.beta is not None:
        raise BenchError("give --prdp-betas or --beta, not both")
    beta = DEFAULT_BETA if args.beta is None else args.beta
    betas = list(args.prdp_betas) if args.prdp_betas is not None else [beta / 2, beta, 2 * beta]
    for name, values, low_ok in (("--kl-coefs", kl_coefs, True), ("--prdp-betas", betas, False)):
        bad = [v for v in values if not math.isfinite(v) or v < 0 or (v == 0 and not low_ok)]
        if bad:
            raise BenchError(f"{name}: {bad[0]:g} is not a {'non-negative' if low_ok else 'positive'} number")
        if len({f'{v:g}' for v in values}) != len(values):
            raise BenchError(f"{name}: repeated value in {' '.join(f'{v:g}' for v in values)}")
    if args.beta is not None and not (math.isfinite(args.beta) and args.beta > 0):
        raise BenchError(f"--beta must be a positive number; got {args.beta:g}")
    if betas and not ratio_pairs(betas):
        raise BenchError(f"--prdp-betas {' '.join(f'{b:g}' for b in betas)}: the beta/w test needs two betas in ratio 2 "
                         "(e.g. 0.005 0.01 0.02, or --beta 0.01)")
    specs = {_arm_name("ddpo", c): ("ddpo", "train_kl_coef", c) for c in sorted(kl_coefs)}
    specs.update({_arm_name("prdp", b): ("prdp", "train_beta", b) for b in sorted(betas)})
    extra = _extra_arms(args.arms)
    repeated = [name for name in extra if name in specs]
    if repeated:
        raise BenchError(f"--arm: {repeated[0]} is already an arm (--kl-coefs / --prdp-betas)")
    specs.update(extra)
    if not specs:
        raise BenchError("no arms: give --kl-coefs, --prdp-betas or --arm values")
    return specs


def ratio_pairs(values: Sequence[float]) -> list[tuple[float, float]]:
    """`(small, big)` pairs of positive values with `big = 2 small` (relative tolerance 1e-6)."""
    values = sorted(v for v in values if v > 0)
    return [(a, b) for a in values for b in values if math.isclose(b, 2 * a, rel_tol=1e-6)]


def _check_args(ctx):
    args = ctx.args
    if args.tiny or args.sd15_random or args.model not in BUNDLED_MODELS:
        raise BenchError(f"tradeoff needs a bundled digits model ({', '.join(BUNDLED_MODELS)}): its judge (digit "
                         "accuracy) and presets exist only for them")
    if args.repeats not in (None, 1):
        raise BenchError("tradeoff runs one seed: run it again with --seed N (and another --output-dir) for repeats")
    if args.epochs is not None and args.epochs < 1:
        raise BenchError(f"--epochs must be >= 1; got {args.epochs}")
    if not 1 <= args.rlg_prompts <= 10:
        raise BenchError(f"--rlg-prompts must be between 1 and 10 (one per digit); got {args.rlg_prompts}")
    if args.rlg_seeds < 1:
        raise BenchError(f"--rlg-seeds must be >= 1; got {args.rlg_seeds}")
    bad = [w for w in args.rlg_scales if not math.isfinite(w)]
    if bad:
        raise BenchError(f"--rlg-scales: {bad[0]} is not a finite number")


def _set_overrides(args) -> dict[str, object]:
    """`--set KEY=VALUE` as typed values; the bench's own keys are refused (each has its option)."""
    values = {}
    for item in args.overrides:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise BenchError(f"--set {item}: expected KEY=VALUE")
        if key in OWN_KEYS:
            raise BenchError(f"--set {key}: tradeoff sets it itself; use {OWN_KEYS[key]}")
        values[key] = yaml_value(text)
    return values


# ------------------------------------------------------------------------------------------------------ arms
def arm_config(ctx, algorithm: str, key: str, value: float, run_dir: str, epochs: int | None, resume: bool):
    """The config of one arm: the bundled model's preset of `algorithm` with the reward replaced, the judge as
    eval_reward, KL logged every epoch, the arm's coefficient, the shape options and `--set` overrides (those the
    algorithm knows)."""
    import dataclasses

    from diffalign.cli.parser import load_config
    from diffalign.trainers import CONFIG_CLASSES

    args = ctx.args
    values = {
        "reward": args.reward, "reward_kwargs": {}, "eval_reward": args.judge, "eval_reward_kwargs": {},
        "output_dir": run_dir, "seed": args.seed, "sample_compute_kl": True, "final_eval_num_images": 0,
        "mixed_precision": {"fp32": "no"}.get(args.dtype, args.dtype), "enable_xformers": args.xformers,
    }
    shapes = {"sample_num_steps": args.steps, "sample_guidance_scale": args.guidance_scale,
              "sample_batch_size": args.batch_size, "sample_resolution": args.resolution,
              "sample_num_prompts_per_epoch": args.prompts_per_epoch,
              "sample_images_per_prompt": args.images_per_prompt}
    values.update({k: v for k, v in shapes.items() if v is not None})
    known = {f.name for f in dataclasses.fields(CONFIG_CLASSES[algorithm])}
    sets = _set_overrides(args)
    unknown = [k for k in sets if not any(k in {f.name for f in dataclasses.fields(c)} for c in CONFIG_CLASSES.values())]
    if unknown:
        raise BenchError(f"--set {unknown[0]}: not a config key of any trainer")
    values.update({k: v for k, v in sets.items() if k in known})
    values[key] = value
    preset = bundled_preset(args.model, algorithm)
    config = load_config(algorithm, preset)  # the preset's epochs and batch shapes, before the overrides
    if epochs is not None:
        values["num_epochs"] = epochs
    prompts = values.get("sample_num_prompts_per_epoch", config.sample_num_prompts_per_epoch)
    images = values.get("sample_images_per_prompt", config.sample_images_per_prompt)
    # keep the batch arithmetic valid when the shape options shrink the preset's epoch
    # (whichever of these fields the algorithm's config has)
    size = values.get("train_batch_size", getattr(config, "train_batch_size", 0))
    if size and (prompts * images) % size:
        values["train_batch_size"] = math.gcd(prompts * images, size)
    if getattr(config, "train_prompts_per_step", 0) and values.get("train_prompts_per_step",
                                                                   config.train_prompts_per_step):
        values["train_prompts_per_step"] = math.gcd(prompts, values.get("train_prompts_per_step",
                                                                        config.train_prompts_per_step))
    num_epochs = values.get("num_epochs", config.num_epochs)
    values["checkpoint_every"] = max(1, min(5, num_epochs))  # an interrupted arm loses at most 5 epochs
    if resume:
        values["resume_from"] = run_dir
    full = {**{k: v for k, v in vars(config).items() if k in known}, **values}
    fitted = CONFIG_CLASSES[algorithm].fit_to_shapes(full)
    values.update({k: v for k, v in fitted.items() if v != full[k]})  # only the counts the shapes shrank
    return load_config(algorithm, preset, values)


def _curves(records: list[dict]) -> dict[str, list]:
    """Per-epoch reward (the epoch's own samples), judge and KL to base from a run's metrics."""
    return {
        "epoch": [r["epoch"] for r in records],
        "reward": [r.get("reward_mean") for r in records],
        "judge": [r.get("eval_mean") for r in records],
        "kl": [r.get("kl_to_base") for r in records],
        "epoch_s": [r.get("time_epoch") for r in records],
    }


def _log(message: str):
    print(f"[tradeoff] {message}", file=sys.stderr, flush=True)


def train_arm(ctx, name: str, algorithm: str, key: str, value: float, run_dir: str) -> dict:
    """Trains one arm in `run_dir`, or reuses / continues the run already there. Returns its `arm.json` content."""
    from accelerate import Accelerator

    from diffalign.trainers import trainer_class
    from diffalign.runlog import run_files

    args = ctx.args
    config = arm_config(ctx, algorithm, key, value, run_dir, args.epochs, resume=False)
    marker = os.path.join(run_dir, ARM_FILE)
    if os.path.isfile(marker):
        with open(marker) as f:
            done = json.load(f)
        if done.get("config_hash") != config.hash():
            raise BenchError(f"{run_dir} holds arm {name} trained with other settings: remove it or choose another "
                             "--output-dir")
        if done["num_epochs"] == config.num_epochs:
            _log(f"{name}: reusing the finished run in {run_dir}")
            return {**done, "reused": True}
        if done["num_epochs"] > config.num_epochs:
            raise BenchError(f"{run_dir} holds arm {name} trained for {done['num_epochs']} epochs, more than "
                             f"--epochs {config.num_epochs}: ask for at least that many or choose another --output-dir")
    existing = run_files(run_dir) if os.path.isdir(run_dir) else []
    resume = "checkpoints/" in existing
    if existing and not resume:  # cut before its first checkpoint: nothing to continue
        if "final/" in existing:
            raise BenchError(f"{run_dir} holds final weights but no checkpoint or {ARM_FILE}: remove it")
        _log(f"{name}: no checkpoint in {run_dir}; training again from epoch 0")
        os.remove(os.path.join(run_dir, "metrics.jsonl"))  # the only other thing run_files counts
    if resume:
        config = arm_config(ctx, algorithm, key, value, run_dir, args.epochs, resume=True)
    _log(f"{name}: {'continuing' if resume else 'training'} {algorithm} with {key}={value:g} for "
         f"{config.num_epochs} epochs in {run_dir}")
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=ctx.device.type == "cpu")
    trainer = trainer_class(algorithm)(config, pipeline=copy.deepcopy(ctx.template()), accelerator=accelerator)
    start = time.perf_counter()
    history = trainer.train(progress=sys.stderr.isatty())
    result = {
        "name": name, "algorithm": algorithm, "coefficient": key, "value": value, "run_dir": run_dir,
        "config_hash": config.hash(), "num_epochs": config.num_epochs, "config": config.to_dict(),
        "curves": _curves(history), "wall_s": time.perf_counter() - start, "resumed": resume,
    }
    del trainer
    with open(marker, "w") as f:
        json.dump(result, f, indent=1, default=str)
    return {**result, "reused": False}


# -------------------------------------------------------------------------------------------------- w sweeps
def sweep_prompts(ctx) -> tuple[list[str], list[int], list[int]]:
    """`(prompts, seeds, digit index)`: `--rlg-seeds` images of each of the first `--rlg-prompts` digit prompts, one
    noise seed per image, the same for every scale and arm."""
    import numpy as np

    args = ctx.args
    digits = ctx.prompts(args.rlg_prompts)
    prompts, seeds, index = [], [], []
    for p, prompt in enumerate(digits):
        for s in range(args.rlg_seeds):
            prompts.append(prompt)
            seeds.append(int(np.random.default_rng([args.seed, 31337, p, s]).integers(0, 2**63 - 1)))
            index.append(p)
    return prompts, seeds, index


class Sampler:
    """The sweeps' shared setup: the model, the sampling settings of the arms' configs, the reward and the judge."""

    def __init__(self, ctx, config):
        import torch

        from diffalign.rewards import get_reward

        self.ctx, self.config = ctx, config
        self.prompts, self.seeds, self.digit = sweep_prompts(ctx)
        self.reward_fn = get_reward(config.reward, **config.reward_kwargs)
        self.judge_fn = get_reward(config.eval_reward, **config.eval_reward_kwargs)
        dtype = ctx.dtype
        self.autocast = None
        if dtype != torch.float32:
            self.autocast = lambda: torch.autocast(ctx.device.type, dtype=dtype)

    def pipeline(self, lora_dir: str):
        """A copy of the model on the device with the arm's LoRA loaded (adapter "aligned")."""
        from diffalign.families import family_for_pipeline
        from diffalign.utils.peft_utils import load_lora_into_pipeline
        from diffalign.rollout import as_family

        pipe = copy.deepcopy(self.ctx.template())
        family = family_for_pipeline(pipe)
        load_lora_into_pipeline(pipe, lora_dir, "aligned", family.denoiser_name)
        pipe.to(self.ctx.device)
        family = as_family(pipe)
        family.set_kernel_scheduler(pipe)
        family.configure(**self.config.family_kwargs())
        family.denoiser.eval()
        return family

    def sample(self, family, scale: float) -> dict:
        """Reward, judge and KL of the w-guided sampler on the sweep's prompts and seeds (per image and mean)."""
        from diffalign.rewards import call_reward

        config = self.config
        out = sample_guided(
            family, family.make_kernel(**config.kernel_kwargs()), family.denoiser, scale, self.prompts, self.seeds,
            config.sample_num_steps, config.sample_guidance_scale,
            config.sample_resolution or family.default_resolution(), config.sample_batch_size, self.autocast,
        )
        images = out["images"]
        reward = call_reward(self.reward_fn, images, self.prompts, None, name=str(config.reward)).float()
        judge = call_reward(self.judge_fn, images, self.prompts, None, name=str(config.eval_reward)).float()
        return {"w": scale, "reward": reward, "judge": judge, "kl": out["kl"], "images": images}


def _summary(entry: dict) -> dict:
    return {"w": entry["w"], "reward": entry["reward"].mean().item(), "reward_std": entry["reward"].std().item(),
            "judge": entry["judge"].mean().item(), "kl": entry["kl"].nanmean().item()}


def _distance(a: dict, b: dict) -> dict:
    """What separates two samplers on the same prompts and seeds: |Δ| of the mean reward, judge accuracy and KL, and
    the mean per-image pixel distance (mean |Δ| over channels and pixels of images in [0, 1])."""
    return {
        "d_reward": abs(a["reward"].mean().item() - b["reward"].mean().item()),
        "d_judge": abs(a["judge"].mean().item() - b["judge"].mean().item()),
        "d_kl": abs(a["kl"].nanmean().item() - b["kl"].nanmean().item()),
        "pixel_distance": (a["images"] - b["images"]).abs().flatten(1).mean(1).mean().item(),
    }


def beta_w_table(specs: dict[str, tuple], sweeps: dict[str, dict[float, dict]]) -> list[dict]:
    """The beta/w test for every pair of arms of one kind whose coefficients are in ratio 2 (small, big = 2 small):
    big at w = 2 against small at w = 1, small at w = 0.5 against big at w = 1, and the two trained models (w = 1)."""
    rows = []
    for kind, key in dict.fromkeys((algorithm, key) for algorithm, key, _ in specs.values()):
        values = [v for algorithm, k, v in specs.values() if (algorithm, k) == (kind, key)]
        for small, big in ratio_pairs(values):
            s, b = _arm_name(kind, small, key), _arm_name(kind, big, key)
            if s not in sweeps or b not in sweeps:
                continue
            models = _distance(sweeps[b][1.0], sweeps[s][1.0])
            comparisons = []
            for (arm_a, w_a, value_a), (arm_b, value_b) in (((b, 2.0, big), (s, small)), ((s, 0.5, small), (b, big))):
                d = _distance(sweeps[arm_a][w_a], sweeps[arm_b][1.0])
                d["pixel_over_models"] = d["pixel_distance"] / models["pixel_distance"] \
                    if models["pixel_distance"] > 0 else None
                comparisons.append({"sampler": f"{key}={value_a:g} at w={w_a:g}", "arm": arm_a, "w": w_a,
                                    "vs": f"{key}={value_b:g} at w=1", "vs_arm": arm_b, **d})
            rows.append({"kind": kind, "coefficient": key, "small": small, "big": big,
                         "models": {"sampler": f"{key}={big:g} at w=1", "arm": b, "w": 1.0,
                                    "vs": f"{key}={small:g} at w=1", "vs_arm": s, **models},
                         "comparisons": comparisons})
    return rows


def save_sweep_grid(sweep: dict[float, dict], digit: list[int], path: str):
    """One labelled row per scale: the first image of each digit (the same seeds in every row)."""
    import torch

    from diffalign.plotting import rows_grid

    firsts = [digit.index(d) for d in sorted(set(digit))]
    scales = sorted(sweep)
    rows = [sweep[w]["images"][torch.tensor(firsts)] for w in scales]
    rows_grid(rows, [f"w={w:g}" for w in scales], max_per_row=len(firsts)).save(path)


# ------------------------------------------------------------------------------------------------ the figure
def plot_tradeoff(arms: dict[str, dict], sweeps: dict[str, list[dict]], base: dict, path: str, title: str):
    """Left: reward against judge accuracy; right: reward against KL to base. Lines: each arm along training (the
    epoch's own samples); markers joined by dots: its RLG sweep on the fixed prompts and seeds, labelled with w."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4))
    cmap = plt.get_cmap("tab10")
    for i, (name, arm) in enumerate(arms.items()):
        color = cmap(i % 10)
        curves = arm["curves"]
        for ax, x_key in zip(axes, ("judge", "kl")):
            pts = [(x, y) for x, y in zip(curves[x_key], curves["reward"]) if x is not None and y is not None]
            if pts:
                ax.plot(*zip(*pts), "-", color=color, alpha=0.75, lw=1.2, label=f"{name} (training)")
                ax.plot(*pts[-1], "o", color=color, ms=4)
            points = sweeps.get(name, [])
            if points:
                xs, ys = [p[x_key] for p in points], [p["reward"] for p in points]
                ax.plot(xs, ys, ":", marker="s", color=color, ms=4, label=f"{name} (RLG w)")
                for p, x, y in zip(points, xs, ys):
                    ax.annotate(f"{p['w']:g}", (x, y), fontsize=6, color=color, xytext=(2, 2),
                                textcoords="offset points")
    for ax, x_key, label in zip(axes, ("judge", "kl"), ("judge accuracy", "KL to base (per step, mean over dims)")):
        ax.plot(base[x_key], base["reward"], "k*", ms=10, label="base model")
        ax.set_xlabel(label)
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
    axes[1].set_xscale("symlog", linthresh=1e-3)
    # one legend under both panels: inside either it covers the curves
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(len(labels), 7), frameon=False)
    fig.suptitle(title, fontsize=9)
    rows = -(-len(labels) // min(len(labels), 7))
    fig.tight_layout(rect=(0, 0.04 + 0.035 * rows, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- the tables
def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def format_tables(arms: dict[str, dict], sweeps: dict[str, list[dict]], beta_w: list[dict]) -> str:
    out = ["training (last epoch, its own samples; first epoch in brackets)"]
    rows = []
    for name, arm in arms.items():
        c = arm["curves"]
        rows.append([name, arm["num_epochs"], f"{_fmt(c['reward'][-1])} ({_fmt(c['reward'][0])})",
                     f"{_fmt(c['judge'][-1])} ({_fmt(c['judge'][0])})", _fmt(c["kl"][-1]),
                     "reused" if arm["reused"] else f"{arm['wall_s']:.0f} s"])
    out.append(_table(["arm", "epochs", "reward", "judge", "KL to base", "wall"], rows))
    out.append("\nRLG sweeps (fixed prompts and seeds)")
    rows = [[name, _fmt(p["w"]), _fmt(p["reward"]), _fmt(p["judge"]), _fmt(p["kl"])]
            for name, points in sweeps.items() for p in points]
    out.append(_table(["arm", "w", "reward", "judge", "KL to base"], rows))
    out.append("\nbeta/w test: the coefficient-c model at w against the c/w model at w = 1 (same prompts and seeds; "
               "absolute differences of the means, mean per-image pixel distance)")
    rows = []
    for row in beta_w:
        for entry in [*row["comparisons"], {**row["models"], "pixel_over_models": 1.0}]:
            rows.append([entry["sampler"], entry["vs"], _fmt(entry["d_reward"], 3), _fmt(entry["d_judge"], 3),
                         _fmt(entry["d_kl"], 3), _fmt(entry["pixel_distance"], 3),
                         _fmt(entry["pixel_over_models"], 3)])
    out.append(_table(["sampler", "vs", "Δreward", "Δjudge", "ΔKL", "pixel dist", "pixel / models'"], rows))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- benchmark
def run_benchmark(ctx) -> dict:
    args = ctx.args
    _check_args(ctx)
    specs = arm_specs(args)
    output_dir = args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    if args.output is None:
        args.output = os.path.join(output_dir, "tradeoff.json")  # `diffalign.bench.run` writes the JSON there
    scales = sorted(set(args.rlg_scales) | set(PAIR_SCALES))

    arms = {}
    for name, (algorithm, key, value) in specs.items():
        arms[name] = train_arm(ctx, name, algorithm, key, value, os.path.join(output_dir, name))

    # the sweeps sample like the arms (the presets' shared sampling settings, after the shape options and --set)
    first = next(iter(arms.values()))
    sampler = Sampler(ctx, arm_config(ctx, first["algorithm"], first["coefficient"], first["value"],
                                      first["run_dir"], args.epochs, resume=False))
    _log(f"RLG sweeps: w in {' '.join(f'{w:g}' for w in scales)} on {len(sampler.prompts)} images")
    base_sample = None
    sweeps: dict[str, dict[float, dict]] = {}
    sweep_s = {}
    for name, arm in arms.items():
        start = time.perf_counter()
        family = sampler.pipeline(os.path.join(arm["run_dir"], "final"))
        if base_sample is None:  # w = 0 is the base model for every arm: sampled once
            base_sample = sampler.sample(family, 0.0)
        sweeps[name] = {w: (base_sample if w == 0 else sampler.sample(family, w)) for w in scales}
        save_sweep_grid(sweeps[name], sampler.digit, os.path.join(arm["run_dir"], "rlg_grid.png"))
        sweep_s[name] = time.perf_counter() - start
        _log(f"{name}: swept in {sweep_s[name]:.0f} s")
        del family

    summaries = {name: [_summary(sweeps[name][w]) for w in scales] for name in arms}
    base = _summary(base_sample)
    beta_w = beta_w_table(specs, sweeps)
    title = (f"{args.model}: {args.reward} trained, {args.judge} judged; seed {args.seed}; "
             f"{len(sampler.prompts)} fixed images per w")
    plot_tradeoff(arms, summaries, base, os.path.join(output_dir, "tradeoff.png"), title)
    print(format_tables(arms, summaries, beta_w))

    ctx.settings.update(model=args.model, reward=args.reward, judge=args.judge, seed=args.seed,
                        output_dir=output_dir, rlg_scales=scales, rlg_prompts=args.rlg_prompts,
                        rlg_seeds=args.rlg_seeds,
                        arms={name: {"algorithm": a, k: v} for name, (a, k, v) in specs.items()})
    figures = Figures()
    for name, arm in arms.items():
        c = arm["curves"]
        figures.add(f"{name}_reward", c["reward"][-1], "last epoch")
        figures.add(f"{name}_judge", c["judge"][-1], "last epoch")
        figures.add(f"{name}_kl", c["kl"][-1], "last epoch")
    for row in beta_w:
        for entry in [*row["comparisons"], row["models"]]:
            label = f"{entry['arm']}_w{entry['w']:g}_vs_{entry['vs_arm']}_w1"
            figures.add(f"{label}_pixel_distance", entry["pixel_distance"], "mean abs. difference per pixel")
            figures.add(f"{label}_d_judge", entry["d_judge"], "abs. difference of judge accuracy")
    return {
        "figures": figures,
        "arms": arms,
        "rlg": {"scales": scales, "prompts": sampler.prompts, "seeds": sampler.seeds, "base": base,
                "sweeps": summaries, "sweep_s": sweep_s},
        "beta_w": beta_w,
        "plot": os.path.join(output_dir, "tradeoff.png"),
    }


def parser():
    """The bench's shared options (`diffalign.bench.common_arguments`) plus the experiment's."""
    import argparse

    from diffalign.bench import common_arguments

    p = argparse.ArgumentParser(prog="python examples/research/tradeoff/tradeoff.py", parents=[common_arguments()],
                                description="Reward hacking, the KL dial, and RLG's w against the KL coefficient.")
    add_arguments(p)
    return p


def main(argv=None) -> int:
    """Parses `argv` and runs the experiment as a bench would (JSON, table, one-line errors with exit code 2)."""
    from diffalign.bench import run

    args = parser().parse_args(argv)
    args.bench_command = "tradeoff"
    return run(args, run_benchmark)


if __name__ == "__main__":
    from diffalign.utils.logging_utils import quiet_libraries, setup_logging

    setup_logging()
    quiet_libraries()
    sys.exit(main())
