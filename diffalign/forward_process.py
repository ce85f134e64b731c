"""The forward (noising) process and the conversions between a model's output and its x0 / epsilon predictions.

Forward-process algorithms (DiffusionNFT, AWM, DGPO) train on noised copies of *final* samples, so they need what
reverse-process trainers never do: `x_t` from `x0` and noise, and the model's output read as a clean-sample estimate.
Every family writes its noising the same way (Kingma et al. 2021, "Variational Diffusion Models", notation):

    x_t = alpha_t x0 + sigma_t eps,        eps ~ N(0, I)

with, per family,

    rectified flow (SD3, FLUX):              alpha_t = 1 - s,          sigma_t = s
    variance preserving (SD1.x/2.x, SDXL):   alpha_t = sqrt(abar_t),   sigma_t = sqrt(1 - abar_t)

where `s` in [0, 1] is the flow's noise level (`FlowMatchEulerDiscreteScheduler.sigmas`) and `abar_t` is
`alphas_cumprod[t]` of a `DDPMScheduler` / `DDIMScheduler`. Because `x_t` ties `x0` and `eps` together, a model
output determines both; each prediction type is one linear combination of them:

    "epsilon"        (DDPM, Ho et al. 2020)               output = eps
    "v_prediction"   (Salimans & Ho 2022)                 output = alpha_t eps - sigma_t x0
    "sample"                                              output = x0
    "flow_velocity"  (rectified flow, Liu et al. 2022)    output = eps - x0      (= d x_t / d s)

The first three names are diffusers' `prediction_type` values. All functions are pure and broadcast over any
latent layout `(B, ...)` (image latents `(B, C, H, W)`, FLUX's packed `(B, L, C)`): `alpha_t` and `sigma_t` are shaped
`(B, 1, ..., 1)` by `flow_schedule` / `vp_schedule`.
"""

from typing import Tuple

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_velocity")


def _per_sample(values: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    # (B,) or a scalar -> (B, 1, ..., 1), broadcastable against `sample`.
    values = torch.as_tensor(values, device=sample.device)
    if values.ndim == 0:
        values = values.expand(sample.shape[0])
    return values.reshape(-1, *([1] * (sample.ndim - 1)))


def _check_prediction_type(prediction_type: str):
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type '{prediction_type}': expected one of {', '.join(PREDICTION_TYPES)}")


def flow_schedule(sigma, sample: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """`(alpha_t, sigma_t) = (1 - s, s)` of rectified flow, shaped `(B, 1, ..., 1)` in `sample`'s dtype.

    Args:
        sigma (`float` or `torch.Tensor`): the noise level `s` in [0, 1], a scalar or one per sample: an entry of
            `FlowMatchEulerDiscreteScheduler.sigmas` (SD3 and FLUX feed the transformer `timestep = 1000 s`).
        sample (`torch.Tensor`): any tensor shaped like the latents `(B, ...)`; gives batch size, device and dtype.
    """
    sigma_t = _per_sample(sigma, sample).to(sample.dtype)
    return 1 - sigma_t, sigma_t


def vp_schedule(alphas_cumprod: torch.Tensor, timestep, sample: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """`(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t))` of a DDPM/DDIM schedule, shaped `(B, 1, ..., 1)`.

    Computed in `sample`'s dtype from the table cast to it, as `DDPMScheduler.add_noise` does, so `add_noise` with
    these coefficients is bit-identical to it.

    Args:
        alphas_cumprod (`torch.Tensor`): `(num_train_timesteps,)`, the scheduler's `alphas_cumprod`.
        timestep (`int` or `torch.Tensor`): integer training timesteps, a scalar or one per sample.
        sample (`torch.Tensor`): any tensor shaped like the latents `(B, ...)`.
    """
    alphas_cumprod = alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
    timestep = torch.as_tensor(timestep, device=sample.device).long()
    alpha_bar = _per_sample(alphas_cumprod[timestep], sample)
    return alpha_bar**0.5, (1 - alpha_bar) ** 0.5


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """`x_t = alpha_t x0 + sigma_t eps`: the forward process at one noise level per sample.

    With `flow_schedule` coefficients this is `FlowMatchEulerDiscreteScheduler.scale_noise`; with `vp_schedule`
    ones, `DDPMScheduler.add_noise` / `DDIMScheduler.add_noise`.
    """
    return alpha_t * x0 + sigma_t * noise


def prediction_to_x0(model_output: torch.Tensor, sample: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
                     prediction_type: str) -> torch.Tensor:
    """The clean-sample estimate `x0_hat` that a model output implies at `x_t = sample`.

        epsilon:        x0_hat = (x_t - sigma_t eps_hat) / alpha_t
        v_prediction:   x0_hat = alpha_t x_t - sigma_t v_hat           (needs alpha_t^2 + sigma_t^2 = 1)
        sample:         x0_hat = output
        flow_velocity:  x0_hat = x_t - s v_hat                          (alpha_t = 1 - s, sigma_t = s)

    These are the `pred_original_sample` of `DDIMScheduler.step`/`DDPMScheduler.step` (without clipping or
    thresholding) and of rectified flow. Each is affine in the output, so a mixture `sum_k w_k o_k` of outputs with
    `sum_k w_k = 1` (NFT's implicit policies) maps to the same mixture of estimates.
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    if prediction_type == "v_prediction":
        return alpha_t * sample - sigma_t * model_output
    if prediction_type == "sample":
        return model_output
    return sample - sigma_t * model_output


def prediction_to_epsilon(model_output: torch.Tensor, sample: torch.Tensor, alpha_t: torch.Tensor,
                          sigma_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The noise estimate `eps_hat` that a model output implies at `x_t = sample`.

        epsilon:        eps_hat = output
        v_prediction:   eps_hat = alpha_t v_hat + sigma_t x_t           (needs alpha_t^2 + sigma_t^2 = 1)
        sample:         eps_hat = (x_t - alpha_t x0_hat) / sigma_t
        flow_velocity:  eps_hat = x_t + (1 - s) v_hat
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_t * model_output + sigma_t * sample
    if prediction_type == "sample":
        return (sample - alpha_t * model_output) / sigma_t
    return sample + alpha_t * model_output


def prediction_target(x0: torch.Tensor, noise: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
                      prediction_type: str) -> torch.Tensor:
    """What the model should output for `x_t = add_noise(x0, noise, alpha_t, sigma_t)`: its denoising-loss target.

        epsilon: eps      v_prediction: alpha_t eps - sigma_t x0 (`DDPMScheduler.get_velocity`)
        sample:  x0       flow_velocity: eps - x0 (the target of diffusers' SD3/FLUX training scripts)
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return alpha_t * noise - sigma_t * x0
    if prediction_type == "sample":
        return x0
    return noise - x0


def x0_to_prediction(x0: torch.Tensor, sample: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
                     prediction_type: str) -> torch.Tensor:
    """The model output that implies the clean sample `x0` at `x_t = sample`: the inverse of `prediction_to_x0`.

    The noise is read off the forward process, `eps = (x_t - alpha_t x0) / sigma_t`, then `prediction_target`.
    Undefined at `sigma_t = 0` (a clean sample implies no noise).
    """
    noise = (sample - alpha_t * x0) / sigma_t
    return prediction_target(x0, noise, alpha_t, sigma_t, prediction_type)


# ----------------------------------------------------------------------------------------------------------------
# The slowly-updated "old" policy that samples the rollouts (DiffusionNFT, Zheng et al. 2025, arXiv 2509.16117;
# `NVlabs/DiffusionNFT`, scripts/train_nft_sd3.py `return_decay` and the update at the end of each epoch).

# decay_type -> (flat, rate, cap) of NVIDIA's `return_decay` (scripts/train_nft_sd3.py:169-189).
OLD_POLICY_DECAY_TYPES = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}


def old_policy_decay(step: int, flat: int, rate: float, cap: float) -> float:
    """The weight `eta_i` kept on the old policy after `step` optimizer steps:

        eta_i = 0                                 if i < flat
        eta_i = min(rate (i - flat), cap)         otherwise

    and after each epoch `theta_old <- eta_i theta_old + (1 - eta_i) theta` (`update_old_policy_`). `eta = 0` makes
    the old policy a copy of the current one (on-policy sampling); NVIDIA's presets are `OLD_POLICY_DECAY_TYPES`
    (type 1, `(0, 0.001, 0.5)`, is their default; type 2, `(75, 0.0075, 0.999)`, their OCR preset).
    """
    if step < flat:
        return 0.0
    return min((step - flat) * rate, cap)


@torch.no_grad()
def update_old_policy_(old_parameters, parameters, decay: float):
    """In place: `theta_old <- decay theta_old + (1 - decay) theta` for matching parameter lists (the old adapter's
    and the trained adapter's weights, in the same order)."""
    old_parameters, parameters = list(old_parameters), list(parameters)
    if len(old_parameters) != len(parameters):
        raise ValueError(f"the old policy has {len(old_parameters)} parameters, the policy {len(parameters)}")
    for old, new in zip(old_parameters, parameters):
        old.copy_(old * decay + new * (1.0 - decay))
