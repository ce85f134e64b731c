"""Evaluates a digits text-to-image model: mean `digit_correctness` reward and independent-judge accuracy.

Samples `--num-per-digit` images per digit (prompts cycle through the training phrasings,
`diffalign.rewards.digits.PROMPT_TEMPLATES`) with the stock `StableDiffusionPipeline` (DDIM), then
prints one JSON line per setting: mean reward (probability the shipped classifier gives the prompted
digit), judge accuracy (scikit-learn SVC on 8x8, independent of the reward classifier), per-digit
judge accuracy, and seconds. Optionally saves a PNG grid (one row per digit).

Examples (what docs/digits.md reports)::

    # base quality: 200 samples, 50 DDIM steps, CFG 2
    HF_HUB_OFFLINE=1 python scripts/eval_digits_model.py --steps 50 --guidance-scale 2 --grid /tmp/digits.png
    # low-headroom settings for RL presets
    HF_HUB_OFFLINE=1 python scripts/eval_digits_model.py --sweep

`--sweep` runs the settings table (steps, CFG, eta) of docs/digits.md instead of a single setting.
A LoRA can be evaluated with `--lora DIR` (loaded with `pipe.load_lora_weights`).
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffalign.rewards.digits import (  # noqa: E402
    PROMPT_TEMPLATES,
    digit_correctness,
    digit_prompt,
    judge_predictions,
    prompt_digits,
)

SWEEP = [  # (steps, guidance scale, eta)
    (50, 2.0, 0.0),
    (50, 3.0, 0.0),
    (20, 2.0, 1.0),
    (20, 1.0, 1.0),
    (10, 2.0, 1.0),
    (10, 1.0, 1.0),
    (10, 1.0, 0.0),
    (10, 0.75, 1.0),  # scales below 1 interpolate towards the unconditional model (diffalign's sampler)
    (10, 0.5, 1.0),
    (20, 0.5, 1.0),
]


def default_model_dir() -> str:
    from importlib import resources

    return str(resources.files("diffalign") / "models" / "digits")


def load_pipeline(model_dir: str, lora: str = None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    if lora:
        pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, prompts, steps, guidance_scale, eta, seed, batch_size):
    images = []
    for i in range(0, len(prompts), batch_size):
        generator = torch.Generator().manual_seed(seed + i)
        if guidance_scale < 1:
            # The stock pipeline turns guidance off at scales <= 1; the trainers' sampler interpolates
            # eps_u + w (eps_c - eps_u) for any w (it needs eta > 0: it records log-probs).
            from diffalign.rollout import sample_trajectories

            trajectories = sample_trajectories(pipe, prompts[i : i + batch_size], steps, guidance_scale, eta,
                                               generator=generator)
            images.append(trajectories.images.float().cpu())
            continue
        out = pipe(prompts[i : i + batch_size], num_inference_steps=steps, guidance_scale=guidance_scale, eta=eta,
                   generator=generator, output_type="pt")
        images.append(out.images.float().cpu())
    return torch.cat(images)


def save_grid(images: torch.Tensor, rows: int, path: str, scale: int = 4, max_cols: int = 20) -> None:
    from PIL import Image

    n, _, h, w = images.shape
    cols = n // rows
    grid = images[: rows * cols].reshape(rows, cols, 3, h, w)[:, :max_cols]
    cols = grid.shape[1]
    pad = torch.full((rows, cols, 3, h + 2, w + 2), 0.35)
    pad[:, :, :, 1:-1, 1:-1] = grid
    array = pad.permute(0, 3, 1, 4, 2).reshape(rows * (h + 2), cols * (w + 2), 3).clamp(0, 1).numpy()
    image = Image.fromarray((array * 255).round().astype(np.uint8))
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def evaluate(pipe, num_per_digit, steps, guidance_scale, eta, seed=0, batch_size=100, grid=None, classifier=None):
    prompts = [digit_prompt(d, i % len(PROMPT_TEMPLATES)) for d in range(10) for i in range(num_per_digit)]
    t0 = time.time()
    images = sample(pipe, prompts, steps, guidance_scale, eta, seed, batch_size)
    seconds = time.time() - t0
    reward = digit_correctness(classifier_path=classifier)(images, prompts, None)
    targets = prompt_digits(prompts)
    correct = (judge_predictions(images) == targets).float()
    if grid:
        save_grid(images, 10, grid)
    return {
        "steps": steps,
        "guidance_scale": guidance_scale,
        "eta": eta,
        "num_images": len(prompts),
        "reward_mean": round(reward.mean().item(), 4),
        "reward_std": round(reward.std().item(), 4),
        "judge_accuracy": round(correct.mean().item(), 4),
        "judge_per_digit": [round(correct[targets == d].mean().item(), 2) for d in range(10)],
        "sample_seconds": round(seconds, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model dir (default: the bundled diffalign/models/digits)")
    parser.add_argument("--lora", default=None, help="optional LoRA weights dir to load on top")
    parser.add_argument("--num-per-digit", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--grid", default=None, help="save a PNG grid of the samples here (one row per digit)")
    parser.add_argument("--sweep", action="store_true", help="evaluate the settings table instead of one setting")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model_dir = args.model or default_model_dir()
    pipe = load_pipeline(model_dir, args.lora)
    # The classifier shipped beside the model (models/digits/classifier), else the bundled one.
    classifier = os.path.join(model_dir, "classifier")
    classifier = classifier if os.path.exists(os.path.join(classifier, "config.json")) else None
    settings = SWEEP if args.sweep else [(args.steps, args.guidance_scale, args.eta)]
    for steps, cfg, eta in settings:
        grid = args.grid
        if grid and args.sweep:
            root, ext = os.path.splitext(grid)
            grid = f"{root}_s{steps}_cfg{cfg:g}_eta{eta:g}{ext or '.png'}"
        result = evaluate(pipe, args.num_per_digit, steps, cfg, eta, args.seed, args.batch_size, grid, classifier)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
