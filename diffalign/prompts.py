"""Prompt sources: a list, a file, a built-in set, or a user's `module:function`."""

import importlib
import os
import random
from typing import Callable, Dict, List, Optional

import numpy as np

from .errors import UserError, first_line

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# DDPO's `simple_animals` set (kvablack/ddpo-pytorch, assets/simple_animals.txt), used by PRDP's small-scale runs.
SIMPLE_ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf lizard beetle "
    "ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck goose bee pig turkey fly "
    "llama camel bat gorilla hedgehog kangaroo"
).split()


class PromptError(UserError, ValueError):
    """Prompts that cannot be used (reported as one line by the CLI)."""


def _all_digit_prompts() -> List[str]:
    from diffalign.rewards.digits import digit_prompts

    return digit_prompts()


BUILTIN_PROMPTS = {
    "digits": lambda: [f"a handwritten digit {word}" for word in DIGIT_WORDS],
    "digits_all": _all_digit_prompts,  # every phrasing the bundled model was trained on (80 prompts)
    "simple_animals": lambda: [f"a painting of a {animal}" for animal in SIMPLE_ANIMALS],
}


class PromptSource:
    """Draws each epoch's prompts reproducibly from `(seed, epoch)`, so every process and a resumed run agree."""

    def __init__(self, prompts: Optional[List[str]] = None, fn: Optional[Callable[[], str]] = None):
        if not prompts and fn is None:
            raise PromptError("no prompts: give `prompts`, `prompt_file` or `prompt_fn`")
        self.prompts = list(prompts or [])
        self.fn = fn

    def epoch_prompts(self, epoch: int, num_prompts: int, seed: int, weights: Optional[np.ndarray] = None) -> List[str]:
        """`num_prompts` prompts for `epoch`: uniform draws (without replacement while the list allows), or, with
        `weights` (one per listed prompt), weighted draws with replacement."""
        if weights is not None:
            if self.fn is not None:
                raise PromptError("weighted prompt selection needs a prompt list, not a prompt function")
            rng = np.random.default_rng([seed, epoch])
            index = rng.choice(len(self.prompts), size=num_prompts, replace=True, p=weights / weights.sum())
            return [self.prompts[i] for i in index]
        if self.fn is not None:
            state = random.getstate()
            random.seed(seed * 1_000_003 + epoch)
            try:
                return [str(self.fn()) for _ in range(num_prompts)]
            finally:
                random.setstate(state)
        rng = np.random.default_rng([seed, epoch])
        index = rng.choice(len(self.prompts), size=num_prompts, replace=num_prompts > len(self.prompts))
        return [self.prompts[i] for i in index]

    @property
    def is_list(self) -> bool:
        return self.fn is None

    def grid_prompts(self, num_prompts: int, seed: int) -> List[str]:
        """Fixed prompts for before/after grids: the list in order (cycled), or fixed draws from the function."""
        if self.fn is not None:
            return self.epoch_prompts(2**31, num_prompts, seed)
        return [self.prompts[i % len(self.prompts)] for i in range(num_prompts)]


class PromptDifficulty:
    """Recent rewards per prompt, and sampling weights that favour prompts of moderate difficulty.

    A prompt's weight is the spread (std) of its last `buffer_size` rewards: policy-gradient and reward-difference
    updates learn only from reward differences between samples of the same prompt, so a prompt that every sample
    already solves (or that none does) teaches nothing and is drawn less. Prompts with fewer than `min_count` rewards
    get the largest weight seen (they are explored first), and every weight is at least `floor` x the largest, so no
    prompt is dropped for good and the estimates stay fresh.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 4, floor: float = 0.1):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.floor = floor
        self.rewards: Dict[str, List[float]] = {}

    def record(self, prompts: List[str], rewards) -> None:
        for prompt, reward in zip(prompts, np.asarray(rewards, dtype=np.float64).reshape(-1).tolist()):
            if np.isfinite(reward):
                buffer = self.rewards.setdefault(prompt, [])
                buffer.append(reward)
                del buffer[: -self.buffer_size]

    def weights(self, prompts: List[str]) -> np.ndarray:
        spread = np.array([np.std(self.rewards[p]) if len(self.rewards.get(p, ())) >= self.min_count else np.nan
                           for p in prompts])
        known = spread[np.isfinite(spread)]
        top = known.max() if known.size and known.max() > 0 else 1.0
        spread = np.where(np.isfinite(spread), spread, top)
        return np.maximum(spread, self.floor * top)

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count, "floor": self.floor,
                "rewards": {p: list(r) for p, r in self.rewards.items()}}

    def load_state_dict(self, state: dict):
        self.buffer_size, self.min_count, self.floor = state["buffer_size"], state["min_count"], state["floor"]
        self.rewards = {p: list(r) for p, r in state["rewards"].items()}


def read_prompt_file(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise PromptError(f"prompt file '{path}' does not exist")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PromptError(f"prompt file '{path}' cannot be read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PromptError(f"prompt file '{path}' is not UTF-8 text (line {line}, byte 0x{data[e.start]:02x}): "
                          f"save it as UTF-8") from None
    if "\x00" in text:
        raise PromptError(f"prompt file '{path}' is not a text file (it holds NUL bytes)")
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise PromptError(f"prompt file '{path}' has no prompts")
    return prompts


def prompt_source(prompts=None, prompt_file=None, prompt_fn=None) -> PromptSource:
    """Builds the prompt source of a config (exactly one of the three, or `digits` when none is given)."""
    if prompts:
        return PromptSource(prompts=prompts)
    if prompt_file:
        return PromptSource(prompts=read_prompt_file(prompt_file))
    prompt_fn = prompt_fn or "digits"
    if prompt_fn in BUILTIN_PROMPTS:
        return PromptSource(prompts=BUILTIN_PROMPTS[prompt_fn]())
    if ":" not in prompt_fn:
        raise PromptError(f"unknown prompt_fn '{prompt_fn}'; built-ins: {', '.join(BUILTIN_PROMPTS)}, or module:function")
    module_name, _, attr = prompt_fn.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)  # runs user code, as documented
    except (ImportError, AttributeError) as e:
        raise PromptError(f"prompt_fn '{prompt_fn}' cannot be loaded ({e})") from None
    if not callable(fn):
        raise PromptError(f"prompt_fn '{prompt_fn}' is not a function")
    try:
        result = fn()
    except Exception as e:
        raise PromptError(f"prompt_fn '{prompt_fn}' failed: {first_line(e)}") from e
    if isinstance(result, (list, tuple)):
        return PromptSource(prompts=[str(p) for p in result])
    return PromptSource(fn=fn)
