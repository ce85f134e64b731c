import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from diffalign.checkpoint import CheckpointError, find_resumable, list_checkpoints

COMMON = [
    "--prompts", "[a cat, a dog]", "--sample_num_steps", "2", "--sample_num_prompts_per_epoch", "2",
    "--sample_images_per_prompt", "2", "--grid_num_images", "1", "--reward", "jpeg_compressibility",
    "--checkpoint_every", "1", "--checkpoints_total_limit", "10", "--seed", "3",
]
ARGS = COMMON + ["--train_batch_size", "2"]


def cli(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "diffalign.cli"] + args, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_killed_and_resumed_run_ends_with_identical_weights(tiny_model_dir, tmp_path):
    common = ["train", "ddpo", "--model", tiny_model_dir, "--num_epochs", "5"] + ARGS
    straight = cli(common + ["--output_dir", str(tmp_path / "straight")])
    killed_dir = tmp_path / "killed"
    killed = cli(common + ["--output_dir", str(killed_dir)])
    # SIGKILL as soon as the second checkpoint exists (the run may be anywhere in its third epoch).
    deadline = time.time() + 240
    while not (killed_dir / "checkpoints" / "epoch-000001").exists():
        assert killed.poll() is None and time.time() < deadline, killed.communicate()
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (killed_dir / "final").exists()
    assert straight.wait(timeout=300) == 0, straight.communicate()

    resumed = cli(["train", "ddpo", "--model", tiny_model_dir, "--num_epochs", "5", "--resume", str(killed_dir)] + ARGS)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a = load_file(str(tmp_path / "straight" / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(killed_dir / "final" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key  # bit-identical on CPU
    with open(killed_dir / "metrics.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1, 2, 3, 4]


def test_corrupted_checkpoints_are_detected(tiny_model_dir, tmp_path):
    from diffalign.cli import main

    run = tmp_path / "run"
    assert main(["train", "ddpo", "--model", tiny_model_dir, "--num_epochs", "2", "--output_dir", str(run)] + ARGS) == 0
    first, second = list_checkpoints(str(run))
    # truncate a weight file of the newest checkpoint: named as corrupted, and the run dir falls back to the older
    model_file = os.path.join(second, "model.safetensors")
    with open(model_file, "r+b") as f:
        f.truncate(os.path.getsize(model_file) // 2)
    with pytest.raises(CheckpointError, match="model.safetensors does not match its checksum"):
        find_resumable(second)
    assert find_resumable(str(run))[0] == first
    # a checkpoint without manifest (killed mid-write) is incomplete
    os.remove(os.path.join(first, "manifest.json"))
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find_resumable(str(run))
    # temporary directories of interrupted writes are never picked
    shutil.copytree(second, os.path.join(run, "checkpoints", ".tmp-epoch-000009-1"))
    assert all(".tmp" not in p for p in list_checkpoints(str(run)))


def test_resume_with_different_settings_is_refused(tiny_model_dir, tmp_path, capsys):
    from diffalign.cli import main

    run = tmp_path / "run"
    assert main(["train", "ddpo", "--model", tiny_model_dir, "--num_epochs", "1", "--output_dir", str(run)] + ARGS) == 0
    code = main(["train", "ddpo", "--model", tiny_model_dir, "--num_epochs", "2", "--resume", str(run),
                 "--train_learning_rate", "0.5"] + ARGS)
    assert code == 2 and "different configuration" in capsys.readouterr().err


ALGORITHM_ARGS = {
    "prdp": ["--train_num_inner_epochs", "2", "--train_beta", "0.1", "--train_clip_eps", "0.01"],
    "ddpo": ["--train_batch_size", "2", "--advantage_mode", "per_prompt", "--per_prompt_min_count", "2",
             "--train_reuse_epochs", "1"],
}


@pytest.mark.slow  # ~17 s; test_distributed checks both ranks' weights every epoch of its 2-process runs by default
@pytest.mark.parametrize("algorithm", ["prdp", "ddpo"])
def test_two_processes_stay_in_sync(tiny_model_dir, tmp_path, algorithm):
    out = tmp_path / "dist"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffalign.cli",
           "train", algorithm, "--model", tiny_model_dir, "--output_dir", str(out), "--num_epochs", "2"]
    cmd += ALGORITHM_ARGS[algorithm] + COMMON
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [0, 1]  # written once, by the main process
    # ranks holding identical weights after every epoch: tests/test_distributed.py (DDP-prepared denoiser)
    assert all(r["images"] == 4 for r in records)  # rewards gathered from both ranks (2 prompts x 2 images)
    if algorithm == "ddpo":  # each rank also trained on its own samples of the epoch before
        assert [r["reused_samples"] for r in records] == [0, 4]
    assert len(list_checkpoints(str(out))) == 2 and (out / "final" / "pytorch_lora_weights.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------
# Issue 15: metrics never lost or corrupted, checkpoint verification of every file, one run per output directory,
# full and read-only disks, untrusted files. Runs in-process through `diffalign.cli.main` (the model loads in ~1 s).

FAST = ARGS + ["--num_epochs", "2"]


def train(tiny_model_dir, out, *extra, capsys=None):
    from diffalign.cli import main

    code = main(["train", "ddpo", "--model", tiny_model_dir, "--output_dir", str(out)] + FAST + list(extra))
    err = capsys.readouterr().err.strip() if capsys is not None else ""
    return code, err


def resume(tiny_model_dir, path, *extra, capsys=None):
    from diffalign.cli import main

    code = main(["train", "ddpo", "--model", tiny_model_dir, "--resume", str(path)] + ARGS + ["--num_epochs", "2"]
                + list(extra))
    err = capsys.readouterr().err.strip() if capsys is not None else ""
    return code, err


def one_line(err):
    lines = [line for line in err.splitlines() if line.startswith("diffalign: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def strict_records(path):
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant} in {path}")

    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


@pytest.fixture(scope="module")
def two_epoch_run(tiny_model_dir, tmp_path_factory):
    """A finished 2-epoch run with checkpoints epoch-000000 and epoch-000001 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("rel") / "run"
    assert train(tiny_model_dir, out)[0] == 0
    return out


def copy_run(run, tmp_path, name="run"):
    target = tmp_path / name
    shutil.copytree(run, target)
    os.remove(target / ".diffalign.lock")
    return target


# ----------------------------------------------------------------------------------------------------- metrics
def test_metrics_rewrite_killed_midway_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    code = f"""
import os, signal
from diffalign.runlog import write_metrics
write_metrics({str(path)!r}, [{{"epoch": i}} for i in range(5)])
def records():
    yield {{"epoch": 0}}
    yield {{"epoch": 1}}
    os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of the rewrite
write_metrics({str(path)!r}, records())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert [r["epoch"] for r in strict_records(path)] == [0, 1, 2, 3, 4]  # the old file, whole


def test_cut_last_line_is_tolerated_and_resume_rewrites_the_log(tiny_model_dir, two_epoch_run, tmp_path, capsys):
    from diffalign.runlog import append_metrics, read_metrics

    run = copy_run(two_epoch_run, tmp_path)
    shutil.rmtree(run / "checkpoints" / "epoch-000001")  # resume from epoch 0 ...
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "reward_mean": -1.5')  # ... with a line cut by a kill mid-append
    assert [r["epoch"] for r in read_metrics(str(run / "metrics.jsonl"))] == [0, 1]
    code, err = resume(tiny_model_dir, run, capsys=capsys)
    assert code == 0, err
    assert [r["epoch"] for r in strict_records(run / "metrics.jsonl")] == [0, 1]
    # an append after a cut line starts a new line instead of extending the broken one
    cut = tmp_path / "cut.jsonl"
    cut.write_text('{"epoch": 0}\n{"epoch": 1, "re')
    append_metrics(str(cut), {"epoch": 1})
    assert [r["epoch"] for r in read_metrics(str(cut))] == [0, 1]


def test_nonfinite_metrics_are_written_as_null(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from diffalign.runlog import dumps_record

    assert json.loads(dumps_record({"a": float("nan"), "b": [float("inf"), 1.0]})) == {"a": None, "b": [None, 1.0]}
    (tmp_path / "nan_reward_mod.py").write_text(
        "import torch\ndef nan_reward(images, prompts, metadata=None):\n"
        "    return torch.full((len(images),), float('nan'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, err = train(tiny_model_dir, tmp_path / "run", "--reward", "nan_reward_mod:nan_reward", "--num_epochs", "1",
                      "--final_eval_num_images", "2", capsys=capsys)
    assert code == 0, err
    (record,) = strict_records(tmp_path / "run" / "metrics.jsonl")
    assert record["reward_mean"] is None and record["skipped_nonfinite"] == 1.0
    # final_eval.json too: strict JSON (no NaN token), non-finite rewards as null
    final = json.loads((tmp_path / "run" / "final_eval.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert final["base"]["reward_mean"] is None and final["trained"]["reward_mean"] is None


def test_restart_without_resume_is_refused(tiny_model_dir, two_epoch_run, tmp_path, capsys):
    run = copy_run(two_epoch_run, tmp_path)
    before = (run / "metrics.jsonl").read_text()
    code, err = train(tiny_model_dir, run, capsys=capsys)
    line = one_line(err)
    assert code == 2 and "--resume" in line and "--output_dir" in line and "already holds a run" in line
    assert (run / "metrics.jsonl").read_text() == before  # no duplicated epochs


# -------------------------------------------------------------------------------------------------------- lock
def test_a_second_run_on_a_locked_directory_names_the_other_process(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import time; from diffalign.runlog import prepare_output_dir; "
                               f"prepare_output_dir({str(out)!r}, resume=False); print('locked', flush=True); "
                               f"time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = train(tiny_model_dir, out, "--num_epochs", "1", capsys=capsys)
        line = one_line(err)
        assert code == 2 and "in use by another run" in line and f"pid {holder.pid}" in line
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: its lock is stale now
        holder.wait()
    code, err = train(tiny_model_dir, out, "--num_epochs", "1", capsys=capsys)
    assert code == 0, err
    assert [r["epoch"] for r in strict_records(out / "metrics.jsonl")] == [0]


def test_pid_lock_fallback_takes_over_a_dead_process_lock(tmp_path):
    import socket

    from diffalign.runlog import LOCK, RunDirectoryError, RunLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_file = tmp_path / LOCK
        lock_file.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        with pytest.raises(RunDirectoryError, match=f"pid {live.pid}"):
            RunLock(str(tmp_path))._acquire_pidfile()
        lock_file.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
        lock = RunLock(str(tmp_path))._acquire_pidfile()
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        lock.release()
        assert not lock_file.exists()
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------------------------------------- checkpoints
def _edit_manifest(checkpoint, edit):
    path = os.path.join(checkpoint, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest = edit(manifest, checkpoint)
    with open(path, "w") as f:
        json.dump(manifest, f)


def _drop_model_then_corrupt(m, checkpoint):
    del m["files"]["model.safetensors"]
    with open(os.path.join(checkpoint, "model.safetensors"), "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\xff" * 8)
    return m


def _nan_weights_with_updated_checksum(m, checkpoint):
    import hashlib

    from safetensors.torch import save_file

    path = os.path.join(checkpoint, "model.safetensors")
    tensors = load_file(path)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone().fill_(float("nan"))
    save_file(tensors, path)
    with open(path, "rb") as f:
        m["files"]["model.safetensors"] = hashlib.sha256(f.read()).hexdigest()
    return m


def _outside_path(m, checkpoint):
    outside = os.path.join(os.path.dirname(checkpoint), "evil.json")
    with open(outside, "w") as f:
        f.write("{}")
    m["files"]["../evil.json"] = m["files"].pop("trainer.json")
    return m


def _symlink_outside(m, checkpoint):
    outside = os.path.join(os.path.dirname(checkpoint), "elsewhere.json")
    shutil.copy(os.path.join(checkpoint, "trainer.json"), outside)
    os.remove(os.path.join(checkpoint, "trainer.json"))
    os.symlink(outside, os.path.join(checkpoint, "trainer.json"))
    return m


MANIFEST_EDITS = {
    "model file unlisted and corrupted": _drop_model_then_corrupt,
    "model state unlisted": lambda m, c: {**m, "files": {k: v for k, v in m["files"].items() if not k.startswith("model.")}},
    "files is a list": lambda m, c: {**m, "files": list(m["files"])},
    "no config_hash": lambda m, c: {k: v for k, v in m.items() if k != "config_hash"},
    "epoch is a string": lambda m, c: {**m, "epoch": "1"},
    "manifest is a list": lambda m, c: [m],
    "path outside the checkpoint": _outside_path,
    "symlink outside the checkpoint": _symlink_outside,
    "NaN weights with an updated checksum": _nan_weights_with_updated_checksum,
}


@pytest.mark.parametrize("edit", list(MANIFEST_EDITS))
def test_every_manifest_edit_falls_back_to_the_previous_checkpoint(two_epoch_run, tmp_path, edit):
    from diffalign.checkpoint import load_resumable, verify_checkpoint

    run = copy_run(two_epoch_run, tmp_path)
    first, second = list_checkpoints(str(run))
    config_hash = verify_checkpoint(first)["config_hash"]
    _edit_manifest(second, MANIFEST_EDITS[edit])
    names = ["model", "optimizer", "scheduler", "rng", "trainer"]
    checkpoint, manifest, states = load_resumable(str(run), names, config_hash=config_hash,
                                                  finite=["model", "optimizer", "scheduler"])
    assert checkpoint == first and manifest["epoch"] == 0 and states["trainer"]["epoch"] == 0
    with pytest.raises(CheckpointError) as info:  # named, in one line, when asked for that checkpoint itself
        load_resumable(second, names, config_hash=config_hash, finite=["model"])
    assert "\n" not in str(info.value) and second in str(info.value)


@pytest.mark.parametrize("edit", ["model file unlisted and corrupted", "no config_hash", "path outside the checkpoint"])
def test_resume_through_the_cli_after_a_manifest_edit(tiny_model_dir, two_epoch_run, tmp_path, capsys, edit):
    run = copy_run(two_epoch_run, tmp_path)
    first, second = list_checkpoints(str(run))
    _edit_manifest(second, MANIFEST_EDITS[edit])
    code, err = resume(tiny_model_dir, run, capsys=capsys)  # falls back to epoch 0, trains epoch 1 again
    assert code == 0 and "Traceback" not in err, err
    assert [r["epoch"] for r in strict_records(run / "metrics.jsonl")] == [0, 1]
    # every checkpoint damaged: one line, exit 2
    _edit_manifest(list_checkpoints(str(run))[0], MANIFEST_EDITS[edit])
    _edit_manifest(list_checkpoints(str(run))[1], MANIFEST_EDITS[edit])
    code, err = resume(tiny_model_dir, run, capsys=capsys)
    assert code == 2 and "no complete checkpoint" in one_line(err)


def test_stale_tmp_directories_are_cleaned_up(tiny_model_dir, two_epoch_run, tmp_path, capsys):
    from diffalign.checkpoint import remove_stale_tmp

    run = copy_run(two_epoch_run, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [run / "checkpoints" / f".tmp-epoch-000007-{dead.pid}", run / f".tmp-final-{dead.pid}",
             run / f".tmp-final-{dead.pid}-old"]
    for path in stale:
        shutil.copytree(list_checkpoints(str(run))[0], path)
    live = run / "checkpoints" / f".tmp-epoch-000008-{os.getppid()}"  # another live process' write: kept
    live.mkdir()
    shutil.rmtree(run / "checkpoints" / "epoch-000001")
    code, err = resume(tiny_model_dir, run, capsys=capsys)
    assert code == 0, err
    assert not any(path.exists() for path in stale) and live.exists()
    remove_stale_tmp(str(run / "checkpoints"))
    assert live.exists()


def test_resume_of_a_missing_path_does_not_create_it(tiny_model_dir, tmp_path, capsys):
    for missing in (tmp_path / "nope", tmp_path / "nope2" / "checkpoints" / "epoch-000003"):
        code, err = resume(tiny_model_dir, missing, capsys=capsys)
        assert code == 2 and "does not exist" in one_line(err)
        assert not missing.exists() and not (tmp_path / "nope2").exists()
    with pytest.raises(CheckpointError, match="does not exist"):
        find_resumable(str(tmp_path / "nope" / "checkpoints" / "epoch-000001"))


# ------------------------------------------------------------------------------------------ full and read-only
@pytest.mark.parametrize("error", ["ENOSPC", "SafetensorError", "EROFS"])
def test_full_or_read_only_disk_is_one_line_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path, capsys,
                                                                          monkeypatch, error):
    import errno

    import diffalign.checkpoint as checkpoint_module
    from diffalign.checkpoint import verify_checkpoint

    real_save_file = checkpoint_module.save_file

    def failing_save_file(tensors, path, *args, **kwargs):
        if "epoch-000001" in path:  # the second checkpoint hits the full disk
            if error == "SafetensorError":
                from safetensors import SafetensorError

                raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                      'message: "No space left on device" })')
            code = getattr(errno, error)
            raise OSError(code, os.strerror(code), path)
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", failing_save_file)
    out = tmp_path / "run"
    code, err = train(tiny_model_dir, out, capsys=capsys)
    line = one_line(err)
    assert code == 2 and ("No space left" in line or "Read-only" in line), line
    (only,) = list_checkpoints(str(out))
    assert only.endswith("epoch-000000") and verify_checkpoint(only)["epoch"] == 0
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".tmp")]


def test_unwritable_output_directory_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import errno

    import diffalign.runlog as runlog

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(runlog.os, "makedirs", read_only)
    code, err = train(tiny_model_dir, tmp_path / "ro" / "run", capsys=capsys)
    assert code == 2 and "Read-only file system" in one_line(err)


def test_metrics_append_on_a_full_disk_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import errno

    import diffalign.trainers.base as base

    def full(path, record):
        from diffalign.errors import output_error

        raise output_error(f"'{path}'", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path))

    monkeypatch.setattr(base, "append_metrics", full)
    code, err = train(tiny_model_dir, tmp_path / "run", "--num_epochs", "1", capsys=capsys)
    assert code == 2 and "No space left" in one_line(err)


# ---------------------------------------------------------------------------------------------- untrusted files
def test_non_utf8_prompt_file_is_one_line(tiny_model_dir, tmp_path, capsys):
    from diffalign.cli import main

    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"a cat\n\xff\xfea dog\n")
    code = main(["train", "ddpo", "--model", tiny_model_dir, "--output_dir", str(tmp_path / "run"),
                 "--prompt_file", str(bad), "--num_epochs", "1", "--sample_num_steps", "2"])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and "not UTF-8" in line and "line 2" in line


@pytest.mark.parametrize("content", [b"garbage, not a safetensors file" * 4, "truncated"], ids=["garbage", "truncated"])
def test_garbage_or_truncated_lora_file_is_one_line(tiny_model_dir, two_epoch_run, tmp_path, capsys, content):
    from diffalign.cli import main

    lora = tmp_path / "lora"
    lora.mkdir()
    weights = lora / "pytorch_lora_weights.safetensors"
    if content == "truncated":
        data = (two_epoch_run / "final" / "pytorch_lora_weights.safetensors").read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes(content)
    code = main(["generate", "--model", tiny_model_dir, "--lora", str(lora), "--prompt", "a cat", "--rlg-scale",
                 "0", "1", "--steps", "2", "--num-images", "1", "--output-dir", str(tmp_path / "out")])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and str(lora) in line, line


def test_pickle_model_directory_is_refused(tiny_model_dir, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    pickled = tmp_path / "pickled"
    StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None).save_pretrained(
        str(pickled), safe_serialization=False)
    assert list(pickled.glob("unet/*.bin"))
    code, err = train(str(pickled), tmp_path / "run", "--num_epochs", "1", capsys=capsys)
    line = one_line(err)  # refused (safetensors only), naming the weights it needs
    assert code == 2 and "safetensors" in line and str(pickled) in line, line
