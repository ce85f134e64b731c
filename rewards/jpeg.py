"""JPEG (in)compressibility, as defined by DDPO (Black et al., 2023): image size in kB at quality 95."""

import io
from typing import List, Optional

import numpy as np
import torch
from PIL import Image

from . import register_reward


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """`[B, 3, H, W]` floats in [0, 1] -> `[B, H, W, 3]` uint8, rounding like `diffusers`' `numpy_to_pil`."""
    images = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return (images * 255).round().astype(np.uint8)


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB (1000 bytes) of each image saved as a JPEG of the given quality; float32 `[B]` on the CPU."""
    sizes = []
    for array in to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegSizeReward:
    """Scores images by their JPEG size in kB, `sign * size`.

    Args:
        quality (`int`, *optional*, defaults to 95):
            JPEG quality used to encode the images.
        sign (`float`, *optional*, defaults to 1.0):
            `-1.0` rewards small files (compressibility), `1.0` large files (incompressibility).
    """

    def __init__(self, quality: int = 95, sign: float = 1.0):
        self.quality = quality
        self.sign = sign

    def __call__(
        self, images: torch.Tensor, prompts: Optional[List[str]] = None, metadata: Optional[List[dict]] = None
    ) -> torch.Tensor:
        return self.sign * jpeg_size_kb(images, self.quality)

    def __repr__(self) -> str:
        return f"JpegSizeReward(quality={self.quality}, sign={self.sign:+g})"


@register_reward("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95) -> JpegSizeReward:
    """Negated JPEG size in kB: smaller files score higher."""
    return JpegSizeReward(quality, sign=-1.0)


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95) -> JpegSizeReward:
    """JPEG size in kB: larger files score higher."""
    return JpegSizeReward(quality, sign=1.0)
