"""Issue 34: a new user's first run. Every command that runs a bundled model follows the one-thread default (with one
option to change it), bad resolutions and names are one line before any model loads, runs release their lock, and
the CLI's help, version and defaults say what they do."""

import os
import subprocess
import sys

import pytest
import torch

from cli_helpers import TINY_RUN, one_line
from diffalign.cli import main



class Loaded(Exception):
    """Raised where a command would start loading models: the check under test must come before."""


@pytest.fixture
def no_model_loads(monkeypatch):
    import diffalign.cli
    import diffalign.cli.train
    import diffalign.generate

    def refuse(*args, **kwargs):
        raise Loaded("a model started loading")

    monkeypatch.setattr(diffalign.cli, "quiet_libraries", refuse)  # bench
    monkeypatch.setattr(diffalign.cli.train, "quiet_libraries", refuse)  # train
    monkeypatch.setattr(diffalign.generate, "load_rlg_pipeline", refuse)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ one thread
def test_python_api_pipeline_follows_the_one_thread_default(threads):
    from diffalign.generate import load_rlg_pipeline

    torch.set_num_threads(2)
    load_rlg_pipeline("digits", device="cpu")
    assert torch.get_num_threads() == 1  # the bundled model on a CPU: one thread, as the trainers
    load_rlg_pipeline("digits", device="cpu", num_threads=2)
    assert torch.get_num_threads() == 2


def test_generate_follows_the_one_thread_default_and_takes_threads(tmp_path, threads, monkeypatch):
    import diffalign.generate

    seen = []
    real = diffalign.generate.sample_scales
    monkeypatch.setattr(diffalign.generate, "sample_scales",
                        lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    base = ["generate", "--model", "digits", "--rlg-scale", "1", "--num-images", "1", "--steps", "1", "--prompt",
            "a handwritten digit one", "--device", "cpu", "--output-dir", str(tmp_path)]
    torch.set_num_threads(2)
    assert main(base) == 0
    assert main(base + ["--threads", "2"]) == 0
    assert seen == [1, 2]


def test_threads_below_one_are_refused(capsys, no_model_loads):
    assert main(["generate", "--threads", "0", "--prompt", "a cat", "--rlg-scale", "1"]) == 2
    assert "--threads" in one_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------ resolutions
@pytest.mark.parametrize("argv, sizes", [
    (["generate", "--resolution", "20", "--rlg-scale", "1"], "multiples of 8"),
    (["generate", "--model", "digits-flow", "--resolution", "24", "--rlg-scale", "1"], "up to 16"),
    (["train", "ddpo", "--config", "digits-flow-grpo", "--sample_resolution", "24"], "up to 16"),
], ids=["generate-digits-20", "generate-digits-flow-24", "train-digits-flow-grpo-24"])
def test_bad_resolution_is_one_line_naming_the_sizes_before_loading(argv, sizes, tmp_path, capsys, no_model_loads):
    out = ["--output_dir", str(tmp_path / "run")] if argv[0] == "train" else ["--output-dir", str(tmp_path)]
    assert main(argv + out) == 2
    line = one_line(capsys.readouterr().err)
    assert "resolution" in line and sizes in line, line


def test_bench_checks_the_resolution_before_loading(tmp_path, capsys, monkeypatch):
    import diffalign.families

    def refuse(*args, **kwargs):
        raise Loaded("a model started loading")

    monkeypatch.setattr(diffalign.families, "load_pipeline", refuse)
    assert main(["bench", "rollout", "--model", "digits-flow", "--resolution", "24", "--steps", "1", "--repeats", "1",
                 "--output", str(tmp_path / "b.json")]) == 2
    assert "up to 16" in one_line(capsys.readouterr().err)


def test_sd3_family_knows_its_position_embedding_limit():
    from diffalign.families import load_family
    from diffalign.errors import ModelError

    family = load_family("digits-flow")
    family.check_resolution(16)
    with pytest.raises(ModelError, match="larger than 16"):
        family.check_resolution(24)  # 12 latent patches > pos_embed_max_size 8: a traceback inside the transformer


# ---------------------------------------------------------------------------------------------------- the lock
def _lock_holder(directory) -> str:
    with open(os.path.join(directory, ".diffalign.lock")) as f:
        return f.read().strip()


@pytest.mark.parametrize("ending", ["success", "error", "interrupt"])
def test_a_run_that_ends_releases_its_lock(ending, tiny_model_dir, tmp_path, capsys, monkeypatch, caplog):
    import logging

    import diffalign.trainers.base as base
    from diffalign.errors import UserError
    from diffalign.runlog import acquire_run_lock, release_run_lock

    if ending != "success":
        def stop(*args, **kwargs):
            raise KeyboardInterrupt() if ending == "interrupt" else UserError("the reward server is down")

        monkeypatch.setattr(base, "append_metrics", stop)
    run = tmp_path / "run"
    code = main(["train", "ddpo", "--model", tiny_model_dir, "--output_dir", str(run), "--num_epochs", "1"]
                + TINY_RUN)
    assert code == {"success": 0, "error": 2, "interrupt": 130}[ending], capsys.readouterr().err
    assert _lock_holder(run) == ""  # the run's pid is gone from the lock file
    with caplog.at_level(logging.INFO, logger="diffalign"):
        release_run_lock(acquire_run_lock(str(run)))
    assert "taking over" not in caplog.text


# ----------------------------------------------------------------------------------------------- the CLI itself
def test_train_help_prints_help(capsys):
    try:
        code = main(["train", "--help"])
    except SystemExit as e:  # argparse's exit
        code = e.code
    assert code == 0 and "ddpo" in capsys.readouterr().out


def test_version(capsys):
    from diffalign import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"diffalign {__version__}"


def test_train_without_config_says_which_defaults_it_uses(tmp_path, capsys, no_model_loads):
    with pytest.raises(Loaded):
        main(["train", "prdp", "--output_dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "no --config" in out and "jpeg_compressibility" in out and "100 epochs" in out and "digits" in out, out


def test_overriding_a_presets_prompt_source_says_how_to_clear_it(tmp_path, capsys, no_model_loads):
    argv = ["train", "prdp", "--config", "digits-prdp", "--prompts", "[a cat]", "--output_dir", str(tmp_path / "r")]
    assert main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert "digits-prdp" in line and "prompt_fn" in line and "--prompt_fn null" in line, line
    with pytest.raises(Loaded):  # the advice works
        main(argv + ["--prompt_fn", "null"])


def test_yaml_syntax_error_gives_line_and_column(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("model: digits\nprompts: [a cat, a dog\nreward: jpeg_compressibility\n")
    assert main(["train", "prdp", "--config", str(config)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "line 3, column 7" in line, line


def test_generate_has_default_prompts_for_digits_flow():
    from diffalign.generate import _default_prompts

    assert _default_prompts("digits-flow") == _default_prompts("digits")
    assert len(_default_prompts("digits-flow")) == 10


def test_reward_typo_is_named_before_the_model_loads(tmp_path, capsys, no_model_loads):
    assert main(["train", "prdp", "--config", "digits-prdp", "--reward", "digit_corectness", "--output_dir",
                 str(tmp_path / "run")]) == 2
    line = one_line(capsys.readouterr().err)
    assert "digit_corectness" in line and "did you mean 'digit_correctness'" in line, line
    assert main(["generate", "--reward", "digit_corectnes", "--rlg-scale", "1"]) == 2
    assert "unknown reward" in one_line(capsys.readouterr().err)


def test_rlg_reward_error_bars_stay_in_the_rewards_range(tmp_path, monkeypatch):
    import matplotlib.axes

    from diffalign.generate import _plot_rewards

    drawn = []
    real = matplotlib.axes.Axes.errorbar
    def errorbar(self, x, y, yerr=None, **kwargs):
        drawn.append((list(y), yerr))
        return real(self, x, y, yerr=yerr, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", errorbar)
    rewards = [1.0, 1.0, 1.0, 0.4]  # probabilities: mean 0.85, std 0.26
    mean = sum(rewards) / 4
    std = (sum((r - mean) ** 2 for r in rewards) / 4) ** 0.5
    _plot_rewards([{"rlg_scale": 1.0, "reward_mean": mean, "reward_std": std, "rewards": rewards}],
                  "digit_correctness", str(tmp_path / "rlg_rewards.png"))
    (means, yerr), = drawn
    below, above = (yerr[0][0], yerr[1][0]) if isinstance(yerr[0], (list, tuple)) else (yerr[0], yerr[0])
    assert means[0] + above <= 1.0 + 1e-9 and means[0] - below >= 0.4 - 1e-9
    assert below == pytest.approx(std)  # unclipped where the range allows


# ------------------------------------------------------------------------------------------ the progress bar
def test_epoch_metrics_lines_do_not_run_on_from_the_progress_bar(tiny_model_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "diffalign.cli", "train", "ddpo", "--model", tiny_model_dir,
                             "--output_dir", str(tmp_path / "run"), "--num_epochs", "2"] + TINY_RUN,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.split("\n") if "epoch=" in line]
    assert len(lines) == 2, result.stderr
    for line in lines:
        before = line[: line.index("epoch=")].split("\r")[-1]
        assert before.strip() == "", repr(line)  # the bar was cleared (tqdm.write), not continued
