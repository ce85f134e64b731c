import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffalign.logprob import ddim_step_mean_std, ddim_step_with_logprob


def make_scheduler(prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps=10):
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=clip_sample,
        set_alpha_to_one=set_alpha_to_one, steps_offset=1, prediction_type=prediction_type,
    )
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_prev_sample_matches_ddim_step_exactly(prediction_type, clip_sample, set_alpha_to_one):
    scheduler = make_scheduler(prediction_type, clip_sample, set_alpha_to_one)
    torch.manual_seed(0)
    for t in scheduler.timesteps:
        x, out = torch.randn(3, 4, 8, 8) * 2, torch.randn(3, 4, 8, 8)
        for eta in (1.0, 0.3):
            expected = scheduler.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(1)).prev_sample
            got, _ = ddim_step_with_logprob(scheduler, out, t, x, eta=eta, generator=torch.Generator().manual_seed(1))
            assert torch.equal(got, expected)


def test_log_prob_is_gaussian_density_averaged_over_dimensions():
    scheduler = make_scheduler()
    t = scheduler.timesteps[3]
    torch.manual_seed(0)
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    prev, log_prob = ddim_step_with_logprob(scheduler, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(0))
    mean, std = ddim_step_mean_std(scheduler, out, t, x, eta=1.0)
    # by hand: sum of per-dimension log N(prev; mean, std^2), divided by the number of dimensions
    var = std.double() ** 2
    density = -((prev.double() - mean.double()) ** 2) / (2 * var) - 0.5 * torch.log(2 * math.pi * var)
    expected = density.sum(dim=(1, 2, 3)) / (4 * 8 * 8)
    assert log_prob.dtype == torch.float32 and log_prob.shape == (2,)
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-5, atol=1e-5)


def test_per_sample_timesteps_match_scalar_steps():
    scheduler = make_scheduler()
    torch.manual_seed(0)
    x, out, prev = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    timesteps = scheduler.timesteps[torch.tensor([0, 3, 7, 9])]  # includes the last step (final_alpha_cumprod)
    _, batched = ddim_step_with_logprob(scheduler, out, timesteps, x, prev_sample=prev)
    for i, t in enumerate(timesteps):
        _, single = ddim_step_with_logprob(scheduler, out[i : i + 1], t, x[i : i + 1], prev_sample=prev[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single)


def test_evaluating_a_recorded_sample_gives_its_log_prob():
    scheduler = make_scheduler()
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = scheduler.timesteps[0]
    prev, log_prob = ddim_step_with_logprob(scheduler, out, t, x, generator=torch.Generator().manual_seed(3))
    again, log_prob_again = ddim_step_with_logprob(scheduler, out, t, x, prev_sample=prev)
    assert torch.equal(again, prev) and torch.equal(log_prob, log_prob_again)


def test_gradient_flows_to_model_output():
    scheduler = make_scheduler()
    out = torch.randn(2, 4, 8, 8, requires_grad=True)
    x, prev = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    _, log_prob = ddim_step_with_logprob(scheduler, out, scheduler.timesteps[2], x, prev_sample=prev)
    log_prob.sum().backward()
    assert out.grad is not None and out.grad.abs().sum() > 0


def test_eta_zero_is_an_error():
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step_with_logprob(scheduler, torch.randn(1, 4, 8, 8), scheduler.timesteps[0], torch.randn(1, 4, 8, 8), eta=0.0)
