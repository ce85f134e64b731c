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
