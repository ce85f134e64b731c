"""Reward registry: every scorer is `reward(images, prompts, metadata) -> Tensor[B]`.

`images` are float `[B, 3, H, W]` in [0, 1] on any device, `prompts` a list of B strings and
`metadata` a list of B dicts (or `None`). Scorers run without gradients, batched, on the images'
device, and return float32 scores **on the CPU**, one per image, higher is better.

Rewards are found by name (`get_reward("jpeg_compressibility")`), by a user's own function given as
`"my_package.my_module:my_reward"` (this imports and runs user code), or as a weighted mixture
`get_reward({"pickscore": 10, "hpsv2": 2, "aesthetic": 0.05})`. Register your own with
`@register_reward("name")` on a factory that takes keyword arguments and returns the scorer.

Built-ins (see docs/rewards.md for the weights each one needs):

| name | module | score |
|---|---|---|
| `jpeg_compressibility`, `jpeg_incompressibility` | `jpeg` | -/+ JPEG size in kB at quality 95 (DDPO) |
| `aesthetic` | `clip_rewards` | LAION aesthetic predictor on CLIP ViT-L/14 image embeddings |
| `pickscore` | `clip_rewards` | PickScore: `logit_scale * cos(image, text)` |
| `clip_score` | `clip_rewards` | `scale * cos(image, text)` of a CLIP model |
| `hpsv2`, `hpsv2.1` | `hpsv2` | HPSv2 / HPSv2.1: `cos(image, text)` (needs `diffalign[openclip]`) |
"""

import importlib
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch

RewardFn = Callable[[torch.Tensor, List[str], Optional[List[dict]]], torch.Tensor]

REWARDS: Dict[str, Callable[..., RewardFn]] = {}

# Built-in rewards live in these modules; they are imported on first lookup so that
# `import diffalign.rewards` stays cheap and optional extras are only needed when used.
_BUILTIN_MODULES = [
    "diffalign.rewards.jpeg",
    "diffalign.rewards.digits",
    "diffalign.rewards.clip_rewards",
    "diffalign.rewards.hpsv2",
]

__all__ = [
    "REWARDS",
    "RewardFn",
    "RewardMixture",
    "RewardWeightsNotFoundError",
    "MissingRewardDependencyError",
    "UnknownRewardError",
    "available_rewards",
    "get_reward",
    "register_reward",
]


class UnknownRewardError(ValueError):
    """A reward name that is neither registered nor an importable `module:function`."""


class RewardWeightsNotFoundError(ValueError):
    """A reward model's weights could not be found locally (and not downloaded, e.g. offline).

    The message is one line: the reward, what to download and which keyword argument to point at it.
    """


class MissingRewardDependencyError(ImportError):
    """A reward needs an optional dependency (an extra such as `diffalign[openclip]`) that is not installed."""


def register_reward(name: str):
    """Decorator registering a reward factory under `name`.

    The factory takes keyword arguments (model paths, devices, ...) and returns a callable
    `reward(images, prompts, metadata) -> Tensor[B]`.

    Args:
        name (`str`):
            The name used in `get_reward(name)`, in config files and on the command line.

    Example:

    ```python
    from diffalign.rewards import register_reward


    @register_reward("brightness")
    def brightness(gamma: float = 1.0):
        def reward(images, prompts, metadata=None):
            return images.mean(dim=(1, 2, 3)).pow(gamma).float().cpu()

        return reward
    ```
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
    """Sorted names of all registered rewards (built-ins included)."""
    _load_builtins()
    return sorted(REWARDS)


def _load_user_function(spec: str, **kwargs) -> RewardFn:
    """Imports `"module.path:function"`; with `kwargs` the function is a factory called with them."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UnknownRewardError(f"reward '{spec}': expected 'module.path:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UnknownRewardError(f"reward '{spec}': cannot import module '{module_name}' ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UnknownRewardError(f"reward '{spec}': module '{module_name}' has no function '{attr}'")
    return fn(**kwargs) if kwargs else fn


def _split_weight(name: str, value) -> tuple:
    # A mixture entry is either `name: weight` or `name: {weight: w, <factory kwargs>}`.
    if isinstance(value, Mapping):
        options = dict(value)
        if "weight" not in options:
            raise ValueError(f"reward mixture entry '{name}' needs a 'weight', got {sorted(options)}")
        return float(options.pop("weight")), options
    return float(value), {}


class RewardMixture:
    """Weighted sum of rewards, `r = sum_i w_i r_i`; each part of the last call is kept in `last_parts`.

    Args:
        weights (`Dict[str, float | dict]`):
            `{reward name: weight}`, e.g. PRDP's multi-reward `{"pickscore": 10, "hpsv2": 2, "aesthetic": 0.05}`.
            A value may also be a dict `{"weight": w, **factory_kwargs}` to configure that part.
        **kwargs:
            `{reward name: factory kwargs}`, merged over the kwargs given inside `weights`.

    After each call `last_parts[name]` holds that part's unweighted float32 CPU scores `[B]`, so a trainer
    can log `reward_<name>` next to the total.
    """

    def __init__(self, weights: Mapping[str, Union[float, Mapping]], **kwargs):
        if not weights:
            raise ValueError("a reward mixture needs at least one reward")
        unknown = sorted(set(kwargs) - set(weights))
        if unknown:
            raise ValueError(f"options given for {unknown}, which are not parts of the mixture {sorted(weights)}")
        self.weights: Dict[str, float] = {}
        self.parts: Dict[str, RewardFn] = {}
        for name, value in weights.items():
            weight, options = _split_weight(name, value)
            options.update(kwargs.get(name, {}))
            self.weights[name] = weight
            self.parts[name] = get_reward(name, **options)
        self.last_parts: Dict[str, torch.Tensor] = {}

    def __call__(
        self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[dict]] = None
    ) -> torch.Tensor:
        self.last_parts = {
            name: torch.as_tensor(fn(images, prompts, metadata)).detach().float().cpu()
            for name, fn in self.parts.items()
        }
        total = torch.zeros(images.shape[0], dtype=torch.float32)
        for name, value in self.last_parts.items():
            total = total + self.weights[name] * value
        return total

    def __repr__(self) -> str:
        terms = " + ".join(f"{weight:g} * {name}" for name, weight in self.weights.items())
        return f"RewardMixture({terms})"


def get_reward(spec: Union[str, Mapping[str, Union[float, Mapping]]], **kwargs) -> RewardFn:
    """Returns the reward named by `spec`.

    Args:
        spec (`str` or `dict`):
            - a registered name, e.g. `"pickscore"` (see `available_rewards()`);
            - `"module.path:function"`: a user's function, imported (this runs user code). It is the reward
              itself, or, when `kwargs` are given, a factory called with them;
            - `{name: weight}`: a `RewardMixture`.
        **kwargs:
            Passed to the reward's factory (e.g. `model="/path/to/PickScore_v1"`, `device="cuda"`). For a
            mixture, `{name: {kwargs}}` per part.

    Returns:
        A callable `reward(images, prompts, metadata) -> Tensor[B]`.

    Raises:
        UnknownRewardError: the name is unknown; the message lists the available rewards.
        RewardWeightsNotFoundError: the reward's weights are not available locally.
        MissingRewardDependencyError: the reward needs an optional extra that is not installed.
    """
    if isinstance(spec, Mapping):
        return RewardMixture(spec, **kwargs)
    if ":" in spec:
        return _load_user_function(spec, **kwargs)
    if spec not in REWARDS:
        _load_builtins()
    if spec not in REWARDS:
        raise UnknownRewardError(f"unknown reward '{spec}'; available: {', '.join(available_rewards())}")
    return REWARDS[spec](**kwargs)
