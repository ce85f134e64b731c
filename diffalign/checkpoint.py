"""Atomic, verifiable training checkpoints (safetensors + JSON, never pickle).

A checkpoint is a directory `checkpoints/epoch-000012/` written under a temporary name and renamed into place
only when complete. Its `manifest.json` records the epoch, the config hash and the SHA-256 of every file, so a
partial or corrupted checkpoint is detected and named instead of being loaded.
"""

import hashlib
import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
PREFIX = "epoch-"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupted or from a different run configuration."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_state(state: Any, tensors: Dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Moves every tensor of a nested dict/list into `tensors` (keyed by its path) and returns a JSON skeleton."""
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(state, dict):
        return {"__dict__": [[split_state(k, tensors, f"{prefix}.k{i}"), split_state(v, tensors, f"{prefix}.{i}")]
                             for i, (k, v) in enumerate(state.items())]}
    if isinstance(state, (list, tuple)):
        return {"__list__" if isinstance(state, list) else "__tuple__":
                [split_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(state)]}
    if isinstance(state, float) and state != state:
        return {"__nan__": True}
    return state


def join_state(skeleton: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    """Inverse of `split_state`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {join_state(k, tensors): join_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [join_state(v, tensors) for v in skeleton["__list__"]]
        if "__tuple__" in skeleton:
            return tuple(join_state(v, tensors) for v in skeleton["__tuple__"])
        if "__nan__" in skeleton:
            return float("nan")
    return skeleton


def save_checkpoint(run_dir: str, epoch: int, states: Dict[str, Any], config_hash: str, keep: int) -> str:
    """Writes `states` (name -> nested state with tensors) as `checkpoints/epoch-NNNNNN`, atomically.

    Each state becomes `<name>.safetensors` (its tensors) + `<name>.json` (the rest). Older checkpoints beyond
    `keep` are removed after the new one is in place.
    """
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"{PREFIX}{epoch:06d}")
    tmp = os.path.join(root, f".tmp-{PREFIX}{epoch:06d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    files = {}
    for name, state in states.items():
        tensors: Dict[str, torch.Tensor] = {}
        skeleton = split_state(state, tensors)
        tensor_file = os.path.join(tmp, f"{name}.safetensors")
        save_file(tensors, tensor_file)
        with open(os.path.join(tmp, f"{name}.json"), "w") as f:
            json.dump(skeleton, f)
        for filename in (f"{name}.safetensors", f"{name}.json"):
            files[filename] = _sha256(os.path.join(tmp, filename))
    manifest = {"epoch": epoch, "config_hash": config_hash, "files": files, "time": time.time()}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str) -> List[str]:
    """Checkpoint directories of a run (complete or not), oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith(PREFIX))
    return [os.path.join(root, n) for n in names]


def verify_checkpoint(path: str) -> dict:
    """Returns the manifest of a complete, intact checkpoint; raises `CheckpointError` naming what is wrong."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint '{path}' is incomplete: no {MANIFEST}")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint '{path}' is corrupted: unreadable {MANIFEST}") from None
    for filename, digest in manifest.get("files", {}).items():
        file_path = os.path.join(path, filename)
        if not os.path.isfile(file_path):
            raise CheckpointError(f"checkpoint '{path}' is incomplete: {filename} is missing")
        if _sha256(file_path) != digest:
            raise CheckpointError(f"checkpoint '{path}' is corrupted: {filename} does not match its checksum")
    return manifest


def find_resumable(path: str) -> Tuple[str, dict]:
    """`(checkpoint_dir, manifest)` for `--resume PATH`: a checkpoint directory, or a run directory whose newest
    complete checkpoint is picked (incomplete or corrupted ones are skipped)."""
    if os.path.isfile(os.path.join(path, MANIFEST)) or os.path.basename(path.rstrip("/")).startswith(PREFIX):
        return path, verify_checkpoint(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"resume path '{path}' does not exist")
    candidates = list_checkpoints(path)
    problems = []
    for candidate in reversed(candidates):
        try:
            return candidate, verify_checkpoint(candidate)
        except CheckpointError as e:
            problems.append(str(e))
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise CheckpointError(f"no complete checkpoint in '{path}'{detail}")


def load_checkpoint(path: str, names: Optional[List[str]] = None) -> Dict[str, Any]:
    """Loads the states saved by `save_checkpoint` (verify first with `verify_checkpoint`)."""
    manifest = verify_checkpoint(path)
    names = names or sorted({f.rsplit(".", 1)[0] for f in manifest["files"]})
    states = {}
    for name in names:
        tensors = load_file(os.path.join(path, f"{name}.safetensors"))
        with open(os.path.join(path, f"{name}.json")) as f:
            states[name] = join_state(json.load(f), tensors)
    return states


def atomic_save_dir(write_fn, directory: str):
    """Calls `write_fn(tmp_dir)` and renames the result to `directory` (replacing it) only once it succeeded."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(directory)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_fn(tmp)
    if os.path.exists(directory):
        old = tmp + "-old"
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
