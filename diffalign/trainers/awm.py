"""Advantage Weighted Matching (Xue et al., "Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion
Models", 2025, arXiv 2509.25050): the model's own denoising loss on forward-noised final samples, weighted by
advantages through a PPO-style ratio, as scxue/advantage_weighted_matching."""

from dataclasses import dataclass
from typing import List, Optional

import torch

from ..advantages import group_advantages
from ..forward_process import prediction_target
from ..losses import awm_advantages, awm_log_prob, awm_loss
from ..utils.peft_utils import BASE_ADAPTER
from .awm_config import AWMConfig
from .base import BaseTrainer
from .forward_base import OLD_ADAPTER, ForwardProcessBatch, ForwardProcessTrainer
from .update_plan import Rows


def awm_train_step_indices(time_type: str, max_step: int, num_levels: int, uniform: torch.Tensor) -> torch.Tensor:
    """The sampling-step indices a sample is trained at: one per equal stratum of `[first, max_step)`, as the
    authors' `time_type` draws (scripts/train_sd3_awm.py:1172-1205):

        discrete:            strata of [0, max_step), `num_levels` of them
        discrete_wo_init:    strata of [1, max_step)
        discrete_with_init:  step 0, then `num_levels - 1` strata of [1, max_step)

    with stratum boundaries `linspace(first, max_step, n + 1)` truncated to integers and index
    `lower + floor(u (upper - lower))`.

    Args:
        uniform (`torch.Tensor`): the `u` in [0, 1), one per stratum (`num_levels`, or `num_levels - 1` with init).
    """
    with_init = time_type == "discrete_with_init"
    strata = num_levels - 1 if with_init else num_levels
    first = 0 if time_type == "discrete" else 1
    indices = torch.zeros(0, dtype=torch.long)
    if strata > 0:
        boundaries = torch.linspace(first, max_step, steps=strata + 1)
        lower, upper = boundaries[:-1].long(), boundaries[1:].long()
        indices = lower + (uniform * (upper - lower)).long()
    if with_init:
        indices = torch.cat([torch.zeros(1, dtype=torch.long), indices])
    return indices


def awm_ema_decay(step: int, decay: float, decay_type: str) -> float:
    """The EMA adapter's decay after `step` optimizer steps: `min(decay, 0.001 step)` (`"linear"`) or `decay`
    (`"constant"`) (scripts/train_sd3_awm.py:1409-1413)."""
    return decay if decay_type == "constant" else min(decay, 0.001 * step)


@dataclass
class AWMBatch(ForwardProcessBatch):
    """The epoch's final samples with each one's advantage weight `advantages` (`awm_advantages`)."""

    advantages: Optional[torch.Tensor] = None


class AWMTrainer(ForwardProcessTrainer):
    """Advantage Weighted Matching: sample final images (CFG-free, deterministic; with the trained policy, or the EMA
    adapter when off-policy), score them, then minimise the advantage-weighted denoising loss of the model's own
    parametrisation at stratified noise levels of the sampler (`diffalign.losses.awm_loss`), with KL terms to the
    base model and to the EMA ("old") adapter, which follows the trained one after each epoch.

    ```python
    from diffalign.config import load_config
    from diffalign.trainers import AWMTrainer

    AWMTrainer(load_config("awm", "digits-flow-awm")).train()
    ```
    """

    config_class = AWMConfig
    loss_stats = ("loss", "policy_loss", "kl", "ema_kl", "matching_loss", "clipfrac", "approx_kl")

    @torch.no_grad()
    def sample(self, *args, **kwargs):
        """The epoch's rollout: the trained policy (on-policy, the authors' default) or the EMA adapter."""
        if self.config.train_off_policy:
            return super().sample(*args, **kwargs)
        return BaseTrainer.sample(self, *args, **kwargs)

    def old_policy_decay_at(self, step: int) -> float:
        return awm_ema_decay(step, self.config.train_kl_ema_decay, self.config.train_kl_ema_decay_type)

    def draw_order_and_plan(self, num_units: int, stochastic, generator: torch.Generator):
        """The sample order, then each sample's stratified noise levels (`awm_train_step_indices`; the authors draw
        one set per micro-batch, here one per sample, from the same distribution)."""
        config = self.config
        order = torch.randperm(num_units, generator=generator)
        strata = config.train_timesteps - (config.train_time_type == "discrete_with_init")
        plan = torch.stack([
            awm_train_step_indices(config.train_time_type, config.max_train_step, config.train_timesteps,
                                   torch.rand(strata, generator=generator))
            for _ in range(num_units)])
        return order, plan

    def training_batch(self, trajectories, rewards, all_rewards, all_prompts: List[str], epoch: int) -> AWMBatch:
        """Advantages over the epoch's global batch (per-prompt mean, the batch's or the prompt's std: the authors'
        `PerPromptStatTracker`), clipped and rescaled (`awm_advantages`), this process's part."""
        config = self.config
        ids = {prompt: i for i, prompt in enumerate(dict.fromkeys(all_prompts))}
        advantages = group_advantages(all_rewards, torch.tensor([ids[p] for p in all_prompts]),
                                      global_std=config.train_global_std)
        n = len(trajectories)
        first = self.global_sample_offset(n)
        weights = awm_advantages(advantages[first : first + n], config.train_adv_clip_max,
                                 config.train_advantage_max or None)
        return AWMBatch(trajectories.to(self.device), rewards=rewards.to(self.device),
                        all_rewards=all_rewards.detach().cpu().float(), advantages=weights.to(self.device),
                        first_index=first, epoch=epoch)

    def frozen_adapters(self) -> List[str]:
        """The frozen outputs the loss needs: the EMA adapter's (off-policy ratio or EMA KL), the base model's (KL)."""
        config = self.config
        adapters = [OLD_ADAPTER] if config.train_off_policy or config.train_ema_kl_coef > 0 else []
        return adapters + ([BASE_ADAPTER] if config.train_kl_coef > 0 else [])

    def model_outputs(self, model, batch: AWMBatch, rows: Rows):
        """At `x_t = alpha_t x0 + sigma_t eps` (stratified sampler noise levels, fresh noise): the trained policy's
        output (with gradients) and the frozen adapters' (one no-grad forward)."""
        noised = self.noised_rows(batch, rows)
        adapters = self.frozen_adapters()
        frozen = dict(zip(adapters, self.frozen_predictions(model, adapters, noised)))
        return self.policy_prediction(model, noised), frozen, noised

    def compute_loss(self, outputs, batch: AWMBatch, rows: Rows):
        """`awm_loss` of a micro-batch of (sample, noise level) rows, against the model's own denoising target."""
        config = self.config
        output, frozen, noised = outputs
        # in float64, as the authors' `random_noise.double() - clean_latents.double()`
        target = prediction_target(noised.x0.double(), noised.noise.double(), noised.alpha_t.double(),
                                   noised.sigma_t.double(), noised.prediction_type)
        time = noised.t.float() / self.family.scheduler.config.num_train_timesteps
        ema_output = frozen.get(OLD_ADAPTER)
        old_log_prob = None
        if config.train_off_policy:
            old_log_prob = awm_log_prob(ema_output, target, time, config.train_weighting, config.train_ghuber_power)
        out = awm_loss(output, target, time, batch.advantages[rows.samples], config.train_clip_range,
                       old_log_prob=old_log_prob, ref_model_output=frozen.get(BASE_ADAPTER),
                       ema_model_output=ema_output if config.train_ema_kl_coef > 0 else None,
                       weighting=config.train_weighting, ghuber_power=config.train_ghuber_power,
                       loss_type=config.train_loss_type,
                       steps_per_sample=1 if rows.padding else config.train_timesteps,
                       kl_coef=config.train_kl_coef, kl_weight=config.train_kl_weight,
                       ema_kl_coef=config.train_ema_kl_coef, ema_kl_weight=config.train_ema_kl_weight)
        return out["loss"], {key: out[key].detach() for key in self.loss_stats}
