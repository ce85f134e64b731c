"""The Flow-GRPO SDE kernel of `diffalign.logprob` against Flow-GRPO's own `sde_step_with_logprob`.

`flow_grpo_reference.py` (next to this file) is a verbatim copy of the original function; nothing here is derived
from diffalign's port.
"""

import pytest
import torch
from flow_grpo_reference import sde_step_with_logprob

from diffalign.logprob import (
    flow_ode_step,
    flow_sde_step_mean_std,
    flow_sde_step_with_logprob,
    gaussian_kl,
)
from diffalign.testing import tiny_flow_scheduler

SHAPE = (4, 3, 5, 5)


def _scheduler(shift, num_steps, **config):
    scheduler = tiny_flow_scheduler(shift=shift, **config)
    scheduler.set_timesteps(num_steps)
    return scheduler


def _per_sample_timesteps(scheduler):
    # One timestep per sample: the first step (sigma == 1), the last (sigma_next == 0) and two in between.
    n = len(scheduler.timesteps)
    return scheduler.timesteps[[0, n - 1, n // 2, min(1, n - 1)]]


def _tensors(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sample, velocity, other = (torch.randn(SHAPE, generator=g) for _ in range(3))
    return sample.to(dtype), velocity.to(dtype), other.to(dtype)


def _reference(scheduler, velocity, timestep, sample, **kwargs):
    prev_sample, log_prob, mean, std_dev_t = sde_step_with_logprob(scheduler, velocity, timestep, sample, **kwargs)
    return prev_sample, log_prob, mean, std_dev_t


@pytest.mark.parametrize("shift", [3.0, 1.0])
@pytest.mark.parametrize("num_steps", [1, 4, 10])
@pytest.mark.parametrize("noise_level", [0.7, 1.0])
def test_log_prob_of_given_sample_matches_flow_grpo(shift, num_steps, noise_level):
    scheduler = _scheduler(shift, num_steps)
    timestep = _per_sample_timesteps(scheduler)
    sample, velocity, prev_sample = _tensors()
    if num_steps > 1:
        assert scheduler.sigmas[0] == 1.0  # the sigma == 1 branch of the std is exercised

    ref_sample, ref_log_prob, ref_mean, ref_std_dev_t = _reference(
        scheduler, velocity, timestep, sample, noise_level=noise_level, prev_sample=prev_sample
    )
    out_sample, log_prob = flow_sde_step_with_logprob(
        scheduler, velocity, timestep, sample, noise_level=noise_level, prev_sample=prev_sample
    )
    torch.testing.assert_close(out_sample, ref_sample, rtol=0, atol=0)
    torch.testing.assert_close(log_prob, ref_log_prob, rtol=1e-5, atol=1e-5)
    assert log_prob.shape == (SHAPE[0],) and log_prob.dtype == torch.float32

    mean, std = flow_sde_step_mean_std(scheduler, velocity, timestep, sample, noise_level=noise_level)
    index = torch.tensor([scheduler.index_for_timestep(t) for t in timestep])
    dt = (scheduler.sigmas[index + 1] - scheduler.sigmas[index]).view(-1, 1, 1, 1)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std, ref_std_dev_t * torch.sqrt(-dt), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shift", [3.0, 1.0])
@pytest.mark.parametrize("num_steps", [4, 10])
def test_sampled_step_matches_flow_grpo_with_the_same_generator(shift, num_steps):
    scheduler = _scheduler(shift, num_steps)
    timestep = _per_sample_timesteps(scheduler)
    sample, velocity, _ = _tensors(seed=1)

    ref_sample, ref_log_prob, _, _ = _reference(
        scheduler, velocity, timestep, sample, generator=torch.Generator().manual_seed(7)
    )
    out_sample, log_prob = flow_sde_step_with_logprob(
        scheduler, velocity, timestep, sample, generator=torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(out_sample, ref_sample, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(log_prob, ref_log_prob, rtol=1e-5, atol=1e-5)
    # Re-evaluating the recorded sample gives back its log-prob (what the PPO ratio relies on at the first update).
    _, again = flow_sde_step_with_logprob(scheduler, velocity, timestep, sample, prev_sample=out_sample)
    torch.testing.assert_close(again, log_prob, rtol=0, atol=0)


def test_scalar_timestep_equals_the_same_timestep_per_sample():
    scheduler = _scheduler(3.0, 6)
    sample, velocity, prev_sample = _tensors(seed=2)
    t = scheduler.timesteps[2]
    _, scalar = flow_sde_step_with_logprob(scheduler, velocity, t, sample, prev_sample=prev_sample)
    _, per_sample = flow_sde_step_with_logprob(scheduler, velocity, t.expand(SHAPE[0]), sample,
                                               prev_sample=prev_sample)
    torch.testing.assert_close(scalar, per_sample, rtol=0, atol=0)


@pytest.mark.parametrize("reschedule", [{"sigmas": [1.0, 0.6, 0.3, 0.1]}, {"mu": 1.5}])
def test_a_new_schedule_of_the_same_length_is_used(reschedule):
    # The device copy of the sigmas must follow `set_timesteps`, also when the number of steps does not change.
    dynamic = "mu" in reschedule
    scheduler = tiny_flow_scheduler(shift=3.0, use_dynamic_shifting=dynamic)
    scheduler.set_timesteps(4, mu=0.5 if dynamic else None)
    sample, velocity, prev_sample = _tensors(seed=3)
    flow_sde_step_with_logprob(scheduler, velocity, _per_sample_timesteps(scheduler), sample, prev_sample=prev_sample)

    scheduler.set_timesteps(4, **reschedule)
    timestep = _per_sample_timesteps(scheduler)
    _, ref_log_prob, ref_mean, _ = _reference(scheduler, velocity, timestep, sample, prev_sample=prev_sample)
    _, log_prob = flow_sde_step_with_logprob(scheduler, velocity, timestep, sample, prev_sample=prev_sample)
    torch.testing.assert_close(log_prob, ref_log_prob, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flow_ode_step(scheduler, velocity, timestep, sample),
                               flow_sde_step_mean_std(scheduler, velocity, timestep, sample, noise_level=1e-6)[0])


def _scheduler_steps(scheduler, num_steps, velocity, timestep, sample):
    # `FlowMatchEulerDiscreteScheduler.step` takes one timestep per call; `set_timesteps` resets its step index.
    out = []
    for i, t in enumerate(timestep):
        scheduler.set_timesteps(num_steps)
        out.append(scheduler.step(velocity[i : i + 1], t, sample[i : i + 1]).prev_sample)
    return torch.cat(out)


@pytest.mark.parametrize("shift", [3.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_noise_limit_and_ode_step_are_the_euler_step(shift, dtype):
    num_steps = 10
    scheduler = _scheduler(shift, num_steps)
    timestep = _per_sample_timesteps(scheduler)
    sample, velocity, _ = _tensors(seed=4, dtype=dtype)
    euler = _scheduler_steps(scheduler, num_steps, velocity, timestep, sample)

    ode = flow_ode_step(scheduler, velocity, timestep, sample)
    assert ode.dtype == dtype
    torch.testing.assert_close(ode, euler, rtol=0, atol=0)

    # The SDE mean is computed in float32 whatever the inputs: its a -> 0 limit is the float32 Euler step.
    euler = _scheduler_steps(scheduler, num_steps, velocity.float(), timestep, sample.float())
    errors = []
    for noise_level in (1e-1, 1e-2, 1e-3):
        mean, std = flow_sde_step_mean_std(scheduler, velocity, timestep, sample, noise_level=noise_level)
        errors.append((mean - euler).abs().max().item())
        assert (std > 0).all()
    assert errors[0] > errors[1] > errors[2]
    mean, _ = flow_sde_step_mean_std(scheduler, velocity, timestep, sample, noise_level=1e-6)
    torch.testing.assert_close(mean, euler, rtol=1e-6, atol=1e-6)


def test_bf16_inputs_give_float32_log_probs_of_the_returned_sample():
    scheduler = _scheduler(3.0, 10)
    timestep = _per_sample_timesteps(scheduler)
    sample, velocity, _ = _tensors(seed=5, dtype=torch.bfloat16)

    out_sample, log_prob = flow_sde_step_with_logprob(
        scheduler, velocity, timestep, sample, generator=torch.Generator().manual_seed(3)
    )
    assert out_sample.dtype == torch.bfloat16 and log_prob.dtype == torch.float32
    ref_sample, _, _, _ = _reference(scheduler, velocity, timestep, sample, generator=torch.Generator().manual_seed(3))
    assert ref_sample.dtype == torch.float32  # Flow-GRPO upcasts; diffalign returns the latents' dtype
    torch.testing.assert_close(out_sample, ref_sample.to(torch.bfloat16), rtol=0, atol=0)

    # The log-prob is the density of the bf16 sample that was returned, so re-evaluating it reproduces it exactly.
    _, ref_log_prob, _, _ = _reference(scheduler, velocity, timestep, sample, prev_sample=out_sample)
    torch.testing.assert_close(log_prob, ref_log_prob, rtol=1e-5, atol=1e-5)
    _, again = flow_sde_step_with_logprob(scheduler, velocity, timestep, sample, prev_sample=out_sample)
    assert again.dtype == torch.float32
    torch.testing.assert_close(again, log_prob, rtol=0, atol=0)


def test_invalid_arguments_raise():
    scheduler = _scheduler(3.0, 4)
    sample, velocity, prev_sample = _tensors()
    t = scheduler.timesteps[0]
    for noise_level in (0.0, -0.5):
        with pytest.raises(ValueError, match="noise_level"):
            flow_sde_step_with_logprob(scheduler, velocity, t, sample, noise_level=noise_level)
    with pytest.raises(ValueError, match="not both"):
        flow_sde_step_with_logprob(scheduler, velocity, t, sample, prev_sample=prev_sample,
                                   generator=torch.Generator().manual_seed(0))

    unset = tiny_flow_scheduler(shift=3.0)
    for call in (
        lambda: flow_sde_step_with_logprob(unset, velocity, 1000.0, sample),
        lambda: flow_sde_step_mean_std(unset, velocity, 1000.0, sample),
        lambda: flow_ode_step(unset, velocity, 1000.0, sample),
    ):
        with pytest.raises(ValueError, match="set_timesteps"):
            call()


def test_closed_form_kl_from_mean_and_std():
    scheduler = _scheduler(3.0, 10)
    timestep = _per_sample_timesteps(scheduler)
    sample, velocity, other = _tensors(seed=6)

    mean, std = flow_sde_step_mean_std(scheduler, velocity, timestep, sample)
    ref_mean, ref_std = flow_sde_step_mean_std(scheduler, velocity.clone(), timestep, sample)
    torch.testing.assert_close(std, ref_std, rtol=0, atol=0)
    assert torch.equal(gaussian_kl(mean, ref_mean, std), torch.zeros(SHAPE[0]))

    ref_mean, _ = flow_sde_step_mean_std(scheduler, velocity + 0.1 * other, timestep, sample)
    kl = gaussian_kl(mean, ref_mean, std)
    assert kl.shape == (SHAPE[0],) and kl.dtype == torch.float32 and (kl > 0).all()

    # Flow-GRPO's KL (`scripts/train_sd3.py`) divides by 2 std_dev_t^2, the diffusion coefficient without the
    # sqrt(-dt) of the step: it is `-dt` times the KL of the transition itself.
    _, _, grpo_mean, std_dev_t = _reference(scheduler, velocity, timestep, sample, prev_sample=sample)
    _, _, grpo_ref_mean, _ = _reference(scheduler, velocity + 0.1 * other, timestep, sample, prev_sample=sample)
    grpo_kl = ((grpo_mean - grpo_ref_mean) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t**2)
    index = torch.tensor([scheduler.index_for_timestep(t) for t in timestep])
    dt = scheduler.sigmas[index + 1] - scheduler.sigmas[index]
    torch.testing.assert_close(grpo_kl.flatten(), kl * -dt, rtol=1e-4, atol=1e-7)
