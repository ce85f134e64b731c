"""`bench train`: epoch time of each trainer against its denoiser passes replayed alone."""

import contextlib
import os
import tempfile
import time
from typing import Dict


from .common import (
    BenchError,
    Figures,
    PeakMemory,
    median,
    mib,
    ratio,
    sync,
)


# Settings of the `train` benchmark's trainers beyond the shared ones (the trainers' own defaults otherwise).
TRAIN_CONFIGS: Dict[str, tuple] = {
    "prdp": ("prdp", {}),
    "ddpo": ("ddpo", {}),
}


# ------------------------------------------------------------------------------------------------------ train
class _UNetFloor:
    """Replays the UNet calls of one epoch of `trainer` on random tensors (same batch shapes, same module, same
    autocast and train/eval modes), with nothing else around them."""

    def __init__(self, trainer, num_samples: int, seed: int = 0):
        import torch

        self.trainer = trainer
        config = trainer.config
        self.config = config
        self.denoiser = trainer.denoiser
        self.family = trainer.family
        self.num_samples = num_samples
        self.cfg = config.sample_guidance_scale != 1.0
        generator = torch.Generator().manual_seed(seed)
        # the conditioning of one prompt, repeated: its values do not change the cost of a forward
        self.conditioning, _ = trainer.family.conditioning(["x"], "", False, trainer.resolution, trainer.resolution)
        self.timesteps = trainer.family.set_timesteps(config.sample_num_steps, trainer.device, trainer.resolution,
                                                      trainer.resolution)
        self.generator = generator
        self.reference = trainer.needs_reference()
        self.plan = self._plan()

    def _inputs(self, rows: int):
        import torch

        dtype, device = self.trainer.weight_dtype, self.trainer.device
        n = 2 * rows if self.cfg else rows
        # the family's own latents (FLUX's are packed), drawn on the CPU as the generator is
        resolution = self.trainer.resolution
        x = self.family.prepare_latents(n, resolution, resolution, torch.float32, "cpu", self.generator,
                                        denoiser=self.denoiser).to(device, dtype)
        e = {k: v.to(device, dtype if v.is_floating_point() else v.dtype).expand(n, *v.shape[1:])
             for k, v in self.conditioning.items()}
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

            import torch

            stochastic = torch.ones(n, config.sample_num_steps, dtype=torch.bool)
            plans = [self.trainer.train_step_plan(stochastic, self.generator)
                     for _ in range(config.train_num_inner_epochs)]
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
                    two_pass = config.train_two_pass
                    if two_pass is None:  # the trainer's default: two passes when the rows exceed one micro-batch
                        two_pass = rows > micro
                    if two_pass:
                        updates.append((rows, [[m] for m in split(rows)]))
                    else:
                        updates.append((0, [split(rows)]))  # one graph over all micro-batches, one backward
        return {"sampling": sampling, "reference": reference, "lazy_reference": lazy_reference, "training": updates}

    def _forward(self, rows: int):
        x, t, e = self._inputs(rows)
        return self.family.forward(self.denoiser, x, t, e)

    def sampling(self):
        import torch

        from diffalign.utils.peft_utils import reference_model

        trainer = self.trainer
        self.denoiser.eval()
        with torch.no_grad(), trainer.accelerator.autocast():
            for rows in self.plan["sampling"]:
                self._forward(rows)
            if self.plan["reference"]:
                module, context = reference_model(trainer.denoiser, trainer.ref_denoiser)
                for rows in self.plan["reference"]:
                    with context():
                        x, t, e = self._inputs(rows)
                        self.family.forward(module, x, t, e)
        sync(trainer.device)

    def training(self):
        import torch

        from diffalign.utils.peft_utils import reference_model

        trainer = self.trainer
        if self.plan["lazy_reference"]:
            self.denoiser.eval()
            module, context = reference_model(trainer.denoiser, trainer.ref_denoiser)
            with torch.no_grad(), trainer.accelerator.autocast(), context():
                for rows in self.plan["lazy_reference"]:
                    x, t, e = self._inputs(rows)
                    self.family.forward(module, x, t, e)
        self.denoiser.train()
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

    from diffalign.utils.peft_utils import unwrap

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

    denoiser = unwrap(trainer.denoiser)
    modules = [denoiser] + ([trainer.ref_denoiser] if trainer.ref_denoiser is not None else [])
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


def run_benchmark(ctx) -> dict:
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


