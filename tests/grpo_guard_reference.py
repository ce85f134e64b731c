# Reference for tests/test_grpo_guard.py: GRPO-Guard's RatioNorm and per-step loss reweighting as its authors wrote
# them into Flow-GRPO, kept verbatim so diffalign's port (`diffalign/losses.py` `ratio_norm_ppo_loss`) is checked
# against the original rather than against itself.
#
# Source: https://github.com/yifan123/flow_grpo, file scripts/train_sd3_GRPO_Guard.py, at commit
# 9745241cf1101407e9b518dd4f10498092150522 ("Merge pull request #175 from jingw193/main", 2025-11-04: the changelog's
# "Adding GRPO-Guard"); the file was added, and last changed, in 2e2f712e9feb19246fa0db9527878e2766b5353f
# ("GRPO-Guard", by jingw193, the paper's first author). Paper: Wang et al. 2025, "GRPO-Guard: Mitigating Implicit
# Over-Optimization in Flow Matching via Regulated Clipping", arXiv 2510.22319; the option is `config.rationorm`
# (config/grpo_guard.py), the paper's "RatioNorm".
#
# What was copied and what was changed: the loss is inline in `main()`, lines 909-932. It was cut out into the
# function below; its body is that range dedented as a block (24 spaces) and otherwise unchanged, between the
# `# ---- scripts/train_sd3_GRPO_Guard.py:909-932 ----` and `# ---- end ----` marks. Only the `def` line (its
# parameters are the names the range reads from `main()`'s scope) and the `return` line (the names it defines that the
# tests compare) were added. Check with:
#   git show 9745241:scripts/train_sd3_GRPO_Guard.py | sed -n 909,932p | sed 's/^ \{24\}//' \
#     | diff - <(sed -n '/^    # ---- scripts.*:909-932/,/^    # ---- end/p' tests/grpo_guard_reference.py \
#                | sed '1d;$d' | sed 's/^    //')
# The range starts after the model forward of line 903, `compute_log_prob(...)`, which returns `log_prob`,
# `prev_sample_mean` and `std_dev_t` of `sde_step_with_logprob` (tests/flow_grpo_reference.py) and
# `sqrt_dt = torch.sqrt(-1*dt)` (that function's `return_sqrt_dt=True` variant at this commit); the tests build these
# tensors. In the script every row of `sample` is at the same step `j`, so `std_dev_t.mean()` and `sqrt_dt.mean()` are
# that step's values.
#
# MIT License
#
# Copyright (c) 2025 Jie Liu
#
# Permission is hereby granted, free of charge, to any person obtaining a copy
# of this software and associated documentation files (the "Software"), to deal
# in the Software without restriction, including without limitation the rights
# to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
# copies of the Software, and to permit persons to whom the Software is
# furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in all
# copies or substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
# FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
# AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
# LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
# OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
# SOFTWARE.

import torch


def grpo_guard_policy_loss(config, sample, j, log_prob, prev_sample_mean, std_dev_t, sqrt_dt):
    # ---- scripts/train_sd3_GRPO_Guard.py:909-932 ----
    # grpo logic
    advantages = torch.clamp(
        sample["advantages"][:, j],
        -config.train.adv_clip_max,
        config.train.adv_clip_max,
    )
    if config.rationorm:
        sigma_t = std_dev_t.mean()
        ratio_mean_bias = (prev_sample_mean - sample["prev_sample_mean"][:, j]).pow(2).mean(dim=tuple(range(1, log_prob.ndim)))
        ratio_mean_bias = ratio_mean_bias / (2 * (sqrt_dt.mean() * sigma_t) ** 2)
        ratio = torch.exp((log_prob - sample["log_probs"][:, j] + ratio_mean_bias) * (sqrt_dt.mean() * sigma_t))
    else:
        ratio = torch.exp(log_prob - sample["log_probs"][:, j])

    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(
        ratio,
        1.0 - config.train.clip_range,
        1.0 + config.train.clip_range,
    )
    policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))

    if config.rationorm:
        policy_loss = policy_loss / (sqrt_dt.mean()**2)
    # ---- end ----
    return policy_loss, ratio
