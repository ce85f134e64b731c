"""A resumed run keeps the per-prompt state of prompts with condition images: DDPO's per-prompt reward statistics
(`PerPromptStatTracker`) and the prompt-difficulty buffers go through a checkpoint with each prompt's images (the same
instruction on two images stays two entries), and a killed Kontext DDPO run with per-prompt statistics resumes bit for
bit."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.advantages import PerPromptStatTracker
from diffalign.checkpoint import load_checkpoint, save_checkpoint
from diffalign.prompts import ConditionedPrompt, PromptDifficulty, condition_images_of

from cli_helpers import assert_killed_run_resumes_bit_identically


def _write_image(path, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(path)
    return str(path)


def _round_trip(tmp_path, trainer_state):
    save_checkpoint(str(tmp_path), 0, {"trainer": trainer_state}, "hash", keep=2)
    return load_checkpoint(str(tmp_path / "checkpoints" / "epoch-000000"))["trainer"]


def test_per_prompt_state_of_conditioned_prompts_survives_a_checkpoint(tmp_path):
    first, second = (_write_image(tmp_path / f"{i}.png", i) for i in range(2))
    prompts = [ConditionedPrompt("make it red", (first,)), ConditionedPrompt("make it red", (second,)), "a red car"]
    batch = [p for p in prompts for _ in range(2)]
    tracker = PerPromptStatTracker(buffer_size=8, min_count=3)
    difficulty = PromptDifficulty(min_count=1)
    rewards = torch.tensor([0.0, 1.0, 10.0, 12.0, 5.0, 7.0])
    tracker.update(batch, rewards)
    difficulty.record(batch, rewards.numpy())

    state = _round_trip(tmp_path, {"stat_tracker": tracker.state_dict(), "difficulty": difficulty.state_dict()})
    resumed, resumed_difficulty = PerPromptStatTracker(), PromptDifficulty()
    resumed.load_state_dict(state["stat_tracker"])
    resumed_difficulty.load_state_dict(state["difficulty"])
    assert list(resumed.stats) == prompts and [condition_images_of(p) for p in resumed.stats] == [(first,), (second,),
                                                                                                    ()]
    assert list(resumed_difficulty.rewards) == prompts
    torch.testing.assert_close(resumed_difficulty.weights(prompts), difficulty.weights(prompts))
    # the next epoch's advantages use the buffers kept before the checkpoint: the same as without the checkpoint
    later = torch.tensor([3.0, 4.0, 11.0, 9.0, 6.0, 2.0])
    assert torch.equal(resumed.update(batch, later), tracker.update(batch, later))
    # the checkpoint's JSON names each prompt's images
    with open(tmp_path / "checkpoints" / "epoch-000000" / "trainer.json") as f:
        assert f.read().count(json.dumps(second)[1:-1]) == 2  # the tracker's key and the difficulty's


@pytest.mark.slow  # ~60 s: three Kontext DDPO runs
def test_a_killed_kontext_ddpo_run_with_per_prompt_statistics_resumes_bit_identically(tmp_path):
    from diffalign.families import FluxKontextFamily

    model = FluxKontextFamily.save_tiny(str(tmp_path / "model"))
    (tmp_path / "edits").mkdir()
    for i in range(2):
        _write_image(tmp_path / "edits" / f"{i}.png", i)
    prompt_file = tmp_path / "edits" / "train.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": "make it red", "image": f"{i}.png"}) + "\n"
                                   for i in range(2)))  # the same instruction on two images: two prompts
    # 2 images per prompt and epoch, per-prompt statistics from 3 rewards on: a fresh tracker after the resume would
    # normalise epoch 1 with the batch's statistics, the straight run with the prompt's 4 rewards
    args = ["train", "ddpo", "--model", model, "--prompt_file", str(prompt_file), "--num_epochs", "3",
            "--sample_num_steps", "2", "--sample_num_prompts_per_epoch", "2", "--sample_images_per_prompt", "2",
            "--sample_batch_size", "4", "--train_batch_size", "4", "--grid_num_images", "1", "--checkpoint_every", "1",
            "--reward", "jpeg_compressibility", "--sample_resolution", "16", "--lora_rank", "4", "--seed", "3",
            "--train_learning_rate", "0.05", "--train_clip_range", "1.0", "--advantage_mode", "per_prompt",
            "--per_prompt_min_count", "3", "--final_eval_num_images", "0"]
    assert_killed_run_resumes_bit_identically(args, tmp_path, epochs=3)
