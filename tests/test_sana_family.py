"""SANA's own facts, beyond the family tester (tests/test_family_common.py runs every shared check on it and on its
flow-matching Euler variant): the Gemma tokenizer built in code survives save/reload and tells prompts apart, the
encoding is the pipeline's (complex human instruction for prompts, none for the negative prompt), the DPM-Solver's
flow sigmas and `flow_shift` are kept and its first-order step is the kernel's Euler step, and DiffusionNFT trains it
from the CLI."""

import json
import os

import pytest
import torch

from diffalign.errors import ModelError
from diffalign.families import FAMILIES, family_for_pipeline, load_family
from diffalign.families.sana import SanaFamily, tiny_gemma_tokenizer
from diffalign.logprob import flow_ode_step

PROMPTS = ["a photo of a cat", "a red car"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return SanaFamily.save_tiny(str(tmp_path_factory.mktemp("sana") / "sana"))


def test_sana_is_registered():
    assert FAMILIES["SanaPipeline"] is SanaFamily


def test_tiny_scheduler_is_the_one_diffusers_converts_sana_with():
    """diffusers' scripts/convert_sana_to_diffusers.py (SANA below 4K px): DPM-Solver on flow sigmas, flow_shift 3."""
    from diffusers import DPMSolverMultistepScheduler

    converted = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    config = lambda scheduler: {k: v for k, v in scheduler.config.items() if not k.startswith("_")}  # noqa: E731
    assert config(SanaFamily.tiny_components()["scheduler"]) == config(converted)


def test_tokenizer_is_a_byte_fallback_bpe_that_survives_reload(saved):
    from transformers import AutoTokenizer

    built = tiny_gemma_tokenizer()
    reloaded = AutoTokenizer.from_pretrained(os.path.join(saved, "tokenizer"))
    assert len(reloaded) == len(built) > 256
    a, b = (reloaded(prompt).input_ids for prompt in PROMPTS)
    assert a != b and a == built(PROMPTS[0]).input_ids
    assert a[0] == reloaded.bos_token_id  # Gemma starts every text with <bos>
    assert reloaded.convert_ids_to_tokens(reloaded("\u00e9!").input_ids)[1:] == ["<0xC3>", "<0xA9>", "<0x21>"]
    assert reloaded.decode(a, skip_special_tokens=True) == PROMPTS[0]


def test_encoding_is_the_pipeline_encoding_after_reload(saved):
    family = load_family(saved)
    family.configure(max_sequence_length=40)
    cond = family.encode_prompts(PROMPTS)
    instruction = family.instruction()
    assert instruction and instruction[0].startswith("Given a user prompt")  # SanaPipeline's own default
    embeds, mask, negative, negative_mask = family.pipe.encode_prompt(
        list(PROMPTS), do_classifier_free_guidance=True, device="cpu", max_sequence_length=40,
        complex_human_instruction=instruction)
    assert cond["encoder_hidden_states"].shape == (2, 40, 16) and cond["encoder_attention_mask"].shape == (2, 40)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, atol=0, rtol=0)
    assert torch.equal(cond["encoder_attention_mask"], mask)
    # the negative prompt has no instruction: other states than the empty prompt with it
    uncond = family.negative_conditioning("", 2)
    torch.testing.assert_close(uncond["encoder_hidden_states"], negative, atol=0, rtol=0)
    assert torch.equal(uncond["encoder_attention_mask"], negative_mask)
    with_instruction = family.encode_prompts([""])["encoder_hidden_states"][0]
    assert (with_instruction - negative[0]).abs().max() > 1e-3
    first, second = cond["encoder_hidden_states"]
    assert (first - second).abs().max() > 1e-3  # two prompts, two conditionings


def test_dpm_solver_flow_sigmas_and_shift_are_kept(saved):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    family = load_family(saved)
    scheduler = family.scheduler
    assert type(scheduler) is DPMSolverMultistepScheduler and scheduler.config.solver_order == 1
    assert scheduler.config.flow_shift == 3.0 and scheduler.config.use_flow_sigmas
    stock = DPMSolverMultistepScheduler.from_pretrained(saved, subfolder="scheduler")  # SanaPipeline's, order 2
    assert stock.config.solver_order == 2
    for steps in (3, 20):
        timesteps = family.set_timesteps(steps, "cpu", 1024, 1024)
        stock.set_timesteps(steps)
        assert torch.equal(timesteps, stock.timesteps) and torch.equal(scheduler.sigmas, stock.sigmas)
    # the trap: a flow-matching Euler scheduler made from this config has no `flow_shift` (shift 1, other sigmas)
    assert FlowMatchEulerDiscreteScheduler.from_config(stock.config).config.shift == 1.0


def test_first_order_dpm_solver_step_is_the_euler_step():
    pipe = SanaFamily.tiny_pipeline()
    family = family_for_pipeline(pipe)
    family.set_kernel_scheduler(pipe)
    timesteps = family.set_timesteps(4, "cpu", 16, 16)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 4, 4, generator=generator)
    for t in timesteps:
        velocity = torch.randn(sample.shape, generator=generator)
        euler = flow_ode_step(family.scheduler, velocity, t, sample)
        sample = family.scheduler.step(velocity, t, sample, return_dict=False)[0]
        torch.testing.assert_close(sample, euler, atol=1e-5, rtol=1e-5)


def test_a_scheduler_that_is_not_a_flow_is_refused():
    from diffusers import DDIMScheduler

    pipe = SanaFamily.tiny_pipeline()
    pipe.scheduler = DDIMScheduler()
    with pytest.raises(ModelError, match="not a flow-matching one"):
        SanaFamily.set_kernel_scheduler(pipe)


def test_nft_cli_trains_sana_and_the_lora_loads(saved, tmp_path):
    import diffusers

    from diffalign.cli import main

    out = str(tmp_path / "run")
    args = ["train", "nft", "--model", saved, "--output_dir", out, "--prompts", "[a photo of a cat, a red car]",
            "--num_epochs", "2", "--sample_num_steps", "3", "--sample_num_prompts_per_epoch", "2",
            "--sample_images_per_prompt", "2", "--grid_num_images", "2", "--reward", "jpeg_compressibility",
            "--train_learning_rate", "5e-2", "--final_eval_num_images", "0", "--sample_resolution", "16",
            "--train_micro_batch_size", "4", "--lora_rank", "4", "--lora_alpha", "8"]
    assert main(args) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1]
    pipe = diffusers.SanaPipeline.from_pretrained(saved)
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(prompt=PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="pt", height=32, width=32, use_resolution_binning=False).images

    before = run()
    pipe.load_lora_weights(os.path.join(out, "final"))
    assert (run() - before).abs().max() > 1e-4
