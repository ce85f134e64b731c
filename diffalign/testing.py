"""Tiny random diffusers pipelines built from configs, for offline tests, demos and benchmarks.

Each model family builds its own tiny components (`ModelFamily.tiny_components`, from the building blocks in
`diffalign.families.tiny`): the tokenizers are real vocabularies shipped with diffalign, the models are randomly
initialised at a size that runs in milliseconds on a CPU, with their family's shapes (latent channels, cross-attention
UNet or MM-DiT, KL autoencoder, CLIP and T5 text encoders), so every code path that trains the real model runs
unchanged on them. `save_tiny_pipeline(family, directory)` writes one for any registered family.
"""

from typing import Optional, Type, Union

import torch

from .families import FluxFamily, ModelFamily, StableDiffusion3Family, StableDiffusionFamily, StableDiffusionXLFamily
from .families import family_named
from .families.tiny import (  # noqa: F401  (re-exported: the building blocks of the tiny components)
    offline_clip_tokenizer,
    tiny_clip_text_kwargs,
    tiny_ddim_scheduler,
    tiny_flow_scheduler,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
    tiny_unet,
    tiny_vae,
)


def tiny_pipeline(family: Union[str, Type[ModelFamily]], seed: int = 0, **kwargs):
    """A tiny random pipeline of `family` (a short name such as `sdxl`, a pipeline class name or a family class);
    `kwargs` go to the family's `tiny_components`."""
    return family_named(family).tiny_pipeline(seed, **kwargs)


def save_tiny_pipeline(family: Union[str, Type[ModelFamily]], directory: str, seed: int = 0, **kwargs) -> str:
    """Writes a tiny random pipeline of `family` (`sd`, `sdxl`, `sd3`, `flux`, or any registered family) in diffusers
    format (safetensors) to `directory` and returns it."""
    return family_named(family).save_tiny(directory, seed, **kwargs)


def perturbed_unet(unet, scale: float = 0.05, seed: Optional[int] = 1):
    """A copy of `unet` with every weight moved by Gaussian noise: a stand-in for a fine-tuned UNet."""
    import copy

    generator = torch.Generator().manual_seed(seed)
    aligned = copy.deepcopy(unet)
    with torch.no_grad():
        for param in aligned.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return aligned


# The names these builders had before the families owned them (tests, scripts and benchmarks import them).
tiny_sd_components = StableDiffusionFamily.tiny_components
tiny_sdxl_components = StableDiffusionXLFamily.tiny_components
tiny_sd3_components = StableDiffusion3Family.tiny_components
tiny_flux_components = FluxFamily.tiny_components
tiny_sd_pipeline = StableDiffusionFamily.tiny_pipeline
tiny_sdxl_pipeline = StableDiffusionXLFamily.tiny_pipeline
tiny_sd3_pipeline = StableDiffusion3Family.tiny_pipeline
tiny_flux_pipeline = FluxFamily.tiny_pipeline


def save_tiny_sd_pipeline(directory: str, seed: int = 0, **kwargs) -> str:
    """Writes a tiny random `StableDiffusionPipeline` in diffusers format (safetensors) to `directory`."""
    return StableDiffusionFamily.save_tiny(directory, seed, **kwargs)


def shrink_qwenimage_edit_conditions(monkeypatch, factor: int = 256):
    """Makes Qwen-Image-Edit's condition images `factor` times fewer pixels (1024^2 -> 64^2 by default) in its
    pipelines, its modular blocks (the RLG route) and the `qwenimage_edit` families alike, through `monkeypatch`: all
    size them with the pipeline module's `calculate_dimensions(area, ratio)`, which is wrapped to divide the area. At
    1024^2 a tiny VAE encodes one image in minutes on a CPU (its attention over 256^2 latents)."""
    from diffusers.modular_pipelines.qwenimage import encoders
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

    # the modular blocks' resize steps import the function by name: patched in their module too
    for module in (pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus, encoders):
        original = module.calculate_dimensions
        monkeypatch.setattr(module, "calculate_dimensions",
                            lambda area, ratio, original=original: original(area // factor, ratio))
