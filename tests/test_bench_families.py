"""`diffalign bench rollout|train|rlg` on a tiny model directory of every registered family (the bench must run on
every supported family: no per-family table to forget), editing and image-to-video families with a condition image
(`--image`, or the generated one). Tiny settings; no timed assertion."""

import json

import pytest

from diffalign.cli import main
from diffalign.families import FAMILIES, family_named

SHAPES = ["--steps", "2", "--repeats", "1", "--threads", "1"]


def shapes(name: str) -> list:
    """SHAPES at the family's tiny image side: 16, or its `tiny_resolution` (QwenImage 2.1: 32)."""
    from diffalign.families import family_named

    return SHAPES + ["--resolution", str(getattr(family_named(name), "tiny_resolution", 16))]


@pytest.fixture(autouse=True)
def _small_condition_images(monkeypatch):
    """Qwen-Image-Edit's condition images at 64^2 pixels instead of its pipelines' 1024^2
    (`diffalign.testing.shrink_qwenimage_edit_conditions`): a tiny VAE encodes 1024^2 pixels in minutes on a CPU."""
    from diffalign.testing import shrink_qwenimage_edit_conditions

    shrink_qwenimage_edit_conditions(monkeypatch)


@pytest.fixture(scope="module", params=[family.name for family in FAMILIES.values()])
def family_dir(request, tmp_path_factory):
    from diffalign.testing import save_tiny_pipeline

    family = family_named(request.param)
    if family.requires_condition_video:  # the bench passes condition images, not videos
        pytest.skip(f"{request.param} cannot sample without a condition video, which the bench does not pass")

    return request.param, save_tiny_pipeline(request.param, str(tmp_path_factory.mktemp("bench") / request.param))


def bench(capsys, tmp_path, sub, family_dir, *extra):
    name, model = family_dir
    output = tmp_path / f"{sub}.json"
    assert main(["bench", sub, "--model", model, *shapes(name), "--output", str(output), *extra]) == 0
    table = capsys.readouterr().out
    result = json.loads(output.read_text())
    for name, entry in result["figures"].items():
        assert name in table, f"{name} missing from the table"
    return result


def _condition_images_recorded(name: str, settings: dict) -> bool:
    """Whether the result's settings say the bench generated the condition image exactly where the family takes one
    (FLUX.1 Kontext, Qwen-Image-Edit, Wan image-to-video), and name none for a text-to-image family."""
    from diffalign.families import family_named

    recorded = settings.get("condition_images")
    if not family_named(name).max_condition_images:
        return recorded is None
    return len(recorded) == 1 and recorded[0].startswith("generated: ")


def test_bench_rollout(family_dir, capsys, tmp_path):
    result = bench(capsys, tmp_path, "rollout", family_dir, "--batch-size", "2")
    figures = result["figures"]
    assert figures["rollout_images_per_s"]["value"] > 0 and figures["rollout_time_ratio"]["value"] > 0
    assert _condition_images_recorded(family_dir[0], result["settings"])


def test_bench_train(family_dir, capsys, tmp_path):
    result = bench(capsys, tmp_path, "train", family_dir, "--prompts-per-epoch", "1", "--images-per-prompt", "2",
                   "--set", "train_num_inner_epochs=1")
    for algorithm in ("prdp", "ddpo"):
        assert result["figures"][f"{algorithm}_epoch_s"]["value"] > 0
        assert result["figures"][f"{algorithm}_unet_floor_s"]["value"] > 0
    # an editing / image-to-video model trains on a prompt file whose rows carry the image
    assert _condition_images_recorded(family_dir[0], result["settings"])
    assert ("prompt_file" in result["settings"]["shared"]) == ("condition_images" in result["settings"])


def test_bench_rlg(family_dir, capsys, tmp_path):
    from diffalign.bench.rlg import guider_blocks
    from diffalign.families import family_named

    name, model = family_dir
    family = family_named(name)
    if family.rlg_route() is None:  # the registry allows none: one clear line, exit code 2
        assert main(["bench", "rlg", "--model", model, *shapes(name), "--output", str(tmp_path / "rlg.json")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "has no RLG pipeline" in err[0]
        return
    result = bench(capsys, tmp_path, "rlg", family_dir, "--batch-size", "1")
    assert result["settings"]["family"] == name and result["settings"]["rlg_route"] == family.rlg_route()
    assert _condition_images_recorded(name, result["settings"])
    figures = result["figures"]
    # the RLG pipeline's cases where the family has one
    for case in ("single_pass_0_1", "two_pass_0_1", "single_pass_0_0.5"):
        assert (f"rlg_{case}_over_plain" in figures) == (family.rlg_pipeline_class is not None)
        if family.rlg_pipeline_class is not None:
            assert figures[f"rlg_{case}_over_plain"]["value"] > 0
    # the RLG guider runs where the family's modular blocks take a guider (SDXL, SD3, Z-Image): the only route of a
    # family without an RLG pipeline
    with_guider = guider_blocks(family) is not None
    assert with_guider or family.rlg_pipeline_class is not None
    assert ("rlg_guider_0_1_over_guider_cfg" in figures) == with_guider
    if with_guider:
        assert figures["rlg_guider_0_1_over_guider_cfg"]["value"] > 0
        assert figures["guider_cfg_images_per_s"]["value"] > 0
        assert figures["plain_images_per_s"]["value"] > 0


# ------------------------------------------------------------------- condition images (default suite, ~6 s)
def _write_image(path, seed):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_bench_rollout_gives_every_image_to_both_sides(tmp_path, capsys, monkeypatch):
    """`bench rollout --image a --image b` on Qwen-Image-Edit-Plus: the rollouts and the pipeline (called once per
    prompt: it refuses a batch) encode every prompt with both images, in order."""
    import diffusers
    from PIL import Image

    from diffalign.testing import save_tiny_pipeline

    model = save_tiny_pipeline("qwenimage_edit_plus", str(tmp_path / "model"))
    first, second = str(tmp_path / "red.png"), str(tmp_path / "blue.png")
    Image.new("RGB", (28, 20), (255, 0, 0)).save(first)
    Image.new("RGB", (28, 20), (0, 0, 255)).save(second)
    seen = []
    encode = diffusers.QwenImageEditPlusPipeline.encode_prompt
    monkeypatch.setattr(diffusers.QwenImageEditPlusPipeline, "encode_prompt", lambda self, prompt, image=None, **kw: (
        seen.append((len(prompt) if isinstance(prompt, list) else 1, image)) or encode(self, prompt, image, **kw)))
    result = bench(capsys, tmp_path, "rollout", ("qwenimage_edit_plus", model), "--batch-size", "2",
                   "--image", first, "--image", second)
    assert result["settings"]["condition_images"] == [first, second]
    assert result["settings"]["plain_calls_per_batch"] == 2
    assert seen and all(count == 1 and len(images) == 2 for count, images in seen)
    # in order: the first given ("Picture 1") is the red one, on both sides
    assert all(images[0].getpixel((0, 0)) == (255, 0, 0) and images[1].getpixel((0, 0)) == (0, 0, 255)
               for _, images in seen)


def test_bench_rlg_times_an_edit_model_on_a_generated_image(tmp_path, capsys):
    """`bench rlg` on Qwen-Image-Edit without `--image`: a generated condition image, the pipeline and the RLG guider
    called once per prompt."""
    from diffalign.testing import save_tiny_pipeline

    model = save_tiny_pipeline("qwenimage_edit", str(tmp_path / "model"))
    result = bench(capsys, tmp_path, "rlg", ("qwenimage_edit", model), "--batch-size", "2")
    assert result["settings"]["condition_images"] == ["generated: 16x16 RGB noise, seed 0"]
    assert result["settings"]["calls_per_batch"] == 2
    assert result["figures"]["rlg_guider_0_1_over_guider_cfg"]["value"] > 0


@pytest.mark.parametrize("case, message", [
    ("text-to-image", "--image: sd models take no condition image (text-to-image); leave --image out"),
    ("too many", "--image: qwenimage_edit_plus models take at most 3 condition images; got 4"),
    ("missing", "--image: condition image '{missing}' does not exist"),
])
def test_bad_bench_images_are_one_line_before_loading(tmp_path, capsys, case, message):
    """A condition image for a text-to-image model, more than the model takes, or a missing file: one line, exit code
    2, before any weights load (the Edit-Plus directory holds only its `model_index.json`)."""
    from cli_helpers import one_line

    image, missing = _write_image(tmp_path / "input.png", 0), str(tmp_path / "nowhere.png")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPlusPipeline"}))
    argv = {"text-to-image": ["--tiny", "--image", image],
            "too many": ["--model", str(model), *["--image", image] * 4],
            "missing": ["--model", str(model), "--image", missing]}[case]
    output = tmp_path / "rollout.json"
    assert main(["bench", "rollout", *argv, *SHAPES, "--output", str(output)]) == 2
    assert one_line(capsys.readouterr().err) == "diffalign: error: " + message.format(missing=missing)
    assert not output.exists()
