"""Advantage Weighted Matching (`diffalign train awm`): the loss, its gradient, the noise-level draws and the EMA
adapter's schedule against the authors' code (tests/awm_reference.py), one micro-batch of the trainer against
`awm_loss`, CLI runs on tiny SD (epsilon UNet) and SD3 (flow) directories, and a killed run resumed bit-identically."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import awm_reference as ref
from cli_helpers import assert_killed_run_resumes_bit_identically
from diffalign.cli import main
from diffalign.config import AWMConfig, ConfigError, load_config
from diffalign.forward_process import add_noise, prediction_target, update_old_policy_, vp_schedule
from diffalign.losses import AWM_WEIGHTINGS, awm_advantages, awm_log_prob, awm_loss
from diffalign.rollout import select_rows
from diffalign.trainers import AWMTrainer
from diffalign.trainers.awm import awm_ema_decay, awm_train_step_indices
from diffalign.trainers.base import BaseTrainer
from diffalign.trainers.update_plan import Rows
from diffalign.utils.peft_utils import adapter_active, adapters_disabled
from diffalign.utils.torch_utils import seed_for

T, B = 3, 4  # noise levels per sample, samples
NO_ACCELERATOR = SimpleNamespace(is_main_process=False, device="cpu")


def reference_config(**train):
    settings = dict(ghuber_power=0.25, adv_clip_max=5, advantage_max=1, loss_type="exp_first", clip_range=1.0,
                    beta=0.0, kl_weight="Uniform", ema_beta=0.0, kl_ema_weight="Uniform", train_timesteps=T)
    settings.update(train)
    return SimpleNamespace(train=SimpleNamespace(**settings))


def time_major_tensors(seed=0):
    """The authors' layout: `(T * B, ...)` rows, all samples at the first noise level, then the second..."""
    g = torch.Generator().manual_seed(seed)
    shape = (T * B, 4, 6, 6)
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    velocity = noise - x0
    pred = velocity + 0.7 * torch.randn(shape, generator=g)
    ref_pred = velocity + 0.7 * torch.randn(shape, generator=g)
    ema_pred = pred + 0.2 * torch.randn(shape, generator=g)
    sigmas = torch.rand(T, generator=g) * 0.9 + 0.05
    timestep = sigmas.repeat_interleave(B).view(-1, 1, 1, 1)
    advantages = 3.0 * torch.randn(B, generator=g)
    advantages[0] = 7.0  # beyond the clip of 5
    return x0, noise, pred, ref_pred, ema_pred, timestep, advantages


def sample_major(x):
    """`(T * B, ...)` time-major rows -> diffalign's sample-major rows (the T levels of a sample in a row)."""
    return x.view(T, B, *x.shape[1:]).transpose(0, 1).reshape(T * B, *x.shape[1:])


@pytest.mark.parametrize("weighting", AWM_WEIGHTINGS)
def test_log_prob_is_the_authors_compute_log_prob_awm(weighting):
    x0, noise, pred, _, _, timestep, _ = time_major_tensors()
    config = reference_config(ghuber_power=0.3)
    expected, _, _ = ref.compute_log_prob_awm_math(pred, timestep, config, x0, noise, weighting)
    ours = awm_log_prob(pred, noise.double() - x0.double(), timestep.view(-1), weighting, 0.3)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize("loss_type,weighting,kl_weight,beta,ema_beta,clip_range,off_policy", [
    ("exp_first", "ghuber", "Uniform", 1e-3, 1.0, 1.0, False),  # the authors' presets (geneval)
    ("exp_first", "Uniform", "ELBO", 0.1, 0.5, 0.02, True),
    ("sum_first", "t", "Uniform", 0.05, 0.0, 0.01, True),
    ("sum_first", "huber", "ELBO", 0.0, 0.0, 1e-4, False),
    ("exp_first", "t**2", "ELBO", 0.2, 2.0, 0.05, True),
])
def test_loss_and_gradient_equal_the_authors(loss_type, weighting, kl_weight, beta, ema_beta, clip_range,
                                             off_policy):
    """The same tensors through the authors' loss (their time-major batch) and `awm_loss` (sample-major rows): the
    same loss and the same gradient in the model output, on-policy (ratio against itself) and off-policy (against
    the EMA adapter's log-likelihood, with clipping)."""
    x0, noise, pred, ref_pred, ema_pred, timestep, advantages = time_major_tensors()
    config = reference_config(loss_type=loss_type, beta=beta, kl_weight=kl_weight, ema_beta=ema_beta,
                              kl_ema_weight=kl_weight, clip_range=clip_range)

    leaf = pred.clone().requires_grad_(True)
    log_prob, model_output, std_dev_t = ref.compute_log_prob_awm_math(leaf, timestep, config, x0, noise, weighting)
    _, model_output_ref, _ = ref.compute_log_prob_awm_math(ref_pred, timestep, config, x0, noise, weighting)
    ema_log_prob, model_output_ema, _ = ref.compute_log_prob_awm_math(ema_pred, timestep, config, x0, noise,
                                                                      weighting)
    old = ema_log_prob if off_policy else log_prob.detach()
    sample = {"advantages": advantages[:, None], "log_probs": log_prob.reshape(T, B),
              "old_log_probs": old.reshape(T, B),
              "model_output": model_output.reshape(T, B, *model_output.shape[1:]),
              "model_output_ref": model_output_ref.reshape(T, B, *model_output.shape[1:]),
              "model_output_ema": model_output_ema.reshape(T, B, *model_output.shape[1:]),
              "std_dev_t": std_dev_t.reshape(T, B, *std_dev_t.shape[1:])}
    expected, expected_policy, ratio = ref.awm_policy_and_kl_loss(sample, config, NO_ACCELERATOR)
    expected.backward()
    expected_grad = leaf.grad.clone()
    if off_policy:
        assert ((ratio - 1).abs() > clip_range).any()  # the clip is exercised

    leaf.grad = None
    target = sample_major(noise.double() - x0.double())  # the authors' target is float64
    time = sample_major(timestep).view(-1)
    rows_adv = awm_advantages(advantages, 5, 1).repeat_interleave(T)
    old_log_prob = awm_log_prob(sample_major(ema_pred), target, time, weighting, 0.25) if off_policy else None
    out = awm_loss(sample_major(leaf), target, time, rows_adv, clip_range, old_log_prob=old_log_prob,
                   ref_model_output=sample_major(ref_pred) if beta else None,
                   ema_model_output=sample_major(ema_pred) if beta and ema_beta else None,
                   weighting=weighting, loss_type=loss_type, steps_per_sample=T, kl_coef=beta, kl_weight=kl_weight,
                   ema_kl_coef=ema_beta if beta else 0.0, ema_kl_weight=kl_weight)
    out["loss"].backward()
    torch.testing.assert_close(out["loss"], expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out["policy_loss"], expected_policy.detach(), rtol=1e-12, atol=1e-15)
    # the gradient is float32 at the output (cast back from the float64 loss); the sums run in another order
    assert (leaf.grad - expected_grad).norm() <= 1e-6 * expected_grad.norm() and expected_grad.norm() > 0
    torch.testing.assert_close(leaf.grad, expected_grad, rtol=1e-5, atol=1e-9)


def test_advantages_are_clipped_then_rescaled():
    advantages = torch.tensor([-9.0, -1.0, 0.0, 2.5, 6.0])
    torch.testing.assert_close(awm_advantages(advantages, 5.0, 1.0), torch.tensor([-1.0, -0.2, 0.0, 0.5, 1.0]))
    torch.testing.assert_close(awm_advantages(advantages, 5.0), torch.tensor([-5.0, -1.0, 0.0, 2.5, 5.0]))


@pytest.mark.parametrize("time_type", ["discrete", "discrete_wo_init", "discrete_with_init"])
def test_noise_level_draws_are_the_authors(time_type):
    """The same uniforms give the same sampler steps as the authors' `time_type` draws (14 steps, fraction 0.9, 6
    levels: their presets), and each draw takes one step per stratum."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(14)
    config = SimpleNamespace(time_type=time_type, sample=SimpleNamespace(num_steps=14),
                             train=SimpleNamespace(timestep_fraction=0.9, train_timesteps=6, batch_size=1))
    sample = {"timesteps": scheduler.timesteps[None]}
    strata = 5 if time_type == "discrete_with_init" else 6
    seen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        expected = ref.train_timesteps_draw(config, sample, NO_ACCELERATOR).view(-1)
        torch.manual_seed(seed)
        indices = awm_train_step_indices(time_type, int(14 * 0.9), 6, torch.rand(strata))
        torch.testing.assert_close(scheduler.timesteps[indices] / 1000, expected, rtol=0, atol=0)
        assert len(set(indices.tolist())) == 6 and indices.max() < 12
        seen.update(indices.tolist())
    assert (0 in seen) == (time_type != "discrete_wo_init")


@pytest.mark.parametrize("decay_type", ["linear", "constant"])
def test_ema_adapter_follows_the_authors_schedule(decay_type):
    config = SimpleNamespace(train=SimpleNamespace(kl_ema_decay=0.3, kl_ema_decay_type=decay_type))
    for step in (1, 50, 299, 300, 1000):
        params = [torch.randn(3, 2), torch.randn(5)]
        ema = [torch.randn(3, 2), torch.randn(5)]
        expected_ema = [p.clone() for p in ema]
        decay = ref.ema_adapter_update(config, step, NO_ACCELERATOR, params, expected_ema)
        assert awm_ema_decay(step, 0.3, decay_type) == decay
        update_old_policy_(ema, params, decay)
        for a, b in zip(ema, expected_ema):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ the trainer
def brightness(images, prompts, metadata=None):
    return images.mean(dim=(1, 2, 3)).float().cpu()


def tiny_config(tmp_path, **overrides):
    settings = dict(model="unused", output_dir=str(tmp_path / "run"), prompts=["a cat", "a dog"], num_epochs=1,
                    sample_num_steps=4, sample_num_prompts_per_epoch=2, sample_images_per_prompt=2,
                    sample_batch_size=4, grid_num_images=2, train_learning_rate=1e-2, train_micro_batch_size=4,
                    train_timesteps=2, train_timestep_fraction=1.0)
    settings.update(overrides)
    return AWMConfig(**settings)


@pytest.mark.parametrize("off_policy,loss_type", [(True, "sum_first"), (False, "exp_first")])
def test_one_micro_batch_loss_is_awm_loss_of_the_same_tensors(off_policy, loss_type, tmp_path, tiny_pipe):
    """The trainer's loss of a micro-batch (an epsilon UNet), against `awm_loss` on predictions made here with the
    adapters switched one at a time and the epsilon target; off-policy the ratio is against the EMA adapter."""
    trainer = AWMTrainer(tiny_config(tmp_path, sample_guidance_scale=2.0, train_off_policy=off_policy,
                                     train_loss_type=loss_type, train_kl_coef=0.05, train_clip_range=0.01,
                                     train_kl_weight="ELBO"), pipeline=tiny_pipe, reward_fn=brightness)
    with torch.no_grad():  # the three policies differ
        for old, new in zip(trainer.old_params, trainer.policy_params):
            old.add_(0.3 * torch.randn_like(old))
            new.add_(0.3 * torch.randn_like(new))
    prompts = trainer.local_prompts(0)
    trajectories = trainer.sample(0, prompts, False)
    rewards = trainer.score(trajectories)["reward"]
    batch = trainer.training_batch(trajectories, rewards, rewards, prompts, epoch=0)
    rows = Rows(torch.tensor([2, 2, 0, 0]), torch.tensor([1, 3, 0, 2]))
    trainer.denoiser.train()
    outputs = trainer.model_outputs(trainer.denoiser, batch, rows)
    loss, stats = trainer.compute_loss(outputs, batch, rows)

    family, model = trainer.family, trainer.denoiser
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
            ema_output = predict()
        with adapters_disabled(model):
            ref_output = predict()
    assert family.scheduler.config.prediction_type == "epsilon" and negative is not None
    target = noise  # the epsilon model's own target
    torch.testing.assert_close(prediction_target(x0, noise, alpha_t, sigma_t, "epsilon"), target)
    time = t.float() / 1000
    advantages = (rewards - rewards.view(2, 2).mean(1).repeat_interleave(2)) / (rewards.std(unbiased=False) + 1e-4)
    old_log_prob = awm_log_prob(ema_output, target, time, "ghuber", 0.25) if off_policy else None
    expected = awm_loss(output, target, time, awm_advantages(advantages, 5.0, 1.0)[rows.samples], 0.01,
                        old_log_prob=old_log_prob, ref_model_output=ref_output, ema_model_output=ema_output,
                        weighting="ghuber", loss_type=loss_type, steps_per_sample=2, kl_coef=0.05,
                        kl_weight="ELBO", ema_kl_coef=1.0)
    torch.testing.assert_close(loss, expected["loss"], rtol=1e-6, atol=0)
    for key in ("policy_loss", "kl", "ema_kl", "matching_loss", "clipfrac", "approx_kl"):
        torch.testing.assert_close(stats[key], expected[key], rtol=1e-5, atol=1e-9)
    assert stats["kl"] > 0 and stats["ema_kl"] > 0 and (stats["approx_kl"] > 0) == off_policy
    loss.backward()  # the gradient reaches the trained adapter only
    assert all(p.grad is not None for p in trainer.policy_params)
    assert all(p.grad is None for p in trainer.old_params)


def test_on_policy_samples_with_the_trained_adapter_off_policy_with_the_ema_one(tmp_path, tiny_pipe):
    trainer = AWMTrainer(tiny_config(tmp_path), pipeline=tiny_pipe, reward_fn=brightness)
    prompts = trainer.local_prompts(0)
    with torch.no_grad():
        for param in trainer.policy_params:
            param.add_(0.5 * torch.randn_like(param))
    trained = BaseTrainer.sample(trainer, 0, prompts, False).final_latents
    assert torch.equal(trainer.sample(0, prompts, False).final_latents, trained)
    trainer.config.train_off_policy = True
    assert not torch.equal(trainer.sample(0, prompts, False).final_latents, trained)
    # the EMA adapter after an epoch: decay min(0.3, 0.001 x optimizer steps)
    trainer.config.train_off_policy = False
    old_before = [p.detach().clone() for p in trainer.old_params]
    metrics = trainer.step(0)
    assert metrics["old_policy_decay"] == 0.001 and metrics["loss"] != 0 and metrics["grad_norm"] > 0
    for old0, old, new in zip(old_before, trainer.old_params, trainer.policy_params):
        assert torch.equal(old, old0 * 0.001 + new * (1 - 0.001))


def test_defaults_are_the_authors_and_bad_values_are_one_line_config_errors(tmp_path):
    config = AWMConfig()
    assert (config.train_timesteps, config.train_timestep_fraction, config.train_time_type, config.train_weighting,
            config.train_ghuber_power, config.train_loss_type, config.train_clip_range, config.train_adv_clip_max,
            config.train_advantage_max, config.train_kl_weight, config.train_ema_kl_coef, config.train_kl_ema_decay,
            config.train_kl_ema_decay_type, config.train_off_policy, config.sample_guidance_scale) == (
        6, 0.9, "discrete", "ghuber", 0.25, "exp_first", 1.0, 5.0, 1.0, "Uniform", 1.0, 0.3, "linear", False, 1.0)
    assert load_config("awm", "digits-flow-awm").algorithm == "awm"
    for bad, message in [({"train_weighting": "cosine"}, "train_weighting must be one of Uniform, t, t\\*\\*2"),
                         ({"train_time_type": "logit_normal"}, "train_time_type must be one of discrete, "),
                         ({"train_loss_type": "mean"}, "train_loss_type must be one of exp_first, sum_first"),
                         ({"train_kl_weight": "KL"}, "train_kl_weight must be one of Uniform, ELBO"),
                         ({"train_kl_ema_decay_type": "cosine"}, "train_kl_ema_decay_type must be one of linear"),
                         ({"train_clip_range": 0.0}, "train_clip_range must be > 0"),
                         ({"train_kl_coef": -1.0}, "train_kl_coef must be >= 0"),
                         ({"train_kl_ema_decay": 1.0}, "train_kl_ema_decay must be in \\[0, 1\\)"),
                         ({"train_timesteps": 5}, "train_timesteps \\(5\\) needs that many sampling steps"),
                         ({"train_loss_type": "sum_first", "train_micro_batch_size": 3},
                          "sum_first needs whole samples per micro-batch")]:
        with pytest.raises(ConfigError, match=message) as error:
            tiny_config(tmp_path, **bad).validate()
        assert "\n" not in str(error.value)


TINY_ARGS = [
    "--prompts", "[a cat, a dog]", "--num_epochs", "2", "--sample_num_steps", "3", "--sample_num_prompts_per_epoch",
    "2", "--sample_images_per_prompt", "2", "--grid_num_images", "2", "--reward", "jpeg_compressibility",
    "--train_learning_rate", "1e-2", "--final_eval_num_images", "0", "--train_timesteps", "2",
    "--train_timestep_fraction", "1.0",
]


@pytest.mark.parametrize("family", [pytest.param("sd", marks=pytest.mark.slow), "sd3"])  # sd: epsilon, in the unit tests
def test_two_epoch_cli_run_writes_a_lora_that_loads_and_changes_images(family, tmp_path):
    import diffusers

    from diffalign.families import family_named
    from diffalign.testing import save_tiny_pipeline

    model = save_tiny_pipeline(family, str(tmp_path / "model"))
    out = str(tmp_path / "run")
    assert main(["train", "awm", "--model", model, "--output_dir", out, "--train_micro_batch_size", "4",
                 "--train_kl_coef", "0.01"] + TINY_ARGS) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [0, 1]
    for key in ("loss", "policy_loss", "kl", "ema_kl", "matching_loss", "grad_norm", "old_policy_decay"):
        assert key in records[-1]
    assert records[-1]["kl"] > 0
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



@pytest.mark.slow  # three CLI runs of 3 epochs: about a minute on an idle machine
def test_killed_and_resumed_run_is_bit_identical(tiny_model_dir, tmp_path):
    """SIGKILL after the first checkpoint, then `--resume`: the EMA adapter comes back from the checkpoint, so the
    LoRA and every logged metric equal a straight run's (off-policy: the EMA adapter samples and sets the ratio)."""
    args = ["train", "awm", "--model", tiny_model_dir, "--checkpoint_every", "1", "--train_batch_size", "2",
            "--seed", "3", "--train_micro_batch_size", "4", "--train_off_policy", "true", "--train_clip_range",
            "0.01"] + TINY_ARGS + ["--num_epochs", "3"]
    assert_killed_run_resumes_bit_identically(args, tmp_path)
