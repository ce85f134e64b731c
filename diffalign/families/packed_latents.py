"""Latents packed 2x2 into tokens, as FLUX.1 (and Qwen-Image) feed them to their transformers.

A VAE latent `(B, C, H, W)` becomes a token sequence `(B, (H/2)(W/2), 4C)`: each token holds the `C` channels of
one 2x2 latent patch, row-major over the patch grid. The functions here are pure and give bit-identical results to
`FluxPipeline._pack_latents`, `_unpack_latents`, `_prepare_latent_image_ids` and the latent side rounding of
`prepare_latents` (the tests compare them), so a family that packs its latents uses them instead of a pipeline's
private methods.
"""

from typing import Tuple

import torch

PATCH = 2  # the side of the latent patch folded into one token


def packed_grid(height: int, width: int, vae_scale_factor: int) -> Tuple[int, int]:
    """The token grid `(rows, columns)` of an image of `height x width` pixels: the VAE's downsampling, then one
    token per 2x2 latent patch (the image side rounded down, as `FluxPipeline.prepare_latents` does)."""
    multiple = vae_scale_factor * PATCH
    return int(height) // multiple, int(width) // multiple


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """`(B, C, H, W)` latents (even `H`, `W`) to `(B, (H/2)(W/2), 4C)` tokens; the inverse of `unpack_latents`."""
    batch, channels, height, width = latents.shape
    latents = latents.view(batch, channels, height // PATCH, PATCH, width // PATCH, PATCH)
    latents = latents.permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(batch, (height // PATCH) * (width // PATCH), channels * PATCH * PATCH)


def unpack_latents(latents: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """`(B, rows * columns, 4C)` tokens of an image of `height x width` pixels back to `(B, C, 2 rows, 2 columns)`
    latents, the VAE's input."""
    batch, _, packed_channels = latents.shape
    rows, columns = packed_grid(height, width, vae_scale_factor)
    latents = latents.view(batch, rows, columns, packed_channels // (PATCH * PATCH), PATCH, PATCH)
    latents = latents.permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, packed_channels // (PATCH * PATCH), rows * PATCH, columns * PATCH)


def latent_image_ids(rows: int, columns: int, device, dtype: torch.dtype) -> torch.Tensor:
    """`(rows * columns, 3)` position ids of the tokens, row-major: `(0, row, column)`, as FLUX's rotary embedding
    reads them (the first axis is 0 for image tokens; text tokens are all zeros)."""
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(rows)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3).to(device=device, dtype=dtype)
