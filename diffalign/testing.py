"""Tiny random Stable Diffusion components built from configs, for offline tests, demos and benchmarks.

Everything here is built locally (no hub): the tokenizer is CLIP's real BPE vocabulary shipped with
diffalign, the models are randomly initialised at a size that runs in milliseconds on a CPU. The
shapes follow SD1.x (4 latent channels, cross-attention UNet, KL autoencoder, CLIP text encoder), so
every code path that trains SD1.5 runs unchanged on them.
"""

import os
from typing import Optional

import torch

from .tokenization import BOS_TOKEN_ID, EOS_TOKEN_ID, VOCAB_SIZE, offline_clip_tokenizer


def tiny_clip_text_kwargs(**overrides) -> dict:
    """Keyword arguments of a tiny `CLIPTextConfig` with CLIP's real vocabulary and special tokens."""
    kwargs = dict(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=77,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID,
    )
    kwargs.update(overrides)
    return kwargs


def tiny_ddim_scheduler(**overrides):
    """A `DDIMScheduler` with Stable Diffusion 1.x's configuration (scaled-linear betas, steps_offset 1)."""
    from diffusers import DDIMScheduler

    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1)
    config.update(overrides)
    return DDIMScheduler(**config)


def tiny_unet(seed: int = 0, sample_size: int = 16, cross_attention_dim: int = 32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_sd_components(seed: int = 0, sample_size: int = 16, prediction_type: str = "epsilon") -> dict:
    """Returns the components of a tiny `StableDiffusionPipeline` (random weights, fixed seed).

    Args:
        seed (`int`, *optional*, defaults to 0):
            Seed of the random initialisation; the same seed gives the same weights.
        sample_size (`int`, *optional*, defaults to 16):
            Latent side length; images are twice as large (the tiny VAE downsamples by 2).
        prediction_type (`str`, *optional*, defaults to `"epsilon"`):
            `"epsilon"` or `"v_prediction"`, set on the scheduler.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = tiny_unet(seed, sample_size)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 2,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_clip_text_kwargs()))
    scheduler = tiny_ddim_scheduler(prediction_type=prediction_type)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": offline_clip_tokenizer(),
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
    }


def tiny_sd_pipeline(seed: int = 0, **kwargs):
    """A tiny `StableDiffusionPipeline` with random weights (see `tiny_sd_components`)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_sd_components(seed, **kwargs), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd_pipeline(directory: str, seed: int = 0, **kwargs) -> str:
    """Writes a tiny random pipeline in diffusers format (safetensors) to `directory` and returns it."""
    os.makedirs(directory, exist_ok=True)
    tiny_sd_pipeline(seed, **kwargs).save_pretrained(directory, safe_serialization=True)
    return directory


def perturbed_unet(unet, scale: float = 0.05, seed: Optional[int] = 1):
    """A copy of `unet` with every weight moved by Gaussian noise: a stand-in for a fine-tuned UNet."""
    import copy

    generator = torch.Generator().manual_seed(seed)
    aligned = copy.deepcopy(unet)
    with torch.no_grad():
        for param in aligned.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return aligned


def tiny_vae(seed: int = 0, sample_size: int = 32, **overrides):
    """A tiny 4-channel `AutoencoderKL` (vae_scale_factor 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kwargs = dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
    )
    kwargs.update(overrides)
    return AutoencoderKL(**kwargs)


def tiny_sdxl_components(seed: int = 0, sample_size: int = 16) -> dict:
    """Components of a tiny random `StableDiffusionXLPipeline`, after diffusers' own SDXL tests: two CLIP text
    encoders (the second with a projection: the pooled embedding), a UNet with the text-time embedding
    (`projection_class_embeddings_input_dim` = 6 time ids x 8 + the pooled size 32)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,  # both text encoders' hidden states, concatenated
        norm_num_groups=8,
    )
    vae = tiny_vae(seed, sample_size * 2)
    config = CLIPTextConfig(**tiny_clip_text_kwargs(projection_dim=32))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(config)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": offline_clip_tokenizer(),
        "tokenizer_2": offline_clip_tokenizer(),
        "scheduler": tiny_ddim_scheduler(),
        "image_encoder": None,
        "feature_extractor": None,
    }


# A small word-level vocabulary: enough for the tiny T5 to tokenize test prompts offline (unknown words map to <unk>).
_T5_WORDS = (
    "a an the of in on with and photo picture drawing painting cat dog bird horse digit number handwritten zero one "
    "two three four five six seven eight nine red blue green black white small large big car tree house"
).split()


def tiny_t5_tokenizer(model_max_length: int = 32):
    """A `T5TokenizerFast` built from a vocabulary list (no sentencepiece file, no hub): pad 0, eos 1, unk 2."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [("\u2581" + word, -1.0) for word in _T5_WORDS] + [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_t5_encoder(seed: int = 0, vocab_size: int = 128):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4))
    return model.eval()  # a model built from a config is in train mode: T5's dropout would make encodings random


def tiny_flow_scheduler(shift: float = 3.0, **overrides):
    """A `FlowMatchEulerDiscreteScheduler` as in SD3 (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift, **overrides)


def tiny_sd3_components(seed: int = 0, sample_size: int = 8, with_t5: bool = True) -> dict:
    """Components of a tiny random `StableDiffusion3Pipeline`: an MM-DiT transformer, two CLIP text encoders with
    projections, a tiny T5 (or none: the pipeline then feeds zeros), a flow-matching scheduler with shift 3."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    vae = tiny_vae(seed, sample_size * 2, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                   scaling_factor=1.5035)
    config = CLIPTextConfig(**tiny_clip_text_kwargs(projection_dim=32))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(config)
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "text_encoder_3": tiny_t5_encoder(seed) if with_t5 else None,
        "tokenizer": offline_clip_tokenizer(),
        "tokenizer_2": offline_clip_tokenizer(),
        "tokenizer_3": tiny_t5_tokenizer() if with_t5 else None,
        "scheduler": tiny_flow_scheduler(),
    }


def tiny_sdxl_pipeline(seed: int = 0, **kwargs):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed, **kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(seed: int = 0, **kwargs):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**tiny_sd3_components(seed, **kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_components(seed: int = 0, guidance_embeds: bool = True) -> dict:
    """Components of a tiny random `FluxPipeline`: a FLUX transformer with one double- and one single-stream block
    (16 input channels: the 4-channel latents packed 2x2), the embedded guidance of FLUX.1-dev (`guidance_embeds`;
    False is FLUX.1-schnell), a CLIP text encoder (its pooled output) and a tiny T5, a 4-channel VAE with FLUX's
    latent scaling and shift, and FLUX.1-dev's scheduler (dynamic shifting from the image sequence length)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    vae = tiny_vae(seed, 32, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                   scaling_factor=0.3611)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_clip_text_kwargs()))
    # FLUX.1-dev's scheduler_config.json
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": tiny_t5_encoder(seed),
        "tokenizer": offline_clip_tokenizer(),
        "tokenizer_2": tiny_t5_tokenizer(),
        "scheduler": scheduler,
    }


def tiny_flux_pipeline(seed: int = 0, **kwargs):
    """A tiny `FluxPipeline` with random weights (see `tiny_flux_components`). Its default image side is FluxPipeline's
    (`default_sample_size` 128 x `vae_scale_factor` 2 = 256 px); pass `height`/`width` (multiples of 4) for speed."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**tiny_flux_components(seed, **kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_PIPELINES = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "sd3": tiny_sd3_pipeline}
TINY_PIPELINES["flux"] = tiny_flux_pipeline


def save_tiny_pipeline(family: str, directory: str, seed: int = 0, **kwargs) -> str:
    """Writes a tiny random pipeline of `family` (`sd`, `sdxl`, `sd3`, `flux`) in diffusers format (safetensors)."""
    os.makedirs(directory, exist_ok=True)
    TINY_PIPELINES[family](seed, **kwargs).save_pretrained(directory, safe_serialization=True)
    return directory
