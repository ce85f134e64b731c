"""A trainer run for the multi-process tests (`tests/test_distributed.py`), on one process or launched with
`accelerate launch` / `torchrun`. With `--fsdp2` the denoiser and the frozen reference are sharded with torch's
`fully_shard` where accelerate's FSDP plugin would shard them (accelerate falls back to DDP on a CPU, torch's FSDP2
runs there with gloo), so the trainer's code runs on DTensor parameters as it does under FSDP on GPUs.

After every epoch each process hashes its trainable weights (full values: gathered from the shards under FSDP2) and
the main process records whether all hashes agree: the cheap rank-divergence check that replaced the trainer's own
fingerprint. The main process writes `<output_dir>/report.json`. Several runs can share one launch (`::`).
"""

import argparse
import hashlib
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

torch.set_num_threads(1)


def fully_shard_denoiser(module):
    """FSDP2 units as accelerate's default wrap policy makes them (the model's `_no_split_modules`), then the root."""
    from torch.distributed.fsdp import fully_shard

    units = set(getattr(module, "_no_split_modules", None) or [])
    for sub in reversed(list(module.modules())):  # children before their parents
        if sub is not module and type(sub).__name__ in units:
            fully_shard(sub)
    fully_shard(module)
    return module


def make_trainer_class(algorithm: str, fsdp2: bool):
    from diffalign.trainers import trainer_class
    base = trainer_class(algorithm)

    class Checked(base):
        def __init__(self, *args, **kwargs):
            self.rank_checks = []
            super().__init__(*args, **kwargs)

        def _prepare_training(self, denoiser, optimizer):
            if not fsdp2:
                return super()._prepare_training(denoiser, optimizer)
            names = {id(p): n for n, p in denoiser.named_parameters()}
            groups = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
            fully_shard_denoiser(denoiser)
            sharded = dict(denoiser.named_parameters())
            for group, group_names in zip(optimizer.param_groups, groups):  # as accelerate's FSDP2 prepare does
                group["params"] = [sharded[n] for n in group_names]
            return denoiser, self.accelerator.prepare(optimizer)

        def _prepare_reference(self, ref_denoiser):
            if not fsdp2:
                return super()._prepare_reference(ref_denoiser)
            return fully_shard_denoiser(ref_denoiser).eval()

        def step(self, epoch, progress=False):
            metrics = super().step(epoch, progress)
            from accelerate.utils import gather_object

            digest = hashlib.sha256()
            for name, param in sorted(self.prepared.named_parameters()):
                if param.requires_grad:  # full values: an all-gather of the shards under FSDP2
                    value = param.detach().full_tensor() if hasattr(param, "full_tensor") else param.detach()
                    digest.update(name.encode())
                    digest.update(value.float().cpu().numpy().tobytes())
            digests = [digest.hexdigest()]
            if self.accelerator.num_processes > 1:
                digests = gather_object(digests)
            self.rank_checks.append({"epoch": epoch, "identical": len(set(digests)) == 1})
            return metrics

    return Checked


def run(argv) -> dict:
    """One run: `ALGORITHM [--fsdp2] [--resume-copy-from-epoch E] [--key value ...]` (config keys as on the CLI).

    With `--resume-copy-from-epoch E`, the finished run is then copied to `<output_dir>-resumed` without the
    checkpoints after epoch E (as if killed after writing it) and resumed to the end by every process."""
    parser = argparse.ArgumentParser()
    parser.add_argument("algorithm")
    parser.add_argument("--fsdp2", action="store_true")
    parser.add_argument("--resume-copy-from-epoch", type=int, default=None)
    args, rest = parser.parse_known_args(argv)
    from diffalign.config import load_config

    config = load_config(args.algorithm, None, {}, rest)
    report = _train(make_trainer_class(args.algorithm, args.fsdp2), config)
    if args.resume_copy_from_epoch is not None:
        import dataclasses
        import shutil

        from accelerate import PartialState

        copy = config.output_dir + "-resumed"
        if PartialState().is_main_process:
            skip = shutil.ignore_patterns(".diffalign.lock", "final", "report*")
            shutil.copytree(config.output_dir, copy, ignore=skip)
            for name in os.listdir(os.path.join(copy, "checkpoints")):
                if int(name.split("-")[-1]) > args.resume_copy_from_epoch:
                    shutil.rmtree(os.path.join(copy, "checkpoints", name))
        PartialState().wait_for_everyone()
        _train(make_trainer_class(args.algorithm, args.fsdp2),
               dataclasses.replace(config, output_dir=copy, resume_from=copy))
    return report


def _train(cls, config) -> dict:
    from diffalign.distributed import engine_name

    trainer = cls(config)
    history = trainer.train(progress=False)
    report = {
        "engine": engine_name(trainer.accelerator),
        "num_processes": trainer.accelerator.num_processes,
        "denoiser_class": type(trainer.prepared).__name__,
        "reference_class": type(trainer.ref_denoiser).__name__ if trainer.ref_denoiser is not None else None,
        "sharded": trainer.sharded,
        "rank_checks": trainer.rank_checks,
        "first_epoch": trainer.first_epoch,
        "metrics": history,
    }
    if trainer.accelerator.is_main_process:
        with open(os.path.join(config.output_dir, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
    trainer.accelerator.wait_for_everyone()
    return report


def main(argv):
    """Several runs in one launch, separated by `::`."""
    groups, current = [], []
    for arg in argv:
        if arg == "::":
            groups.append(current)
            current = []
        else:
            current.append(arg)
    groups.append(current)
    return [run(group) for group in groups]


def brightness(images, prompts, metadata=None):
    """A smooth reward for comparing runs (JPEG sizes move in whole bytes, which turns float noise into jumps)."""
    return images.float().mean(dim=(1, 2, 3)).cpu()


if __name__ == "__main__":
    main(sys.argv[1:])
