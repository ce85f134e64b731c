"""`diffalign bench`: every sub-benchmark runs in-process on tiny components and reports every figure (no timed
assertion: the numbers depend on the machine)."""

import json
import math
import os

import pytest

from diffalign.cli import main

TINY = ["--tiny", "--steps", "2", "--batch-size", "2", "--repeats", "1", "--threads", "1"]


def run_bench(capsys, tmp_path, sub, *extra, complete=True):
    output = tmp_path / f"{sub}.json"
    assert main(["bench", sub, *TINY, "--output", str(output), *extra]) == 0
    table = capsys.readouterr().out
    result = json.loads(output.read_text())
    assert result["benchmark"] == sub
    assert result["machine"]["device"] == "cpu" and result["settings"]
    figures = result["figures"]
    assert figures
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    for name, entry in figures.items():
        assert name in rows, f"{name} missing from the table"
        value = entry["value"]
        assert not complete or value is not None and not (isinstance(value, float) and math.isnan(value)), name
    return result


def test_rollout(capsys, tmp_path):
    result = run_bench(capsys, tmp_path, "rollout")
    figures = result["figures"]
    for name in ("rollout_images_per_s", "plain_images_per_s", "rollout_time_ratio", "rollout_peak_mem_mib",
                 "rollout_outside_unet_vae_s", "plain_outside_unet_vae_s",
                 "plain_peak_mem_mib"):
        assert figures[name]["value"] > 0
    assert len(result["timings"]["ours"]["times"]) == 1


def test_train(capsys, tmp_path):
    result = run_bench(capsys, tmp_path, "train", "--prompts-per-epoch", "1", "--images-per-prompt", "2",
                       "--set", "train_num_inner_epochs=1")
    figures = result["figures"]
    for algorithm in ("prdp", "ddpo"):
        for part in ("epoch_s", "unet_floor_s", "epoch_over_unet", "sampling_over_unet", "training_over_unet",
                     "peak_mem_mib", "outside_unet_share"):
            assert figures[f"{algorithm}_{part}"]["value"] > 0
        shares = [v["value"] for k, v in figures.items() if k.startswith(f"{algorithm}_share_")]
        assert len(shares) == 9 and sum(shares) == pytest.approx(1.0, abs=1e-6)
        calls = result["details"][algorithm]["unet_calls"]
        assert calls["sampling_forwards"] == 2  # one call per step (the batch holds the CFG and reference rows)
        assert calls["optimizer_steps"] == 1 and calls["training_backwards"] >= 1
    # CFG x 2 images x 2 steps; PRDP always samples the reference in the same calls, DDPO only with sample_compute_kl
    assert result["details"]["ddpo"]["unet_calls"]["sampling_unet_rows"] == 2 * 2 * 2
    assert result["details"]["prdp"]["unet_calls"]["sampling_unet_rows"] == 2 * 2 * 2 * 2
    assert result["details"]["prdp"]["config"]["train_num_inner_epochs"] == 1


def test_train_prdp_with_reference_at_trained_steps_only(capsys, tmp_path):
    result = run_bench(capsys, tmp_path, "train", "--algorithms", "prdp", "--prompts-per-epoch", "1",
                       "--images-per-prompt", "2", "--set", "train_num_inner_epochs=1",
                       "--set", "train_timestep_fraction=0.5", "--set", "sample_compute_kl=false")
    calls = result["details"]["prdp"]["unet_calls"]
    assert calls["sampling_unet_rows"] == 2 * 2 * 2  # policy only: CFG x 2 images x 2 steps
    # CFG x 2 samples x 1 trained step, for pi_ref (no grad) and for pi_theta (with grad)
    assert calls["training_forward_rows"] == 2 * 2 * 1 * 2
    assert result["figures"]["prdp_epoch_over_unet"]["value"] > 0


@pytest.mark.slow  # ~35 s: several configurations to a target; test_learn_with_fixed_evaluation runs the path by default
def test_learn(capsys, tmp_path):
    result = run_bench(capsys, tmp_path, "learn", "--max-epochs", "2", "--target", "-1000",
                       "--prompts-per-epoch", "1", "--images-per-prompt", "2", "--prdp-inner-epochs", "1")
    figures = result["figures"]
    configs = result["settings"]["configs"]
    assert set(configs) == {"ddpo_baseline", "ddpo_half_steps_k2", "ddpo_fifth_steps_k2", "ddpo_tenth_steps_k2",
                            "ddpo_fifth_steps_k4", "ddpo_fifth_steps_k2_moderate", "ddpo_half_fresh_reuse",
                            "ddpo_fifth_steps_k2_reuse", "prdp_k1", "prdp_k1_third_steps",
                            "prdp_k1_fifth_steps", "ddpo_no_cfg", "prdp_k1_no_cfg", "ddpo_window2", "ddpo_window2_k2",
                            "ddpo_window3_k2", "prdp_k1_window3", "nft", "awm", "dgpo"}
    assert configs["ddpo_window2"]["sample_sde_window_size"] == 2
    assert configs["ddpo_window2"]["sample_sde_window_range"] == [0, 2]  # fits the 2 steps of the test
    assert configs["ddpo_baseline"]["train_timestep_fraction"] == 1.0
    assert configs["ddpo_no_cfg"]["sample_guidance_scale"] == 1.0
    assert configs["ddpo_fifth_steps_k2_reuse"]["sample_images_per_prompt"] == 1  # half the fresh images
    assert result["details"]["ddpo_half_fresh_reuse"]["runs"][0]["images"] == [1]
    for name in configs:
        assert figures[f"{name}_epochs_to_target"]["value"] == 1  # any image beats -1000 kB
        assert figures[f"{name}_time_to_target_s"]["value"] > 0
        assert 0 < figures[f"{name}_cpu_to_target_s"]["value"]
        assert 0 < figures[f"{name}_sampling_share"]["value"] <= 1
    assert configs["nft"]["algorithm"] == "nft" and configs["nft"]["sample_guidance_scale"] == 1.0
    assert figures["ddpo_baseline_ratio_to_baseline"]["value"] == 1.0


def test_rlg(capsys, tmp_path):
    result = run_bench(capsys, tmp_path, "rlg")
    figures = result["figures"]
    for name in ("single_pass_0_1", "two_pass_0_1", "single_pass_0_0.5", "single_pass_0.5_1"):
        assert figures[f"rlg_{name}_over_plain"]["value"] > 0
        assert figures[f"rlg_{name}_peak_mem_mib"]["value"] > 0


def test_errors_are_one_line(capsys, tmp_path):
    assert main(["bench", "rollout", "--sd15-random", "--device", "cpu", "--output", str(tmp_path / "x.json")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["bench", "rollout", "--tiny", "--dtype", "fp16", "--device", "cpu"]) == 2
    assert "fp16" in capsys.readouterr().err
    assert main(["bench", "learn", "--tiny", "--output", str(tmp_path / "y.json")]) == 2  # no target for jpeg
    assert "--target" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_sd15_random_shapes():
    """The SD1.5-shaped random model has SD1.5's parameter counts (built on the meta device: no memory, no time)."""
    import torch

    from diffalign.bench.common import sd15_random_pipeline

    pipe = sd15_random_pipeline("meta", torch.float16)
    counts = [sum(p.numel() for p in m.parameters()) for m in (pipe.unet, pipe.vae, pipe.text_encoder)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    assert pipe.unet.dtype == torch.float16 and pipe.tokenizer.model_max_length == 77


def test_learn_with_fixed_evaluation(capsys, tmp_path):
    result = run_bench(capsys, tmp_path, "learn", "--max-epochs", "1", "--target", "-1000", "--eval-images", "2",
                       "--prompts-per-epoch", "1", "--images-per-prompt", "2", "--configs", "ddpo_no_cfg", complete=False)
    assert set(result["settings"]["configs"]) == {"ddpo_baseline", "ddpo_no_cfg"}
    assert result["figures"]["ddpo_no_cfg_epochs_to_target"]["value"] == 0  # judged before any training
    assert len(result["details"]["ddpo_no_cfg"]["runs"][0]["rewards"]) == 1
    assert result["figures"]["ddpo_no_cfg_ratio_to_baseline"]["value"] is None  # 0 s / 0 s


def test_learn_shows_each_run_as_a_progress_bar(capsys):
    """A run of `bench learn` is a tqdm bar on stderr, labelled with its configuration and seed, that ends on its last
    reward and whether it reached the target; without a label there is no bar."""
    from diffalign.bench.learn import _learn_one

    class Trainer:  # an epoch's metrics, as `BaseTrainer.step` returns them
        def step(self, epoch):
            return {"time_sample": 0.0, "time_reward": 0.0, "images": 2, "reward_mean": (0.1, 0.5, 0.9)[epoch]}

    assert _learn_one(Trainer(), 0.8, 5, 1, progress="awm seed 3")["epochs_to_target"] == 3
    err = capsys.readouterr().err
    assert "awm seed 3" in err and "3/5" in err and "reward=0.9000" in err and "target=reached" in err, err
    assert not _learn_one(Trainer(), 0.95, 3, 1, progress="awm seed 4")["reached"]
    err = capsys.readouterr().err
    assert "awm seed 4" in err and "3/3" in err and "target=missed" in err, err
    _learn_one(Trainer(), 0.8, 3, 1)
    assert capsys.readouterr().err == ""


def test_learn_bounds_the_median_of_runs_that_miss_the_target_and_reuses_an_earlier_baseline(capsys, tmp_path):
    """A run that misses the target counts as the CPU seconds it ran. With `--baseline-from`, the baseline's runs are
    an earlier file's (not run again: the CPU seconds are the same to the digit) and the configurations are compared
    with them; a file of other settings is refused."""
    settings = ["--max-epochs", "1", "--target", "1000", "--prompts-per-epoch", "1", "--images-per-prompt", "2"]
    result = run_bench(capsys, tmp_path, "learn", *settings, "--configs", "ddpo_no_cfg", complete=False)
    figures, details = result["figures"], result["details"]
    for name in ("ddpo_baseline", "ddpo_no_cfg"):
        (run,) = details[name]["runs"]
        assert not run["reached"] and figures[f"{name}_cpu_to_target_s"]["value"] is None
        # a miss counts as the CPU seconds it ran: its one epoch
        assert figures[f"{name}_cpu_to_target_lower_bound_s"]["value"] == run["cpu_s"] > 0
    assert "ddpo_no_cfg_ratio_to_baseline_upper_bound" not in figures  # nothing to bound: it missed too
    from diffalign.bench.learn import median_lower_bound

    runs = [{"reached": False, "cpu_s": 50.0}, {"reached": True, "cpu_to_target_s": 7.0},
            {"reached": False, "cpu_s": 40.0}]
    assert median_lower_bound(runs, "cpu_to_target_s") == 40.0  # of 7, 40, 50

    earlier, later = str(tmp_path / "learn.json"), tmp_path / "later"
    later.mkdir()
    reused = run_bench(capsys, later, "learn", *settings, "--configs", "ddpo_window2", "--baseline-from", earlier,
                       complete=False)
    assert reused["details"]["ddpo_baseline"]["runs"] == details["ddpo_baseline"]["runs"]
    assert set(reused["details"]) == {"ddpo_baseline", "ddpo_window2"}
    assert reused["settings"]["baseline_from"] == os.path.abspath(earlier)
    assert reused["figures"]["ddpo_window2_cpu_to_target_lower_bound_s"]["value"] > 0
    refused = ["bench", "learn", *TINY, *settings[:2], "--target", "999", *settings[4:], "--baseline-from", earlier]
    assert main(refused) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--baseline-from" in err[0] and "target: 1000.0 there, 999.0 here" in err[0], err
    assert main(refused[:-1] + [str(tmp_path / "missing.json")]) == 2
    assert "not a `bench learn --output` file" in capsys.readouterr().err
    other_machine = json.loads(open(earlier).read())
    other_machine["machine"]["torch_threads"] = 4  # CPU seconds of 4 threads are not those of 1
    (tmp_path / "four_threads.json").write_text(json.dumps(other_machine))
    assert main(["bench", "learn", *TINY, *settings, "--baseline-from", str(tmp_path / "four_threads.json")]) == 2
    assert "machine.torch_threads: 4 there, 1 here" in capsys.readouterr().err


def test_pool_learn_judges_each_configuration_on_its_own_seeds():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "pool_learn.py"
    spec = importlib.util.spec_from_file_location("pool_learn", path)
    pool_learn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pool_learn)

    def run(time):  # a miss ran for 100 s
        return {"reached": time is not None, "time_to_target_s": time, "elapsed_s": time or 100.0, "epoch_times": [1.0]}

    def result(baseline, other):
        details = {"ddpo_baseline": {"runs": [run(t) for t in baseline]}}
        if other is not None:
            details["fast"] = {"runs": [run(t) for t in other]}
        return {"settings": {"target": 0.9, "reward": "r", "shared": {}}, "details": details}

    pooled = pool_learn.pool([result([10.0, 20.0, None], [4.0, None, 6.0]), result([30.0, 40.0, 50.0], None)])
    assert pooled["ddpo_baseline"]["median_time_s"] == 30.0  # over six seeds: 10 20 30 40 50 inf
    assert pooled["fast"]["median_time_s"] == 6.0 and pooled["fast"]["ratio"] == 6.0 / 20.0  # first file's seeds
    assert pooled["fast"]["paired"] == [0.4, None, None]
    assert pooled["fast"]["lower_bound_s"] is None and pooled["fast"]["ratio_upper_bound"] is None  # medians exist
    # most baseline runs miss: its median is above 100 s (the misses' times), the fast one's ratio below 4 / 100
    pooled = pool_learn.pool([result([None, None, 12.0], [3.0, 4.0, None])])
    assert pooled["ddpo_baseline"]["median_time_s"] is None and pooled["ddpo_baseline"]["lower_bound_s"] == 100.0
    assert pooled["fast"]["ratio"] is None and pooled["fast"]["ratio_upper_bound"] == 4.0 / 100.0
    # a file that gave the baseline fewer epochs: its miss ran 30 s, less than the median of the finite times (80 s)
    # with misses last, so the median is only known to be above 60 s (30 30 60 70 80)
    short = result([60.0, 70.0, 80.0], [6.0, 7.0, 8.0])
    shorter = result([None, None], [9.0, 10.0])
    for miss in shorter["details"]["ddpo_baseline"]["runs"]:
        miss["elapsed_s"] = 30.0
    pooled = pool_learn.pool([short, shorter])
    assert pooled["ddpo_baseline"]["median_time_s"] is None and pooled["ddpo_baseline"]["lower_bound_s"] == 60.0
    assert pooled["fast"]["median_time_s"] == 8.0 and pooled["fast"]["ratio"] is None
    assert pooled["fast"]["ratio_upper_bound"] == 8.0 / 60.0


# ---------------------------------------------------------------------------- a new algorithm is benchable as it is
def final_sample_algorithm():
    """A test-only algorithm (a config class and a trainer, as a user or a new module would add them): reward-weighted
    denoising regression on the final samples, the trainer of tests/test_trainer_hooks.py. The bench knows nothing
    of it."""
    import torch
    import torch.nn.functional as F

    from diffalign.config import DDPOConfig
    from diffalign.trainers import BaseTrainer

    class FinalDenoiseConfig(DDPOConfig):
        algorithm = "final_denoise"

    class FinalDenoiseTrainer(BaseTrainer):
        config_class = FinalDenoiseConfig
        keeps_trajectory = False

        def model_outputs(self, model, batch, rows):
            x0 = batch.trajectories.final_latents[rows.samples]
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(rows.samples.sum()))).to(x0)
            t = torch.full((x0.shape[0],), 500, dtype=torch.long, device=x0.device)
            cond = {k: v[rows.samples] for k, v in batch.trajectories.conditioning.items()}
            with self.accelerator.autocast():
                pred = self.family.forward(model, self.family.scheduler.add_noise(x0, noise, t), t, cond)
            return pred.float(), noise

        def compute_loss(self, outputs, batch, rows):
            pred, noise = outputs
            weights = batch.rewards[rows.samples].float()
            loss = (weights * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
            return loss, {"loss": loss.detach()}

    return FinalDenoiseConfig, FinalDenoiseTrainer


def register_final_sample_algorithm(monkeypatch):
    """Registers the test-only algorithm through the public `register_algorithm`, undone after the test."""
    import diffalign.trainers
    from diffalign.trainers import CONFIG_CLASSES, register_algorithm

    config_class, trainer = final_sample_algorithm()
    monkeypatch.setattr(diffalign.trainers, "_registered", dict(diffalign.trainers._registered))
    monkeypatch.setitem(CONFIG_CLASSES, "final_denoise", config_class)  # undone with the test
    register_algorithm(trainer)
    assert diffalign.trainers.trainer_class("final_denoise") is trainer
    assert diffalign.trainers.TRAINERS["final_denoise"] is trainer


def test_train_benches_a_newly_registered_algorithm(capsys, tmp_path, monkeypatch):
    register_final_sample_algorithm(monkeypatch)
    result = run_bench(capsys, tmp_path, "train", "--algorithms", "final_denoise", "--prompts-per-epoch", "1",
                       "--images-per-prompt", "2", "--set", "train_num_inner_epochs=1", "--set", "train_batch_size=2")
    figures = result["figures"]
    for part in ("epoch_s", "unet_floor_s", "epoch_over_unet", "sampling_over_unet", "training_over_unet"):
        assert figures[f"final_denoise_{part}"]["value"] > 0
    calls = result["details"]["final_denoise"]["unet_calls"]
    # sampling: 2 steps of CFG x 2 images; training: one row per final sample (no CFG in its loss), one step
    assert calls["sampling_unet_rows"] == 2 * 2 * 2
    assert calls["training_forward_rows"] == 2 and calls["optimizer_steps"] == 1 and calls["training_backwards"] >= 1
    assert result["details"]["final_denoise"]["config"]["train_batch_size"] == 2


def test_learn_runs_a_newly_registered_algorithm_by_its_name(capsys, tmp_path, monkeypatch):
    register_final_sample_algorithm(monkeypatch)
    result = run_bench(capsys, tmp_path, "learn", "--max-epochs", "1", "--target", "-1000", "--prompts-per-epoch", "1",
                       "--images-per-prompt", "2", "--configs", "final_denoise", "--set", "train_batch_size=2")
    assert set(result["settings"]["configs"]) == {"ddpo_baseline", "final_denoise"}
    assert result["details"]["final_denoise"]["algorithm"] == "final_denoise"
    assert result["figures"]["final_denoise_epochs_to_target"]["value"] == 1


def test_unknown_algorithm_is_one_line(capsys, tmp_path):
    assert main(["bench", "train", *TINY, "--algorithms", "nope", "--output", str(tmp_path / "z.json")]) == 2
    err = capsys.readouterr().err
    assert "--algorithms: unknown 'nope'; choose from" in err and "ddpo" in err and len(err.strip().splitlines()) == 1


def test_bench_package_imports_no_private_names():
    """`diffalign bench` is built on what the package exports: no `from diffalign... import _x`, no `._x` module."""
    import ast
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "diffalign" / "bench"
    found, files = [], sorted(bench.glob("*.py"))
    assert len(files) >= 6  # __init__, common, rollout, train, learn, rlg
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                inside = node.level > 0 or module.split(".")[0] == "diffalign"
                private_module = any(part.startswith("_") for part in module.split(".") if part)
                names = [a.name for a in node.names if a.name.startswith("_")]
                if inside and (names or private_module):
                    found.append(f"{path.name}:{node.lineno} from {'.' * node.level}{module} import "
                                 f"{', '.join(a.name for a in node.names)}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("diffalign") and any(p.startswith("_") for p in alias.name.split(".")):
                        found.append(f"{path.name}:{node.lineno} import {alias.name}")
    assert not found, "private imports in diffalign/bench:\n" + "\n".join(found)


def test_bench_has_no_algorithm_branches():
    """No `algorithm == "ddpo"`-style branch in diffalign/bench: every registered algorithm is benched alike."""
    import re
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "diffalign" / "bench"
    pattern = re.compile(r"""(algorithm|kind|name)\s*(==|!=)\s*["'](ddpo|prdp|grpo)["']""")
    assert len(list(bench.glob("*.py"))) >= 6
    found = [f"{p.name}:{i}: {line.strip()}" for p in sorted(bench.glob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "\n".join(found)
    # ... and no monkey-patching: the bench times trainers through torch hooks and the trainers' own timings
    patched = [f"{p.name}:{i}" for p in sorted(bench.glob("*.py"))
               for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bsetattr\(", line)]
    assert not patched, patched


def test_bench_results_and_their_figures_are_reachable():
    """The README's, docs/bench.md's and the tradeoff experiment's links and images point at files (and headings)
    that exist, so moving the results kept every figure the README cites."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def anchors(path: Path) -> set:
        out = set()
        for line in path.read_text().splitlines():
            if line.startswith("#"):
                title = line.lstrip("#").strip().lower()
                out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
        return out

    broken = []
    for doc in (root / "README.md", root / "docs" / "bench.md", root / "examples" / "research" / "tradeoff" / "README.md"):
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{doc.relative_to(root)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{doc.relative_to(root)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
    readme = (root / "README.md").read_text()
    assert "docs/images/digits-tradeoff.png" in readme and "examples/research/tradeoff/README.md" in readme


def test_learn_judges_a_configuration_sampling_fewer_steps_with_the_shared_steps(capsys, tmp_path, monkeypatch):
    """`awm_8_updates_half_sampling` and the configurations derived from it train on samples of half the steps; their
    evaluation samples with the shared number of steps, as every other configuration's. Their batch sizes follow
    their own images per epoch. With `ema_decay` (here set for all), the evaluation judges the EMA weights, as the
    trainer's own evaluations do."""
    import contextlib

    import diffalign.rollout
    import diffalign.trainers.evaluation  # noqa: F401 (the trainers' sampling keeps the function it imported)
    from diffalign.ema import ParameterEMA

    evaluated_steps, with_ema = [], []
    sample, swapped_in = diffalign.rollout.sample_trajectories, ParameterEMA.swapped_in
    ema_in = [False]

    @contextlib.contextmanager
    def flagged(self):
        with swapped_in(self):
            ema_in[0] = True
            try:
                yield
            finally:
                ema_in[0] = False

    def recording(family, prompts, num_steps, *args, **kwargs):
        evaluated_steps.append(num_steps)
        with_ema.append(ema_in[0])
        return sample(family, prompts, num_steps, *args, **kwargs)

    monkeypatch.setattr(diffalign.rollout, "sample_trajectories", recording)
    monkeypatch.setattr(ParameterEMA, "swapped_in", flagged)
    awm, fewer_prompts, dgpo = ("awm_8_updates_half_sampling", "awm_8_updates_half_sampling_half_prompts",
                                "dgpo_2_prompts_per_step_half_sampling_one_level")
    result = run_bench(capsys, tmp_path, "learn", "--max-epochs", "1", "--target", "1000", "--eval-images", "2",
                       "--prompts-per-epoch", "2", "--images-per-prompt", "8", "--steps", "4",
                       "--configs", f"{awm},{fewer_prompts},{dgpo}", "--set", "ema_decay=0.5", complete=False)
    configs = result["settings"]["configs"]
    assert configs[awm]["sample_num_steps"] == 2 and configs[awm]["train_batch_size"] == 2  # 16 images / 8
    assert configs[fewer_prompts]["sample_num_prompts_per_epoch"] == 1
    assert configs[fewer_prompts]["sample_num_steps"] == 2 and configs[fewer_prompts]["train_batch_size"] == 1
    assert configs[dgpo]["sample_num_steps"] == 2 and configs[dgpo]["train_batch_size"] == 16
    assert configs[dgpo]["train_num_timesteps"] == 1
    assert evaluated_steps and set(evaluated_steps) == {4}  # before and after the epoch, every configuration alike
    assert with_ema == [True] * len(evaluated_steps)
    for name in (awm, fewer_prompts, dgpo):
        run = result["details"][name]["runs"][0]
        assert len(run["rewards"]) == 2 and run["diagnostics"]
    assert result["details"][fewer_prompts]["runs"][0]["images"] == [8]


def test_the_unscaled_advantage_configuration_differs_from_its_parent_by_the_rescale_only():
    """`..._unscaled_advantages` is the half-prompt AWM configuration with `train_advantage_max: 0`: AWM's weights are
    the advantages clipped to +-5, not rescaled into +-1."""
    import torch

    from diffalign.bench.learn import LEARN_CONFIGS
    from diffalign.losses import awm_advantages

    parent = LEARN_CONFIGS["awm_8_updates_half_sampling_half_prompts"]
    algorithm, overrides = LEARN_CONFIGS["awm_8_updates_half_sampling_half_prompts_unscaled_advantages"]
    assert algorithm == parent[0] == "awm"
    assert overrides == {**parent[1], "train_advantage_max": 0}
    advantages = torch.tensor([-7.0, -1.0, 0.5, 6.0])
    assert awm_advantages(advantages, 5.0, overrides["train_advantage_max"] or None).tolist() == [-5.0, -1.0, 0.5, 5.0]
    assert torch.allclose(awm_advantages(advantages, 5.0, 1.0), torch.tensor([-1.0, -0.2, 0.1, 1.0]))


@pytest.mark.parametrize("steps", [4, 10, 49, 98])
def test_the_noisiest_step_configuration_trains_the_first_sampling_step_only(steps):
    """`..._noisiest_step` is the half-prompt AWM configuration trained at one noise level, the first of its sampling
    steps (half the shared ones): `{first_step}` resolves to the fraction that keeps exactly that step, whatever the
    rounding of 1 / steps (49 x (1 / 49) < 1 in floating point)."""
    import types

    import torch

    from diffalign.bench.learn import LEARN_CONFIGS, learn_configs
    from diffalign.trainers.awm import awm_train_step_indices
    from diffalign.trainers.awm_config import AWMConfig

    name = "awm_8_updates_half_sampling_half_prompts_noisiest_step"
    parent = LEARN_CONFIGS["awm_8_updates_half_sampling_half_prompts"][1]
    noisiest = {"train_timesteps": 1, "train_timestep_fraction": "{first_step}"}
    assert LEARN_CONFIGS[name] == ("awm", {**parent, **noisiest})
    unscaled = LEARN_CONFIGS["awm_8_updates_half_sampling_half_prompts_unscaled_advantages"][1]
    assert LEARN_CONFIGS[name.replace("_noisiest", "_unscaled_advantages_noisiest")] == ("awm", {**unscaled,
                                                                                                 **noisiest})
    shared = {"sample_num_steps": 2 * steps, "sample_num_prompts_per_epoch": 10, "sample_images_per_prompt": 8,
              "sample_guidance_scale": 1.0}
    ctx = types.SimpleNamespace(args=types.SimpleNamespace(prdp_inner_epochs=2, configs=name),
                                base_settings=lambda: dict(shared))
    algorithm, values = learn_configs(ctx)[name]
    assert values["sample_num_steps"] == steps and values["sample_num_prompts_per_epoch"] == 5
    config = AWMConfig(**{key: value for key, value in values.items() if key != "sample_guidance_scale"})
    assert config.max_train_step == 1 and config.num_train_steps == 1
    config.validate()
    for u in (0.0, 0.5, 0.999):
        assert awm_train_step_indices(config.train_time_type, config.max_train_step, config.train_timesteps,
                                      torch.tensor([u])).tolist() == [0]
