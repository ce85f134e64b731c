"""Atomic, verifiable training checkpoints (safetensors + JSON, never pickle).

A checkpoint is a directory `checkpoints/epoch-000012/` written under a temporary name and renamed into place
only when complete. Its `manifest.json` records the epoch, the config hash and the SHA-256 of every file, so a
partial or corrupted checkpoint is detected and named instead of being loaded.

The manifest lists exactly the files the loader reads (`<state>.safetensors` + `<state>.json` per state), every
listed path stays inside the checkpoint, and loaded weights must be finite: a checkpoint that fails any of these is
skipped for the previous complete one (`load_resumable`) or named in a one-line `CheckpointError`. Temporary
directories left by a killed write are removed by the next save.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, first_line, is_disk_error, output_error
from .utils.process_utils import pid_alive

MANIFEST = "manifest.json"
PREFIX = "epoch-"
TMP = ".tmp-"

logger = logging.getLogger("diffalign")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_state(state: Any, tensors: Dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Moves every tensor of a nested dict/list into `tensors` (keyed by its path) and returns a JSON skeleton.

    A prompt with condition images (`diffalign.prompts.ConditionedPrompt`, as a key or a value: DDPO's per-prompt
    statistics, the prompt-difficulty buffers, replayed trajectories) keeps its images: JSON would write its text
    alone, and the resumed run would start a fresh entry for it."""
    images = getattr(state, "condition_images", None) if isinstance(state, str) else None
    videos = getattr(state, "condition_videos", None) if isinstance(state, str) else None
    if images or videos:
        last = getattr(state, "last_image", None)
        return {"__prompt__": str(state), "condition_images": list(images),
                **({"condition_videos": list(videos)} if videos else {}),
                **({"last_image": last} if last is not None else {})}
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
        if "__prompt__" in skeleton:
            from .prompts import ConditionedPrompt

            return ConditionedPrompt(skeleton["__prompt__"], tuple(skeleton["condition_images"]),
                                     tuple(skeleton.get("condition_videos", ())), skeleton.get("last_image"))
    return skeleton


def remove_stale_tmp(directory: str, prefix: str = TMP):
    """Removes `<prefix>...-<pid>[-old]` entries of `directory` left by writes of processes that no longer exist
    (killed mid-write) or by an earlier failed write of this process."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if not name.startswith(prefix):
            continue
        match = re.search(r"-(\d+)(-old)?$", name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or not pid_alive(pid):
            path = os.path.join(directory, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except OSError:
                    pass


def save_checkpoint(run_dir: str, epoch: int, states: Dict[str, Any], config_hash: str, keep: int) -> str:
    """Writes `states` (name -> nested state with tensors) as `checkpoints/epoch-NNNNNN`, atomically.

    Each state becomes `<name>.safetensors` (its tensors) + `<name>.json` (the rest). Older checkpoints beyond
    `keep` are removed after the new one is in place. A full disk or a read-only directory raises `OutputError`
    (one line) after removing the partial write; the earlier checkpoints are untouched.
    """
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"{PREFIX}{epoch:06d}")
    tmp = os.path.join(root, f"{TMP}{PREFIX}{epoch:06d}-{os.getpid()}")
    try:
        os.makedirs(root, exist_ok=True)
        remove_stale_tmp(root)
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
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_error(e):
            raise output_error(f"checkpoint '{final}' (earlier checkpoints are kept)", e) from e
        raise
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


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_STATE_FILE = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9_.-]*)\.(safetensors|json)$")


def _check_manifest(path: str, manifest: Any) -> dict:
    """The manifest's structure: an object with an integer epoch, a string config hash and `files` mapping plain
    file names inside the checkpoint, in `<state>.safetensors` + `<state>.json` pairs, to SHA-256 digests."""
    def bad(what: str):
        return CheckpointError(f"checkpoint '{path}' is corrupted: {MANIFEST} {what}")

    if not isinstance(manifest, dict):
        raise bad("is not a JSON object")
    epoch = manifest.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise bad(f"has no valid 'epoch' (got {epoch!r})")
    if not isinstance(manifest.get("config_hash"), str):
        raise bad(f"has no valid 'config_hash' (got {manifest.get('config_hash')!r})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise bad(f"has no valid 'files' mapping (got {type(files).__name__})")
    root = os.path.realpath(path)
    for filename, digest in files.items():
        if not isinstance(filename, str) or not _STATE_FILE.match(filename) or filename != os.path.basename(filename):
            raise bad(f"lists '{filename}', which is not a state file inside the checkpoint")
        if os.path.dirname(os.path.realpath(os.path.join(path, filename))) != root:
            raise bad(f"lists '{filename}', which points outside the checkpoint")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise bad(f"has no valid SHA-256 for '{filename}'")
    for name in state_names(files):
        for filename in (f"{name}.safetensors", f"{name}.json"):
            if filename not in files:
                raise CheckpointError(f"checkpoint '{path}' is incomplete: {filename} is not in its {MANIFEST}")
    match = re.fullmatch(rf"{PREFIX}(\d+)", os.path.basename(os.path.normpath(path)))
    if match and int(match.group(1)) != epoch:
        raise bad(f"says epoch {epoch}, but the directory is {os.path.basename(os.path.normpath(path))}")
    return manifest


def state_names(files: Iterable[str]) -> List[str]:
    """The states of a checkpoint's file list (`model` for `model.safetensors` + `model.json`)."""
    return sorted({f.rsplit(".", 1)[0] for f in files})


def verify_checkpoint(path: str) -> dict:
    """Returns the manifest of a complete, intact checkpoint; raises `CheckpointError` naming what is wrong."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint '{path}' is incomplete: no {MANIFEST}")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"checkpoint '{path}' is corrupted: unreadable {MANIFEST}") from None
    _check_manifest(path, manifest)
    for filename, digest in manifest["files"].items():
        file_path = os.path.join(path, filename)
        if not os.path.isfile(file_path):
            raise CheckpointError(f"checkpoint '{path}' is incomplete: {filename} is missing")
        if _sha256(file_path) != digest:
            raise CheckpointError(f"checkpoint '{path}' is corrupted: {filename} does not match its checksum")
    return manifest


def _is_checkpoint_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST)) or os.path.basename(os.path.normpath(path)).startswith(PREFIX)


def find_resumable(path: str) -> Tuple[str, dict]:
    """`(checkpoint_dir, manifest)` for `--resume PATH`: a checkpoint directory, or a run directory whose newest
    complete checkpoint is picked (incomplete or corrupted ones are skipped)."""
    if not os.path.exists(path):
        raise CheckpointError(f"resume path '{path}' does not exist")
    if _is_checkpoint_dir(path):
        return path, verify_checkpoint(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"resume path '{path}' is not a run directory or a checkpoint")
    candidates = list_checkpoints(path)
    problems = []
    for candidate in reversed(candidates):
        try:
            return candidate, verify_checkpoint(candidate)
        except CheckpointError as e:
            problems.append(str(e))
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise CheckpointError(f"no complete checkpoint in '{path}'{detail}")


def nothing_to_resume(path: str) -> bool:
    """True for a run directory with no checkpoint at all and no final weights: a run stopped before its first
    checkpoint (killed after an epoch's metrics line, say), which `--resume` starts from scratch. A directory with
    damaged checkpoints is not such a run (its problems are named instead)."""
    if not os.path.isdir(path) or _is_checkpoint_dir(path) or os.path.isdir(os.path.join(path, "final")):
        return False
    checkpoints = os.path.join(path, "checkpoints")
    return not (os.path.isdir(checkpoints) and any(n.startswith(PREFIX) for n in os.listdir(checkpoints)))


def _check_finite(path: str, filename: str, tensors: Dict[str, torch.Tensor]):
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"checkpoint '{path}' is corrupted: {filename} holds non-finite values ('{key}')")


def load_checkpoint(path: str, names: Optional[List[str]] = None, manifest: Optional[dict] = None,
                    finite: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    """Loads the states saved by `save_checkpoint`, reading only files its manifest lists (and verifies).

    Args:
        names: the states to load (each must be in the manifest); by default every state of the manifest.
        manifest: the manifest `verify_checkpoint` returned (verified again when not given).
        finite: states whose floating-point tensors must all be finite (by default every state).
    """
    manifest = manifest if manifest is not None else verify_checkpoint(path)
    available = state_names(manifest["files"])
    names = list(names) if names is not None else available
    missing = [n for n in names if n not in available]
    if missing:
        raise CheckpointError(f"checkpoint '{path}' is incomplete: its {MANIFEST} lists no "
                              f"{', '.join(n + '.safetensors' for n in missing)}")
    finite = set(names if finite is None else finite)
    states = {}
    for name in names:
        filename = f"{name}.safetensors"
        try:
            tensors = load_file(os.path.join(path, filename))
        except Exception as e:  # safetensors' own error type: a header or payload that is not safetensors
            raise CheckpointError(f"checkpoint '{path}' is corrupted: {filename} is unreadable ({first_line(e)})") from None
        if name in finite:
            _check_finite(path, filename, tensors)
        try:
            with open(os.path.join(path, f"{name}.json"), encoding="utf-8") as f:
                states[name] = join_state(json.load(f), tensors)
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise CheckpointError(f"checkpoint '{path}' is corrupted: {name}.json is unreadable ({first_line(e)})") from None
    return states


def load_resumable(path: str, names: List[str], config_hash=None,
                   check: Optional[Callable[[str, Dict[str, Any]], None]] = None,
                   finite: Optional[Iterable[str]] = None) -> Tuple[str, dict, Dict[str, Any]]:
    """`(checkpoint_dir, manifest, states)` for `--resume PATH`.

    PATH is a checkpoint (loaded or named in a `CheckpointError`) or a run directory: its newest checkpoint that
    verifies, has the states `names` with finite weights and passes `check(checkpoint, states)` (which raises
    `CheckpointError`) is loaded; failing ones are skipped with a warning, so a damaged newest checkpoint falls back
    to the previous complete one. A `config_hash` (a string, or a tuple of the hashes the run accepts) that differs
    from the checkpoint's is an error at once.
    """
    accepted = (config_hash,) if isinstance(config_hash, str) else tuple(config_hash or ())
    if not os.path.exists(path):
        raise CheckpointError(f"resume path '{path}' does not exist")
    explicit = _is_checkpoint_dir(path)
    if not explicit and not os.path.isdir(path):
        raise CheckpointError(f"resume path '{path}' is not a run directory or a checkpoint")
    candidates = [path] if explicit else list(reversed(list_checkpoints(path)))
    problems = []
    for candidate in candidates:
        try:
            manifest = verify_checkpoint(candidate)
            if accepted and manifest["config_hash"] not in accepted:
                raise _ConfigMismatch(
                    f"checkpoint '{candidate}' was written with a different configuration (hash "
                    f"{manifest['config_hash']} vs {accepted[0]}): resume with the run's original settings"
                )
            states = load_checkpoint(candidate, names, manifest=manifest, finite=finite)
            if check is not None:
                check(candidate, states)
        except _ConfigMismatch as e:
            raise CheckpointError(str(e)) from None
        except CheckpointError as e:
            if explicit:
                raise
            problems.append(str(e))
            logger.warning("skipping %s", e)
            continue
        if problems:
            logger.warning("resuming from the previous complete checkpoint %s", candidate)
        return candidate, manifest, states
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise CheckpointError(f"no complete checkpoint in '{path}'{detail}")


class _ConfigMismatch(Exception):
    pass


def atomic_save_dir(write_fn, directory: str):
    """Calls `write_fn(tmp_dir)` and renames the result to `directory` (replacing it) only once it succeeded.

    A full disk or read-only parent raises `OutputError` (one line); `directory` is then left as it was."""
    parent = os.path.dirname(os.path.abspath(directory))
    tmp = os.path.join(parent, f"{TMP}{os.path.basename(directory)}-{os.getpid()}")
    try:
        os.makedirs(parent, exist_ok=True)
        remove_stale_tmp(parent, f"{TMP}{os.path.basename(directory)}-")
        shutil.rmtree(tmp, ignore_errors=True)
        write_fn(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_error(e):
            raise output_error(f"'{directory}'", e) from e
        raise
    if os.path.exists(directory):
        old = tmp + "-old"
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
