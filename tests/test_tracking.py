"""Experiment trackers (`report_to`): short digits runs logged to TensorBoard (always; it is in the test extra) and to
W&B, Trackio and MLflow in their offline modes when those are installed, read back through each tool's own reader."""

import json
import os
from types import SimpleNamespace

import pytest

from diffalign.cli import main
from diffalign.config import ConfigError, PRDPConfig
from diffalign.tracking import (
    TrackerError,
    captioned_grid,
    check_accelerator,
    hyperparameters,
    parse_report_to,
    resolve_trackers,
    scalars,
)

# two epochs of the bundled digits model, images logged after each
DIGITS_ARGS = [
    "--model", "digits", "--prompt_fn", "digits", "--reward", "digit_correctness", "--num_epochs", "2",
    "--sample_num_steps", "4", "--sample_num_prompts_per_epoch", "2", "--sample_images_per_prompt", "2",
    "--train_num_inner_epochs", "1", "--grid_num_images", "2", "--log_images_every", "1",
]


def train(out, *args):
    return main(["train", "prdp", "--output_dir", str(out)] + DIGITS_ARGS + list(args))


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("tracking") / "tb"
    assert train(out, "--report_to", "tensorboard") == 0
    return str(out)


def test_tensorboard_has_a_reward_per_epoch_and_captioned_samples(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = os.path.join(tensorboard_run, "logs", "diffalign")
    events = EventAccumulator(logs, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    records = read_metrics(tensorboard_run)  # metrics.jsonl stays
    rewards = events.Scalars("reward_mean")
    assert [e.step for e in rewards] == [0, 1]
    assert [e.value for e in rewards] == pytest.approx([r["reward_mean"] for r in records])
    for key in ("kl_to_base", "loss", "time_epoch", "lr"):
        assert [e.step for e in events.Scalars(key)] == [0, 1], key
    grids = events.Images("samples")
    assert [e.step for e in grids] == [0, 1]
    assert grids[0].width > 2 * 32 and grids[0].height > 32  # two upscaled tiles and their captions
    assert len(events.Images("samples/images")) == 2
    captions = events.Tensors("samples/captions/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "a handwritten digit" in captions and "reward" in captions


def test_logging_does_not_change_the_run(tensorboard_run, tmp_path):
    # the sample grids use their own generator: the tracked run trains exactly as an untracked one
    assert train(tmp_path / "plain") == 0
    tracked, plain = read_metrics(tensorboard_run), read_metrics(tmp_path / "plain")
    assert [r["reward_mean"] for r in tracked] == [r["reward_mean"] for r in plain]
    assert [r["loss"] for r in tracked] == [r["loss"] for r in plain]
    assert not os.path.exists(tmp_path / "plain" / "logs")


def test_unknown_tracker_is_one_line(tmp_path, capsys):
    assert train(tmp_path / "x", "--report_to", "tensorbord") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean 'tensorboard'" in err, err


def test_missing_tracker_package_is_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import importlib.util

    import diffalign.trainers.base as base

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.setattr(base, "load_family", lambda *a: pytest.fail("a model loaded before the tracker check"))
    assert train(tmp_path / "x", "--report_to", "tensorboard,wandb") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'diffalign[wandb]'" in err, err


def test_report_to_parsing(monkeypatch):
    assert parse_report_to(None) == parse_report_to("none") == parse_report_to("") == []
    assert parse_report_to("tensorboard, WANDB,tensorboard") == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="unknown tracker 'neptune'"):
        parse_report_to("tensorboard,neptune")
    import diffalign.tracking as tracking

    monkeypatch.setattr(tracking, "_installed", lambda name: name in ("mlflow", "tensorboard"))
    assert resolve_trackers("all") == ["tensorboard", "mlflow"]
    assert resolve_trackers("mlflow,all") == ["mlflow", "tensorboard"]
    monkeypatch.setattr(tracking, "_installed", lambda name: False)
    with pytest.raises(TrackerError, match=r"diffalign\[trackers\]"):
        resolve_trackers("all")


def test_a_callers_accelerator_must_carry_the_trackers():
    config = PRDPConfig(report_to="tensorboard")
    check_accelerator(SimpleNamespace(log_with=["tensorboard"]), config)
    with pytest.raises(ConfigError, match="log_with"):
        check_accelerator(SimpleNamespace(log_with=None), config)


def test_hyperparameters_and_scalars_are_flat():
    config = PRDPConfig(prompts=["a", "b"], reward={"aesthetic": 1.0})
    values = hyperparameters(config)
    assert values["algorithm"] == "prdp" and values["prompts"] == '["a", "b"]'
    assert json.loads(values["reward"]) == {"aesthetic": 1.0} and values["train_beta"] == config.train_beta
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in values.values())
    assert scalars({"epoch": 3, "reward_mean": 0.5, "loss": float("nan"), "images": 8, "note": "x"}) == {
        "reward_mean": 0.5, "images": 8.0}


def test_logging_settings_do_not_change_the_resume_hash():
    base = PRDPConfig()
    logged = PRDPConfig(report_to="wandb", run_name="r", log_images_every=3, push_to_hub=True, hub_model_id="me/r")
    assert base.hash() == logged.hash()
    with pytest.raises(ConfigError, match="log_images_every"):
        PRDPConfig(log_images_every=-1).validate()


def test_captioned_grid_wraps_captions_under_each_tile():
    import torch

    grid = captioned_grid(torch.rand(3, 3, 8, 8), ["a long prompt " * 4 + "\nreward 0.5"] * 3, nrow=2, scale=4)
    assert grid.width == 2 * (32 + 2) + 2 and grid.height > 2 * (32 + 2) + 3 * 12


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    assert train(out, "--report_to", "wandb", "--num_epochs", "1", "--run_name", "digits-wb") == 0
    import wandb

    wandb.teardown()  # the offline run file is written by wandb's service: wait for it
    runs = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1
    (log,) = [f for f in os.listdir(out / "wandb" / runs[0]) if f.endswith(".wandb")]
    data = (out / "wandb" / runs[0] / log).read_bytes()
    for key in (b"reward_mean", b"kl_to_base", b"samples", b"digits-wb", b"train_beta"):
        assert key in data, key
    media = out / "wandb" / runs[0] / "files" / "media" / "images"
    assert any(f.endswith(".png") for f in os.listdir(media))  # the captioned samples


def test_trackio_offline(tmp_path, monkeypatch):
    pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    import sys

    for name in [m for m in sys.modules if m == "trackio" or m.startswith("trackio.")]:
        monkeypatch.delitem(sys.modules, name)  # TRACKIO_DIR is read when trackio is imported
    out = tmp_path / "tr"
    assert train(out, "--report_to", "trackio", "--num_epochs", "1", "--tracker_project_name", "diffalign-test") == 0
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("diffalign-test", "tr")
    assert [row["reward_mean"] for row in logs if "reward_mean" in row] == pytest.approx(
        [r["reward_mean"] for r in read_metrics(out)])
    assert any("samples" in row for row in logs)


def test_mlflow_local(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "ml"
    assert train(out, "--report_to", "mlflow", "--num_epochs", "1") == 0
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow.get_tracking_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "diffalign"]
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "reward_mean")
    assert [m.value for m in history] == pytest.approx([r["reward_mean"] for r in read_metrics(out)])
    assert run.data.params["algorithm"] == "prdp"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"images", "samples"} <= artifacts, artifacts  # the sample grid and its captions
