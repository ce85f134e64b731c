# Copyright 2025 the authors of "Advantage Weighted Matching" (Xue et al., arXiv 2509.25050),
# scxue/advantage_weighted_matching
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
# Reference for tests/test_awm.py: the Advantage Weighted Matching loss pieces of the authors' training script, kept
# verbatim so diffalign's port (`diffalign/losses.py` `awm_log_prob`, `awm_advantages`, `awm_loss`,
# `diffalign/trainers/awm.py` `awm_train_step_indices`, `awm_ema_decay`) is checked against the original rather than
# against itself.
#
# Source: https://github.com/scxue/advantage_weighted_matching, commit be5137232e33a21b449ed65a533211d0deb97ed8
# (advantage_weighted_matching/scripts/train_sd3_awm.py last changed in 12b1397b2267a7cb7962e8f49f9d12da870b5abb),
# licence Apache-2.0 (LICENSE at the repository root and in advantage_weighted_matching/; the files carry no header
# of their own, so the header above names the authors).
#
# What was copied and what was changed:
# - `logit_normal_shifted_sampler`: scripts/train_sd3_awm.py:254-274, unchanged (the script never calls it; its
#   `time_type: logit_normal` branch inlines the same map, below).
# - `compute_log_prob_awm_math`: the body of `compute_log_prob_awm` after the transformer forward,
#   scripts/train_sd3_awm.py:234-252, unchanged. The forward (lines 210-233) is replaced by the `noise_pred`
#   argument: the `def` line is new (the original takes the transformer, the pipeline and the inputs) and the tests
#   give the model's output as a tensor.
# - The training-timestep draw, the policy/KL loss and the EMA-adapter update are inline in `main()`. They were cut
#   out into the three functions below; each body is the original line range, dedented as a block (8, 12 and 4
#   spaces) and otherwise unchanged, between `# ---- scripts/train_sd3_awm.py:A-B ----` and `# ---- end ----` marks.
#   Only the `def` lines (their parameters are the names the range reads from `main()`'s scope) and the `return`
#   lines (the names it defines that the tests compare) were added. Check with, for the loss:
#     git show be51372:advantage_weighted_matching/scripts/train_sd3_awm.py | sed -n 1293,1354p | sed 's/^ \{12\}//' \
#       | diff - <(sed -n '/^    # ---- scripts.*:1293-1354/,/^    # ---- end/p' tests/awm_reference.py | sed '1d;$d')
#   In the script, `sample['log_probs']` etc. are the outputs of `compute_log_prob_awm` reshaped to
#   `(train_timesteps, batch_size, ...)` (lines 1282-1290): the tests build `sample` the same way.

import torch


def logit_normal_shifted_sampler(shape, m=0.0, s=1.0, shift=3.0, device='cpu'):
    """
    Args:
        shape (torch.Size or tuple): The shape of the output tensor.
        m (float): The mean (location parameter) of the normal distribution.
        s (float): The standard deviation (scale parameter) of the normal distribution.
        shift (float): The shift parameter of the Logit-Normal distribution.
        device (str): The device to create the tensor on ('cpu' or 'cuda').

    Returns:
        torch.Tensor: A tensor with values sampled from the Logit-Normal distribution, where the values are in the range (0, 1).
    """
    u_standard = torch.randn(shape, device=device)
    
    u = u_standard * s + m

    t = torch.sigmoid(u)
    
    t = shift * t / (1 + (shift - 1) * t)

    return t


def compute_log_prob_awm_math(noise_pred, timestep, config, clean_latents, random_noise, weighting='Uniform'):
    sigma = timestep

    std_dev_t = torch.sqrt(sigma / (1 - torch.clamp(sigma, 0, 0.99)))*0.7
    model_output = noise_pred.double()
    log_prob = -(model_output - (random_noise.double() - clean_latents.double()))**2
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    if weighting == 't':
        log_prob = log_prob * timestep.view(-1)
    elif weighting == 't**2':
        log_prob = log_prob * timestep.view(-1)**2
    elif weighting == 'Uniform':
        log_prob = log_prob
    elif weighting == 'huber':
        log_prob = -(torch.sqrt(-log_prob + 1e-10) - 1e-5)* timestep.view(-1)
    elif weighting == 'ghuber':
        log_prob = -(torch.pow(-log_prob + 1e-10, config.train.ghuber_power) - torch.pow(torch.tensor(1e-10, device=log_prob.device, dtype=log_prob.dtype), config.train.ghuber_power)) * timestep.view(-1) / config.train.ghuber_power
    else:
        raise ValueError(f"Unknown weighting method: {weighting}")
    return log_prob, model_output, std_dev_t


def train_timesteps_draw(config, sample, accelerator):
    # ---- scripts/train_sd3_awm.py:1138-1207 ----
    if config.time_type == 'logit_normal':
        # continuous t
        # same t with stratified sampling
        T = config.train.train_timesteps
        B = config.train.batch_size

        base_uniform_vector = (torch.arange(T, device=accelerator.device) + torch.rand(T, device=accelerator.device)) / T

        normal_dist = torch.distributions.Normal(loc=0.0, scale=1.0)
        u_standard_vector = normal_dist.icdf(torch.clamp(base_uniform_vector, 1e-7, 1-1e-7))
        u_standard_vector = normal_dist.icdf(base_uniform_vector)

        # 3. shuffle this vector randomly
        u_standard_shuffled = u_standard_vector[torch.randperm(T, device=accelerator.device)]

        m, s, shift = 0.0, 1.0, config.time_shift
        u = u_standard_shuffled * s + m
        t_vector = torch.sigmoid(u)
        t_vector_shifted = shift * t_vector / (1 + (shift - 1) * t_vector)

        timesteps = torch.repeat_interleave(t_vector_shifted, repeats=B)
        timesteps = torch.clamp(timesteps, min=0.01)
        timesteps = timesteps.view(-1, 1, 1, 1)

    elif config.time_type == 'uniform':
        global_lower, global_upper = 0.20, 1.0
        rand_u = torch.rand(config.train.train_timesteps, config.train.batch_size, device=accelerator.device)
        normalized_matrix = (torch.arange(config.train.train_timesteps, device=accelerator.device).unsqueeze(1) + rand_u) / config.train.train_timesteps
        
        matrix = global_lower + normalized_matrix * (global_upper - global_lower)
        timesteps = torch.gather(matrix, 0, torch.rand_like(matrix).argsort(dim=0)).flatten()
        timesteps = config.time_shift * timesteps / (1 + (config.time_shift - 1) * timesteps)
        timesteps = timesteps.view(-1,1,1,1)

    elif config.time_type == 'discrete':
        boundaries = torch.linspace(0, int(config.sample.num_steps * config.train.timestep_fraction), steps=config.train.train_timesteps + 1, device=accelerator.device)
        lower_bounds = boundaries[:-1].long()
        upper_bounds = boundaries[1:].long()
        rand_u = torch.rand(config.train.train_timesteps, device=accelerator.device)
        t_indices = lower_bounds + (rand_u * (upper_bounds - lower_bounds)).long()

        train_totalindex = torch.repeat_interleave(t_indices, repeats=config.train.batch_size) # [12]
        timesteps = sample["timesteps"][0][train_totalindex].view(-1,1,1,1) / 1000 # [12, 1, 1, 1]
    elif config.time_type == 'discrete_with_init':
        init_index = torch.tensor([0], device=accelerator.device, dtype=torch.long)
        num_remaining = config.train.train_timesteps - 1
        if num_remaining > 0:
            max_step_idx = int(config.sample.num_steps * config.train.timestep_fraction)
            boundaries = torch.linspace(1, max_step_idx, steps=num_remaining + 1, device=accelerator.device)
            lower_bounds = boundaries[:-1].long()
            upper_bounds = boundaries[1:].long()                
            rand_u = torch.rand(num_remaining, device=accelerator.device)
            remaining_indices = lower_bounds + (rand_u * (upper_bounds - lower_bounds)).long()
            t_indices = torch.cat([init_index, remaining_indices])
        else:
            t_indices = init_index

        train_totalindex = torch.repeat_interleave(t_indices, repeats=config.train.batch_size) # [12]
        timesteps = sample["timesteps"][0][train_totalindex].view(-1,1,1,1) / 1000 # [12, 1, 1, 1]
    elif config.time_type == 'discrete_wo_init':
        boundaries = torch.linspace(1, int(config.sample.num_steps * config.train.timestep_fraction), steps=config.train.train_timesteps + 1, device=accelerator.device)
        lower_bounds = boundaries[:-1].long()
        upper_bounds = boundaries[1:].long()
        rand_u = torch.rand(config.train.train_timesteps, device=accelerator.device)
        t_indices = lower_bounds + (rand_u * (upper_bounds - lower_bounds)).long()

        train_totalindex = torch.repeat_interleave(t_indices, repeats=config.train.batch_size) # [12]
        timesteps = sample["timesteps"][0][train_totalindex].view(-1,1,1,1) / 1000 # [12, 1, 1, 1]
    else:
        raise NotImplementedError("Only logit_normal, uniform, and discrete are supported with time_type")
    # ---- end ----
    return timesteps


def awm_policy_and_kl_loss(sample, config, accelerator):
    # ---- scripts/train_sd3_awm.py:1293-1354 ----
    advantages = torch.clamp(
        sample["advantages"][:, 0],
        -config.train.adv_clip_max,
        config.train.adv_clip_max,
    )
    if config.train.advantage_max is not None:
        advantages = advantages / config.train.adv_clip_max * config.train.advantage_max

    if config.train.loss_type == 'sum_first':
        sum_log_probs = sample['log_probs'].mean(dim=0)
        sum_old_log_probs = sample['old_log_probs'].mean(dim=0)
        ratio = torch.exp(sum_log_probs - sum_old_log_probs.detach())
    elif config.train.loss_type == 'exp_first':
        log_probs = sample['log_probs'].view(-1)
        old_log_probs = sample['old_log_probs'].view(-1)
        ratio = torch.exp(log_probs - old_log_probs.detach())
    else:
        raise ValueError(f"Unknown loss_type: {config.train.loss_type}")

    if accelerator.is_main_process:
        print('config.train.clip_range', config.train.clip_range)
        print('ratio', ratio)

    if config.train.loss_type == 'exp_first':
        advantages = advantages.unsqueeze(0).repeat(config.train.train_timesteps, 1).view(-1)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(
        ratio,
        1.0 - config.train.clip_range,
        1.0 + config.train.clip_range,
    )
    if config.train.loss_type == 'sum_first':
        policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
    elif config.train.loss_type == 'exp_first':
        policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
    else:
        raise ValueError(f"Unknown loss_type: {config.train.loss_type}")
    if config.train.beta > 0:
        model_output = sample['model_output'] # shape [4, 3, 16, 64, 64]
        model_output_ref = sample['model_output_ref']
        std_dev_t = sample['std_dev_t']
        if config.train.kl_weight == 'ELBO':
            kl_loss = ((model_output - model_output_ref) ** 2).mean(dim=(2,3,4), keepdim=True) / (2 * std_dev_t ** 2)
        elif config.train.kl_weight == 'Uniform':
            kl_loss = ((model_output - model_output_ref) ** 2).mean(dim=(2,3,4), keepdim=True)
        else:
            raise ValueError(f"Unknown kl_weight: {config.train.kl_weight}")
        kl_loss = kl_loss.mean(dim=0).mean()
        if config.train.ema_beta > 0:
            model_output_ema = sample['model_output_ema']
            if config.train.kl_ema_weight == 'ELBO':
                ema_kl_loss = ((model_output - model_output_ema) ** 2).mean(dim=(2,3,4), keepdim=True) / (2 * std_dev_t ** 2)
            elif config.train.kl_ema_weight == 'Uniform':
                ema_kl_loss = ((model_output - model_output_ema) ** 2).mean(dim=(2,3,4), keepdim=True)
            else:
                raise ValueError(f"Unknown kl_weight: {config.train.kl_weight}")
            ema_kl_loss = ema_kl_loss.mean(dim=0).mean()
            loss = policy_loss + config.train.beta * kl_loss + config.train.ema_beta * ema_kl_loss
        else:
            loss = policy_loss + config.train.beta * kl_loss
    else:
        loss = policy_loss
    # ---- end ----
    return loss, policy_loss, ratio


def ema_adapter_update(config, global_step, accelerator, transformer_trainable_parameters,
                       ema_transformer_trainable_parameters):
    # ---- scripts/train_sd3_awm.py:1409-1419 ----
    with torch.no_grad():
        if config.train.kl_ema_decay_type == 'constant':
            decay = config.train.kl_ema_decay
        elif config.train.kl_ema_decay_type == 'linear':
            decay = min(config.train.kl_ema_decay, 0.001 * global_step)
        if accelerator.is_main_process:
            print(f'current_step:{global_step}, decay:{decay}')
        for src_param, tgt_param in zip(
            transformer_trainable_parameters, ema_transformer_trainable_parameters, strict=True
        ):
            tgt_param.data.copy_(tgt_param.detach().data * decay + src_param.detach().clone().data * (1.0 - decay))
    # ---- end ----
    return decay
