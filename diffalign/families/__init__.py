"""Model families: one module per diffusers pipeline class, each owning everything model-specific.

A family is chosen from the model directory's `model_index.json` (`_class_name`). To add one, write a
`ModelFamily` subclass in a new module and list it in `FAMILIES`.
"""

import json
import os
from typing import Dict, Type

import torch

from ..errors import ModelError
from ..utils.hub_utils import resolve_model_path
from .base import Conditioning, ModelFamily
from .flux import FluxFamily
from .sd import StableDiffusionFamily
from .sd3 import StableDiffusion3Family
from .sdxl import StableDiffusionXLFamily

FAMILIES: Dict[str, Type[ModelFamily]] = {
    family.pipeline_class: family
    for family in (StableDiffusionFamily, StableDiffusionXLFamily, StableDiffusion3Family, FluxFamily)
}


def family_class(pipeline_class: str) -> Type[ModelFamily]:
    """The family of a diffusers pipeline class name; a `ModelError` naming the supported ones otherwise."""
    if pipeline_class not in FAMILIES:
        raise ModelError(
            f"unsupported model: pipeline class '{pipeline_class}'; diffalign trains {', '.join(FAMILIES)}"
        )
    return FAMILIES[pipeline_class]


def pipeline_class_of(path: str) -> str:
    """`_class_name` of a local model directory's `model_index.json`."""
    index = os.path.join(path, "model_index.json")
    try:
        with open(index) as f:
            name = json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"'{index}' is not a readable diffusers model index ({type(e).__name__})") from None
    if not isinstance(name, str):
        raise ModelError(f"'{index}' names no pipeline class (_class_name)")
    return name


def family_for_pipeline(pipe) -> ModelFamily:
    """The family of a loaded pipeline (also of subclasses, e.g. the RLG pipelines)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__](pipe)
    raise ModelError(f"unsupported model: pipeline class '{type(pipe).__name__}'; diffalign trains "
                     f"{', '.join(FAMILIES)}")


def load_family(name_or_path: str, torch_dtype: torch.dtype = torch.float32) -> ModelFamily:
    """Loads the model at `name_or_path` (a directory or a bundled name) with its family."""
    path = resolve_model_path(name_or_path)
    if os.path.isdir(path):
        cls = family_class(pipeline_class_of(path))
    else:  # a hub id (hub reachable): ask diffusers what it is
        from diffusers import DiffusionPipeline

        cls = family_class(DiffusionPipeline.load_config(path)["_class_name"])
    return cls(cls.load(path, torch_dtype))


def load_pipeline(name_or_path: str, torch_dtype: torch.dtype = torch.float32):
    """Loads a supported pipeline (SD, SDXL, SD3, FLUX; safetensors only) with its family's sampling scheduler."""
    return load_family(name_or_path, torch_dtype).pipe


__all__ = ["FAMILIES", "Conditioning", "FluxFamily", "ModelFamily", "StableDiffusion3Family", "StableDiffusionFamily",
           "StableDiffusionXLFamily", "family_class", "family_for_pipeline", "load_family", "load_pipeline",
           "pipeline_class_of"]
