"""torch settings and values shared by the trainers, the rollout and the loaders: dtype arguments, seeds, threads."""

import numpy as np
import torch

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


def set_torch_threads(config):
    """`torch.set_num_threads` from `config.num_threads`; by default one thread for the bundled models on a CPU (their
    small convolutions are fastest on one thread when the cores are shared, and one thread makes runs bit-reproducible
    across machines with different core counts)."""
    threads = config.num_threads
    if threads is None and config.model in BUNDLED_MODELS and not torch.cuda.is_available():
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
