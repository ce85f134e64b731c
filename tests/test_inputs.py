"""Issue 35 ("Runs and inputs"): untrusted prompt files, model and LoRA paths, run directories and launches are each
one line naming the problem (exit 2), or accepted when they are valid."""

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc

import pytest

from diffalign.prompts import PromptError, read_prompt_records


# ------------------------------------------------------------------------------------------------- prompt files
def test_a_directory_as_prompt_file_is_named_a_directory(tmp_path):
    with pytest.raises(PromptError, match="is a directory"):
        read_prompt_records(str(tmp_path))


def test_a_device_as_prompt_file_is_named_a_device():
    with pytest.raises(PromptError, match="not a regular file"):
        read_prompt_records("/dev/zero")


def test_deeply_nested_jsonl_is_one_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"prompt": "a cat", "x": ' + "[" * 100000 + "]" * 100000 + "}\n")
    with pytest.raises(PromptError, match="line 1 is nested too deeply"):
        read_prompt_records(str(path))


def test_jsonl_line_holding_a_raw_line_separator_is_accepted(tmp_path):
    path = tmp_path / "p.jsonl"
    # json.dumps(ensure_ascii=False) writes U+2028 raw: valid JSON, one line of JSON Lines
    path.write_text(json.dumps({"prompt": "a cat\u2028on a mat", "tag": "x"}, ensure_ascii=False) + "\n"
                    + json.dumps({"prompt": "a dog"}) + "\n", encoding="utf-8")
    prompts, metadata = read_prompt_records(str(path))
    assert prompts == ["a cat\u2028on a mat", "a dog"] and metadata == [{"tag": "x"}, {}]


def test_text_prompt_file_splits_on_newlines_only(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("a cat\u2028on a mat\r\na dog\x0cand a bird\n# a comment\n\na fish".encode())
    assert read_prompt_records(str(path))[0] == ["a cat\u2028on a mat", "a dog\x0cand a bird", "a fish"]


def test_csv_prompt_file_keeps_quoted_line_breaks(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b'prompt,tag\r\n"a cat\non a mat",x\r\na dog,y\r\n')
    prompts, metadata = read_prompt_records(str(path))
    assert prompts == ["a cat\non a mat", "a dog"] and metadata == [{"tag": "x"}, {"tag": "y"}]


def test_large_jsonl_is_read_a_line_at_a_time(tmp_path):
    path = tmp_path / "big.jsonl"
    padding = " " * 20000  # whitespace after each object: 8 MB of file, 400 short prompts
    with open(path, "w") as f:
        for i in range(400):
            f.write(json.dumps({"prompt": f"prompt {i}"}) + padding + "\n")
    tracemalloc.start()
    try:
        prompts, _ = read_prompt_records(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(prompts) == 400
    assert peak < 2_000_000, f"peak {peak} bytes for a {os.path.getsize(path)}-byte file"  # not read whole


def test_text_prompt_file_with_crlf_line_ends(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"a cat\r\na dog\r\n")
    assert read_prompt_records(str(path))[0] == ["a cat", "a dog"]


# ------------------------------------------------------------------------------------------- through the CLI
from cli_helpers import TINY_RUN, one_line
from diffalign.cli import main  # noqa: E402



def train(model, out, *extra):
    return main(["train", "ddpo", "--model", str(model), "--output_dir", str(out)] + TINY_RUN + list(extra))


def _killed_before_checkpoint_0(run):
    """What a run killed after epoch 0's metrics line and before checkpoint 0 leaves: the metrics line, a lock file
    naming a dead process, an empty checkpoints folder holding the temporary directory of the cut write."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.makedirs(run / "checkpoints" / f".tmp-epoch-000000-{dead.pid}")
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "reward_mean": -1.6}) + "\n")
    (run / ".diffalign.lock").write_text(json.dumps({"pid": dead.pid, "host": "x", "time": 0}) + "\n")


@pytest.mark.parametrize("how", ["resume", "rerun"])
def test_a_run_killed_before_its_first_checkpoint_is_not_a_dead_end(how, tiny_model_dir, tmp_path, capsys, caplog):
    import logging

    run = tmp_path / "run"
    _killed_before_checkpoint_0(run)
    with caplog.at_level(logging.INFO, logger="diffalign"):
        if how == "resume":
            code = main(["train", "ddpo", "--model", tiny_model_dir, "--resume", str(run), "--num_epochs", "2"] + TINY_RUN)
        else:
            code = train(tiny_model_dir, run, "--num_epochs", "2")
    assert code == 0, capsys.readouterr().err
    assert ("starting from scratch" if how == "resume" else "starting over") in caplog.text
    with open(run / "metrics.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1]  # the cut run's line is gone, not doubled
    assert (run / "final" / "pytorch_lora_weights.safetensors").exists()


def test_empty_output_dir_is_one_line(tiny_model_dir, capsys):
    assert train(tiny_model_dir, "", "--num_epochs", "1") == 2
    assert "output_dir" in one_line(capsys.readouterr().err)


@pytest.fixture(scope="module")
def pickled_model(tiny_model_dir, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    pickled = tmp_path_factory.mktemp("pickled") / "model"
    StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None).save_pretrained(
        str(pickled), safe_serialization=False)
    assert list(pickled.glob("unet/*.bin")) and not list(pickled.glob("unet/*.safetensors"))
    return pickled


GENERATE = ["generate", "--prompt", "a cat", "--steps", "2", "--num-images", "1", "--device", "cpu"]


@pytest.mark.parametrize("where", ["--model", "--aligned-unet"])
def test_generate_refuses_pickle_weights(where, pickled_model, tiny_model_dir, tmp_path, capsys):
    model = pickled_model if where == "--model" else tiny_model_dir
    extra = ["--aligned-unet", str(pickled_model)] if where == "--aligned-unet" else []
    code = main(GENERATE + ["--model", str(model), "--rlg-scale", "0", "1", "--output-dir", str(tmp_path)] + extra
                + ([] if extra else ["--rlg-scale", "1"]))
    line = one_line(capsys.readouterr().err)
    assert code == 2 and "safetensors" in line and str(pickled_model) in line, line
    assert not (tmp_path / "rlg_grid.png").exists()


@pytest.mark.parametrize("what", ["directory", "device"])
def test_a_directory_or_device_as_prompt_file_is_named_for_what_it_is(what, tiny_model_dir, tmp_path, capsys):
    path = str(tmp_path) if what == "directory" else "/dev/zero"
    code = main(["train", "ddpo", "--model", tiny_model_dir, "--output_dir", str(tmp_path / "run"), "--prompt_file",
                 path, "--num_epochs", "1"])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and ("is a directory" if what == "directory" else "not a regular file") in line, line
    assert "does not exist" not in line


def test_a_file_as_model_is_named_a_file(tmp_path, capsys):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"\0" * 16)
    for argv in (["train", "ddpo", "--model", str(model), "--output_dir", str(tmp_path / "run")],
                 ["generate", "--model", str(model), "--prompt", "a cat", "--rlg-scale", "1"]):
        assert main(argv) == 2
        line = one_line(capsys.readouterr().err)
        assert "is a file" in line and "does not exist" not in line, line


@pytest.mark.parametrize("alias", ["symlink", "relative"])
def test_resume_accepts_the_same_model_by_another_path(alias, tiny_model_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert train(tiny_model_dir, run, "--num_epochs", "1") == 0
    if alias == "symlink":
        other = tmp_path / "link"
        os.symlink(tiny_model_dir, other)
    else:
        monkeypatch.chdir(os.path.dirname(tiny_model_dir))
        other = os.path.join(".", os.path.basename(tiny_model_dir))
    code = main(["train", "ddpo", "--model", str(other), "--resume", str(run), "--num_epochs", "2"] + TINY_RUN)
    assert code == 0, capsys.readouterr().err
    with open(run / "metrics.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1]


def test_resume_still_refuses_another_model(tiny_model_dir, tmp_path, capsys):
    from diffalign.testing import save_tiny_sd_pipeline

    run = tmp_path / "run"
    assert train(tiny_model_dir, run, "--num_epochs", "1") == 0
    other = save_tiny_sd_pipeline(str(tmp_path / "other"), seed=1)
    code = main(["train", "ddpo", "--model", other, "--resume", str(run), "--num_epochs", "2"] + TINY_RUN)
    assert code == 2 and "different configuration" in one_line(capsys.readouterr().err)


def test_a_garbage_lora_file_is_reported_as_not_a_lora(tiny_model_dir, tmp_path, capsys):
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"garbage, not a safetensors file" * 4)
    code = main(GENERATE + ["--model", tiny_model_dir, "--lora", str(lora), "--rlg-scale", "0", "1", "--output-dir",
                            str(tmp_path / "out")])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and "not a LoRA" in line and "does not match" not in line, line


def test_safetensors_without_lora_weights_is_not_a_lora(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import save_file
    import torch

    lora = tmp_path / "lora"
    lora.mkdir()
    save_file({"unet.conv_in.weight": torch.zeros(2, 2)}, str(lora / "pytorch_lora_weights.safetensors"))
    code = main(GENERATE + ["--model", tiny_model_dir, "--lora", str(lora), "--rlg-scale", "0", "1", "--output-dir",
                            str(tmp_path / "out")])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and "not a LoRA" in line, line


# ------------------------------------------------------------------------------------ accelerate launch, killed
def _children(pid: int):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc for the worker processes")
def test_killing_only_the_launcher_stops_both_workers(tiny_model_dir, tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(here)] + [p for p in os.environ.get("PYTHONPATH", "")
                                                                      .split(os.pathsep) if p]))
    run = tmp_path / "run"
    log = open(tmp_path / "launch.log", "w")  # a file, not a pipe: a full pipe would block the workers
    launcher = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffalign.cli", "train", "ddpo", "--model",
         tiny_model_dir, "--output_dir", str(run), "--num_epochs", "1000"] + TINY_RUN,
        env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (run / "metrics.jsonl").exists():  # both workers are training
            assert launcher.poll() is None and time.time() < deadline, (tmp_path / "launch.log").read_text()[-3000:]
            time.sleep(0.2)
        workers = _children(launcher.pid)
        assert len(workers) == 2, workers
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 30
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "a worker outlived its launcher"
        assert "the launcher" in (tmp_path / "launch.log").read_text()
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)  # its own session: the launcher and whatever it left
        except ProcessLookupError:
            pass
        log.close()
