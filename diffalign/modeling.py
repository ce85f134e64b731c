"""Loading models by path or short name, LoRA adapters, and their diffusers-format weight files."""

import os
from importlib import resources
from typing import List, Optional

import torch
from safetensors import SafetensorError

from .errors import UserError

BUNDLED_MODELS = {"digits": "models/digits", "digits-flow": "models/digits-flow"}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class ModelError(UserError, ValueError):
    """A model or weights location that cannot be used (reported as one line by the CLI)."""


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_model_path(name_or_path: str) -> str:
    """A local diffusers model directory for `name_or_path`: a bundled short name (`digits`) or a directory.

    A hub id is passed through only when the hub is reachable (`HF_HUB_OFFLINE` unset); offline it is an error
    naming what to download.
    """
    if name_or_path in BUNDLED_MODELS:
        path = resources.files("diffalign").joinpath(BUNDLED_MODELS[name_or_path])
        if not path.joinpath("model_index.json").is_file():
            raise ModelError(f"bundled model '{name_or_path}' is missing from this installation ({path})")
        return str(path)
    if os.path.exists(name_or_path) and not os.path.isdir(name_or_path):
        kind = "a file" if os.path.isfile(name_or_path) else "not a directory"
        raise ModelError(f"model '{name_or_path}' is {kind}: give a diffusers model directory (with model_index.json)"
                         f" or a bundled name ({', '.join(BUNDLED_MODELS)})")
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "model_index.json")):
            raise ModelError(f"model directory '{name_or_path}' has no model_index.json (not a diffusers pipeline)")
        return name_or_path
    looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/"))
    if looks_like_hub_id and not _hub_offline():
        check_hub_model(name_or_path)
        return name_or_path
    if looks_like_hub_id:
        raise ModelError(
            f"model '{name_or_path}' is not a local directory and the hub is offline (HF_HUB_OFFLINE=1): "
            f"download it where the hub is reachable (`hf download {name_or_path} --local-dir DIR`) and pass DIR"
        )
    raise ModelError(f"model directory '{name_or_path}' does not exist")


def apply_torch_threads(model: str, num_threads: Optional[int] = None, device=None) -> Optional[int]:
    """Sets torch's CPU threads for a command that runs `model` (train, generate, bench, the Python API) and returns
    the number set (None: torch's own setting kept).

    `num_threads` (>= 1) is used as given. By default the bundled models (digits, digits-flow) on a CPU run on one
    thread: their small convolutions are fastest on one thread when the cores are shared (a 39-minute RLG sweep took
    44 s), and one thread makes runs bit-reproducible on a machine whatever its core count. Other models, and any
    model on a GPU, keep torch's setting. `device`: the command's device (default: cuda when available).
    """
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                    or num_threads < 1):
        raise ModelError(f"num_threads must be a whole number >= 1; got {num_threads!r}")
    threads = num_threads
    on_cpu = torch.device(device).type == "cpu" if device is not None else not torch.cuda.is_available()
    if threads is None and model in BUNDLED_MODELS and on_cpu:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    return threads


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def hub_unreachable_reason(timeout: float = 5.0) -> Optional[str]:
    """Why the Hugging Face Hub cannot be reached (offline mode, or one failed connection to its endpoint), or None.
    One attempt: the hub client would retry a dead network for ~25 s per file before failing with a traceback."""
    import socket
    from urllib.parse import urlparse

    if _hub_offline():
        return "HF_HUB_OFFLINE=1"
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError as e:
        return f"{constants.ENDPOINT} cannot be reached: {_first_line(e)}"
    return None


def check_hub_model(repo_id: str):
    """Checks that the hub answers and has `repo_id`'s `model_index.json` (fetched into the cache), so a machine
    without a hub gets one line at once instead of the hub client's retries and a loader traceback."""
    from huggingface_hub import hf_hub_download

    download = f"download it where the hub is reachable (`hf download {repo_id} --local-dir DIR`) and pass DIR"
    reason = hub_unreachable_reason()
    if reason:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str):
            return  # downloaded before: the loaders fall back to the cache
        raise ModelError(f"model '{repo_id}' is not a local directory and the Hugging Face Hub {reason}: {download}")
    try:
        hf_hub_download(repo_id, "model_index.json")
    except Exception as e:  # unknown repo, gated model, no model_index.json, network failure
        raise ModelError(f"model '{repo_id}' could not be fetched from the Hugging Face Hub ({_first_line(e)}): check "
                         f"the id and access, or {download}") from None


def load_pipeline(name_or_path: str, torch_dtype: torch.dtype = torch.float32):
    """Loads a supported pipeline (SD, SDXL, SD3; safetensors only) with its family's sampling scheduler."""
    from .families import load_family

    return load_family(name_or_path, torch_dtype).pipe


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """`from_pretrained`'s dtype argument: `dtype` from diffusers 0.42 on (`torch_dtype` is deprecated there)."""
    import diffusers
    from packaging import version

    name = "dtype" if version.parse(diffusers.__version__) >= version.parse("0.42") else "torch_dtype"
    return {name: dtype}


def add_lora(unet, rank: int = 4, alpha: float = 4.0, target_modules: Optional[List[str]] = None, adapter_name="default"):
    """Freezes the denoiser (UNet or transformer) and adds a trainable peft LoRA adapter (Gaussian A, zero B: starts
    at the base model). `target_modules` defaults to the attention projections of SD's UNet."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha,
            init_lora_weights="gaussian",
            target_modules=target_modules or ["to_q", "to_k", "to_v", "to_out.0"],
        ),
        adapter_name=adapter_name,
    )
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # trainable LoRA weights stay fp32 under mixed precision
    return unet


def lora_state_dict(unet) -> dict:
    """The UNet's LoRA weights in diffusers' key format (what `pipe.load_lora_weights` expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet, directory: str):
    """Writes an SD1.x/2.x UNet's LoRA so `StableDiffusionPipeline.load_lora_weights(directory)` loads it (other
    families: `ModelFamily.save_lora`)."""
    from .families import StableDiffusionFamily

    StableDiffusionFamily.save_lora(StableDiffusionFamily(None), unet, directory)


def check_lora_file(weight_file: str):
    """A one-line `ModelError` unless `weight_file` is a readable safetensors file holding LoRA weights: garbage or
    a cut file is "not a LoRA", told apart from a LoRA that does not fit the model."""
    from safetensors import safe_open

    try:
        with safe_open(weight_file, framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors' own error type, or an OSError: a header that is not safetensors
        raise ModelError(f"'{weight_file}' is not a LoRA: not a readable safetensors file ({_first_line(e)[:200]})"
                         ) from None
    if not any("lora" in key.lower() for key in keys):
        raise ModelError(f"'{weight_file}' is not a LoRA: none of its {len(keys)} tensors is a LoRA weight")


def load_lora_into_pipeline(pipe, directory: str, adapter_name: str = "default", denoiser_name: str = "unet"):
    """`pipe.load_lora_weights` with one clear error when the directory or its weights are missing, unreadable or do
    not fit the model (`denoiser_name`: the pipeline attribute the LoRA must target, `unet` or `transformer`)."""
    weight_file = os.path.join(directory, LORA_WEIGHT_NAME)
    if not os.path.isfile(weight_file):
        raise ModelError(f"LoRA directory '{directory}' has no {LORA_WEIGHT_NAME}")
    check_lora_file(weight_file)
    try:
        pipe.load_lora_weights(directory, weight_name=LORA_WEIGHT_NAME, adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError, OSError, SafetensorError) as e:  # garbage or cut files too
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"LoRA in '{directory}' does not match the model: {first[:300]}") from None
    if adapter_name not in (getattr(getattr(pipe, denoiser_name), "peft_config", None) or {}):
        raise ModelError(
            f"LoRA in '{directory}' does not match the model: none of its weights target this {denoiser_name}"
        )
    return pipe
