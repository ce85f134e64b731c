"""`bench learn`: CPU time (and wall time) to reach a reward, per trainer configuration, against a baseline."""

import math
import os
import tempfile
import time
from typing import Dict, List


from .common import (
    BenchError,
    Figures,
    PeakMemory,
    machine_info,
    median,
    mib,
    ratio,
)


# --------------------------------------------------------------------------------------------- configurations
# `learn`: each configuration is `(algorithm, overrides)`. The overrides go on top of the shared settings (the
# digits preset's sampling settings, or small ones; see `base_settings`), so every configuration samples the same
# number of images per epoch with the same sampler, except where a configuration draws fewer fresh ones (it reuses
# samples, or samples half the prompts). `{K}` in a name is `--prdp-inner-epochs`. Values: `{half}` is half the
# shared value (at least 1), `{samples/8}` an eighth of the configuration's images per epoch, `{prompts*2}` the
# images of 2 prompts, `{first_step}` the `train_timestep_fraction` that keeps the first (noisiest) of the
# configuration's sampling steps only.
BASELINE = "ddpo_baseline"
# AWM with 8 optimizer steps per epoch, on samples of half the steps, of half the prompts: the parent of its variants
_AWM_HALF_PROMPTS = {"sample_guidance_scale": 1.0, "sample_num_prompts_per_epoch": "{half}",
                     "train_batch_size": "{samples/8}", "sample_num_steps": "{half}"}
# one noise level per sample, the first (noisiest) sampling step
_NOISIEST_STEP = {"train_timesteps": 1, "train_timestep_fraction": "{first_step}"}
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
    # SDE windows (Flow-GRPO-Fast, MixGRPO): only a window of steps is stochastic and trained, drawn each epoch in
    # the first half of the trajectory; deterministic (ODE) steps elsewhere. `{first_half}` is [0, steps / 2].
    "ddpo_window2": (
        "ddpo", {"sample_sde_window_size": 2, "sample_sde_window_range": "{first_half}",
                 "train_timestep_fraction": 1.0, "train_num_inner_epochs": 1, "sample_compute_kl": False}
    ),
    "ddpo_window2_k2": (
        "ddpo", {"sample_sde_window_size": 2, "sample_sde_window_range": "{first_half}",
                 "train_timestep_fraction": 1.0, "train_num_inner_epochs": 2, "sample_compute_kl": False}
    ),
    "ddpo_window3_k2": (
        "ddpo", {"sample_sde_window_size": 3, "sample_sde_window_range": "{first_half}",
                 "train_timestep_fraction": 1.0, "train_num_inner_epochs": 2, "sample_compute_kl": False}
    ),
    "prdp_k{K}_window3": (
        "prdp", {"train_num_inner_epochs": "{K}", "sample_sde_window_size": 3, "sample_sde_window_range": "{first_half}"}
    ),
    # Forward-process RL: deterministic CFG-free sampling, as the authors sample; the training settings are the
    # bundled model's preset's (`digits-flow-nft`, `digits-flow-awm`, ...). Evaluated with the shared sampler like the
    # rest.
    "nft": ("nft", {"sample_guidance_scale": 1.0}),
    "awm": ("awm", {"sample_guidance_scale": 1.0}),
    "dgpo": ("dgpo", {"sample_guidance_scale": 1.0}),
    # AWM with 8 optimizer steps per epoch instead of 2, on samples from half the denoising steps (the forward-process
    # loss needs final samples only; the authors sample with fewer steps than they evaluate with). Judged, like
    # every configuration, with the shared number of steps.
    "awm_8_updates_half_sampling": (
        "awm", {"sample_guidance_scale": 1.0, "train_batch_size": "{samples/8}", "sample_num_steps": "{half}"}
    ),
    # AWM at 3.3x the preset's learning rate
    "awm_lr1e-2": ("awm", {"sample_guidance_scale": 1.0, "train_learning_rate": 1e-2}),
    # ... and on half the prompts per epoch (half the images), still 8 optimizer steps per epoch
    "awm_8_updates_half_sampling_half_prompts": ("awm", _AWM_HALF_PROMPTS),
    # ... at two thirds of the preset's learning rate (3e-3)
    "awm_8_updates_half_sampling_half_prompts_lr2e-3": ("awm", {**_AWM_HALF_PROMPTS, "train_learning_rate": 2e-3}),
    # ... with the clipped advantages unscaled (`train_advantage_max: 0`; the authors' rescale them by 1/5): the
    # advantage-weighted matching term 5x stronger against the KL to the EMA adapter
    "awm_8_updates_half_sampling_half_prompts_unscaled_advantages": (
        "awm", {**_AWM_HALF_PROMPTS, "train_advantage_max": 0}
    ),
    # ... trained at the noisiest of its sampling steps only (one noise level per sample; the preset's: 3 strata of
    # the first 90% of the steps), so an epoch trains a third of the rows
    "awm_8_updates_half_sampling_half_prompts_noisiest_step": ("awm", {**_AWM_HALF_PROMPTS, **_NOISIEST_STEP}),
    # ... and with the clipped advantages unscaled
    "awm_8_updates_half_sampling_half_prompts_unscaled_advantages_noisiest_step": (
        "awm", {**_AWM_HALF_PROMPTS, "train_advantage_max": 0, **_NOISIEST_STEP}
    ),
    # DGPO with optimizer steps of 2 prompt groups (the preset: 5 groups), on samples of half the steps, each sample
    # trained at one noise level (the preset: 4) drawn among the 3 noisiest sampler steps
    "dgpo_2_prompts_per_step_half_sampling_one_level": (
        "dgpo", {"sample_guidance_scale": 1.0, "train_batch_size": "{prompts*2}", "sample_num_steps": "{half}",
                 "train_num_timesteps": 1, "train_trunc_steps": 2}
    ),
}


# ------------------------------------------------------------------------------------------------------ learn
def learn_configs(ctx) -> Dict[str, tuple]:
    k = ctx.args.prdp_inner_epochs
    shared = ctx.base_settings()

    def resolve(key, value, values):
        """`values`: the configuration's keys resolved so far (the sample counts come first)."""
        settings = {**shared, **values}
        if value == "{K}":
            return k
        if value == "{half}":
            return max(1, shared[key] // 2)
        if value == "{samples/8}":  # an eighth of the configuration's samples per epoch
            return max(1, settings["sample_num_prompts_per_epoch"] * settings["sample_images_per_prompt"] // 8)
        if value == "{prompts*2}":  # the images of 2 prompts
            return 2 * settings["sample_images_per_prompt"]
        if value == "{first_step}":  # int(steps x fraction) == 1, whatever the rounding of 1 / steps
            steps = settings["sample_num_steps"]
            fraction = 1 / steps
            return fraction if int(steps * fraction) == 1 else math.nextafter(fraction, 1)
        return value

    steps = shared["sample_num_steps"]
    configs = {}
    for name, (algorithm, overrides) in LEARN_CONFIGS.items():
        name = name.replace("{K}", str(k))
        values = {}
        for key in sorted(overrides, key=lambda key: not key.startswith("sample_")):  # sample counts first
            values[key] = resolve(key, overrides[key], values)
        values = {key: values[key] for key in overrides}
        if "sample_sde_window_size" in values:  # a window no longer than the trajectory, in its first half
            values["sample_sde_window_size"] = size = min(values["sample_sde_window_size"], steps)
            if values.get("sample_sde_window_range") == "{first_half}":
                values["sample_sde_window_range"] = [0, max(steps // 2, size)]
        configs[name] = (algorithm, values)
    if ctx.args.configs:
        from diffalign.trainers import TRAINERS

        wanted = [c.strip() for c in ctx.args.configs.split(",") if c.strip()]
        for name in wanted:  # any registered algorithm by its name: its own defaults on the shared settings
            if name not in configs and name in TRAINERS:
                configs[name] = (name, {})
        unknown = [c for c in wanted if c not in configs]
        if unknown:
            raise BenchError(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(configs)} or a "
                             f"registered algorithm ({', '.join(TRAINERS)})")
        configs = {name: value for name, value in configs.items() if name == BASELINE or name in wanted}
    return configs


def run_benchmark(ctx) -> dict:
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
    if args.baseline_from:
        details[BASELINE] = earlier_baseline(args.baseline_from, ctx.settings, machine_info(ctx))
        ctx.settings["baseline_from"] = os.path.abspath(args.baseline_from)
    with tempfile.TemporaryDirectory(prefix="diffalign-bench-") as tmp:
        for name, (algorithm, overrides) in configs.items():
            if name in details:  # the baseline of --baseline-from
                continue
            runs = []
            for s in range(ctx.repeats):
                trainer = ctx.make_trainer(algorithm, overrides, os.path.join(tmp, f"{name}-{s}"),
                                           reward_fn=reward_fn, reward=reward, seed=args.seed + s)
                meter.reset()
                shared = ctx.base_settings()
                evaluate = _evaluator(trainer, ctx.prompts(args.eval_images), reward_fn, args.seed,
                                      shared["sample_guidance_scale"], shared["sample_num_steps"]) \
                    if args.eval_images else None
                runs.append(_learn_one(trainer, target, args.max_epochs, args.window, evaluate,
                                       progress=f"{name} seed {args.seed + s}"))
                runs[-1]["peak_bytes"] = meter.peak()
                del trainer
            details[name] = {"algorithm": algorithm, "overrides": overrides, "runs": runs}
    figures = Figures()
    base_time = median_reached(details[BASELINE]["runs"], "cpu_to_target_s")
    # where most baseline runs missed the target its median is only bounded below, and a ratio only bounded above
    base_bound = median_lower_bound(details[BASELINE]["runs"], "cpu_to_target_s") if base_time is None else None
    base_epoch = median([x for r in details[BASELINE]["runs"] for x in r["epoch_times"]])
    for name, entry in details.items():
        runs = entry["runs"]
        reached = sum(r["reached"] for r in runs)
        t = median_reached(runs, "cpu_to_target_s")
        e = median_reached(runs, "epochs_to_target")
        entry.update(cpu_to_target_s=t, time_to_target_s=median_reached(runs, "time_to_target_s"), epochs_to_target=e,
                     reached=reached, ratio_to_baseline=ratio(t, base_time))
        note = f"{reached}/{len(runs)} reached" if len(runs) > 1 else ("reached" if reached else
                                                                        f"not reached in {args.max_epochs} epochs")
        figures.add(f"{name}_epochs_to_target", e, note)
        figures.add(f"{name}_cpu_to_target_s", t, "CPU s (user + sys of the process; one torch thread: one core)")
        figures.add(f"{name}_time_to_target_s", entry["time_to_target_s"], "wall s")
        figures.add(f"{name}_ratio_to_baseline", entry["ratio_to_baseline"],
                    "CPU time/baseline's (target <= 0.5)" if name != BASELINE else "")
        if t is None:
            entry["cpu_to_target_lower_bound_s"] = bound = median_lower_bound(runs, "cpu_to_target_s")
            figures.add(f"{name}_cpu_to_target_lower_bound_s", bound,
                        "most runs missed the target: the median CPU s is above this (a miss counts as its CPU s)")
        elif base_bound and name != BASELINE:
            entry["ratio_to_baseline_upper_bound"] = ratio(t, base_bound)
            figures.add(f"{name}_ratio_to_baseline_upper_bound", entry["ratio_to_baseline_upper_bound"],
                        "CPU time/the baseline's lower bound (most baseline runs missed the target)")
        split = [r["sampling_share"] for r in runs if r["sampling_share"] is not None]
        figures.add(f"{name}_sampling_share", median(split) if split else None,
                    "of the wall time to target: sampling and scoring (the rest is training)")
        entry["epoch_s"] = median([x for r in runs for x in r["epoch_times"]])
        figures.add(f"{name}_epoch_s", entry["epoch_s"], "s per epoch (median)")
        figures.add(f"{name}_epoch_ratio_to_baseline", ratio(entry["epoch_s"], base_epoch), "epoch time/baseline's")
        images = [x for r in runs for x in r["images"]]
        figures.add(f"{name}_fresh_images_per_epoch", median(images) if images else None, "sampled per epoch")
        figures.add(f"{name}_best_reward", max(r["best_reward"] for r in runs), "")
        figures.add(f"{name}_peak_mem_mib", mib(max(r["peak_bytes"] or 0 for r in runs)), meter.kind)
    return {"figures": figures, "details": details}


def earlier_baseline(path: str, settings: dict, machine: dict) -> dict:
    """The baseline's entry of an earlier `bench learn --output` file (`--baseline-from`), refused unless that run had
    these settings (the same model, reward, target, epochs, evaluation, seeds and shared settings, and the same
    baseline overrides) on this kind of machine (device, GPU, torch threads, dtype: what its CPU seconds depend on)."""
    import json

    try:
        with open(path) as f:
            earlier = json.load(f)
        earlier_settings, entry = earlier["settings"], earlier["details"][BASELINE]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BenchError(f"--baseline-from {path}: not a `bench learn --output` file with a baseline ({e})") from None
    if earlier.get("benchmark") != "learn":
        raise BenchError(f"--baseline-from {path}: a `bench {earlier.get('benchmark')}` file, not `bench learn`")
    differing = [key for key in ("model", "reward", "target", "max_epochs", "window", "eval_images", "seeds", "shared")
                 if earlier_settings.get(key) != settings.get(key)]
    if earlier_settings.get("configs", {}).get(BASELINE) != settings["configs"][BASELINE]:
        differing.append(f"configs.{BASELINE}")
    values = {key: (earlier_settings.get(key), settings.get(key)) for key in differing}
    for key in ("device", "gpu", "torch_threads", "dtype"):
        there, here = earlier.get("machine", {}).get(key), machine.get(key)
        if there != here:
            differing.append(f"machine.{key}")
            values[f"machine.{key}"] = (there, here)
    if differing:
        shown = "; ".join(f"{key}: {there!r} there, {here!r} here" for key, (there, here) in values.items()
                          if not key.startswith("configs."))
        raise BenchError(f"--baseline-from {path}: ran with other settings ({', '.join(differing)}"
                         + (f"; {shown}" if shown else "") + ")")
    return entry


def median_reached(runs: List[dict], key: str):
    """The median over seeds, counting a run that did not reach the target as infinitely slow (None if most
    did not)."""
    values = sorted(r[key] if r["reached"] else math.inf for r in runs)
    value = values[(len(values) - 1) // 2]
    return None if math.isinf(value) else value


def median_lower_bound(runs: List[dict], key: str):
    """A lower bound of the median time to target (`key`: `cpu_to_target_s` or `time_to_target_s`) when runs missed the
    target: a missed run counts as the time it ran (`cpu_s`, `elapsed_s`), which it would have needed more than. The
    median itself where `median_reached` has one; None where a missed run has no time recorded."""
    ran = {"cpu_to_target_s": "cpu_s", "time_to_target_s": "elapsed_s"}[key]
    if any(not r["reached"] and r.get(ran) is None for r in runs):
        return None
    values = sorted(r[key] if r["reached"] else r[ran] for r in runs)
    return values[(len(values) - 1) // 2]


def _evaluator(trainer, prompts: List[str], reward_fn, seed: int, guidance_scale: float, num_steps: int):
    """Mean reward of the current policy on fixed prompts and seeds (the same images for an unchanged policy), with
    the shared CFG scale and number of steps whatever the configuration samples its training images with, so that
    every configuration is judged by the same sampler. With `ema_decay` the policy judged is the EMA of the weights,
    as in the trainer's own evaluations and saved result."""
    import torch

    from diffalign.rollout import sample_trajectories

    config = trainer.config

    @torch.no_grad()
    def evaluate() -> float:
        trainer.denoiser.eval()
        generator = torch.Generator(trainer.device).manual_seed(seed + 12345)
        scores = []
        with trainer.ema_weights():  # a no-op without ema_decay
            for start in range(0, len(prompts), config.sample_batch_size):
                chunk = prompts[start : start + config.sample_batch_size]
                with trainer.accelerator.autocast():
                    images = sample_trajectories(
                        trainer.family, chunk, num_steps, guidance_scale,
                        height=trainer.resolution, width=trainer.resolution, generator=generator,
                        denoiser=trainer.denoiser, kernel=trainer.kernel,
                    ).images
                scores.append(torch.as_tensor(reward_fn(images, chunk, None), dtype=torch.float32).reshape(-1).cpu())
        return torch.cat(scores).mean().item()

    return evaluate


def _learn_one(trainer, target: float, max_epochs: int, window: int, evaluate=None, progress: str = None) -> dict:
    """Epochs until the (windowed) reward reaches `target`.

    Times are wall seconds and CPU seconds of the process (`time.process_time`: with one torch thread, the seconds
    of one core, which a loaded machine does not change much). Without `evaluate` the reward of an epoch is
    `reward_mean` of its own samples, and the time counts every full
    epoch before plus the sampling and scoring of the epoch whose samples reach it (its update is not needed). With
    `evaluate` (fixed prompts and seeds, untimed) the policy is judged before training and after each epoch, and the
    time counts the full epochs up to the one after which it reaches the target.

    `progress`: the label of a tqdm bar (on stderr) of the run's epochs and its latest reward, which stays when the
    run ends (a long benchmark shows where it is; its log keeps each run's last state); None: no bar.
    """
    from tqdm.auto import tqdm

    elapsed, cpu, rewards, epoch_times, train_rewards, images = 0.0, 0.0, [], [], [], []
    sampling = 0.0  # wall seconds of sampling and scoring among `elapsed`
    diagnostics = {}  # per-epoch update statistics, to see what happened when a curve falls

    def reached(values):
        return sum(values[-window:]) / len(values[-window:]) >= target

    def result(ok, epochs):
        out = {"reached": ok, "epochs_to_target": epochs, "time_to_target_s": elapsed if ok else None,
               "cpu_to_target_s": cpu if ok else None, "sampling_share": sampling / elapsed if elapsed else None,
               "rewards": rewards, "epoch_times": epoch_times, "images": images, "best_reward": max(rewards),
               "elapsed_s": elapsed, "cpu_s": cpu, "diagnostics": diagnostics}
        if evaluate is not None:
            out["train_rewards"] = train_rewards
        return out

    bar = tqdm(total=max_epochs, desc=progress, unit="epoch", disable=progress is None)

    def finish(ok, epochs):
        bar.set_postfix(reward=f"{rewards[-1]:.4f}", target="reached" if ok else "missed", refresh=False)
        bar.close()
        return result(ok, epochs)

    if evaluate is not None:
        rewards.append(evaluate())
        if reached(rewards):
            return finish(True, 0)
    for epoch in range(max_epochs):
        start, start_cpu = time.perf_counter(), time.process_time()
        metrics = trainer.step(epoch)
        wall, epoch_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        sampled = metrics["time_sample"] + metrics["time_reward"]
        epoch_times.append(wall)
        images.append(metrics["images"])  # fresh images sampled this epoch
        for key in ("loss", "approx_kl", "clipfrac", "grad_norm", "implicit_reward_error", "log_ratio_to_old"):
            if key in metrics:
                diagnostics.setdefault(key, []).append(metrics[key])
        if evaluate is None:
            rewards.append(metrics["reward_mean"])
        else:
            train_rewards.append(metrics["reward_mean"])
            rewards.append(evaluate())
        bar.update()
        bar.set_postfix(reward=f"{rewards[-1]:.4f}")
        if evaluate is None and reached(rewards):
            elapsed += sampled
            cpu += epoch_cpu * sampled / wall  # the CPU time of the epoch's sampling, at the epoch's CPU/wall rate
            sampling += sampled
            return finish(True, epoch + 1)
        elapsed, cpu, sampling = elapsed + wall, cpu + epoch_cpu, sampling + sampled
        if reached(rewards):
            return finish(True, epoch + 1)
    return finish(False, None)


