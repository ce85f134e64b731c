"""`diffalign.families.packed_latents` gives bit-identical results to FluxPipeline's private packing code, and the
FLUX family's latents (drawn, packed, unpacked, their position ids) equal the pipeline's."""

import pytest
import torch
from diffusers import FluxPipeline

from diffalign.families import FluxFamily, family_for_pipeline
from diffalign.families.packed_latents import latent_image_ids, pack_latents, packed_grid, unpack_latents


@pytest.mark.parametrize("height, width, vae_scale_factor", [(16, 16, 2), (16, 24, 2), (18, 30, 2), (1024, 768, 8)])
def test_packing_equals_flux_pipeline(height, width, vae_scale_factor):
    rows, columns = packed_grid(height, width, vae_scale_factor)
    assert (rows, columns) == (height // (2 * vae_scale_factor), width // (2 * vae_scale_factor))
    latents = torch.randn(2, 4, 2 * rows, 2 * columns, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    assert packed.shape == (2, rows * columns, 16)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 2 * rows, 2 * columns))
    unpacked = unpack_latents(packed, height, width, vae_scale_factor)
    assert torch.equal(unpacked, FluxPipeline._unpack_latents(packed, height, width, vae_scale_factor))
    assert torch.equal(unpacked, latents)  # the inverse
    ids = latent_image_ids(rows, columns, "cpu", torch.bfloat16)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, rows, columns, "cpu", torch.bfloat16))
    assert ids.dtype == torch.bfloat16 and ids[columns + 1].tolist() == [0, 1, 1]


def test_flux_family_latents_equal_the_pipeline():
    pipe = FluxFamily.tiny_pipeline()
    family = family_for_pipeline(pipe)
    for height, width in ((16, 16), (16, 24)):
        ours = family.prepare_latents(3, height, width, torch.float32, "cpu", torch.Generator().manual_seed(5))
        stock, _ = pipe.prepare_latents(3, 4, height, width, torch.float32, torch.device("cpu"),
                                        torch.Generator().manual_seed(5))
        assert torch.equal(ours, stock)
        given = torch.randn_like(stock, dtype=torch.float64)
        assert torch.equal(family.prepare_latents(3, height, width, torch.float32, "cpu", None, latents=given),
                           given.float())
