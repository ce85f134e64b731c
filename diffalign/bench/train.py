"""`bench train`: epoch time of each trainer against its denoiser passes replayed alone.

The bench does not know how an algorithm plans its updates: it records the denoiser calls of one epoch with torch's
module hooks (input shapes, grad mode, train/eval mode), replays them alone on copies of those inputs (the *floor*),
and splits that epoch's time with the trainer's own per-phase timings (`time_sample`, `time_reward`, `time_train` of
`trainer.step`). Any trainer of `diffalign.trainers.TRAINERS` is benchable as it is.
"""

import time
from typing import Dict, List, Optional

from .common import (
    BenchError,
    Figures,
    PeakMemory,
    median,
    mib,
    ratio,
    sync,
)


# --------------------------------------------------------------------------------------------- tensor helpers
def map_tensors(value, fn):
    """`value` with `fn` applied to every tensor inside nested tuples, lists and dicts (other values kept)."""
    import torch

    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def input_signature(args, kwargs) -> str:
    """What decides the cost of a call: the shapes and dtypes of its tensors and its other arguments."""
    return repr(map_tensors((args, kwargs), lambda t: (tuple(t.shape), str(t.dtype), str(t.device))))


def first_tensor(value):
    """The first tensor of a call's inputs or outputs (a tensor, a tuple, or a diffusers `BaseOutput`)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


# ------------------------------------------------------------------------------------------------ recording
class EpochRecorder:
    """Records one `trainer.step` through public hooks only: torch forward hooks on the denoiser (and the reference
    denoiser, the text encoders and the VAE decoder), gradient hooks for the backward passes through the denoiser,
    and the optimizer's step hooks. With `timed=True` every hooked call is timed (CUDA synchronised around it: a
    breakdown, not a headline time).

    Use as a context manager around one `trainer.step(epoch)`, then `classify(start, metrics)` with the time the step
    began and the metrics it returned.
    """

    def __init__(self, trainer, device, timed: bool = True):
        self.trainer, self.device, self.timed = trainer, device, timed
        self.calls: List[dict] = []  # one per denoiser call: module, template key, rows, grad, training, start, seconds
        self.templates: Dict[tuple, tuple] = {}  # (module index, signature) -> detached copies of (args, kwargs)
        self.seconds: Dict[str, float] = {}
        self.backwards = 0
        self.optimizer_steps = 0
        self._handles = []
        self._backward_start: Optional[float] = None
        self._backward_end: Optional[float] = None
        self._optimizer_start = 0.0

    def _now(self) -> float:
        if self.timed:
            sync(self.device)
        return time.perf_counter()

    def _add(self, key: str, seconds: float):
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    def _close_backward(self):
        if self._backward_start is not None:
            self.backwards += 1
            self._add("backward", max((self._backward_end or self._backward_start) - self._backward_start, 0.0))
            self._backward_start = self._backward_end = None

    # ---- denoiser calls
    def denoisers(self) -> list:
        from diffalign.utils.peft_utils import unwrap

        modules = [unwrap(self.trainer.denoiser)]
        if self.trainer.ref_denoiser is not None:
            modules.append(unwrap(self.trainer.ref_denoiser))
        return modules

    def _hook_denoiser(self, index: int, module):
        import torch

        starts = []

        def before(module, args, kwargs):
            self._close_backward()
            key = (index, input_signature(args, kwargs))
            if key not in self.templates:
                self.templates[key] = map_tensors((args, kwargs), lambda t: t.detach().clone())
            rows = first_tensor((args, kwargs))
            starts.append((key, 0 if rows is None or rows.dim() == 0 else rows.shape[0], self._now()))

        def after(module, args, kwargs, output):
            key, rows, start = starts.pop()
            grad = torch.is_grad_enabled()
            self.calls.append(dict(module=index, key=key, rows=rows, grad=grad, training=module.training,
                                   start=start, seconds=self._now() - start))
            out = first_tensor(output)
            if grad and out is not None and out.requires_grad:
                out.register_hook(self._backward_begins)

        self._handles += [module.register_forward_pre_hook(before, with_kwargs=True),
                          module.register_forward_hook(after, with_kwargs=True)]

    def _backward_begins(self, grad):
        if self._backward_start is None:
            self._backward_start = self._now()
        return grad

    def _parameter_done(self, parameter):
        if self._backward_start is not None:
            self._backward_end = self._now()

    # ---- other parts
    def _hook_timed(self, module, key: str):
        starts = []
        self._handles += [
            module.register_forward_pre_hook(lambda m, a: starts.append(self._now())),
            module.register_forward_hook(lambda m, a, o: self._add(key, self._now() - starts.pop())),
        ]

    def _optimizer_before(self, optimizer, args, kwargs):
        self._close_backward()
        self._optimizer_start = self._now()

    def _optimizer_after(self, optimizer, args, kwargs):
        self.optimizer_steps += 1
        self._add("optimizer_step", self._now() - self._optimizer_start)

    def __enter__(self):
        import torch

        for index, module in enumerate(self.denoisers()):
            self._hook_denoiser(index, module)
        for p in self.trainer.trainable_params:
            self._handles.append(p.register_post_accumulate_grad_hook(self._parameter_done))
        optimizer = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)  # inside accelerate's wrapper
        self._handles += [optimizer.register_step_pre_hook(self._optimizer_before),
                          optimizer.register_step_post_hook(self._optimizer_after)]
        for name, component in self.trainer.pipe.components.items():
            if name.startswith("text_encoder") and isinstance(component, torch.nn.Module):
                self._hook_timed(component, "text_encoding")
        decoder = getattr(getattr(self.trainer.pipe, "vae", None), "decoder", None)
        if isinstance(decoder, torch.nn.Module):
            self._hook_timed(decoder, "vae_decode")
        return self

    def __exit__(self, *exc):
        self._close_backward()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def classify(self, start: float, metrics: dict):
        """Marks each call `sampling` or `training` from the step's own phase timings: `trainer.step` samples, then
        scores, then trains, so a call that began before the scoring ended is a sampling call."""
        training_from = start + metrics["time_sample"] + metrics["time_reward"]
        for call in self.calls:
            call["phase"] = "sampling" if call["start"] < training_from else "training"

    def counts(self) -> dict:
        sampling = [c for c in self.calls if c["phase"] == "sampling"]
        training = [c for c in self.calls if c["phase"] == "training"]
        return {
            "sampling_forwards": len(sampling),
            "sampling_unet_rows": sum(c["rows"] for c in sampling),
            "training_forwards": len(training),
            "training_forward_rows": sum(c["rows"] for c in training),
            "training_backwards": self.backwards,
            "optimizer_steps": self.optimizer_steps,
        }


# ---------------------------------------------------------------------------------------------------- floor
class DenoiserFloor:
    """Replays the recorded denoiser calls of an epoch alone: the same modules, input shapes, train/eval modes, grad
    mode and autocast; a call made with gradients is followed by a backward pass of its output."""

    def __init__(self, trainer, recorder: EpochRecorder):
        self.trainer = trainer
        self.modules = recorder.denoisers()
        self.templates = recorder.templates
        self.calls = [{k: c[k] for k in ("module", "key", "grad", "training", "phase")} for c in recorder.calls]

    def run(self, phase: str):
        import torch

        trainer = self.trainer
        modes = [m.training for m in self.modules]
        for call in self.calls:
            if call["phase"] != phase:
                continue
            module = self.modules[call["module"]]
            module.train(call["training"])
            args, kwargs = self.templates[call["key"]]
            with torch.set_grad_enabled(call["grad"]), trainer.accelerator.autocast():
                output = module(*args, **kwargs)
            if call["grad"]:
                trainer.accelerator.backward(first_tensor(output).float().square().mean())
        for p in trainer.trainable_params:
            p.grad = None
        for module, mode in zip(self.modules, modes):
            module.train(mode)
        sync(trainer.device)


# ---------------------------------------------------------------------------------------------------- bench
def algorithms_to_bench(text: Optional[str]) -> List[str]:
    """`--algorithms`: a comma-separated subset of the registered algorithms (default: all of them)."""
    from diffalign.trainers import TRAINERS

    if not text:
        return list(TRAINERS)
    names = [a.strip() for a in text.split(",") if a.strip()]
    for name in names:
        if name not in TRAINERS:
            raise BenchError(f"--algorithms: unknown '{name}'; choose from {', '.join(TRAINERS)}")
    return names


def run_benchmark(ctx) -> dict:
    import os
    import tempfile

    algorithms = algorithms_to_bench(ctx.args.algorithms)
    if getattr(ctx.args, "reward_latency", None) is not None:
        return run_latency_benchmark(ctx, algorithms)
    reward_fn = None
    if not ctx.is_digits:
        from diffalign.rewards import get_reward

        reward_fn = get_reward("jpeg_compressibility")
    figures, details = Figures(), {}
    ctx.settings.update(model=ctx.model_name, repeats=ctx.repeats, shared=ctx.base_settings())
    meter = PeakMemory(ctx.device)
    with tempfile.TemporaryDirectory(prefix="diffalign-bench-") as tmp:
        for name in algorithms:
            trainer = ctx.make_trainer(name, {}, os.path.join(tmp, name), reward_fn=reward_fn)
            entry = bench_trainer(ctx, trainer, meter)
            entry["config"] = trainer.config.to_dict()
            details[name] = entry
            b = entry["breakdown"]
            figures.add(f"{name}_epoch_s", entry["epoch_s"], "s (median)")
            figures.add(f"{name}_unet_floor_s", entry["floor_s"], "s, denoiser fwd+bwd alone (median)")
            figures.add(f"{name}_epoch_over_unet", entry["ratio"], "epoch/floor (target <= 1.05)")
            figures.add(f"{name}_sampling_over_unet", entry["sampling_ratio"], "time_sample/sampling floor")
            figures.add(f"{name}_training_over_unet", entry["training_ratio"], "time_train/training floor")
            for part in BREAKDOWN_PARTS:
                figures.add(f"{name}_share_{part}", b["shares"].get(part), "fraction of instrumented epoch")
            unet_share = b["shares"].get("unet_sampling", 0.0) + b["shares"].get("unet_training", 0.0)
            figures.add(f"{name}_outside_unet_share", 1.0 - unet_share, "fraction of instrumented epoch")
            figures.add(f"{name}_peak_mem_mib", mib(entry["peak_bytes"]), meter.kind)
            del trainer
    return {"figures": figures, "details": details}


def bench_trainer(ctx, trainer, meter) -> dict:
    """Warm-up epoch; one recorded epoch (the calls to replay and the breakdown); then `repeats` epochs and floors,
    interleaved."""
    device = ctx.device
    epoch = 0
    trainer.step(epoch)  # warm-up: allocations, caches, prompt encodings
    epoch += 1
    with EpochRecorder(trainer, device) as recorder:
        start = time.perf_counter()
        recorded = trainer.step(epoch)
        total = time.perf_counter() - start
    recorder.classify(start, recorded)
    if not recorder.calls:
        raise BenchError(f"{trainer.algorithm}: no denoiser call was seen in an epoch (is the denoiser hooked?)")
    floor = DenoiserFloor(trainer, recorder)
    floor.run("sampling")
    floor.run("training")  # warm-up of the replay
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
            floor.run("sampling")
            middle = time.perf_counter()
            floor.run("training")
            floors_s.append(middle - start)
            floors_t.append(time.perf_counter() - middle)

        for fn in ((run_epoch, run_floor) if r % 2 == 0 else (run_floor, run_epoch)):
            fn()
    epoch_times = [m["time_epoch"] for m in epochs]
    floor_times = [s + t for s, t in zip(floors_s, floors_t)]
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
        "unet_calls": recorder.counts(),
        "breakdown": breakdown(recorder, total, recorded),
        "peak_bytes": max(peaks),
        "num_samples": len(trainer.local_prompts(0)),
    }


BREAKDOWN_PARTS = ("unet_sampling", "unet_training", "text_encoding", "vae_decode", "reward", "optimizer_step",
                   "rest_sampling", "rest_training", "rest_epoch")


def breakdown(recorder: EpochRecorder, total: float, metrics: dict) -> dict:
    """Seconds and shares of the recorded epoch: the denoiser (sampling forwards; training forwards + backwards),
    text encoding, VAE decode, reward, optimizer, and the rest of sampling, of training and of the epoch. The phases
    are the trainer's own `time_sample`, `time_reward` and `time_train`."""
    parts = recorder.seconds
    unet_sampling = sum(c["seconds"] for c in recorder.calls if c["phase"] == "sampling")
    unet_training = sum(c["seconds"] for c in recorder.calls if c["phase"] == "training") + parts.get("backward", 0.0)
    seconds = {
        "unet_sampling": unet_sampling,
        "unet_training": unet_training,
        "text_encoding": parts.get("text_encoding", 0.0),
        "vae_decode": parts.get("vae_decode", 0.0),
        "reward": metrics["time_reward"],
        "optimizer_step": parts.get("optimizer_step", 0.0),
    }
    seconds["rest_sampling"] = metrics["time_sample"] - unet_sampling - seconds["text_encoding"] - seconds["vae_decode"]
    seconds["rest_training"] = metrics["time_train"] - unet_training - seconds["optimizer_step"]
    seconds["rest_epoch"] = total - metrics["time_sample"] - metrics["time_reward"] - metrics["time_train"]
    return {
        "epoch_s": total,
        "seconds": seconds,
        "shares": {k: v / total for k, v in seconds.items()} if total else {},
        "raw": dict(parts),
        "trainer_metrics": {k: v for k, v in metrics.items() if k.startswith("time_")},
    }


# ------------------------------------------------------------------------------------------- reward latency
LATENCY_VARIANTS = ("no_latency", "async", "sync")


def run_latency_benchmark(ctx, algorithms: List[str]) -> dict:
    """`--reward-latency L`: each trainer's epoch with a `remote` reward whose server holds every answer L seconds,
    scored asynchronously (`reward_async`, the default) and synchronously, against the same reward without the
    latency. The servers are `diffalign.rewards.serve`'s, in this process, serving `jpeg_compressibility`; the
    epochs of the three variants are interleaved."""
    import os
    import tempfile
    import threading

    from diffalign.rewards.serve import make_server

    latency = ctx.args.reward_latency
    if not 0 < latency < 3600:
        raise BenchError(f"--reward-latency must be in (0, 3600) seconds; got {latency:g}")
    servers = {"no_latency": make_server("jpeg_compressibility", port=0, device="cpu"),
               "slow": make_server("jpeg_compressibility", port=0, device="cpu", latency=latency)}
    threads = [threading.Thread(target=server.serve_forever, daemon=True) for server in servers.values()]
    for thread in threads:
        thread.start()
    urls = {key: f"http://127.0.0.1:{server.server_address[1]}/score" for key, server in servers.items()}
    variants = {
        "no_latency": dict(reward="remote", reward_kwargs={"url": urls["no_latency"], "retries": 0}),
        "async": dict(reward="remote", reward_kwargs={"url": urls["slow"], "retries": 0, "timeout": latency + 60},
                      reward_async=True),
        "sync": dict(reward="remote", reward_kwargs={"url": urls["slow"], "retries": 0, "timeout": latency + 60},
                     reward_async=False),
    }
    figures, details = Figures(), {}
    ctx.settings.update(model=ctx.model_name, repeats=ctx.repeats, shared=ctx.base_settings(), reward_latency=latency,
                        reward="remote: jpeg_compressibility served by diffalign.rewards.serve --latency")
    try:
        with tempfile.TemporaryDirectory(prefix="diffalign-bench-") as tmp:
            for name in algorithms:
                trainers = {key: ctx.make_trainer(name, overrides, os.path.join(tmp, f"{name}-{key}"))
                            for key, overrides in variants.items()}
                times = epoch_times_interleaved(trainers, ctx.repeats, ctx.device)
                chunks = -(-len(trainers["async"].local_prompts(0)) // trainers["async"].config.sample_batch_size)
                details[name] = {"times": times, "chunks_per_epoch": chunks}
                base = median(times["no_latency"]["time_epoch"])
                figures.add(f"{name}_epoch_s", base, "s (median), reward without latency")
                for key in ("async", "sync"):
                    epoch_s = median(times[key]["time_epoch"])
                    figures.add(f"{name}_{key}_epoch_s", epoch_s, f"s (median), {latency:g} s reward, {key} scoring")
                    figures.add(f"{name}_{key}_over_no_latency", ratio(epoch_s, base),
                                f"epoch with the {latency:g} s reward / without ({chunks} reward calls per epoch)")
                figures.add(f"{name}_async_reward_wait_s", median(times["async"]["time_reward"]),
                            "s (median) the epoch waited for the reward after sampling")
                del trainers
    finally:
        for server in servers.values():
            server.shutdown()
            server.server_close()
    return {"figures": figures, "details": details}


def epoch_times_interleaved(trainers: dict, repeats: int, device) -> Dict[str, Dict[str, List[float]]]:
    """One warm-up epoch per trainer, then `repeats` rounds of one epoch each, the order alternating every round;
    `{variant: {time_epoch: [...], time_sample: [...], time_reward: [...], time_reward_calls: [...]}}`."""
    names = list(trainers)
    for name in names:
        trainers[name].step(0)
    keys = ("time_epoch", "time_sample", "time_reward", "time_reward_calls")
    out = {name: {key: [] for key in keys} for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            metrics = trainers[name].step(r + 1)
            for key in keys:
                out[name][key].append(metrics[key])
    return out
