"""ReinforcementLearningGuidance in diffusers' modular SDXL and SD3 pipelines: identities against the stock
ClassifierFreeGuidance guider and equality with diffalign's RLG pipelines (windows, schedules, adapter mixes)."""

import copy

import numpy as np
import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines import StableDiffusion3AutoBlocks, StableDiffusionXLAutoBlocks
from peft import LoraConfig

from diffalign.guiders import ReinforcementLearningGuidance
from diffalign.pipelines import StableDiffusion3RLGPipeline, StableDiffusionXLRLGPipeline
from diffalign.testing import tiny_sd3_components, tiny_sdxl_components

PROMPT = "a photo of a cat"
STEPS = 4
ATOL = 1e-4


def add_lora(denoiser, adapter_name="default", seed=0, std=0.1):
    config = LoraConfig(
        r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    denoiser.add_adapter(config, adapter_name=adapter_name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if f"lora_B.{adapter_name}." in name:
                param.copy_(std * torch.randn(param.shape, generator=generator))
    return denoiser


def modular(blocks, components):
    pipe = blocks.init_pipeline()
    pipe.update_components(**{name: value for name, value in components.items() if value is not None})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd3():
    components = tiny_sd3_components()
    add_lora(components["transformer"])
    return components, modular(StableDiffusion3AutoBlocks(), components)


@pytest.fixture(scope="module")
def sdxl():
    components = tiny_sdxl_components()
    add_lora(components["unet"])
    return components, modular(StableDiffusionXLAutoBlocks(), components)


def run_sd3(pipe, guider, **kwargs):
    pipe.update_components(guider=guider)
    kwargs = {"num_inference_steps": STEPS, "max_sequence_length": 16, "output_type": "np", **kwargs}
    return pipe(
        prompt=PROMPT, negative_prompt="", generator=torch.Generator().manual_seed(0), output="images", **kwargs
    )


def run_sdxl(pipe, guider, **kwargs):
    pipe.update_components(guider=guider)
    kwargs = {"num_inference_steps": STEPS, "output_type": "np", **kwargs}
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output="images", **kwargs)


def rlg_pipeline_sd3(components, **kwargs):
    pipe = StableDiffusion3RLGPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": STEPS, "max_sequence_length": 16, "output_type": "np", **kwargs}
    return pipe(PROMPT, guidance_scale=6.0, generator=torch.Generator().manual_seed(0), **kwargs).images


def test_sd3_identities_and_equality_with_the_rlg_pipeline(sd3):
    components, pipe = sd3
    transformer = components["transformer"]
    aligned = run_sd3(pipe, ClassifierFreeGuidance(guidance_scale=6.0))
    transformer.disable_adapters()
    base = run_sd3(pipe, ClassifierFreeGuidance(guidance_scale=6.0))
    transformer.enable_adapters()
    assert np.abs(base - aligned).max() > 1e-2

    np.testing.assert_array_equal(
        run_sd3(pipe, ReinforcementLearningGuidance(guidance_scale=6.0, rlg_scale=0.0)), base
    )
    np.testing.assert_array_equal(run_sd3(pipe, ReinforcementLearningGuidance(guidance_scale=6.0)), aligned)

    # the same images as StableDiffusion3RLGPipeline: a constant scale, a window, a per-step schedule
    for guider_kwargs, pipeline_kwargs in [
        ({"rlg_scale": 1.6}, {"rlg_scale": 1.6}),
        ({"rlg_scale": 2.4, "start": 0.25, "stop": 0.75}, {"rlg_scale": 2.4, "rlg_start": 0.25, "rlg_stop": 0.75}),
        ({"rlg_scale": [2.0, 1.5, 1.0, 0.0]}, {"rlg_scale": [2.0, 1.5, 1.0, 0.0]}),
    ]:
        images = run_sd3(pipe, ReinforcementLearningGuidance(guidance_scale=6.0, **guider_kwargs))
        np.testing.assert_allclose(images, rlg_pipeline_sd3(components, **pipeline_kwargs), atol=ATOL)
    # the window falls back to the aligned model's CFG: the same as a schedule with w = 1 outside it
    window = run_sd3(pipe, ReinforcementLearningGuidance(guidance_scale=6.0, rlg_scale=2.4, start=0.25, stop=0.75))
    schedule = run_sd3(pipe, ReinforcementLearningGuidance(guidance_scale=6.0, rlg_scale=[1.0, 2.4, 2.4, 1.0]))
    np.testing.assert_allclose(window, schedule, atol=1e-6)


def test_sdxl_identities_and_equality_with_the_rlg_pipeline(sdxl):
    components, pipe = sdxl
    unet = components["unet"]
    aligned = run_sdxl(pipe, ClassifierFreeGuidance(guidance_scale=5.0))
    unet.disable_adapters()
    base = run_sdxl(pipe, ClassifierFreeGuidance(guidance_scale=5.0))
    unet.enable_adapters()
    assert np.abs(base - aligned).max() > 1e-2
    np.testing.assert_array_equal(
        run_sdxl(pipe, ReinforcementLearningGuidance(guidance_scale=5.0, rlg_scale=0.0)), base
    )
    np.testing.assert_array_equal(run_sdxl(pipe, ReinforcementLearningGuidance(guidance_scale=5.0)), aligned)

    reference = StableDiffusionXLRLGPipeline(**components, add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    for guider_kwargs, pipeline_kwargs in [
        ({"rlg_scale": 1.5, "guidance_rescale": 0.5}, {"rlg_scale": 1.5, "guidance_rescale": 0.5}),
        ({"rlg_scale": 2.0, "stop": 0.5}, {"rlg_scale": 2.0, "rlg_stop": 0.5}),
    ]:
        images = run_sdxl(pipe, ReinforcementLearningGuidance(guidance_scale=5.0, **guider_kwargs))
        expected = reference(
            PROMPT,
            num_inference_steps=STEPS,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
            guidance_scale=5.0,
            **pipeline_kwargs,
        ).images
        np.testing.assert_allclose(images, expected, atol=ATOL)


def test_cost_in_forward_passes(sd3):
    components, pipe = sd3
    calls = []
    handle = components["transformer"].register_forward_pre_hook(lambda *args: calls.append(1))
    guider = ReinforcementLearningGuidance(guidance_scale=6.0, rlg_scale=2.0, stop=0.5)
    run_sd3(pipe, guider)
    assert len(calls) == 4 + 4 + 2 + 2  # base and aligned with CFG inside the window, the aligned CFG after
    calls.clear()
    run_sd3(pipe, ReinforcementLearningGuidance(guidance_scale=1.0, rlg_scale=2.0))
    assert len(calls) == 2 * STEPS  # without CFG: one conditional pass per model
    handle.remove()
    assert guider.num_conditions == 2 and guider.get_state()["rlg_terms"] is None  # state after the last step


def test_adapter_mix_and_named_adapter(sd3):
    components = copy.copy(sd3[0])
    components["transformer"] = add_lora(copy.deepcopy(components["transformer"]), "other", seed=1)
    components["transformer"].set_adapters("default")
    pipe = modular(StableDiffusion3AutoBlocks(), components)

    scales = {"default": 0.7, "other": [0.5, 0.5, 1.0, 0.0]}
    mixed = run_sd3(pipe, ReinforcementLearningGuidance(guidance_scale=6.0, rlg_scale=scales))
    np.testing.assert_allclose(mixed, rlg_pipeline_sd3(components, rlg_scale=scales), atol=ATOL)
    same_scale = run_sd3(
        pipe, ReinforcementLearningGuidance(guidance_scale=6.0, rlg_scale=0.6, adapters=["default", "other"])
    )
    np.testing.assert_allclose(
        same_scale, rlg_pipeline_sd3(components, rlg_scale={"default": 0.6, "other": 0.6}), atol=ATOL
    )

    # a named adapter is the aligned model, whichever adapter is active
    other = run_sd3(pipe, ReinforcementLearningGuidance(guidance_scale=6.0, adapters="other"))
    components["transformer"].set_adapters("other")
    np.testing.assert_array_equal(other, run_sd3(pipe, ClassifierFreeGuidance(guidance_scale=6.0)))
    components["transformer"].set_adapters("default")


def test_config_round_trip_and_errors(sd3, tmp_path):
    guider = ReinforcementLearningGuidance(guidance_scale=4.5, rlg_scale=[2.0, 1.0], adapters="default", stop=0.5)
    guider.save_pretrained(str(tmp_path))
    loaded = ReinforcementLearningGuidance.from_pretrained(str(tmp_path))
    public = lambda config: {key: value for key, value in config.items() if not key.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(guider.config) and loaded.new(rlg_scale=1.6).rlg_scale == 1.6
    assert "rlg_terms" in repr(loaded)

    with pytest.raises(ValueError, match="must be a float"):
        ReinforcementLearningGuidance(rlg_scale="2")
    with pytest.raises(ValueError, match="not both"):
        ReinforcementLearningGuidance(rlg_scale={"a": 1.0}, adapters="a")
    with pytest.raises(ValueError, match="single aligned model"):
        ReinforcementLearningGuidance(rlg_scale={"a": 1.0, "b": 2.0}, stop=0.5)

    components, pipe = sd3
    with pytest.raises(ValueError, match="has 2 values, but the sampler runs 4 steps"):
        run_sd3(pipe, ReinforcementLearningGuidance(rlg_scale=[2.0, 1.0]))
    with pytest.raises(ValueError, match="Unknown LoRA adapter 'typo'"):
        run_sd3(pipe, ReinforcementLearningGuidance(rlg_scale={"typo": 1.5}))
    plain = modular(StableDiffusion3AutoBlocks(), tiny_sd3_components())
    with pytest.raises(ValueError, match="has none"):
        run_sd3(plain, ReinforcementLearningGuidance(rlg_scale=1.5))
    run_sd3(plain, ReinforcementLearningGuidance(rlg_scale=1.0))  # w = 1 is plain CFG: no adapter needed
    transformer = components["transformer"]
    transformer.disable_adapters()
    try:
        for guider in (
            ReinforcementLearningGuidance(rlg_scale=1.5),
            ReinforcementLearningGuidance(adapters="default"),
        ):
            with pytest.raises(ValueError, match="disabled"):
                run_sd3(pipe, guider)
    finally:
        transformer.enable_adapters()
    transformer.fuse_lora()
    try:
        with pytest.raises(ValueError, match="fused"):
            run_sd3(pipe, ReinforcementLearningGuidance(rlg_scale=1.5))
    finally:
        transformer.unfuse_lora()


def test_wan_modular_pipeline(monkeypatch):
    """Another modular pipeline with a `guider`: Wan 2.1 text-to-video, tiny components (as in diffusers' Wan tests)."""
    import diffusers.modular_pipelines.wan.encoders as wan_encoders
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from diffusers.modular_pipelines import WanBlocks
    from transformers import UMT5Config, UMT5EncoderModel

    from diffalign.testing import tiny_t5_tokenizer

    if not hasattr(wan_encoders, "ftfy"):  # the prompt cleaning needs ftfy, an optional dependency
        monkeypatch.setattr(wan_encoders, "basic_clean", lambda text: text.strip())
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    add_lora(transformer, std=0.3)
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = modular(
        WanBlocks(),
        dict(
            vae=vae,
            transformer=transformer,
            text_encoder=text_encoder,
            tokenizer=tiny_t5_tokenizer(),
            scheduler=scheduler,
        ),
    )

    def run(guider):
        pipe.update_components(guider=guider)
        torch.manual_seed(0)  # the Wan blocks draw the initial latents from the global generator
        return pipe(
            prompt=PROMPT,
            negative_prompt="",
            num_inference_steps=3,
            height=16,
            width=16,
            num_frames=5,
            max_sequence_length=16,
            output="latents",
        )

    aligned = run(ClassifierFreeGuidance(guidance_scale=5.0))
    transformer.disable_adapters()
    base = run(ClassifierFreeGuidance(guidance_scale=5.0))
    transformer.enable_adapters()
    assert (aligned - base).abs().max() > 1e-2
    torch.testing.assert_close(
        run(ReinforcementLearningGuidance(guidance_scale=5.0, rlg_scale=0.0)), base, atol=0, rtol=0
    )
    torch.testing.assert_close(run(ReinforcementLearningGuidance(guidance_scale=5.0)), aligned, atol=0, rtol=0)
    assert (run(ReinforcementLearningGuidance(guidance_scale=5.0, rlg_scale=1.5)) - aligned).abs().max() > 1e-3


def test_from_cfg_guider_takes_the_model_cfg():
    """The RLG guider around a model's own CFG guider: its scale, formulation and rescale inside each model."""
    guider = ReinforcementLearningGuidance.from_cfg_guider(
        ClassifierFreeGuidance(guidance_scale=3.0, guidance_rescale=0.2, use_original_formulation=True),
        rlg_scale=1.5, stop=0.5,
    )
    assert (guider.guidance_scale, guider.guidance_rescale, guider.use_original_formulation) == (3.0, 0.2, True)
    assert (guider.rlg_scale, guider._start, guider._stop) == (1.5, 0.0, 0.5)
    # a disabled CFG guider (the modular Z-Image's default) is no CFG inside each model
    for original, off in ((False, 1.0), (True, 0.0)):
        cfg = ClassifierFreeGuidance(guidance_scale=5.0, enabled=False, use_original_formulation=original)
        guider = ReinforcementLearningGuidance.from_cfg_guider(cfg, rlg_scale=2.0)
        assert guider.guidance_scale == off and not guider._is_cfg_enabled() and guider.num_conditions == 2

    from diffusers.guiders import AdaptiveProjectedGuidance

    with pytest.raises(ValueError, match="AdaptiveProjectedGuidance is another guidance method"):
        ReinforcementLearningGuidance.from_cfg_guider(AdaptiveProjectedGuidance())
    with pytest.raises(ValueError, match="window"):
        ReinforcementLearningGuidance.from_cfg_guider(ClassifierFreeGuidance(stop=0.5))


@pytest.fixture(scope="module")
def zimage():
    from diffusers.modular_pipelines import ZImageAutoBlocks

    from diffalign.families import ZImageFamily

    components = ZImageFamily.tiny_components()
    add_lora(components["transformer"], std=0.05)
    return components, modular(ZImageAutoBlocks(), components)


def test_zimage_modular_pipeline(zimage):
    """Z-Image's modular pipeline (its prompts of variable length, CFG `c + g (c - u)` as the CFG guider's original
    formulation): w = 0 and 1 bit for bit; the ZImagePipeline agrees to float rounding (it batches both CFG halves
    in one forward)."""
    from diffusers import ZImagePipeline

    from diffalign.guiders import ModularRLGPipeline

    components, pipe = zimage
    transformer = components["transformer"]
    kwargs = {"num_inference_steps": 2, "height": 16, "width": 16, "output_type": "pt"}
    prompts = ["a photo of a cat", "a red car"]

    def run(guider):
        pipe.update_components(guider=guider)
        generator = [torch.Generator().manual_seed(i) for i in range(2)]
        return pipe(prompt=list(prompts), generator=generator, output="images", **kwargs)

    def cfg():
        return ClassifierFreeGuidance(guidance_scale=4.0, use_original_formulation=True)

    aligned = run(cfg())
    transformer.disable_adapters()
    base = run(cfg())
    transformer.enable_adapters()
    assert (aligned - base).abs().max() > 1e-2
    rlg = lambda w: ReinforcementLearningGuidance.from_cfg_guider(cfg(), rlg_scale=w)  # noqa: E731
    torch.testing.assert_close(run(rlg(0.0)), base, atol=0, rtol=0)
    torch.testing.assert_close(run(rlg(1.0)), aligned, atol=0, rtol=0)
    extrapolated = run(rlg(1.5))
    assert (extrapolated - aligned).abs().max() > 1e-3

    # called like an RLG pipeline: the same images
    zimage_cfg = lambda g: ClassifierFreeGuidance(guidance_scale=g, use_original_formulation=True)  # noqa: E731
    wrapped = ModularRLGPipeline(pipe, zimage_cfg, default_guidance_scale=5.0)
    images = wrapped(prompts, guidance_scale=4.0, rlg_scale=1.5,
                     generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs).images
    torch.testing.assert_close(images, extrapolated, atol=0, rtol=0)
    assert prompts == ["a photo of a cat", "a red car"]  # the caller's list is not rewritten

    stock = ZImagePipeline(**components)
    stock.set_progress_bar_config(disable=True)
    expected = stock(list(prompts), guidance_scale=4.0, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                     **kwargs).images
    torch.testing.assert_close(aligned, expected, atol=1e-5, rtol=0)
