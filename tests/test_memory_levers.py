"""Memory levers as settings: text encoders offloaded to the CPU between encodes, VAE slicing and tiling, diffusers'
attention backends. None of them changes what a run trains."""

import copy

import pytest
import torch

from diffalign.config import DDPOConfig
from diffalign.errors import ConfigError


def brightness(images, prompts, metadata=None):
    return images.mean(dim=(1, 2, 3)).float().cpu()


def config(tmp_path, name, **overrides):
    settings = dict(
        model="unused", output_dir=str(tmp_path / name), prompts=["a cat", "a dog"], num_epochs=1, seed=2,
        sample_num_steps=3, sample_guidance_scale=3.0, sample_num_prompts_per_epoch=2, sample_images_per_prompt=2,
        sample_batch_size=4, grid_num_images=1, train_batch_size=2, advantage_mode="batch", train_clip_range=0.2,
    )
    settings.update(overrides)
    return DDPOConfig(**settings)


@pytest.fixture(scope="module")
def tiny_sd3():
    from diffalign.testing import tiny_sd3_pipeline

    return tiny_sd3_pipeline()


def test_offloaded_text_encoders_give_the_resident_conditioning(tmp_path, tiny_sd3):
    from diffalign.trainers import DDPOTrainer

    resident = DDPOTrainer(config(tmp_path, "resident"), pipeline=copy.deepcopy(tiny_sd3), reward_fn=brightness)
    offloaded = DDPOTrainer(config(tmp_path, "offloaded", offload_text_encoders=True), pipeline=copy.deepcopy(tiny_sd3),
                            reward_fn=brightness)
    family = offloaded.family
    assert family.offload_text_encoders and not resident.family.offload_text_encoders
    moves = []
    encoders = [getattr(family.pipe, n) for n in family.text_encoder_names]
    for encoder in encoders:
        original = encoder.to

        def spy(*args, _original=original, **kwargs):
            moves.append(torch.device(args[0]) if args and not isinstance(args[0], torch.dtype) else None)
            return _original(*args, **kwargs)

        encoder.to = spy
    prompts = ["a cat", "a dog", "a cat"]
    expected = resident.family.encode_prompts(prompts)
    got = family.encode_prompts(prompts)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    # each encoder came to the VAE's device for the encode, then went back to the CPU
    assert moves == [family.device] * len(encoders) + [torch.device("cpu")] * len(encoders)
    assert all(next(e.parameters()).device.type == "cpu" for e in encoders)
    moves.clear()
    family.encode_prompts(["a dog"])  # cached: encoded once per prompt, nothing moves
    assert moves == []
    # a whole epoch trains identically with the encoders offloaded
    resident_metrics, offloaded_metrics = resident.step(0), offloaded.step(0)
    assert resident_metrics["loss"] == offloaded_metrics["loss"]
    for a, b in zip(resident.trainable_params, offloaded.trainable_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow  # a training run per setting: ~15 s
def test_vae_slicing_tiling_and_attention_backend_are_set(tmp_path):
    from diffalign.testing import tiny_flux_pipeline
    from diffalign.trainers import DDPOTrainer

    trainer = DDPOTrainer(config(tmp_path, "levers", vae_slicing=True, vae_tiling=True, attention_backend="native",
                                 sample_guidance_scale=1.0), pipeline=tiny_flux_pipeline(), reward_fn=brightness)
    assert trainer.pipe.vae.use_slicing and trainer.pipe.vae.use_tiling
    processors = [m.processor for m in trainer.pipe.transformer.modules() if hasattr(m, "processor")]
    assert processors and all(getattr(p, "_attention_backend", None) == "native" for p in processors)
    assert torch.isfinite(torch.tensor(trainer.step(0)["loss"]))


def test_memory_levers_do_not_change_the_run_hash():
    plain = config_hash()
    assert config_hash(offload_text_encoders=True, vae_slicing=True, vae_tiling=True,
                       attention_backend="native") == plain


def config_hash(**overrides):
    return DDPOConfig(model="m", **overrides).hash(resolve_model=False)


def test_unknown_attention_backend_is_one_line(tmp_path, tiny_sd3, monkeypatch):
    from diffalign.trainers import DDPOTrainer

    with pytest.raises(ConfigError, match="attention_backend 'fast' is not a diffusers backend; known: flash"):
        DDPOTrainer(config(tmp_path, "bad", attention_backend="fast"), pipeline=copy.deepcopy(tiny_sd3),
                    reward_fn=brightness)
    with pytest.raises(ConfigError, match="attention processors take no backend"):  # SD3's processors
        DDPOTrainer(config(tmp_path, "sd3", attention_backend="native"), pipeline=copy.deepcopy(tiny_sd3),
                    reward_fn=brightness)
    from diffalign import quantization

    # as on a CUDA machine with bitsandbytes: the package and the device are there
    monkeypatch.setattr(quantization, "check_quantization_method", lambda *args, **kwargs: None)
    with pytest.raises(ConfigError, match="bitsandbytes weights"):
        config(tmp_path, "bnb", offload_text_encoders=True, quantize_text_encoders="nf4").validate()
