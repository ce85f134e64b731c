"""Prompt sources: a list, a file, a built-in set, or a user's `module:function`."""

import importlib
import os
import random
from typing import Callable, List, Optional

import numpy as np

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# DDPO's `simple_animals` set (kvablack/ddpo-pytorch, assets/simple_animals.txt), used by PRDP's small-scale runs.
SIMPLE_ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf lizard beetle "
    "ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck goose bee pig turkey fly "
    "llama camel bat gorilla hedgehog kangaroo"
).split()


class PromptError(ValueError):
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

    def epoch_prompts(self, epoch: int, num_prompts: int, seed: int) -> List[str]:
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


    def grid_prompts(self, num_prompts: int, seed: int) -> List[str]:
        """Fixed prompts for before/after grids: the list in order (cycled), or fixed draws from the function."""
        if self.fn is not None:
            return self.epoch_prompts(2**31, num_prompts, seed)
        return [self.prompts[i % len(self.prompts)] for i in range(num_prompts)]


def read_prompt_file(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise PromptError(f"prompt file '{path}' does not exist")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
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
    result = fn()
    if isinstance(result, (list, tuple)):
        return PromptSource(prompts=[str(p) for p in result])
    return PromptSource(fn=fn)
