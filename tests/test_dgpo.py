"""DGPO (`diffalign train dgpo`): `dgpo_loss` against an independent port of the authors' loss
(tests/dgpo_reference.py; their repository has no licence, so no verbatim copy), the trainer's micro-batch loss against
`dgpo_loss` on predictions made here, the group weights of an optimizer step whatever its micro-batching, CLI runs on
tiny SD (epsilon UNet) and SD3 (flow) directories, a killed run resumed bit-identically, 2 processes against 1, and
one-line errors for bad settings."""

import json
import os
import subprocess
import sys

import dgpo_reference
import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import assert_killed_run_resumes_bit_identically
from diffalign.cli import main
from diffalign.config import ConfigError, DGPOConfig, load_config
from diffalign.forward_process import add_noise, vp_schedule
from diffalign.losses import dgpo_group_weights, dgpo_loss
from diffalign.rollout import select_rows
from diffalign.trainers import DGPOTrainer
from diffalign.trainers.base import BaseTrainer
from diffalign.trainers.update_plan import Rows, local_plan
from diffalign.utils.peft_utils import adapter_active, adapters_disabled, unwrap
from diffalign.utils.torch_utils import seed_for

TINY_ARGS = [
    "--prompts", "[a cat, a dog]", "--num_epochs", "2", "--sample_num_steps", "3", "--sample_num_prompts_per_epoch",
    "2", "--sample_images_per_prompt", "2", "--grid_num_images", "2", "--reward", "jpeg_compressibility",
    "--train_learning_rate", "1e-2", "--final_eval_num_images", "0", "--train_trunc_steps", "2",
    "--train_num_timesteps", "2",
]


# ------------------------------------------------------------------------------------------------ the loss
def rows_of_groups(num_groups=3, group_size=4, steps=2, shape=(2, 3, 3), seed=0, clip_scale=0.02):
    """Rows (sample, noise level) of several prompt groups: the policy, old, reference and target outputs."""
    g = torch.Generator().manual_seed(seed)
    n = num_groups * group_size * steps
    target = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    model = target + 0.8 * torch.randn(n, *shape, generator=g, dtype=torch.float64)
    old = model + clip_scale * torch.randn(n, *shape, generator=g, dtype=torch.float64)  # ratios around 1
    ref = target + 0.8 * torch.randn(n, *shape, generator=g, dtype=torch.float64)
    base = target + 0.8 * torch.randn(n, *shape, generator=g, dtype=torch.float64)
    advantages = 2.5 * torch.randn(num_groups * group_size, generator=g, dtype=torch.float64)  # some beyond A_max
    sample = torch.arange(num_groups * group_size).repeat_interleave(steps)
    step = torch.arange(steps).repeat(num_groups * group_size)
    group = (sample // group_size) * steps + step  # a prompt at one noise level
    return model, old, ref, base, target, advantages[sample], group


@pytest.mark.parametrize("clip_dsm,clip_kl,kl_beta,use_ema_ref", [
    (True, False, 0.02, False),   # the authors' default (config/dgpo.py)
    (True, True, 0.02, False),
    (False, False, 0.0, False),
    (True, False, 0.001, True),   # CFG-free with the EMA reference (config/dgpo_wocfg_emaref.py)
])
def test_loss_and_gradient_equal_the_port_with_groups_split_across_processes(clip_dsm, clip_kl, kl_beta, use_ema_ref):
    model, old, ref, base, target, advantages, group = rows_of_groups()
    if use_ema_ref:
        ref = old
    beta_dpo, group_size, clip_range = 3.0, 4, 2e-3

    mine = model.clone().requires_grad_(True)
    out = dgpo_loss(mine, target, ref, advantages, group, beta_dpo, group_size, 5.0, old_output=old,
                    clip_range=clip_range, clip_dsm=clip_dsm, clip_kl=clip_kl, kl_ref_output=base if kl_beta else None,
                    kl_weight=kl_beta)
    out["loss"].backward()

    # the port on 2 processes of equal size; the rows are shuffled so that every group spans both processes
    order = torch.randperm(model.shape[0], generator=torch.Generator().manual_seed(1))
    halves = order.chunk(2)
    theirs = model.clone().requires_grad_(True)
    losses = dgpo_reference.dgpo_step_losses(
        [theirs[h] for h in halves], [ref[h] for h in halves], [old[h] for h in halves], [target[h] for h in halves],
        [advantages[h] for h in halves], [group[h] for h in halves], int(group.max()) + 1, beta_dpo, group_size, 5.0,
        clip_range, clip_dsm, clip_kl, kl_beta, [base[h] for h in halves])
    assert all(set(group[h].tolist()) == set(group.tolist()) for h in halves)
    reference = torch.stack(losses).mean()  # DDP's average of the processes' gradients
    reference.backward()

    torch.testing.assert_close(out["loss"], reference, rtol=1e-12, atol=0)
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-10, atol=1e-18)
    assert mine.grad.abs().sum() > 0
    if clip_dsm:
        assert 0 < out["clipfrac"] < 1  # the trust region binds for some rows and not others
    assert 0.0 < out["group_weight"] < 1.0 and out["group_weight"] != 0.5


def test_group_weights_are_the_sigmoid_of_each_groups_advantage_weighted_loss_gap():
    dsm = torch.tensor([1.0, 2.0, 0.5, 0.5])
    ref = torch.tensor([1.5, 1.0, 0.5, 1.0])
    advantages = torch.tensor([1.0, -1.0, 2.0, -2.0])
    groups = torch.tensor([7, 7, 3, 3])
    weights = dgpo_group_weights(dsm, ref, advantages, groups, beta_dpo=2.0, group_size=2)
    first = torch.sigmoid(torch.tensor((1.0 * 2 * -0.5 + -1.0 * 2 * 1.0) / 2))  # the winner improved, the loser not
    second = torch.sigmoid(torch.tensor((0.0 + -2.0 * 2 * -0.5) / 2))
    torch.testing.assert_close(weights, torch.stack([first, first, second, second]))


def test_the_loss_only_moves_the_policy_and_clipped_rows_give_no_gradient():
    model, old, ref, _, target, advantages, group = rows_of_groups(clip_scale=0.3)
    mine = model.clone().requires_grad_(True)
    out = dgpo_loss(mine, target, ref, advantages, group, 100.0, 4, old_output=old, clip_range=1e-2)
    out["loss"].backward()
    dsm = ((target - model) ** 2).mean(dim=(1, 2, 3))
    old_dsm = ((target - old) ** 2).mean(dim=(1, 2, 3))
    ratio = torch.exp(old_dsm - dsm)
    clipped = torch.where(advantages > 0, ratio > 1.01, ratio < 0.99)
    assert clipped.any() and not clipped.all()
    assert (mine.grad[clipped] == 0).all()
    assert (mine.grad[~clipped & (advantages != 0)].abs().sum(dim=(1, 2, 3)) > 0).all()
    with pytest.raises(ValueError, match="no KL reference"):
        dgpo_loss(mine, target, ref, advantages, group, 1.0, 4, kl_weight=0.1)


# ------------------------------------------------------------------------------------------------ the trainer
def brightness(images, prompts, metadata=None):
    return images.mean(dim=(1, 2, 3)).float().cpu()


def tiny_config(tmp_path, **overrides):
    settings = dict(model="unused", output_dir=str(tmp_path / "run"), prompts=["a cat", "a dog"], num_epochs=1,
                    sample_num_steps=3, sample_num_prompts_per_epoch=2, sample_images_per_prompt=3,
                    sample_batch_size=6, grid_num_images=2, train_learning_rate=1e-2, train_micro_batch_size=4,
                    train_trunc_steps=2, train_num_timesteps=2, train_beta_dpo=50.0)
    settings.update(overrides)
    return DGPOConfig(**settings)


def perturbed_trainer(tmp_path, tiny_pipe, **overrides):
    trainer = DGPOTrainer(tiny_config(tmp_path, **overrides), pipeline=tiny_pipe, reward_fn=brightness)
    with torch.no_grad():  # the policy, the EMA reference and the base model differ
        for old, new in zip(trainer.old_params, trainer.policy_params):
            old.add_(0.3 * torch.randn_like(old))
            new.add_(0.3 * torch.randn_like(new))
    return trainer


def hand_made(trainer, batch, rows, ref_guidance):
    """The rows' tensors made here: shared noise per (prompt group, step), each adapter switched on in turn."""
    trajectories, family, model = batch.trajectories, trainer.family, trainer.denoiser
    x0 = trajectories.final_latents[rows.samples]
    t = trajectories.timesteps[rows.steps]
    noise = torch.stack([
        torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed_for(0, 0, 12, int(g), j)))
        for g, j in zip(trajectories.group_ids[rows.samples].tolist(), rows.steps.tolist())])
    alpha_t, sigma_t = vp_schedule(family.scheduler.alphas_cumprod, t, x0)
    x_t = add_noise(x0, noise, alpha_t, sigma_t)
    cond = select_rows(trajectories.conditioning, rows.samples)
    negative = select_rows(trajectories.negative_conditioning, rows.samples)
    output = family.predict(model, x_t, t, cond, None, 1.0)  # the policy: CFG-free, with gradients
    training = unwrap(model).training
    unwrap(model).eval()
    with torch.no_grad():
        with adapter_active(model, "old"):
            old = family.predict(model, x_t, t, cond, None, 1.0)
        with adapters_disabled(model):
            base = family.predict(model, x_t, t, cond, negative, ref_guidance)
    unwrap(model).train(training)
    groups = trajectories.group_ids[rows.samples] * trainer.config.sample_num_steps + rows.steps
    return output, old, base, noise, groups


def test_one_micro_batch_loss_is_dgpo_loss_of_the_same_tensors(tmp_path, tiny_pipe):
    """The trainer's loss of a micro-batch, against `dgpo_loss` on predictions made here (the policy and the EMA
    reference CFG-free, the base model at `train_ref_guidance_scale`), with the group weights of the whole optimizer
    step from the trainer's pre-pass."""
    trainer = perturbed_trainer(tmp_path, tiny_pipe, sample_guidance_scale=2.0, train_ref_guidance_scale=3.0,
                                train_kl_coef=0.5, train_clip_range=0.05)
    config = trainer.config
    prompts = trainer.local_prompts(0)
    trajectories = trainer.sample(0, prompts, False)
    rewards = trainer.score(trajectories)["reward"]
    batch = trainer.training_batch(trajectories, rewards, rewards, prompts, epoch=0)
    steps = torch.tensor([2, 0])  # every sample at the same two noise levels, as the trainer draws them
    plan = local_plan(torch.arange(6), steps.expand(6, -1), config.train_micro_batch_size)
    trainer.denoiser.train()
    trainer.group_weights_pre_pass(batch, plan)

    every = plan.rows("cpu")
    output, old, base, noise, groups = hand_made(trainer, batch, every, 3.0)
    target = noise  # epsilon prediction
    assert trainer.family.scheduler.config.prediction_type == "epsilon"
    advantages = (rewards - rewards.view(2, 3).mean(1).repeat_interleave(3)) / (rewards.std(unbiased=False) + 1e-4)
    whole = dgpo_loss(output, target, base, advantages[every.samples], groups, 50.0, 3, 5.0, old_output=old,
                      clip_range=0.05, kl_ref_output=base, kl_weight=0.5)
    # the step's weights from the pre-pass are those of all its rows
    torch.testing.assert_close(batch.step_weights[every.samples, every.steps],
                               dgpo_group_weights(((target - output) ** 2).mean(dim=(1, 2, 3)),
                                                  ((target - base) ** 2).mean(dim=(1, 2, 3)),
                                                  advantages[every.samples].clamp(-5, 5), groups, 50.0, 3),
                               rtol=1e-5, atol=0)

    part = Rows(every.samples[[5, 0, 7]], every.steps[[5, 0, 7]])  # a micro-batch that splits groups
    loss, stats = trainer.compute_loss(trainer.model_outputs(trainer.denoiser, batch, part), batch, part)
    index = torch.tensor([5, 0, 7])
    expected = dgpo_loss(output[index], target[index], base[index], advantages[part.samples], groups[index], 50.0, 3,
                         5.0, old_output=old[index], clip_range=0.05, kl_ref_output=base[index], kl_weight=0.5,
                         group_weights=batch.step_weights[part.samples, part.steps])
    torch.testing.assert_close(loss, expected["loss"], rtol=1e-5, atol=0)
    for key in ("policy_loss", "dsm", "ref_dsm", "kl", "clipfrac", "group_weight"):
        torch.testing.assert_close(stats[key], expected[key], rtol=1e-5, atol=1e-8)
    assert stats["kl"] > 0 and 0 < whole["group_weight"] < 1

    # one micro-batch of every row: its loss is `dgpo_loss` of those rows, weights and all
    loss, _ = trainer.compute_loss(trainer.model_outputs(trainer.denoiser, batch, every), batch, every)
    torch.testing.assert_close(loss, whole["loss"], rtol=1e-5, atol=0)
    loss.backward()  # the gradient reaches the trained adapter only
    assert all(p.grad is not None for p in trainer.policy_params)
    assert all(p.grad is None for p in trainer.old_params)


def test_cfg_free_rollouts_with_a_cfg_reference_encode_the_negative_prompt_for_it(tmp_path, tiny_pipe):
    """The authors' `dgpo_wocfg` mode: rollouts without CFG (no negative conditioning recorded), the base model as
    reference at CFG 4.5 with the empty negative prompt."""
    trainer = perturbed_trainer(tmp_path, tiny_pipe, sample_guidance_scale=1.0, train_ref_guidance_scale=4.5)
    prompts = trainer.local_prompts(0)
    trajectories = trainer.sample(0, prompts, False)
    assert trajectories.negative_conditioning is None
    rewards = trainer.score(trajectories)["reward"]
    batch = trainer.training_batch(trajectories, rewards, rewards, prompts, epoch=0)
    rows = Rows(torch.tensor([4, 1]), torch.tensor([2, 0]))
    output, frozen, noised = trainer.model_outputs(trainer.denoiser, batch, rows)
    family, model = trainer.family, trainer.denoiser
    _, negative = family.conditioning(["a dog", "a cat"], "", True, trainer.resolution, trainer.resolution)
    unwrap(model).eval()
    with torch.no_grad(), adapters_disabled(model):
        base = family.predict(model, noised.denoiser_input, noised.t, noised.conditioning, negative, 4.5)
    torch.testing.assert_close(frozen["__base__"], base, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), adapter_active(model, "old"):
        old = family.predict(model, noised.denoiser_input, noised.t, noised.conditioning, None, 1.0)
    torch.testing.assert_close(frozen["old"], old, rtol=1e-5, atol=1e-6)


def test_an_optimizer_steps_gradient_does_not_depend_on_the_micro_batch_size(tmp_path, tiny_pipe):
    """The step's 12 rows in one micro-batch (the group weights from its own forward: one policy forward per row)
    and in micro-batches of 5 and 1 rows (a pre-pass first: two) give the same gradient and statistics."""
    trainer = perturbed_trainer(tmp_path, tiny_pipe, train_kl_coef=0.1)
    prompts = trainer.local_prompts(0)
    trajectories = trainer.sample(0, prompts, False)
    rewards = trainer.score(trajectories)["reward"]
    batch = trainer.training_batch(trajectories, rewards, rewards, prompts, epoch=0)
    trainer.denoiser.train()
    policy_prediction, policy_rows = trainer.policy_prediction, []

    def counted(model, rows, *args, **kwargs):
        policy_rows.append(len(rows.t))
        return policy_prediction(model, rows, *args, **kwargs)

    trainer.policy_prediction = counted
    gradients, statistics, forwards = [], [], []
    for micro_batch_size in (12, 5, 1):
        trainer.config.train_micro_batch_size = micro_batch_size
        plan = local_plan(torch.arange(6), torch.tensor([1, 0]).expand(6, -1), micro_batch_size)
        policy_rows.clear()
        statistics.append(trainer.run_update(batch, plan, "micro_batch"))
        forwards.append(sum(policy_rows))
        gradients.append(torch.cat([p.grad.reshape(-1).clone() for p in trainer.policy_params]))
        trainer.optimizer.zero_grad(set_to_none=True)
    assert forwards == [12, 24, 24]
    assert gradients[0].abs().sum() > 0
    for other, stats in zip(gradients[1:], statistics[1:]):
        torch.testing.assert_close(other, gradients[0], rtol=1e-4, atol=1e-7)
        assert stats == pytest.approx(statistics[0], rel=1e-4, abs=1e-7)


def test_the_ema_reference_follows_every_optimizer_step_and_samples_after_switch_ema_ref(tmp_path, tiny_pipe):
    trainer = DGPOTrainer(tiny_config(tmp_path, train_batch_size=3, switch_ema_ref=2), pipeline=tiny_pipe,
                          reward_fn=brightness)
    assert all(torch.equal(a, b) for a, b in zip(trainer.old_params, trainer.policy_params))  # a copy to start
    metrics = trainer.step(0)  # two optimizer steps (one prompt group each): decays 0 then 0.001
    assert metrics["old_policy_decay"] == 0.001
    # after step i: ref <- eta_i ref + (1 - eta_i) theta; at i = 0 a copy, so after i = 1 it is 0.001 theta_0 + ...
    assert not all(torch.equal(a, b) for a, b in zip(trainer.old_params, trainer.policy_params))
    prompts = trainer.local_prompts(1)
    policy = BaseTrainer.sample(trainer, 1, prompts, False).final_latents
    with adapter_active(trainer.denoiser, "old"):
        ema = BaseTrainer.sample(trainer, 1, prompts, False).final_latents
    assert not torch.equal(policy, ema)
    assert torch.equal(trainer.sample(1, prompts, False).final_latents, policy)  # 2 steps done: not past 2 yet
    with adapter_active(trainer.denoiser, "old"):
        ema = BaseTrainer.sample(trainer, 2, prompts, False).final_latents
    assert torch.equal(trainer.sample(2, prompts, False).final_latents, ema)  # 4 steps done


def test_defaults_are_the_authors_and_bad_values_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(TypeError, match="DGPOTrainer takes a DGPOConfig, not a NFTConfig"):
        DGPOTrainer(load_config("nft", "digits-flow-nft"))
    config = DGPOConfig(sample_num_steps=10)  # config/dgpo.py general_ocr_sd3_4gpu
    assert (config.train_beta_dpo, config.train_kl_coef, config.train_clip_range, config.train_clip_dsm,
            config.train_clip_kl, config.train_ref_guidance_scale, config.train_use_ema_ref, config.switch_ema_ref,
            config.train_num_timesteps, config.train_trunc_steps, config.train_shared_noise, config.train_adv_clip_max,
            config.sample_guidance_scale, config.sample_deterministic) == (
        100.0, 0.02, 1e-2, True, False, 1.0, False, 200, 4, 6, True, 5.0, 4.5, True)
    assert config.num_train_steps == 4
    for bad, message in [({"train_beta_dpo": 0.0}, "train_beta_dpo must be > 0"),
                         ({"train_clip_range": -1.0}, "train_clip_range must be >= 0"),
                         ({"train_trunc_steps": 3}, r"train_trunc_steps must be in \[0, sample_num_steps - 1 = 2\]"),
                         ({"train_num_timesteps": 4}, "train_num_timesteps .4. must be at most train_trunc_steps"),
                         ({"train_ref_guidance_scale": 0.5}, "train_ref_guidance_scale must be >= 1"),
                         ({"ema_ref_max_decay": 1.0}, r"ema_ref_max_decay must be in \[0, 1\)"),
                         ({"old_policy_decay_type": 2}, "old_policy_decay_type does not apply to dgpo"),
                         ({"train_batch_size": 2}, "must be a multiple of sample_images_per_prompt")]:
        with pytest.raises(ConfigError, match=message):
            tiny_config(tmp_path, **bad).validate()
    # on the command line: exit code 2 and one line, before any model loads
    assert main(["train", "dgpo", "--config", "digits-flow-dgpo", "--train_beta_dpo", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "train_beta_dpo must be > 0; got -1.0" in err


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.mark.parametrize("family", ["sd", pytest.param("sd3", marks=pytest.mark.slow)])  # sd3: flow, in the unit tests
def test_two_epoch_cli_run_writes_a_lora_that_loads_and_changes_images(family, tmp_path):
    import diffusers

    from diffalign.families import family_named
    from diffalign.testing import save_tiny_pipeline

    model = save_tiny_pipeline(family, str(tmp_path / "model"))
    out = str(tmp_path / "run")
    assert main(["train", "dgpo", "--model", model, "--output_dir", out, "--train_micro_batch_size", "3",
                 "--sample_guidance_scale", "1.0", "--train_use_ema_ref", "true", "--train_kl_coef", "0.01"]
                + TINY_ARGS) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [0, 1]
    for key in ("loss", "policy_loss", "dsm", "ref_dsm", "kl", "clipfrac", "group_weight", "grad_norm",
                "old_policy_decay", "time_train"):
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



@pytest.mark.slow
def test_killed_and_resumed_run_is_bit_identical(tiny_model_dir, tmp_path):
    """SIGKILL after the first checkpoint, then `--resume`: the EMA reference comes back from the checkpoint (it
    samples from epoch 1 on, `switch_ema_ref 0`), so the LoRA and every logged metric equal a straight run's."""
    args = ["train", "dgpo", "--model", tiny_model_dir, "--checkpoint_every", "1", "--train_batch_size", "2",
            "--seed", "3", "--train_micro_batch_size", "3", "--switch_ema_ref", "0"] + TINY_ARGS + ["--num_epochs", "3"]
    assert_killed_run_resumes_bit_identically(args, tmp_path)


@pytest.mark.slow
def test_two_processes_follow_the_one_process_run(tiny_model_dir, tmp_path):
    """2 DDP processes (gloo) against 1: optimizer steps of one or two prompt groups put the rows of a step on one
    process, so the other runs padding forwards in the pre-pass and the backward pass."""
    import distributed_run

    here = os.path.dirname(os.path.abspath(__file__))
    paths = [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(paths))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]

    def args(out, batch):
        return ["dgpo", "--model", tiny_model_dir, "--output_dir", str(out), "--num_epochs", "2", "--prompts",
                "[a cat, a dog, a bird, a fish]", "--sample_num_steps", "2", "--sample_num_prompts_per_epoch", "4",
                "--sample_images_per_prompt", "2", "--sample_batch_size", "4", "--grid_num_images", "1", "--reward",
                "distributed_run:brightness", "--seed", "3", "--train_trunc_steps", "1", "--train_num_timesteps", "2",
                "--train_batch_size", str(batch), "--train_micro_batch_size", "3", "--switch_ema_ref", "0",
                "--train_kl_coef", "0.01", "--train_learning_rate", "1e-3", "--sample_guidance_scale", "1.0",
                "--final_eval_num_images", "0"]

    result = subprocess.run(launch + [os.path.join(here, "distributed_run.py")] + args(tmp_path / "two-2", 2) + ["::"]
                            + args(tmp_path / "two-4", 4), env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    for batch in (2, 4):
        distributed_run.main(args(tmp_path / f"one-{batch}", batch))
        with open(tmp_path / f"two-{batch}" / "report.json") as f:
            two = json.load(f)
        with open(tmp_path / f"one-{batch}" / "report.json") as f:
            one = json.load(f)
        assert two["num_processes"] == 2 and [c["identical"] for c in two["rank_checks"]] == [True, True]
        for a, b in zip(one["metrics"], two["metrics"]):
            assert abs(a["reward_mean"] - b["reward_mean"]) <= 1e-4, (a, b)
            for key in ("loss", "dsm", "group_weight"):
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), (key, a, b)
        lora_one = load_file(str(tmp_path / f"one-{batch}" / "final" / "pytorch_lora_weights.safetensors"))
        lora_two = load_file(str(tmp_path / f"two-{batch}" / "final" / "pytorch_lora_weights.safetensors"))
        ups = [k for k in lora_one if "lora_B" in k or "lora.up" in k]
        difference = sum(((lora_one[k].double() - lora_two[k].double()) ** 2).sum() for k in ups).sqrt()
        assert difference / sum((lora_one[k].double() ** 2).sum() for k in ups).sqrt() <= 0.02
