"""`diffalign bench rlg` on an SD3 model directory (tiny components): the SD3 RLG pipeline against SD3's own
pipeline, and the RLG guider against the CFG guider in the modular SD3 pipeline (no timed assertion)."""

import json

from diffalign.cli import main
from diffalign.testing import save_tiny_pipeline


def test_bench_rlg_sd3(capsys, tmp_path):
    model_dir = save_tiny_pipeline("sd3", str(tmp_path / "sd3"))
    output = tmp_path / "rlg.json"
    argv = ["bench", "rlg", "--model", model_dir, "--steps", "2", "--batch-size", "1", "--repeats", "1"]
    assert main(argv + ["--threads", "1", "--output", str(output)]) == 0
    table = capsys.readouterr().out
    result = json.loads(output.read_text())
    assert result["settings"]["family"] == "sd3"
    figures = result["figures"]
    for name in ("single_pass_0_1", "two_pass_0_1", "single_pass_0_0.5", "guider_0_1", "guider_0_0.5"):
        key = f"rlg_{name}_over_guider_cfg" if name.startswith("guider") else f"rlg_{name}_over_plain"
        assert figures[key]["value"] > 0 and key in table
    assert figures["guider_cfg_images_per_s"]["value"] > 0
