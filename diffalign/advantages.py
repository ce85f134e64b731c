"""Advantage estimates for policy-gradient training: reward normalisation per prompt, per group or per batch."""

from collections import deque
from typing import Dict, List

import numpy as np
import torch


def batch_advantages(rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`A = (r - mean(r)) / (std(r) + eps)` over the whole batch (DDPO without prompt tracking)."""
    rewards = rewards.float()
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, global_std: bool = False, eps: float = 1e-4):
    """GRPO-style advantages: `A_i = (r_i - mean_g) / (std + eps)` within each group g (same prompt).

    Args:
        rewards (`torch.Tensor`): `(B,)`.
        group_ids (`torch.Tensor`): `(B,)`, equal for samples of the same prompt.
        global_std (`bool`): divide by the batch std instead of the group's (Flow-GRPO's default), which keeps
            groups with near-identical rewards from being blown up.
        eps (`float`): added to the std.
    """
    rewards = rewards.float()
    advantages = torch.zeros_like(rewards)
    batch_std = rewards.std(unbiased=False)
    for group in torch.unique(group_ids):
        mask = group_ids == group
        group_rewards = rewards[mask]
        std = batch_std if global_std else group_rewards.std(unbiased=False)
        advantages[mask] = (group_rewards - group_rewards.mean()) / (std + eps)
    return advantages


class PerPromptStatTracker:
    """DDPO's per-prompt running reward statistics (`ddpo_pytorch/stat_tracking.py`).

    Each prompt keeps its last `buffer_size` rewards across epochs; advantages are normalised with that buffer's
    mean and std once it holds `min_count` rewards, and with the whole batch's statistics before.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.stats: Dict[str, deque] = {}

    def update(self, prompts: List[str], rewards: torch.Tensor) -> torch.Tensor:
        rewards_np = rewards.detach().float().cpu().numpy()
        advantages = np.empty_like(rewards_np)
        for prompt in dict.fromkeys(prompts):
            # compared in Python: numpy would turn `prompt` into a plain string first, dropping a ConditionedPrompt's
            # condition images (the same instruction on two images is two prompts)
            mask = np.fromiter((p == prompt for p in prompts), dtype=bool, count=len(prompts))
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards_np[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = rewards_np.mean(), rewards_np.std() + 1e-6
            else:
                mean, std = np.mean(buffer), np.std(buffer) + 1e-6
            advantages[mask] = (rewards_np[mask] - mean) / std
        return torch.from_numpy(advantages)

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "stats": {prompt: list(buffer) for prompt, buffer in self.stats.items()}}

    def load_state_dict(self, state: dict):
        self.buffer_size = state["buffer_size"]
        self.min_count = state["min_count"]
        self.stats = {p: deque(values, maxlen=self.buffer_size) for p, values in state["stats"].items()}
