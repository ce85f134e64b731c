"""Rewards for the bundled digits model (`diffalign/models/digits`): is the prompted digit drawn?

* `digit_correctness`: probability the shipped CNN classifier (`models/digits/classifier`) gives the
  digit named in the prompt. This is the training reward.
* `digit_judge` / `judge_accuracy`: an *independent* judge, a scikit-learn SVC fitted (once, cached)
  on `sklearn.datasets.load_digits` at its native 8x8 resolution; images are area-downsampled to
  8x8. It shares no weights or architecture with the reward classifier, so reward hacking of the
  CNN does not fool it. Scores 1.0/0.0 per image.

Images are float `[B, 3, H, W]` in [0, 1]; digits are bright ink on a dark background (like MNIST),
RGB is averaged to grey. Prompts name their digit as a word ("seven") or a numeral ("7"); see
`digit_prompts()` for the phrasings the model was trained on. A `metadata` dict with a `"digit"`
key overrides the prompt.
"""

import json
import os
import random
import re
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import register_reward

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Prompt phrasings used to train the bundled model; `{word}` is "seven", `{numeral}` is "7".
PROMPT_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {numeral}",
    "a drawing of the digit {word}",
    "digit {numeral}",
    "the number {word}",
    "a handwritten {numeral}",
    "an image of the digit {word}",
    "{word}",
)

_DIGIT_RE = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b", re.IGNORECASE)


def digit_prompt(digit: int, template: int = 0) -> str:
    """The prompt for `digit` (0-9) in phrasing number `template` of `PROMPT_TEMPLATES`."""
    return PROMPT_TEMPLATES[template].format(word=DIGIT_WORDS[digit], numeral=str(digit))


def digit_prompts(digit: Optional[int] = None) -> List[str]:
    """All training prompts (every phrasing of every digit), or those of one `digit`."""
    digits = range(10) if digit is None else [digit]
    return [digit_prompt(d, t) for d in digits for t in range(len(PROMPT_TEMPLATES))]


def random_digit_prompt(rng: Optional[random.Random] = None) -> Tuple[str, dict]:
    """A DDPO-style prompt function: a random training phrasing of a random digit, and `{"digit": d}`."""
    rng = rng or random
    digit = rng.randrange(10)
    return digit_prompt(digit, rng.randrange(len(PROMPT_TEMPLATES))), {"digit": digit}


def parse_digit(prompt: str) -> int:
    """The digit named in `prompt` ("seven" or "7"); `ValueError` if it names none or several."""
    found = {m.lower() for m in _DIGIT_RE.findall(prompt)}
    digits = {int(m) if m.isdigit() else DIGIT_WORDS.index(m) for m in found}
    if len(digits) != 1:
        what = "no digit" if not digits else f"several digits {sorted(digits)}"
        raise ValueError(f"prompt {prompt!r} names {what}; expected one of zero..nine or 0..9")
    return digits.pop()


def prompt_digits(prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> torch.Tensor:
    """The target digit of each prompt (`metadata[i]["digit"]` wins when given)."""
    digits = []
    for i, prompt in enumerate(prompts):
        meta = metadata[i] if metadata is not None and i < len(metadata) and metadata[i] else {}
        digits.append(int(meta["digit"]) if "digit" in meta else parse_digit(prompt))
    return torch.tensor(digits, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# Data: sklearn's 8x8 digits, upsampled exactly as the bundled model was trained.


def upsample_digits(images_8x8: torch.Tensor, resolution: int) -> torch.Tensor:
    """`[N, 8, 8]` values in 0..16 -> `[N, 1, R, R]` in [0, 1] (bilinear, bright ink on dark)."""
    x = images_8x8.float().reshape(-1, 1, 8, 8) / 16.0
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x.clamp(0, 1)


def load_digit_images(resolution: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """All 1797 `load_digits` images as `[N, 1, R, R]` floats in [0, 1], and their labels `[N]`."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return upsample_digits(torch.from_numpy(data.images), resolution), torch.from_numpy(data.target).long()


def to_grey(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """`[B, C, H, W]` in [0, 1] (any device/dtype) -> `[B, 1, R, R]` float32 on the CPU."""
    x = images.detach().float().cpu()
    if x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="area" if x.shape[-1] > resolution else "bilinear")
    return x.clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# The reward classifier (a small CNN, weights in models/digits/classifier).


class DigitClassifier(nn.Module):
    """Small CNN: grey `[B, 1, R, R]` in [0, 1] -> logits `[B, 10]`."""

    def __init__(self, resolution: int = 32, channels: Sequence[int] = (16, 32, 64), num_classes: int = 10):
        super().__init__()
        self.resolution = resolution
        layers, c_in = [], 1
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(4, c), nn.SiLU(), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x * 2 - 1)
        return self.head(x.mean(dim=(2, 3)))


def default_classifier_path() -> str:
    from importlib import resources

    return str(resources.files("diffalign") / "models" / "digits" / "classifier")


def save_classifier(model: DigitClassifier, directory: str, **extra) -> None:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    config = {
        "architecture": "DigitClassifier",
        "resolution": model.resolution,
        "channels": [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)],
        "num_classes": model.head[-1].out_features,
        "input": "grey [B, 1, R, R] in [0, 1], bright ink on dark background",
        **extra,
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(directory, "model.safetensors"))


@lru_cache(maxsize=4)
def load_classifier(directory: Optional[str] = None) -> DigitClassifier:
    """The shipped digit classifier (eval mode, float32, CPU)."""
    from safetensors.torch import load_file

    directory = directory or default_classifier_path()
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    model = DigitClassifier(config["resolution"], config["channels"], config["num_classes"])
    model.load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
    return model.eval().requires_grad_(False)


def digit_probabilities(images: torch.Tensor, classifier_path: Optional[str] = None) -> torch.Tensor:
    """Class probabilities `[B, 10]` of the shipped classifier."""
    model = load_classifier(classifier_path)
    with torch.no_grad():
        return model(to_grey(images, model.resolution)).softmax(dim=-1)


@register_reward("digit_correctness")
def digit_correctness(classifier_path: Optional[str] = None):
    """Probability the shipped classifier assigns to the digit named in each prompt, in [0, 1]."""

    def reward(images, prompts, metadata=None):
        targets = prompt_digits(prompts, metadata)
        probs = digit_probabilities(images, classifier_path)
        return probs.gather(1, targets[:, None])[:, 0].float()

    return reward


# ----------------------------------------------------------------------------------------------
# The independent judge (scikit-learn SVC on 8x8, fitted once on load_digits).


@lru_cache(maxsize=1)
def _judge():
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    data = load_digits()
    return SVC(gamma=0.001, C=10.0).fit(data.data, data.target)  # sklearn's own digits recipe, 0..16


def judge_predictions(images: torch.Tensor) -> torch.Tensor:
    """The judge's digit for each image `[B]` (images area-downsampled to 8x8 grey)."""
    x = to_grey(images, 8).reshape(len(images), 64).numpy() * 16.0
    return torch.from_numpy(_judge().predict(x)).long()


def judge_correct(images: torch.Tensor, prompts: Sequence[str], metadata=None) -> torch.Tensor:
    """1.0 where the independent judge sees the prompted digit, else 0.0 (float32, CPU)."""
    return (judge_predictions(images) == prompt_digits(prompts, metadata)).float()


def judge_accuracy(images: torch.Tensor, prompts: Sequence[str], metadata=None) -> float:
    """Fraction of images in which the independent judge recognises the prompted digit."""
    return judge_correct(images, prompts, metadata).mean().item()


@register_reward("digit_judge")
def digit_judge():
    """Independent judge (sklearn SVC on 8x8): 1.0 if it recognises the prompted digit, else 0.0."""
    return judge_correct
