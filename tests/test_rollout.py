import torch

from diffalign.families import family_for_pipeline
from diffalign.rollout import default_kernel, sample_trajectories, step_log_probs
from diffalign.utils.peft_utils import add_lora


def recompute(pipe, unet, traj, guidance_scale):
    n, steps = len(traj), traj.num_steps
    rows = torch.arange(n).repeat_interleave(steps)
    step_index = torch.arange(steps).repeat(n)
    family = family_for_pipeline(pipe)
    with torch.no_grad():
        log_probs, _, _ = step_log_probs(family, unet, default_kernel(family, eta=1.0), traj, rows, step_index,
                                         guidance_scale)
    return log_probs.view(n, steps)


def test_trajectory_shapes_and_groups(tiny_pipe):
    traj = sample_trajectories(tiny_pipe, ["a cat", "a cat", "a dog"], num_inference_steps=3, guidance_scale=4.0,
                               generator=torch.Generator().manual_seed(0))
    assert traj.latents.shape == (3, 4, 4, 16, 16)
    assert traj.log_probs.shape == (3, 3) and traj.log_probs.dtype == torch.float32
    assert traj.images.shape == (3, 3, 32, 32) and 0 <= traj.images.min() and traj.images.max() <= 1
    embeds = traj.conditioning["encoder_hidden_states"]
    assert embeds.shape[0] == 3 and traj.negative_conditioning["encoder_hidden_states"].shape == embeds.shape
    assert traj.stochastic.all() and traj.stochastic.shape == (3, 3)
    assert traj.group_ids.tolist() == [0, 0, 1]
    assert torch.equal(traj.timesteps, tiny_pipe.scheduler.timesteps)
    subset = traj.select(torch.tensor([2, 0]))
    assert subset.prompts == ["a dog", "a cat"] and torch.equal(subset.latents[1], traj.latents[0])


def test_recomputed_log_probs_reproduce_recorded_ones_with_lora(tiny_pipe):
    add_lora(tiny_pipe.unet)
    for param in tiny_pipe.unet.parameters():  # make the adapter non-trivial
        if param.requires_grad:
            param.data.normal_(0, 0.05)
    traj = sample_trajectories(tiny_pipe, ["a cat", "a dog"], num_inference_steps=4, guidance_scale=3.0,
                               generator=torch.Generator().manual_seed(1), compute_reference=True)
    ratio = torch.exp(recompute(tiny_pipe, tiny_pipe.unet, traj, 3.0) - traj.log_probs)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    # the reference (adapter disabled) differs from the policy, and its KL is positive
    assert (traj.ref_log_probs - traj.log_probs).abs().max() > 1e-4
    assert (traj.kl_to_ref > 0).all()


def test_no_cfg_sampling_and_same_seed_same_trajectory(tiny_pipe):
    a = sample_trajectories(tiny_pipe, ["x"], num_inference_steps=2, guidance_scale=1.0,
                            generator=torch.Generator().manual_seed(5))
    b = sample_trajectories(tiny_pipe, ["x"], num_inference_steps=2, guidance_scale=1.0,
                            generator=torch.Generator().manual_seed(5))
    assert a.negative_conditioning is None
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)


def test_sampling_with_guidance_matches_the_stock_pipeline(tiny_pipe):
    # Same initial latents and DDIM(eta=0)-free comparison: with eta=1 the pipeline draws the same noise from the
    # same generator, so the decoded images must agree.
    generator = torch.Generator().manual_seed(7)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    ours = sample_trajectories(tiny_pipe, ["a cat", "a dog"], num_inference_steps=3, guidance_scale=5.0, eta=1.0,
                               latents=latents, generator=torch.Generator().manual_seed(8))
    stock = tiny_pipe(["a cat", "a dog"], num_inference_steps=3, guidance_scale=5.0, eta=1.0, latents=latents,
                      generator=torch.Generator().manual_seed(8), output_type="pt").images
    torch.testing.assert_close(ours.images, stock, atol=1e-5, rtol=1e-4)


def test_family_caches_prompt_embeddings(tiny_pipe):
    family = family_for_pipeline(tiny_pipe)
    first = family.encode_prompts(["a", "b", "a"])["encoder_hidden_states"]
    assert set(family._cache) == {"a", "b"}
    torch.testing.assert_close(first[0], first[2])
    calls = []
    original = tiny_pipe.encode_prompt
    tiny_pipe.encode_prompt = lambda *args, **kwargs: calls.append(args) or original(*args, **kwargs)
    family.encode_prompts(["b", "a"])
    assert calls == []


def test_reference_from_the_shared_forward_matches_a_separate_forward(tiny_pipe):
    add_lora(tiny_pipe.unet)
    for param in tiny_pipe.unet.parameters():
        if param.requires_grad:
            param.data.normal_(0, 0.05)
    runs = []
    for training in (False, True):  # eval: one mixed-adapter forward; train mode: two forwards (adapters toggled)
        tiny_pipe.unet.train(training)
        runs.append(sample_trajectories(tiny_pipe, ["a cat", "a dog"], num_inference_steps=3, guidance_scale=3.0,
                                        generator=torch.Generator().manual_seed(2), compute_reference=True))
    shared, separate = runs
    torch.testing.assert_close(shared.log_probs, separate.log_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.ref_log_probs, separate.ref_log_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.kl_to_ref, separate.kl_to_ref, atol=1e-6, rtol=1e-3)
