"""Training objectives as pure functions: of per-step log-probabilities (DDPO/GRPO, PRDP) and of forward-process
predictions on final samples (DiffusionNFT).

All log-probabilities follow the project's convention (see `diffalign.logprob`): the Gaussian log-density of a
denoising transition averaged over latent dimensions, float32. The forward-process losses take model outputs at
forward-noised final samples (see `diffalign.forward_process`).
"""

from typing import Dict, Optional

import torch

from .forward_process import prediction_to_x0


def ppo_clipped_loss(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> Dict[str, torch.Tensor]:
    """DDPO's clipped surrogate (Black et al. 2023, Eq. 4 with PPO clipping; Schulman et al. 2017).

    With the per-step ratio `rho = exp(log pi_theta(x_{t-1}|x_t) - log pi_old(x_{t-1}|x_t))`:

        L = mean( max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) )

    Args:
        log_probs (`torch.Tensor`): `log pi_theta`, any shape (one entry per sample and step).
        old_log_probs (`torch.Tensor`): `log pi_old` recorded at sampling, same shape.
        advantages (`torch.Tensor`): `A`, same shape (broadcast a per-sample advantage over its steps).
        clip_range (`float`): `eps`; 1e-4 in DDPO, tiny because log-probs are per-dimension means.

    Returns:
        `dict` with `loss` (scalar, differentiable), `approx_kl` (`0.5 mean((log rho)^2)`) and `clipfrac`
        (fraction of entries whose ratio left `[1 - eps, 1 + eps]`).
    """
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        approx_kl = 0.5 * (log_ratio**2).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean()
    return {"loss": loss, "approx_kl": approx_kl, "clipfrac": clipfrac}


def prdp_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    beta: float,
    clip_eps: float,
) -> torch.Tensor:
    """Proximal reward-difference prediction loss (Deng et al., CVPR 2024, Eq. 14 with §3.3 and Appendix G).

    Per step t of trajectory i, the implicit reward is the log-ratio to the reference policy, clipped to within
    `eps` of its value under the sampling snapshot theta_old:

        r_hat_{i,t}      = log pi_theta(x_{t-1}|x_t) - log pi_ref(x_{t-1}|x_t)
        r_hat^clip_{i,t} = clip(r_hat_{i,t}, r_hat^old_{i,t} - eps, r_hat^old_{i,t} + eps)
        r_hat_i          = mean_t r_hat_{i,t}            (mean over steps, as in Appendix G)

    For every ordered pair (a, b) from the same group (prompt) with `r_a - r_b > 0` (ties dropped):

        l_ab = max( (r_hat_a - r_hat_b - (r_a - r_b) / beta)^2, (r_hat^clip_a - r_hat^clip_b - (r_a - r_b) / beta)^2 )

    and the loss is the mean of `l_ab` over all counted pairs of the batch.

    Args:
        log_probs (`torch.Tensor`): `(B, T)` `log pi_theta`, differentiable.
        old_log_probs (`torch.Tensor`): `(B, T)` `log pi_theta_old`, recorded at sampling time.
        ref_log_probs (`torch.Tensor`): `(B, T)` `log pi_ref` (base model).
        rewards (`torch.Tensor`): `(B,)`.
        group_ids (`torch.Tensor`): `(B,)`, equal for images of the same prompt.
        beta (`float`): KL weight; targets are reward differences divided by beta.
        clip_eps (`float`): per-step clip `eps` of the log-ratio around its theta_old value.

    Returns:
        Scalar loss; `0 * log_probs.sum()` (zero with a gradient path) when no pair counts.
    """
    log_ratio = log_probs - ref_log_probs
    old_log_ratio = (old_log_probs - ref_log_probs).detach()
    clipped_log_ratio = torch.maximum(torch.minimum(log_ratio, old_log_ratio + clip_eps), old_log_ratio - clip_eps)
    implicit = log_ratio.mean(dim=1)  # (B,)
    implicit_clipped = clipped_log_ratio.mean(dim=1)  # (B,)

    rewards = rewards.to(log_probs.device, torch.float32)
    group_ids = group_ids.to(log_probs.device)
    reward_diff = rewards[:, None] - rewards[None, :]  # (B, B): r_a - r_b
    counted = (group_ids[:, None] == group_ids[None, :]) & (reward_diff > 0)
    if not counted.any():
        return 0.0 * log_probs.sum()
    target = reward_diff / beta
    unclipped_error = (implicit[:, None] - implicit[None, :] - target) ** 2
    clipped_error = (implicit_clipped[:, None] - implicit_clipped[None, :] - target) ** 2
    pair_loss = torch.maximum(unclipped_error, clipped_error)
    return pair_loss[counted].mean()


def implicit_reward_error(
    log_probs: torch.Tensor, ref_log_probs: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor, beta: float
) -> torch.Tensor:
    """Mean absolute error `|delta r_hat - delta r / beta|` over the counted pairs (a PRDP diagnostic)."""
    implicit = (log_probs - ref_log_probs).mean(dim=1)
    rewards = rewards.to(implicit.device, torch.float32)
    reward_diff = rewards[:, None] - rewards[None, :]
    counted = (group_ids[:, None].to(implicit.device) == group_ids[None, :].to(implicit.device)) & (reward_diff > 0)
    if not counted.any():
        return torch.zeros((), device=implicit.device)
    error = (implicit[:, None] - implicit[None, :] - reward_diff / beta).abs()
    return error[counted].mean()


# ----------------------------------------------------------------------------------------------------------------
# Forward-process objectives: functions of model outputs on noised final samples (`diffalign.forward_process`),
# not of per-step log-probabilities.

OPTIMALITY_MODES = ("all", "positive_only", "negative_only", "one_only", "binary")


def optimality_probability(advantages: torch.Tensor, adv_clip_max: float, mode: str = "all") -> torch.Tensor:
    """DiffusionNFT's optimality probability `r` in [0, 1] of each sample, from its advantage.

    With `A` the group-normalised advantage (`diffalign.advantages.group_advantages` with `global_std=True`: the
    prompt's mean, the batch's std, as NVIDIA's `PerPromptStatTracker(global_std=True)`) and `A_max = adv_clip_max`:

        A_clip = clip(A, -A_max, A_max)
        r      = clip(A_clip / (2 A_max) + 1/2, 0, 1)

    so an average sample has `r = 1/2` (equal weight on the positive and negative objectives). `mode` reshapes
    `A_clip` first, as NVIDIA's `train.adv_mode` (scripts/train_nft_sd3.py:915-925): `"all"` keeps it,
    `"positive_only"` / `"negative_only"` zero the other sign, `"one_only"` maps it to 1 where positive and 0
    elsewhere, `"binary"` to its sign. Both map before the normalisation, as NVIDIA's code does, so `"binary"` gives
    `r` in `{1/2 - 1/(2 A_max), 1/2, 1/2 + 1/(2 A_max)}`, not {0, 1}.

    Args:
        advantages (`torch.Tensor`): `A`, any shape (one per sample).
        adv_clip_max (`float`): `A_max > 0`; NVIDIA's default is 5 (config/base.py:84).
        mode (`str`, *optional*, defaults to `"all"`): one of `OPTIMALITY_MODES`.

    Returns:
        `r`, shaped and typed like `advantages`.
    """
    if mode not in OPTIMALITY_MODES:
        raise ValueError(f"unknown optimality mode '{mode}': expected one of {', '.join(OPTIMALITY_MODES)}")
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}")
    clipped = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    if mode == "positive_only":
        clipped = torch.clamp(clipped, 0, adv_clip_max)
    elif mode == "negative_only":
        clipped = torch.clamp(clipped, -adv_clip_max, 0)
    elif mode == "one_only":
        clipped = torch.where(clipped > 0, torch.ones_like(clipped), torch.zeros_like(clipped))
    elif mode == "binary":
        clipped = torch.sign(clipped)
    return torch.clamp((clipped / adv_clip_max) / 2.0 + 0.5, 0, 1)


def _adaptive_x0_loss(x0_prediction: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    # `||x0_hat - x0||^2 / w` per sample with `w = max(mean |x0_hat - x0|, 1e-5)` a constant (no gradient), in float64
    # like NVIDIA's code: its float64 weight promotes the quotient, so the per-sample loss is float64 too.
    dims = tuple(range(1, x0.ndim))
    with torch.no_grad():
        weight = torch.abs(x0_prediction.double() - x0.double()).mean(dim=dims, keepdim=True).clip(min=0.00001)
    return ((x0_prediction - x0) ** 2 / weight).mean(dim=dims)


def nft_loss(
    model_output: torch.Tensor,
    old_model_output: torch.Tensor,
    ref_model_output: Optional[torch.Tensor],
    noisy_sample: torch.Tensor,
    x0: torch.Tensor,
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
    optimality: torch.Tensor,
    beta: float,
    adv_clip_max: float,
    kl_weight: float,
    prediction_type: str = "flow_velocity",
) -> Dict[str, torch.Tensor]:
    """DiffusionNFT's negative-aware fine-tuning loss (Zheng et al. 2025, arXiv 2509.16117), as NVIDIA's code.

    A final sample `x0` (from any solver, no log-probabilities) is noised to `x_t = alpha_t x0 + sigma_t eps`
    (`diffalign.forward_process.add_noise`). With `v_theta` the trained model's output there, `v_old` the old
    (sampling) policy's and `v_ref` the base model's, the implicit positive and negative policies are

        v+ = beta v_theta + (1 - beta) v_old
        v- = (1 + beta) v_old - beta v_theta

    and each is read as a clean-sample estimate `x0_hat(v)` (`prediction_to_x0`; `x_t - s v` for a flow). The loss is

        l(v)  = mean ||x0_hat(v) - x0||^2 / sg(max(mean |x0_hat(v) - x0|, 1e-5))      (adaptive x0-space weight)
        L     = A_max mean_i [ r_i l_i(v+) + (1 - r_i) l_i(v-) ] / beta  +  lambda_KL mean_i mean (v_theta - v_ref)^2

    with `r` the optimality probability (`optimality_probability`), `A_max = adv_clip_max` and `sg` stop-gradient:
    a high-reward sample pulls `v+` (so `v_theta`) towards its `x0`; a low-reward one pulls `v-` towards it, which
    pushes `v_theta` away from it, past `v_old`. The weight makes each sample's term scale-free: its gradient in
    `x0_hat`, `2 (x0_hat - x0) / (D mean |x0_hat - x0|)` over `D` elements, is of order 1/D whatever the error's size.

    Every family uses the same loss: mixtures commute with `prediction_to_x0` (affine in the output), so for an
    epsilon or v model `v` stands for its epsilon or v output. The KL term is measured on raw outputs, as in the
    reference, so `kl_weight` is not comparable across prediction types. Matches NVIDIA's
    `scripts/train_nft_sd3.py:908-978` (commit 24af555) in value and gradient (tests/test_nft_math.py).

    Args:
        model_output (`torch.Tensor`): `v_theta(x_t)`, `(B, ...)`, differentiable.
        old_model_output (`torch.Tensor`): `v_old(x_t)`, the old policy (NVIDIA: a second LoRA adapter "old").
        ref_model_output (`torch.Tensor` or `None`): `v_ref(x_t)`, the base model (adapters disabled); `None` drops
            the KL term (then `kl_weight` must be 0).
        noisy_sample (`torch.Tensor`): `x_t`.
        x0 (`torch.Tensor`): the clean final sample.
        alpha_t, sigma_t (`torch.Tensor`): the forward-process coefficients of `x_t`, `(B, 1, ..., 1)`
            (`flow_schedule` / `vp_schedule`).
        optimality (`torch.Tensor`): `r`, `(B,)`.
        beta (`float`): `beta > 0`, the step from the old policy (NVIDIA's `config.beta`: 1.0, 0.1 for OCR).
        adv_clip_max (`float`): `A_max`, the scale of the policy term (NVIDIA multiplies by it, config/base.py:84).
        kl_weight (`float`): `lambda_KL` (NVIDIA's `config.train.beta`, 1e-4).
        prediction_type (`str`, *optional*, defaults to `"flow_velocity"`): what the model outputs
            (`diffalign.forward_process.PREDICTION_TYPES`).

    Returns:
        `dict` with `loss` (scalar, differentiable; float64 like the reference), and detached statistics:
        `policy_loss` (the first term), `kl` (`mean (v_theta - v_ref)^2`, 0 without a reference), `old_deviation`
        (`mean (v_theta - v_old)^2`) and `old_kl` (`mean (v_old - v_ref)^2`).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if ref_model_output is None and kl_weight != 0:
        raise ValueError(f"kl_weight is {kl_weight} but no reference output was given")
    old_model_output = old_model_output.detach()
    positive_output = beta * model_output + (1 - beta) * old_model_output
    negative_output = (1.0 + beta) * old_model_output - beta * model_output
    positive_loss = _adaptive_x0_loss(
        prediction_to_x0(positive_output, noisy_sample, alpha_t, sigma_t, prediction_type), x0)
    negative_loss = _adaptive_x0_loss(
        prediction_to_x0(negative_output, noisy_sample, alpha_t, sigma_t, prediction_type), x0)
    per_sample = optimality * positive_loss / beta + (1.0 - optimality) * negative_loss / beta
    policy_loss = (per_sample * adv_clip_max).mean()

    dims = tuple(range(1, model_output.ndim))
    loss = policy_loss
    if ref_model_output is not None:
        ref_model_output = ref_model_output.detach()
        kl = ((model_output - ref_model_output) ** 2).mean(dim=dims).mean()
        loss = loss + kl_weight * kl
    with torch.no_grad():
        stats = {
            "policy_loss": policy_loss.detach(),
            "kl": kl.detach() if ref_model_output is not None else torch.zeros((), device=model_output.device),
            "old_deviation": ((model_output - old_model_output) ** 2).mean(),
            "old_kl": (((old_model_output - ref_model_output) ** 2).mean() if ref_model_output is not None
                       else torch.zeros((), device=model_output.device)),
        }
    return {"loss": loss, **stats}


# ----------------------------------------------------------------------------------------------------------------
# GRPO-Guard: the PPO surrogate of `ppo_clipped_loss` with a normalised ratio, for Flow-GRPO's SDE steps.

def ratio_norm_ppo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    means: torch.Tensor,
    old_means: torch.Tensor,
    std: torch.Tensor,
    dt: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
) -> Dict[str, torch.Tensor]:
    """GRPO-Guard's regulated clipping (Wang et al. 2025, "GRPO-Guard: Mitigating Implicit Over-Optimization in Flow
    Matching via Regulated Clipping", arXiv 2510.22319): RatioNorm and the per-step gradient reweighting.

    A Flow-GRPO step samples `x' ~ N(mu_old, s^2 I)` with `s = sigma_t sqrt(dt)` (`dt` the step's length, `-dt` in
    `flow_step_dt`'s sign). With `d = mu_theta - mu_old`, the log ratio (a mean over the latent's dimensions) is
    `log rho = mean(eps * d) / s - mean(d^2) / (2 s^2)`, `eps ~ N(0, I)`: its mean `-b` is below 0 and its spread
    grows as `1 / s`, so PPO's clip, centred on 1, lets most positive-advantage samples through unclipped and clips
    steps unevenly. RatioNorm removes the bias and rescales the spread:

        b_t        = mean (mu_theta - mu_old)^2 / (2 s_t^2)              (the ratio's mean bias)
        rho_hat_t  = exp( s_t (log pi_theta - log pi_old + b_t) )        (normalised ratio, centred on 1)
        L          = mean_{i,t} (1 / dt_t) max(-A_i rho_hat_t, -A_i clip(rho_hat_t, 1 - eps, 1 + eps))

    and the `1 / dt_t` weight equalises the gradient of the steps. Matches the GRPO-Guard reference
    (`scripts/train_sd3_GRPO_Guard.py:909-932` of `yifan123/flow_grpo`, `config.rationorm = True`) in value and
    gradient when the rows share one step, as the reference's do; here `s_t` and `dt_t` are per row, so a micro-batch
    may mix steps (tests/test_grpo_guard.py). Like the reference, `approx_kl` is that of the raw ratio and `clipfrac`
    that of the normalised one.

    Args:
        log_probs (`torch.Tensor`): `(N,)` `log pi_theta` of the rows (per-dimension means, differentiable).
        old_log_probs (`torch.Tensor`): `(N,)` `log pi_old`, recorded at sampling.
        means (`torch.Tensor`): `(N, ...)` `mu_theta`, the step means under the trained weights (differentiable).
        old_means (`torch.Tensor`): `(N, ...)` `mu_old`, the step means recorded at sampling.
        std (`torch.Tensor`): the transition std `s_t = sigma_t sqrt(dt_t)`, `(N, 1, ...)` or `(N,)`.
        dt (`torch.Tensor`): `(N,)` the step length `dt_t > 0` (the reference's `sqrt_dt ** 2`).
        advantages (`torch.Tensor`): `(N,)` `A` (already clipped).
        clip_range (`float`): `eps`; the authors use 2e-6 to 4e-6 on SD3.5-M (config/grpo_guard.py).

    Returns:
        `dict` with `loss` (scalar, differentiable), `approx_kl` (`0.5 mean (log rho)^2`), `clipfrac` (fraction of
        rows whose normalised ratio left `[1 - eps, 1 + eps]`) and `ratio_bias` (`mean b_t`, detached).
    """
    std = std.reshape(-1).float()
    dt = dt.reshape(-1).float()
    dims = tuple(range(1, means.ndim))
    log_ratio = log_probs - old_log_probs
    bias = (means.float() - old_means.float()).pow(2).mean(dim=dims) / (2 * std**2)
    ratio = torch.exp((log_ratio + bias) * std)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = (torch.maximum(unclipped, clipped) / dt).mean()
    with torch.no_grad():
        approx_kl = 0.5 * (log_ratio**2).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean()
    return {"loss": loss, "approx_kl": approx_kl, "clipfrac": clipfrac, "ratio_bias": bias.detach().mean()}
