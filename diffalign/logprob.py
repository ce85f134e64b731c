"""Per-step Gaussian log-probabilities of DDIM/DDPM denoising transitions.

Adapted from `kvablack/ddpo-pytorch` (`ddpo_pytorch/diffusers_patch/ddim_with_logprob.py`, MIT), itself
a modification of `diffusers.schedulers.scheduling_ddim.DDIMScheduler.step`. Modifications:
- one timestep per sample (a 1-D `timestep` tensor), gathered from the scheduler's tables;
- the final step uses `final_alpha_cumprod` exactly as `DDIMScheduler.step` does (ddpo-pytorch clamps
  the previous timestep to 0 first, which diverges from diffusers when `set_alpha_to_one=True`);
- the log-density is computed in float32 whatever the model dtype (bf16 log-probs are too coarse for
  PPO ratios around 1 +- 1e-4);
- asking for a log-probability with `eta=0` (a deterministic step, no density) is an error.

**Convention.** The log-probability of a transition is the Gaussian log-density of `x_{t-1}` under
`N(mu_theta(x_t, t), sigma_t^2 I)` **averaged over all non-batch dimensions** (channels and pixels), not
summed: DDPO's convention. Every clip range, KL weight and beta in diffalign is expressed against it.
"""

import math
from typing import List, Optional, Tuple, Union

import torch


def _alphas_cumprod(scheduler, device) -> torch.Tensor:
    # A device copy of the table, kept on the scheduler: a host-to-device copy per step would block a GPU.
    cached = getattr(scheduler, "_diffalign_alphas_cumprod", None)
    if cached is None or cached.device != torch.device(device) or cached.shape != scheduler.alphas_cumprod.shape:
        cached = scheduler.alphas_cumprod.to(device)
        scheduler._diffalign_alphas_cumprod = cached
    return cached


def _per_sample(values: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    # (num_train_timesteps,) table -> (B, 1, 1, ...) broadcastable against `sample`.
    out = values[timestep.to(values.device)]
    return out.reshape(-1, *([1] * (sample.ndim - 1)))


def ddim_step_mean_std(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 1.0):
    """Mean and standard deviation of the DDIM transition `p(x_{t-1} | x_t)` (Song et al. 2021, Eq. 12).

    With `alpha_t` the cumulative product `alphas_cumprod[t]` and `t'` the previous timestep:

        x0_hat  = prediction of x_0 from `model_output` (epsilon, v or sample prediction), clipped if configured
        sigma_t = eta * sqrt((1 - alpha_t') / (1 - alpha_t) * (1 - alpha_t / alpha_t'))
        mu      = sqrt(alpha_t') * x0_hat + sqrt(1 - alpha_t' - sigma_t^2) * eps_hat

    Args:
        scheduler (`DDIMScheduler`): a scheduler on which `set_timesteps` was called.
        model_output (`torch.Tensor`): the (guided) UNet prediction, shaped like `sample`.
        timestep (`int` or `torch.Tensor`): a scalar, or a 1-D tensor with one timestep per sample.
        sample (`torch.Tensor`): `x_t`, shape `(B, C, H, W)`.
        eta (`float`, *optional*, defaults to 1.0): 0 is deterministic DDIM, 1 is DDPM.

    Returns:
        `(mean, std)`: `mean` shaped like `sample`, `std` shaped `(B, 1, 1, 1)`.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("the scheduler has no timesteps: call `scheduler.set_timesteps(num_inference_steps)` first")
    config = scheduler.config
    timestep = torch.as_tensor(timestep, device=sample.device).long()
    if timestep.ndim == 0:
        timestep = timestep.expand(sample.shape[0])
    prev_timestep = timestep - config.num_train_timesteps // scheduler.num_inference_steps

    alphas_cumprod = _alphas_cumprod(scheduler, sample.device)
    alpha_prod_t = _per_sample(alphas_cumprod, timestep, sample)
    alpha_prod_t_prev = torch.where(
        prev_timestep.to(sample.device).reshape(alpha_prod_t.shape) >= 0,
        _per_sample(alphas_cumprod, prev_timestep.clamp(min=0), sample),
        torch.as_tensor(scheduler.final_alpha_cumprod, device=sample.device),
    )
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev

    if config.prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        pred_epsilon = model_output
    elif config.prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
    elif config.prediction_type == "v_prediction":
        pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    else:
        raise ValueError(f"unsupported prediction_type '{config.prediction_type}'")

    if config.thresholding:
        pred_original_sample = scheduler._threshold_sample(pred_original_sample)
    elif config.clip_sample:
        pred_original_sample = pred_original_sample.clamp(-config.clip_sample_range, config.clip_sample_range)

    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** (0.5)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
    return prev_sample_mean, std_dev_t


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """`log N(x; mean, std^2 I)` averaged over all non-batch dimensions, in float32. Shape `(B,)`."""
    x, mean, std = x.float(), mean.float(), std.float()
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """`KL(N(mean, std^2) || N(ref_mean, std^2))` per dimension, averaged over non-batch dimensions. Shape `(B,)`.

    Both policies share the schedule's `std`, so the KL is `(mean - ref_mean)^2 / (2 std^2)`.
    """
    kl = (mean.float() - ref_mean.float()) ** 2 / (2 * std.float() ** 2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: Union[int, torch.Tensor],
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: Optional[torch.Tensor] = None,
    generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step that also returns the log-probability of the transition it takes.

    Samples `x_{t-1} ~ N(mu, sigma_t^2 I)` (see `ddim_step_mean_std`) unless `prev_sample` is given, in which case
    only its log-probability is evaluated (used to recompute the log-probs of a recorded trajectory). With the same
    noise, `prev_sample` equals `DDIMScheduler.step(model_output, t, sample, eta=eta, generator=generator)`.

    Args:
        scheduler (`DDIMScheduler`): a scheduler on which `set_timesteps` was called.
        model_output (`torch.Tensor`): the (guided) UNet prediction.
        timestep (`int` or `torch.Tensor`): a scalar, or a 1-D tensor with one timestep per sample.
        sample (`torch.Tensor`): `x_t`, shape `(B, C, H, W)`.
        eta (`float`, *optional*, defaults to 1.0): noise weight; must be > 0 for the density to exist.
        prev_sample (`torch.Tensor`, *optional*): a recorded `x_{t-1}` whose log-probability to evaluate.
        generator (`torch.Generator` or list, *optional*): noise source when sampling.

    Returns:
        `(prev_sample, log_prob)`: `prev_sample` shaped like `sample` and `log_prob` of shape `(B,)`, the Gaussian
        log-density **averaged over all non-batch dimensions** (DDPO convention), in float32.
    """
    if eta <= 0:
        raise ValueError(f"log-probabilities need a stochastic step: eta must be > 0, got {eta}")
    if prev_sample is not None and generator is not None:
        raise ValueError("pass either `prev_sample` (to evaluate) or `generator` (to sample), not both")
    mean, std = ddim_step_mean_std(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        prev_sample = mean + std * noise
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)
    return prev_sample.type(sample.dtype), log_prob


# ----------------------------------------------------------------------------------------------------------------
# Flow matching (rectified flow): the SDE of Flow-GRPO (Liu et al. 2025, arXiv 2505.05470, Eq. 8-9), adapted from
# `yifan123/flow_grpo` (`flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`, MIT). Modifications: the step index of
# each sample is found with one vectorised lookup instead of `index_for_timestep` per sample; mean and std are exposed
# (`flow_sde_step_mean_std`) so the closed-form KL uses the transition's own std (Flow-GRPO's `train_sd3.py`
# divides by `2 std_dev_t^2`, without the `-dt` factor, so its KL is `-dt` times this one and its beta does not
# carry over); a sampled next latent is returned in the input dtype and its log-prob is that of the rounded value
# (Flow-GRPO returns float32 latents).


def _sigmas(scheduler, device) -> torch.Tensor:
    # A device copy of `scheduler.sigmas`, keyed on the tensor itself: every `set_timesteps` call replaces it, and a
    # new schedule of the same length (another `mu`, shift or custom sigmas) must not reuse the old copy.
    source, cached = getattr(scheduler, "_diffalign_sigmas", (None, None))
    if source is not scheduler.sigmas or cached.device != torch.device(device):
        cached = scheduler.sigmas.to(device=device, dtype=torch.float32)
        scheduler._diffalign_sigmas = (scheduler.sigmas, cached)
    return cached


def flow_step_index(scheduler, timestep, batch_size: int, device) -> torch.Tensor:
    """`(B,)` positions in `scheduler.timesteps` of `timestep` (a scalar or one timestep per sample)."""
    if scheduler.timesteps is None or getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("the scheduler has no timesteps: call `scheduler.set_timesteps(num_inference_steps)` first")
    timesteps = scheduler.timesteps.to(device=device, dtype=torch.float32)
    timestep = torch.as_tensor(timestep, device=device, dtype=torch.float32)
    if timestep.ndim == 0:
        timestep = timestep.expand(batch_size)
    return (timesteps[None, :] - timestep[:, None]).abs().argmin(dim=1)


def flow_sde_step_mean_std(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                           noise_level: float = 0.7):
    """Mean and standard deviation of Flow-GRPO's SDE transition for a velocity-predicting flow model.

    With `sigma` the current noise level, `sigma'` the next one, `dt = sigma' - sigma < 0`, `v` the (guided) velocity
    and `a` the noise level:

        sigma_t = a * sqrt(sigma / (1 - sigma))        (sigma == 1 in the denominator replaced by sigmas[1])
        mu      = x (1 + sigma_t^2 dt / (2 sigma)) + v (1 + sigma_t^2 (1 - sigma) / (2 sigma)) dt
        std     = sigma_t sqrt(-dt)

    The SDE has the same marginals as the Euler ODE `x + v dt` (`FlowMatchEulerDiscreteScheduler.step`), which is
    its `a -> 0` limit. Computed in float32.

    Args:
        scheduler (`FlowMatchEulerDiscreteScheduler`): a scheduler on which `set_timesteps` was called.
        model_output (`torch.Tensor`): the velocity prediction, shaped like `sample`.
        timestep (`float` or `torch.Tensor`): a scalar, or a 1-D tensor with one timestep per sample.
        sample (`torch.Tensor`): `x_t`, shape `(B, ...)`.
        noise_level (`float`, *optional*, defaults to 0.7): `a`.

    Returns:
        `(mean, std)`: `mean` shaped like `sample` (float32), `std` shaped `(B, 1, ...)`.
    """
    device = sample.device
    index = flow_step_index(scheduler, timestep, sample.shape[0], device)
    sigmas = _sigmas(scheduler, device)
    shape = (-1, *([1] * (sample.ndim - 1)))
    sigma = sigmas[index].reshape(shape)
    sigma_next = sigmas[index + 1].reshape(shape)
    dt = sigma_next - sigma
    sigma_max = sigmas[1]
    std_dev_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma)))
    x, v = sample.float(), model_output.float()
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_dev_t * torch.sqrt(-dt)


def flow_ode_step(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
    """The deterministic Euler step `x + v dt` (as `FlowMatchEulerDiscreteScheduler.step`), with per-sample timesteps."""
    index = flow_step_index(scheduler, timestep, sample.shape[0], sample.device)
    sigmas = _sigmas(scheduler, sample.device)
    shape = (-1, *([1] * (sample.ndim - 1)))
    dt = (sigmas[index + 1] - sigmas[index]).reshape(shape)
    # Rounded as `scheduler.step` rounds it (bit-exact in bf16 too): its 0-d `dt` times a bf16 `v` is cast to bf16
    # first and the product is bf16; only the sum with the sample is float32.
    return (sample.float() + dt.to(model_output.dtype) * model_output).to(sample.dtype)


def flow_sde_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: Union[float, torch.Tensor],
    sample: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: Optional[torch.Tensor] = None,
    generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One Flow-GRPO SDE step that also returns the log-probability of the transition it takes.

    Samples `x_{t+dt} ~ N(mu, std^2 I)` (see `flow_sde_step_mean_std`) unless `prev_sample` is given, in which case only
    its log-probability is evaluated. Same convention as `ddim_step_with_logprob`: the Gaussian log-density averaged
    over all non-batch dimensions, in float32.

    Args:
        scheduler (`FlowMatchEulerDiscreteScheduler`): a scheduler on which `set_timesteps` was called.
        model_output (`torch.Tensor`): the (guided) velocity prediction.
        timestep (`float` or `torch.Tensor`): a scalar, or a 1-D tensor with one timestep per sample.
        sample (`torch.Tensor`): `x_t`.
        noise_level (`float`, *optional*, defaults to 0.7): `a`, must be > 0.
        prev_sample (`torch.Tensor`, *optional*): a recorded next latent whose log-probability to evaluate.
        generator (`torch.Generator` or list, *optional*): noise source when sampling.

    Returns:
        `(prev_sample, log_prob)`: `prev_sample` shaped (and typed) like `sample`, `log_prob` of shape `(B,)`.
    """
    if noise_level <= 0:
        raise ValueError(f"log-probabilities need a stochastic step: noise_level must be > 0, got {noise_level}")
    if prev_sample is not None and generator is not None:
        raise ValueError("pass either `prev_sample` (to evaluate) or `generator` (to sample), not both")
    mean, std = flow_sde_step_mean_std(scheduler, model_output, timestep, sample, noise_level)
    if prev_sample is None:
        from diffusers.utils.torch_utils import randn_tensor

        # float32 noise, as Flow-GRPO draws it (it upcasts its inputs): the same generator gives the same sample.
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=torch.float32)
        # Rounded to the latents' dtype *before* its density is taken: the log-prob is then that of the sample that
        # is returned and recorded, and re-evaluating it later gives the same value (with bf16 latents the density
        # of the unrounded sample differs by ~1e-2 at the last steps, far more than a PPO clip range of 1e-4).
        prev_sample = (mean + std * noise).to(sample.dtype)
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)
    return prev_sample.type(sample.dtype), log_prob


def flow_step_dt(scheduler, timestep, batch_size: int, device) -> torch.Tensor:
    """`(B,)` `dt = sigma' - sigma < 0` of the flow step at `timestep` (a scalar or one timestep per sample): the step
    of `flow_sde_step_mean_std`, whose std is `sigma_t sqrt(-dt)`. GRPO-Guard reweights each step's loss by `1 / -dt`
    (`diffalign.losses.ratio_norm_ppo_loss`)."""
    index = flow_step_index(scheduler, timestep, batch_size, device)
    sigmas = _sigmas(scheduler, device)
    return sigmas[index + 1] - sigmas[index]
