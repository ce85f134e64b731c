"""The memory levers' `auto` defaults (`diffalign.memory`): the resolution rule over a table of devices and models,
its wiring into the trainer, `auto` on a CPU being today's run bit for bit, bad values, and `compile_denoiser` (with
the deprecated `compile_unet`)."""

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file

from diffalign import memory
from diffalign.cli import main
from diffalign.config import DDPOConfig, load_config
from diffalign.errors import ConfigError
from diffalign.memory import GIB, LEVER_ORDER, MemoryFacts, estimate_peak, resolve_memory_levers

# Sizes of scripts/gpu_check.py's meta plan (`--dry-run`: the published configurations), the check's LoRA run
# (rank 32, sample batch 2, micro-batch 2, CFG pairs for SD3.5-M, FLUX.1-dev's embedded guidance without), bf16.
SD35M = dict(denoiser_params=2_243_171_520, text_encoder_params=123_650_304 + 694_659_840 + 4_762_310_656,
             vae_params=83_819_683, trained_params=18_776_064, tokens=32 * 32 + 128, hidden_size=1536, num_blocks=24,
             resolution=512, sample_batch_size=2, sample_rows=4, train_rows=4)
FLUX1DEV = dict(denoiser_params=11_901_408_320, text_encoder_params=123_060_480 + 4_762_310_656,
                vae_params=83_819_683, trained_params=89_653_248, tokens=64 * 64 + 512, hidden_size=3072,
                num_blocks=57, resolution=1024, sample_batch_size=2, sample_rows=2, train_rows=2)
BF16 = dict(denoiser_bytes=2, text_encoder_bytes=2, vae_bytes=2, activation_bytes=2)
NF4 = dict(BF16, denoiser_bytes=memory.QUANTIZED_BYTES["nf4"])


def facts(model, card_gib, dtype=BF16, device="cuda", **extra):
    return MemoryFacts(device_type=device, total_memory=None if card_gib is None else int(card_gib * GIB),
                       **{**model, **dtype, **extra})


def on(resolved):
    return {name for name in LEVER_ORDER if resolved[name]}


# (case, requested, facts, the levers on, whether the estimate fits)
CASES = [
    ("cpu: FLUX-sized, everything off", {}, facts(FLUX1DEV, None, device="cpu"), set(), None),
    ("cpu: explicit true kept", {"vae_slicing": True, "gradient_checkpointing": True},
     facts(FLUX1DEV, None, device="cpu"), {"vae_slicing", "gradient_checkpointing"}, None),
    ("SD3.5-M on 16 GiB: T5 off the GPU", {}, facts(SD35M, 16), {"offload_text_encoders"}, True),
    ("SD3.5-M on 24 GiB", {}, facts(SD35M, 24), {"offload_text_encoders"}, True),
    ("SD3.5-M on 80 GiB: nothing needed", {}, facts(SD35M, 80), set(), True),
    ("SD3.5-M on 16 GiB, offload refused: every other lever", {"offload_text_encoders": False}, facts(SD35M, 16),
     {"vae_slicing", "gradient_checkpointing", "vae_tiling"}, False),
    ("FLUX.1-dev bf16 on 24 GiB: does not fit", {}, facts(FLUX1DEV, 24), set(LEVER_ORDER), False),
    ("FLUX.1-dev NF4 on 24 GiB", {}, facts(FLUX1DEV, 24, NF4), {"offload_text_encoders", "gradient_checkpointing"},
     True),
    ("FLUX.1-dev NF4 on 24 GiB, bnb text encoders stay", {}, facts(FLUX1DEV, 24, NF4, text_encoders_movable=False),
     {"vae_slicing", "gradient_checkpointing"}, True),
    ("FLUX.1-dev bf16 on 80 GiB: checkpointing", {}, facts(FLUX1DEV, 80), {"gradient_checkpointing"}, True),
    ("FLUX.1-dev bf16 on 80 GiB, checkpointing refused", {"gradient_checkpointing": False}, facts(FLUX1DEV, 80),
     {"offload_text_encoders", "vae_slicing", "vae_tiling"}, False),
    ("FLUX.1-dev on 80 GiB, no checkpointing in the model", {}, facts(FLUX1DEV, 80,
                                                                     supports_gradient_checkpointing=False),
     {"offload_text_encoders", "vae_slicing", "vae_tiling"}, False),
    ("explicit true on a big card", {"vae_tiling": True}, facts(SD35M, 80), {"vae_tiling"}, True),
]


@pytest.mark.parametrize("case, requested, run_facts, expected, fits", CASES, ids=[c[0] for c in CASES])
def test_resolution_rule(case, requested, run_facts, expected, fits):
    resolved = resolve_memory_levers({name: requested.get(name, "auto") for name in LEVER_ORDER}, run_facts)
    assert on(resolved) == expected
    assert resolved["auto"] == [name for name in LEVER_ORDER if name not in requested]
    assert resolved.get("fits") is fits
    if fits is not None:  # the recorded estimate is the one of the resolved levers
        assert resolved["estimated_peak_gib"] == round(estimate_peak(run_facts, resolved)["total"] / GIB, 2)


def test_every_lever_lowers_the_estimate_and_a_full_finetune_costs_more():
    base = facts(FLUX1DEV, 80)
    off = estimate_peak(base, {})
    part = {"offload_text_encoders": "text_encoders", "vae_slicing": "sampling", "vae_tiling": "sampling",
            "gradient_checkpointing": "training_activations"}
    for name in LEVER_ORDER:
        lowered = estimate_peak(base, {name: True})
        assert lowered[part[name]] < off[part[name]], name
        assert all(lowered[k] == off[k] for k in off if k not in (part[name], "total")), name
    assert estimate_peak(base, {"vae_slicing": True, "vae_tiling": True})["sampling"] < estimate_peak(
        base, {"vae_slicing": True})["sampling"]  # a 512-px tile of a 1024-px image
    full = facts(FLUX1DEV, 80, trained_params=FLUX1DEV["denoiser_params"], full_finetune=True)
    assert estimate_peak(full, {})["total"] > off["total"]


def test_bad_lever_values_are_one_line(tmp_path, capsys):
    for value in ("maybe", 1, "AUTO"):
        with pytest.raises(ConfigError, match=f"vae_tiling must be true, false or auto; got {value!r}"):
            DDPOConfig(model="m", vae_tiling=value).validate()
    code = main(["train", "ddpo", "--output_dir", str(tmp_path / "x"), "--gradient_checkpointing", "sometimes"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines() == [
        "diffalign: error: gradient_checkpointing must be true, false or auto; got 'sometimes'"]
    yaml_file = tmp_path / "levers.yaml"
    yaml_file.write_text("offload_text_encoders: auto\nvae_slicing: off\ngradient_checkpointing: on\n")
    config = load_config("ddpo", str(yaml_file))
    assert (config.offload_text_encoders, config.vae_slicing, config.gradient_checkpointing) == ("auto", False, True)


def test_levers_stay_out_of_the_hash_and_older_checkpoints_still_resume():
    plain = DDPOConfig(model="m")
    assert plain.hash(resolve_model=False) == "df01719ed2a333d6"  # main's hash of the defaults, before `auto`
    for name in LEVER_ORDER:
        assert DDPOConfig(model="m", **{name: True}).hash() == plain.hash()
    # main (b47812c) hashed gradient_checkpointing: a preset's run with it on wrote this hash, and resumes
    assert "069abf1149610d7f" in plain.accepted_hashes()
    assert DDPOConfig(model="m", compile_denoiser=True).hash() != plain.hash()


def test_compile_unet_is_read_as_compile_denoiser_with_one_warning(tmp_path, caplog):
    yaml_file = tmp_path / "old.yaml"
    yaml_file.write_text("compile_unet: true\n")
    with caplog.at_level(logging.WARNING, logger="diffalign"):
        config = load_config("ddpo", str(yaml_file))
    assert config.compile_denoiser is True and config.compile_unet is None
    assert [r.getMessage() for r in caplog.records] == [
        "compile_unet is deprecated: use compile_denoiser (same meaning)"]
    # main's hash of a run with compile_unet: true
    assert config.hash(resolve_model=False) == DDPOConfig(model="digits", compile_denoiser=True).hash(False)
    assert DDPOConfig(model="m", compile_unet=True).hash(resolve_model=False) == "e204e04f6bd902ae"
    with pytest.raises(ConfigError, match="compile_unet is false but compile_denoiser is true"):
        DDPOConfig(compile_unet=False, compile_denoiser=True)


def tiny_config(tmp_path, name, **overrides):
    settings = dict(model="unused", output_dir=str(tmp_path / name), prompts=["a cat", "a dog"], num_epochs=1,
                    seed=2, sample_num_steps=2, sample_guidance_scale=3.0, sample_num_prompts_per_epoch=2,
                    sample_images_per_prompt=2, sample_batch_size=4, grid_num_images=1, train_batch_size=2,
                    advantage_mode="batch", train_clip_range=0.2)
    return DDPOConfig(**{**settings, **overrides})


def brightness(images, prompts, metadata=None):
    return images.mean(dim=(1, 2, 3)).float().cpu()


def test_model_facts_and_the_trainer_apply_what_auto_resolves(tmp_path, monkeypatch):
    """The facts of a loaded tiny SD3 read as a CUDA card would be read (its memory reported small, so every lever
    turns on), then a trainer given that card: each resolved lever is set on its module."""
    from diffalign.testing import tiny_sd3_pipeline
    from diffalign.trainers import DDPOTrainer
    from diffalign.rollout import as_family

    pipe = tiny_sd3_pipeline()
    family = as_family(pipe)
    config = tiny_config(tmp_path, "facts")
    monkeypatch.setattr(memory, "accelerator_memory", lambda device: 2**20)  # a 1 MiB "GPU"
    run_facts = memory.model_facts(family, config, torch.device("cuda"), torch.float32, 64)
    assert run_facts.total_memory == 2**20 and run_facts.device_type == "cuda"
    assert run_facts.denoiser_params == sum(p.numel() for p in pipe.transformer.parameters())
    assert run_facts.text_encoder_params == sum(p.numel() for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
                                                for p in getattr(pipe, n).parameters())
    assert run_facts.hidden_size == 4 * 8 and run_facts.num_blocks == 2 and run_facts.denoiser_bytes == 4
    assert run_facts.sample_rows == 2 * config.sample_batch_size  # CFG pairs
    assert 0 < run_facts.trained_params < run_facts.denoiser_params
    resolved = resolve_memory_levers({}, run_facts)
    assert on(resolved) == set(LEVER_ORDER) and not resolved["fits"]

    real_facts = memory.model_facts
    monkeypatch.setattr(memory, "model_facts", lambda family, config, device, *args: real_facts(
        family, config, torch.device("cuda"), *args))
    trainer = DDPOTrainer(tiny_config(tmp_path, "small-card", gradient_checkpointing=False), pipeline=pipe,
                          reward_fn=brightness)
    levers = trainer.memory_levers
    assert on(levers) == {"offload_text_encoders", "vae_slicing", "vae_tiling"}
    assert trainer.pipe.vae.use_slicing and trainer.pipe.vae.use_tiling and trainer.family.offload_text_encoders
    assert next(trainer.pipe.text_encoder_3.parameters()).device.type == "cpu"
    assert not trainer.family.denoiser.is_gradient_checkpointing  # explicit false wins
    assert levers["auto"] == ["offload_text_encoders", "vae_slicing", "vae_tiling"]


def test_auto_on_a_cpu_is_off_and_trains_as_explicit_false(tiny_model_dir, tmp_path, caplog):
    """`auto` (the default) on a CPU: every lever off, logged once, recorded in config.json, and the same LoRA bit
    for bit as a run with every lever explicitly false (the default before `auto`)."""
    args = ["train", "ddpo", "--model", tiny_model_dir, "--num_epochs", "1", "--sample_num_steps", "2",
            "--sample_num_prompts_per_epoch", "2", "--sample_images_per_prompt", "2", "--train_batch_size", "2",
            "--grid_num_images", "1", "--prompts", "[a cat, a dog]", "--seed", "5"]
    with caplog.at_level(logging.INFO, logger="diffalign"):
        assert main(args + ["--output_dir", str(tmp_path / "auto")]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory levers:")]
    assert lines == ["memory levers: offload_text_encoders=off (auto), vae_slicing=off (auto), "
                     "gradient_checkpointing=off (auto), vae_tiling=off (auto); auto is off on a device of unknown "
                     "memory"]
    explicit = [f"--{name}=false" for name in LEVER_ORDER]
    assert main(args + ["--output_dir", str(tmp_path / "off")] + explicit) == 0
    with open(tmp_path / "auto" / "config.json") as f:
        saved = json.load(f)
    assert saved["gradient_checkpointing"] == "auto"
    assert saved["resolved_memory_levers"] == {**dict.fromkeys(LEVER_ORDER, False), "auto": list(LEVER_ORDER)}
    auto_lora, off_lora = (load_file(os.path.join(tmp_path, run, "final", "pytorch_lora_weights.safetensors"))
                           for run in ("auto", "off"))
    assert auto_lora.keys() == off_lora.keys() and auto_lora
    for key in auto_lora:
        assert torch.equal(auto_lora[key], off_lora[key]), key


@pytest.mark.slow  # inductor compiles the tiny UNet's forward and backward: ~1 minute on 2 cores
def test_compile_denoiser_trains_under_torch_compile(tmp_path):
    from diffalign.testing import tiny_sd3_pipeline
    from diffalign.trainers import DDPOTrainer

    trainer = DDPOTrainer(tiny_config(tmp_path, "compiled", compile_denoiser=True), pipeline=tiny_sd3_pipeline(),
                          reward_fn=brightness)
    assert isinstance(trainer.denoiser, torch._dynamo.eval_frame.OptimizedModule)
    metrics = trainer.step(0)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
