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
# Advantage Weighted Matching (Xue et al., arXiv 2509.25050): the model's own denoising loss on forward-noised final
# samples, read as a log-likelihood and weighted by advantages through a PPO-style ratio.

AWM_WEIGHTINGS = ("Uniform", "t", "t**2", "huber", "ghuber")
AWM_LOSS_TYPES = ("exp_first", "sum_first")
AWM_KL_WEIGHTS = ("Uniform", "ELBO")


def awm_log_prob(model_output: torch.Tensor, target: torch.Tensor, time: torch.Tensor, weighting: str = "Uniform",
                 ghuber_power: float = 0.25) -> torch.Tensor:
    """AWM's surrogate log-likelihood of a noised sample: minus its weighted denoising (matching) loss.

    With `o` the model output at `x_t`, `o*` its target there (`diffalign.forward_process.prediction_target`: the
    velocity `eps - x0` for a flow, `eps` for an epsilon model, `alpha_t eps - sigma_t x0` for a v model) and
    `t` in [0, 1] the row's time (the flow's noise level `s`; `timestep / num_train_timesteps` for a DDPM schedule):

        m         = mean (o - o*)^2                                      (float64, over the latent's elements)
        Uniform:    log p = -m            t: -t m          t**2: -t^2 m
        huber:      log p = -t (sqrt(m + 1e-10) - 1e-5)
        ghuber:     log p = -t ((m + 1e-10)^p - 1e-10^p) / p            (p = `ghuber_power`)

    On a flow this is the authors' `compute_log_prob_awm` (scripts/train_sd3_awm.py:234-252, commit be51372), whose
    target is `eps - x0`; on a DDPM-type model the same formula with the model's own target, i.e. its training loss.

    Args:
        model_output (`torch.Tensor`): `o`, `(B, ...)`, differentiable.
        target (`torch.Tensor`): `o*`, same shape.
        time (`torch.Tensor`): `t`, `(B,)`.
        weighting (`str`): one of `AWM_WEIGHTINGS` (the authors' `train.weighting`).
        ghuber_power (`float`): `p > 0` of `"ghuber"` (the authors' `train.ghuber_power`, 0.25).

    Returns:
        `(B,)` float64 log-probabilities.
    """
    if weighting not in AWM_WEIGHTINGS:
        raise ValueError(f"unknown weighting '{weighting}': expected one of {', '.join(AWM_WEIGHTINGS)}")
    error = ((model_output.double() - target.double()) ** 2).mean(dim=tuple(range(1, model_output.ndim)))
    time = time.reshape(-1)
    if weighting == "Uniform":
        return -error
    if weighting == "t":
        return -error * time
    if weighting == "t**2":
        return -error * time**2
    if weighting == "huber":
        return -(torch.sqrt(error + 1e-10) - 1e-5) * time
    floor = torch.pow(torch.tensor(1e-10, device=error.device, dtype=error.dtype), ghuber_power)
    return -(torch.pow(error + 1e-10, ghuber_power) - floor) * time / ghuber_power


def awm_advantages(advantages: torch.Tensor, adv_clip_max: float, advantage_max: Optional[float] = None
                   ) -> torch.Tensor:
    """AWM's advantage weights: `clip(A, -A_clip, A_clip)`, then rescaled to `[-A_max, A_max]` by
    `A_max / A_clip` when `advantage_max` (`A_max`) is given (the authors' `train.adv_clip_max` 5 and
    `train.advantage_max` 1: scripts/train_sd3_awm.py:1293-1299)."""
    clipped = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    if advantage_max is not None:
        clipped = clipped / adv_clip_max * advantage_max
    return clipped


def awm_kl(model_output: torch.Tensor, other_output: torch.Tensor, time: torch.Tensor, weight: str = "Uniform"
           ) -> torch.Tensor:
    """Per-row `mean (o - o_other)^2` on raw outputs (float64), divided by `2 std_t^2` with
    `std_t = 0.7 sqrt(t / (1 - min(t, 0.99)))` for `weight="ELBO"` (the flow SDE's step noise the authors use);
    `(B,)`."""
    if weight not in AWM_KL_WEIGHTS:
        raise ValueError(f"unknown KL weight '{weight}': expected one of {', '.join(AWM_KL_WEIGHTS)}")
    per_row = ((model_output.double() - other_output.double()) ** 2).mean(dim=tuple(range(1, model_output.ndim)))
    if weight == "ELBO":
        time = time.reshape(-1)
        std = torch.sqrt(time / (1 - torch.clamp(time, 0, 0.99))) * 0.7
        per_row = per_row / (2 * std**2)
    return per_row


def awm_loss(
    model_output: torch.Tensor,
    target: torch.Tensor,
    time: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    old_log_prob: Optional[torch.Tensor] = None,
    ref_model_output: Optional[torch.Tensor] = None,
    ema_model_output: Optional[torch.Tensor] = None,
    weighting: str = "Uniform",
    ghuber_power: float = 0.25,
    loss_type: str = "exp_first",
    steps_per_sample: int = 1,
    kl_coef: float = 0.0,
    kl_weight: str = "Uniform",
    ema_kl_coef: float = 0.0,
    ema_kl_weight: str = "Uniform",
) -> Dict[str, torch.Tensor]:
    """Advantage Weighted Matching (Xue et al. 2025, arXiv 2509.25050), as the authors' scripts/train_sd3_awm.py.

    A final sample `x0` (from any solver) is noised to `x_t = alpha_t x0 + sigma_t eps` at time `t`; the model's
    denoising loss there gives the surrogate log-likelihood `log p_theta = awm_log_prob(o_theta, o*, t)` (with the
    paper's flow notation: `-w(t) ||v_theta(x_t, t) - (eps - x0)||^2`). The policy term is PPO's clipped surrogate of
    the ratio `rho = exp(log p_theta - log p_old)` with the clipped advantages `A` (`awm_advantages`):

        exp_first:  rho per row (sample, t),                L_pi = mean_rows max(-A rho, -A clip(rho, 1 - e, 1 + e))
        sum_first:  rho = exp(mean_t log p_theta - mean_t log p_old) per sample, the same max, mean over samples

        L = L_pi + beta_KL mean_rows kl(o_theta, o_base) + beta_EMA mean_rows kl(o_theta, o_ema)      (`awm_kl`)

    On-policy (`old_log_prob=None`) `log p_old = sg(log p_theta)`: `rho = 1` in value and the gradient is
    `-A grad log p_theta`, the advantage-weighted matching loss itself (the authors' default, their `off_policy:
    False`; their clip range 1 then never clips). Off-policy, `log p_old` is the sampling (EMA) policy's at the
    same `x_t`. On a flow (`o* = eps - x0`, `t = s`) this is the authors' loss to float64 rounding
    (tests/test_awm.py); on epsilon and v models the matching loss is the model's own (`prediction_target`).
    One difference: the reference adds the EMA term only when `kl_coef > 0`; here each term has its own weight.

    Args:
        model_output (`torch.Tensor`): `o_theta(x_t)`, `(N, ...)`: N rows, differentiable.
        target (`torch.Tensor`): `o*`, the denoising target of each row.
        time (`torch.Tensor`): `(N,)` the rows' `t` in [0, 1].
        advantages (`torch.Tensor`): `(N,)` each row's sample's advantage weight (`awm_advantages`).
        clip_range (`float`): `e` (the authors' `train.clip_range`: 1e-4 in base_awm.py, 1 in their presets).
        old_log_prob (`torch.Tensor` or `None`): `(N,)` `log p_old`; `None` = on-policy.
        ref_model_output, ema_model_output (`torch.Tensor` or `None`): the base model's and the EMA (old) adapter's
            outputs at the rows; needed when their coefficient is > 0.
        weighting, ghuber_power: of `awm_log_prob`.
        loss_type (`str`): `"exp_first"` or `"sum_first"` (the authors' `train.loss_type`).
        steps_per_sample (`int`): rows per sample for `"sum_first"`: the rows are sample-major, `S` of a sample in a
            row.
        kl_coef, kl_weight: `beta_KL` and `awm_kl`'s weight (the authors' `train.beta`, `train.kl_weight`).
        ema_kl_coef, ema_kl_weight: `beta_EMA` and its weight (`train.ema_beta`, `train.kl_ema_weight`).

    Returns:
        `dict` with `loss` (scalar float64, differentiable) and detached statistics: `policy_loss`, `kl`, `ema_kl`,
        `matching_loss` (`mean_rows -log p_theta`), `clipfrac` and `approx_kl` (`0.5 mean (log rho)^2`).
    """
    if loss_type not in AWM_LOSS_TYPES:
        raise ValueError(f"unknown loss_type '{loss_type}': expected one of {', '.join(AWM_LOSS_TYPES)}")
    for name, coef, other in (("kl_coef", kl_coef, ref_model_output), ("ema_kl_coef", ema_kl_coef, ema_model_output)):
        if coef and other is None:
            raise ValueError(f"{name} is {coef} but no output to compare with was given")
    log_prob = awm_log_prob(model_output, target, time, weighting, ghuber_power)
    old = log_prob.detach() if old_log_prob is None else old_log_prob.detach().double()
    advantages = advantages.reshape(-1)
    if loss_type == "sum_first":
        log_ratio = log_prob.view(-1, steps_per_sample).mean(dim=1) - old.view(-1, steps_per_sample).mean(dim=1)
        advantages = advantages.view(-1, steps_per_sample)[:, 0]
    else:
        log_ratio = log_prob - old
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    loss = policy_loss
    zero = torch.zeros((), dtype=torch.float64, device=model_output.device)
    kl = ema_kl = zero
    if ref_model_output is not None:
        kl = awm_kl(model_output, ref_model_output.detach(), time, kl_weight).mean()
        loss = loss + kl_coef * kl
    if ema_model_output is not None:
        ema_kl = awm_kl(model_output, ema_model_output.detach(), time, ema_kl_weight).mean()
        loss = loss + ema_kl_coef * ema_kl
    with torch.no_grad():
        stats = {"policy_loss": policy_loss.detach(), "kl": kl.detach(), "ema_kl": ema_kl.detach(),
                 "matching_loss": -log_prob.detach().mean(),
                 "clipfrac": ((ratio - 1.0).abs() > clip_range).double().mean(),
                 "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean()}
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


# ----------------------------------------------------------------------------------------------------------------
# DGPO (Luo et al., ICLR 2026): group-level preference optimisation on the forward process.

def dgpo_group_weights(dsm: torch.Tensor, ref_dsm: torch.Tensor, advantages: torch.Tensor, group_ids: torch.Tensor,
                       beta_dpo: float, group_size: int) -> torch.Tensor:
    """DGPO's weight of each row's group: the probability that the group-level preference is still *violated*.

    With `delta_i = l_theta(x_i) - l_ref(x_i)` (denoising losses of the policy and the reference at the same noised
    sample) and `A_i` the clipped advantage, the rows of one group `g` (a prompt's images at one shared noise level and
    noise) give

        s_g = sum_{i in g} A_i beta_dpo delta_i / G          w_g = sigmoid(s_g)

    `s_g = -(R(G+) - R(G-))` is minus the group-level reward margin of the Bradley-Terry model, so `w_g` is the
    gradient scale of `-log sigmoid(R(G+) - R(G-))` (see `dgpo_loss`). `G = group_size` (the images per prompt) is
    the divisor whatever the number of rows present, as in the authors' code.

    Args:
        dsm, ref_dsm (`torch.Tensor`): `(N,)` per-row denoising losses of the policy and the reference (no gradient).
        advantages (`torch.Tensor`): `(N,)` clipped advantages.
        group_ids (`torch.Tensor`): `(N,)` integer key of each row's group (prompt and noise level).
        beta_dpo (`float`): the DPO inverse temperature.
        group_size (`int`): `G`.

    Returns:
        `(N,)` detached weights, each row its group's.
    """
    with torch.no_grad():
        term = advantages * beta_dpo * (dsm.detach() - ref_dsm.detach()) / group_size
        keys, index = torch.unique(group_ids, return_inverse=True)
        sums = torch.zeros(keys.shape[0], dtype=term.dtype, device=term.device).scatter_add_(0, index, term)
        return torch.sigmoid(sums)[index]


def dgpo_loss(
    model_output: torch.Tensor,
    target: torch.Tensor,
    ref_output: torch.Tensor,
    advantages: torch.Tensor,
    group_ids: torch.Tensor,
    beta_dpo: float,
    group_size: int,
    adv_clip_max: float = 5.0,
    old_output: Optional[torch.Tensor] = None,
    clip_range: float = 1e-2,
    clip_dsm: bool = True,
    clip_kl: bool = False,
    kl_ref_output: Optional[torch.Tensor] = None,
    kl_weight: float = 0.0,
    group_weights: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """DGPO's loss (Luo, Hu & Tang, "Reinforcing Diffusion Models by Direct Group Preference Optimization", ICLR 2026,
    arXiv 2510.08425), as the authors' code (Luo-Yihong/DGPO `scripts/train_sd3_dgpo.py`, commit 01ceb4b,
    `compute_group_dgpo_loss_allreduce` and the training step around it).

    Each prompt's images form a group, split by the sign of their advantage into `G+` and `G-`. DGPO maximises the
    Bradley-Terry likelihood of the group preference, `log sigmoid(R(G+) - R(G-))`, with the group reward an
    advantage-weighted sum of DPO's implicit rewards, `R(G) = sum_{x in G} |A(x)| r_theta(x)` (the weights sum to the
    same value on both sides, so the intractable normalisers cancel), and, as Diffusion-DPO, `r_theta(x)` estimated by
    `-beta_dpo (l_theta(x) - l_ref(x))` at one noise level: `l(x) = mean ||target - output||^2` is the model's own
    denoising loss at `x_t = alpha_t x0 + sigma_t eps`. The gradient of `-log sigmoid(R(G+) - R(G-))` is
    `sigmoid(s_g) sum_i A_i beta_dpo grad l_theta(x_i) / G` (`dgpo_group_weights`); the code drops the constant
    `beta_dpo` and averages over rows:

        A_i   = clip(A_i, -A_max, A_max)
        L     = mean_i [ sg(w_g(i)) A_i l^clip_theta(x_i) ]  +  lambda_KL mean_i mean (out_theta - out_kl_ref)^2

    PPO-style clipping against the old (EMA) policy: with `rho_i = exp(l_old(x_i) - l_theta(x_i))`, a row whose ratio
    left the trust region in the direction its advantage pushes (`rho > 1 + eps` for `A > 0`, `rho < 1 - eps` for
    `A <= 0`) contributes no gradient (`l^clip = sg(l)`; the KL term too with `clip_kl`).

    `target` is the family's denoising target (`diffalign.forward_process.prediction_target`): `eps - x0` for a flow
    model, where `l` is the authors' `(target_v - model_v)^2` mean exactly; `eps` for an epsilon UNet and
    `alpha_t eps - sigma_t x0` for a v-prediction one (each model's pre-training loss, as Diffusion-DPO on SD), so
    `beta_dpo` is on the scale of the model's own loss.

    Args:
        model_output (`torch.Tensor`): `(N, ...)` the policy's outputs (differentiable), one row per (sample, noise
            level).
        target (`torch.Tensor`): `(N, ...)` the denoising target.
        ref_output (`torch.Tensor`): `(N, ...)` the DPO reference's outputs (the base model, possibly with CFG, or the
            EMA policy with `use_ema_ref`).
        advantages (`torch.Tensor`): `(N,)` the samples' advantages (clipped here).
        group_ids (`torch.Tensor`): `(N,)` key of each row's group (same prompt and noise level).
        beta_dpo (`float`): the DPO inverse temperature (authors' `train.beta_dpo`).
        group_size (`int`): `G`, images per prompt.
        adv_clip_max (`float`): `A_max` (authors' `train.adv_clip_max`, 5).
        old_output (`torch.Tensor`, *optional*): the old (EMA) policy's outputs; `None` skips the clipping.
        clip_range (`float`): `eps` of the ratio (authors' `clip_range`).
        clip_dsm, clip_kl (`bool`): which terms lose their gradient on clipped rows (authors' `clip_dsm`, `clip_kl`).
        kl_ref_output (`torch.Tensor`, *optional*): the KL term's reference outputs (the base model); `None` with
            `kl_weight` 0.
        kl_weight (`float`): `lambda_KL` (authors' `train.beta`).
        group_weights (`torch.Tensor`, *optional*): `(N,)` the weights `w_g` computed over the whole optimizer step
            (the trainer's pre-pass); by default from these rows (`dgpo_group_weights`).

    Returns:
        `dict` with `loss` (scalar, differentiable) and detached statistics: `policy_loss`, `dsm` (mean `l_theta`),
        `ref_dsm` (mean `l_ref`), `kl`, `clipfrac` (fraction of clipped rows) and `group_weight` (mean `w`).
    """
    if kl_weight != 0 and kl_ref_output is None:
        raise ValueError(f"kl_weight is {kl_weight} but no KL reference output was given")
    dims = tuple(range(1, model_output.ndim))
    advantages = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    dsm = ((target - model_output) ** 2).mean(dim=dims)
    with torch.no_grad():
        ref_dsm = ((target - ref_output) ** 2).mean(dim=dims)
    if group_weights is None:
        group_weights = dgpo_group_weights(dsm, ref_dsm, advantages, group_ids, beta_dpo, group_size)
    clipped = torch.zeros_like(dsm, dtype=torch.bool)
    if old_output is not None:
        with torch.no_grad():
            old_dsm = ((target - old_output) ** 2).mean(dim=dims)
            ratio = torch.exp(old_dsm - dsm)
            clipped = torch.where(advantages > 0, ratio > 1.0 + clip_range, ratio < 1.0 - clip_range)
    trained_dsm = torch.where(clipped, dsm.detach(), dsm) if clip_dsm else dsm
    policy_loss = (group_weights.detach() * advantages * trained_dsm).mean()
    loss = policy_loss
    kl = torch.zeros((), device=model_output.device)
    if kl_ref_output is not None:
        kl_rows = ((model_output - kl_ref_output.detach()) ** 2).mean(dim=dims)
        if clip_kl:
            kl_rows = torch.where(clipped, kl_rows.detach(), kl_rows)
        kl = kl_rows.mean()
        loss = loss + kl_weight * kl
    stats = {"policy_loss": policy_loss.detach(), "dsm": dsm.detach().mean(), "ref_dsm": ref_dsm.mean(),
             "kl": kl.detach(), "clipfrac": clipped.float().mean(), "group_weight": group_weights.detach().mean()}
    return {"loss": loss, **stats}
