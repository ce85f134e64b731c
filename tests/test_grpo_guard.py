"""GRPO-Guard's RatioNorm (`diffalign.losses.ratio_norm_ppo_loss`, `DDPOConfig.train_ratio_norm`) against the authors'
code, and in `diffalign train ddpo`.

`grpo_guard_reference.py` (next to this file) is a verbatim copy of the loss lines of the authors' Flow-GRPO script;
the step tensors it takes come from Flow-GRPO's own `sde_step_with_logprob` (`flow_grpo_reference.py`). Nothing on the
reference side is derived from diffalign's port.
"""

import dataclasses
import json
import os
from types import SimpleNamespace

import pytest
import torch
from flow_grpo_reference import sde_step_with_logprob
from grpo_guard_reference import grpo_guard_policy_loss

from diffalign.errors import ConfigError
from diffalign.logprob import flow_sde_step_mean_std, flow_step_dt, gaussian_log_prob
from diffalign.losses import ppo_clipped_loss, ratio_norm_ppo_loss
from diffalign.testing import tiny_flow_scheduler
from diffalign.trainers.ddpo_config import DDPOConfig

SHAPE = (3, 4, 6, 6)  # rows, channels, height, width
NOISE_LEVEL = 0.7


def _scheduler(num_steps=10, shift=3.0):
    scheduler = tiny_flow_scheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    return scheduler


def _step_tensors(scheduler, step, same_drift, seed=0):
    """The old and new velocities of `SHAPE[0]` rows at `step`, and a next latent sampled from the old policy. With
    `same_drift`, every row's velocity change is a permutation of the same values, so all rows have one
    `mean (mu_theta - mu_old)^2` (the reference averages it over its batch, see `test_reference_averages_...`)."""
    g = torch.Generator().manual_seed(seed + step)
    x = torch.randn(SHAPE, generator=g)
    v_old = torch.randn(SHAPE, generator=g)
    if same_drift:
        base = 0.3 * torch.randn(SHAPE[1:], generator=g).flatten()
        drift = torch.stack([base[torch.randperm(base.numel(), generator=g)] for _ in range(SHAPE[0])])
        drift = drift.reshape(SHAPE)
    else:
        drift = 0.3 * torch.randn(SHAPE, generator=g) * torch.arange(1, SHAPE[0] + 1).reshape(-1, 1, 1, 1)
    v_new = v_old + drift
    timestep = scheduler.timesteps[step].expand(SHAPE[0])
    x_next, old_log_prob, old_mean, _ = sde_step_with_logprob(scheduler, v_old, timestep, x, noise_level=NOISE_LEVEL,
                                                              generator=g)
    advantages = torch.tensor([1.5, -0.7, 0.4])
    return x, v_new, timestep, x_next, old_log_prob, old_mean, advantages


def _reference(scheduler, step_tensors, clip_range, adv_clip_max=5.0):
    """The authors' loss and its gradient in the new velocity."""
    x, v_new, timestep, x_next, old_log_prob, old_mean, advantages = step_tensors
    v = v_new.clone().requires_grad_(True)
    _, log_prob, mean, std_dev_t = sde_step_with_logprob(scheduler, v, timestep, x, noise_level=NOISE_LEVEL,
                                                         prev_sample=x_next)
    # `sde_step_with_logprob(..., return_sqrt_dt=True)` of the GRPO-Guard commit returns `torch.sqrt(-1*dt)` with
    # `dt = sigma_prev - sigma` of the same scheduler lookup
    index = [scheduler.index_for_timestep(t) for t in timestep]
    dt = scheduler.sigmas[[i + 1 for i in index]] - scheduler.sigmas[index]
    sqrt_dt = torch.sqrt(-1 * dt).view(-1, 1, 1, 1)
    config = SimpleNamespace(rationorm=True, train=SimpleNamespace(clip_range=clip_range, adv_clip_max=adv_clip_max))
    sample = {"advantages": advantages[:, None], "prev_sample_mean": old_mean[:, None],
              "log_probs": old_log_prob[:, None]}
    loss, ratio = grpo_guard_policy_loss(config, sample, 0, log_prob, mean, std_dev_t, sqrt_dt)
    loss.backward()
    return loss.detach(), v.grad, ratio.detach()


def _ours(scheduler, step_tensors, clip_range):
    x, v_new, timestep, x_next, old_log_prob, old_mean, advantages = step_tensors
    v = v_new.clone().requires_grad_(True)
    mean, std = flow_sde_step_mean_std(scheduler, v, timestep, x, NOISE_LEVEL)
    log_prob = gaussian_log_prob(x_next, mean, std)
    dt = -flow_step_dt(scheduler, timestep, len(timestep), x.device)
    out = ratio_norm_ppo_loss(log_prob, old_log_prob, mean, old_mean, std, dt, advantages, clip_range)
    out["loss"].backward()
    return out, v.grad


def _row(tensors, i):
    return tuple(t[i : i + 1] for t in tensors)


# the first step (sigma == 1), the last (sigma' == 0) and the ones between
@pytest.mark.parametrize("step", [0, 1, 4, 8, 9])
@pytest.mark.parametrize("clip_range", [1e-2, 1e-4])
def test_loss_and_gradient_equal_the_authors_code(step, clip_range):
    scheduler = _scheduler()
    tensors = _step_tensors(scheduler, step, same_drift=False)
    for i in range(SHAPE[0]):  # a batch of one row: the reference's batch mean of the bias is the row's own
        row = _row(tensors, i)
        ref_loss, ref_grad, ref_ratio = _reference(scheduler, row, clip_range)
        out, grad = _ours(scheduler, row, clip_range)
        torch.testing.assert_close(out["loss"].detach(), ref_loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(out["clipfrac"], ((ref_ratio - 1.0).abs() > clip_range).float().mean())


def test_the_cases_cover_clipped_and_unclipped_rows_and_a_ratio_away_from_the_raw_one():
    scheduler = _scheduler()
    clipfracs = [_ours(scheduler, _step_tensors(scheduler, step, True), 1e-2)[0]["clipfrac"].item()
                 for step in (0, 1, 4, 8, 9)]
    assert min(clipfracs) < 1 and max(clipfracs) > 0
    assert _ours(scheduler, _step_tensors(scheduler, 4, True), 1e-2)[1].abs().max() > 0  # unclipped rows' gradient
    # RatioNorm changes the loss: the raw PPO surrogate of the same rows is another number
    tensors = _step_tensors(scheduler, 4, True)
    x, v_new, timestep, x_next, old_log_prob, _, advantages = tensors
    mean, std = flow_sde_step_mean_std(scheduler, v_new, timestep, x, NOISE_LEVEL)
    raw = ppo_clipped_loss(gaussian_log_prob(x_next, mean, std), old_log_prob, advantages, 1e-2)["loss"]
    assert (raw - _ours(scheduler, tensors, 1e-2)[0]["loss"]).abs() > 1e-3


@pytest.mark.parametrize("step", [0, 4, 9])
def test_a_batch_is_the_authors_code_on_each_row_alone_as_in_the_paper(step):
    """The reference reduces `ratio_mean_bias` with `.mean(dim=tuple(range(1, log_prob.ndim)))` of a `(B,)` log-prob:
    an empty tuple, which torch reads as every dimension, so its bias is the batch's mean (and each row's gradient
    gets a share of the others' drift). The paper's bias is each sample's; ours is too: a batch gives the reference run
    on each of its rows alone, averaged."""
    scheduler = _scheduler()
    tensors = _step_tensors(scheduler, step, same_drift=False)
    out, grad = _ours(scheduler, tensors, 1e-2)
    per_row = [_reference(scheduler, _row(tensors, i), 1e-2) for i in range(SHAPE[0])]
    torch.testing.assert_close(out["loss"].detach(), torch.stack([r[0] for r in per_row]).mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, torch.cat([r[1] for r in per_row]) / SHAPE[0], rtol=1e-4, atol=1e-9)
    # the reference on the whole batch: another loss when the rows drift by different amounts ...
    batch_loss, _, _ = _reference(scheduler, tensors, 1e-2)
    assert (batch_loss - out["loss"]).abs() > 1e-4
    # ... and the same loss, but another gradient, when they drift by the same amount
    same = _step_tensors(scheduler, step, same_drift=True)
    batch_loss, batch_grad, _ = _reference(scheduler, same, 1e-2)
    out, grad = _ours(scheduler, same, 1e-2)
    torch.testing.assert_close(out["loss"].detach(), batch_loss, rtol=1e-5, atol=1e-7)
    assert (grad - batch_grad).abs().max() > 1e-3 * batch_grad.abs().max()


def test_rows_of_different_steps_in_one_micro_batch():
    """diffalign's micro-batches may mix steps: each row uses its own step's std and `dt`."""
    scheduler = _scheduler()
    a, b = (_step_tensors(scheduler, step, same_drift=True) for step in (1, 6))
    mixed = tuple(torch.cat([x, y]) for x, y in zip(a, b))
    out, grad = _ours(scheduler, mixed, 1e-2)
    (out_a, grad_a), (out_b, grad_b) = _ours(scheduler, a, 1e-2), _ours(scheduler, b, 1e-2)
    torch.testing.assert_close(out["loss"].detach(), (out_a["loss"] + out_b["loss"]).detach() / 2)
    torch.testing.assert_close(grad, torch.cat([grad_a, grad_b]) / 2)


def test_normalised_ratio_is_one_at_the_sampling_weights():
    scheduler = _scheduler()
    x, v_new, timestep, x_next, old_log_prob, old_mean, advantages = _step_tensors(scheduler, 3, same_drift=True)
    _, std = flow_sde_step_mean_std(scheduler, v_new, timestep, x, NOISE_LEVEL)  # the std does not depend on v
    out = ratio_norm_ppo_loss(old_log_prob, old_log_prob, old_mean.clone(), old_mean, std,
                              -flow_step_dt(scheduler, timestep, 3, "cpu"), advantages, 1e-6)
    assert out["clipfrac"] == 0 and out["approx_kl"] == 0 and out["ratio_bias"] == 0


# ------------------------------------------------------------------------------------------------------ the option

def test_config_key_is_off_by_default_and_validated():
    config = DDPOConfig()
    assert config.train_ratio_norm is False
    assert dataclasses.replace(config, train_ratio_norm=False).hash() == config.hash()  # old checkpoints still resume
    assert dataclasses.replace(config, train_ratio_norm=True).hash() != config.hash()
    with pytest.raises(ConfigError, match="train_ratio_norm must be true or false; got 'yes'"):
        DDPOConfig(train_ratio_norm="yes").validate()


def test_ddim_models_are_refused_in_one_line(tmp_path, tiny_pipe):
    from diffalign import DDPOTrainer

    config = DDPOConfig(model="unused", output_dir=str(tmp_path / "run"), prompts=["a cat", "a dog"], num_epochs=1,
                        sample_num_steps=2, sample_num_prompts_per_epoch=2, sample_images_per_prompt=2,
                        train_batch_size=2, train_ratio_norm=True)
    with pytest.raises(ConfigError, match="train_ratio_norm .GRPO-Guard. needs a flow-matching model .* ddim kernel"):
        DDPOTrainer(config, pipeline=tiny_pipe, reward_fn=lambda images, prompts, metadata: images.mean((1, 2, 3)))


SIZE = 32
RUN = ["--num_epochs", "2", "--sample_num_steps", "3", "--sample_num_prompts_per_epoch", "2",
       "--sample_images_per_prompt", "2", "--sample_batch_size", "4", "--train_batch_size", "4",
       "--grid_num_images", "1", "--checkpoint_every", "2", "--reward", "jpeg_compressibility",
       "--prompts", "[a photo of a cat, a red car]", "--train_learning_rate", "0.05", "--sample_guidance_scale", "3.0",
       "--sample_resolution", str(SIZE), "--lora_rank", "4", "--lora_alpha", "8", "--train_clip_range", "1e-3",
       "--advantage_mode", "group", "--final_eval_num_images", "0", "--seed", "2"]


@pytest.fixture(scope="module")
def tiny_sd3_dir(tmp_path_factory):
    from diffalign.testing import save_tiny_pipeline

    return save_tiny_pipeline("sd3", str(tmp_path_factory.mktemp("tiny_sd3")))


def _lora(run_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "final", "pytorch_lora_weights.safetensors"))


def test_tiny_sd3_run_trains_with_ratio_norm_and_differs_from_the_plain_surrogate(tiny_sd3_dir, tmp_path):
    from diffalign.cli import main

    runs = {}
    for name, extra in (("off", []), ("on", ["--train_ratio_norm", "true"])):
        out = str(tmp_path / name)
        assert main(["train", "ddpo", "--model", tiny_sd3_dir, "--output_dir", out] + RUN + extra) == 0
        records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        assert [r["epoch"] for r in records] == [0, 1]
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
        runs[name] = (records, _lora(out))
    (off_records, off_lora), (on_records, on_lora) = runs["off"], runs["on"]
    assert off_lora.keys() == on_lora.keys()
    # the LoRA moved from its zero-initialised B, and to other weights than without RatioNorm
    assert max(w.abs().max().item() for k, w in on_lora.items() if "lora_B" in k) > 0
    assert max((on_lora[k] - off_lora[k]).abs().max().item() for k in on_lora) > 1e-6
    # the first epoch samples from the same initial weights: the same rewards, another loss
    assert on_records[0]["reward_mean"] == off_records[0]["reward_mean"]
    assert on_records[0]["loss"] != off_records[0]["loss"]


def test_sampling_keeps_the_step_means_training_recomputes(tiny_sd3_dir):
    """`keep_step_means` records `mu_old`: recomputed at the same weights it gives a zero bias and a ratio of 1."""
    from diffalign.families import family_for_pipeline
    from diffalign.rollout import default_kernel, sample_trajectories, step_log_probs
    from diffalign.testing import tiny_pipeline

    pipe = tiny_pipeline("sd3")
    family = family_for_pipeline(pipe)
    kernel = default_kernel(family, noise_level=NOISE_LEVEL)
    traj = sample_trajectories(family, ["a cat", "a dog"], num_inference_steps=3, guidance_scale=3.0, kernel=kernel,
                               height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(0),
                               keep_step_means=True)
    assert traj.step_means.shape == traj.latents[:, 1:].shape
    plain = sample_trajectories(family, ["a cat", "a dog"], num_inference_steps=3, guidance_scale=3.0, kernel=kernel,
                                height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(0))
    assert plain.step_means is None and torch.equal(plain.latents, traj.latents)  # sampling is unchanged
    rows, steps = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 2, 2])
    with torch.no_grad():
        log_probs, mean, std = step_log_probs(family, family.denoiser, kernel, traj, rows, steps, 3.0)
    torch.testing.assert_close(mean, traj.step_means[rows, steps], atol=1e-5, rtol=1e-5)
    dt = -flow_step_dt(family.scheduler, traj.timesteps[steps], len(steps), "cpu")
    out = ratio_norm_ppo_loss(log_probs, traj.log_probs[rows, steps], mean, traj.step_means[rows, steps], std, dt,
                              torch.ones(4), 1e-4)
    assert out["clipfrac"] == 0 and out["ratio_bias"] < 1e-8
