"""Qwen-Image's own facts, beyond the family tester (tests/test_family_common.py runs every shared check on it, DDPO
and PRDP from the CLI included): its tokenizer built in code, its variable-length prompt encoding (the pipeline's,
each batch padded to its own longest prompt), its true CFG with norm rescale and negative prompt, padded batches
concatenated and re-evaluated exactly, and DiffusionNFT from the CLI (a killed run resumed: the family tester's
`test_killed_run_resumes_bit_identically`)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from diffalign.families import FAMILIES, load_family
from diffalign.families.base import cat_rows
from diffalign.families.qwenimage import QwenImageFamily, tiny_qwen2_tokenizer, true_cfg_rescaled
from diffalign.kernels import sde_window_mask
from diffalign.rollout import concat_trajectories, default_kernel, sample_trajectories, step_log_probs
from diffalign.utils.peft_utils import add_lora

PROMPTS = ["a photo of a cat", "a red car"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return QwenImageFamily.save_tiny(str(tmp_path_factory.mktemp("qwenimage") / "model"))


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_qwenimage_is_registered():
    assert FAMILIES["QwenImagePipeline"] is QwenImageFamily


def test_tokenizer_is_a_real_bpe_with_the_template_prefix_of_qwen(tmp_path):
    import diffusers

    tokenizer = tiny_qwen2_tokenizer()
    assert len(tokenizer) > 256  # the byte symbols, merges and special tokens (not a 2-token fallback)
    a, b = (tokenizer(p).input_ids for p in PROMPTS)
    assert a != b and tokenizer.decode(a) == PROMPTS[0]
    # the pipeline drops the template's first `prompt_template_encode_start_idx` tokens: exactly its system message
    # and the user turn's opening, as with Qwen2.5-VL's own tokenizer
    pipe = diffusers.QwenImagePipeline(**QwenImageFamily.tiny_components())
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    tokenizer.save_pretrained(str(tmp_path))
    reloaded = type(tokenizer).from_pretrained(str(tmp_path))
    assert len(reloaded) == len(tokenizer)
    assert [reloaded(p).input_ids for p in PROMPTS] == [a, b]


def test_encoding_is_the_pipeline_encoding_padded_per_batch(model_dir):
    family = load_family(model_dir)  # the tokenizer and text encoder reloaded from files
    assert family.max_sequence_length == 512
    prompts = PROMPTS + ["a dog"]
    stock, stock_mask = family.pipe.encode_prompt(prompts, device="cpu", max_sequence_length=512)
    lengths = stock_mask.sum(1).tolist()
    assert len(set(lengths)) == 3  # three prompts, three lengths
    cond = family.encode_prompts(prompts)
    mask = cond["encoder_hidden_states_mask"]
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == lengths
    assert cond["encoder_hidden_states"].shape[1] == max(lengths)  # the batch's longest prompt, not 512
    torch.testing.assert_close(cond["encoder_hidden_states"], stock, atol=0, rtol=0)
    # a batch of cached prompts is padded to its own longest one
    alone = family.encode_prompts(["a dog"])
    assert alone["encoder_hidden_states"].shape[1] == min(lengths) and alone["encoder_hidden_states_mask"].all()
    torch.testing.assert_close(alone["encoder_hidden_states"][0], stock[2, : min(lengths)], atol=0, rtol=0)
    # two prompts, two conditionings (their first word is the same: "a")
    assert (cond["encoder_hidden_states"][0, 1] - cond["encoder_hidden_states"][1, 1]).abs().max() > 1e-3
    assert family.pipe.vae.config.latents_mean != [0.0] * 16  # the rollouts' decode undoes a real normalisation


def test_resolution_is_checked_from_the_config_files(model_dir):
    from diffalign.errors import ModelError
    from diffalign.families import check_model_resolution

    check_model_resolution(model_dir, 24)  # vae_scale_factor 4 (the video VAE's), then 2x2 packing: multiples of 8
    with pytest.raises(ModelError, match="not a multiple of 8"):
        check_model_resolution(model_dir, 20)


def test_cat_rows_pads_the_token_axis_only_when_lengths_differ():
    a, b = torch.randn(2, 3, 4), torch.randn(1, 5, 4)
    both = cat_rows([a, b])
    assert both.shape == (3, 5, 4) and (both[:2, 3:] == 0).all()
    assert torch.equal(both[:2, :3], a) and torch.equal(both[2], b[0])
    masks = cat_rows([torch.ones(2, 3, dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool)])
    assert masks.sum(1).tolist() == [3, 3, 5]
    pooled = [torch.randn(2, 8), torch.randn(3, 8)]
    assert torch.equal(cat_rows(pooled), torch.cat(pooled))  # equal shapes: torch.cat itself


def test_true_cfg_is_the_pipeline_formula_with_its_norm_rescale():
    cond, uncond = torch.randn(2, 6, 64), torch.randn(2, 6, 64)
    guided = true_cfg_rescaled(cond, uncond, 4.0)
    comb = uncond + 4.0 * (cond - uncond)  # QwenImagePipeline.__call__, written out
    torch.testing.assert_close(guided, comb * (torch.norm(cond, dim=-1, keepdim=True) /
                                               torch.norm(comb, dim=-1, keepdim=True)))
    torch.testing.assert_close(guided.norm(dim=-1), cond.norm(dim=-1))  # each token keeps the conditional norm
    torch.testing.assert_close(true_cfg_rescaled(cond, uncond, 1.0), cond)


def test_cfg_scale_maps_to_the_pipeline_true_cfg_scale():
    assert QwenImageFamily.guidance_kind == "true_cfg" and QwenImageFamily.default_guidance_scale == 4.0
    assert QwenImageFamily.pipeline_guidance_kwargs(1.0) == {}  # no CFG
    assert QwenImageFamily.pipeline_guidance_kwargs(4.5) == {"true_cfg_scale": 4.5, "negative_prompt": ""}


def test_rollout_with_a_negative_prompt_equals_the_pipeline():
    """True CFG against a given negative prompt (longer than the prompts: the halves are padded to a common text
    length in one forward, where the pipeline runs two), on a wide image."""
    pipe = QwenImageFamily.tiny_pipeline()
    family = QwenImageFamily(pipe)
    negative = "a blurry photo of a red cat and a dog"
    latents = family.prepare_latents(2, 16, 32, torch.float32, "cpu", _generator(3))
    ours = sample_trajectories(family, PROMPTS, num_inference_steps=3, guidance_scale=2.5, latents=latents,
                               height=16, width=32, negative_prompt=negative, stochastic_steps=sde_window_mask(3, 0))
    assert ours.negative_conditioning["encoder_hidden_states"].shape[1] > ours.conditioning[
        "encoder_hidden_states"].shape[1]
    stock = pipe(PROMPTS, negative_prompt=[negative] * 2, true_cfg_scale=2.5, num_inference_steps=3,
                 latents=latents, height=16, width=32, output_type="pt").images
    torch.testing.assert_close(ours.images, stock, atol=1e-5, rtol=1e-4)
    plain = pipe(PROMPTS, negative_prompt=[""] * 2, true_cfg_scale=2.5, num_inference_steps=3, latents=latents,
                 height=16, width=32, output_type="pt").images
    assert (plain - stock).abs().max() > 1e-4  # the negative prompt matters


def test_batches_of_other_text_lengths_concatenate_and_recompute_exactly():
    """Two sampled batches padded to different text lengths (as the trainers' sampling batches and the replay
    buffer are) concatenate into one, and its recomputed log-probs give ratio 1."""
    pipe = QwenImageFamily.tiny_pipeline()
    family = QwenImageFamily(pipe)
    add_lora(family.denoiser, target_modules=family.default_lora_target_modules)
    family.denoiser.eval()
    kernel = default_kernel(family, eta=1.0, noise_level=0.7)
    window = sde_window_mask(3, 2)
    batches = [sample_trajectories(family, prompts, num_inference_steps=3, guidance_scale=3.0, kernel=kernel,
                                   height=16, width=16, generator=_generator(seed), stochastic_steps=window)
               for seed, prompts in enumerate([PROMPTS, ["a dog", "a dog"]])]
    lengths = [batch.conditioning["encoder_hidden_states"].shape[1] for batch in batches]
    assert lengths[0] > lengths[1]
    both = concat_trajectories(batches)
    assert both.conditioning["encoder_hidden_states"].shape[:2] == (4, lengths[0])
    assert both.conditioning["encoder_hidden_states_mask"].sum(1).tolist()[2:] == [lengths[1]] * 2
    rows, steps = torch.tensor([0, 1, 2, 3, 3]), torch.tensor([0, 1, 0, 0, 1])
    with torch.no_grad():
        log_probs, _, _ = step_log_probs(family, family.denoiser, kernel, both, rows, steps, 3.0)
    ratio = torch.exp(log_probs - both.log_probs[rows, steps])
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


# a tiny run: 2 prompts x 2 images, 3 steps, true CFG
RUN_ARGS = [
    "--prompts", "[a photo of a cat, a red car]", "--sample_num_steps", "3", "--sample_num_prompts_per_epoch", "2",
    "--sample_images_per_prompt", "2", "--grid_num_images", "2", "--reward", "jpeg_compressibility",
    "--train_learning_rate", "5e-2", "--final_eval_num_images", "0", "--sample_resolution", "16",
    "--sample_guidance_scale", "3.0",
]


def test_nft_cli_run_writes_a_lora_that_loads_and_changes_images(model_dir, tmp_path):
    import diffusers

    from diffalign.cli import main

    out = str(tmp_path / "run")
    assert main(["train", "nft", "--model", model_dir, "--output_dir", out, "--num_epochs", "2",
                 "--train_micro_batch_size", "4"] + RUN_ARGS) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1]
    weights = load_file(os.path.join(out, "final", "pytorch_lora_weights.safetensors"))
    assert weights and not any(".old." in key for key in weights)  # the trained adapter alone
    pipe = diffusers.QwenImagePipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(PROMPTS[0], num_inference_steps=2, generator=_generator(), output_type="pt", height=16, width=16,
                    **QwenImageFamily.pipeline_guidance_kwargs(3.0)).images

    base = run()
    pipe.load_lora_weights(os.path.join(out, "final"))
    assert (run() - base).abs().max() > 1e-4

