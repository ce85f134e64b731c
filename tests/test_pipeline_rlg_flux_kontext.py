"""FluxKontextRLGPipeline on tiny FLUX.1 Kontext components, with a condition image: w = 0 is `FluxKontextPipeline` of
the base and w = 1 the pipeline with the LoRA, bit for bit (the same image, prompt and seed); with true CFG inside each
model up to float rounding; a fully fine-tuned `aligned_transformer` as the aligned model; one batched forward equal to
one forward per model; w between and beyond interpolates and extrapolates the velocities."""

import copy

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from diffalign.families import FluxKontextFamily
from diffalign.pipelines import FluxKontextRLGPipeline
from diffalign.utils.peft_utils import add_lora

SIZE = 16
PROMPT = "make it red"


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _randomise_lora(model, seed=0, std=0.1):
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.data = torch.randn(param.shape, generator=generator) * std


@pytest.fixture(scope="module")
def components():
    components = FluxKontextFamily.tiny_components()
    components["transformer"].requires_grad_(False)  # as inference runs it (the LoRA below freezes it anyway)
    return components


@pytest.fixture(scope="module")
def image():
    pixels = np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _make(cls, components, **kwargs):
    pipe = cls(**components, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _edit(pipe, image, **kwargs):
    # FluxKontextFamily.pipeline_call_kwargs: the sampled size (no rescale to 1024^2), the image at that size
    return pipe(image=image, prompt=[PROMPT, "add a cat"], num_inference_steps=3, height=SIZE, width=SIZE,
                guidance_scale=2.5, max_area=SIZE * SIZE, _auto_resize=False, max_sequence_length=16,
                generator=_generator(), output_type="pt", **kwargs).images


@pytest.fixture(scope="module")
def lora_components(components):
    transformer = copy.deepcopy(components["transformer"])
    add_lora(transformer, rank=4, alpha=4.0, target_modules=FluxKontextFamily.default_lora_target_modules)
    _randomise_lora(transformer)
    return {**components, "transformer": transformer}


@pytest.mark.parametrize("with_image", [True, False], ids=["edit", "text-to-image"])
def test_rlg_is_the_base_at_0_and_the_lora_model_at_1_bit_for_bit(components, lora_components, image, with_image):
    condition = image if with_image else None
    base = _edit(_make(FluxKontextPipeline, components), condition)
    aligned = _edit(_make(FluxKontextPipeline, lora_components), condition)
    assert (aligned - base).abs().max() > 1e-3  # the LoRA changes the edits
    if with_image:  # the condition image is an input
        assert (_edit(_make(FluxKontextPipeline, components), None) - base).abs().max() > 1e-4
    rlg = _make(FluxKontextRLGPipeline, lora_components)
    assert torch.equal(_edit(rlg, condition, rlg_scale=0.0), base)
    assert torch.equal(_edit(rlg, condition, rlg_scale=1.0), aligned)
    # w between and beyond: another edit, on the way from the base to the aligned model and past it
    half, beyond = _edit(rlg, condition, rlg_scale=0.5), _edit(rlg, condition, rlg_scale=2.0)
    assert (half - base).abs().max() > 1e-4 and (half - aligned).abs().max() > 1e-4
    assert (beyond - aligned).abs().max() > 1e-4
    # one forward per model gives the same images up to float rounding
    torch.testing.assert_close(_edit(rlg, condition, rlg_scale=2.0, rlg_single_pass=False), beyond, atol=1e-5,
                               rtol=1e-4)
    # the RLG window: outside it the aligned model runs alone
    torch.testing.assert_close(_edit(rlg, condition, rlg_scale=0.0, rlg_start=0.0, rlg_stop=0.0), aligned, atol=0,
                               rtol=0)


def test_true_cfg_runs_inside_each_model(components, lora_components, image):
    true_cfg = {"true_cfg_scale": 3.0, "negative_prompt": ["blurry", "blurry"]}
    base = _edit(_make(FluxKontextPipeline, components), image, **true_cfg)
    aligned = _edit(_make(FluxKontextPipeline, lora_components), image, **true_cfg)
    rlg = _make(FluxKontextRLGPipeline, lora_components)
    # the pipeline runs the negative half in its own forward, RLG in the models' batch: equal up to float rounding
    torch.testing.assert_close(_edit(rlg, image, rlg_scale=0.0, **true_cfg), base, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_edit(rlg, image, rlg_scale=1.0, **true_cfg), aligned, atol=1e-5, rtol=1e-4)


def test_a_fully_fine_tuned_aligned_transformer(components, image):
    aligned_transformer = copy.deepcopy(components["transformer"])
    with torch.no_grad():
        for param in aligned_transformer.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=_generator(1)))
    base = _edit(_make(FluxKontextPipeline, components), image)
    aligned = _edit(_make(FluxKontextPipeline, {**components, "transformer": aligned_transformer}), image)
    rlg = _make(FluxKontextRLGPipeline, components, aligned_transformer=aligned_transformer)
    assert torch.equal(_edit(rlg, image, rlg_scale=0.0), base)
    assert torch.equal(_edit(rlg, image, rlg_scale=1.0), aligned)


def test_rlg_needs_an_aligned_model(components, image):
    rlg = _make(FluxKontextRLGPipeline, components)
    with pytest.raises(ValueError, match="needs an aligned model"):
        _edit(rlg, image, rlg_scale=0.5)
    with pytest.raises(ValueError, match="does not support IP-Adapter"):
        _edit(rlg, image, ip_adapter_image=image)


def test_a_kontext_folder_loads_it_as_a_community_pipeline(components, lora_components, image, tmp_path):
    import os

    from diffusers import DiffusionPipeline

    _make(FluxKontextPipeline, components).save_pretrained(str(tmp_path / "kontext"), safe_serialization=True)
    path = os.path.join(os.path.dirname(__file__), "..", "pipelines", "pipeline_flux_kontext_rlg.py")
    custom = DiffusionPipeline.from_pretrained(str(tmp_path / "kontext"), custom_pipeline=os.path.abspath(path),
                                               trust_remote_code=True)
    custom.set_progress_bar_config(disable=True)
    assert type(custom).__name__ == "FluxKontextRLGPipeline" and custom.aligned_transformer is None
    custom.register_modules(aligned_transformer=lora_components["transformer"])  # a fine-tune as the aligned model
    expected = _edit(_make(FluxKontextRLGPipeline, components, aligned_transformer=lora_components["transformer"]),
                     image, rlg_scale=1.5)
    torch.testing.assert_close(_edit(custom, image, rlg_scale=1.5), expected, atol=1e-6, rtol=0)
