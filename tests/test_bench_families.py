"""`diffalign bench rollout|train|rlg` on a tiny model directory of every registered family (the bench must run on
every supported family: no per-family table to forget). Tiny settings; no timed assertion."""

import json

import pytest

from diffalign.cli import main
from diffalign.families import FAMILIES

SHAPES = ["--steps", "2", "--repeats", "1", "--threads", "1"]


def shapes(name: str) -> list:
    """SHAPES at the family's tiny image side: 16, or its `tiny_resolution` (QwenImage 2.1: 32)."""
    from diffalign.families import family_named

    return SHAPES + ["--resolution", str(getattr(family_named(name), "tiny_resolution", 16))]


@pytest.fixture(scope="module", params=[family.name for family in FAMILIES.values()])
def family_dir(request, tmp_path_factory):
    from diffalign.families import family_named
    from diffalign.testing import save_tiny_pipeline

    family = family_named(request.param)
    if family.requires_condition_image or family.requires_condition_video:  # the bench samples text prompts
        pytest.skip(f"{request.param} cannot sample without a condition image or video, which the bench does not "
                    f"pass yet")

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


def test_bench_rollout(family_dir, capsys, tmp_path):
    figures = bench(capsys, tmp_path, "rollout", family_dir, "--batch-size", "2")["figures"]
    assert figures["rollout_images_per_s"]["value"] > 0 and figures["rollout_time_ratio"]["value"] > 0


def test_bench_train(family_dir, capsys, tmp_path):
    result = bench(capsys, tmp_path, "train", family_dir, "--prompts-per-epoch", "1", "--images-per-prompt", "2",
                   "--set", "train_num_inner_epochs=1")
    for algorithm in ("prdp", "ddpo"):
        assert result["figures"][f"{algorithm}_epoch_s"]["value"] > 0
        assert result["figures"][f"{algorithm}_unet_floor_s"]["value"] > 0


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
