"""`diffalign generate --image PATH` on a tiny FLUX.1 Kontext directory, through the CLI: the condition image is
edited at every RLG scale and the grid shows it before each edit; a missing or unreadable image, an image for a
text-to-image model, an editing model without one and more images than the model takes are one line with exit code 2.
`--image a.png --image b.png` on a tiny Qwen-Image-Edit-Plus directory: both images reach the model, in order, as
`QwenImageEditPlusPipeline`'s `image=[a, b]` (w = 0 the pipeline on the base, w = 1 with the LoRA), and the grid shows
both before each edit."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.families import FluxKontextFamily, QwenImageEditPlusFamily, load_family
from diffalign.prompts import load_condition_tensor
from diffalign.utils.peft_utils import add_lora

from cli_helpers import one_line

SIZE = 16


def _tiny_model_with_lora(family_class, root):
    """`(model directory, LoRA directory)`: a tiny model of `family_class`, a random LoRA written by the family."""
    model = family_class.save_tiny(str(root / "model"))
    family = load_family(model)
    add_lora(family.denoiser, rank=4, alpha=8, target_modules=family.default_lora_target_modules)
    generator = torch.Generator().manual_seed(0)
    for param in family.denoiser.parameters():
        if param.requires_grad:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    family.save_lora(family.denoiser, str(root / "lora"))
    return model, str(root / "lora")


def _write_image(path, seed, size=(20, 28)):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    """`(model directory, LoRA directory, condition image)`: a tiny Kontext, a random LoRA written by the family."""
    root = tmp_path_factory.mktemp("kontext")
    model, lora = _tiny_model_with_lora(FluxKontextFamily, root)
    return model, lora, _write_image(root / "input.png", 0)


def _argv(model, lora, out, *extra):
    return ["generate", "--model", model, "--lora", lora, "--prompt", "make it red", "--rlg-scale", "0", "1",
            "--num-images", "1", "--steps", "2", "--resolution", str(SIZE), "--output-dir", str(out), *extra]


def _grid_rows(monkeypatch):
    """The rows `diffalign.plotting.rows_grid` is given (one list per call), recorded while it still draws them."""
    import diffalign.plotting

    shown = []
    rows_grid = diffalign.plotting.rows_grid
    monkeypatch.setattr(diffalign.plotting, "rows_grid", lambda rows, *a, **k: shown.append(rows) or rows_grid(
        rows, *a, **k))
    return shown


def _resized(image):
    """The condition image as the grid shows it: resized to the sampled size."""
    return torch.nn.functional.interpolate(load_condition_tensor(image)[None], size=(SIZE, SIZE), mode="bilinear",
                                           antialias=True)[0].clamp(0, 1)


def test_generate_edits_the_image_and_the_grid_shows_it_before_each_edit(kontext, tmp_path, monkeypatch):
    from diffalign.cli import main

    model, lora, image = kontext
    shown = _grid_rows(monkeypatch)
    assert main(_argv(model, lora, tmp_path / "out", "--image", image)) == 0
    assert (tmp_path / "out" / "rlg_grid.png").is_file()
    rows = shown[0]
    assert len(rows) == 2 and all(row.shape == (2, 3, SIZE, SIZE) for row in rows)  # (input, edit) per scale
    assert all(torch.allclose(row[0], _resized(image)) for row in rows)

    # every image is written, and the LoRA changes the edit (w = 0 against FluxKontextPipeline of the base and w = 1
    # with the LoRA, for the same image: tests/test_family_common.py::test_generate_picks_the_family_rlg_pipeline)
    for scale, row in zip((0, 1), rows):
        with Image.open(tmp_path / "out" / "rlg_images" / f"w{scale}" / "p00_seed0.png") as png:
            saved = torch.from_numpy(np.asarray(png, dtype=np.float32) / 255).permute(2, 0, 1)
        torch.testing.assert_close(saved, row[1], atol=1 / 255, rtol=0)
    assert (rows[1][1] - rows[0][1]).abs().max() > 1e-3


def test_repeated_image_flags_edit_every_image_as_the_edit_plus_pipeline(tmp_path, monkeypatch):
    """`--image a --image b` on Qwen-Image-Edit-Plus: w = 0 is `QwenImageEditPlusPipeline` on the base with
    `image=[a, b]` (not with `a` alone), w = 1 the same with the LoRA; the grid shows a, b, then the edit."""
    import diffusers

    from diffalign.cli import main
    from diffalign.families import family_for_pipeline
    from diffalign.testing import shrink_qwenimage_edit_conditions

    shrink_qwenimage_edit_conditions(monkeypatch)  # a tiny VAE at the pipeline's 1024^2 pixels takes minutes
    model, lora = _tiny_model_with_lora(QwenImageEditPlusFamily, tmp_path)
    first, second = _write_image(tmp_path / "a.png", 1), _write_image(tmp_path / "b.png", 2)
    shown = _grid_rows(monkeypatch)
    assert main(_argv(model, lora, tmp_path / "out", "--image", first, "--image", second)) == 0
    rows = shown[0]
    assert len(rows) == 2 and all(row.shape == (3, 3, SIZE, SIZE) for row in rows)  # (a, b, edit) per scale
    assert all(torch.allclose(row[0], _resized(first)) and torch.allclose(row[1], _resized(second)) for row in rows)

    stock = diffusers.QwenImageEditPlusPipeline.from_pretrained(model, **QwenImageEditPlusFamily.loaded_components(
        model))
    stock.set_progress_bar_config(disable=True)
    family = family_for_pipeline(stock)

    def edit(*paths):
        condition = {"image": [Image.open(path).convert("RGB") for path in paths]}
        return stock(prompt="make it red", num_inference_steps=2, height=SIZE, width=SIZE, output_type="pt",
                     generator=torch.Generator().manual_seed(0), **condition,
                     **family.pipeline_call_kwargs(SIZE, SIZE),
                     **QwenImageEditPlusFamily.rlg_guidance_pipeline_kwargs(
                         QwenImageEditPlusFamily.default_guidance_scale)).images[0]

    base = edit(first, second)
    torch.testing.assert_close(rows[0][2], base, atol=1e-4, rtol=1e-4)
    assert (edit(first) - base).abs().max() > 1e-4  # the second image reaches the model: one image edits otherwise
    stock.load_lora_weights(lora)
    torch.testing.assert_close(rows[1][2], edit(first, second), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case, message", [
    ("missing", r"--image: condition image '.*nowhere.png' does not exist"),
    ("two for kontext", r"--image: flux_kontext models take one condition image; got 2$"),
    ("unreadable", r"--image: condition image '.*bad.png' is not a readable image"),
    ("none", r"flux_kontext models edit an image: give the condition image with --image PATH"),
    ("text-to-image", r"--image: sd models take no condition image \(text-to-image\); leave --image out"),
])
def test_bad_image_flags_are_one_line_and_exit_code_2(kontext, tmp_path, capsys, case, message):
    import re

    from diffalign.cli import main
    from diffalign.testing import save_tiny_pipeline

    model, lora, image = kontext
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    extra = {"missing": ["--image", str(tmp_path / "nowhere.png")], "unreadable": ["--image", str(bad)],
             "none": [], "text-to-image": ["--image", image], "two for kontext": ["--image", image] * 2}[case]
    if case == "text-to-image":
        model = save_tiny_pipeline("sd", str(tmp_path / "sd"))
        lora = str(tmp_path)  # not loaded: the flag is refused first
    assert main(_argv(model, lora, tmp_path / "out", *extra)) == 2
    assert re.search(message, one_line(capsys.readouterr().err))
    assert not (tmp_path / "out").exists()


def test_more_images_than_edit_plus_takes_is_one_line_before_loading(tmp_path, capsys):
    """Four `--image` for Qwen-Image-Edit-Plus (at most 3): one line, exit code 2, before any weights load (the
    directory holds only its `model_index.json`)."""
    import json

    from diffalign.cli import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPlusPipeline"}))
    image = _write_image(tmp_path / "input.png", 0)
    argv = ["generate", "--model", str(model), "--lora", str(tmp_path), "--prompt", "make it red", "--output-dir",
            str(tmp_path / "out"), *["--image", image] * 4]
    assert main(argv) == 2
    assert one_line(capsys.readouterr().err) == ("diffalign: error: --image: qwenimage_edit_plus models take at "
                                                 "most 3 condition images; got 4")
    assert not (tmp_path / "out").exists()
