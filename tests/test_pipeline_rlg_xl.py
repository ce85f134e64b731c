"""StableDiffusionXLRLGPipeline on tiny SDXL components: identities against StableDiffusionXLPipeline."""

import copy
import os

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffalign.pipelines import StableDiffusionXLRLGPipeline
from diffalign.testing import perturbed_unet
from diffalign.tokenization import offline_clip_tokenizer

PIPELINE_FILE = os.path.join(os.path.dirname(__file__), "..", "pipelines", "pipeline_stable_diffusion_xl_rlg.py")
PROMPT = "a photo of a cat"
ATOL = 1e-4


def tiny_sdxl_components(seed=0):
    """Tiny random SDXL components, after diffusers' own SDXL tests (two CLIP text encoders, text-time embedding)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + pooled text embedding (32)
        cross_attention_dim=64,  # both text encoders' hidden states, concatenated
        norm_num_groups=8,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    from diffalign.testing import tiny_clip_text_kwargs, tiny_ddim_scheduler

    config = CLIPTextConfig(**tiny_clip_text_kwargs(projection_dim=32))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(config)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    scheduler = tiny_ddim_scheduler()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": offline_clip_tokenizer(),
        "tokenizer_2": offline_clip_tokenizer(),
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }


def add_lora(unet, seed=0, std=0.1):
    config = LoraConfig(
        r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    unet.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(std * torch.randn(param.shape, generator=generator))
    return unet


def xl(cls, components, **kwargs):
    pipe = cls(**components, **kwargs, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kwargs):
    kwargs = {
        "num_inference_steps": 2,
        "output_type": "np",
        "generator": torch.Generator("cpu").manual_seed(0),
        **kwargs,
    }
    return pipe(PROMPT, **kwargs).images


@pytest.fixture(scope="module")
def components():
    return tiny_sdxl_components()


def test_full_weight_identities(components):
    aligned = perturbed_unet(components["unet"])
    pipe = xl(StableDiffusionXLRLGPipeline, components, aligned_unet=aligned)
    base = run(xl(StableDiffusionXLPipeline, components))
    aligned_images = run(xl(StableDiffusionXLPipeline, {**components, "unet": aligned}))
    assert np.abs(base - aligned_images).max() > 1e-2
    np.testing.assert_allclose(run(pipe, rlg_scale=0.0), base, atol=ATOL)
    np.testing.assert_allclose(run(pipe, rlg_scale=1.0), aligned_images, atol=ATOL)
    # guidance happens inside each model, so w = 0.5 lies between, not on either
    half = run(pipe, rlg_scale=0.5)
    assert np.abs(half - base).max() > 1e-3 and np.abs(half - aligned_images).max() > 1e-3


def test_lora_single_pass_two_pass_and_user_path(components, tmp_path):
    lora_components = {**components, "unet": add_lora(copy.deepcopy(components["unet"]))}
    pipe = xl(StableDiffusionXLRLGPipeline, lora_components)

    base = run(xl(StableDiffusionXLPipeline, components))
    np.testing.assert_allclose(run(pipe, rlg_scale=0.0), base, atol=ATOL)
    fused = xl(StableDiffusionXLPipeline, {**lora_components, "unet": copy.deepcopy(lora_components["unet"])})
    fused.fuse_lora()
    np.testing.assert_allclose(run(pipe, rlg_scale=1.0), run(fused), atol=ATOL)

    rows = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    single = run(pipe, rlg_scale=1.5, output_type="latent")
    double = run(pipe, rlg_scale=1.5, output_type="latent", rlg_single_pass=False)
    handle.remove()
    assert rows == [4, 4] + [2, 2, 2, 2]
    torch.testing.assert_close(single, double, atol=ATOL, rtol=0)

    from diffusers.utils import convert_state_dict_to_diffusers

    StableDiffusionXLPipeline.save_lora_weights(
        str(tmp_path),
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(lora_components["unet"])),
    )
    loaded = xl(StableDiffusionXLRLGPipeline, {**components, "unet": copy.deepcopy(components["unet"])})
    with pytest.raises(ValueError, match="needs an aligned model"):
        run(loaded, rlg_scale=1.5)
    loaded.load_lora_weights(str(tmp_path), adapter_name="reward")
    torch.testing.assert_close(run(loaded, rlg_scale=1.5, output_type="latent"), single, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="Unknown LoRA adapter"):
        run(loaded, rlg_scale={"typo": 1.0})
    with pytest.raises(ValueError, match="has 3 values, but the sampler runs 2 steps"):
        run(loaded, rlg_scale=[1.0, 1.0, 1.0])


def test_custom_pipeline_loading(components, tmp_path):
    xl(StableDiffusionXLPipeline, components).save_pretrained(str(tmp_path), safe_serialization=True)
    pipe = DiffusionPipeline.from_pretrained(
        str(tmp_path), custom_pipeline=os.path.abspath(PIPELINE_FILE), trust_remote_code=True
    )
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "StableDiffusionXLRLGPipeline" and pipe.aligned_unet is None
    assert run(pipe).shape == (1, 32, 32, 3)


def test_text_encoder_lora_fused_at_default_scale(components, tmp_path):
    """Regression: with a LoRA on the UNet and both text encoders, fused, the default `rlg_scale=1` runs like
    diffusers' pipeline (no per-row adapters in the text encoders, each run once); `rlg_scale != 1` raises one clear
    error; unfused, `w = 0` and `w = 1` match diffusers and the base prompt is encoded only once a step needs it."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import inject_adapter_in_model

    unet = add_lora(copy.deepcopy(components["unet"]))
    text_encoders = [copy.deepcopy(components["text_encoder"]), copy.deepcopy(components["text_encoder_2"])]
    for seed, text_encoder in enumerate(text_encoders):
        inject_adapter_in_model(
            LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["q_proj", "v_proj"]),
            text_encoder,
        )
        with torch.no_grad():
            for name, param in text_encoder.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    state = [convert_state_dict_to_diffusers(get_peft_model_state_dict(model)) for model in [unet] + text_encoders]
    StableDiffusionXLPipeline.save_lora_weights(
        str(tmp_path),
        unet_lora_layers=state[0],
        text_encoder_lora_layers=state[1],
        text_encoder_2_lora_layers=state[2],
    )

    def loaded(cls, fuse=False):
        pipe = xl(cls, copy.deepcopy(components))
        pipe.load_lora_weights(str(tmp_path))
        if fuse:
            pipe.fuse_lora()
        return pipe

    def text_encoder_calls(pipe, **kwargs):
        calls = []
        handles = [
            m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in (pipe.text_encoder, pipe.text_encoder_2)
        ]
        images = run(pipe, **kwargs)
        for handle in handles:
            handle.remove()
        return images, len(calls)

    expected, expected_calls = text_encoder_calls(loaded(StableDiffusionXLPipeline, fuse=True))
    pipe = loaded(StableDiffusionXLRLGPipeline, fuse=True)
    images, calls = text_encoder_calls(pipe)
    np.testing.assert_allclose(images, expected, atol=ATOL)
    assert calls == expected_calls == 2  # each encoder once (empty negative prompt: zeros)
    with pytest.raises(ValueError, match=r"fused into `unet`, `text_encoder`, `text_encoder_2`"):
        run(pipe, rlg_scale=0.5)

    pipe = loaded(StableDiffusionXLRLGPipeline)
    aligned, calls = text_encoder_calls(pipe)
    assert calls == 2
    np.testing.assert_allclose(aligned, run(loaded(StableDiffusionXLPipeline)), atol=ATOL)
    base, calls = text_encoder_calls(pipe, rlg_scale=0.0)
    assert calls == 4  # the aligned prompt (as configured) and the base prompt
    np.testing.assert_allclose(base, run(xl(StableDiffusionXLPipeline, components)), atol=ATOL)
    assert np.abs(base - aligned).max() > 1e-2

    def callback(pipeline, step, timestep, callback_kwargs):
        pipeline._rlg_scale = 1.5  # from the next step on: the base prompt is encoded then
        return callback_kwargs

    switched = run(pipe, output_type="latent", callback_on_step_end=callback)
    torch.testing.assert_close(switched, run(pipe, output_type="latent", rlg_scale=[1.0, 1.5]), atol=ATOL, rtol=0)
