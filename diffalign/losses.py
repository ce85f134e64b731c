"""Training objectives as pure functions of per-step log-probabilities.

All log-probabilities follow the project's convention (see `diffalign.logprob`): the Gaussian log-density of a
denoising transition averaged over latent dimensions, float32.
"""

from typing import Dict

import torch


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
