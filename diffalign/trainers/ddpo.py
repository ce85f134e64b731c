"""DDPO (Black et al., "Training Diffusion Models with Reinforcement Learning", ICLR 2024) with PPO clipping."""

import dataclasses
import logging
from typing import Dict, List, Tuple

import torch

from ..advantages import PerPromptStatTracker, batch_advantages, group_advantages
from ..config import DDPOConfig
from ..logprob import gaussian_kl
from ..losses import ppo_clipped_loss
from ..rollout import Trajectories, concat_trajectories, micro_batched_log_probs
from .base import BaseTrainer, _seed_for

logger = logging.getLogger("diffalign")


class DDPOTrainer(BaseTrainer):
    """Policy-gradient fine-tuning over denoising steps: advantages per prompt (DDPO), per group (GRPO) or per
    batch; the PPO-clipped surrogate over per-step ratios; an optional KL penalty to the base model.

    ```python
    from diffalign import DDPOConfig, DDPOTrainer

    config = DDPOConfig(model="digits", reward="digit_correctness", prompt_fn="digits", num_epochs=20)
    DDPOTrainer(config).train()
    ```
    """

    algorithm = "ddpo"

    def __init__(self, config: DDPOConfig, *args, **kwargs):
        self.stat_tracker = PerPromptStatTracker(config.per_prompt_buffer_size, config.per_prompt_min_count)
        # (trajectories on the CPU, advantages) of this process's last `train_reuse_epochs` epochs, oldest first
        self.replay: List[Tuple[Trajectories, torch.Tensor]] = []
        super().__init__(config, *args, **kwargs)

    def needs_reference(self) -> bool:
        return self.config.sample_compute_kl or self.config.train_kl_coef > 0

    def keep_reference_means(self) -> bool:
        return self.config.train_kl_coef > 0

    def advantages(self, trajectories: Trajectories, rewards, all_rewards, all_prompts) -> torch.Tensor:
        """Per-sample advantages of this process's samples (statistics use every process's rewards)."""
        config, acc = self.config, self.accelerator
        if config.advantage_mode == "per_prompt":
            all_advantages = self.stat_tracker.update(all_prompts, all_rewards)
            n = len(trajectories)
            advantages = all_advantages[acc.process_index * n : (acc.process_index + 1) * n]
        elif config.advantage_mode == "group":
            advantages = group_advantages(rewards, trajectories.group_ids, config.group_global_std)
        else:
            advantages = batch_advantages(all_rewards)
            n = len(trajectories)
            advantages = advantages[acc.process_index * n : (acc.process_index + 1) * n]
        return advantages.clamp(-config.train_adv_clip_max, config.train_adv_clip_max)

    def train_on_samples(self, trajectories, rewards, all_rewards, all_prompts: List[str], epoch: int) -> Dict:
        config = self.config
        advantages = self.advantages(trajectories, rewards, all_rewards, all_prompts)
        reused = sum(len(t) for t, _ in self.replay)
        if config.train_reuse_epochs:
            fresh = (_replayable(trajectories), advantages.cpu())
            trajectories = concat_trajectories([t for t, _ in self.replay] + [fresh[0]])
            advantages = torch.cat([a for _, a in self.replay] + [fresh[1]])
            self.replay = (self.replay + [fresh])[-config.train_reuse_epochs :]
        advantages = advantages.to(self.device)
        trajectories = trajectories.to(self.device)
        generator = torch.Generator().manual_seed(_seed_for(config.seed, epoch, self.accelerator.process_index, 2))
        num_samples = len(trajectories)
        totals = {"loss": 0.0, "approx_kl": 0.0, "clipfrac": 0.0, "kl_penalty": 0.0, "grad_norm": 0.0, "skipped": 0.0}
        num_updates = 0

        for _ in range(config.train_num_inner_epochs):
            order = torch.randperm(num_samples, generator=generator)
            plan = self.train_step_plan(trajectories.stochastic, generator)  # (num_samples, S)
            for start in range(0, num_samples, config.train_batch_size):
                samples = order[start : start + config.train_batch_size]
                rows = samples.repeat_interleave(plan.shape[1])  # (b * S,)
                steps = plan[samples].reshape(-1)
                stats = self._accumulate(trajectories, advantages, rows, steps)
                stats.update(self.optimizer_step())
                for key in totals:
                    totals[key] += stats.get(key, 0.0)
                num_updates += 1
        metrics = {key: value / max(num_updates, 1) for key, value in totals.items()}
        if config.train_reuse_epochs:
            metrics["reused_samples"] = reused * self.accelerator.num_processes  # all processes, like `images`
        return metrics

    def _accumulate(self, trajectories, advantages, rows, steps) -> Dict[str, float]:
        """Forward+backward of one optimizer step's (sample, step) rows, in micro-batches; returns averages."""
        config = self.config
        total = rows.shape[0]
        rows, steps = rows.to(self.device), steps.to(self.device)
        # Accumulated as tensors and read once per optimizer step (an `.item()` per micro-batch would sync the GPU).
        stats = {key: torch.zeros((), device=self.device) for key in ("loss", "approx_kl", "clipfrac", "kl_penalty")}
        for positions, (log_probs, mean, std) in micro_batched_log_probs(
            self.family, self.denoiser, self.kernel, trajectories, rows, steps, config.sample_guidance_scale,
            config.train_micro_batch_size, self.accelerator.autocast,
        ):
            r, s = rows[positions], steps[positions]
            weight = r.shape[0] / total
            out = ppo_clipped_loss(log_probs, trajectories.log_probs[r, s], advantages[r], config.train_clip_range)
            loss = out["loss"]
            if config.train_kl_coef > 0:
                kl = gaussian_kl(mean, trajectories.ref_means[r, s], std).mean()
                loss = loss + config.train_kl_coef * kl
                stats["kl_penalty"] += kl.detach() * weight
            # A non-finite loss gives a non-finite gradient norm, and `optimizer_step` then skips the update.
            self.backward(loss * weight)
            stats["loss"] += out["loss"].detach() * weight
            stats["approx_kl"] += out["approx_kl"] * weight
            stats["clipfrac"] += out["clipfrac"] * weight
        return {key: value.item() for key, value in stats.items()}

    def extra_state(self) -> dict:
        state = {**super().extra_state(), "stat_tracker": self.stat_tracker.state_dict()}
        if self.config.train_reuse_epochs:
            local = [{"advantages": a, **{f.name: getattr(t, f.name) for f in dataclasses.fields(t)}}
                     for t, a in self.replay]
            if self.accelerator.num_processes > 1:
                from accelerate.utils import gather_object

                state["replay"] = gather_object([local])
            else:
                state["replay"] = [local]
        return state

    def load_extra_state(self, state: dict):
        super().load_extra_state(state)
        if "stat_tracker" in state:
            self.stat_tracker.load_state_dict(state["stat_tracker"])
        replay = state.get("replay")
        if replay is None:
            return
        acc = self.accelerator
        if len(replay) != acc.num_processes:
            logger.warning("the checkpoint's replayed samples come from %d processes, this run has %d: starting "
                           "without them", len(replay), acc.num_processes)
            return
        self.replay = []
        for entry in replay[acc.process_index]:
            entry = dict(entry)
            advantages = entry.pop("advantages")
            self.replay.append((Trajectories(**entry), advantages))


def _replayable(trajectories: Trajectories) -> Trajectories:
    """What training needs of a batch, on the CPU (no images, no KL log)."""
    return dataclasses.replace(trajectories.to("cpu"), images=None, kl_to_ref=None)
