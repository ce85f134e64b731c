"""SanaRLGPipeline on tiny SANA components: bit-for-bit identities against SanaPipeline (w = 0 is the base model,
adapters off; w = 1 the fine-tuned one), with SANA's DPM-Solver (order 2, flow sigmas, `flow_shift`) and with a
flow-matching Euler scheduler, and the mix `v_base + w (v_aligned - v_base)` against a hand-written loop."""

import copy
import inspect
import os

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, SanaPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffalign.families.sana import SanaFamily
from diffalign.pipelines import SanaRLGPipeline
from diffalign.testing import perturbed_unet

PIPELINE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pipelines", "pipeline_sana_rlg.py")
PROMPT = "a photo of a cat"
STEPS = 3
SIZE = 32  # SanaPipeline: a multiple of 32; no resolution binning in most calls (the 512 px table is slow)
MAX_SEQUENCE_LENGTH = 16


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def add_lora(transformer, adapter_name="default", seed=0, std=0.3):
    """A LoRA adapter with random (non-zero) B weights, so that it changes the model."""
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"]),
        adapter_name=adapter_name,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if f"lora_B.{adapter_name}." in name:
                param.copy_(std * torch.randn(param.shape, generator=generator))
    return transformer


def make(cls, components, **kwargs):
    pipe = cls(**components, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(**kwargs):
    return {
        "prompt": PROMPT,
        "num_inference_steps": STEPS,
        "guidance_scale": 4.5,
        "height": SIZE,
        "width": SIZE,
        "use_resolution_binning": False,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "output_type": "latent",
        "generator": gen(),
        **kwargs,
    }


@pytest.fixture(scope="module", params=["dpm_solver", "flow_match_euler"])
def lora_components(request):
    components = SanaFamily.tiny_components(scheduler=request.param)
    add_lora(components["transformer"])
    return components


def stock(components, adapters=True, **kwargs):
    """SanaPipeline on `components`, with the transformer's LoRA adapters on or off."""
    transformer = components["transformer"]
    if not adapters:
        transformer.disable_adapters()
    try:
        return make(SanaPipeline, components)(**call_kwargs(**kwargs)).images
    finally:
        transformer.enable_adapters()


def test_call_signature_extends_sana():
    sana_params = inspect.signature(SanaPipeline.__call__).parameters
    rlg_params = inspect.signature(SanaRLGPipeline.__call__).parameters
    for name, param in sana_params.items():  # same names, same defaults
        assert rlg_params[name].default == param.default, name
    assert {"rlg_scale", "rlg_start", "rlg_stop", "rlg_single_pass"} <= set(rlg_params)


def test_w0_is_the_base_and_w1_the_lora_model_bit_for_bit(lora_components):
    base, aligned = stock(lora_components, adapters=False), stock(lora_components)
    assert (base - aligned).abs().max() > 1e-2
    pipe = make(SanaRLGPipeline, lora_components)
    for single_pass in (True, False):
        at_0 = pipe(**call_kwargs(rlg_scale=0.0, rlg_single_pass=single_pass)).images
        at_1 = pipe(**call_kwargs(rlg_scale=1.0, rlg_single_pass=single_pass)).images
        assert torch.equal(at_0, base) and torch.equal(at_1, aligned)
    # decoded images too, and without CFG (guidance_scale 1: one row per model)
    np.testing.assert_array_equal(pipe(**call_kwargs(rlg_scale=0.0, output_type="np")).images,
                                  stock(lora_components, adapters=False, output_type="np"))
    assert torch.equal(pipe(**call_kwargs(rlg_scale=0.0, guidance_scale=1.0)).images,
                       stock(lora_components, adapters=False, guidance_scale=1.0))


def test_mix_with_cfg_inside_each_model(lora_components):
    """w = 1.6: `v_base + w (v_aligned - v_base)` with CFG inside each model, stepped by the pipeline's scheduler."""
    pipe = make(SanaRLGPipeline, lora_components)
    transformer = pipe.transformer
    instruction = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    embeds, mask, negative, negative_mask = pipe.encode_prompt(
        PROMPT, True, device="cpu", max_sequence_length=MAX_SEQUENCE_LENGTH, complex_human_instruction=instruction
    )
    embeds, mask = torch.cat([negative, embeds]), torch.cat([negative_mask, mask])
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(STEPS)
    latents = pipe.prepare_latents(1, 4, SIZE, SIZE, torch.float32, "cpu", gen())

    def guided(x, t):
        uncond, cond = transformer(torch.cat([x] * 2), encoder_hidden_states=embeds, encoder_attention_mask=mask,
                                   timestep=t.expand(2) * transformer.config.timestep_scale,
                                   return_dict=False)[0].float().chunk(2)
        return uncond + 4.5 * (cond - uncond)

    with torch.no_grad():
        for t in scheduler.timesteps:
            aligned = guided(latents, t)
            transformer.disable_adapters()
            base = guided(latents, t)
            transformer.enable_adapters()
            latents = scheduler.step(base + 1.6 * (aligned - base), t, latents, return_dict=False)[0]
    for single_pass in (True, False):
        mixed = pipe(**call_kwargs(rlg_scale=1.6, rlg_single_pass=single_pass)).images
        torch.testing.assert_close(mixed, latents, atol=1e-5, rtol=0)
    assert (latents - stock(lora_components)).abs().max() > 1e-2  # w > 1 extrapolates


def test_full_weight_aligned_transformer():
    components = SanaFamily.tiny_components()
    aligned_transformer = perturbed_unet(components["transformer"], scale=0.1)
    pipe = make(SanaRLGPipeline, components, aligned_transformer=aligned_transformer)
    base = make(SanaPipeline, components)(**call_kwargs()).images
    aligned = make(SanaPipeline, {**components, "transformer": aligned_transformer})(**call_kwargs()).images
    assert (base - aligned).abs().max() > 1e-2
    assert torch.equal(pipe(**call_kwargs(rlg_scale=0.0)).images, base)
    assert torch.equal(pipe(**call_kwargs(rlg_scale=1.0)).images, aligned)


def test_load_lora_weights_binning_and_errors(tmp_path):
    """The user path: a LoRA saved by diffusers, `pipe.load_lora_weights(dir)`, SanaPipeline's defaults (resolution
    binning, PIL output); no aligned model is one clear error."""
    components = SanaFamily.tiny_components()
    lora_transformer = add_lora(copy.deepcopy(components["transformer"]))
    SanaPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=get_peft_model_state_dict(lora_transformer))

    pipe = make(SanaRLGPipeline, copy.deepcopy(components))
    with pytest.raises(ValueError, match="needs an aligned model"):
        pipe(**call_kwargs(rlg_scale=1.6))
    pipe.load_lora_weights(str(tmp_path))
    reference = make(SanaPipeline, copy.deepcopy(components))
    reference.load_lora_weights(str(tmp_path))
    assert torch.equal(pipe(**call_kwargs(rlg_scale=1.0)).images, reference(**call_kwargs()).images)

    # SanaPipeline's binning: 32x64 px samples at the table's size, resized back
    kwargs = {"num_inference_steps": 2, "max_sequence_length": MAX_SEQUENCE_LENGTH, "height": 32, "width": 64}
    images = pipe(PROMPT, generator=gen(), rlg_scale=1.6, **kwargs).images
    assert len(images) == 1 and images[0].size == (64, 32)

    with pytest.raises(ValueError, match=r"Unknown LoRA adapter\(s\) \['typo'\]"):
        pipe(**call_kwargs(rlg_scale={"typo": 1.0}))
    with pytest.raises(ValueError, match="has 2 values, but the sampler runs 3 steps"):
        pipe(**call_kwargs(rlg_scale=[1.0, 2.0]))
    pipe.fuse_lora()
    with pytest.raises(ValueError, match="fused into `transformer`"):
        pipe(**call_kwargs(rlg_scale=1.6))


def test_custom_pipeline_and_from_pipe(tmp_path):
    """A saved SanaPipeline folder loads as a community pipeline (offline), and `from_pipe` shares the components."""
    components = SanaFamily.tiny_components()
    aligned_transformer = perturbed_unet(components["transformer"], scale=0.1)
    expected = make(SanaRLGPipeline, components, aligned_transformer=aligned_transformer)(
        **call_kwargs(rlg_scale=1.6)
    ).images
    make(SanaPipeline, components).save_pretrained(str(tmp_path / "sana"), safe_serialization=True)
    custom = DiffusionPipeline.from_pretrained(
        str(tmp_path / "sana"), custom_pipeline=os.path.abspath(PIPELINE_FILE), trust_remote_code=True
    )
    custom.set_progress_bar_config(disable=True)
    assert type(custom).__name__ == "SanaRLGPipeline" and custom.aligned_transformer is None
    custom.register_modules(aligned_transformer=aligned_transformer)
    torch.testing.assert_close(custom(**call_kwargs(rlg_scale=1.6)).images, expected, atol=1e-5, rtol=0)
    from_pipe = SanaRLGPipeline.from_pipe(make(SanaPipeline, components), aligned_transformer=aligned_transformer)
    from_pipe.set_progress_bar_config(disable=True)
    assert torch.equal(from_pipe(**call_kwargs(rlg_scale=1.6)).images, expected)


def test_callbacks(lora_components):
    pipe = make(SanaRLGPipeline, lora_components)
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append((step, sorted(callback_kwargs), pipeline.rlg_scale, pipeline.do_rlg))
        pipeline._rlg_scale = 0.5  # from the next step on
        if step == 1:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs

    inputs = ["latents", "negative_prompt_embeds", "prompt_embeds"]
    latents = pipe(**call_kwargs(rlg_scale=1.0, num_inference_steps=2, callback_on_step_end=callback,
                                 callback_on_step_end_tensor_inputs=inputs)).images
    assert seen == [(0, inputs, 1.0, False), (1, inputs, 0.5, True)]
    assert torch.count_nonzero(latents) == 0

    # new prompt embeddings from a callback condition every model from the next step on
    def replace_embeds(pipeline, step, timestep, callback_kwargs):
        return {"prompt_embeds": torch.zeros_like(callback_kwargs["prompt_embeds"])}

    replaced = pipe(**call_kwargs(rlg_scale=1.6, callback_on_step_end=replace_embeds,
                                  callback_on_step_end_tensor_inputs=["prompt_embeds"])).images
    assert (replaced - pipe(**call_kwargs(rlg_scale=1.6)).images).abs().max() > 1e-4
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(**call_kwargs(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise_pred"]))
