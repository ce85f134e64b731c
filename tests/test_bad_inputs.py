"""Issue 15: every bad command line and every malformed user reward ends in one line and exit code 2."""

import os

import pytest

from diffalign.cli import main

CHEAP = ["--prompts", "[a cat, a dog]", "--num_epochs", "1", "--sample_num_steps", "2", "--sample_num_prompts_per_epoch",
         "2", "--sample_images_per_prompt", "2", "--grid_num_images", "1", "--train_batch_size", "2",
         "--reward", "jpeg_compressibility"]


def run_error(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("diffalign: error:")]
    assert code == 2 and len(lines) == 1, (code, err)
    return lines[0]


BAD_COMMAND_LINES = {
    # flags: part of the one-line message
    "lr -1": (["--train_learning_rate", "-1"], "train_learning_rate must be > 0"),
    "beta1 2": (["--train_adam_beta1", "2"], "train_adam_beta1 must be in [0, 1)"),
    "batch 0": (["--train_batch_size", "0"], "train_batch_size must be >= 1"),
    "eta nan": (["--sample_eta", "nan"], "sample_eta must be a finite number"),
    "guidance nan": (["--sample_guidance_scale", "nan"], "sample_guidance_scale must be a finite number"),
    "seed -1": (["--seed", "-1"], "seed must be in [0, 2^63)"),
    "fp32": (["--mixed_precision", "fp32"], "mixed_precision must be one of no, fp16, bf16"),
    "resolution -16": (["--sample_resolution", "-16"], "sample_resolution must be a positive"),
    "resolution 0": (["--sample_resolution", "0"], "sample_resolution must be a positive"),
    "prompts notalist": (["--prompts", "notalist"], "prompts: expected a list"),
    "prompts []": (["--prompts", "[]"], "prompts must be a non-empty list"),
    "unknown reward_kwargs": (["--reward_kwargs", "{nosuch: 1}"], "reward 'jpeg_compressibility' has no option 'nosuch'"),
    "non-numeric mixture weight": (["--reward", "{jpeg_compressibility: heavy}"], "weight must be a finite number"),
    "empty mixture": (["--reward", "{}"], "empty mixture"),
    "clip range -1": (["--train_clip_range", "-1"], "train_clip_range must be > 0"),
    "buffer 0": (["--per_prompt_buffer_size", "0"], "per_prompt_buffer_size must be >= 1"),
    "no such lora target": (["--lora_target_modules", "[nosuchmodule]"], "'nosuchmodule' match no module"),
}


@pytest.mark.parametrize("case", list(BAD_COMMAND_LINES))
def test_bad_command_line_is_one_line_exit_2(tiny_model_dir, tmp_path, capsys, case):
    flags, message = BAD_COMMAND_LINES[case]
    out = tmp_path / "run"
    line = run_error(["train", "ddpo", "--model", tiny_model_dir, "--output_dir", str(out)] + CHEAP + flags, capsys)
    assert message in line, line
    assert not (out / "metrics.jsonl").exists()


def test_output_dir_that_is_a_file(tiny_model_dir, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("not a directory")
    line = run_error(["train", "ddpo", "--model", tiny_model_dir, "--output_dir", str(target)] + CHEAP, capsys)
    assert "is a file" in line and target.read_text() == "not a directory"


def test_prdp_clip_eps_must_be_positive(tiny_model_dir, tmp_path, capsys):
    line = run_error(["train", "prdp", "--model", tiny_model_dir, "--output_dir", str(tmp_path / "run"),
                      "--train_clip_eps", "-1"], capsys)
    assert "train_clip_eps must be > 0" in line


def test_user_errors_share_one_base_class():
    from diffalign.checkpoint import CheckpointError
    from diffalign.cli import _user_errors
    from diffalign.config import ConfigError
    from diffalign.errors import UserError
    from diffalign.prompts import PromptError
    from diffalign.rewards import (MissingRewardDependencyError, RewardError, RewardWeightsNotFoundError,
                                   UnknownRewardError)
    from diffalign.runlog import RunDirectoryError
    from diffalign.trainers.base import NonFiniteError

    for cls in (ConfigError, PromptError, CheckpointError, UnknownRewardError, RewardError, RewardWeightsNotFoundError,
                MissingRewardDependencyError, RunDirectoryError, NonFiniteError):
        assert issubclass(cls, UserError), cls
    assert issubclass(ConfigError, ValueError) and issubclass(MissingRewardDependencyError, ImportError)
    assert _user_errors()[0] is UserError


REWARDS = """
import numpy as np
import torch

def wrong_count(images, prompts, metadata=None):
    return torch.zeros(len(images) + 1)

def raises(images, prompts, metadata=None):
    raise RuntimeError("the scorer crashed\\nwith a second line")

def strings(images, prompts, metadata=None):
    return ["good"] * len(images)

def returns_none(images, prompts, metadata=None):
    return None

def two_columns(images, prompts, metadata=None):
    return np.zeros((len(images), 2))
"""

BAD_REWARDS = {
    "wrong_count": "returned shape [5] for 4 images",
    "raises": "failed: RuntimeError: the scorer crashed",
    "strings": "returned a list of str",
    "returns_none": "returned None",
    "two_columns": "returned shape [4, 2] for 4 images",
}


@pytest.mark.parametrize("reward", list(BAD_REWARDS))
def test_malformed_user_reward_is_one_line_naming_it(tiny_model_dir, tmp_path, capsys, monkeypatch, reward):
    (tmp_path / "bad_rewards_mod.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["train", "ddpo", "--model", tiny_model_dir, "--output_dir", str(tmp_path / "run")] + CHEAP
    line = run_error(args + ["--reward", f"bad_rewards_mod:{reward}"], capsys)
    assert f"reward 'bad_rewards_mod:{reward}'" in line and BAD_REWARDS[reward] in line, line
    if reward != "raises":
        return
    # inside a mixture, the part is named
    line = run_error(args + ["--reward", f"{{bad_rewards_mod:{reward}: 1.0}}", "--output_dir", str(tmp_path / "mix")],
                     capsys)
    assert f"reward 'bad_rewards_mod:{reward}'" in line, line


def test_reward_output_check_accepts_what_rewards_return():
    import numpy as np
    import torch

    from diffalign.rewards import RewardError, check_reward_output

    for ok in (torch.ones(3), np.ones(3), [1, 2, 3], torch.ones(3, 1), torch.tensor([1.0, float("nan"), 2.0])):
        assert check_reward_output("r", ok, 3).shape == (3,)
    assert check_reward_output("r", 0.5, 1).tolist() == [0.5]
    for bad in (torch.ones(3, 2), torch.ones(2), "abc", None, [None, None, None], torch.ones(3, dtype=torch.complex64)):
        with pytest.raises(RewardError, match="reward 'r'"):
            check_reward_output("r", bad, 3)


def test_hub_id_without_a_reachable_hub_is_one_line_exit_2(tmp_path):
    """A hub id with HF_HUB_OFFLINE unset on a machine whose hub cannot be reached (here: a closed local port) is one
    line and exit code 2 within seconds, not the hub client's retries and a loader traceback."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: nothing listens there
    for command in (["train", "prdp", "--model", "stabilityai/stable-diffusion-2-1", "--output_dir",
                     str(tmp_path / "run")],
                    ["generate", "--model", "stabilityai/stable-diffusion-2-1", "--output-dir", str(tmp_path / "gen")]):
        result = subprocess.run([sys.executable, "-m", "diffalign.cli", *command], capture_output=True, text=True,
                                env=env, timeout=120)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "stabilityai/stable-diffusion-2-1" in lines[0] and "cannot be reached" in lines[0]
