"""DDPO (Black et al., "Training Diffusion Models with Reinforcement Learning", ICLR 2024) with PPO clipping."""

import dataclasses
import logging
from typing import Dict, List, Tuple

import torch

from ..advantages import PerPromptStatTracker, batch_advantages, group_advantages
from .ddpo_config import DDPOConfig
from ..errors import ConfigError
from ..logprob import flow_step_dt, gaussian_kl
from ..losses import ppo_clipped_loss, ratio_norm_ppo_loss
from ..rollout import Trajectories, concat_trajectories, step_log_probs
from .base import BaseTrainer, TrainingBatch
from .update_plan import Rows

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

    config_class = DDPOConfig
    loss_stats = ("loss", "approx_kl", "clipfrac", "kl_penalty")

    def __init__(self, config: DDPOConfig, *args, **kwargs):
        self.stat_tracker = PerPromptStatTracker(config.per_prompt_buffer_size, config.per_prompt_min_count)
        # (trajectories on the CPU, advantages) of this process's last `train_reuse_epochs` epochs, oldest first
        self.replay: List[Tuple[Trajectories, torch.Tensor]] = []
        self.reused = 0  # replayed samples of the epoch being trained
        super().__init__(config, *args, **kwargs)
        if config.train_ratio_norm and self.kernel.name != "flow_sde":
            # RatioNorm's step-length weight and its published clip ranges are those of Flow-GRPO's SDE; a DDIM step
            # has no `dt` on that scale, so the option is refused rather than silently reinterpreted.
            raise ConfigError(f"train_ratio_norm (GRPO-Guard) needs a flow-matching model sampled with Flow-GRPO's "
                              f"SDE; '{config.model}' samples with the {self.kernel.name} kernel")

    def needs_reference(self) -> bool:
        return self.config.sample_compute_kl or self.config.train_kl_coef > 0

    def keep_reference_means(self) -> bool:
        return self.config.train_kl_coef > 0

    def keep_step_means(self) -> bool:
        return self.config.train_ratio_norm  # RatioNorm's bias needs the sampling policy's step means

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

    def training_batch(self, trajectories, rewards, all_rewards, all_prompts: List[str], epoch: int) -> TrainingBatch:
        """This epoch's samples with their advantages, after the replayed ones of the last `train_reuse_epochs`."""
        config = self.config
        advantages = self.advantages(trajectories, rewards, all_rewards, all_prompts)
        self.reused = sum(len(t) for t, _ in self.replay)
        if config.train_reuse_epochs:
            fresh = (_replayable(trajectories), advantages.cpu())
            trajectories = concat_trajectories([t for t, _ in self.replay] + [fresh[0]])
            advantages = torch.cat([a for _, a in self.replay] + [fresh[1]])
            self.replay = (self.replay + [fresh])[-config.train_reuse_epochs :]
        return TrainingBatch(trajectories.to(self.device), advantages=advantages.to(self.device))

    def model_outputs(self, model, batch: TrainingBatch, rows: Rows):
        with self.accelerator.autocast():
            return step_log_probs(self.family, model, self.kernel, batch.trajectories, rows.samples, rows.steps,
                                  self.config.sample_guidance_scale)

    def compute_loss(self, outputs, batch: TrainingBatch, rows: Rows):
        """The PPO-clipped surrogate of a micro-batch of (sample, step) rows (with GRPO-Guard's RatioNorm when
        `train_ratio_norm`), plus the KL penalty to the base."""
        config, trajectories = self.config, batch.trajectories
        log_probs, mean, std = outputs
        r, s = rows.samples, rows.steps
        if config.train_ratio_norm:
            t = trajectories.timesteps.to(mean.device)[s]
            dt = -flow_step_dt(self.family.scheduler, t, len(t), mean.device)
            out = ratio_norm_ppo_loss(log_probs, trajectories.log_probs[r, s], mean, trajectories.step_means[r, s],
                                      std, dt, batch.advantages[r], config.train_clip_range)
        else:
            out = ppo_clipped_loss(log_probs, trajectories.log_probs[r, s], batch.advantages[r],
                                   config.train_clip_range)
        loss = out["loss"]
        stats = {"loss": out["loss"].detach(), "approx_kl": out["approx_kl"], "clipfrac": out["clipfrac"]}
        if config.train_kl_coef > 0:
            kl = gaussian_kl(mean, trajectories.ref_means[r, s], std).mean()
            loss = loss + config.train_kl_coef * kl
            stats["kl_penalty"] = kl.detach()
        return loss, stats

    def epoch_records(self, batch: TrainingBatch) -> Dict[str, float]:
        if not self.config.train_reuse_epochs:
            return {}
        return {"reused_samples": self.reused * self.accelerator.num_processes}  # all processes, like `images`

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
