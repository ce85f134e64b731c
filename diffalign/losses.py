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
