"""PRDP (Deng et al., "Proximal Reward Difference Prediction for Large-Scale Reward Finetuning of Diffusion
Models", CVPR 2024): regress implicit-reward differences of same-prompt trajectory pairs onto reward differences
divided by beta, with per-step proximal clipping around the sampling snapshot (Algorithm 1)."""

from typing import Dict, List

import torch

from ..config import PRDPConfig
from ..losses import implicit_reward_error, prdp_loss
from ..rollout import Trajectories, micro_batched_log_probs, reference_model
from .base import BaseTrainer, _seed_for


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
        config = self.config
        trajectories = trajectories.to(self.device)
        rewards = rewards.to(self.device)
        generator = torch.Generator().manual_seed(_seed_for(config.seed, epoch, self.accelerator.process_index, 2))
        groups = torch.unique(trajectories.group_ids)
        totals = {"loss": 0.0, "grad_norm": 0.0, "skipped": 0.0, "implicit_reward_error": 0.0, "log_ratio_to_old": 0.0}
        num_updates = 0

        plans = None
        if trajectories.ref_log_probs is None:
            plan_generator = torch.Generator().manual_seed(
                _seed_for(config.seed, epoch, self.accelerator.process_index, 3)
            )
            plans = [self.train_step_plan(trajectories.stochastic, plan_generator)
                     for _ in range(config.train_num_inner_epochs)]
            trajectories.ref_log_probs = self._reference_log_probs(trajectories, plans)

        for inner in range(config.train_num_inner_epochs):
            # (num_samples, S)
            plan = plans[inner] if plans is not None else self.train_step_plan(trajectories.stochastic, generator)
            order = groups[torch.randperm(len(groups), generator=generator)]
            per_step = config.train_prompts_per_step or len(order)
            for start in range(0, len(order), per_step):
                chosen = order[start : start + per_step].to(trajectories.group_ids.device)
                samples = torch.nonzero(torch.isin(trajectories.group_ids, chosen)).squeeze(1)
                update = self._two_pass_update if config.train_two_pass else self._single_pass_update
                stats = update(trajectories, rewards, samples, plan[samples.cpu()])
                stats.update(self.optimizer_step())
                for key in totals:
                    totals[key] += stats[key]
                num_updates += 1

        return {key: value / max(num_updates, 1) for key, value in totals.items()}


    @torch.no_grad()
    def _reference_log_probs(self, trajectories: Trajectories, plans: List[torch.Tensor]) -> torch.Tensor:
        """`(B, T)` `log pi_ref` of the recorded transitions at the steps some plan trains (NaN elsewhere)."""
        num_samples, num_steps = trajectories.log_probs.shape
        rows, steps = planned_steps(plans, num_steps).nonzero(as_tuple=True)
        ref_log_probs = torch.full((num_samples, num_steps), float("nan"), device=self.device)
        rows, steps = rows.to(self.device), steps.to(self.device)
        module, context = reference_model(self.denoiser, self.ref_denoiser)
        was_training = self.denoiser.training
        self.denoiser.eval()
        with context():
            for positions, (log_probs, _, _) in self._micro_batches(module, trajectories, rows, steps):
                ref_log_probs[rows[positions], steps[positions]] = log_probs.float()
        self.denoiser.train(was_training)
        return ref_log_probs

    def _log_probs(self, trajectories: Trajectories, samples, plan) -> torch.Tensor:
        """`(n, S)` log pi_theta of the planned steps of `samples`, in micro-batches (graph kept if grad enabled)."""
        rows = samples.repeat_interleave(plan.shape[1]).to(self.device)
        steps = plan.reshape(-1).to(self.device)
        chunks = [log_probs for _, (log_probs, _, _) in self._micro_batches(self.denoiser, trajectories, rows, steps)]
        return torch.cat(chunks).view(samples.shape[0], plan.shape[1])

    def _micro_batches(self, denoiser, trajectories: Trajectories, rows, steps):
        return micro_batched_log_probs(
            self.family, denoiser, self.kernel, trajectories, rows, steps, self.config.sample_guidance_scale,
            self.config.train_micro_batch_size, self.accelerator.autocast,
        )

    def _loss_inputs(self, trajectories: Trajectories, rewards, samples, plan):
        index = samples.to(self.device)[:, None]
        steps = plan.to(self.device)
        return (
            trajectories.log_probs[index, steps],
            trajectories.ref_log_probs[index, steps],
            rewards[samples.to(self.device)],
            trajectories.group_ids[samples.to(trajectories.group_ids.device)],
        )

    def _single_pass_update(self, trajectories, rewards, samples, plan) -> float:
        """All planned steps of the chosen groups with one autograd graph (fastest; memory grows with n x S)."""
        old, ref, r, g = self._loss_inputs(trajectories, rewards, samples, plan)
        log_probs = self._log_probs(trajectories, samples, plan)
        loss = prdp_loss(log_probs, old, ref, r, g, self.config.train_beta, self.config.train_clip_eps)
        self.backward(loss)
        return self._stats(loss, log_probs, old, ref, r, g)

    def _two_pass_update(self, trajectories, rewards, samples, plan) -> float:
        """The same gradient with one micro-batch of activations at a time.

        The loss depends on theta only through the (n, S) log-probs, so dL/dtheta = sum_{i,t} (dL/dlogp_{i,t})
        dlogp_{i,t}/dtheta: a no-grad pass gives the log-probs and the coefficients dL/dlogp, then each micro-batch
        backpropagates `sum(coef * logp)`.
        """
        old, ref, r, g = self._loss_inputs(trajectories, rewards, samples, plan)
        with torch.no_grad():
            log_probs = self._log_probs(trajectories, samples, plan)
        leaf = log_probs.detach().requires_grad_(True)
        loss = prdp_loss(leaf, old, ref, r, g, self.config.train_beta, self.config.train_clip_eps)
        (coef,) = torch.autograd.grad(loss, leaf)
        rows = samples.repeat_interleave(plan.shape[1]).to(self.device)
        steps = plan.reshape(-1).to(self.device)
        coef = coef.reshape(-1)
        for positions, (lp, _, _) in self._micro_batches(self.denoiser, trajectories, rows, steps):
            self.backward((lp * coef[positions]).sum())
        return self._stats(loss, log_probs, old, ref, r, g)

    def _stats(self, loss, log_probs, old, ref, rewards, group_ids) -> Dict[str, float]:
        """Diagnostics of the policy before this update, from log-probs the update computed anyway."""
        log_probs = log_probs.detach()
        error = implicit_reward_error(log_probs, ref, rewards, group_ids, self.config.train_beta)
        return {"loss": loss.item(), "implicit_reward_error": error.item(),
                "log_ratio_to_old": (log_probs - old).abs().mean().item()}
