"""Guided diffusers pipelines. Each module is a self-contained diffusers pipeline file that also loads with
`DiffusionPipeline.from_pretrained(..., custom_pipeline=<file>, trust_remote_code=True)` (the classes loaded that way
are distinct objects from the ones imported here).
"""

import importlib
from typing import TYPE_CHECKING

_PIPELINES = {
    "StableDiffusionRLGPipeline": "pipeline_stable_diffusion_rlg",
    "StableDiffusionXLRLGPipeline": "pipeline_stable_diffusion_xl_rlg",
    "StableDiffusion3RLGPipeline": "pipeline_stable_diffusion_3_rlg",
    "FluxRLGPipeline": "pipeline_flux_rlg",
    "FluxKontextRLGPipeline": "pipeline_flux_kontext_rlg",
    "Flux2RLGPipeline": "pipeline_flux2_rlg",
    "SanaRLGPipeline": "pipeline_sana_rlg",
    "WanRLGPipeline": "pipeline_wan_rlg",
    "WanImageToVideoRLGPipeline": "pipeline_wan_i2v_rlg",
    "WanVideoToVideoRLGPipeline": "pipeline_wan_v2v_rlg",
}

__all__ = [
    "Flux2RLGPipeline", "FluxKontextRLGPipeline", "FluxRLGPipeline", "SanaRLGPipeline", "StableDiffusion3RLGPipeline",
    "StableDiffusionRLGPipeline", "StableDiffusionXLRLGPipeline", "WanImageToVideoRLGPipeline", "WanRLGPipeline",
    "WanVideoToVideoRLGPipeline",
]

if TYPE_CHECKING:
    from .pipeline_flux2_rlg import Flux2RLGPipeline
    from .pipeline_flux_kontext_rlg import FluxKontextRLGPipeline
    from .pipeline_flux_rlg import FluxRLGPipeline
    from .pipeline_sana_rlg import SanaRLGPipeline
    from .pipeline_stable_diffusion_3_rlg import StableDiffusion3RLGPipeline
    from .pipeline_stable_diffusion_rlg import StableDiffusionRLGPipeline
    from .pipeline_stable_diffusion_xl_rlg import StableDiffusionXLRLGPipeline
    from .pipeline_wan_i2v_rlg import WanImageToVideoRLGPipeline
    from .pipeline_wan_rlg import WanRLGPipeline
    from .pipeline_wan_v2v_rlg import WanVideoToVideoRLGPipeline


def __getattr__(name):
    # imported on first use: `import diffalign.pipelines` does not import diffusers
    if name in _PIPELINES:
        module = importlib.import_module(f"{__name__}.{_PIPELINES[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
