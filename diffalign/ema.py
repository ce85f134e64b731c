"""An exponential moving average (EMA) of the trained weights, for grids, evaluation and the saved result.

RL fine-tuning of diffusion models is noisy from step to step; Flow-GRPO evaluates and saves an EMA of its LoRA
weights (decay 0.9, updated every 8 optimizer steps). `ParameterEMA` keeps that average for a list of parameters (the
trainer's `trainable_params`: the LoRA adapter, or the whole denoiser), in float32, on the parameters' device.

The update follows Flow-GRPO's `EMAModuleWrapper` and diffusers' `EMAModel`: after every `update_every`-th optimizer
step `n` (counted from 1), `ema += (1 - d) * (param - ema)` with `d = min(decay, (1 + n) / (10 + n))`, so the average
warms up instead of holding on to the initial weights for long.
"""

import contextlib
from typing import Dict, Iterable, List, Optional

import torch


class ParameterEMA:
    """The EMA of `parameters` (updated in place by the optimizer; the same list is passed to every method).

    Args:
        parameters: the trained parameters, in a fixed order (the order of `state_dict`'s tensors).
        decay (`float`): the EMA decay, in (0, 1).
        update_every (`int`): optimizer steps between two updates of the average.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float, update_every: int = 1):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1); got {decay}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1; got {update_every}")
        self.parameters = list(parameters)
        self.decay = decay
        self.update_every = update_every
        self.optimization_step = 0  # optimizer steps taken so far
        self.shadow: List[torch.Tensor] = [p.detach().to(torch.float32, copy=True) for p in self.parameters]

    def current_decay(self) -> float:
        """The decay of an update at the current step: `min(decay, (1 + n) / (10 + n))`."""
        n = self.optimization_step
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def step(self) -> bool:
        """Counts one optimizer step and, on every `update_every`-th, moves the average towards the parameters.
        Returns whether it did."""
        self.optimization_step += 1
        if self.optimization_step % self.update_every:
            return False
        weight = 1.0 - self.current_decay()
        for average, param in zip(self.shadow, self.parameters):
            average.lerp_(param.detach().to(torch.float32), weight)
        return True

    @torch.no_grad()
    def copy_to(self, parameters: Optional[Iterable[torch.nn.Parameter]] = None):
        """Writes the average into `parameters` (by default the tracked ones)."""
        for param, average in zip(self.parameters if parameters is None else list(parameters), self.shadow):
            param.data.copy_(average)

    @contextlib.contextmanager
    def swapped_in(self):
        """Runs the body with the EMA weights in the tracked parameters, then puts the live (trained) weights back
        bit for bit: evaluation and saving see the average, training goes on from the live weights."""
        with torch.no_grad():
            live = [p.detach().clone() for p in self.parameters]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.parameters, live):
                    param.data.copy_(value)

    def state_dict(self, names: List[str]) -> dict:
        """`{"optimization_step", "decay", "update_every", "weights": {name: fp32 tensor on the CPU}}`, the
        parameters named by `names` (in the order of the tracked list)."""
        if len(names) != len(self.shadow):
            raise ValueError(f"{len(names)} names for {len(self.shadow)} EMA tensors")
        return {"optimization_step": self.optimization_step, "decay": self.decay, "update_every": self.update_every,
                "weights": {name: average.detach().cpu() for name, average in zip(names, self.shadow)}}

    @torch.no_grad()
    def load_state_dict(self, state: dict, names: List[str]):
        """Restores `state_dict(names)` exactly (the step count and every average)."""
        weights: Dict[str, torch.Tensor] = state["weights"]
        if set(weights) != set(names):
            raise ValueError(f"the EMA state holds {len(weights)} tensors, {len(set(weights) - set(names))} unknown, "
                             f"{len(set(names) - set(weights))} missing (of {len(names)} trainable)")
        for name, average in zip(names, self.shadow):
            value = weights[name]
            if value.shape != average.shape:
                raise ValueError(f"EMA '{name}' has shape {tuple(value.shape)}, not {tuple(average.shape)}")
            average.copy_(value)
        step = state["optimization_step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"EMA optimization_step must be a non-negative integer; got {step!r}")
        self.optimization_step = step
