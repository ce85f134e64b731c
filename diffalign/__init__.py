"""diffalign: reward fine-tuning (PRDP, DDPO/GRPO) and RLG guidance for diffusers text-to-image models."""

__version__ = "0.1.0"

_LAZY = {
    "DDPOConfig": "diffalign.config",
    "PRDPConfig": "diffalign.config",
    "load_config": "diffalign.config",
    "DDPOTrainer": "diffalign.trainers",
    "PRDPTrainer": "diffalign.trainers",
    "ddim_step_with_logprob": "diffalign.logprob",
    "sample_trajectories": "diffalign.rollout",
    "Trajectories": "diffalign.rollout",
    "prdp_loss": "diffalign.losses",
    "ppo_clipped_loss": "diffalign.losses",
    "get_reward": "diffalign.rewards",
    "register_reward": "diffalign.rewards",
    "load_pipeline": "diffalign.modeling",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    # Lazy imports keep `import diffalign` cheap (torch/diffusers load on first use).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffalign' has no attribute {name!r}")
