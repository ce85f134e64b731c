"""`diffalign bench`: speed and memory of rollouts, training epochs, learning, and RLG sampling.

Every figure is a ratio against a floor or a baseline measured **in the same run**, with the repeats interleaved
(alternating order) and the median taken, so that load from other processes shifts both sides alike.

* `rollout`: `diffalign.rollout.sample_trajectories` (trajectories with log-probs) against the family's diffusers
  pipeline `__call__` with the same shapes (steps, CFG, eta=1, `output_type="pt"`).
* `train`: one epoch of each registered trainer (`trainer.step(epoch)`, after a warm-up epoch) against the denoiser
  forward and backward passes that epoch contains (recorded with torch module hooks), replayed alone on inputs of
  the same shapes; plus where the rest of the epoch goes (the recorded epoch, split by the trainer's own
  `time_sample`/`time_reward`/`time_train`).
* `learn`: wall time to reach `--target` reward per trainer configuration (`LEARN_CONFIGS`, plain dicts of config
  overrides, or any registered algorithm by its name) against a DDPO baseline configured like the reference code.
* `rlg`: the family's RLG pipeline (single-pass and two-pass LoRA paths, step windows) against plain CFG sampling
  with its diffusers pipeline on the same (LoRA) model.

The commands run on a user's own model directory (any registered family) and use only what the package exports.

One module per benchmark (`diffalign/bench/<name>.py`, each with `run_benchmark(ctx)`); each writes a JSON file
(`--output`, default `runs/bench/bench_<sub>.json`) and prints a table. See docs/bench.md.
"""

import argparse
import importlib
import json
import os
import sys

from .common import BenchError, Context, format_table, machine_info
from .learn import LEARN_CONFIGS

SUBCOMMANDS = ("rollout", "train", "learn", "rlg")
RESULTS_DIR = os.path.join("runs", "bench")  # where `--output` goes by default


def default_output(sub: str) -> str:
    """`runs/bench/bench_<sub>.json`: results stay out of the working directory unless `--output` says otherwise."""
    return os.path.join(RESULTS_DIR, f"bench_{sub}.json")


# ------------------------------------------------------------------------------------------------- arguments
def common_arguments() -> argparse.ArgumentParser:
    """The options every benchmark shares (model, shapes, device, output, trainer overrides), as a parent parser:
    `argparse.ArgumentParser(parents=[common_arguments()])` gives a script the same options (see
    examples/research/tradeoff/tradeoff.py)."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model and shapes")
    g.add_argument("--model", default="digits", help="bundled model name (digits, digits-flow) or a local diffusers directory")
    g.add_argument("--tiny", action="store_true", help="tiny random components (diffalign.testing), for smoke tests")
    g.add_argument("--sd15-random", action="store_true",
                   help="SD1.5-shaped UNet/VAE/CLIP text encoder with random weights (a GPU check; CPU needs --force)")
    g.add_argument("--batch-size", type=int, default=None, help="images per sampling batch (default 8, tiny 4)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: preset, else 20; tiny 10)")
    g.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    g.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: preset, else 5.0)")
    g.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="condition image of an editing or image-to-video model (FLUX.1 Kontext, Qwen-Image-Edit, Wan "
                        "image-to-video), the same for every prompt; repeat for several (Qwen-Image-Edit-Plus, in "
                        "order). Default for such a model: one generated image of the sampled size (RGB noise, "
                        "--seed)")
    g.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 3; learn: seeds, 1)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="weights/mixed precision (fp16/bf16 only meaningful on CUDA)")
    g.add_argument("--xformers", action="store_true", help="xformers attention (CUDA with xformers installed only)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on a CPU: spinning intra-op threads on a shared machine slow "
                        "small models tenfold; 0 keeps torch's default)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--force", action="store_true", help="run SD1.5-sized models or fp16/bf16 on a CPU anyway")
    g.add_argument("--output", default=None, help=f"JSON file (default {default_output('<sub>')})")
    t = common.add_argument_group("train and learn")
    t.add_argument("--prompts-per-epoch", type=int, default=None, help="prompts per epoch (default: preset, else 2)")
    t.add_argument("--images-per-prompt", type=int, default=None, help="images per prompt (default: preset, else 4)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every trainer (YAML value), e.g. --set train_micro_batch_size=8")
    return common


def add_arguments(parser: argparse.ArgumentParser):
    """Adds `diffalign bench <sub>` and its options to the `bench` sub-parser of the CLI."""
    common = common_arguments()
    sub = parser.add_subparsers(dest="bench_command", metavar="{rollout,train,learn,rlg}", required=True)
    sub.add_parser("rollout", parents=[common], help="trajectory sampling with log-probs vs plain pipeline sampling")
    train = sub.add_parser("train", parents=[common], help="epoch time of each trainer vs its denoiser passes alone")
    train.add_argument("--algorithms", default=None,
                       help="comma-separated registered algorithms (diffalign.trainers.TRAINERS; default: all)")
    train.add_argument("--reward-latency", type=float, default=None, metavar="SECONDS",
                       help="instead: epoch time with a remote reward answering after SECONDS (a local "
                            "diffalign.rewards.serve --latency), asynchronous and synchronous scoring, against the "
                            "same reward without latency")
    learn = sub.add_parser("learn", parents=[common], help="time to reach a reward, per trainer configuration")
    learn.add_argument("--target", type=float, default=None, help="reward to reach (default 0.9 for digits)")
    learn.add_argument("--reward", default=None, help="reward name (default: digit_correctness, or "
                                                      "jpeg_compressibility for --tiny/other models)")
    learn.add_argument("--max-epochs", type=int, default=30, help="give up after this many epochs")
    learn.add_argument("--window", type=int, default=1,
                       help="the reward of an epoch is the mean reward_mean of the last WINDOW epochs")
    learn.add_argument("--eval-images", type=int, default=0,
                       help="judge the target on this many images of fixed prompts and seeds sampled after each epoch "
                            "(not timed); 0: on the epoch's own training samples")
    learn.add_argument("--prdp-inner-epochs", type=int, default=4, help="K of the PRDP configurations")
    learn.add_argument("--configs", default=None,
                       help=f"comma-separated subset of: {', '.join(LEARN_CONFIGS)}, or any registered algorithm's "
                            "name (its defaults; the baseline always runs, or comes from --baseline-from)")
    learn.add_argument("--baseline-from", default=None, metavar="JSON",
                       help="take the baseline's runs from this earlier `bench learn --output` of the same settings "
                            "(model, reward, target, epochs, evaluation, seeds, shared settings) instead of running it "
                            "again; its CPU seconds are of one thread, so they compare across runs")
    rlg = sub.add_parser("rlg", parents=[common], help="RLG sampling (single/two pass, windows) vs plain CFG")
    rlg.add_argument("--rlg-scale", type=float, default=1.5)
    rlg.add_argument("--lora-std", type=float, default=0.1, help="std of the random LoRA B weights")


def run(args, benchmark=None) -> int:
    """Runs `benchmark(ctx)` (default: `diffalign.bench.<args.bench_command>.run_benchmark`); writes the JSON and
    prints the table. Returns the exit code (2, with one line, for a `BenchError` or a user error: a model that
    cannot load, an unreadable `--image`)."""
    from diffalign.errors import UserError

    ctx = None
    try:
        ctx = Context(args)
        fn = benchmark or importlib.import_module(f"{__name__}.{args.bench_command}").run_benchmark
        result = fn(ctx)
    except (BenchError, UserError) as e:
        print(f"diffalign: error: {e}", file=sys.stderr)
        return 2
    finally:
        if ctx is not None:
            ctx.close()  # the generated condition image and prompt file
    result = {
        "benchmark": args.bench_command,
        "command": ctx.command_line(),
        "machine": machine_info(ctx),
        "settings": ctx.settings,
        **result,
    }
    output = args.output or default_output(args.bench_command)
    if os.path.dirname(output):
        os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(format_table(result))
    print(f"\nwritten {output}")
    return 0


