"""Reward registry: every scorer is `reward(images, prompts, metadata) -> Tensor[B]`.

`images` are float `[B, 3, H, W]` in [0, 1] on any device, `prompts` a list of B strings and
`metadata` a list of B dicts (or `None`). Scorers run without gradients, batched, on the images'
device, and return float32 scores **on the CPU**, one per image, higher is better.

Videos (`[B, F, 3, H, W]`, a video family's samples) reach an image reward frame by frame: frame `f` of every video is
scored as a batch of images, and each video's `F` scores are reduced to one (`reduce_frames`: `mean` by default, `min`,
`max`, `median`; the trainers' `video_reward_reduction`). A reward with `video_native = True` (an attribute of the
callable, like `groupwise`) is handed the videos themselves, `[B, F, 3, H, W]`, and is refused images; a mixture
hands each part what it takes. See docs/rewards.md, "Video".

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
| `imagereward` | `imagereward` | ImageReward: their MLP on BLIP's text-image [CLS], normalised (unverified, docs) |
| `hpsv3` | `hpsv3` | HPSv3: mu of their head on Qwen2-VL-7B at `<|Reward|>` (unverified, see docs) |
| `remote` | `remote` | the scores of an HTTP server (`url=...`); `python -m diffalign.rewards.serve` serves any reward |
| `ocr` | `ocr` | Flow-GRPO's text rendering: 1 - normalised edit distance to the prompt's quoted text (EasyOCR) |
| `geneval` | `geneval` | GenEval's rules (objects, counts, colours, positions) on a given detector; Flow-GRPO's partial score |
| `vlm_judge` | `vlm_judge` | a VLM over an OpenAI-compatible API: P(Yes) / (P(Yes) + P(No)), or a parsed rating |
| `pickscore_rank`, `win_rate` | `groupwise` | groupwise: a sample's win rate against the other samples of its prompt |
| `temporal_consistency` | `clip_rewards` | video-native: mean CLIP-image cosine similarity of consecutive frames |

Groupwise rewards (`GroupwiseReward`, or any callable with `groupwise = True`) score a prompt's whole group at once
and are called `reward(images, prompts, metadata, group_ids)`, `group_ids` a `LongTensor[B]` equal for the samples of
one prompt; the trainers always hand them whole groups (docs/rewards.md, "Groupwise rewards").
"""

import importlib
import inspect
import math
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch

from diffalign.errors import (MissingRewardDependencyError, RewardError, RewardWeightsNotFoundError, UnknownRewardError,
                              UserError, first_line)

RewardFn = Callable[[torch.Tensor, List[str], Optional[List[dict]]], torch.Tensor]

REWARDS: Dict[str, Callable[..., RewardFn]] = {}

# Built-in rewards live in these modules; they are imported on first lookup so that
# `import diffalign.rewards` stays cheap and optional extras are only needed when used.
_BUILTIN_MODULES = [
    "diffalign.rewards.jpeg",
    "diffalign.rewards.digits",
    "diffalign.rewards.clip_rewards",
    "diffalign.rewards.hpsv2",
    "diffalign.rewards.imagereward",
    "diffalign.rewards.hpsv3",
    "diffalign.rewards.remote",
    "diffalign.rewards.vlm_judge",
    "diffalign.rewards.ocr",
    "diffalign.rewards.geneval",
    "diffalign.rewards.groupwise",
]

__all__ = [
    "GroupwiseReward",
    "REWARDS",
    "RewardFn",
    "RewardMixture",
    "RewardWeightsNotFoundError",
    "MissingRewardDependencyError",
    "RewardError",
    "UnknownRewardError",
    "available_rewards",
    "VIDEO_REDUCTIONS",
    "call_reward",
    "check_reward_output",
    "check_video_reduction",
    "frame_scores",
    "get_reward",
    "group_ids_for",
    "is_groupwise",
    "is_video",
    "is_video_native",
    "reduce_frames",
    "reward_name",
    "register_reward",
]


def register_reward(name: str):
    """Decorator registering a reward factory under `name`.

    The factory takes keyword arguments (model paths, devices, ...) and returns a callable
    `reward(images, prompts, metadata) -> Tensor[B]`. A callable with `video_native = True` is a video reward: it
    gets videos `[B, F, 3, H, W]` and never images (without it, videos reach it frame by frame: `call_reward`).

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
    if not kwargs:
        return fn
    _check_kwargs(spec, fn, kwargs)
    return fn(**kwargs)


def is_groupwise(fn) -> bool:
    """Whether `fn` scores groups (`fn.groupwise is True`): it is called with the group ids as a fourth argument."""
    return getattr(fn, "groupwise", False) is True


def is_video_native(fn) -> bool:
    """Whether `fn` scores videos (`fn.video_native is True`): it is handed `[B, F, 3, H, W]`, never images."""
    return getattr(fn, "video_native", False) is True


def is_video(samples) -> bool:
    """Whether a batch of samples is videos, `[B, F, 3, H, W]` (a tensor of 5 dimensions), rather than images."""
    return getattr(samples, "ndim", None) == 5


# how a video's per-frame scores `[B, F]` become its score `[B]`; a non-finite frame score makes the video's score
# non-finite (the trainer's `nonfinite_policy` sees it)
VIDEO_REDUCTIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": lambda scores: scores.mean(dim=1),
    "min": lambda scores: scores.amin(dim=1),
    "max": lambda scores: scores.amax(dim=1),
    "median": lambda scores: scores.quantile(0.5, dim=1),  # the mean of the middle two for an even count
}


def check_video_reduction(reduction: str, what: str = "video_reward_reduction") -> str:
    """`reduction` when it names a `VIDEO_REDUCTIONS` entry, else a one-line `RewardError` listing them."""
    if not isinstance(reduction, str) or reduction not in VIDEO_REDUCTIONS:
        raise RewardError(f"{what} must be one of {', '.join(VIDEO_REDUCTIONS)}; got {reduction!r}")
    return reduction


def reduce_frames(scores: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """A video's score from its frames' scores: `[B, F]` -> `[B]` by `reduction` (`mean`, `min`, `max`, `median`)."""
    return VIDEO_REDUCTIONS[check_video_reduction(reduction)](scores.float())


def frame_scores(fn, videos: torch.Tensor, prompts: List[str], metadata: Optional[List[dict]] = None,
                 name: Optional[str] = None, group_ids=None) -> torch.Tensor:
    """The image reward `fn` of every frame of `videos` `[B, F, 3, H, W]`: `[B, F]` float32 on the CPU, entry
    `(b, f)` the score of frame `f` of video `b` with video `b`'s prompt and metadata.

    Frame `f` of all the videos is one call of `fn` (`call_reward`, `[B, 3, H, W]`): a batch the size of an image
    batch, and whole groups for a groupwise reward, which ranks a frame among the same frame of its group's videos."""
    name = name or reward_name(fn)
    return torch.stack([call_reward(fn, videos[:, f], prompts, metadata, name=name, group_ids=group_ids)
                        for f in range(videos.shape[1])], dim=1)


def group_ids_for(prompts: List[str], metadata: Optional[List[dict]] = None, group_ids=None,
                  name: str = "reward") -> torch.Tensor:
    """The `LongTensor[B]` group ids of a batch: `group_ids` when given, else every row's metadata `group_id` (what
    the trainers and the `remote` reward send), else equal prompts share a group. A `RewardError` when a group
    holds two different prompts (a group is one prompt's samples) or the ids do not fit the batch."""
    count = len(prompts)
    if group_ids is None and metadata is not None and all(
            isinstance(row, Mapping) and isinstance(row.get("group_id"), int) for row in metadata):
        group_ids = [row["group_id"] for row in metadata]
    if group_ids is None:
        first = {}
        group_ids = [first.setdefault(prompt, len(first)) for prompt in prompts]
    try:
        ids = torch.as_tensor(group_ids).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise RewardError(f"reward '{name}': group_ids must be integers, one per image") from None
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.shape[0] != count:
        raise RewardError(f"reward '{name}': group_ids must be {count} integers, one per image; got "
                          f"{ids.dtype} of shape {list(ids.shape)}")
    ids = ids.to(device="cpu", dtype=torch.long)
    prompt_of = {}
    for group, prompt in zip(ids.tolist(), prompts):
        if prompt_of.setdefault(group, prompt) != prompt:
            raise RewardError(f"reward '{name}': group {group} mixes the prompts {prompt_of[group]!r} and {prompt!r}; "
                              f"a group is the samples of one prompt")
    return ids


class GroupwiseReward:
    """Base of rewards that score a prompt's group of samples together: a sample's score may depend on the other
    samples of its prompt (a rank, a win rate, a pairwise judge), never on other prompts' samples.

    Subclasses implement `score_groups(images, prompts, metadata, group_ids) -> Tensor[B]` (`group_ids` a CPU
    `LongTensor[B]`, checked: equal ids have equal prompts). The trainers call every groupwise reward (anything with
    `groupwise = True`, this class or a user's function) with whole groups, the process's own: `reward(images,
    prompts, metadata, group_ids)`. Called without `group_ids`, the metadata's `group_id`s group the batch, else its
    equal prompts.
    """

    groupwise = True

    def __call__(self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[dict]] = None,
                 group_ids=None) -> torch.Tensor:
        name = getattr(self, "name", type(self).__name__)
        return self.score_groups(images, prompts, metadata, group_ids_for(prompts, metadata, group_ids, name))

    def score_groups(self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[dict]],
                     group_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _check_kwargs(name: str, factory: Callable, kwargs: dict):
    """A `RewardError` naming the options `factory` does not take (instead of a `TypeError` traceback)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(**kwargs)
    except TypeError:
        params = signature.parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return
        accepted = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise RewardError(f"reward '{name}' has no option {', '.join(repr(k) for k in unknown)}; its options: "
                              f"{', '.join(accepted) or 'none'}") from None
        raise RewardError(f"reward '{name}': the options {sorted(kwargs)} do not fit {name}{signature}") from None


def _split_weight(name: str, value) -> tuple:
    # A mixture entry is either `name: weight` or `name: {weight: w, <factory kwargs>}`.
    if isinstance(value, Mapping):
        options = dict(value)
        if "weight" not in options:
            raise RewardError(f"reward mixture entry '{name}' needs a 'weight', got {sorted(options)}")
        return _weight(name, options.pop("weight")), options
    return _weight(name, value), {}


def _weight(name: str, value) -> float:
    try:
        weight = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        weight = math.nan
    if not math.isfinite(weight):
        raise RewardError(f"reward mixture entry '{name}': the weight must be a finite number, got {value!r}")
    return weight


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
            raise RewardError("a reward mixture needs at least one reward, e.g. {jpeg_compressibility: 1.0}")
        unknown = sorted(set(kwargs) - set(weights))
        if unknown:
            raise RewardError(f"options given for {unknown}, which are not parts of the mixture {sorted(weights)}")
        bad = [name for name in weights if not isinstance(name, str)]
        if bad:
            raise RewardError(f"reward mixture keys must be reward names; got {bad}")
        not_mappings = [name for name in weights if name in kwargs and not isinstance(kwargs[name], Mapping)]
        if not_mappings:
            raise RewardError(f"options of mixture part(s) {not_mappings} must be mappings of keyword arguments")
        self.weights: Dict[str, float] = {}
        self.parts: Dict[str, RewardFn] = {}
        for name, value in weights.items():
            weight, options = _split_weight(name, value)
            options.update(kwargs.get(name, {}))
            self.weights[name] = weight
            self.parts[name] = get_reward(name, **options)
        self.last_parts: Dict[str, torch.Tensor] = {}

    @property
    def groupwise(self) -> bool:
        """A mixture with a groupwise part is groupwise: it is handed whole groups, and passes their ids on."""
        return any(is_groupwise(fn) for fn in self.parts.values())

    def __call__(
        self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[dict]] = None, group_ids=None,
        video_reduction: Optional[str] = None
    ) -> torch.Tensor:
        # videos: each part scores them its own way (a video-native part whole, an image part frame by frame)
        self.last_parts = {name: call_reward(fn, images, prompts, metadata, name=name, group_ids=group_ids,
                                             video_reduction=video_reduction)
                           for name, fn in self.parts.items()}
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
    if not isinstance(spec, str):
        raise RewardError(f"reward must be a name, 'module:function' or a {{name: weight}} mixture; got {spec!r}")
    if ":" in spec:
        return _load_user_function(spec, **kwargs)
    if spec not in REWARDS:
        _load_builtins()
    if spec not in REWARDS:
        raise UnknownRewardError(f"unknown reward '{spec}'; available: {', '.join(available_rewards())}")
    _check_kwargs(spec, REWARDS[spec], kwargs)
    return REWARDS[spec](**kwargs)


def reward_name(fn, spec=None) -> str:
    """A short name of a reward for messages: its config spec, else its function or class name."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        return "mixture " + "+".join(str(k) for k in spec)
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def check_reward_output(name: str, output, num_images: int) -> torch.Tensor:
    """`output` as float32 CPU scores `[num_images]`, or a `RewardError` naming the reward and what it returned.

    Accepted: a tensor, array or sequence of real numbers of shape `[B]` or `[B, 1]` (non-finite values pass; the
    trainer's `nonfinite_policy` handles them).
    """
    if output is None:
        raise RewardError(f"reward '{name}' returned None; it must return one score per image ({num_images})")
    if isinstance(output, (str, bytes)):
        raise RewardError(f"reward '{name}' returned a string; it must return one number per image ({num_images})")
    try:
        scores = torch.as_tensor(output)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        kinds = sorted({type(v).__name__ for v in output}) if isinstance(output, (list, tuple)) else []
        what = f"a {type(output).__name__} of {', '.join(kinds)}" if kinds else f"a {type(output).__name__}"
        raise RewardError(f"reward '{name}' returned {what}; it must return one number per image ({num_images})") from None
    if scores.is_complex() or not (scores.is_floating_point() or scores.dtype in (
            torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)):
        raise RewardError(f"reward '{name}' returned {scores.dtype} values; it must return real numbers")
    if scores.dim() == 2 and scores.shape[1] == 1 or scores.dim() == 0 and num_images == 1:
        scores = scores.reshape(-1)
    if scores.dim() != 1 or scores.shape[0] != num_images:
        raise RewardError(f"reward '{name}' returned shape {list(scores.shape)} for {num_images} images; it must "
                          f"return one score per image, shape [{num_images}]")
    return scores.detach().to(device="cpu", dtype=torch.float32)


def call_reward(fn, images, prompts, metadata=None, name: Optional[str] = None, group_ids=None,
                video_reduction: Optional[str] = None) -> torch.Tensor:
    """Calls a reward and checks its output (`check_reward_output`); an exception it raises becomes a one-line
    `RewardError` naming it (the original stays as `__cause__`). A groupwise reward (`is_groupwise`) also gets the
    group ids (`group_ids_for`: `group_ids`, else the metadata's, else equal prompts); a pointwise one ignores them.

    Videos `[B, F, 3, H, W]` go whole to a video-native reward (`is_video_native`) and frame by frame to an image
    reward, whose frame scores (`frame_scores`) are reduced by `video_reduction` (`reduce_frames`); without a
    reduction an image reward refuses videos, and a video-native reward always refuses images (one-line
    `RewardError`s)."""
    name = name or reward_name(fn)
    video = is_video(images)
    if is_video_native(fn) and not video:
        raise RewardError(f"reward '{name}' is video-native: it scores videos [B, F, 3, H, W], not images of shape "
                          f"{list(getattr(images, 'shape', []))}")
    if video and not is_video_native(fn) and not isinstance(fn, RewardMixture):  # a mixture: each part its own way
        if video_reduction is None:
            raise RewardError(f"reward '{name}' scores images [B, 3, H, W] and was given videos of shape "
                              f"{list(images.shape)} without a frame reduction (video_reward_reduction: "
                              f"{', '.join(VIDEO_REDUCTIONS)})")
        check_video_reduction(video_reduction)
        return reduce_frames(frame_scores(fn, images, prompts, metadata, name=name, group_ids=group_ids),
                             video_reduction)
    try:
        if video and isinstance(fn, RewardMixture):
            output = fn(images, prompts, metadata, group_ids, video_reduction=video_reduction)
        elif is_groupwise(fn):
            output = fn(images, prompts, metadata, group_ids_for(prompts, metadata, group_ids, name))
        else:
            output = fn(images, prompts, metadata)
    except UserError:
        raise
    except Exception as e:
        raise RewardError(f"reward '{name}' failed: {first_line(e)}") from e
    return check_reward_output(name, output, len(images))
