"""A quantized frozen base under a trained LoRA (`quantize_denoiser`, `quantize_text_encoders`), on a CPU through
torchao's int8 weight-only quantization (the one backend here that runs without CUDA): the run trains, resumes, and
its LoRA loads on the unquantized model; the settings' checks are one line."""

import dataclasses
import os

import pytest
import torch

from diffalign.config import DDPOConfig, NFTConfig
from diffalign.errors import ConfigError

torchao = pytest.importorskip("torchao", reason="torchao is the CPU backend of the quantized base (diffalign[quant])")


def brightness(images, prompts, metadata=None):
    return images.mean(dim=(1, 2, 3)).float().cpu()


def quantized_config(cls, tmp_path, model, **overrides):
    settings = dict(
        model=model, output_dir=str(tmp_path / "run"), prompts=["a cat", "a dog"], num_epochs=1, seed=1,
        sample_num_steps=3, sample_guidance_scale=3.0, sample_num_prompts_per_epoch=2, sample_images_per_prompt=2,
        sample_batch_size=4, grid_num_images=1, train_learning_rate=1e-2, checkpoint_every=1,
        final_eval_num_images=0, quantize_denoiser="int8", quantize_text_encoders="int8",
    )
    settings.update(overrides)
    return cls(**settings)


def quantized_linears(module) -> int:
    from torchao.quantization import Int8Tensor

    return sum(isinstance(m.weight, Int8Tensor) for m in module.modules() if isinstance(m, torch.nn.Linear))


def lora_weights(trainer):
    return [p.detach().clone() for p in trainer.trainable_params]


def test_quantized_base_lora_trains_resumes_and_loads_on_the_unquantized_base(tmp_path, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    from diffalign.trainers import DDPOTrainer

    config = quantized_config(DDPOConfig, tmp_path, tiny_model_dir, num_epochs=2, train_batch_size=2,
                              advantage_mode="batch", train_clip_range=0.2, sample_compute_kl=True)
    trainer = DDPOTrainer(config, reward_fn=brightness)
    unet = trainer.pipe.unet
    # the base's linear layers hold int8 weights (the LoRA's own layers stay float), the text encoder's too
    assert quantized_linears(unet.get_base_model() if hasattr(unet, "get_base_model") else unet) > 0
    assert quantized_linears(trainer.pipe.text_encoder) > 0
    assert trainer.trainable_params and all(p.dtype == torch.float32 for p in trainer.trainable_params)
    before = lora_weights(trainer)
    history = trainer.train(progress=False)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in history)
    assert history[-1]["kl_to_base"] > 0  # the reference branch (adapters off) differs from the trained policy
    assert any(not torch.equal(a, b) for a, b in zip(before, lora_weights(trainer)))

    resumed = DDPOTrainer(dataclasses.replace(config, num_epochs=3, resume_from=config.output_dir),
                          reward_fn=brightness)
    assert resumed.first_epoch == 2
    for a, b in zip(lora_weights(trainer), lora_weights(resumed)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.isfinite(torch.tensor(resumed.step(2)["loss"]))

    # the saved LoRA loads on the unquantized model and moves it as it moved the quantized one
    final = os.path.join(config.output_dir, "final")
    assert os.path.exists(os.path.join(final, "pytorch_lora_weights.safetensors"))
    plain = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    timestep = torch.tensor([500])
    base_out = plain.unet(latents, timestep, encoder_hidden_states=embeds).sample
    plain.load_lora_weights(final)
    tuned_out = plain.unet(latents, timestep, encoder_hidden_states=embeds).sample
    quantized_tuned = trainer.pipe.unet(latents, timestep, encoder_hidden_states=embeds).sample.detach()
    lora_effect = (tuned_out - base_out).abs().max()
    assert lora_effect > 1e-4
    # int8 storage changes the output by far less than the trained LoRA does
    assert (tuned_out - quantized_tuned).abs().max() < 0.5 * lora_effect


def test_quantized_in_memory_pipeline_trains_nft(tmp_path, tiny_pipe):
    """A pipeline handed to the trainer is quantized in place (the GPU check's path); NFT's frozen "old" adapter and
    its forward-process loss run on the quantized base as on the full one."""
    from diffalign.trainers import NFTTrainer

    config = quantized_config(NFTConfig, tmp_path, "unused", quantize_text_encoders="none", train_batch_size=2)
    trainer = NFTTrainer(config, pipeline=tiny_pipe, reward_fn=brightness)
    assert quantized_linears(tiny_pipe.unet) > 0 and quantized_linears(tiny_pipe.text_encoder) == 0
    before = lora_weights(trainer)
    metrics = trainer.step(0)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, lora_weights(trainer)))


@pytest.mark.parametrize("settings, message", [
    ({"quantize_denoiser": "int4"}, "quantize_denoiser must be one of none, int8, fp8, nf4, bnb_int8; got 'int4'"),
    ({"quantize_denoiser": "int8", "use_lora": False}, "set use_lora"),
    ({"quantize_text_encoders": "fp8"}, "quantize_text_encoders: fp8 (torchao float8 weight-only) needs a CUDA GPU"),
])
def test_quantization_settings_are_checked_in_one_line(settings, message):
    config = DDPOConfig(**settings)
    if torch.cuda.is_available() and "CUDA" in message:
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError) as raised:
        config.validate()
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_nf4_without_bitsandbytes_or_cuda_says_which(monkeypatch):
    from diffalign import quantization

    real_find_spec = quantization.importlib.util.find_spec
    monkeypatch.setattr(quantization.importlib.util, "find_spec",
                        lambda name: None if name == "bitsandbytes" else real_find_spec(name))
    with pytest.raises(ConfigError, match="nf4 .*needs the 'bitsandbytes' package"):
        quantization.check_quantization_method("quantize_denoiser", "nf4")
    monkeypatch.setattr(quantization.importlib.util, "find_spec", lambda name: object())
    with pytest.raises(ConfigError, match="nf4 .*needs a CUDA GPU"):
        quantization.check_quantization_method("quantize_denoiser", "nf4", cuda_available=False)


def test_quantization_settings_keep_earlier_runs_hash():
    """New keys at their default leave the checkpoint hash of earlier runs as it was; a quantized base is another
    run."""
    plain = DDPOConfig(model="m")
    assert plain.hash(resolve_model=False) == "df01719ed2a333d6"  # the hash main gave before these keys existed
    assert DDPOConfig(model="m", quantize_denoiser="int8").hash(resolve_model=False) != plain.hash(resolve_model=False)
