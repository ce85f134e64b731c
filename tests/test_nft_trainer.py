"""DiffusionNFT's trainer (`diffalign train nft`): the old policy as a second LoRA adapter, one step's loss against
`nft_loss`, CLI runs on tiny SD (epsilon UNet) and SD3 (flow) directories, and a killed run resumed bit-identically."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import assert_killed_run_resumes_bit_identically
from diffalign.cli import main
from diffalign.config import ConfigError, NFTConfig, load_config
from diffalign.forward_process import add_noise, old_policy_decay, vp_schedule
from diffalign.losses import nft_loss, optimality_probability
from diffalign.rollout import select_rows
from diffalign.utils.peft_utils import adapter_active, adapters_disabled, unwrap
from diffalign.trainers import DDPOTrainer, NFTTrainer
from diffalign.trainers.base import BaseTrainer
from diffalign.utils.torch_utils import seed_for
from diffalign.trainers.update_plan import Rows

TINY_ARGS = [
    "--prompts", "[a cat, a dog]", "--num_epochs", "2", "--sample_num_steps", "3", "--sample_num_prompts_per_epoch",
    "2", "--sample_images_per_prompt", "2", "--grid_num_images", "2", "--reward", "jpeg_compressibility",
    "--train_learning_rate", "1e-2", "--final_eval_num_images", "0",
]


def brightness(images, prompts, metadata=None):
    return images.mean(dim=(1, 2, 3)).float().cpu()


def tiny_config(tmp_path, **overrides):
    settings = dict(model="unused", output_dir=str(tmp_path / "run"), prompts=["a cat", "a dog"], num_epochs=1,
                    sample_num_steps=3, sample_num_prompts_per_epoch=2, sample_images_per_prompt=2,
                    sample_batch_size=4, grid_num_images=2, train_learning_rate=1e-2, train_micro_batch_size=3)
    settings.update(overrides)
    return NFTConfig(**settings)


def test_the_old_policy_is_a_frozen_second_adapter_that_samples_and_follows_by_its_decay(tmp_path, tiny_pipe):
    trainer = NFTTrainer(tiny_config(tmp_path), pipeline=tiny_pipe, reward_fn=brightness)
    model = unwrap(trainer.denoiser)
    assert set(model.peft_config) == {"default", "old"}
    # only the trained adapter is trainable, in the optimizer and in checkpoints
    assert all(".default." in name for name in trainer.trainable_names())
    assert not any(p.requires_grad for p in trainer.old_params)
    assert all(torch.equal(a, b) for a, b in zip(trainer.old_params, trainer.policy_params))  # a copy to start
    with adapter_active(trainer.denoiser, "old"):
        assert not any(p.requires_grad for p in model.parameters())
    assert [p.requires_grad for p in trainer.policy_params] == [True] * len(trainer.policy_params)

    # the rollout samples with the old policy: moving the trained adapter does not change it
    prompts = trainer.local_prompts(0)
    first = BaseTrainer.sample(trainer, 0, prompts, False).final_latents  # the trained adapter (still the old one)
    with torch.no_grad():
        for param in trainer.policy_params:
            param.add_(0.5 * torch.randn_like(param))
    assert torch.equal(trainer.sample(0, prompts, False).final_latents, first)
    assert not torch.equal(BaseTrainer.sample(trainer, 0, prompts, False).final_latents, first)

    policy_before = [p.detach().clone() for p in trainer.policy_params]
    old_before = [p.detach().clone() for p in trainer.old_params]
    metrics = trainer.step(0)
    assert metrics["loss"] > 0 and metrics["grad_norm"] > 0
    # one optimizer step per epoch by default: old <- eta old + (1 - eta) theta with eta = min(0.001 * 1, 0.5)
    eta = old_policy_decay(1, 0, 0.001, 0.5)
    assert metrics["old_policy_decay"] == eta
    for old0, old, new in zip(old_before, trainer.old_params, trainer.policy_params):
        assert torch.equal(old, old0 * eta + new * (1 - eta))
    assert any(not torch.equal(a, b) for a, b in zip(policy_before, trainer.policy_params))
    assert [p.requires_grad for p in trainer.policy_params] == [True] * len(trainer.policy_params)
    assert not any(p.requires_grad for p in trainer.old_params)


def test_one_micro_batch_loss_is_nft_loss_of_the_same_tensors(tmp_path, tiny_pipe):
    """The trainer's loss of a micro-batch, against `nft_loss` on predictions made here with the adapters switched
    one at a time (the trainer gets the old and base predictions from one mixed-adapter forward)."""
    trainer = NFTTrainer(tiny_config(tmp_path, sample_guidance_scale=2.0), pipeline=tiny_pipe, reward_fn=brightness)
    with torch.no_grad():  # the three policies differ
        for old, new in zip(trainer.old_params, trainer.policy_params):
            old.add_(0.3 * torch.randn_like(old))
            new.add_(0.3 * torch.randn_like(new))
    prompts = trainer.local_prompts(0)
    trajectories = trainer.sample(0, prompts, False)
    rewards = trainer.score(trajectories)["reward"]
    batch = trainer.training_batch(trajectories, rewards, rewards, prompts, epoch=0)
    rows = Rows(torch.tensor([2, 0, 3]), torch.tensor([1, 2, 0]))
    trainer.denoiser.train()
    outputs = trainer.model_outputs(trainer.denoiser, batch, rows)
    loss, stats = trainer.compute_loss(outputs, batch, rows)

    config, family, model = trainer.config, trainer.family, trainer.denoiser
    x0 = trajectories.final_latents[rows.samples]
    t = trajectories.timesteps[rows.steps]
    noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed_for(0, 0, 11, i, j)))
                         for i, j in zip(rows.samples.tolist(), rows.steps.tolist())])
    alpha_t, sigma_t = vp_schedule(family.scheduler.alphas_cumprod, t, x0)
    x_t = add_noise(x0, noise, alpha_t, sigma_t)
    cond = select_rows(trajectories.conditioning, rows.samples)
    negative = select_rows(trajectories.negative_conditioning, rows.samples)

    def predict():
        return family.predict(model, x_t, t, cond, negative, 2.0)

    output = predict()
    model.eval()
    with torch.no_grad():
        with adapter_active(model, "old"):
            old_output = predict()
        with adapters_disabled(model):
            ref_output = predict()
    advantages = (rewards - rewards.view(2, 2).mean(1).repeat_interleave(2)) / (rewards.std(unbiased=False) + 1e-4)
    optimality = optimality_probability(advantages, 5.0, "all")[rows.samples]
    expected = nft_loss(output, old_output, ref_output, x_t, x0, alpha_t, sigma_t, optimality, 1.0, 5.0, 1e-4,
                        family.scheduler.config.prediction_type)
    assert family.scheduler.config.prediction_type == "epsilon" and negative is not None
    torch.testing.assert_close(loss, expected["loss"], rtol=1e-6, atol=0)
    for key in ("policy_loss", "kl", "old_deviation", "old_kl"):
        torch.testing.assert_close(stats[key].double(), expected[key].double(), rtol=1e-5, atol=0)
    assert stats["kl"] > 0 and stats["old_kl"] > 0
    # the gradient reaches the trained adapter only
    loss.backward()
    assert all(p.grad is not None for p in trainer.policy_params)
    assert all(p.grad is None for p in trainer.old_params)


def test_a_trainer_takes_its_own_config_and_refuses_what_nft_cannot_run(tmp_path):
    with pytest.raises(TypeError, match="NFTTrainer takes a NFTConfig, not a DDPOConfig"):
        NFTTrainer(load_config("ddpo", "digits-ddpo"))
    with pytest.raises(TypeError, match="DDPOTrainer takes a DDPOConfig, not a NFTConfig"):
        DDPOTrainer(load_config("nft", "digits-flow-nft"))
    config = NFTConfig()  # NVIDIA's defaults
    assert (config.train_beta, config.train_adv_clip_max, config.train_adv_mode, config.train_kl_coef,
            config.old_policy_decay_type, config.sample_deterministic, config.sample_guidance_scale,
            config.train_timestep_fraction) == (1.0, 5.0, "all", 1e-4, 1, True, 1.0, 0.99)
    assert NFTConfig(sample_num_steps=10).num_train_steps == 9  # as NVIDIA's int(10 x 0.99)
    for bad, message in [({"train_adv_mode": "best"}, "train_adv_mode must be one of all, positive_only"),
                         ({"old_policy_decay_type": 3}, "old_policy_decay_type must be one of 0, 1, 2"),
                         ({"train_beta": 0.0}, "train_beta must be > 0")]:
        with pytest.raises(ConfigError, match=message):
            tiny_config(tmp_path, **bad).validate()


@pytest.mark.parametrize("family", ["sd", "sd3", pytest.param("flux", marks=pytest.mark.slow)])  # flux: minutes
def test_two_epoch_cli_run_writes_a_lora_that_loads_and_changes_images(family, tmp_path):
    import diffusers

    from diffalign.families import family_named
    from diffalign.testing import save_tiny_pipeline

    model = save_tiny_pipeline(family, str(tmp_path / "model"))
    out = str(tmp_path / "run")
    assert main(["train", "nft", "--model", model, "--output_dir", out, "--train_micro_batch_size", "4"]
                + TINY_ARGS) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [0, 1]
    for key in ("loss", "policy_loss", "kl", "old_deviation", "grad_norm", "old_policy_decay", "time_train"):
        assert key in records[-1]
    weights = load_file(os.path.join(out, "final", "pytorch_lora_weights.safetensors"))
    assert weights and not any(".old." in key for key in weights)  # the trained adapter alone
    pipe = getattr(diffusers, family_named(family).pipeline_class).from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
                    height=32, width=32).images

    base = run()
    pipe.load_lora_weights(os.path.join(out, "final"))
    assert not torch.allclose(base, run())



@pytest.mark.slow  # ~20 s; the shared kill-and-resume check runs by default in test_reliability
def test_killed_and_resumed_run_is_bit_identical(tiny_model_dir, tmp_path):
    """SIGKILL after the first checkpoint, then `--resume`: the old policy comes back from the checkpoint, so the
    LoRA and every logged metric equal a straight run's (the old policy is sampled from and in the loss)."""
    args = ["train", "nft", "--model", tiny_model_dir, "--checkpoint_every", "1", "--train_batch_size", "2",
            "--seed", "3", "--train_micro_batch_size", "4"] + TINY_ARGS + ["--num_epochs", "3"]
    assert_killed_run_resumes_bit_identically(args, tmp_path)
