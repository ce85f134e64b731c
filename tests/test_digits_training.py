import json
import os

import pytest
from safetensors.torch import load_file

from diffalign.cli import main


def test_short_training_run_on_the_bundled_model_changes_the_lora(tmp_path):
    out = tmp_path / "run"
    code = main(["train", "ddpo", "--config", "digits-ddpo", "--output_dir", str(out), "--num_epochs", "1",
                 "--sample_num_steps", "4", "--sample_num_prompts_per_epoch", "2", "--sample_images_per_prompt", "4",
                 "--sample_batch_size", "8", "--train_batch_size", "4", "--grid_num_images", "2",
                 "--final_eval_num_images", "0", "--advantage_mode", "group"])
    assert code == 0
    lora = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    up = [v for k, v in lora.items() if "lora_B" in k or "lora.up" in k]
    assert up and any(v.abs().max() > 0 for v in up)  # B starts at zero: any non-zero entry was learned
    with open(out / "metrics.jsonl") as f:
        record = json.loads(f.readline())
    assert 0.0 <= record["reward_mean"] <= 1.0 and 0.0 <= record["eval_mean"] <= 1.0


# Opt-in (`pytest -m slow`): the full presets, minutes each on a 2-core CPU.
MARGIN = 0.03  # measured: DDPO +0.049, PRDP +0.092 (docs/digits.md)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ddpo", "prdp"])
def test_digits_preset_raises_the_reward(tmp_path, algorithm):
    out = tmp_path / algorithm
    assert main(["train", algorithm, "--config", f"digits-{algorithm}", "--output_dir", str(out)]) == 0
    with open(os.path.join(out, "final_eval.json")) as f:
        final = json.load(f)
    assert final["trained"]["reward_mean"] >= final["base"]["reward_mean"] + MARGIN, final
