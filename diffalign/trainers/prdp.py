"""PRDP (Deng et al., "Proximal Reward Difference Prediction for Large-Scale Reward Finetuning of Diffusion
Models", CVPR 2024): regress implicit-reward differences of same-prompt trajectory pairs onto reward differences
divided by beta, with per-step proximal clipping around the sampling snapshot (Algorithm 1)."""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ..config import PRDPConfig
from ..distributed import max_count, micro_batch_count, micro_batch_slots
from ..losses import implicit_reward_error, prdp_loss
from ..rollout import Trajectories, step_log_probs
from ..utils.peft_utils import reference_model
from ..utils.torch_utils import seed_for
from .base import BaseTrainer, GlobalLayout


def planned_steps(plans: List[torch.Tensor], num_steps: int) -> torch.Tensor:
    """`(num_samples, num_steps)` mask of the steps that any of the `(num_samples, S)` step plans trains."""
    mask = torch.zeros(plans[0].shape[0], num_steps, dtype=torch.bool)
    for plan in plans:
        mask.scatter_(1, plan, True)
    return mask


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

    algorithm = "prdp"

    def __init__(self, config: PRDPConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)

    def needs_reference(self) -> bool:
        # pi_ref at every sampling step costs one more UNet pass per step; when only a fraction of the steps is
        # trained (and no per-epoch KL is asked for), `_reference_log_probs` computes just the steps that are used.
        return self.config.sample_compute_kl or self.config.num_train_steps == self.config.num_sde_steps

    def train_on_samples(self, trajectories, rewards, all_rewards, all_prompts: List[str], epoch: int) -> Dict:
        """K inner epochs over the epoch's global batch: the step plans and the order of the prompt groups are drawn
        for the global batch (the same on every process and for any number of processes); each optimizer step takes
        `train_prompts_per_step` groups (all by default), each process backpropagates its own groups' pairs, and the
        loss is the mean over the step's pairs on all processes."""
        config, acc = self.config, self.accelerator
        trajectories = trajectories.to(self.device)
        rewards = rewards.to(self.device)
        n, images, micro = len(trajectories), config.sample_images_per_prompt, config.train_micro_batch_size
        layout = GlobalLayout(n, n, acc.num_processes, acc.process_index)
        offset = acc.process_index * n
        num_groups = layout.num_global // images
        group_owner = layout.owner(torch.arange(num_groups) * images)
        all_rewards = all_rewards.detach().cpu().float()
        stochastic = layout.global_rows(trajectories.stochastic.cpu())
        generator = torch.Generator().manual_seed(seed_for(config.seed, epoch, 2))
        totals = {"loss": 0.0, "grad_norm": 0.0, "skipped": 0.0, "implicit_reward_error": 0.0, "log_ratio_to_old": 0.0}
        num_updates = 0

        plans = None
        if trajectories.ref_log_probs is None:
            plan_generator = torch.Generator().manual_seed(seed_for(config.seed, epoch, 3))
            plans = [self.train_step_plan(stochastic, plan_generator) for _ in range(config.train_num_inner_epochs)]
            num_steps = trajectories.log_probs.shape[1]
            slots = max_count(micro_batch_count(int(planned_steps([p[r * n : (r + 1) * n] for p in plans],
                                                                  num_steps).sum()), micro)
                              for r in range(acc.num_processes))
            trajectories.ref_log_probs = self._reference_log_probs(
                trajectories, [p[offset : offset + n] for p in plans], slots)

        for inner in range(config.train_num_inner_epochs):
            # (global samples, S)
            plan = plans[inner] if plans is not None else self.train_step_plan(stochastic, generator)
            order = torch.randperm(num_groups, generator=generator)
            per_step = config.train_prompts_per_step or num_groups
            for start in range(0, num_groups, per_step):
                chosen = order[start : start + per_step]
                mine = chosen[group_owner[chosen] == acc.process_index]
                samples = torch.nonzero(torch.isin(trajectories.group_ids.cpu(), mine)).squeeze(1)
                rows = [int((group_owner[chosen] == r).sum()) * images * plan.shape[1]
                        for r in range(acc.num_processes)]
                step = UpdatePlan(
                    local_pairs=_counted_pairs(all_rewards, mine, images),
                    global_pairs=_counted_pairs(all_rewards, chosen, images),
                    global_rows=sum(rows),
                    slots=max_count(micro_batch_count(x, micro) for x in rows),
                    num_processes=acc.num_processes,
                )
                two_pass = config.train_two_pass if config.train_two_pass is not None else step.slots > 1
                update = self._two_pass_update if two_pass else self._single_pass_update
                stats = update(trajectories, rewards, samples, plan[offset + samples], step)
                stats.update(self.optimizer_step())
                for key in totals:
                    totals[key] += stats[key]
                num_updates += 1

        return {key: value / max(num_updates, 1) for key, value in totals.items()}

    @torch.no_grad()
    def _reference_log_probs(self, trajectories: Trajectories, plans: List[torch.Tensor],
                             slots: Optional[int] = None) -> torch.Tensor:
        """`(B, T)` `log pi_ref` of the recorded transitions at the steps some plan trains (NaN elsewhere), in
        `slots` micro-batches (padded so that every process runs as many forwards)."""
        num_samples, num_steps = trajectories.log_probs.shape
        rows, steps = planned_steps(plans, num_steps).nonzero(as_tuple=True)
        ref_log_probs = torch.full((num_samples, num_steps), float("nan"), device=self.device)
        rows, steps = rows.to(self.device), steps.to(self.device)
        micro = self.config.train_micro_batch_size
        slots = slots if slots is not None else max_count([micro_batch_count(rows.shape[0], micro)])
        module, context = reference_model(self.denoiser, self.ref_denoiser)
        was_training = self.denoiser.training
        self.denoiser.eval()
        with context():
            for positions in micro_batch_slots(rows.shape[0], micro, slots):
                if positions is None:
                    self._pad_forward(module, trajectories)
                    continue
                log_probs = self._forward_rows(module, trajectories, rows[positions], steps[positions])
                ref_log_probs[rows[positions], steps[positions]] = log_probs.float()
        self.denoiser.train(was_training)
        return ref_log_probs

    def _forward_rows(self, denoiser, trajectories: Trajectories, rows, steps) -> torch.Tensor:
        with self.accelerator.autocast():
            log_probs, _, _ = step_log_probs(self.family, denoiser, self.kernel, trajectories, rows, steps,
                                             self.config.sample_guidance_scale)
        return log_probs

    def _pad_forward(self, denoiser, trajectories: Trajectories) -> torch.Tensor:
        """A zero-weight forward of a recorded transition: keeps the number of forwards equal across processes when
        the global batch puts fewer rows on this one (a sharded denoiser gathers its weights in every forward)."""
        row = torch.zeros(1, dtype=torch.long, device=self.device)
        step = trajectories.stochastic[0].nonzero()[:1, 0].to(self.device)
        return self._forward_rows(denoiser, trajectories, row, step).sum() * 0.0

    def _log_probs(self, trajectories: Trajectories, samples, plan, slots: Optional[int] = None):
        """`((n, S) log pi_theta of the planned steps of `samples`, padding term)`, in `slots` micro-batches (graph
        kept if grad is enabled; the padding term is a zero that keeps the padding forwards in the graph)."""
        rows = samples.repeat_interleave(plan.shape[1]).to(self.device)
        steps = plan.reshape(-1).to(self.device)
        micro = self.config.train_micro_batch_size
        slots = slots if slots is not None else max_count([micro_batch_count(rows.shape[0], micro)])
        chunks, pad = [], torch.zeros((), device=self.device)
        for positions in micro_batch_slots(rows.shape[0], micro, slots):
            if positions is None:
                pad = pad + self._pad_forward(self.denoiser, trajectories)
            else:
                chunks.append(self._forward_rows(self.denoiser, trajectories, rows[positions], steps[positions]))
        log_probs = torch.cat(chunks) if chunks else torch.zeros(0, device=self.device)
        return log_probs.view(samples.shape[0], plan.shape[1]), pad

    def _loss_inputs(self, trajectories: Trajectories, rewards, samples, plan):
        index = samples.to(self.device)[:, None]
        steps = plan.to(self.device)
        return (
            trajectories.log_probs[index, steps],
            trajectories.ref_log_probs[index, steps],
            rewards[samples.to(self.device)],
            trajectories.group_ids[samples.to(trajectories.group_ids.device)],
        )

    def _local_plan(self, rewards, samples, plan, group_ids) -> "UpdatePlan":
        """The plan of an update that this process alone makes (a direct call, as in the tests)."""
        pairs = _pairs(rewards.detach().float().cpu()[samples.cpu()], group_ids.cpu())
        rows = samples.shape[0] * plan.shape[1]
        return UpdatePlan(local_pairs=pairs, global_pairs=pairs, global_rows=rows,
                          slots=max_count([micro_batch_count(rows, self.config.train_micro_batch_size)]),
                          num_processes=1)

    def _single_pass_update(self, trajectories, rewards, samples, plan, step: Optional["UpdatePlan"] = None) -> Dict:
        """All planned steps of the chosen groups with one autograd graph (fastest; memory grows with n x S)."""
        old, ref, r, g = self._loss_inputs(trajectories, rewards, samples, plan)
        step = step or self._local_plan(rewards, samples, plan, g)
        log_probs, pad = self._log_probs(trajectories, samples, plan, step.slots)
        loss = prdp_loss(log_probs, old, ref, r, g, self.config.train_beta, self.config.train_clip_eps)
        with self.gradient_sync(last=True):
            self.backward((loss + pad) * step.scale)
        return self._stats(step, loss, log_probs, old, ref, r, g)

    def _two_pass_update(self, trajectories, rewards, samples, plan, step: Optional["UpdatePlan"] = None) -> Dict:
        """The same gradient with one micro-batch of activations at a time.

        The loss depends on theta only through the (n, S) log-probs, so dL/dtheta = sum_{i,t} (dL/dlogp_{i,t})
        dlogp_{i,t}/dtheta: a no-grad pass gives the log-probs and the coefficients dL/dlogp, then each micro-batch
        backpropagates `sum(coef * logp)`; gradients are reduced across processes in the last backward.
        """
        old, ref, r, g = self._loss_inputs(trajectories, rewards, samples, plan)
        step = step or self._local_plan(rewards, samples, plan, g)
        with torch.no_grad():
            log_probs, _ = self._log_probs(trajectories, samples, plan, step.slots)
        leaf = log_probs.detach().requires_grad_(True)
        loss = prdp_loss(leaf, old, ref, r, g, self.config.train_beta, self.config.train_clip_eps)
        (coef,) = torch.autograd.grad(loss, leaf)
        rows = samples.repeat_interleave(plan.shape[1]).to(self.device)
        steps = plan.reshape(-1).to(self.device)
        coef = coef.reshape(-1) * step.scale
        micro = self.config.train_micro_batch_size
        for i, positions in enumerate(micro_batch_slots(rows.shape[0], micro, step.slots)):
            if positions is None:
                term = self._pad_forward(self.denoiser, trajectories)
            else:
                term = (self._forward_rows(self.denoiser, trajectories, rows[positions], steps[positions])
                        * coef[positions]).sum()
            with self.gradient_sync(last=i == step.slots - 1):
                self.backward(term)
        return self._stats(step, loss, log_probs, old, ref, r, g)

    def _stats(self, step: "UpdatePlan", loss, log_probs, old, ref, rewards, group_ids) -> Dict[str, float]:
        """Diagnostics of the policy before this update (over the step's pairs and rows on every process), from
        log-probs the update computed anyway."""
        log_probs = log_probs.detach()
        error = implicit_reward_error(log_probs, ref, rewards, group_ids, self.config.train_beta)
        sums = torch.stack([loss.detach().float() * step.local_pairs, error.float() * step.local_pairs,
                            (log_probs - old).abs().sum().float()])
        if step.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        loss_sum, error_sum, ratio_sum = sums.tolist()
        pairs = max(step.global_pairs, 1)
        return {"loss": loss_sum / pairs, "implicit_reward_error": error_sum / pairs,
                "log_ratio_to_old": ratio_sum / max(step.global_rows, 1)}


@dataclass
class UpdatePlan:
    """One PRDP optimizer step across processes: the counted pairs here and on all processes, the rows of all
    processes, and the number of forwards each process runs (`slots`, padded)."""

    local_pairs: int
    global_pairs: int
    global_rows: int
    slots: int
    num_processes: int

    @property
    def scale(self) -> float:
        """Weight of this process's mean pair loss: its share of the step's pairs, times the process count that
        the engine's gradient average divides by."""
        return self.num_processes * self.local_pairs / self.global_pairs if self.global_pairs else 0.0


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
