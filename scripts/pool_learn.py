"""Pools the seeds of several `diffalign bench learn` runs (e.g. `--seed 0`, `--seed 3`, `--seed 6`, each with
`--repeats 3`) into one table, so a configuration is judged on all of them at once.

    python scripts/pool_learn.py learn_seed0.json learn_seed3.json learn_seed6.json

Per configuration: the runs that reached the target, the median time to it over all runs (CPU seconds where the files have them, else wall seconds) (a run that did not reach
it counts as infinitely slow, as in `bench learn`; where most did not, `> X s` is a lower bound: a miss counts as the
time it ran; so too where a miss ran for less time than the median, as when the files ran different `--max-epochs`),
that median over the baseline's on the same seeds (`< r`: over the baseline's lower bound), the per-seed
ratios (the configuration's time over the baseline's on the same seed; `-` where either missed the target) and the
median epoch time over the baseline's. Every file must use the same target, reward and guidance scale.
"""

import argparse
import json
import statistics
import sys
from typing import Dict, List

from diffalign.bench.learn import BASELINE, median_lower_bound, median_reached


def time_key(results: List[dict]) -> str:
    """CPU seconds where every run has them (files from `bench learn` since it measured them), else wall seconds."""
    runs = [run for result in results for entry in result["details"].values() for run in entry["runs"]]
    return "cpu_to_target_s" if all("cpu_to_target_s" in run for run in runs) else "time_to_target_s"


def pool(results: List[dict]) -> Dict[str, dict]:
    keys = {(r["settings"]["target"], r["settings"]["reward"], r["settings"].get("shared", {}).get(
        "sample_guidance_scale")) for r in results}
    if len(keys) > 1:
        raise SystemExit(f"pool_learn: the files differ in target, reward or guidance scale: {sorted(keys)}")
    key = time_key(results)
    pooled: Dict[str, dict] = {}
    for result in results:
        baseline_runs = result["details"][BASELINE]["runs"]
        for name, entry in result["details"].items():
            row = pooled.setdefault(name, {"runs": [], "baseline_runs": [], "paired": [], "epoch_ratios": []})
            row["runs"] += entry["runs"]
            row["baseline_runs"] += baseline_runs
            for run, base in zip(entry["runs"], baseline_runs):
                both = run["reached"] and base["reached"]
                row["paired"].append(run[key] / base[key] if both else None)
            base_epoch = statistics.median([t for r in baseline_runs for t in r["epoch_times"]])
            row["epoch_ratios"].append(statistics.median([t for r in entry["runs"] for t in r["epoch_times"]])
                                       / base_epoch)
    for row in pooled.values():
        # against the baseline on the same seeds (a configuration may be missing from some files)
        base_time, base_bound = pooled_median(row["baseline_runs"], key)
        row["median_time_s"], row["lower_bound_s"] = pooled_median(row["runs"], key)
        row["ratio"] = row["median_time_s"] / base_time if row["median_time_s"] and base_time else None
        row["ratio_upper_bound"] = row["median_time_s"] / base_bound if row["median_time_s"] and base_bound else None
    return pooled


def pooled_median(runs: List[dict], key: str):
    """`(median, None)` where the median over the runs is known, a miss counting as infinitely slow; else `(None,
    lower bound)`, a miss counting as the time it ran. The median is not known where most runs missed the target, nor
    where a miss ran for less time than the median: files that gave the baseline fewer epochs (`--max-epochs`) stop
    it sooner, and that run might have reached the target before the median."""
    median, bound = median_reached(runs, key), median_lower_bound(runs, key)
    if median is not None and (bound is None or bound >= median):
        return median, None
    return None, bound


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="bench_learn JSON files")
    args = parser.parse_args(argv)
    results = []
    for path in args.files:
        with open(path) as f:
            result = json.load(f)
        if result.get("benchmark") != "learn":
            raise SystemExit(f"pool_learn: {path} is not a `bench learn` result")
        results.append(result)
    pooled = pool(results)
    print(f"target {results[0]['settings']['target']} ({results[0]['settings']['reward']}), "
          f"{len(pooled[BASELINE]['runs'])} seeds from {len(results)} files")
    print(f"times: {'CPU' if time_key(results) == 'cpu_to_target_s' else 'wall'} seconds")
    print("| configuration | reached | median time to target | / baseline | per-seed ratios | epoch / baseline's |")
    print("|---|---|---|---|---|---|")
    for name, row in pooled.items():
        time = f"{row['median_time_s']:.1f} s" if row["median_time_s"] is not None else (
            f"> {row['lower_bound_s']:.1f} s" if row["lower_bound_s"] is not None else "not reached")
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else (
            f"< {row['ratio_upper_bound']:.3f}" if row["ratio_upper_bound"] is not None else "-")
        paired = ", ".join(f"{x:.2f}" if x is not None else "-" for x in row["paired"])
        epoch = ", ".join(f"{x:.2f}" for x in row["epoch_ratios"])
        print(f"| {name} | {sum(r['reached'] for r in row['runs'])}/{len(row['runs'])} | {time} | {ratio} | "
              f"{paired} | {epoch} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
