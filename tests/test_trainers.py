import copy
import dataclasses

import pytest
import torch

from diffalign.config import DDPOConfig, PRDPConfig
from diffalign.rollout import step_log_probs
from diffalign.trainers import DDPOTrainer, PRDPTrainer
from diffalign.trainers.base import TrainingBatch
from diffalign.trainers.update_plan import planned_steps


def brightness(images, prompts, metadata=None):
    return images.mean(dim=(1, 2, 3)).float().cpu()


def tiny_config(cls, tmp_path, **overrides):
    settings = dict(
        model="unused", output_dir=str(tmp_path / "run"), prompts=["a cat", "a dog"], num_epochs=1,
        sample_num_steps=3, sample_guidance_scale=3.0, sample_num_prompts_per_epoch=2, sample_images_per_prompt=2,
        sample_batch_size=4, grid_num_images=2, train_learning_rate=1e-2,
    )
    settings.update(overrides)
    return cls(**settings)


def lora_weights(trainer):
    return [p.detach().clone() for p in trainer.trainable_params]


def test_ddpo_epoch_changes_only_the_lora(tmp_path, tiny_pipe):
    config = tiny_config(DDPOConfig, tmp_path, train_batch_size=2, advantage_mode="group", train_clip_range=0.2,
                         sample_compute_kl=True)
    base = {n: p.detach().clone() for n, p in tiny_pipe.unet.named_parameters()}
    trainer = DDPOTrainer(config, pipeline=tiny_pipe, reward_fn=brightness)
    before = lora_weights(trainer)
    metrics = trainer.step(0)
    for key in ("reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "kl_to_base", "time_epoch"):
        assert key in metrics
    assert any(not torch.equal(a, b) for a, b in zip(before, lora_weights(trainer)))
    for name, param in trainer.pipe.unet.named_parameters():
        if "lora" not in name:
            torch.testing.assert_close(param.detach(), base[name.replace(".base_layer", "")])


def test_ddpo_full_unet_with_kl_penalty(tmp_path, tiny_pipe):
    config = tiny_config(DDPOConfig, tmp_path, use_lora=False, train_batch_size=4, train_kl_coef=0.1,
                         train_learning_rate=1e-3, advantage_mode="batch")
    trainer = DDPOTrainer(config, pipeline=tiny_pipe, reward_fn=brightness)
    assert trainer.ref_denoiser is not None
    before = copy.deepcopy(trainer.pipe.unet.state_dict())
    trainer.step(0)
    metrics = trainer.step(1)
    assert metrics["kl_penalty"] > 0 and metrics["kl_to_base"] > 0
    changed = [k for k, v in trainer.pipe.unet.state_dict().items() if not torch.equal(v, before[k])]
    assert changed


def implicit_rewards(trainer, traj):
    n, steps = len(traj), traj.num_steps
    rows, step_index = torch.arange(n).repeat_interleave(steps), torch.arange(steps).repeat(n)
    with torch.no_grad():
        log_probs, _, _ = step_log_probs(trainer.family, trainer.denoiser, trainer.kernel, traj, rows, step_index,
                                         trainer.config.sample_guidance_scale)
    return (log_probs.view(n, steps) - traj.ref_log_probs).mean(dim=1)


@pytest.mark.parametrize("two_pass", [False, True])
def test_one_prdp_update_raises_the_implicit_reward_of_the_better_image(tmp_path, tiny_pipe, two_pass):
    config = tiny_config(PRDPConfig, tmp_path, prompts=["a cat"], sample_num_prompts_per_epoch=1,
                         train_num_inner_epochs=1, train_beta=1.0, train_clip_eps=1.0, train_learning_rate=1e-3,
                         train_two_pass=two_pass, train_micro_batch_size=2)
    trainer = PRDPTrainer(config, pipeline=tiny_pipe, reward_fn=brightness)
    traj = trainer.sample(0, ["a cat", "a cat"], compute_reference=True)
    rewards = torch.tensor([1.0, 0.0])
    before = implicit_rewards(trainer, traj)
    trainer.denoiser.train()
    metrics = trainer.train_on_samples(traj, rewards, rewards, traj.prompts, 0)
    after = implicit_rewards(trainer, traj)
    assert metrics["loss"] > 0
    assert (after[0] - after[1]) > (before[0] - before[1])


def test_prdp_two_pass_gradient_equals_single_pass(tmp_path, tiny_pipe):
    config = tiny_config(PRDPConfig, tmp_path, train_clip_eps=1e-3, train_beta=0.1, train_micro_batch_size=3)
    trainer = PRDPTrainer(config, pipeline=tiny_pipe, reward_fn=brightness)
    traj = trainer.sample(0, ["a cat"] * 2 + ["a dog"] * 2, compute_reference=True)
    rewards = torch.tensor([0.3, 0.1, 0.5, 0.9])
    samples = torch.arange(4)
    plan = torch.tensor([[0, 2], [1, 2], [0, 1], [2, 0]])
    batch = TrainingBatch(traj, rewards=rewards)
    grads = []
    for mode in ("single_pass", "two_pass"):
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.run_update(batch, trainer.local_plan(batch, samples, plan), mode)
        grads.append(torch.cat([p.grad.reshape(-1) for p in trainer.trainable_params]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_nan_reward_is_skipped_without_touching_weights(tmp_path, tiny_pipe):
    def nan_reward(images, prompts, metadata=None):
        return torch.full((images.shape[0],), float("nan"))

    config = tiny_config(DDPOConfig, tmp_path, train_batch_size=2, max_nonfinite_in_a_row=2)
    trainer = DDPOTrainer(config, pipeline=tiny_pipe, reward_fn=nan_reward)
    before = lora_weights(trainer)
    metrics = trainer.step(0)
    assert metrics["skipped_nonfinite"] == 1.0 and metrics["nonfinite_total"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, lora_weights(trainer)))
    from diffalign.trainers import NonFiniteError

    with pytest.raises(NonFiniteError, match="2 batches in a row"):
        trainer.step(1)


def test_nan_gradient_is_skipped(tmp_path, tiny_pipe):
    config = tiny_config(DDPOConfig, tmp_path, train_batch_size=4, advantage_mode="batch")
    trainer = DDPOTrainer(config, pipeline=tiny_pipe, reward_fn=brightness)
    trainer.trainable_params[0].register_hook(lambda grad: grad * float("nan"))
    before = lora_weights(trainer)
    metrics = trainer.step(0)
    assert metrics["skipped"] == 1.0 and trainer.nonfinite_total == 1
    assert all(torch.equal(a, b) for a, b in zip(before, lora_weights(trainer)))


def test_moderate_prompt_selection_drops_a_solved_prompt(tmp_path, tiny_pipe):
    def solved_cat(images, prompts, metadata=None):
        # every "a cat" image scores 1; "a dog" images vary with brightness
        return torch.tensor([1.0 if p == "a cat" else float(x) for p, x in zip(prompts, brightness(images, prompts))])

    config = tiny_config(DDPOConfig, tmp_path, prompts=["a cat", "a dog"], train_batch_size=2, train_clip_range=0.2,
                         sample_num_prompts_per_epoch=8, sample_images_per_prompt=1, sample_batch_size=8,
                         sample_prompt_selection="moderate")
    trainer = DDPOTrainer(config, pipeline=tiny_pipe, reward_fn=solved_cat)
    trainer.prompt_difficulty.min_count = 2
    assert trainer.step(0)["distinct_prompts"] == 2  # nothing known yet: both prompts drawn alike
    weights = trainer.prompt_difficulty.weights(["a cat", "a dog"])
    assert weights[0] == pytest.approx(0.1 * weights[1])  # no spread: the floor weight
    drawn = [p for epoch in range(1, 6) for p in trainer.local_prompts(epoch)]
    assert drawn.count("a dog") > 3 * drawn.count("a cat")
    assert trainer.extra_state()["prompt_difficulty"]["rewards"]["a cat"] == [1.0] * len(
        trainer.prompt_difficulty.rewards["a cat"])


def test_prdp_computes_reference_log_probs_of_trained_steps_only(tmp_path, tiny_pipe):
    config = tiny_config(PRDPConfig, tmp_path, sample_num_steps=4, train_timestep_fraction=0.5,
                         sample_compute_kl=False, train_num_inner_epochs=2)
    trainer = PRDPTrainer(config, pipeline=tiny_pipe, reward_fn=brightness)
    assert not trainer.needs_reference()
    recorded = trainer.sample(0, trainer.local_prompts(0), compute_reference=True)
    generator = torch.Generator().manual_seed(0)
    plans = [trainer.train_step_plan(recorded.stochastic, generator) for _ in range(2)]
    lazy = trainer._reference_log_probs(recorded.to(trainer.device), plans)
    trained = torch.zeros_like(lazy, dtype=torch.bool)
    for plan in plans:
        for sample, steps in enumerate(plan.tolist()):
            trained[sample, steps] = True
    assert torch.equal(planned_steps(plans, 4), trained) and not trained.all()
    torch.testing.assert_close(lazy[trained], recorded.ref_log_probs[trained], rtol=0, atol=1e-5)
    assert torch.isnan(lazy[~trained]).all()
    before = lora_weights(trainer)
    metrics = trainer.step(0)
    assert "kl_to_base" not in metrics and torch.isfinite(torch.tensor(metrics["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, lora_weights(trainer)))
    assert trainer.denoiser.training  # the reference pass restores the mode


def test_prompt_difficulty_is_restored_on_resume(tmp_path, tiny_pipe):
    config = tiny_config(PRDPConfig, tmp_path, num_epochs=2, checkpoint_every=1, train_num_inner_epochs=1,
                         sample_prompt_selection="moderate")
    trainer = PRDPTrainer(config, pipeline=copy.deepcopy(tiny_pipe), reward_fn=brightness)
    trainer.train(progress=False)
    resumed = PRDPTrainer(dataclasses.replace(config, num_epochs=3, resume_from=config.output_dir),
                          pipeline=tiny_pipe, reward_fn=brightness)
    assert resumed.first_epoch == 2
    assert resumed.prompt_difficulty.rewards == trainer.prompt_difficulty.rewards
    assert resumed.local_prompts(2) == trainer.local_prompts(2)


def test_ddpo_trains_on_the_last_epochs_samples_too(tmp_path, tiny_pipe):
    config = tiny_config(DDPOConfig, tmp_path, train_batch_size=2, advantage_mode="batch", train_clip_range=0.2,
                         train_reuse_epochs=1)
    trainer = DDPOTrainer(config, pipeline=tiny_pipe, reward_fn=brightness)
    seen = []
    run_update = trainer.run_update

    def spy(batch, plan, mode):
        seen.append((batch.trajectories, batch.advantages))
        return run_update(batch, plan, mode)

    trainer.run_update = spy
    assert trainer.step(0)["reused_samples"] == 0
    assert len(seen) == 2 and len(seen[-1][0]) == 4  # 4 fresh samples, 2 per update
    first, first_advantages = seen[-1]
    assert trainer.step(1)["reused_samples"] == 4
    assert len(seen) == 6  # twice the updates: 4 old + 4 fresh samples
    both, advantages = seen[-1]
    assert len(both) == 8 and both.images is None
    # the old samples keep what was recorded when they were drawn: latents, log pi_old and advantages
    for name in ("latents", "log_probs"):
        torch.testing.assert_close(getattr(both, name)[:4], getattr(first, name), rtol=0, atol=0)
    torch.testing.assert_close(both.conditioning["encoder_hidden_states"][:4],
                               first.conditioning["encoder_hidden_states"], rtol=0, atol=0)
    torch.testing.assert_close(advantages[:4], first_advantages, rtol=0, atol=0)
    assert not torch.equal(both.latents[4:], first.latents)
    assert len(trainer.replay) == 1 and torch.equal(trainer.replay[0][0].latents, both.latents[4:].cpu())


def test_reused_samples_are_restored_on_resume(tmp_path, tiny_pipe):
    config = tiny_config(DDPOConfig, tmp_path, num_epochs=2, checkpoint_every=1, train_batch_size=2,
                         advantage_mode="batch", train_clip_range=0.2, train_reuse_epochs=1)
    trainer = DDPOTrainer(config, pipeline=copy.deepcopy(tiny_pipe), reward_fn=brightness)
    trainer.train(progress=False)
    resumed = DDPOTrainer(dataclasses.replace(config, num_epochs=3, resume_from=config.output_dir),
                          pipeline=tiny_pipe, reward_fn=brightness)
    assert resumed.first_epoch == 2 and len(resumed.replay) == 1
    (saved, saved_advantages), (restored, restored_advantages) = trainer.replay[0], resumed.replay[0]
    assert restored.prompts == saved.prompts and torch.equal(restored_advantages, saved_advantages)
    for name in ("latents", "log_probs", "timesteps", "group_ids"):
        assert torch.equal(getattr(restored, name), getattr(saved, name))
    trainer.step(2)
    resumed.step(2)
    for a, b in zip(lora_weights(trainer), lora_weights(resumed)):
        torch.testing.assert_close(a, b)


def test_thread_count_default_is_one_for_the_bundled_models_and_explicit_otherwise(monkeypatch):
    """The bundled presets run on one torch thread whatever the caller's setting (fast on a shared CPU, and the same
    bits on any core count); `num_threads` sets it for any model; other models keep torch's setting."""
    from diffalign.config import PRDPConfig
    from diffalign.utils.torch_utils import set_torch_threads

    before = torch.get_num_threads()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        torch.set_num_threads(2)
        set_torch_threads(PRDPConfig(model="digits"))
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        set_torch_threads(PRDPConfig(model="digits-flow", num_threads=2))
        assert torch.get_num_threads() == 2
        set_torch_threads(PRDPConfig(model="/models/sd15"))
        assert torch.get_num_threads() == 2
        set_torch_threads(PRDPConfig(model="/models/sd15", num_threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_prdp_two_pass_default_follows_the_micro_batch(tmp_path, _tiny_pipe_template, monkeypatch):
    """`train_two_pass` unset: one pass when an update's rows fit one micro-batch, two passes (memory bounded by the
    micro-batch) when they do not."""
    from diffalign.config import PRDPConfig
    from diffalign.trainers.prdp import PRDPTrainer

    used = []
    for micro, expected in ((64, "single"), (2, "two")):
        config = PRDPConfig(output_dir=str(tmp_path / f"m{micro}"), prompts=["a", "b"], num_epochs=1,
                            sample_num_steps=2, sample_num_prompts_per_epoch=2, sample_images_per_prompt=2,
                            sample_batch_size=4, train_num_inner_epochs=1, train_micro_batch_size=micro,
                            sample_guidance_scale=1.0, grid_num_images=2, reward="jpeg_compressibility")
        trainer = PRDPTrainer(config, pipeline=copy.deepcopy(_tiny_pipe_template))

        def spy(batch, plan, mode, _run=trainer.run_update):
            used.append(mode.split("_")[0])
            return _run(batch, plan, mode)

        monkeypatch.setattr(trainer, "run_update", spy)
        trainer.step(0)
        assert set(used) == {expected}, (micro, used)
        used.clear()
