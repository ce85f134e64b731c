"""Transition kernels: one denoising step `x_t -> x_{t'}` and the log-probability of the transition it takes.

A kernel wraps the pure functions of `diffalign.logprob` for one scheduler type. Families choose their kernel
(`ModelFamily.kernel_class`); rollouts and trainers only call `step` and `mean_std`, so adding a sampler touches
this file alone. A kernel takes its noise setting as a constructor argument: DDIM's `eta`, the flow SDE's `noise_level`
(a run's `sample_eta`, `sample_noise_level`; `TrainConfig.kernel_kwargs`).

A step is stochastic (an SDE step, with a log-probability) or deterministic (the ODE step of the same scheduler,
no log-probability): the SDE window (Flow-GRPO-Fast, MixGRPO) samples only a few steps stochastically.
"""

import inspect
from typing import Optional, Tuple

import torch

from .logprob import (
    ddim_step_mean_std,
    ddim_step_with_logprob,
    flow_ode_step,
    flow_sde_step_mean_std,
    flow_sde_step_with_logprob,
)


class TransitionKernel:
    """Base class. Subclasses implement `mean_std` (stochastic step) and `deterministic_step` (ODE step)."""

    name = "base"
    scheduler_class = None  # the diffusers scheduler class name the kernel needs

    def mean_std(self, scheduler, model_output, timestep, sample) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def deterministic_step(self, scheduler, model_output, timestep, sample) -> torch.Tensor:
        raise NotImplementedError

    def stochastic_step(self, scheduler, model_output, timestep, sample, generator=None, prev_sample=None):
        """`(prev_sample, log_prob)` of the SDE step (the pure function of `diffalign.logprob`)."""
        raise NotImplementedError

    def step(self, scheduler, model_output, timestep, sample, stochastic: bool = True, generator=None,
             prev_sample: Optional[torch.Tensor] = None):
        """`(prev_sample, log_prob)`; `log_prob` is `None` for a deterministic step.

        A stochastic step samples `N(mean, std^2 I)` with `generator` (or evaluates a given `prev_sample`); the
        log-probability is the Gaussian log-density averaged over non-batch dimensions, in float32.
        """
        if not stochastic:
            return self.deterministic_step(scheduler, model_output, timestep, sample), None
        return self.stochastic_step(scheduler, model_output, timestep, sample, generator, prev_sample)

    @classmethod
    def settings(cls) -> Tuple[str, ...]:
        """The names of the kernel's settings: its constructor's arguments."""
        return tuple(name for name in inspect.signature(cls.__init__).parameters if name != "self")

    @classmethod
    def from_settings(cls, **settings) -> "TransitionKernel":
        """The kernel built from the settings it takes out of `settings`: a run gives the noise of every kernel
        (`eta`, `noise_level`) and its family's kernel takes its own."""
        return cls(**{name: value for name, value in settings.items() if name in cls.settings()})


class DDIMKernel(TransitionKernel):
    """DDIM(eta) (Song et al. 2021, Eq. 12) for epsilon-, v- and sample-predicting UNets; eta 1 is DDPM.

    `step` with the same noise equals `DDIMScheduler.step(..., eta=eta)`, `deterministic_step` equals it with eta 0.
    """

    name = "ddim"
    scheduler_class = "DDIMScheduler"

    def __init__(self, eta: float = 1.0):
        if eta <= 0:
            raise ValueError(f"log-probabilities need a stochastic step: eta must be > 0, got {eta}")
        self.eta = eta

    def mean_std(self, scheduler, model_output, timestep, sample):
        return ddim_step_mean_std(scheduler, model_output, timestep, sample, self.eta)

    def stochastic_step(self, scheduler, model_output, timestep, sample, generator=None, prev_sample=None):
        return ddim_step_with_logprob(scheduler, model_output, timestep, sample, self.eta, prev_sample, generator)

    def deterministic_step(self, scheduler, model_output, timestep, sample):
        mean, _ = ddim_step_mean_std(scheduler, model_output, timestep, sample, 0.0)
        return mean.to(sample.dtype)


class FlowSDEKernel(TransitionKernel):
    """Flow-GRPO's SDE for velocity-predicting flow-matching models (`FlowMatchEulerDiscreteScheduler`).

    The SDE has the marginals of the Euler ODE; `deterministic_step` is that ODE step
    (`FlowMatchEulerDiscreteScheduler.step`).
    """

    name = "flow_sde"
    scheduler_class = "FlowMatchEulerDiscreteScheduler"

    def __init__(self, noise_level: float = 0.7):
        if noise_level <= 0:
            raise ValueError(f"log-probabilities need a stochastic step: noise_level must be > 0, got {noise_level}")
        self.noise_level = noise_level

    def mean_std(self, scheduler, model_output, timestep, sample):
        return flow_sde_step_mean_std(scheduler, model_output, timestep, sample, self.noise_level)

    def stochastic_step(self, scheduler, model_output, timestep, sample, generator=None, prev_sample=None):
        return flow_sde_step_with_logprob(scheduler, model_output, timestep, sample, self.noise_level, prev_sample,
                                          generator)

    def deterministic_step(self, scheduler, model_output, timestep, sample):
        return flow_ode_step(scheduler, model_output, timestep, sample)


def sde_window_mask(num_steps: int, window_size: Optional[int], start: int = 0) -> torch.Tensor:
    """`(num_steps,)` bool: which steps are stochastic. `window_size=None`: all of them; else `window_size` steps from
    `start` (0 gives a fully deterministic rollout)."""
    mask = torch.zeros(num_steps, dtype=torch.bool)
    if window_size is None:
        mask[:] = True
    else:
        mask[start : start + window_size] = True
    return mask
