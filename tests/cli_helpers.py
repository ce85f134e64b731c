"""Helpers shared by the command-line tests: a tiny run's flags and the one-line error check."""

# A run of a few seconds on the bundled digits model: 2 prompts x 2 images, 2 steps, a checkpoint every epoch.
TINY_RUN = ["--prompts", "[a cat, a dog]", "--sample_num_steps", "2", "--sample_num_prompts_per_epoch", "2",
            "--sample_images_per_prompt", "2", "--grid_num_images", "1", "--reward", "jpeg_compressibility",
            "--train_batch_size", "2", "--checkpoint_every", "1", "--seed", "3", "--final_eval_num_images", "0"]


def one_line(err: str) -> str:
    """The CLI's one `diffalign: error:` line in `err` (asserting there is exactly one and no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("diffalign: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def cli(args):
    """`python -m diffalign.cli ARGS` as a subprocess, one torch thread, offline."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "diffalign.cli"] + args, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def assert_killed_run_resumes_bit_identically(args, tmp_path, epochs: int = 3,
                                              final_weights: str = "pytorch_lora_weights.safetensors"):
    """Runs `args` straight and, beside it, killed (SIGKILL) after its first checkpoint then resumed with
    `--resume`; the final weights (`final/<final_weights>`: the LoRA, or a full fine-tune's denoiser file) and every
    logged metric (times aside) must be equal."""
    import json
    import signal
    import time

    import torch
    from safetensors.torch import load_file

    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight = cli(args + ["--output_dir", str(straight_dir)])
    killed = cli(args + ["--output_dir", str(killed_dir)])
    deadline = time.time() + 240
    while not (killed_dir / "checkpoints" / "epoch-000000").exists():
        assert killed.poll() is None and time.time() < deadline, killed.communicate()
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (killed_dir / "final").exists()
    assert straight.wait(timeout=300) == 0, straight.communicate()
    resumed = cli(args + ["--resume", str(killed_dir)])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a = load_file(str(straight_dir / "final" / final_weights))
    b = load_file(str(killed_dir / "final" / final_weights))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    def metrics(run):
        with open(run / "metrics.jsonl") as f:
            return [{k: v for k, v in json.loads(line).items() if not k.startswith("time_")} for line in f]

    assert metrics(killed_dir) == metrics(straight_dir)
    assert [r["epoch"] for r in metrics(killed_dir)] == list(range(epochs))
