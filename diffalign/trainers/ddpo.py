"""DDPO (Black et al., "Training Diffusion Models with Reinforcement Learning", ICLR 2024) with PPO clipping."""

import dataclasses
import logging
from typing import Dict, List, Tuple

import torch

from ..advantages import PerPromptStatTracker, batch_advantages, group_advantages
from ..config import DDPOConfig
from ..distributed import max_count, micro_batch_count, micro_batch_slots
from ..logprob import gaussian_kl
from ..losses import ppo_clipped_loss
from ..rollout import Trajectories, concat_trajectories, step_log_probs
from ..utils.torch_utils import seed_for
from .base import BaseTrainer, GlobalLayout

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
        """Per-sample advantages of this process's samples, computed on the epoch's global batch (`all_rewards` in
        global sample order; a group is a prompt slot's `sample_images_per_prompt` images), so they do not depend on
        the number of processes."""
        config, acc = self.config, self.accelerator
        n = len(trajectories)
        offset = acc.process_index * n
        if config.advantage_mode == "per_prompt":
            all_advantages = self.stat_tracker.update(all_prompts, all_rewards)
        elif config.advantage_mode == "group":
            slots = torch.arange(len(all_rewards)) // config.sample_images_per_prompt
            all_advantages = group_advantages(all_rewards, slots, config.group_global_std)
        else:
            all_advantages = batch_advantages(all_rewards)
        advantages = all_advantages[offset : offset + n]
        return advantages.clamp(-config.train_adv_clip_max, config.train_adv_clip_max)

    def train_on_samples(self, trajectories, rewards, all_rewards, all_prompts: List[str], epoch: int) -> Dict:
        """K inner epochs over the global batch: each optimizer step takes `train_batch_size` samples of a global
        permutation (the same on every process and for any number of processes); each process backpropagates the
        steps of its own samples among them, weighted by the global row count, and the engine averages."""
        config, acc = self.config, self.accelerator
        advantages = self.advantages(trajectories, rewards, all_rewards, all_prompts)
        reused = sum(len(t) for t, _ in self.replay)
        if config.train_reuse_epochs:
            fresh = (_replayable(trajectories), advantages.cpu())
            trajectories = concat_trajectories([t for t, _ in self.replay] + [fresh[0]])
            advantages = torch.cat([a for _, a in self.replay] + [fresh[1]])
            self.replay = (self.replay + [fresh])[-config.train_reuse_epochs :]
        advantages = advantages.to(self.device)
        trajectories = trajectories.to(self.device)
        generator = torch.Generator().manual_seed(seed_for(config.seed, epoch, 2))
        layout = GlobalLayout(len(trajectories), len(rewards), acc.num_processes, acc.process_index)
        stochastic = layout.global_rows(trajectories.stochastic.cpu())
        totals = {"loss": 0.0, "approx_kl": 0.0, "clipfrac": 0.0, "kl_penalty": 0.0, "grad_norm": 0.0, "skipped": 0.0}
        num_updates = 0

        for _ in range(config.train_num_inner_epochs):
            order = torch.randperm(layout.num_global, generator=generator)
            plan = self.train_step_plan(stochastic, generator)  # (global samples, S)
            for start in range(0, layout.num_global, config.train_batch_size):
                chosen = order[start : start + config.train_batch_size]
                mine = layout.owner(chosen) == acc.process_index
                samples = layout.local_index(chosen[mine])
                rows = samples.repeat_interleave(plan.shape[1])  # (b * S,)
                steps = plan[chosen[mine]].reshape(-1)
                slots = max_count(micro_batch_count(int((layout.owner(chosen) == r).sum()) * plan.shape[1],
                                                    config.train_micro_batch_size) for r in range(acc.num_processes))
                stats = self._accumulate(trajectories, advantages, rows, steps, chosen.shape[0] * plan.shape[1], slots)
                stats.update(self.optimizer_step())
                for key in totals:
                    totals[key] += stats.get(key, 0.0)
                num_updates += 1
        metrics = {key: value / max(num_updates, 1) for key, value in totals.items()}
        if config.train_reuse_epochs:
            metrics["reused_samples"] = reused * self.accelerator.num_processes  # all processes, like `images`
        return metrics

    def _accumulate(self, trajectories, advantages, rows, steps, total_rows=None, slots=None) -> Dict[str, float]:
        """Forward+backward of this process's (sample, step) rows of one optimizer step, in `slots` micro-batches
        (padded with zero-weight ones so that every process runs as many); gradients are reduced in the last
        backward. Each row's loss is weighted by `1 / total_rows` (the global rows of the step) and the engine's
        average over processes is undone, so the step's gradient is the global batch mean. Returns the step's global
        averages."""
        config, acc = self.config, self.accelerator
        total = total_rows if total_rows is not None else rows.shape[0]
        if slots is None:
            slots = max_count([micro_batch_count(rows.shape[0], config.train_micro_batch_size)])
        rows, steps = rows.to(self.device), steps.to(self.device)
        # Accumulated as tensors and read once per optimizer step (an `.item()` per micro-batch would sync the GPU).
        stats = torch.zeros(4, device=self.device)  # loss, approx_kl, clipfrac, kl_penalty
        for i, positions in enumerate(micro_batch_slots(rows.shape[0], config.train_micro_batch_size, slots)):
            pad = positions is None
            if pad:  # a zero-weight forward of any recorded transition: the same number of forwards everywhere
                positions = slice(0, 1)
                r = torch.zeros(1, dtype=torch.long, device=self.device)
                s = trajectories.stochastic[0].nonzero()[:1, 0]
            else:
                r, s = rows[positions], steps[positions]
            with acc.autocast():
                log_probs, mean, std = step_log_probs(self.family, self.denoiser, self.kernel, trajectories, r, s,
                                                      config.sample_guidance_scale)
            weight = 0.0 if pad else r.shape[0] / total
            out = ppo_clipped_loss(log_probs, trajectories.log_probs[r, s], advantages[r], config.train_clip_range)
            loss = out["loss"]
            if config.train_kl_coef > 0:
                kl = gaussian_kl(mean, trajectories.ref_means[r, s], std).mean()
                loss = loss + config.train_kl_coef * kl
                stats[3] += kl.detach() * weight
            # A non-finite loss gives a non-finite gradient norm, and `optimizer_step` then skips the update.
            with self.gradient_sync(last=i == slots - 1):
                self.backward(loss * (weight * acc.num_processes))
            stats[0] += out["loss"].detach() * weight
            stats[1] += out["approx_kl"] * weight
            stats[2] += out["clipfrac"] * weight
        if acc.num_processes > 1:
            stats = acc.reduce(stats, reduction="sum")
        return dict(zip(("loss", "approx_kl", "clipfrac", "kl_penalty"), stats.tolist()))

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
        if len(replay) != acc.num_processes:  # written by another number of processes: regroup the global batches
            replay = _regroup(replay, acc.num_processes)
        self.replay = []
        for entry in replay[acc.process_index]:
            entry = dict(entry)
            advantages = entry.pop("advantages")
            self.replay.append((Trajectories(**entry), advantages))


def _replayable(trajectories: Trajectories) -> Trajectories:
    """What training needs of a batch, on the CPU (no images, no KL log)."""
    return dataclasses.replace(trajectories.to("cpu"), images=None, kl_to_ref=None)


def _regroup(replay: list, num_processes: int) -> list:
    """Replayed samples saved by another number of processes, for `num_processes`: each replayed epoch's blocks, in
    the saved process order, are that epoch's global batch; process `p` takes its block `p` of it."""
    regrouped = [[] for _ in range(num_processes)]
    for epoch in range(len(replay[0])):
        entries = [dict(saved[epoch]) for saved in replay]
        advantages = torch.cat([entry.pop("advantages") for entry in entries])
        batch = concat_trajectories([Trajectories(**entry) for entry in entries])
        size = len(batch) // num_processes
        for process in range(num_processes):
            index = torch.arange(process * size, (process + 1) * size)
            part = batch.select(index)
            regrouped[process].append({"advantages": advantages[index],
                                       **{f.name: getattr(part, f.name) for f in dataclasses.fields(part)}})
    return regrouped
