"""Model families: one module per diffusers pipeline class, each owning everything model-specific.

A family is chosen from the model directory's `model_index.json` (`_class_name`). To add one, write a
`ModelFamily` subclass in a new module (its facts, its methods and its tiny components) and list it in `FAMILIES`;
the registry refuses a family that lacks a fact (`ModelFamily.missing_facts`), and `generate`, `bench`, the model card,
`diffalign.testing` and the family tester (tests/test_family_common.py) read everything from it.
"""

import json
import os
from typing import Dict, Iterable, Optional, Type, Union

import torch

from ..errors import ModelError
from ..utils.hub_utils import resolve_model_path
from .base import Conditioning, ModelFamily, check_resolution_in
from .flux import FluxFamily
from .flux2 import Flux2Family, Flux2KleinFamily
from .flux_kontext import FluxKontextFamily
from .krea2 import Krea2Family
from .qwenimage import QwenImageFamily
from .qwenimage21 import QwenImage21Family
from .qwenimage_edit import QwenImageEditFamily, QwenImageEditPlusFamily
from .sana import SanaFamily
from .sd import StableDiffusionFamily
from .sd3 import StableDiffusion3Family
from .sdxl import StableDiffusionXLFamily
from .wan import WanFamily
from .wan_i2v import WanImageToVideoFamily
from .wan_v2v import WanVideoToVideoFamily
from .zimage import ZImageFamily


def registry(families: Iterable[Type[ModelFamily]]) -> Dict[str, Type[ModelFamily]]:
    """`{pipeline_class: family}`; a `TypeError` naming the family and what it lacks when a family misses a fact the
    shared code needs, or repeats another's name or pipeline class."""
    table: Dict[str, Type[ModelFamily]] = {}
    names = set()
    for family in families:
        missing = family.missing_facts()
        if missing:
            raise TypeError(f"model family {family.__name__} lacks {', '.join(missing)}")
        if family.pipeline_class in table or family.name in names:
            raise TypeError(f"model family {family.__name__} repeats the name or pipeline class of another")
        table[family.pipeline_class] = family
        names.add(family.name)
    return table


FAMILIES: Dict[str, Type[ModelFamily]] = registry(
    (StableDiffusionFamily, StableDiffusionXLFamily, StableDiffusion3Family, FluxFamily, ZImageFamily,
     QwenImageFamily, Flux2KleinFamily, Flux2Family, SanaFamily, FluxKontextFamily, Krea2Family,
     QwenImageEditFamily, QwenImageEditPlusFamily, WanFamily, QwenImage21Family, WanImageToVideoFamily,
     WanVideoToVideoFamily)
)


def family_class(pipeline_class: str, rlg: bool = False) -> Type[ModelFamily]:
    """The family of a diffusers pipeline class name (with `rlg=True` also of its RLG pipeline's class name, as a
    directory saved from an RLG pipeline names); a `ModelError` naming the supported ones otherwise."""
    if pipeline_class in FAMILIES:
        return FAMILIES[pipeline_class]
    if rlg:
        for family in FAMILIES.values():
            if family.rlg_pipeline_class == pipeline_class:
                return family
    raise ModelError(f"unsupported model: pipeline class '{pipeline_class}'; diffalign trains {', '.join(FAMILIES)}")


def family_named(name: Union[str, Type[ModelFamily]]) -> Type[ModelFamily]:
    """The family of a short name (`sd`, `sdxl`, `sd3`, `flux`) or a pipeline class name (a family class is returned
    as it is); a `ModelError` naming the known ones otherwise."""
    if isinstance(name, type) and issubclass(name, ModelFamily):
        return name
    for family in FAMILIES.values():
        if name in (family.name, family.pipeline_class):
            return family
    raise ModelError(f"unknown model family '{name}'; known: {', '.join(f.name for f in FAMILIES.values())}")


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


def check_model_resolution(name_or_path: str, resolution: Optional[int]):
    """Checks `resolution` against the limits of the model at `name_or_path` from its config files, before any
    weights load: a one-line `ModelError` naming the sizes it can sample. A hub id (not local) is checked once
    loaded (`ModelFamily.check_resolution`)."""
    if resolution is None:
        return
    path = resolve_model_path(name_or_path)
    if not os.path.isdir(path):
        return
    cls = family_class(pipeline_class_of(path))

    def config_of(folder: str) -> dict:
        try:
            with open(os.path.join(path, folder, "config.json")) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise ModelError(f"model '{name_or_path}': {folder}/config.json is unreadable ({type(e).__name__})"
                             ) from None

    try:
        vae = config_of("vae")
        if "scale_factor_spatial" in vae:  # Wan's video VAEs (16 for Wan 2.2 TI2V-5B's), as WanPipeline reads it
            vae_scale_factor = vae["scale_factor_spatial"]
        elif "temperal_downsample" in vae:  # a video VAE (Qwen-Image's): one halving per entry, as its pipeline counts
            vae_scale_factor = 2 ** len(vae["temperal_downsample"])
        else:
            vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        limits = cls.resolution_limits(config_of(cls.denoiser_name), vae_scale_factor)
    except (KeyError, TypeError):
        return  # an unusual config: the family checks the loaded model instead
    check_resolution_in(resolution, *limits, f"model '{name_or_path}' ({cls.name})")


def family_for_pipeline(pipe) -> ModelFamily:
    """The family of a loaded pipeline (also of its subclasses and of its RLG pipeline)."""
    rlg_pipelines = {family.rlg_pipeline_class: family for family in FAMILIES.values() if family.rlg_pipeline_class}
    for cls in type(pipe).__mro__:
        family = FAMILIES.get(cls.__name__) or rlg_pipelines.get(cls.__name__)
        if family is not None:
            return family(pipe)
    raise ModelError(f"unsupported model: pipeline class '{type(pipe).__name__}'; diffalign trains "
                     f"{', '.join(FAMILIES)}")


def load_family(name_or_path: str, torch_dtype: torch.dtype = torch.float32, resolved: bool = False,
                quantize_denoiser: str = "none", quantize_text_encoders: str = "none") -> ModelFamily:
    """Loads the model at `name_or_path` (a directory or a bundled name) with its family; `resolved=True`: a path
    `resolve_model_path` returned (`TrainConfig.resolved_model`), not resolved (nor the hub asked) again.
    `quantize_denoiser`, `quantize_text_encoders`: a method of `diffalign.quantization` the denoiser or the text
    encoders are quantized with as they load (a frozen base under a LoRA)."""
    path = name_or_path if resolved else resolve_model_path(name_or_path)
    if os.path.isdir(path):
        cls = family_class(pipeline_class_of(path))
    else:  # a hub id (hub reachable): ask diffusers what it is
        from diffusers import DiffusionPipeline

        cls = family_class(DiffusionPipeline.load_config(path)["_class_name"])
    quantization = None
    if quantize_denoiser != "none" or quantize_text_encoders != "none":
        from ..quantization import pipeline_quantization_config

        quantization = pipeline_quantization_config(cls.denoiser_name, cls.text_encoder_names, quantize_denoiser,
                                                    quantize_text_encoders, compute_dtype=torch_dtype)
    return cls(cls.load(path, torch_dtype, quantization_config=quantization))


def load_pipeline(name_or_path: str, torch_dtype: torch.dtype = torch.float32):
    """Loads a supported pipeline (SD, SDXL, SD3, FLUX; safetensors only) with its family's sampling scheduler."""
    return load_family(name_or_path, torch_dtype).pipe


__all__ = ["FAMILIES", "Conditioning", "Flux2Family", "Flux2KleinFamily", "FluxFamily", "FluxKontextFamily",
           "Krea2Family", "ModelFamily", "QwenImage21Family", "QwenImageEditFamily", "QwenImageEditPlusFamily", "QwenImageFamily",
           "SanaFamily", "StableDiffusion3Family", "StableDiffusionFamily", "StableDiffusionXLFamily", "WanFamily",
           "WanImageToVideoFamily", "WanVideoToVideoFamily", "ZImageFamily", "check_model_resolution",
           "family_class", "family_for_pipeline",
           "family_named", "load_family", "load_pipeline", "pipeline_class_of", "registry"]
