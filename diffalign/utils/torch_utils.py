"""torch settings and values shared by the trainers, the rollout and the loaders: dtype arguments, seeds, threads."""

from typing import Optional

import numpy as np
import torch

from ..errors import ModelError
from .hub_utils import BUNDLED_MODELS


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """`from_pretrained`'s dtype argument: `dtype` from diffusers 0.42 on (`torch_dtype` is deprecated there)."""
    import diffusers
    from packaging import version

    name = "dtype" if version.parse(diffusers.__version__) >= version.parse("0.42") else "torch_dtype"
    return {name: dtype}


def seed_for(*parts: int) -> int:
    """A deterministic 63-bit seed from `(seed, epoch, rank, purpose, ...)`: resumed runs draw the same numbers."""
    return int(np.random.default_rng(list(parts)).integers(0, 2**63 - 1))


def apply_torch_threads(model: str, num_threads: Optional[int] = None, device=None) -> Optional[int]:
    """Sets torch's CPU threads for a command that runs `model` (train, generate, bench, the reward server, the Python
    API) and returns the number set (None: torch's own setting kept).

    `num_threads` (>= 1) is used as given. By default the bundled models (digits, digits-flow) on a CPU run on one
    thread: their small convolutions are fastest on one thread when the cores are shared, and one thread makes runs
    bit-reproducible on a machine whatever its core count. Other models, and any model on a GPU, keep torch's setting.
    `device`: the command's device (default: cuda when available).
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


def set_torch_threads(config) -> Optional[int]:
    """`apply_torch_threads` for a run: its `model` and `num_threads`."""
    return apply_torch_threads(config.model, config.num_threads)

