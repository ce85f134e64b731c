"""The shared helpers of `diffalign.utils` and `diffalign.errors`: one `pid_alive` for the run lock and the checkpoint
clean-up, one `first_line`, and a user's peft `LoraConfig` from Python."""

import errno
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig

from diffalign.config import DDPOConfig
from diffalign.errors import ConfigError, first_line
from diffalign.utils.peft_utils import add_lora, record_lora_config
from diffalign.utils.process_utils import launched_processes, pid_alive


def _kill_raising(error):
    def kill(pid, signal):
        raise error

    return kill


def test_pid_alive_is_false_only_for_a_process_that_does_not_exist(monkeypatch):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert pid_alive(os.getpid()) and not pid_alive(gone.pid)
    monkeypatch.setattr(os, "kill", _kill_raising(PermissionError(errno.EPERM, "Operation not permitted")))
    assert pid_alive(12345)  # EPERM: it exists, owned by another user
    monkeypatch.setattr(os, "kill", _kill_raising(ProcessLookupError(errno.ESRCH, "No such process")))
    assert not pid_alive(12345)
    monkeypatch.setattr(os, "kill", _kill_raising(OSError(errno.EINVAL, "Invalid argument")))
    assert pid_alive(12345)  # cannot tell: counted alive, so nothing of it is deleted or taken over


@pytest.mark.parametrize("error, alive", [(OSError(errno.EINVAL, "Invalid argument"), True),
                                          (PermissionError(errno.EPERM, "Operation not permitted"), True),
                                          (ProcessLookupError(errno.ESRCH, "No such process"), False)])
def test_run_lock_and_checkpoint_clean_up_agree_on_which_process_is_alive(tmp_path, monkeypatch, error, alive):
    from diffalign.checkpoint import remove_stale_tmp
    from diffalign.runlog import LOCK, RunDirectoryError, RunLock

    other_pid = 4194000 if os.getpid() != 4194000 else 4194001
    (tmp_path / LOCK).write_text(json.dumps({"pid": other_pid, "host": socket.gethostname()}))
    write = tmp_path / f".tmp-epoch-000003-{other_pid}"
    write.mkdir()
    monkeypatch.setattr(os, "kill", _kill_raising(error))
    remove_stale_tmp(str(tmp_path))
    assert write.exists() == alive
    if alive:
        with pytest.raises(RunDirectoryError, match=f"pid {other_pid}"):
            RunLock(str(tmp_path))._acquire_pidfile()
    else:
        RunLock(str(tmp_path))._acquire_pidfile().release()


def test_launched_processes_reads_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_processes() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched_processes() == 4
    monkeypatch.setenv("WORLD_SIZE", "four")
    assert launched_processes() == 1


def test_first_line():
    assert first_line(ValueError("bad value\nTraceback details")) == "ValueError: bad value"
    assert first_line(ValueError("  \n bad value \n more")) == "ValueError: bad value"
    assert first_line(ValueError("bad value\nmore"), with_type=False) == "bad value"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError("x" * 500), 20, with_type=False) == "x" * 17 + "..."


def test_add_lora_takes_a_user_lora_config():
    from diffalign.testing import tiny_unet

    unet = add_lora(tiny_unet(), lora_config=LoraConfig(r=2, lora_alpha=8, target_modules=["to_q", "to_v"],
                                                         lora_dropout=0.1))
    config = unet.peft_config["default"]
    assert config.r == 2 and config.lora_alpha == 8 and config.lora_dropout == 0.1
    assert set(config.target_modules) == {"to_q", "to_v"}
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n and (".to_q." in n or ".to_v." in n) for n in trainable)
    assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)
    # a config naming no targets gets the given (family) defaults; the caller's object is left as it was
    user = LoraConfig(r=2, lora_alpha=2)
    unet = add_lora(tiny_unet(), target_modules=["to_k"], lora_config=user)
    assert set(unet.peft_config["default"].target_modules) == {"to_k"} and user.target_modules is None


def test_record_lora_config_writes_the_adapter_into_the_training_config():
    config = DDPOConfig(model="digits")
    record_lora_config(config, LoraConfig(r=8, lora_alpha=16, target_modules={"to_v", "to_q"}))
    assert (config.lora_rank, config.lora_alpha, config.lora_target_modules) == (8, 16.0, ["to_q", "to_v"])
    with pytest.raises(ConfigError, match="lora_config must be a peft LoraConfig"):
        record_lora_config(config, {"r": 8})
    with pytest.raises(ConfigError, match="use_lora is false"):
        record_lora_config(DDPOConfig(model="digits", use_lora=False), LoraConfig(r=8))


def test_trainer_trains_a_user_lora_config(tmp_path, tiny_pipe):
    from diffalign.trainers import DDPOTrainer

    config = DDPOConfig(model="unused", output_dir=str(tmp_path / "run"), prompts=["a cat", "a dog"], num_epochs=1,
                        sample_num_steps=2, sample_num_prompts_per_epoch=2, sample_images_per_prompt=2,
                        sample_batch_size=4, train_batch_size=2, grid_num_images=2)
    lora_config = LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_v"])
    trainer = DDPOTrainer(config, pipeline=tiny_pipe, reward_fn=lambda images, prompts, metadata=None:
                          images.mean(dim=(1, 2, 3)).float(), lora_config=lora_config)
    adapter = trainer.pipe.unet.peft_config["default"]
    assert adapter.r == 2 and adapter.lora_alpha == 4 and set(adapter.target_modules) == {"to_k", "to_v"}
    assert (config.lora_rank, config.lora_alpha, config.lora_target_modules) == (2, 4.0, ["to_k", "to_v"])
    before = [p.detach().clone() for p in trainer.trainable_params]
    trainer.step(0)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.trainable_params))
