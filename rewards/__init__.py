"""Reward registry: every scorer is `reward(images, prompts, metadata) -> Tensor[B]`.

`images` are float `[B, 3, H, W]` in [0, 1] on any device, `prompts` a list of B strings and
`metadata` a list of B dicts (or `None`). Scorers run without gradients and return float32 scores
**on the CPU**, one per image, higher is better.

Rewards are found by name (`get_reward("jpeg_compressibility")`), by a user's own function given as
`"my_package.my_module:my_reward"` (this imports and runs user code), or as a weighted mixture
`get_reward({"pickscore": 10, "hpsv2": 2, "aesthetic": 0.05})`. Register your own with
`@register_reward("name")` on a factory that takes keyword arguments and returns the scorer.
"""

import importlib
from typing import Callable, Dict, List, Optional, Union

import torch

RewardFn = Callable[[torch.Tensor, List[str], Optional[List[dict]]], torch.Tensor]

REWARDS: Dict[str, Callable[..., RewardFn]] = {}

# Built-in rewards live in these modules; they are imported on first lookup so that
# `import diffalign.rewards` stays cheap and optional extras are only needed when used.
_BUILTIN_MODULES = ["diffalign.rewards.jpeg", "diffalign.rewards.digits", "diffalign.rewards.clip_rewards", "diffalign.rewards.hpsv2"]


class UnknownRewardError(ValueError):
    pass


def register_reward(name: str):
    """Decorator registering a reward factory under `name`.

    The factory takes keyword arguments (model paths, devices, ...) and returns a callable
    `reward(images, prompts, metadata) -> Tensor[B]`.
    """

    def decorator(factory):
        REWARDS[name] = factory
        return factory

    return decorator


def _load_builtins():
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def available_rewards() -> List[str]:
    _load_builtins()
    return sorted(REWARDS)


def _load_user_function(spec: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UnknownRewardError(f"reward '{spec}': cannot import module '{module_name}' ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UnknownRewardError(f"reward '{spec}': module '{module_name}' has no function '{attr}'")
    return fn


class RewardMixture:
    """Weighted sum of rewards, `r = sum_i w_i r_i`; each part of the last call is kept in `last_parts`."""

    def __init__(self, weights: Dict[str, float], **kwargs):
        self.weights = {name: float(w) for name, w in weights.items()}
        self.parts = {name: get_reward(name, **kwargs.get(name, {})) for name in self.weights}
        self.last_parts: Dict[str, torch.Tensor] = {}

    def __call__(self, images, prompts, metadata=None):
        self.last_parts = {name: fn(images, prompts, metadata).float().cpu() for name, fn in self.parts.items()}
        return sum(self.weights[name] * value for name, value in self.last_parts.items())


def get_reward(spec: Union[str, Dict[str, float]], **kwargs) -> RewardFn:
    """Returns the reward named by `spec`: a registered name, `"module:function"`, or `{name: weight}`."""
    if isinstance(spec, dict):
        return RewardMixture(spec, **kwargs)
    if ":" in spec:
        return _load_user_function(spec)
    if spec not in REWARDS:
        _load_builtins()
    if spec not in REWARDS:
        raise UnknownRewardError(f"unknown reward '{spec}'; available: {', '.join(available_rewards())}")
    return REWARDS[spec](**kwargs)
