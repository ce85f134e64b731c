"""Soak test: many epochs on the bundled model, watching resident memory for leaks.

    HF_HUB_OFFLINE=1 python scripts/soak.py --algorithm prdp --epochs 200 --output /tmp/soak

Prints the resident set size (RSS) every few epochs and exits non-zero when RSS after warm-up grows by more than
`--max-growth` (default 5%). Not part of the default test suite (it takes minutes); checkpoints are written every
`--checkpoint-every` epochs so the checkpoint path is soaked too.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithm", choices=["ddpo", "prdp"], default="prdp")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--reward", default="digit_correctness")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20, help="epochs before the baseline RSS is taken")
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--max-growth", type=float, default=0.05)
    parser.add_argument("--output", default="/tmp/diffalign-soak")
    args = parser.parse_args(argv)

    import torch

    from diffalign.config import load_config
    from diffalign.trainers import DDPOTrainer, PRDPTrainer

    overrides = dict(
        model=args.model, reward=args.reward, prompt_fn="digits", output_dir=args.output, num_epochs=args.epochs,
        sample_num_steps=4, sample_num_prompts_per_epoch=4, sample_images_per_prompt=2, sample_batch_size=8,
        checkpoint_every=args.checkpoint_every, checkpoints_total_limit=2, grid_num_images=4,
    )
    if args.algorithm == "ddpo":
        overrides.update(train_batch_size=8)
    else:
        overrides.update(train_num_inner_epochs=1)
    config = load_config(args.algorithm, None, overrides)
    trainer = (DDPOTrainer if args.algorithm == "ddpo" else PRDPTrainer)(config)
    torch.set_num_threads(2)
    samples = []
    for epoch in range(args.epochs):
        trainer.step(epoch)
        if (epoch + 1) % args.checkpoint_every == 0:
            trainer.save_checkpoint(epoch)
        samples.append(rss_mb())
        if epoch % 10 == 0 or epoch == args.epochs - 1:
            print(f"epoch {epoch:4d}  rss {samples[-1]:8.1f} MB", flush=True)
    baseline = samples[min(args.warmup, len(samples) - 1)]
    peak_after = max(samples[args.warmup :]) if len(samples) > args.warmup else baseline
    growth = (peak_after - baseline) / baseline
    result = {"epochs": args.epochs, "rss_after_warmup_mb": baseline, "rss_peak_after_warmup_mb": peak_after,
              "rss_final_mb": samples[-1], "growth": growth, "max_growth": args.max_growth}
    print(json.dumps(result, indent=1))
    return 0 if growth < args.max_growth else 1


if __name__ == "__main__":
    sys.exit(main())
