"""Reruns the README's result tables over several seeds and prints them as mean +- spread.

Each (preset, seed) is one `diffalign train` run with `--seed S` (which also picks the final evaluation's 200
fixed-seed images); the RLG table samples each seed's PRDP LoRA at several strengths with `diffalign generate`.
Runs whose outputs exist are reused, so an interrupted call continues where it stopped.

    python examples/research/tradeoff/reproduce_results.py        # README tables, seeds 0 1 2, two runs at a time
    python examples/research/tradeoff/reproduce_results.py --seeds 0 1 2 3 4 --jobs 1 --presets digits-prdp
    python examples/research/tradeoff/reproduce_results.py --presets --tradeoff-seeds 0 1 2   # reward hacking only
    python examples/research/tradeoff/reproduce_results.py --presets --tradeoff-flow-seeds 0  # the same, flow model

`--tradeoff-seeds` also runs the tradeoff experiment (`tradeoff.py` beside this file: the digits model trained on the hackable JPEG reward, 3 DDPO
and 3 PRDP arms, their RLG sweeps and the beta/w test; about 40 minutes per seed on one thread) once per seed and
prints its tables over those seeds; `--tradeoff-flow-seeds` does the same with `--model digits-flow` (about 75
minutes per seed).

Every run uses one torch thread (the bundled presets' default), so a run is bit-reproducible on this machine kind
whatever its core count; results are written to `<output>/results.json` and the tables to `<output>/results.md`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# preset -> algorithm (the README's tables: trajectory methods, then forward-process ones)
PRESETS = {
    "digits-prdp": "prdp",
    "digits-ddpo": "ddpo",
    "digits-flow-grpo": "ddpo",
    "digits-flow-prdp": "prdp",
    "digits-flow-grpo-guard": "ddpo",
    "digits-nft": "nft",
    "digits-flow-nft": "nft",
    "digits-awm": "awm",
    "digits-flow-awm": "awm",
    "digits-dgpo": "dgpo",
    "digits-flow-dgpo": "dgpo",
}
RLG_PRESET = "digits-prdp"
RLG_SCALES = ["0", "0.5", "1", "1.5", "2", "3"]
RLG_ARGS = ["--reward", "digit_correctness", "--steps", "10", "--guidance-scale", "1", "--eta", "1",
            "--num-images", "20"]


def run(command, log_path):
    """Runs `command`, its output in `log_path`; returns `(wall seconds, CPU seconds)`, the CPU time (user + sys)
    of that process and its children alone, which other work on the machine changes little (raises on failure)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    start = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {process.returncode}; see {log_path}")
    return time.time() - start, usage.ru_utime + usage.ru_stime


def train(preset: str, seed: int, output: str) -> dict:
    run_dir = os.path.join(output, f"{preset}-seed{seed}")
    result_path = os.path.join(run_dir, "final_eval.json")
    timing_path = os.path.join(output, f"{preset}-seed{seed}.time")
    if not os.path.isfile(result_path):
        if os.path.isdir(run_dir):  # an interrupted run: start it again
            import shutil

            shutil.rmtree(run_dir)
        wall, cpu = run([sys.executable, "-m", "diffalign.cli", "train", PRESETS[preset], "--config", preset,
                         "--seed", str(seed), "--output_dir", run_dir], os.path.join(output, f"{preset}-seed{seed}.log"))
        with open(timing_path, "w") as f:
            f.write(f"{wall:.1f} {cpu:.1f}\n")
    with open(result_path) as f:
        result = json.load(f)
    times = open(timing_path).read().split() if os.path.isfile(timing_path) else []
    result["wall_s"] = float(times[0]) if times else None
    result["cpu_s"] = float(times[1]) if len(times) > 1 else None  # files written before CPU time was recorded: none
    return result


def rlg(seed: int, output: str) -> dict:
    lora = os.path.join(output, f"{RLG_PRESET}-seed{seed}", "final")
    out_dir = os.path.join(output, f"rlg-{RLG_PRESET}-seed{seed}")
    result_path = os.path.join(out_dir, "rlg_rewards.json")
    if not os.path.isfile(result_path):
        run([sys.executable, "-m", "diffalign.cli", "generate", "--model", "digits", "--lora", lora, "--rlg-scale",
             *RLG_SCALES, *RLG_ARGS, "--seed", str(seed), "--output-dir", out_dir],
            os.path.join(output, f"rlg-seed{seed}.log"))
    with open(result_path) as f:
        return json.load(f)


TRADEOFF_DIRS = {"digits": "tradeoff", "digits-flow": "tradeoff-flow"}
TRADEOFF_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tradeoff.py")


def tradeoff(model: str, seed: int, output: str) -> dict:
    """`python tradeoff.py --model M --seed S` (defaults otherwise) in `<output>/tradeoff[-flow]-seed{S}`;
    reuses its JSON."""
    name = f"{TRADEOFF_DIRS[model]}-seed{seed}"
    out_dir = os.path.join(output, name)
    result_path = os.path.join(out_dir, "tradeoff.json")
    if not os.path.isfile(result_path):  # the bench itself reuses finished arms and resumes interrupted ones
        run([sys.executable, TRADEOFF_SCRIPT, "--model", model, "--seed", str(seed), "--output-dir", out_dir], os.path.join(output, f"{name}.log"))
    with open(result_path) as f:
        return json.load(f)


def spread(values, scale=1.0, digits=3) -> str:
    """`mean +- std (min-max)` of `values` (sample std over seeds)."""
    values = [v * scale for v in values]
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    std = statistics.stdev(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def tables(results: dict, rlg_results: dict, seeds) -> str:
    lines = [f"Seeds {', '.join(map(str, seeds))}; mean ± sample std (min–max) over seeds; 200 fixed-seed images per "
             "evaluation (`final_eval.json`); one torch thread per run.", "",
             "| preset | reward base | reward trained | judge base (%) | judge trained (%) | KL to base | wall time (min) "
             "| CPU time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for preset, runs in results.items():
        base = [r["base"]["reward_mean"] for r in runs]
        trained = [r["trained"]["reward_mean"] for r in runs]
        judge_base = [r["base"]["eval_mean"] for r in runs]
        judge_trained = [r["trained"]["eval_mean"] for r in runs]
        kl = [r["trained"]["kl_to_base"] for r in runs]
        walls = [r["wall_s"] / 60 for r in runs if r.get("wall_s")]
        cpus = [r["cpu_s"] for r in runs if r.get("cpu_s")]
        lines.append(f"| `{preset}` | {spread(base)} | {spread(trained)} | {spread(judge_base, 100, 1)} | "
                     f"{spread(judge_trained, 100, 1)} | {spread(kl)} | {spread(walls, digits=1) if walls else '-'} | "
                     f"{spread(cpus, digits=0) if cpus else '-'} |")
    lines += ["", "Per seed (reward trained, judge trained %, KL):", ""]
    for preset, runs in results.items():
        cells = [f"seed {s}: {r['trained']['reward_mean']:.3f}, {100 * r['trained']['eval_mean']:.1f}%, "
                 f"{r['trained']['kl_to_base']:.3f}" for s, r in zip(seeds, runs)]
        lines.append(f"- `{preset}`: " + "; ".join(cells))
    if rlg_results:
        lines += ["", f"RLG on each seed's `{RLG_PRESET}` LoRA (digit_correctness, 200 images per strength):", "",
                  "| `rlg_scale` w | " + " | ".join(RLG_SCALES) + " |", "|---|" + "---|" * len(RLG_SCALES)]
        row = []
        for w in RLG_SCALES:
            means = [next(e["reward_mean"] for e in r if float(e["rlg_scale"]) == float(w)) for r in rlg_results.values()]
            row.append(spread(means))
        lines.append("| digit_correctness | " + " | ".join(row) + " |")
    return "\n".join(lines)


def tradeoff_tables(results: dict, model: str = "digits") -> str:
    """The bench's RLG sweeps at w = 1 (each arm's trained model; 200 fixed images) and its beta/w test, over seeds."""
    seeds = list(results)
    first = results[seeds[0]]
    lines = [f"`python examples/research/tradeoff/tradeoff.py --model {model}` "
             "(`jpeg_compressibility` trained, `digit_judge` judged), "
             f"{'seeds' if len(seeds) > 1 else 'seed'} {', '.join(map(str, seeds))}" + ("; mean ± sample std (min–max) over seeds." if len(seeds) > 1 else "."), "",
             "Each arm's sampler on the sweep's fixed prompts and seeds (200 images), at RLG scale w:", "",
             "| arm | w | reward (JPEG, -kB) | judge (%) | KL to base |", "|---|---|---|---|---|"]

    def at(result, arm, w):
        return next(p for p in result["rlg"]["sweeps"][arm] if p["w"] == w)

    # w = 0 is the base model for every arm; w = 1 is the arm's trained model

    base = [r["rlg"]["base"] for r in results.values()]
    lines.append(f"| base | 0 | {spread([b['reward'] for b in base], digits=4)} | {spread([b['judge'] for b in base], 100, 1)} "
                 "| 0 |")
    for arm in first["rlg"]["sweeps"]:
        for w in (w for w in first["rlg"]["scales"] if w != 0):
            points = [at(r, arm, w) for r in results.values()]
            lines.append(f"| `{arm}` | {w:g} | {spread([p['reward'] for p in points], digits=4)} | "
                         f"{spread([p['judge'] for p in points], 100, 1)} | {spread([p['kl'] for p in points], digits=4)} |")
    lines += ["", "The beta/w test: the sampler against the model trained with the coefficient the test equates it "
              "with (absolute differences; pixel distance = mean per-image |Δ| of pixel values in [0, 1]; the last "
              "row of each pair: the two trained models against each other):", "",
              "| sampler | vs | Δreward | Δjudge (points) | ΔKL | pixel distance | pixel / models' |",
              "|---|---|---|---|---|---|---|"]
    for i, row in enumerate(first["beta_w"]):
        entries = [*((e, j) for j, e in enumerate(row["comparisons"])), (row["models"], None)]
        for entry, j in entries:
            rows = [r["beta_w"][i]["comparisons"][j] if j is not None else r["beta_w"][i]["models"]
                    for r in results.values()]
            ratio = spread([e["pixel_over_models"] for e in rows], digits=2) if j is not None else "1"
            lines.append(f"| {entry['sampler']} | {entry['vs']} | {spread([e['d_reward'] for e in rows], digits=4)} | "
                         f"{spread([e['d_judge'] for e in rows], 100, 1)} | {spread([e['d_kl'] for e in rows], digits=4)} | "
                         f"{spread([e['pixel_distance'] for e in rows])} | {ratio} |")
    train_min = [sum(a["wall_s"] for a in r["arms"].values()) / 60 for r in results.values()]
    sweep_min = [sum(r["rlg"]["sweep_s"].values()) / 60 for r in results.values()]
    lines += ["", f"Wall time per seed (one torch thread): training the {len(first['arms'])} arms "
              f"{spread(train_min, digits=0)} min, the RLG sweeps {spread(sweep_min, digits=0)} min."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--output", default=os.path.join("runs", "reproduce"))
    parser.add_argument("--no-rlg", action="store_true", help="skip the RLG table")
    parser.add_argument("--tradeoff-seeds", nargs="*", type=int, default=[],
                        help="also run the tradeoff experiment (tradeoff.py) for these seeds (about 40 min each) and print its tables")
    parser.add_argument("--tradeoff-flow-seeds", nargs="*", type=int, default=[],
                        help="the same with `--model digits-flow` (about 75 min each)")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)

    # the slowest runs first, so that the pool ends together
    order = sorted(((p, s) for p in args.presets for s in args.seeds), key=lambda ps: ("flow" not in ps[0], ps[1]))
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {key: pool.submit(train, *key, args.output) for key in order}
        results = {p: [futures[(p, s)].result() for s in args.seeds] for p in args.presets}
        rlg_results = {}
        if RLG_PRESET in args.presets and not args.no_rlg:
            rlg_futures = {s: pool.submit(rlg, s, args.output) for s in args.seeds}
            rlg_results = {s: f.result() for s, f in rlg_futures.items()}
        tradeoff_futures = {(model, s): pool.submit(tradeoff, model, s, args.output)
                            for model, seeds in (("digits", args.tradeoff_seeds), ("digits-flow", args.tradeoff_flow_seeds))
                            for s in seeds}
        tradeoff_results = {key: f.result() for key, f in tradeoff_futures.items()}
    parts = [tables(results, rlg_results, args.seeds)] if results else []
    for model in TRADEOFF_DIRS:
        per_seed = {s: r for (m, s), r in tradeoff_results.items() if m == model}
        if per_seed:
            parts.append(tradeoff_tables(per_seed, model))
    text = "\n\n".join(parts)
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump({"seeds": args.seeds, "train": results, "rlg": rlg_results,
                   "tradeoff": {f"{m}-seed{s}": {"rlg": r["rlg"], "beta_w": r["beta_w"]}
                                for (m, s), r in tradeoff_results.items()}},
                  f, indent=1)
    with open(os.path.join(args.output, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
