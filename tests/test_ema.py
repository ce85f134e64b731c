"""EMA of the trained weights (`ema_decay`, `ema_update_every`) and the held-out evaluation (`eval_every`)."""

import copy
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from diffalign.checkpoint import list_checkpoints, load_checkpoint
from diffalign.config import ConfigError, DDPOConfig
from diffalign.ema import ParameterEMA
from diffalign.trainers import DDPOTrainer


def brightness(images, prompts, metadata=None):
    return images.mean(dim=(1, 2, 3)).float().cpu()


def test_ema_math_decay_warmup_and_update_interval():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.full((2, 2), 4.0))]
    ema = ParameterEMA(params, decay=0.9, update_every=3)
    expected = [p.detach().clone() for p in params]
    for n in range(1, 91):
        with torch.no_grad():
            params[0].add_(1.0)
            params[1].mul_(0.99)
        updated = ema.step()
        assert updated == (n % 3 == 0)
        if updated:
            d = min(0.9, (1 + n) / (10 + n))  # Flow-GRPO's and diffusers' warm-up
            expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, params)]
        for average, value in zip(ema.shadow, expected):
            torch.testing.assert_close(average, value, rtol=1e-6, atol=1e-5)
    assert ema.optimization_step == 90 and ema.current_decay() == 0.9
    assert not torch.equal(ema.shadow[0], params[0].detach())  # the average lags the live weights


def test_swap_puts_the_average_in_and_the_live_weights_back():
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 3))]
    ema = ParameterEMA(params, decay=0.5, update_every=1)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    ema.step()
    live = [p.detach().clone() for p in params]
    with ema.swapped_in():
        for p, average in zip(params, ema.shadow):
            assert torch.equal(p.detach(), average)
            assert not torch.equal(p.detach(), live[0] if p is params[0] else live[1])
    for p, value in zip(params, live):
        assert torch.equal(p.detach(), value)
    with pytest.raises(RuntimeError, match="boom"), ema.swapped_in():
        raise RuntimeError("boom")
    for p, value in zip(params, live):  # restored on an error too
        assert torch.equal(p.detach(), value)


def test_state_dict_round_trip_is_exact():
    params = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3, 2))]
    ema = ParameterEMA(params, decay=0.9, update_every=2)
    for _ in range(5):
        with torch.no_grad():
            params[0].add_(torch.randn(4))
        ema.step()
    state = ema.state_dict(["a", "b"])
    other = ParameterEMA([torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3, 2))], 0.9, 2)
    other.load_state_dict(state, ["a", "b"])
    assert other.optimization_step == 5
    assert all(torch.equal(x, y) for x, y in zip(other.shadow, ema.shadow))
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict(state, ["a", "c"])


@pytest.mark.parametrize("overrides, match", [
    ({"ema_decay": 1.0}, "ema_decay"), ({"ema_decay": -0.1}, "ema_decay"),
    ({"ema_decay": 0.9, "ema_update_every": 0}, "ema_update_every"),
    ({"eval_every": 2}, "held-out prompts"), ({"eval_every": -1}, "eval_every"),
    ({"eval_prompts": ["a"], "eval_num_images": 0}, "eval_num_images"),
    ({"eval_prompts": ["a"], "eval_prompt_file": "x.txt"}, "only one held-out"),
    ({"eval_num_steps": 0}, "eval_num_steps must be >= 1"),
])
def test_bad_ema_and_heldout_settings_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        DDPOConfig(**overrides).validate()


def test_defaults_keep_the_config_hash():
    # runs made before EMA and held-out evaluation existed still resume: the new fields at their defaults are not hashed
    config = DDPOConfig()
    assert dataclasses.replace(config, eval_every=3, eval_prompts=["x"]).hash() == config.hash()
    assert dataclasses.replace(config, ema_update_every=4).hash() == config.hash()
    assert dataclasses.replace(config, eval_num_steps=40).hash() == config.hash()  # the evaluations' steps
    assert dataclasses.replace(config, ema_decay=0.9).hash() != config.hash()


def ema_config(tmp_path, name, **overrides):
    settings = dict(
        model="unused", output_dir=str(tmp_path / name), prompts=["a cat", "a dog"], num_epochs=3, seed=5,
        sample_num_steps=3, sample_guidance_scale=3.0, sample_num_prompts_per_epoch=2, sample_images_per_prompt=2,
        sample_batch_size=4, grid_num_images=2, train_learning_rate=1e-2, train_batch_size=2, checkpoint_every=1,
        advantage_mode="batch", ema_decay=0.9, ema_update_every=1, eval_every=1,
        eval_prompts=["a red bird", "a cow"], eval_num_images=3, eval_reward="jpeg_compressibility",
    )
    settings.update(overrides)
    return DDPOConfig(**settings)


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def heldout(record):
    return {k: v for k, v in record.items() if k.startswith("heldout_")}


def test_ema_and_heldout_metrics_survive_a_resume_and_the_ema_is_saved(tmp_path, tiny_pipe):
    straight_config = ema_config(tmp_path, "straight")
    straight = DDPOTrainer(straight_config, pipeline=copy.deepcopy(tiny_pipe), reward_fn=brightness)
    straight.train(progress=False)

    # the same run stopped after epoch 1 (its checkpoint) and resumed for epoch 2
    stopped_config = ema_config(tmp_path, "stopped", num_epochs=2)
    DDPOTrainer(stopped_config, pipeline=copy.deepcopy(tiny_pipe), reward_fn=brightness).train(progress=False)
    resumed = DDPOTrainer(dataclasses.replace(stopped_config, num_epochs=3, resume_from=stopped_config.output_dir),
                          pipeline=copy.deepcopy(tiny_pipe), reward_fn=brightness)
    assert resumed.first_epoch == 2 and resumed.ema.optimization_step == straight.config.num_epochs * 2 - 2
    resumed.train(progress=False)

    assert resumed.ema.optimization_step == straight.ema.optimization_step == 6  # 2 optimizer steps per epoch
    for a, b in zip(straight.ema.shadow, resumed.ema.shadow):
        assert torch.equal(a, b)  # bit-identical on CPU
    for a, b in zip(straight.trainable_params, resumed.trainable_params):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b.float()) for a, b in zip(straight.ema.shadow, straight.trainable_params))

    # the checkpoint holds the EMA of every trainable weight, as the trainer has it
    saved = load_checkpoint(list_checkpoints(straight_config.output_dir)[-1], ["ema"])["ema"]
    assert saved["optimization_step"] == 6
    for name, average in zip(straight.trainable_names(), straight.ema.shadow):
        assert torch.equal(saved["weights"][name], average)

    # held-out metrics every epoch, equal after the resume, and the same again for the same weights
    straight_records, resumed_records = records(straight_config.output_dir), records(stopped_config.output_dir)
    assert [r["epoch"] for r in resumed_records] == [0, 1, 2]
    for a, b in zip(straight_records, resumed_records):
        assert {"heldout_reward_mean", "heldout_reward_std", "heldout_eval_mean"} <= heldout(a).keys()
        assert {k: v for k, v in heldout(a).items() if k != "time_heldout"} == \
            {k: v for k, v in heldout(b).items() if k != "time_heldout"}
    again = straight.heldout_evaluation()
    assert again["heldout_reward_mean"] == straight_records[-1]["heldout_reward_mean"]

    # the saved LoRA is the EMA, not the live weights: load it into a plain pipeline and compare by name
    pipe = copy.deepcopy(tiny_pipe)
    pipe.load_lora_weights(os.path.join(straight_config.output_dir, "final"), adapter_name="default")
    loaded = {n: p for n, p in pipe.unet.named_parameters() if "lora" in n}
    averages = dict(zip(straight.trainable_names(), straight.ema.shadow))
    assert loaded.keys() == averages.keys()
    for name, value in loaded.items():
        assert torch.equal(value.float(), averages[name]), name


def test_heldout_evaluation_leaves_the_training_untouched(tmp_path, tiny_pipe):
    with_eval = ema_config(tmp_path, "eval", num_epochs=2, ema_decay=0.0)
    without = dataclasses.replace(with_eval, output_dir=str(tmp_path / "plain"), eval_every=0)
    a = DDPOTrainer(with_eval, pipeline=copy.deepcopy(tiny_pipe), reward_fn=brightness)
    b = DDPOTrainer(without, pipeline=copy.deepcopy(tiny_pipe), reward_fn=brightness)
    a.train(progress=False)
    b.train(progress=False)
    assert a.ema is None
    for x, y in zip(a.trainable_params, b.trainable_params):
        assert torch.equal(x, y)
    assert "heldout_reward_mean" in records(with_eval.output_dir)[0]
    assert "heldout_reward_mean" not in records(without.output_dir)[0]
    # without EMA the final LoRA is the live weights
    final = load_file(os.path.join(with_eval.output_dir, "final", "pytorch_lora_weights.safetensors"))
    assert sorted(v.sum().item() for v in final.values()) == pytest.approx(
        sorted(p.detach().sum().item() for p in a.trainable_params))


def test_evaluations_sample_with_eval_num_steps_and_the_training_with_sample_num_steps(tmp_path, tiny_pipe):
    """`eval_num_steps`: the grids, held-out and final evaluations take that many steps, the rollouts
    `sample_num_steps`; the training is the same as without it, and the model card's call says the evaluated count."""
    config = ema_config(tmp_path, "steps", num_epochs=1, ema_decay=0.0, sample_num_steps=2, eval_num_steps=4,
                        final_eval_num_images=2, model=str(tmp_path / "tiny-sd"))  # a local name (the pipeline is given)
    trainer = DDPOTrainer(config, pipeline=copy.deepcopy(tiny_pipe), reward_fn=brightness)
    plain = DDPOTrainer(dataclasses.replace(config, output_dir=str(tmp_path / "plain"), eval_num_steps=None),
                        pipeline=copy.deepcopy(tiny_pipe), reward_fn=brightness)
    assert trainer.grid_trajectories().timesteps.shape[0] == 4
    assert plain.grid_trajectories().timesteps.shape[0] == 2
    trainer.train(progress=False)
    plain.train(progress=False)
    for x, y in zip(trainer.trainable_params, plain.trainable_params):
        assert torch.equal(x, y)
    assert records(config.output_dir)[0]["heldout_reward_mean"] != records(plain.config.output_dir)[0][
        "heldout_reward_mean"]
    with open(os.path.join(config.output_dir, "final", "README.md")) as f:
        card = f.read()
    assert "num_inference_steps=4" in card and "| `eval_num_steps` | 4 |" in card


def test_ema_is_refused_on_a_sharded_denoiser(tmp_path, tiny_pipe, monkeypatch):
    monkeypatch.setattr("diffalign.trainers.base.is_sharded", lambda accelerator, model: True)
    with pytest.raises(ConfigError, match="not with FSDP or DeepSpeed ZeRO-3"):
        DDPOTrainer(ema_config(tmp_path, "sharded"), pipeline=tiny_pipe, reward_fn=brightness)


@pytest.mark.slow  # an accelerate launch of 2 processes: ~40 s on 2 cores
def test_two_ddp_processes_share_the_heldout_images_and_keep_one_ema(tiny_model_dir, tmp_path):
    """2 CPU processes (DDP, gloo) against 1: the held-out images (3, so one process pads) are split and gathered into
    the same numbers, and the EMA in the checkpoint is the 1-process run's (float reduction order aside)."""
    import distributed_run
    from test_distributed import LAUNCH, TINY, run_launched

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"prompt": p, "tag": t}) + "\n" for p, t in [("a red bird", "b"), ("a cow", "c")]))
    args = ["ddpo", "--model", tiny_model_dir, "--num_epochs", "2", "--train_batch_size", "4", "--advantage_mode",
            "group", "--train_learning_rate", "1e-3", "--ema_decay", "0.9", "--ema_update_every", "1",
            "--eval_every", "1", "--eval_prompt_file", str(heldout), "--eval_num_images", "3"] + TINY
    run_launched(LAUNCH, args + ["--output_dir", str(tmp_path / "two")])
    distributed_run.main(args + ["--output_dir", str(tmp_path / "one")])
    two, one = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("two", "one"))
    assert two["num_processes"] == 2 and all(c["identical"] for c in two["rank_checks"])
    for a, b in zip(one["metrics"], two["metrics"]):
        assert b["heldout_reward_mean"] == pytest.approx(a["heldout_reward_mean"], abs=1e-4)
        assert b["heldout_reward_std"] == pytest.approx(a["heldout_reward_std"], abs=1e-4)
    emas = [load_checkpoint(list_checkpoints(str(tmp_path / name))[-1], ["ema"])["ema"] for name in ("one", "two")]
    assert emas[0]["optimization_step"] == emas[1]["optimization_step"] == 4
    for name, value in emas[0]["weights"].items():
        torch.testing.assert_close(emas[1]["weights"][name], value, rtol=0.02, atol=2e-4)
