"""DiffusionNFT's math (`diffalign.losses.nft_loss`, `optimality_probability`) against NVIDIA's own code, and the
forward process (`diffalign.forward_process`) against diffusers' schedulers.

`diffusionnft_reference.py` (next to this file) holds NVIDIA's lines verbatim; nothing here is derived from diffalign's
port. The same tensors go into both; losses and gradients must agree.
"""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusionnft_reference import (
    PerPromptStatTracker,
    forward_noising,
    nft_loss_terms,
    old_policy_update,
    return_decay,
)

from diffalign.advantages import group_advantages
from diffalign.forward_process import (
    OLD_POLICY_DECAY_TYPES,
    PREDICTION_TYPES,
    add_noise,
    flow_schedule,
    old_policy_decay,
    prediction_target,
    prediction_to_epsilon,
    prediction_to_x0,
    update_old_policy_,
    vp_schedule,
    x0_to_prediction,
)
from diffalign.losses import OPTIMALITY_MODES, nft_loss, optimality_probability
from diffalign.testing import tiny_ddim_scheduler, tiny_flow_scheduler

# (B, C, H, W) image latents, FLUX's packed (B, L, C), and a larger batch.
SHAPES = [(4, 3, 5, 5), (3, 16, 8), (6, 4, 8, 8)]
NUM_STEPS = 10  # NVIDIA's sampling steps for SD3.5-M (config/nft.py:20)


def _config(beta, kl_weight=1e-4, adv_clip_max=5, adv_mode="all"):
    # The attributes `nft_loss_terms` reads from NVIDIA's ml_collections config.
    return SimpleNamespace(beta=beta, train=SimpleNamespace(beta=kl_weight, adv_clip_max=adv_clip_max,
                                                            adv_mode=adv_mode))


def _rollout_batch(shape, dtype, seed):
    """What NVIDIA's trainer keeps of a rollout: final latents, the sampler's timesteps (shifted SD3 schedule) in a
    random order per sample, and advantages repeated over the steps (scripts/train_nft_sd3.py:661-673, 722,
    810-816)."""
    g = torch.Generator().manual_seed(seed)
    scheduler = tiny_flow_scheduler(shift=3.0)
    scheduler.set_timesteps(NUM_STEPS)
    batch = shape[0]
    order = torch.stack([torch.randperm(NUM_STEPS, generator=g) for _ in range(batch)])
    advantages = 2.5 * torch.randn(batch, 1, generator=g, dtype=torch.float64)  # some beyond the clip at 5
    return {
        "latents_clean": torch.randn(shape, generator=g).to(dtype),
        # In the latents' dtype: float32 noise levels would round `1 - t` before a float64 product.
        "timesteps": scheduler.timesteps.to(dtype).repeat(batch, 1)[torch.arange(batch)[:, None], order],
        "advantages": advantages.repeat(1, NUM_STEPS),
    }


def _predictions(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    velocity = torch.randn(shape, generator=g).to(dtype)
    # The old and base policies near the trained one, as in training.
    old = (velocity + 0.1 * torch.randn(shape, generator=g)).to(dtype)
    ref = (velocity + 0.2 * torch.randn(shape, generator=g)).to(dtype)
    return velocity, old, ref


def _reference_and_ours(shape, dtype, beta, adv_mode="all", seed=0, j_idx=3, kl_weight=1e-4, adv_clip_max=5,
                        near_exact_first=False, output_dtype=None):
    batch = _rollout_batch(shape, dtype, seed)
    torch.manual_seed(seed)  # the reference draws its noise with `torch.randn_like`
    x0, t, t_expanded, noise, xt = forward_noising(batch, j_idx)
    velocity, old, ref = _predictions(shape, output_dtype or dtype, seed + 1)
    if near_exact_first:
        # The first sample's policies within 1e-7 of the true velocity: its x0 errors fall under the weight's floor.
        exact = (noise - x0)[0]
        velocity[0] = exact + 1e-7 * torch.randn_like(exact)
        old[0] = exact + 1e-7 * torch.randn_like(exact)

    ref_velocity = velocity.clone().requires_grad_(True)
    config = _config(beta, kl_weight, adv_clip_max, adv_mode)
    ref_loss, ref_terms, ref_r = nft_loss_terms(config, batch, j_idx, x0, xt, t_expanded, ref_velocity, old, ref)
    ref_loss.backward()

    alpha_t, sigma_t = flow_schedule(batch["timesteps"][:, j_idx] / 1000.0, x0)
    our_xt = add_noise(x0, noise, alpha_t, sigma_t)
    our_velocity = velocity.clone().requires_grad_(True)
    r = optimality_probability(batch["advantages"][:, j_idx], adv_clip_max, adv_mode)
    out = nft_loss(our_velocity, old, ref, our_xt, x0, alpha_t, sigma_t, r, beta, adv_clip_max, kl_weight)
    out["loss"].backward()
    return (xt, ref_r, ref_loss, ref_terms, ref_velocity.grad), (our_xt, r, out, our_velocity.grad)


# ---------------------------------------------------------------------------------------------------------------
# The loss against NVIDIA's code


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta", [1.0, 0.1, 0.37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nft_loss_and_gradient_equal_nvidias(shape, beta, dtype):
    (ref_xt, ref_r, ref_loss, ref_terms, ref_grad), (xt, r, out, grad) = _reference_and_ours(shape, dtype, beta)
    # Same operations in the same order: bit-identical, float32 included.
    torch.testing.assert_close(xt, ref_xt, rtol=0, atol=0)
    torch.testing.assert_close(r, ref_r, rtol=0, atol=0)
    torch.testing.assert_close(out["loss"], ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)
    assert grad.abs().sum() > 0 and out["loss"].dtype == torch.float64  # float64 like the reference's

    torch.testing.assert_close(out["kl"], ref_terms["kl_div"], rtol=0, atol=0)
    torch.testing.assert_close(out["old_deviation"], ref_terms["old_deviate"], rtol=0, atol=0)
    torch.testing.assert_close(out["old_kl"], ref_terms["old_kl_div"], rtol=0, atol=0)
    torch.testing.assert_close(out["policy_loss"], ref_terms["unweighted_policy_loss"] * 5, rtol=1e-6, atol=0)
    # NVIDIA's logged "policy_loss" is the *total* loss: `loss += ...` (train_nft_sd3.py:970) adds the KL in place
    # to the tensor whose detached view was logged. diffalign's `policy_loss` is the policy term alone.
    torch.testing.assert_close(ref_terms["policy_loss"], ref_loss.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("output_dtype", [torch.bfloat16, torch.float16])
def test_nft_loss_equals_nvidias_with_half_precision_outputs(output_dtype):
    # Under NVIDIA's autocast the transformer returns half-precision outputs; latents and noise stay float32.
    (_, _, ref_loss, _, ref_grad), (_, _, out, grad) = _reference_and_ours(
        (4, 3, 5, 5), torch.float32, beta=0.1, seed=2, output_dtype=output_dtype)
    torch.testing.assert_close(out["loss"], ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)
    assert grad.dtype == output_dtype


@pytest.mark.parametrize("adv_mode", OPTIMALITY_MODES)
def test_nft_loss_equals_nvidias_in_every_advantage_mode(adv_mode):
    (_, ref_r, ref_loss, _, ref_grad), (_, r, out, grad) = _reference_and_ours(
        (5, 2, 4, 4), torch.float64, beta=0.5, adv_mode=adv_mode, seed=3, adv_clip_max=2.0)
    torch.testing.assert_close(r, ref_r, rtol=0, atol=0)
    torch.testing.assert_close(out["loss"], ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)


def test_nft_loss_equals_nvidias_where_the_adaptive_weight_hits_its_floor():
    (_, _, ref_loss, _, ref_grad), (_, _, out, grad) = _reference_and_ours(
        (3, 2, 4, 4), torch.float64, beta=1.0, seed=4, near_exact_first=True)
    torch.testing.assert_close(out["loss"], ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)
    assert grad[0].abs().max() > 0


def test_optimality_probability_values():
    advantages = torch.tensor([-9.0, -5.0, -2.5, 0.0, 2.5, 5.0, 9.0])
    torch.testing.assert_close(optimality_probability(advantages, 5.0),
                               torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))
    torch.testing.assert_close(optimality_probability(advantages, 5.0, "binary"),
                               torch.tensor([0.4, 0.4, 0.4, 0.5, 0.6, 0.6, 0.6]))  # sign / (2 A_max) + 1/2


def test_rewards_to_optimality_probability_match_nvidias_tracker():
    # NVIDIA's advantages: per-prompt mean, the whole batch's std (PerPromptStatTracker(global_std=True),
    # config/base.py:57) = `group_advantages(..., global_std=True)`.
    g = torch.Generator().manual_seed(0)
    prompts = ["a cat", "a dog", "two cats", "a cat", "two cats", "a dog"] * 4
    rewards = torch.rand(len(prompts), generator=g, dtype=torch.float64)
    reference = torch.from_numpy(PerPromptStatTracker(global_std=True).update(prompts, rewards.numpy()))
    group_ids = torch.tensor([sorted(set(prompts)).index(p) for p in prompts])
    ours = group_advantages(rewards, group_ids, global_std=True)
    torch.testing.assert_close(ours, reference.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(optimality_probability(ours, 5), (reference.float().clamp(-5, 5) / 5) / 2 + 0.5,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_nft_loss_of_a_unet_equals_nvidias_loss_on_the_equivalent_flow(prediction_type):
    # A variance-preserving state `x_t = a x0 + s eps` is the rectified-flow state `x_t / (a + s)` at noise level
    # `s / (a + s)`, and an output of any type implies `(x0_hat, eps_hat)`, i.e. the velocity `eps_hat - x0_hat`.
    # The policy term only reads `x0_hat` of the mixtures, so it must equal NVIDIA's on those velocities.
    shape, beta = (4, 3, 6, 6), 0.3
    g = torch.Generator().manual_seed(5)
    x0, noise = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    scheduler = tiny_ddim_scheduler(prediction_type=prediction_type)
    timestep = torch.tensor([999, 700, 250, 20])
    alpha_t, sigma_t = vp_schedule(scheduler.alphas_cumprod, timestep, x0)
    xt = add_noise(x0, noise, alpha_t, sigma_t)
    output, old_output = (prediction_target(x0, noise, alpha_t, sigma_t, prediction_type)
                          + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    r = torch.tensor([0.0, 0.3, 0.5, 1.0], dtype=torch.float64)

    ours = output.clone().requires_grad_(True)
    loss = nft_loss(ours, old_output, None, xt, x0, alpha_t, sigma_t, r, beta, 5, 0.0, prediction_type)["loss"]

    def velocity(out):
        return (prediction_to_epsilon(out, xt, alpha_t, sigma_t, prediction_type)
                - prediction_to_x0(out, xt, alpha_t, sigma_t, prediction_type))

    flow_sigma = sigma_t / (alpha_t + sigma_t)
    batch = {"advantages": ((r - 0.5) * 2 * 5)[:, None]}
    ref_loss, _, _ = nft_loss_terms(_config(beta, kl_weight=0.0), batch, 0, x0, xt / (alpha_t + sigma_t), flow_sigma,
                                    velocity(output), velocity(old_output), velocity(output))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    loss.backward()
    assert ours.grad.abs().sum() > 0


def test_nft_loss_bad_arguments():
    x = torch.zeros(2, 3)
    r = torch.full((2,), 0.5)
    with pytest.raises(ValueError, match="beta must be > 0"):
        nft_loss(x, x, x, x, x, x[:, :1], x[:, :1], r, 0.0, 5, 1e-4)
    with pytest.raises(ValueError, match="no reference output"):
        nft_loss(x, x, None, x, x, x[:, :1], x[:, :1], r, 1.0, 5, 1e-4)
    with pytest.raises(ValueError, match="unknown prediction_type 'velocity'"):
        nft_loss(x, x, x, x, x, x[:, :1], x[:, :1], r, 1.0, 5, 1e-4, prediction_type="velocity")
    with pytest.raises(ValueError, match="unknown optimality mode 'top'"):
        optimality_probability(r, 5, "top")
    with pytest.raises(ValueError, match="adv_clip_max must be > 0"):
        optimality_probability(r, 0)


# ---------------------------------------------------------------------------------------------------------------
# The old policy against NVIDIA's code


@pytest.mark.parametrize("decay_type", sorted(OLD_POLICY_DECAY_TYPES))
def test_old_policy_decay_equals_nvidias_schedule(decay_type):
    for step in range(0, 1500):
        assert old_policy_decay(step, *OLD_POLICY_DECAY_TYPES[decay_type]) == return_decay(step, decay_type)


@pytest.mark.parametrize("global_step", [0, 40, 300, 5000])
def test_old_policy_update_equals_nvidias(global_step):
    g = torch.Generator().manual_seed(global_step)
    params = [torch.randn(4, 8, generator=g), torch.randn(8, generator=g)]
    old = [torch.randn(4, 8, generator=g), torch.randn(8, generator=g)]
    ref_old = [p.clone() for p in old]
    decay = old_policy_update(global_step, SimpleNamespace(decay_type=2), params, ref_old)
    assert decay == old_policy_decay(global_step, *OLD_POLICY_DECAY_TYPES[2])
    update_old_policy_(old, params, decay)
    for ours, theirs in zip(old, ref_old):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    with pytest.raises(ValueError, match="the old policy has 1 parameters, the policy 2"):
        update_old_policy_(old[:1], params, decay)


# ---------------------------------------------------------------------------------------------------------------
# The forward process against diffusers' schedulers


def _sample_and_noise(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_flow_add_noise_equals_scale_noise(shape, shift):
    scheduler = tiny_flow_scheduler(shift=shift)
    scheduler.set_timesteps(NUM_STEPS)
    x0, noise = _sample_and_noise(shape)
    index = torch.tensor([0, NUM_STEPS - 1, 4, 7][: shape[0]])
    alpha_t, sigma_t = flow_schedule(scheduler.sigmas[index], x0)
    expected = scheduler.scale_noise(x0, scheduler.timesteps[index], noise)
    torch.testing.assert_close(add_noise(x0, noise, alpha_t, sigma_t), expected, rtol=0, atol=0)


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vp_add_noise_and_velocity_equal_the_schedulers(scheduler_class, dtype):
    scheduler = scheduler_class.from_config(tiny_ddim_scheduler().config)
    x0, noise = _sample_and_noise((4, 4, 6, 6), dtype=dtype)
    timestep = torch.tensor([0, 999, 500, 37])
    alpha_t, sigma_t = vp_schedule(scheduler.alphas_cumprod, timestep, x0)
    torch.testing.assert_close(add_noise(x0, noise, alpha_t, sigma_t), scheduler.add_noise(x0, noise, timestep),
                               rtol=0, atol=0)
    torch.testing.assert_close(prediction_target(x0, noise, alpha_t, sigma_t, "v_prediction"),
                               scheduler.get_velocity(x0, noise, timestep), rtol=0, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_x0_and_epsilon_equal_the_schedulers_step(prediction_type):
    config = tiny_ddim_scheduler(prediction_type=prediction_type).config
    sample, model_output = _sample_and_noise((2, 4, 6, 6), seed=1)
    ddpm = DDPMScheduler.from_config(config)
    ddpm.set_timesteps(20)
    ddim = DDIMScheduler.from_config(config)
    ddim.set_timesteps(20)
    for timestep in ddim.timesteps[[0, 7, 19]]:
        alpha_t, sigma_t = vp_schedule(ddim.alphas_cumprod, timestep, sample)
        x0_hat = prediction_to_x0(model_output, sample, alpha_t, sigma_t, prediction_type)
        eps_hat = prediction_to_epsilon(model_output, sample, alpha_t, sigma_t, prediction_type)
        expected = ddpm.step(model_output, timestep, sample, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(x0_hat, expected.pred_original_sample, rtol=1e-6, atol=1e-6)
        step = ddim.step(model_output, timestep, sample, eta=0.0)
        torch.testing.assert_close(x0_hat, step.pred_original_sample, rtol=1e-6, atol=1e-6)
        # Deterministic DDIM re-noises the estimate with the estimated noise:
        # x_{t'} = alpha_t' x0_hat + sigma_t' eps_hat.
        prev = int(timestep) - config.num_train_timesteps // ddim.num_inference_steps
        alpha_prev, sigma_prev = (vp_schedule(ddim.alphas_cumprod, prev, sample) if prev >= 0 else
                                  (torch.as_tensor(ddim.final_alpha_cumprod) ** 0.5,
                                   (1 - torch.as_tensor(ddim.final_alpha_cumprod)) ** 0.5))
        torch.testing.assert_close(add_noise(x0_hat, eps_hat, alpha_prev, sigma_prev), step.prev_sample,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_flow_x0_and_epsilon_equal_the_schedulers_step(shape):
    sample, velocity = _sample_and_noise(shape, seed=2)
    for index in [0, 3, NUM_STEPS - 1]:
        # The scheduler's stochastic step is `(1 - s') x0_hat + s' noise` with `x0_hat = x_t - s v`.
        scheduler = tiny_flow_scheduler(stochastic_sampling=True)
        scheduler.set_timesteps(NUM_STEPS)
        timestep, sigma, sigma_next = scheduler.timesteps[index], scheduler.sigmas[index], scheduler.sigmas[index + 1]
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(9))
        expected = scheduler.step(velocity, timestep, sample, generator=torch.Generator().manual_seed(9)).prev_sample
        alpha_t, sigma_t = flow_schedule(sigma, sample)
        x0_hat = prediction_to_x0(velocity, sample, alpha_t, sigma_t, "flow_velocity")
        torch.testing.assert_close(add_noise(x0_hat, noise, *flow_schedule(sigma_next, sample)), expected,
                                   rtol=0, atol=0)
        # The Euler ODE step re-noises x0_hat with the estimated noise.
        scheduler = tiny_flow_scheduler()
        scheduler.set_timesteps(NUM_STEPS)
        euler = scheduler.step(velocity, timestep, sample).prev_sample
        eps_hat = prediction_to_epsilon(velocity, sample, alpha_t, sigma_t, "flow_velocity")
        torch.testing.assert_close(add_noise(x0_hat, eps_hat, *flow_schedule(sigma_next, sample)), euler,
                                   rtol=1e-5, atol=1e-5)


def _schedules(x0):
    # One flow and one VP state per sample, float64, away from the clean end (sigma_t = 0 implies no noise).
    flow = tiny_flow_scheduler()
    flow.set_timesteps(NUM_STEPS)
    vp = tiny_ddim_scheduler()
    return {
        "flow_velocity": flow_schedule(flow.sigmas[torch.arange(x0.shape[0]) % NUM_STEPS], x0),
        "vp": vp_schedule(vp.alphas_cumprod, torch.linspace(5, 999, x0.shape[0]).long(), x0),
    }


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_output_to_x0_to_output(prediction_type, shape):
    x0, noise = _sample_and_noise(shape, seed=4, dtype=torch.float64)
    schedules = _schedules(x0)
    alpha_t, sigma_t = schedules["flow_velocity" if prediction_type == "flow_velocity" else "vp"]
    output = torch.randn(shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    sample = add_noise(x0, noise, alpha_t, sigma_t)
    x0_hat = prediction_to_x0(output, sample, alpha_t, sigma_t, prediction_type)
    eps_hat = prediction_to_epsilon(output, sample, alpha_t, sigma_t, prediction_type)
    torch.testing.assert_close(x0_to_prediction(x0_hat, sample, alpha_t, sigma_t, prediction_type), output)
    torch.testing.assert_close(add_noise(x0_hat, eps_hat, alpha_t, sigma_t), sample)  # estimates on the same x_t
    # The training target is the output that recovers the clean sample and the noise exactly.
    target = prediction_target(x0, noise, alpha_t, sigma_t, prediction_type)
    torch.testing.assert_close(prediction_to_x0(target, sample, alpha_t, sigma_t, prediction_type), x0)
    torch.testing.assert_close(prediction_to_epsilon(target, sample, alpha_t, sigma_t, prediction_type), noise)


def test_unknown_prediction_type():
    x = torch.zeros(2, 3)
    for function in (prediction_to_x0, prediction_to_epsilon, prediction_target):
        with pytest.raises(ValueError, match="unknown prediction_type 'eps'"):
            function(x, x, x[:, :1], x[:, :1], "eps")
