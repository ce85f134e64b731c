"""Checkpoints of a training run: save, resume and the RNG state, for every engine and process count.

`Checkpointer` is handed what it needs (the accelerator and the run's config; the model, optimizer and schedule per
call), so it imports nothing of the trainer (an object, not a mixin: no import cycle with `trainers.base`)."""

import contextlib
import logging
import random
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

from ..checkpoint import CheckpointError, load_resumable, save_checkpoint
from ..distributed import engine_name, full_parameters, load_optimizer_state, optimizer_state
from ..utils.peft_utils import unwrap

logger = logging.getLogger("diffalign")


def trainable_names(prepared) -> List[str]:
    """The names of the trainable parameters of a (prepared) denoiser."""
    return [n for n, p in unwrap(prepared).named_parameters() if p.requires_grad]


def rng_state() -> dict:
    """The global torch, numpy and Python RNG states, as checkpoint values."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_list(np.random.get_state()),
        "python": random.getstate(),
    }


def set_rng_state(rng: dict):
    torch.set_rng_state(rng["torch"])
    np.random.set_state(_numpy_state_from_list(rng["numpy"]))
    random.setstate(_to_tuple(rng["python"]))


class Checkpointer:
    """Writes and reads a run's checkpoints (`diffalign.checkpoint`: atomic directories with a checksummed manifest).

    Args:
        accelerator (`accelerate.Accelerator`): the run's (process count, engine, main process).
        config (`TrainConfig`): `output_dir`, `checkpoints_total_limit`, `ema_decay` and the config hash a resumed run
            must match.
    """

    def __init__(self, accelerator, config):
        self.accelerator = accelerator
        self.config = config

    def save(self, epoch: int, prepared, optimizer, lr_scheduler, ema, trainer_state: Callable[[], dict]):
        """One checkpoint in the same format for every engine and process count: the weights and the optimizer state
        by parameter name, gathered from the shards when the denoiser is sharded, written by the main process
        (atomically, with a checksummed manifest). `trainer_state()` (called on every process: it may gather) gives
        `trainer.json`. Collective: call it on every process."""
        acc, config = self.accelerator, self.config
        rng = rng_state()
        trainer = trainer_state()  # on every process: it may gather per-process state
        names = trainable_names(prepared)
        model = full_parameters(acc, prepared, names)  # on every process: collective when sharded
        optimizer = optimizer_state(acc, prepared, optimizer)
        if optimizer is None:  # DeepSpeed's partitioned optimizer is not saved (resume starts fresh moments)
            optimizer = {"engine": "deepspeed"}
        if acc.is_main_process:
            states = {
                "model": model,
                "optimizer": optimizer,
                "scheduler": lr_scheduler.state_dict(),
                "rng": rng,
                "trainer": trainer,
            }
            if ema is not None:  # the average of the trained weights, by parameter name (float32)
                states["ema"] = ema.state_dict(trainable_names(prepared))
            save_checkpoint(config.output_dir, epoch, states, config.hash(), config.checkpoints_total_limit)
        acc.wait_for_everyone()

    def load(self, path: str, denoiser) -> Tuple[str, Dict]:
        """Loads the newest usable checkpoint of `path` (every process reads it) and puts its weights into
        `denoiser` before it is prepared; returns `(checkpoint, states)` for `apply`."""
        params = dict(denoiser.named_parameters())
        expected = {n: p for n, p in params.items() if p.requires_grad}
        ema = bool(self.config.ema_decay)

        def check(checkpoint: str, states: dict):
            # what the checkpoint's states must hold before anything is applied; a failure skips to the previous
            # complete checkpoint (or names the problem in one line)
            def bad(what: str):
                return CheckpointError(f"checkpoint '{checkpoint}' does not fit this run: {what}")

            model, trainer = states["model"], states["trainer"]
            if not isinstance(model, dict) or set(model) != set(expected):
                keys = set(model) if isinstance(model, dict) else set()
                raise bad(f"model.safetensors holds {len(keys)} tensors, {len(keys - set(expected))} unknown, "
                          f"{len(set(expected) - keys)} missing (of {len(expected)} trainable)")
            for name, value in model.items():
                if not isinstance(value, torch.Tensor) or value.shape != expected[name].shape:
                    raise bad(f"'{name}' has shape {getattr(value, 'shape', None)}, not {tuple(expected[name].shape)}")
            if not isinstance(trainer, dict):
                raise bad("trainer.json is not a mapping")
            for key in ("epoch", "nonfinite_total", "nonfinite_in_a_row"):
                if not isinstance(trainer.get(key), int) or isinstance(trainer.get(key), bool) or trainer[key] < 0:
                    raise bad(f"trainer.json has no valid '{key}'")
            rng = states["rng"]
            if not isinstance(rng, dict) or not {"torch", "numpy", "python"} <= set(rng):
                raise bad("rng.json lacks the torch, numpy or python state")
            for name in ("optimizer", "scheduler"):
                if not isinstance(states[name], dict):
                    raise bad(f"{name}.json is not a mapping")
            if ema:
                weights = states["ema"].get("weights") if isinstance(states["ema"], dict) else None
                if not isinstance(weights, dict) or set(weights) != set(expected) or any(
                        getattr(weights[n], "shape", None) != expected[n].shape for n in expected):
                    raise bad("ema.safetensors does not hold the EMA of every trainable weight")

        names = ["model", "optimizer", "scheduler", "rng", "trainer"] + (["ema"] if ema else [])
        checkpoint, manifest, states = load_resumable(
            path, names, config_hash=self.config.accepted_hashes(), check=check,
            finite=["model", "optimizer", "scheduler"] + (["ema"] if ema else []),
        )
        with self.applying(checkpoint):
            with torch.no_grad():
                for name, value in states["model"].items():
                    params[name].data.copy_(value)
        return checkpoint, states

    @contextlib.contextmanager
    def applying(self, checkpoint: str):
        """Context in which a checkpoint's states are applied: a failure is one line naming the checkpoint."""
        try:
            yield
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise CheckpointError(f"checkpoint '{checkpoint}' cannot be applied to this run: {type(e).__name__}: "
                                  f"{detail}") from e

    def apply(self, checkpoint: str, states: dict, prepared, optimizer, lr_scheduler) -> dict:
        """Puts the optimizer state (each process takes its shard), the LR schedule and the RNG state of a loaded
        checkpoint in place; returns its trainer state (`trainer.json`). Call it inside `applying`."""
        saved = states["optimizer"]
        if engine_name(self.accelerator) == "deepspeed" or "param_groups" not in saved:
            logger.warning("checkpoint '%s': the optimizer state is not restored under DeepSpeed (fresh Adam "
                           "moments)", checkpoint)
        else:
            optimizer.state_dict()  # materialise accelerate's wrapper before loading
            load_optimizer_state(self.accelerator, prepared, optimizer, saved)
        lr_scheduler.load_state_dict(states["scheduler"])
        set_rng_state(states["rng"])
        return states["trainer"]


def _numpy_state_to_list(state) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _numpy_state_from_list(state) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, cached


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value
