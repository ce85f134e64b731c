"""An independent port of DGPO's per-step loss, for tests/test_dgpo.py.

Source: Luo-Yihong/DGPO (https://github.com/Luo-Yihong/DGPO), commit 01ceb4b, `scripts/train_sd3_dgpo.py`:
`compute_group_dgpo_loss_allreduce` (lines 162-193) and the training step that calls it (lines 1097-1158: the shared
noise `generate_shared_noise_for_groups`, the advantage clip, the PPO-style `should_clip` of the DSM loss against the
EMA reference `ema_ref`, the `use_ema_ref` switch of the DPO reference and the KL term `train.beta`).

That repository has **no licence file**, so its code is not copied here: this is a re-implementation written from the
equations of the paper (Luo, Hu & Tang, "Reinforcing Diffusion Models by Direct Group Preference Optimization",
ICLR 2026, arXiv 2510.08425: maximise `log sigmoid(R(G+) - R(G-))` with the group reward an advantage-weighted sum of
Diffusion-DPO implicit rewards) and from the behaviour of the functions named above. It keeps their structure on
purpose (per-process tensors, group sums all-reduced across processes, each process's mean), so that a test can
compare diffalign's one-process `dgpo_loss` with a multi-process computation.

For each process p, rows i of the micro-step (a sample at one shared noise level, with shared noise per group):

    l_i      = mean (target_i - v_theta_i)^2                    (the policy's DSM loss, "dsm_loss")
    l_ref_i  = mean (target_i - v_ref_i)^2                      (no gradient; v_ref = base model, or the EMA
                                                                   reference with use_ema_ref)
    A_i      = clip(A_i, -A_max, A_max)
    rho_i    = exp(l_old_i - l_i)   clipped_i = (rho_i > 1 + c if A_i > 0 else rho_i < 1 - c)
    l_i      = sg(l_i) where clipped_i (clip_dsm)
    s_g      = sum over every process's rows of group g of A_i beta_dpo (l_i - l_ref_i) / G      (all-reduce)
    L_p      = mean_{i on p} sg(sigmoid(s_g(i))) A_i l_i  +  beta_kl mean_{i on p} mean (v_theta_i - v_base_i)^2

and the optimizer's gradient is the mean of the processes' gradients (DDP).
"""

from typing import List, Optional

import torch


def dgpo_step_losses(model_v: List[torch.Tensor], ref_v: List[torch.Tensor], old_v: List[Optional[torch.Tensor]],
                     target_v: List[torch.Tensor], advantages: List[torch.Tensor], group_index: List[torch.Tensor],
                     num_groups: int, beta_dpo: float, group_size: int, adv_clip_max: float, clip_range: float,
                     clip_dsm: bool, clip_kl: bool, kl_beta: float, kl_ref_v: Optional[List[torch.Tensor]] = None):
    """The loss of each simulated process (lists indexed by process). `group_index[p]`: each row's group in
    `0 .. num_groups - 1` (groups may span processes). Returns `[L_p]`; their mean is what DDP differentiates."""
    processes = range(len(model_v))
    per_process = []
    for p in processes:
        n = model_v[p].shape[0]
        adv = advantages[p].clamp(-adv_clip_max, adv_clip_max)
        dsm = (target_v[p] - model_v[p]).square().reshape(n, -1).mean(dim=1)
        if old_v[p] is not None:
            with torch.no_grad():
                old_dsm = (target_v[p] - old_v[p]).square().reshape(n, -1).mean(dim=1)
                ratio = torch.exp(old_dsm - dsm)
                clipped = torch.where(adv > 0, ratio > 1 + clip_range, ratio < 1 - clip_range)
            if clip_dsm:
                dsm = torch.where(clipped, dsm.detach(), dsm)
        else:
            clipped = torch.zeros(n, dtype=torch.bool)
        with torch.no_grad():
            ref_dsm = (target_v[p] - ref_v[p]).square().reshape(n, -1).mean(dim=1)
        per_process.append((adv, dsm, ref_dsm, clipped))

    # the all-reduce of the per-group sums
    global_sums = torch.zeros(num_groups, dtype=model_v[0].dtype)
    for p in processes:
        adv, dsm, ref_dsm, _ = per_process[p]
        term = adv * beta_dpo * (dsm.detach() - ref_dsm) / group_size
        global_sums.index_add_(0, group_index[p], term)
    weights = torch.sigmoid(global_sums)

    losses = []
    for p in processes:
        adv, dsm, _, clipped = per_process[p]
        w = weights[group_index[p]]
        loss = (w.detach() * adv * dsm).mean()
        if kl_beta > 0:
            n = model_v[p].shape[0]
            kl = (model_v[p] - kl_ref_v[p]).square().reshape(n, -1).mean(dim=1)
            if clip_kl:
                kl = torch.where(clipped, kl.detach(), kl)
            loss = loss + kl_beta * kl.mean()
        losses.append(loss)
    return losses
