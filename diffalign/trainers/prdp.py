"""PRDP (Deng et al., "Proximal Reward Difference Prediction for Large-Scale Reward Finetuning of Diffusion
Models", CVPR 2024): regress implicit-reward differences of same-prompt trajectory pairs onto reward differences
divided by beta, with per-step proximal clipping around the sampling snapshot (Algorithm 1)."""

from typing import List, Optional

import torch

from .prdp_config import PRDPConfig
from ..losses import implicit_reward_error, prdp_loss
from ..rollout import Trajectories
from ..utils.peft_utils import reference_model
from ..utils.torch_utils import seed_for
from .base import BaseTrainer, TrainingBatch
from .update_plan import GlobalLayout, Rows, UpdatePlan, local_plan, padding_rows, padding_slots, planned_steps


class PRDPTrainer(BaseTrainer):
    """Each epoch samples N prompts x B images from the snapshot theta_old, scores them, then runs K inner epochs of
    gradient updates on `diffalign.losses.prdp_loss` over all same-prompt pairs.

    The reference log-probs `log pi_ref` of the recorded transitions are computed once at sampling time (the
    reference never changes) with the LoRA adapter disabled, or with a frozen copy for full fine-tuning.

    ```python
    from diffalign import PRDPConfig, PRDPTrainer

    config = PRDPConfig(model="digits", reward="digit_correctness", prompt_fn="digits", num_epochs=20)
    PRDPTrainer(config).train()
    ```
    """

    config_class = PRDPConfig
    loss_scope = "update"  # pairs couple the rows of an optimizer step
    loss_stats = ("loss", "implicit_reward_error", "log_ratio_to_old")
    row_stats = ("log_ratio_to_old",)
    # metrics.jsonl's order of PRDP's update metrics
    update_metrics = ("loss", "grad_norm", "skipped", "implicit_reward_error", "log_ratio_to_old")
    step_plan_first = True

    def needs_reference(self) -> bool:
        # pi_ref at every sampling step costs one more UNet pass per step; when only a fraction of the steps is
        # trained (and no per-epoch KL is asked for), `_reference_log_probs` computes just the steps that are used.
        return self.config.sample_compute_kl or self.config.num_train_steps == self.config.num_sde_steps

    def unit_size(self) -> int:
        return self.config.sample_images_per_prompt  # a prompt group: its pairs stay together

    def units_per_step(self, num_units: int) -> int:
        return self.config.train_prompts_per_step or num_units

    def loss_weight(self, batch: TrainingBatch, units: torch.Tensor) -> int:
        """The pairs `prdp_loss` counts in the prompt groups `units` (the loss is their mean)."""
        return _counted_pairs(batch.all_rewards, units, self.config.sample_images_per_prompt)

    def two_pass(self) -> Optional[bool]:
        return self.config.train_two_pass

    def prepare_step_plans(self, batch: TrainingBatch, layout: GlobalLayout, stochastic, epoch: int):
        """Without `log pi_ref` recorded at sampling, the K inner epochs' step plans are drawn first and `log pi_ref`
        is computed for the steps they train (once: the reference never changes)."""
        if batch.trajectories.ref_log_probs is not None:
            return None
        config, acc = self.config, self.accelerator
        n = len(batch.trajectories)
        plan_generator = torch.Generator().manual_seed(seed_for(config.seed, epoch, 3))
        plans = [self.train_step_plan(stochastic, plan_generator) for _ in range(config.train_num_inner_epochs)]
        num_steps = batch.trajectories.log_probs.shape[1]
        counts = [int(planned_steps([p[r * n : (r + 1) * n] for p in plans], num_steps).sum())
                  for r in range(acc.num_processes)]  # every process's rows
        offset = acc.process_index * n
        batch.trajectories.ref_log_probs = self._reference_log_probs(
            batch.trajectories, [p[offset : offset + n] for p in plans], counts)
        return plans

    @torch.no_grad()
    def _reference_log_probs(self, trajectories: Trajectories, plans: List[torch.Tensor],
                             counts: Optional[List[int]] = None) -> torch.Tensor:
        """`(B, T)` `log pi_ref` of the recorded transitions at the steps some plan trains (NaN elsewhere), in
        micro-batches padded to the most any process needs (`counts`: every process's rows; default: this one's)."""
        num_samples, num_steps = trajectories.log_probs.shape
        rows, steps = planned_steps(plans, num_steps).nonzero(as_tuple=True)
        ref_log_probs = torch.full((num_samples, num_steps), float("nan"), device=self.device)
        rows, steps = rows.to(self.device), steps.to(self.device)
        micro = self.config.train_micro_batch_size
        module, context = reference_model(self.denoiser, self.ref_denoiser)
        batch = TrainingBatch(trajectories)
        was_training = self.denoiser.training
        self.denoiser.eval()
        with context():
            for positions in padding_slots(rows.shape[0], micro, counts or [rows.shape[0]]):
                if positions is None:  # a padding forward: as many forwards on every process
                    self.model_outputs(module, batch, padding_rows(self, batch))
                    continue
                log_probs = self.model_outputs(module, batch, Rows(rows[positions], steps[positions]))
                ref_log_probs[rows[positions], steps[positions]] = log_probs.float()
        self.denoiser.train(was_training)
        return ref_log_probs

    def compute_loss(self, log_probs, batch: TrainingBatch, plan: UpdatePlan):
        """`prdp_loss` over the pairs of this process's groups of the step (`log_probs`: `(n, S)` of its planned
        steps), and the sums of the diagnostics of the policy before the update."""
        config, trajectories, device = self.config, batch.trajectories, self.device
        index, steps = plan.samples.to(device)[:, None], plan.steps.to(device)
        old, ref = trajectories.log_probs[index, steps], trajectories.ref_log_probs[index, steps]
        rewards = batch.rewards[plan.samples.to(device)]
        group_ids = trajectories.group_ids[plan.samples.to(trajectories.group_ids.device)]
        loss = prdp_loss(log_probs, old, ref, rewards, group_ids, config.train_beta, config.train_clip_eps)
        log_probs = log_probs.detach()
        error = implicit_reward_error(log_probs, ref, rewards, group_ids, config.train_beta)
        return loss, {"loss": loss.detach().float() * plan.local_weight,
                      "implicit_reward_error": error.float() * plan.local_weight,
                      "log_ratio_to_old": (log_probs - old).abs().sum().float()}

    def local_plan(self, batch: TrainingBatch, samples: torch.Tensor, plan: torch.Tensor) -> UpdatePlan:
        """The plan of an update of `samples` (their `(n, S)` steps `plan`) that this process alone makes (a direct
        call, as in the tests)."""
        group_ids = batch.trajectories.group_ids[samples.to(batch.trajectories.group_ids.device)]
        pairs = _pairs(batch.rewards.detach().float().cpu()[samples.cpu()], group_ids.cpu())
        return local_plan(samples, plan, self.config.train_micro_batch_size, weight=pairs)


def _pairs(rewards: torch.Tensor, group_ids: torch.Tensor) -> int:
    """The pairs `prdp_loss` counts: same group, `r_a - r_b > 0`."""
    diff = rewards[:, None] - rewards[None, :]
    return int(((group_ids[:, None] == group_ids[None, :]) & (diff > 0)).sum())


def _counted_pairs(all_rewards: torch.Tensor, groups: torch.Tensor, images: int) -> int:
    """Counted pairs of the prompt slots `groups` of the global batch (`all_rewards` in global sample order)."""
    if groups.numel() == 0:
        return 0
    index = (groups[:, None] * images + torch.arange(images)[None, :]).reshape(-1)
    return _pairs(all_rewards[index], index // images)
