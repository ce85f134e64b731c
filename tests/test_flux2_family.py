"""FLUX.2's own facts, beyond the family tester (tests/test_family_common.py runs every shared check on klein, its
distilled variant and dev): the tokenizers built in code survive save/reload and tell prompts apart, the encodings are
the pipelines' (stacked Qwen3 / Mistral 3 layers), the pure packing / position-id / batch-norm helpers equal the
pipeline's, a distilled klein and dev sample without CFG, dev's embedded guidance is per row, and DiffusionNFT trains
them from the CLI."""

import json
import os

import pytest
import torch

from diffalign.families import FAMILIES, family_for_pipeline, load_family
from diffalign.families.flux2 import (Flux2Family, Flux2KleinFamily, batch_norm_denormalise, flux2_image_ids,
                                      flux2_pack, flux2_text_ids, flux2_unpack, tiny_flux2_components, unpatchify)

PROMPTS = ["a photo of a cat", "a red car"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base klein, a tiny distilled klein and a tiny dev, written with save_pretrained."""
    root = tmp_path_factory.mktemp("flux2")
    return {"base": Flux2KleinFamily.save_tiny(str(root / "base")),
            "distilled": Flux2KleinFamily.save_tiny(str(root / "distilled"), is_distilled=True),
            "dev": Flux2Family.save_tiny(str(root / "dev"))}


def test_flux2_is_registered():
    assert FAMILIES["Flux2KleinPipeline"] is Flux2KleinFamily and FAMILIES["Flux2Pipeline"] is Flux2Family


def test_tokenizer_survives_save_and_reload_and_prompts_encode_differently(saved):
    from transformers import AutoTokenizer

    built = Flux2KleinFamily.tiny_components()["tokenizer"]
    reloaded = AutoTokenizer.from_pretrained(os.path.join(saved["base"], "tokenizer"))
    assert len(reloaded) == len(built) > 256  # the byte symbols, merges and special tokens (not a 2-token fallback)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    texts = [tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           enable_thinking=False) for tokenizer in (built, reloaded)]
    assert texts[0] == texts[1] == (f"<|im_start|>user\n{PROMPTS[0]}<|im_end|>\n<|im_start|>assistant\n"
                                    "<think>\n\n</think>\n\n")
    a, b = (reloaded(prompt).input_ids for prompt in PROMPTS)
    assert a != b and a == built(PROMPTS[0]).input_ids and reloaded.decode(a) == PROMPTS[0]


def test_encoding_is_the_pipeline_encoding_after_reload(saved):
    family = load_family(saved["base"])
    family.configure(max_sequence_length=32)
    cond = family.encode_prompts(PROMPTS + [""])
    hidden = family.pipe.text_encoder.config.hidden_size
    assert set(cond) == {"encoder_hidden_states"}
    assert cond["encoder_hidden_states"].shape == (3, 32, 3 * hidden)  # three layers stacked on the feature axis
    stock, text_ids = family.pipe.encode_prompt(PROMPTS + [""], device="cpu", max_sequence_length=32)
    torch.testing.assert_close(cond["encoder_hidden_states"], stock, atol=0, rtol=0)
    assert torch.equal(flux2_text_ids(3, 32, "cpu"), text_ids)
    first, second, empty = cond["encoder_hidden_states"]
    assert (first - second).abs().max() > 1e-3 and (first - empty).abs().max() > 1e-3  # prompts, conditionings


def test_packing_and_position_ids_equal_the_pipeline():
    from diffusers import Flux2KleinPipeline

    latents = torch.randn(2, 16, 3, 5)
    tokens = flux2_pack(latents)
    assert torch.equal(tokens, Flux2KleinPipeline._pack_latents(latents))
    ids = flux2_image_ids(2, 3, 5, "cpu")
    assert torch.equal(ids, Flux2KleinPipeline._prepare_latent_ids(latents))
    assert torch.equal(flux2_unpack(tokens, 3, 5), latents)
    assert torch.equal(flux2_unpack(tokens, 3, 5), Flux2KleinPipeline._unpack_latents_with_ids(tokens, ids, 3, 5))
    assert torch.equal(unpatchify(latents), Flux2KleinPipeline._unpatchify_latents(latents))
    assert torch.equal(Flux2KleinPipeline._patchify_latents(unpatchify(latents)), latents)
    assert torch.equal(flux2_text_ids(2, 7, "cpu"), Flux2KleinPipeline._prepare_text_ids(torch.zeros(2, 7, 4)))


def test_decode_undoes_the_vae_batch_norm_which_survives_reload(saved):
    family = load_family(saved["base"])
    bn = family.pipe.vae.bn
    built = Flux2KleinFamily.tiny_components()["vae"].bn
    assert torch.equal(bn.running_mean, built.running_mean) and torch.equal(bn.running_var, built.running_var)
    assert bn.running_mean.abs().max() > 0 and (bn.running_var - 1).abs().max() > 0  # not the identity
    latents = torch.randn(1, 16, 2, 2)
    expected = latents * torch.sqrt(bn.running_var + bn.eps).view(1, -1, 1, 1) + bn.running_mean.view(1, -1, 1, 1)
    torch.testing.assert_close(batch_norm_denormalise(latents, bn.running_mean, bn.running_var, bn.eps), expected)
    images = family.decode(latents, 16, 16)
    assert images.shape == (1, 3, 16, 16)
    bn.running_mean.zero_()
    assert (family.decode(latents, 16, 16) - images).abs().max() > 1e-4  # the statistics are used


def test_distilled_model_samples_without_cfg(saved):
    with open(os.path.join(saved["distilled"], "model_index.json")) as f:
        assert json.load(f)["is_distilled"] is True
    distilled, base = load_family(saved["distilled"]), load_family(saved["base"])
    assert distilled.is_distilled and not base.is_distilled
    assert not distilled.samples_with_cfg(4.0) and not distilled.samples_with_cfg(1.0)
    assert base.samples_with_cfg(4.0) and base.samples_with_cfg(0.5) and not base.samples_with_cfg(1.0)
    assert Flux2KleinFamily.pipeline_guidance_kwargs(4.0) == {"guidance_scale": 4.0}


def test_timesteps_use_the_empirical_mu_of_tokens_and_steps():
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    family = family_for_pipeline(Flux2KleinFamily.tiny_pipeline())
    four = family.set_timesteps(4, "cpu", 64, 64).clone()
    eight = family.set_timesteps(8, "cpu", 64, 64)
    assert compute_empirical_mu(64, 4) != compute_empirical_mu(64, 8)
    sigmas = torch.linspace(1, 1 / 4, 4, dtype=torch.float64)
    mu = compute_empirical_mu(image_seq_len=(64 // 8) ** 2, num_steps=4)
    shifted = torch.exp(torch.tensor(mu, dtype=torch.float64)) / (
        torch.exp(torch.tensor(mu, dtype=torch.float64)) + (1 / sigmas - 1))
    torch.testing.assert_close(four, (shifted * 1000).float(), atol=1e-3, rtol=0)
    assert eight.shape == (8,) and not torch.equal(four, eight[::2])


def _config(scheduler) -> dict:
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}


def test_tiny_scheduler_is_the_one_diffusers_converts_flux2_with():
    """diffusers' scripts/convert_flux2_to_diffusers.py gives FLUX.2 pipelines FLUX.1-dev's scheduler: shift 3,
    dynamic shifting, base/max shift 0.5/1.15 over 256/4096 tokens (the pipelines pass FLUX.2's empirical `mu`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    flux1_dev = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    # klein's and dev's tiny components take it from `tiny_flux2_components`
    assert _config(tiny_flux2_components(0, 48, guidance_embeds=True)["scheduler"]) == _config(flux1_dev)


def test_dev_encoding_is_the_pipeline_encoding_after_reload(saved):
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    family = load_family(saved["dev"])
    assert type(family) is Flux2Family and family.pipe.text_encoder.config.text_config.num_hidden_layers == 30
    text = family.pipe.tokenizer.apply_chat_template(
        [{"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
         {"role": "user", "content": [{"type": "text", "text": PROMPTS[0]}]}], tokenize=False)
    assert text == f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]{PROMPTS[0]}[/INST]"
    cond = family.encode_prompts(PROMPTS)
    assert set(cond) == {"encoder_hidden_states"}
    assert cond["encoder_hidden_states"].shape == (2, 512, 3 * 16)  # layers 10, 20, 30 of a 16-wide Mistral
    stock, _ = family.pipe.encode_prompt(list(PROMPTS), device="cpu")
    torch.testing.assert_close(cond["encoder_hidden_states"], stock, atol=0, rtol=0)
    first, second = cond["encoder_hidden_states"]
    assert (first - second).abs().max() > 1e-3  # after the system message, the prompts still differ


def test_dev_guidance_is_embedded_per_row_and_there_is_no_cfg(saved):
    family = load_family(saved["dev"])
    assert family.uses_embedded_guidance() and not family.samples_with_cfg(4.0)
    assert Flux2Family.pipeline_guidance_kwargs(3.0, 2.5) == {"guidance_scale": 2.5}
    assert Flux2Family.pipeline_guidance_kwargs(1.0) == {"guidance_scale": 4.0}  # Flux2Pipeline's default
    family.configure(embedded_guidance=2.5)
    cond, negative = family.conditioning(PROMPTS, "", False, 16, 16)
    assert negative is None and cond["guidance"].tolist() == [2.5, 2.5]


@pytest.mark.parametrize("model", ["distilled", "dev"])
def test_nft_cli_trains_without_cfg_and_the_lora_loads(saved, tmp_path, model):
    import diffusers
    from safetensors.torch import load_file

    from diffalign.cli import main

    out = str(tmp_path / "run")
    args = ["train", "nft", "--model", saved[model], "--output_dir", out,
            "--prompts", "[a photo of a cat, a red car]", "--num_epochs", "2", "--sample_num_steps", "3",
            "--sample_num_prompts_per_epoch", "2", "--sample_images_per_prompt", "2", "--grid_num_images", "2",
            "--reward", "jpeg_compressibility",
            "--train_learning_rate", "5e-2", "--final_eval_num_images", "0", "--sample_resolution", "16",
            "--train_micro_batch_size", "4", "--lora_rank", "4", "--lora_alpha", "8"]
    assert main(args) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1]
    weights = load_file(os.path.join(out, "final", "pytorch_lora_weights.safetensors"))
    assert any("single_transformer_blocks.0.attn.to_out" in key for key in weights)
    assert any("to_qkv_mlp_proj" in key for key in weights)
    pipe = diffusers.DiffusionPipeline.from_pretrained(saved[model])  # Flux2KleinPipeline or Flux2Pipeline
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(prompt=PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="pt", height=16, width=16).images

    before = run()
    pipe.load_lora_weights(os.path.join(out, "final"))
    assert (run() - before).abs().max() > 1e-4
