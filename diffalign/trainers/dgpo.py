"""DGPO (Luo, Hu & Tang, "Reinforcing Diffusion Models by Direct Group Preference Optimization", ICLR 2026,
arXiv 2510.08425): group-level preference optimisation on the forward process of ODE samples, as Luo-Yihong/DGPO
(commit 01ceb4b, `scripts/train_sd3_dgpo.py`)."""

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

import torch

from ..advantages import group_advantages
from ..forward_process import prediction_target, update_old_policy_
from ..losses import dgpo_group_weights, dgpo_loss
from ..utils.peft_utils import BASE_ADAPTER
from ..utils.torch_utils import seed_for
from .base import BaseTrainer
from .dgpo_config import DGPOConfig
from .forward_base import OLD_ADAPTER, ForwardProcessBatch, ForwardProcessTrainer, NoisedRows
from .update_plan import Rows, UpdatePlan, padding_rows


@dataclass
class DGPOBatch(ForwardProcessBatch):
    """The epoch's final samples with their advantages, the negative conditioning the reference's CFG needs when the
    rollout had none, and what the pre-pass of the current optimizer step computed: each row's group weight
    (`step_weights[sample, step]`) and frozen outputs (`frozen[(sample, step)]`)."""

    negative_conditioning: Optional[dict] = None
    step_weights: Optional[torch.Tensor] = None
    frozen: Dict = field(default_factory=dict)


class DGPOTrainer(ForwardProcessTrainer):
    """DGPO: sample each prompt's group with a deterministic solver, score it, then raise the Bradley-Terry likelihood
    that the group's above-average images beat its below-average ones, with Diffusion-DPO implicit rewards measured
    by the model's own denoising loss at noised copies of the samples (`diffalign.losses.dgpo_loss`), PPO-style
    clipped against an EMA of the policy, with a KL term to the base model.

    How it maps the authors' code onto the forward-process base:

    - the EMA reference `ema_ref` is the old-policy adapter: it follows the policy after every optimizer step with
      decay `min(ema_ref_decay_rate i, ema_ref_max_decay)`, is the "old" model of the clipping, the DPO reference with
      `train_use_ema_ref`, and samples the rollouts once `switch_ema_ref` optimizer steps are done (the policy before);
    - the policy and the EMA reference are evaluated CFG-free, the base model at `train_ref_guidance_scale`;
    - the noise levels: `train_num_timesteps` of the sampler's steps `0..train_trunc_steps`, drawn once per inner
      epoch and shared by every sample; the noise is shared by the images of a prompt (`train_shared_noise`);
    - the group weight `sigmoid(sum_g A beta_dpo (l_theta - l_ref) / G)` needs every row of the group at once. The
      optimizer steps hold whole prompt groups (units of `sample_images_per_prompt` samples, each on one process),
      and, when a process's rows of the step need more than one micro-batch, a **no-grad pre-pass** over them
      computes every group's weight before the micro-batches backpropagate: the parameters do not change within an
      optimizer step, so these are the values the authors compute inside their step, and any micro-batch size gives
      the same gradient. The pre-pass keeps the frozen outputs (EMA reference, base model) for the backward pass, so
      its cost is one extra no-grad forward of the policy per row. In one micro-batch, the weights come from its own
      forward, without a pre-pass. A group never spans processes here, so the authors' all-reduce of the group sums is a local
      sum, and 2 processes equal 1.

    ```python
    from diffalign.config import load_config
    from diffalign.trainers import DGPOTrainer

    DGPOTrainer(load_config("dgpo", "digits-flow-dgpo")).train()
    ```
    """

    config_class = DGPOConfig
    loss_stats = ("loss", "policy_loss", "dsm", "ref_dsm", "kl", "clipfrac", "group_weight")

    # ------------------------------------------------------------------ batch
    def unit_size(self) -> int:
        return self.config.sample_images_per_prompt

    def units_per_step(self, num_units: int) -> int:
        return self.config.train_batch_size // self.config.sample_images_per_prompt or num_units

    def training_batch(self, trajectories, rewards, all_rewards, all_prompts: List[str], epoch: int) -> DGPOBatch:
        """Advantages per prompt (the batch's std with `train_global_std`, as the authors' `PerPromptStatTracker`),
        this process's part."""
        config = self.config
        ids = {prompt: i for i, prompt in enumerate(dict.fromkeys(all_prompts))}
        advantages = group_advantages(all_rewards, torch.tensor([ids[p] for p in all_prompts]),
                                      global_std=config.train_global_std)
        n = len(trajectories)
        first = self.global_sample_offset(n)
        negative = None
        if config.train_ref_guidance_scale != 1.0 and trajectories.negative_conditioning is None:
            _, negative = self.family.conditioning(list(trajectories.prompts), "", True, self.resolution,
                                                   self.resolution)
            negative = {k: v.to(self.device) for k, v in negative.items()}
        return DGPOBatch(trajectories.to(self.device), rewards=rewards.to(self.device),
                         advantages=advantages[first : first + n].to(self.device),
                         all_rewards=all_rewards.detach().cpu().float(), first_index=first, epoch=epoch,
                         negative_conditioning=negative)

    def draw_order_and_plan(self, num_units: int, stochastic, generator: torch.Generator):
        """The group order, then the inner epoch's noise levels: `train_num_timesteps` of the sampler's steps
        `0..train_trunc_steps`, the same for every sample (the authors' `generate_shared_sampled_timesteps`)."""
        config = self.config
        order = torch.randperm(num_units, generator=generator)
        steps = torch.randperm(config.train_trunc_steps + 1, generator=generator)[: config.train_num_timesteps]
        return order, steps.expand(num_units * config.sample_images_per_prompt, -1)

    def noise_seed(self, batch: ForwardProcessBatch, sample: int, step: int) -> int:
        """With `train_shared_noise`, one noise per (prompt group, step): the authors' `generate_shared_noise_for_
        groups`."""
        if not self.config.train_shared_noise:
            return super().noise_seed(batch, sample, step)
        group = int(batch.trajectories.group_ids[sample])
        return seed_for(self.config.seed, batch.epoch, 12, group, step)

    # ------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, epoch: int, *args, **kwargs):
        """The rollout: by the policy for the first `switch_ema_ref` optimizer steps, then by the EMA reference."""
        if epoch * self.optimizer_steps_per_epoch() > self.config.switch_ema_ref:
            return super().sample(epoch, *args, **kwargs)
        return BaseTrainer.sample(self, epoch, *args, **kwargs)

    # ------------------------------------------------------------ forwards
    def uses_old(self) -> bool:
        config = self.config
        return config.train_clip_dsm or config.train_clip_kl or config.train_use_ema_ref

    def uses_base(self) -> bool:
        return not self.config.train_use_ema_ref or self.config.train_kl_coef > 0

    def frozen_outputs(self, model, batch: DGPOBatch, rows: Rows, noised: NoisedRows) -> Dict[str, torch.Tensor]:
        """The EMA reference's output (CFG-free) and the base model's (at `train_ref_guidance_scale`), those the loss
        needs; one no-grad forward when both are CFG-free."""
        guidance = self.config.train_ref_guidance_scale
        cfg_free = replace(noised, negative_conditioning=None)
        names = ([OLD_ADAPTER] if self.uses_old() else []) + ([BASE_ADAPTER] if self.uses_base() else [])
        if guidance == 1.0 or BASE_ADAPTER not in names:
            return dict(zip(names, self.frozen_predictions(model, names, cfg_free, 1.0)))
        frozen = {}
        if OLD_ADAPTER in names:
            frozen[OLD_ADAPTER] = self.frozen_predictions(model, [OLD_ADAPTER], cfg_free, 1.0)[0]
        negative = noised.negative_conditioning
        if negative is None:
            samples = rows.samples.to(self.device)
            negative = {k: v[samples] for k, v in batch.negative_conditioning.items()}
        frozen[BASE_ADAPTER] = self.frozen_predictions(
            model, [BASE_ADAPTER], replace(noised, negative_conditioning=negative), guidance)[0]
        return frozen

    def model_outputs(self, model, batch: DGPOBatch, rows: Rows):
        """At `x_t = alpha_t x0 + sigma_t eps`: the policy's CFG-free output (with gradients) and the frozen outputs
        kept by the step's pre-pass (a padding forward takes its own output, detached, in their place)."""
        noised = self.noised_rows(batch, rows)
        output = self.policy_prediction(model, replace(noised, negative_conditioning=None), 1.0)
        if rows.padding:
            names = ([OLD_ADAPTER] if self.uses_old() else []) + ([BASE_ADAPTER] if self.uses_base() else [])
            return output, {name: output.detach() for name in names}, noised
        keys = list(zip(rows.samples.tolist(), rows.steps.tolist()))
        if all(key in batch.frozen for key in keys):
            frozen = {name: torch.stack([batch.frozen[key][name] for key in keys]) for name in batch.frozen[keys[0]]}
        else:  # a direct call outside an optimizer step
            frozen = self.frozen_outputs(model, batch, rows, noised)
        return output, frozen, noised

    def row_groups(self, batch: DGPOBatch, rows: Rows) -> torch.Tensor:
        """Each row's group key: its prompt group and noise level."""
        groups = batch.trajectories.group_ids.to(rows.samples.device)[rows.samples]
        return groups * self.config.sample_num_steps + rows.steps

    # ------------------------------------------------------ optimizer step
    @torch.no_grad()
    def group_weights_pre_pass(self, batch: DGPOBatch, plan: UpdatePlan):
        """The group weights of every row of an optimizer step (`dgpo_group_weights` over this process's rows, which
        hold whole groups), and the rows' frozen outputs for the backward pass; as many forwards as every process
        runs (padding included)."""
        config = self.config
        rows = plan.rows(self.device)
        batch.frozen, batch.step_weights = {}, None
        dsm, ref_dsm = [], []
        for positions in plan.micro_batches(rows, config.train_micro_batch_size):
            part = padding_rows(self, batch) if positions is None else Rows(rows.samples[positions],
                                                                               rows.steps[positions])
            noised = self.noised_rows(batch, part)
            frozen = self.frozen_outputs(self.denoiser, batch, part, noised)
            output = self.policy_prediction(self.denoiser, replace(noised, negative_conditioning=None), 1.0)
            if positions is None:
                continue
            for k, key in enumerate(zip(part.samples.tolist(), part.steps.tolist())):
                batch.frozen[key] = {name: value[k] for name, value in frozen.items()}
            target = prediction_target(noised.x0, noised.noise, noised.alpha_t, noised.sigma_t,
                                       noised.prediction_type)
            ref = frozen[OLD_ADAPTER if config.train_use_ema_ref else BASE_ADAPTER]
            dims = tuple(range(1, output.ndim))
            dsm.append(((target - output) ** 2).mean(dim=dims))
            ref_dsm.append(((target - ref) ** 2).mean(dim=dims))
        weights = torch.ones(len(batch.trajectories), config.sample_num_steps, device=self.device)
        if dsm:
            advantages = batch.advantages[rows.samples].clamp(-config.train_adv_clip_max, config.train_adv_clip_max)
            weights[rows.samples, rows.steps] = dgpo_group_weights(
                torch.cat(dsm), torch.cat(ref_dsm), advantages, self.row_groups(batch, rows), config.train_beta_dpo,
                config.sample_images_per_prompt)
        batch.step_weights = weights

    def run_update(self, batch: DGPOBatch, plan: UpdatePlan, mode: str) -> Dict[str, float]:
        if plan.slots == 1:
            # Each process's rows of the step fit one micro-batch and hold whole groups: the weights come from that
            # forward itself (`dgpo_loss`), as in the authors' step; the pre-pass would repeat its forward.
            batch.frozen, batch.step_weights = {}, None
            return super().run_update(batch, plan, mode)
        self.group_weights_pre_pass(batch, plan)
        try:
            return super().run_update(batch, plan, mode)
        finally:
            batch.frozen = {}

    def compute_loss(self, outputs, batch: DGPOBatch, rows: Rows):
        """`dgpo_loss` of a micro-batch of (sample, noise level) rows, with the group weights of its optimizer
        step."""
        config = self.config
        output, frozen, noised = outputs
        target = prediction_target(noised.x0, noised.noise, noised.alpha_t, noised.sigma_t, noised.prediction_type)
        steps = rows.steps if rows.steps is not None else torch.zeros_like(rows.samples)
        weights = None
        if batch.step_weights is not None:
            weights = batch.step_weights[rows.samples, steps]
        clip = config.train_clip_dsm or config.train_clip_kl
        out = dgpo_loss(
            output, target, frozen[OLD_ADAPTER if config.train_use_ema_ref else BASE_ADAPTER],
            batch.advantages[rows.samples], self.row_groups(batch, Rows(rows.samples, steps)), config.train_beta_dpo,
            config.sample_images_per_prompt, config.train_adv_clip_max,
            old_output=frozen[OLD_ADAPTER] if clip else None, clip_range=config.train_clip_range,
            clip_dsm=config.train_clip_dsm, clip_kl=config.train_clip_kl,
            kl_ref_output=frozen[BASE_ADAPTER] if config.train_kl_coef > 0 else None, kl_weight=config.train_kl_coef,
            group_weights=weights)
        return out["loss"], {key: out[key].detach() for key in self.loss_stats}

    # ------------------------------------------------------- EMA reference
    def train_on_samples(self, trajectories, rewards, all_rewards, all_prompts: List[str],
                         epoch: int) -> Dict[str, float]:
        self.ema_ref_step = epoch * self.optimizer_steps_per_epoch()  # optimizer steps made before this epoch
        return super().train_on_samples(trajectories, rewards, all_rewards, all_prompts, epoch)

    def optimizer_step(self) -> Dict[str, float]:
        """The optimizer step, then the EMA reference's: `theta_ref <- eta theta_ref + (1 - eta) theta` with
        `eta = min(ema_ref_decay_rate i, ema_ref_max_decay)` at the step's index `i` (from 0), as the authors."""
        stats = super().optimizer_step()
        config = self.config
        self.ema_ref_decay = min(config.ema_ref_decay_rate * self.ema_ref_step, config.ema_ref_max_decay)
        update_old_policy_(self.old_params, self.policy_params, self.ema_ref_decay)
        self.ema_ref_step += 1
        return stats

    def update_old_policy(self, epoch: int) -> Dict[str, float]:
        """Nothing after the epoch: the EMA reference moved after every optimizer step."""
        return {"old_policy_decay": self.ema_ref_decay}
