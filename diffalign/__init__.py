"""diffalign: reward fine-tuning (PRDP, DDPO/GRPO) and RLG guidance for diffusers text-to-image models."""

import os as _os

__version__ = "0.1.0"

# `diffalign.pipelines`, `diffalign.rewards` and `diffalign.configs` live in the repository's top-level `pipelines/`,
# `rewards/` and `configs/` (pyproject's `package-dir`); an install puts them inside `diffalign/`. Imported from a
# source checkout, `diffalign/` lacks them: an editable install maps them with an import hook, but after a plain
# `pip install .` the checkout's `diffalign/` still shadows the installed package when Python runs from the repo
# root (`python -m pytest`), with nothing to map them. The checkout root then joins the package path so they resolve.
_HERE = _os.path.dirname(_os.path.abspath(__file__))
_CHECKOUT = _os.path.dirname(_HERE)
if not _os.path.isdir(_os.path.join(_HERE, "pipelines")) and all(
    _os.path.isfile(_os.path.join(_CHECKOUT, name, "__init__.py")) for name in ("pipelines", "rewards", "configs")
):
    __path__.append(_CHECKOUT)

_LAZY = {
    "DDPOConfig": "diffalign.trainers",
    "PRDPConfig": "diffalign.trainers",
    "NFTConfig": "diffalign.trainers",
    "load_config": "diffalign.cli.parser",
    "DDPOTrainer": "diffalign.trainers",
    "PRDPTrainer": "diffalign.trainers",
    "NFTTrainer": "diffalign.trainers",
    "register_algorithm": "diffalign.trainers",
    "ddim_step_with_logprob": "diffalign.logprob",
    "sample_trajectories": "diffalign.rollout",
    "Trajectories": "diffalign.rollout",
    "prdp_loss": "diffalign.losses",
    "ppo_clipped_loss": "diffalign.losses",
    "nft_loss": "diffalign.losses",
    "get_reward": "diffalign.rewards",
    "register_reward": "diffalign.rewards",
    "load_pipeline": "diffalign.families",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    # Lazy imports keep `import diffalign` cheap (torch/diffusers load on first use).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffalign' has no attribute {name!r}")
