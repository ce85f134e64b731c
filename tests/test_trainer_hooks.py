"""The algorithm hooks of `BaseTrainer` are enough for an algorithm that trains on final samples only (a
forward-process loss, as DiffusionNFT or AWM): the loop, the planning across processes and the rollout serve it
without keeping the trajectory. Also: a trainer takes only its own config class."""

import inspect

import pytest
import torch
import torch.nn.functional as F

from diffalign.config import DDPOConfig, PRDPConfig, load_config
from diffalign.rollout import select_rows, sample_trajectories
from diffalign.trainers import DDPOTrainer, PRDPTrainer
from diffalign.trainers.base import BaseTrainer


def brightness(images, prompts, metadata=None):
    return images.mean(dim=(1, 2, 3)).float().cpu()


class FinalSampleDenoisingTrainer(BaseTrainer):
    """Test-only: reward-weighted denoising regression on the final samples `x_0` (noise them with the scheduler's
    forward process, predict the noise). Nothing but the hooks below: no planning, padding or syncing of its own."""

    config_class = DDPOConfig  # its fields serve: train_batch_size is the samples per optimizer step
    keeps_trajectory = False

    def model_outputs(self, model, batch, rows):
        x0 = batch.trajectories.final_latents[rows.samples]
        generator = torch.Generator().manual_seed(int(rows.samples.sum()))
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        t = torch.full((x0.shape[0],), 500, dtype=torch.long, device=x0.device)
        noisy = self.family.scheduler.add_noise(x0, noise, t)
        with self.accelerator.autocast():
            pred = self.family.forward(model, noisy, t, select_rows(batch.trajectories.conditioning, rows.samples))
        return pred.float(), noise

    def compute_loss(self, outputs, batch, rows):
        pred, noise = outputs
        weights = batch.rewards[rows.samples].float()
        loss = (weights * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        return loss, {"loss": loss.detach()}


def test_a_final_sample_trainer_trains_through_the_hooks_alone(tmp_path, tiny_pipe):
    config = DDPOConfig(model="unused", output_dir=str(tmp_path / "run"), prompts=["a cat", "a dog"], num_epochs=1,
                        sample_num_steps=3, sample_guidance_scale=3.0, sample_num_prompts_per_epoch=2,
                        sample_images_per_prompt=2, sample_batch_size=4, grid_num_images=2, train_batch_size=2,
                        train_micro_batch_size=1, train_learning_rate=1e-2)
    trainer = FinalSampleDenoisingTrainer(config, pipeline=tiny_pipe, reward_fn=brightness)
    seen = []
    run_update = trainer.run_update

    def spy(batch, plan, mode):
        seen.append((batch.trajectories.latents.shape, plan.steps, plan.slots, mode))
        return run_update(batch, plan, mode)

    trainer.run_update = spy
    before = [p.detach().clone() for p in trainer.trainable_params]
    metrics = trainer.step(0)
    # 4 samples, 2 per optimizer step, one row per sample (no trajectory steps), one row per micro-batch
    assert [(plan, slots, mode) for _, plan, slots, mode in seen] == [(None, 2, "micro_batch")] * 2
    assert all(shape[1] == 1 for shape, *_ in seen)  # the rollout kept x_0 alone, not the T + 1 latents
    assert metrics["loss"] > 0 and torch.isfinite(torch.tensor(metrics["grad_norm"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.trainable_params))


def test_the_rollout_keeps_the_same_final_sample_without_the_trajectory(tiny_pipe):
    kept, final_only = (sample_trajectories(tiny_pipe, ["a cat", "a dog"], 3, 3.0, decode=False, keep_latents=keep,
                                            generator=torch.Generator().manual_seed(0)) for keep in (True, False))
    assert kept.latents.shape[1] == 4 and final_only.latents.shape[1] == 1
    assert torch.equal(final_only.final_latents, kept.final_latents)
    assert torch.equal(final_only.log_probs, kept.log_probs)


def test_a_trainer_names_the_config_class_it_expects():
    config = load_config("ddpo", "digits-ddpo")
    with pytest.raises(TypeError, match="PRDPTrainer takes a PRDPConfig, not a DDPOConfig"):
        PRDPTrainer(config)
    with pytest.raises(TypeError, match="DDPOTrainer takes a DDPOConfig, not a PRDPConfig"):
        DDPOTrainer(load_config("prdp", "digits-prdp"))


def test_each_trainer_declares_its_name_once_on_its_config_class():
    from diffalign.config import CONFIG_CLASSES
    from diffalign.trainers import trainer_class

    assert (DDPOTrainer.algorithm, PRDPTrainer.algorithm) == (DDPOConfig.algorithm, PRDPConfig.algorithm)
    from diffalign.trainers import AWMTrainer, DGPOTrainer, NFTTrainer

    assert {name: trainer_class(name) for name in CONFIG_CLASSES} == {
        "ddpo": DDPOTrainer, "prdp": PRDPTrainer, "nft": NFTTrainer, "awm": AWMTrainer, "dgpo": DGPOTrainer}
    # the name is the config's, not written again on the trainer
    for cls in (DDPOTrainer, PRDPTrainer, NFTTrainer, AWMTrainer, DGPOTrainer):
        assert "algorithm =" not in inspect.getsource(cls)
