"""Where a model comes from: bundled short names, local diffusers directories and Hugging Face Hub ids."""

import os
from importlib import resources
from typing import Optional

from ..errors import ModelError, first_line

BUNDLED_MODELS = {"digits": "models/digits", "digits-flow": "models/digits-flow"}


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
        return f"{constants.ENDPOINT} cannot be reached: {first_line(e, with_type=False)}"
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
        raise ModelError(f"model '{repo_id}' could not be fetched from the Hugging Face Hub "
                         f"({first_line(e, with_type=False)}): check the id and access, or {download}") from None
