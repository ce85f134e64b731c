"""JPEG (in)compressibility, as defined by DDPO (Black et al., 2023): image size in kB at quality 95."""

import io

import numpy as np
import torch
from PIL import Image

from . import register_reward


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """`[B, 3, H, W]` floats in [0, 1] -> `[B, H, W, 3]` uint8, rounding like `diffusers`' `numpy_to_pil`."""
    images = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return (images * 255).round().astype(np.uint8)


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    sizes = []
    for array in to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


@register_reward("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95):
    """Negated JPEG size in kB: smaller files score higher."""
    return lambda images, prompts=None, metadata=None: -jpeg_size_kb(images, quality)


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95):
    """JPEG size in kB: larger files score higher."""
    return lambda images, prompts=None, metadata=None: jpeg_size_kb(images, quality)
