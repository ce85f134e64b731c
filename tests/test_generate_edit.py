"""`diffalign generate --image PATH` on a tiny FLUX.1 Kontext directory, through the CLI: the condition image is
edited at every RLG scale and the grid shows it before each edit; a missing or unreadable image, an image for a text-to-image model and an editing
model without one are one line with exit code 2."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.families import FluxKontextFamily, load_family
from diffalign.prompts import load_condition_tensor
from diffalign.utils.peft_utils import add_lora

from cli_helpers import one_line

SIZE = 16


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    """`(model directory, LoRA directory, condition image)`: a tiny Kontext, a random LoRA written by the family."""
    root = tmp_path_factory.mktemp("kontext")
    model = FluxKontextFamily.save_tiny(str(root / "model"))
    family = load_family(model)
    add_lora(family.denoiser, rank=4, alpha=8, target_modules=family.default_lora_target_modules)
    generator = torch.Generator().manual_seed(0)
    for param in family.denoiser.parameters():
        if param.requires_grad:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    family.save_lora(family.denoiser, str(root / "lora"))
    image = root / "input.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(image)
    return model, str(root / "lora"), str(image)


def _argv(model, lora, out, *extra):
    return ["generate", "--model", model, "--lora", lora, "--prompt", "make it red", "--rlg-scale", "0", "1",
            "--num-images", "1", "--steps", "2", "--resolution", str(SIZE), "--output-dir", str(out), *extra]


def test_generate_edits_the_image_and_the_grid_shows_it_before_each_edit(kontext, tmp_path, monkeypatch):
    import diffalign.plotting
    from diffalign.cli import main

    model, lora, image = kontext
    shown = []
    rows_grid = diffalign.plotting.rows_grid
    monkeypatch.setattr(diffalign.plotting, "rows_grid", lambda rows, *a, **k: shown.append(rows) or rows_grid(
        rows, *a, **k))
    assert main(_argv(model, lora, tmp_path / "out", "--image", image)) == 0
    assert (tmp_path / "out" / "rlg_grid.png").is_file()
    rows = shown[0]
    assert len(rows) == 2 and all(row.shape == (2, 3, SIZE, SIZE) for row in rows)  # (input, edit) per scale
    condition = torch.nn.functional.interpolate(load_condition_tensor(image)[None], size=(SIZE, SIZE),
                                                mode="bilinear", antialias=True)[0].clamp(0, 1)
    assert all(torch.allclose(row[0], condition) for row in rows)

    # every image is written, and the LoRA changes the edit (w = 0 against FluxKontextPipeline of the base and w = 1
    # with the LoRA, for the same image: tests/test_family_common.py::test_generate_picks_the_family_rlg_pipeline)
    for scale, row in zip((0, 1), rows):
        with Image.open(tmp_path / "out" / "rlg_images" / f"w{scale}" / "p00_seed0.png") as png:
            saved = torch.from_numpy(np.asarray(png, dtype=np.float32) / 255).permute(2, 0, 1)
        torch.testing.assert_close(saved, row[1], atol=1 / 255, rtol=0)
    assert (rows[1][1] - rows[0][1]).abs().max() > 1e-3


@pytest.mark.parametrize("case, message", [
    ("missing", r"--image: condition image '.*nowhere.png' does not exist"),
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
             "none": [], "text-to-image": ["--image", image]}[case]
    if case == "text-to-image":
        model = save_tiny_pipeline("sd", str(tmp_path / "sd"))
        lora = str(tmp_path)  # not loaded: the flag is refused first
    assert main(_argv(model, lora, tmp_path / "out", *extra)) == 2
    assert re.search(message, one_line(capsys.readouterr().err))
    assert not (tmp_path / "out").exists()
