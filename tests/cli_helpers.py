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
