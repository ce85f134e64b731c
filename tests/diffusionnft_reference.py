# SPDX-FileCopyrightText: Copyright (c) 2025 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
# SPDX-License-Identifier: Apache-2.0
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
# http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#
# Reference for tests/test_nft_math.py: NVIDIA's DiffusionNFT loss, forward noising, old-policy decay schedule and
# advantage tracker, kept verbatim so diffalign's port (`diffalign/losses.py` `nft_loss` and
# `optimality_probability`, `diffalign/forward_process.py`) is checked against the original rather than against
# itself.
#
# Source: https://github.com/NVlabs/DiffusionNFT, commit 24af5554898d85e93efa492f42b5e9cdf4156e9b (both files last
# changed in d8c606d55be8d90b12d8aa0c3c75e15876aacd41), licence Apache-2.0 (the repository's LICENSE; the SPDX header
# above is the one of scripts/train_nft_sd3.py).
#
# What was copied and what was changed:
# - `return_decay`: scripts/train_nft_sd3.py:169-189, unchanged.
# - `PerPromptStatTracker`: flow_grpo/stat_tracking.py:1-73 (its two imports, at the top here, and the class),
#   unchanged. The file has no header of its own; the repository builds on the Flow-GRPO codebase (its README).
# - The loss, the forward noising and the old-policy update are inline in `main()`. They were cut out into the three
#   functions below; each body is the original line range, dedented as a block (16, 16 and 4 spaces) and otherwise
#   unchanged, between `# ---- scripts/train_nft_sd3.py:A-B ----` and `# ---- end ----` marks. Only the `def` lines
#   (their parameters are the names the range reads from `main()`'s scope) and the `return` lines (the names it
#   defines that the tests compare) were added. Check with, for the loss:
#     git show 24af555:scripts/train_nft_sd3.py | sed -n 908,978p | sed 's/^ \{16\}//' \
#       | diff - <(sed -n '/^    # ---- scripts.*:908-978/,/^    # ---- end/p' tests/diffusionnft_reference.py | sed '1d;$d')
#   The loss range starts after the three model forwards (scripts/train_nft_sd3.py:872-907: `old_prediction` with
#   the "old" adapter under no_grad, `forward_prediction` with the "default" adapter, `ref_forward_prediction` with
#   the adapters disabled), which the tests replace by tensors.

import numpy as np
from collections import deque

import torch


def return_decay(step, decay_type):
    if decay_type == 0:
        flat = 0
        uprate = 0.0
        uphold = 0.0
    elif decay_type == 1:
        flat = 0
        uprate = 0.001
        uphold = 0.5
    elif decay_type == 2:
        flat = 75
        uprate = 0.0075
        uphold = 0.999
    else:
        assert False

    if step < flat:
        return 0.0
    else:
        decay = (step - flat) * uprate
        return min(decay, uphold)


class PerPromptStatTracker:
    def __init__(self, global_std=False):
        self.global_std = global_std
        self.stats = {}
        self.history_prompts = set()

    # exp reward is for rwr
    def update(self, prompts, rewards, exp=False):
        prompts = np.array(prompts)
        rewards = np.array(rewards, dtype=np.float64)
        unique = np.unique(prompts)
        advantages = np.empty_like(rewards) * 0.0
        for prompt in unique:
            prompt_rewards = rewards[prompts == prompt]
            if prompt not in self.stats:
                self.stats[prompt] = []
            self.stats[prompt].extend(prompt_rewards)
            self.history_prompts.add(hash(prompt))  # Add hash of prompt to history_prompts
        for prompt in unique:
            self.stats[prompt] = np.stack(self.stats[prompt])
            prompt_rewards = rewards[prompts == prompt]  # Fix: Recalculate prompt_rewards for each prompt
            mean = np.mean(self.stats[prompt], axis=0, keepdims=True)
            if self.global_std:
                std = np.std(rewards, axis=0, keepdims=True) + 1e-4  # Use global std of all rewards
            else:
                std = np.std(self.stats[prompt], axis=0, keepdims=True) + 1e-4
            advantages[prompts == prompt] = (prompt_rewards - mean) / std
        return advantages

    def get_stats(self):
        avg_group_size = sum(len(v) for v in self.stats.values()) / len(self.stats) if self.stats else 0
        history_prompts = len(self.history_prompts)
        return avg_group_size, history_prompts

    def clear(self):
        self.stats = {}

    def get_mean_of_top_rewards(self, top_percentage):
        if not self.stats:
            return 0.0

        assert 0 <= top_percentage <= 100

        per_prompt_top_means = []
        for prompt_rewards in self.stats.values():
            if isinstance(prompt_rewards, list):
                rewards = np.array(prompt_rewards)
            else:
                rewards = prompt_rewards

            if rewards.size == 0:
                continue

            if top_percentage == 100:
                per_prompt_top_means.append(np.mean(rewards))
                continue

            lower_bound_percentile = 100 - top_percentage
            threshold = np.percentile(rewards, lower_bound_percentile)

            top_rewards = rewards[rewards >= threshold]

            if top_rewards.size > 0:
                per_prompt_top_means.append(np.mean(top_rewards))

        if not per_prompt_top_means:
            return 0.0

        return np.mean(per_prompt_top_means)


def forward_noising(train_sample_batch, j_idx):
    # ---- scripts/train_nft_sd3.py:862-870 ----
    x0 = train_sample_batch["latents_clean"]

    t = train_sample_batch["timesteps"][:, j_idx] / 1000.0

    t_expanded = t.view(-1, *([1] * (len(x0.shape) - 1)))

    noise = torch.randn_like(x0.float())

    xt = (1 - t_expanded) * x0 + t_expanded * noise
    # ---- end ----
    return x0, t, t_expanded, noise, xt


def nft_loss_terms(
    config, train_sample_batch, j_idx, x0, xt, t_expanded, forward_prediction, old_prediction, ref_forward_prediction
):
    # ---- scripts/train_nft_sd3.py:908-978 ----
    loss_terms = {}
    # Policy Gradient Loss
    advantages_clip = torch.clamp(
        train_sample_batch["advantages"][:, j_idx],
        -config.train.adv_clip_max,
        config.train.adv_clip_max,
    )
    if hasattr(config.train, "adv_mode"):
        if config.train.adv_mode == "positive_only":
            advantages_clip = torch.clamp(advantages_clip, 0, config.train.adv_clip_max)
        elif config.train.adv_mode == "negative_only":
            advantages_clip = torch.clamp(advantages_clip, -config.train.adv_clip_max, 0)
        elif config.train.adv_mode == "one_only":
            advantages_clip = torch.where(
                advantages_clip > 0, torch.ones_like(advantages_clip), torch.zeros_like(advantages_clip)
            )
        elif config.train.adv_mode == "binary":
            advantages_clip = torch.sign(advantages_clip)

    # normalize advantage
    normalized_advantages_clip = (advantages_clip / config.train.adv_clip_max) / 2.0 + 0.5
    r = torch.clamp(normalized_advantages_clip, 0, 1)
    loss_terms["x0_norm"] = torch.mean(x0**2).detach()
    loss_terms["x0_norm_max"] = torch.max(x0**2).detach()
    loss_terms["old_deviate"] = torch.mean((forward_prediction - old_prediction) ** 2).detach()
    loss_terms["old_deviate_max"] = torch.max((forward_prediction - old_prediction) ** 2).detach()
    positive_prediction = config.beta * forward_prediction + (1 - config.beta) * old_prediction.detach()
    implicit_negative_prediction = (
        1.0 + config.beta
    ) * old_prediction.detach() - config.beta * forward_prediction

    # adaptive weighting
    x0_prediction = xt - t_expanded * positive_prediction
    with torch.no_grad():
        weight_factor = (
            torch.abs(x0_prediction.double() - x0.double())
            .mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
            .clip(min=0.00001)
        )
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    negative_x0_prediction = xt - t_expanded * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = (
            torch.abs(negative_x0_prediction.double() - x0.double())
            .mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
            .clip(min=0.00001)
        )
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(
        dim=tuple(range(1, x0.ndim))
    )

    ori_policy_loss = r * positive_loss / config.beta + (1.0 - r) * negative_loss / config.beta
    policy_loss = (ori_policy_loss * config.train.adv_clip_max).mean()

    loss = policy_loss
    loss_terms["policy_loss"] = policy_loss.detach()
    loss_terms["unweighted_policy_loss"] = ori_policy_loss.mean().detach()

    kl_div_loss = ((forward_prediction - ref_forward_prediction) ** 2).mean(
        dim=tuple(range(1, x0.ndim))
    )

    loss += config.train.beta * torch.mean(kl_div_loss)
    kl_div_loss = torch.mean(kl_div_loss)
    loss_terms["kl_div_loss"] = torch.mean(kl_div_loss).detach()
    loss_terms["kl_div"] = torch.mean(
        ((forward_prediction - ref_forward_prediction) ** 2).mean(dim=tuple(range(1, x0.ndim)))
    ).detach()
    loss_terms["old_kl_div"] = torch.mean(
        ((old_prediction - ref_forward_prediction) ** 2).mean(dim=tuple(range(1, x0.ndim)))
    ).detach()
    # ---- end ----
    return loss, loss_terms, r


def old_policy_update(global_step, config, transformer_trainable_parameters, old_transformer_trainable_parameters):
    # ---- scripts/train_nft_sd3.py:1034-1039 ----
    with torch.no_grad():
        decay = return_decay(global_step, config.decay_type)
        for src_param, tgt_param in zip(
            transformer_trainable_parameters, old_transformer_trainable_parameters, strict=True
        ):
            tgt_param.data.copy_(tgt_param.detach().data * decay + src_param.detach().clone().data * (1.0 - decay))
    # ---- end ----
    return decay
