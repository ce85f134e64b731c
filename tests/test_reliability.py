import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from diffalign.checkpoint import CheckpointError, find_resumable, list_checkpoints

COMMON = [
    "--prompts", "[a cat, a dog]", "--sample_num_steps", "2", "--sample_num_prompts_per_epoch", "2",
    "--sample_images_per_prompt", "2", "--grid_num_images", "1", "--reward", "jpeg_compressibility",
    "--checkpoint_every", "1", "--checkpoints_total_limit", "10", "--seed", "3",
]
ARGS = COMMON + ["--train_batch_size", "2"]


def cli(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "diffalign.cli"] + args, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_killed_and_resumed_run_ends_with_identical_weights(tiny_model_dir, tmp_path):
    common = ["train", "ddpo", "--model", tiny_model_dir, "--num_epochs", "5"] + ARGS
    straight = cli(common + ["--output_dir", str(tmp_path / "straight")])
    killed_dir = tmp_path / "killed"
    killed = cli(common + ["--output_dir", str(killed_dir)])
    # SIGKILL as soon as the second checkpoint exists (the run may be anywhere in its third epoch).
    deadline = time.time() + 240
    while not (killed_dir / "checkpoints" / "epoch-000001").exists():
        assert killed.poll() is None and time.time() < deadline, killed.communicate()
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (killed_dir / "final").exists()
    assert straight.wait(timeout=300) == 0, straight.communicate()

    resumed = cli(["train", "ddpo", "--model", tiny_model_dir, "--num_epochs", "5", "--resume", str(killed_dir)] + ARGS)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a = load_file(str(tmp_path / "straight" / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(killed_dir / "final" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key  # bit-identical on CPU
    with open(killed_dir / "metrics.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1, 2, 3, 4]


def test_corrupted_checkpoints_are_detected(tiny_model_dir, tmp_path):
    from diffalign.cli import main

    run = tmp_path / "run"
    assert main(["train", "ddpo", "--model", tiny_model_dir, "--num_epochs", "2", "--output_dir", str(run)] + ARGS) == 0
    first, second = list_checkpoints(str(run))
    # truncate a weight file of the newest checkpoint: named as corrupted, and the run dir falls back to the older
    model_file = os.path.join(second, "model.safetensors")
    with open(model_file, "r+b") as f:
        f.truncate(os.path.getsize(model_file) // 2)
    with pytest.raises(CheckpointError, match="model.safetensors does not match its checksum"):
        find_resumable(second)
    assert find_resumable(str(run))[0] == first
    # a checkpoint without manifest (killed mid-write) is incomplete
    os.remove(os.path.join(first, "manifest.json"))
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find_resumable(str(run))
    # temporary directories of interrupted writes are never picked
    shutil.copytree(second, os.path.join(run, "checkpoints", ".tmp-epoch-000009-1"))
    assert all(".tmp" not in p for p in list_checkpoints(str(run)))


def test_resume_with_different_settings_is_refused(tiny_model_dir, tmp_path, capsys):
    from diffalign.cli import main

    run = tmp_path / "run"
    assert main(["train", "ddpo", "--model", tiny_model_dir, "--num_epochs", "1", "--output_dir", str(run)] + ARGS) == 0
    code = main(["train", "ddpo", "--model", tiny_model_dir, "--num_epochs", "2", "--resume", str(run),
                 "--train_learning_rate", "0.5"] + ARGS)
    assert code == 2 and "different configuration" in capsys.readouterr().err


ALGORITHM_ARGS = {
    "prdp": ["--train_num_inner_epochs", "2", "--train_beta", "0.1", "--train_clip_eps", "0.01"],
    "ddpo": ["--train_batch_size", "2", "--advantage_mode", "per_prompt", "--per_prompt_min_count", "2",
             "--train_reuse_epochs", "1"],
}


@pytest.mark.parametrize("algorithm", ["prdp", "ddpo"])
def test_two_processes_stay_in_sync(tiny_model_dir, tmp_path, algorithm):
    out = tmp_path / "dist"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffalign.cli",
           "train", algorithm, "--model", tiny_model_dir, "--output_dir", str(out), "--num_epochs", "2"]
    cmd += ALGORITHM_ARGS[algorithm] + COMMON
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [0, 1]  # written once, by the main process
    assert all(r["params_max_rank_diff"] == 0.0 for r in records)
    assert all(r["images"] == 4 for r in records)  # rewards gathered from both ranks (2 prompts x 2 images)
    if algorithm == "ddpo":  # each rank also trained on its own samples of the epoch before
        assert [r["reused_samples"] for r in records] == [0, 4]
    assert len(list_checkpoints(str(out))) == 2 and (out / "final" / "pytorch_lora_weights.safetensors").exists()
