"""The trainers on accelerate's engines, with 2 CPU processes (gloo): the denoiser is DDP-wrapped, ranks hold identical
weights after every epoch, a 2-process run follows the 1-process run of the same config (a stated tolerance), a killed
2-process run resumes bit-identically, and the sharded path (torch's FSDP2 `fully_shard`, which accelerate only applies
on GPUs) trains, checkpoints and resumes. Runs are driven by `tests/distributed_run.py`."""

import json
import os
import signal
import subprocess
import sys
import time

import distributed_run
import pytest
import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
           PYTHONPATH=os.pathsep.join([HERE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
          "1", "--mixed_precision", "no", "--dynamo_backend", "no"]

# 4 prompts x 2 images per epoch (4 samples per process). Both algorithms take optimizer steps that put unequal
# numbers of rows on the two processes (2 of the 4 prompt groups per PRDP step, 2 of the 8 samples per DDPO step), so
# the padding forwards and a process without rows in a step are exercised. A smooth reward: JPEG sizes move in whole
# bytes and would turn float noise into jumps.
TINY = ["--prompts", "[a cat, a dog, a bird, a fish]", "--sample_num_steps", "2",
        "--sample_num_prompts_per_epoch", "4", "--sample_images_per_prompt", "2", "--sample_batch_size", "4",
        "--grid_num_images", "1", "--reward", "distributed_run:brightness", "--seed", "3", "--checkpoint_every", "1",
        "--checkpoints_total_limit", "10"]
ALGORITHMS = {
    "prdp": ["--train_num_inner_epochs", "2", "--train_prompts_per_step", "2", "--train_beta", "0.1",
             "--train_clip_eps", "0.01", "--train_learning_rate", "1e-3"],
    "ddpo": ["--train_batch_size", "2", "--advantage_mode", "group", "--train_reuse_epochs", "1",
             "--train_clip_range", "0.2", "--train_learning_rate", "1e-3"],
}
EPOCHS = 3
# 2 processes vs 1 after 3 epochs. Measured on this machine: reward means equal to 1e-6; the learned LoRA up-weights
# (zero at the start) differ by 0.38% (PRDP) and 0.007% (DDPO) of their norm, max |difference| 1.3e-3 and 1e-4. The
# 1-process run with other sample and micro-batch sizes differs from itself by as much (float reduction order, which
# Adam's normalised steps amplify for near-zero gradients); a wrong gradient scale would differ by tens of percent.
REWARD_TOLERANCE = 1e-4
UPDATE_TOLERANCE = 0.02  # relative difference of the learned LoRA up-weights


def args_for(algorithm, model, out, *extra):
    run = [algorithm, "--model", model, "--output_dir", str(out), "--num_epochs", str(EPOCHS)]
    return run + ALGORITHMS[algorithm] + TINY + list(extra)


def report(out):
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def lora(out):
    return load_file(os.path.join(out, "final", "pytorch_lora_weights.safetensors"))


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def relative_update_difference(a, b):
    """`||B_a - B_b|| / ||B_a||` over the LoRA up-weights, which start at zero: the difference of what was learned."""
    ups = [k for k in a if "lora_B" in k or "lora.up" in k]
    difference = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in ups).sqrt()
    return (difference / sum((a[k].double() ** 2).sum() for k in ups).sqrt()).item()


def run_launched(command, args, timeout=400):
    result = subprocess.run(command + [os.path.join(HERE, "distributed_run.py")] + args, env=ENV,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def ddp_runs(tiny_model_dir, tmp_path_factory):
    """Every 2-process run in one launch (2 CPU processes, gloo): both algorithms on DDP, and the FSDP2 full fine-tune
    (resumed from its epoch-0 checkpoint too); then both algorithms on one process in this one."""
    root = tmp_path_factory.mktemp("ddp")
    run_launched(LAUNCH, args_for("prdp", tiny_model_dir, root / "prdp-2") + ["::"]
                 + args_for("ddpo", tiny_model_dir, root / "ddpo-2") + ["::"]
                 + ["prdp", "--fsdp2", "--resume-copy-from-epoch", "0", "--model", tiny_model_dir, "--output_dir",
                    str(root / "fsdp-2")] + FSDP)
    for algorithm in ALGORITHMS:
        distributed_run.main(args_for(algorithm, tiny_model_dir, root / f"{algorithm}-1"))
    return root


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_two_ddp_processes_follow_the_one_process_run(ddp_runs, algorithm):
    two, one = report(ddp_runs / f"{algorithm}-2"), report(ddp_runs / f"{algorithm}-1")
    assert two["engine"] == "ddp" and two["num_processes"] == 2 and two["denoiser_class"] == "DistributedDataParallel"
    assert [c["identical"] for c in two["rank_checks"]] == [True] * EPOCHS  # same weights on both ranks, every epoch
    assert one["num_processes"] == 1
    for a, b in zip(one["metrics"], two["metrics"]):
        assert a["images"] == b["images"] == 8
        assert abs(a["reward_mean"] - b["reward_mean"]) <= REWARD_TOLERANCE, (a, b)
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05, abs=1e-4)
    one_lora, two_lora = lora(ddp_runs / f"{algorithm}-1"), lora(ddp_runs / f"{algorithm}-2")
    relative = relative_update_difference(one_lora, two_lora)
    print(f"{algorithm}: LoRA after {EPOCHS} epochs, 2 processes vs 1: max |difference| "
          f"{max_difference(one_lora, two_lora):.3g}, learned up-weights differ by {relative:.3%}")
    assert relative <= UPDATE_TOLERANCE


def test_a_two_process_checkpoint_resumes_on_one_process(ddp_runs, tiny_model_dir, tmp_path):
    """The same config on another number of processes: the 2-process DDPO run's epoch-1 checkpoint (weights, Adam
    state by parameter name, each process's replayed samples) resumes on 1 process and ends where the 1-process run
    ends."""
    import shutil

    from diffalign.config import load_config
    from diffalign.trainers import DDPOTrainer

    out = tmp_path / "ddpo-2-on-1"
    shutil.copytree(ddp_runs / "ddpo-2", out, ignore=shutil.ignore_patterns(".diffalign.lock", "final", "epoch-000002"))
    config = load_config("ddpo", None, {"resume_from": str(out)}, args_for("ddpo", tiny_model_dir, out)[1:])
    trainer = DDPOTrainer(config)
    assert trainer.first_epoch == 2
    assert [len(t) for t, _ in trainer.replay] == [8]  # both processes' 4 samples of epoch 1, in global order
    trainer.train(progress=False)
    relative = relative_update_difference(lora(ddp_runs / "ddpo-1"), lora(out))
    assert relative <= UPDATE_TOLERANCE, relative


@pytest.mark.slow  # 2-process kill and resume: ~20 s; the 1-process kill and resume runs by default
def test_killed_two_process_run_resumes_bit_identically(ddp_runs, tiny_model_dir, tmp_path):
    """`diffalign train --accelerate-config multi_gpu` (2 CPU processes, 2 epochs), SIGKILLed once its epoch-0
    checkpoint exists, then resumed: its epoch-1 checkpoint (weights and optimizer) equals the uninterrupted 2-process
    run's bit for bit."""
    out = tmp_path / "killed"
    train = ["train", "prdp", "--model", tiny_model_dir, "--output_dir", str(out), "--num_epochs", "2"]
    train += ALGORITHMS["prdp"] + TINY
    env = dict(ENV, DIFFALIGN_LAUNCH_ARGS="--num_processes 2")
    killed = subprocess.Popen([sys.executable, "-m", "diffalign.cli"] + train + ["--accelerate-config", "multi_gpu"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "epoch-000000").exists():
        assert killed.poll() is None and time.time() < deadline, killed.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)  # the launcher and both workers
    killed.wait()
    assert not (out / "final").exists()
    again = ["train", "prdp", "--resume", str(out), "--accelerate-config", "multi_gpu", "--num_epochs", "2",
             "--model", tiny_model_dir] + ALGORITHMS["prdp"] + TINY
    resumed = subprocess.run([sys.executable, "-m", "diffalign.cli"] + again, env=env, capture_output=True, text=True,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for state in ("model", "optimizer"):
        a = load_file(os.path.join(ddp_runs / "prdp-2", "checkpoints", "epoch-000001", f"{state}.safetensors"))
        b = load_file(os.path.join(out, "checkpoints", "epoch-000001", f"{state}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), state
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1]


# DiffusionNFT: forward-process training on final samples (its own row layout: (sample, noise level) rows, noise seeded
# per row, an "old" adapter moved after every optimizer step). 2 optimizer steps of 4 samples per epoch: each process
# holds 2 of a step's samples.
NFT = ["--train_batch_size", "4", "--train_timestep_fraction", "0.5", "--train_learning_rate", "1e-3",
       "--train_kl_coef", "1e-4", "--old_policy_decay_type", "1"]


@pytest.mark.slow
def test_nft_two_ddp_processes_follow_the_one_process_run(tiny_model_dir, tmp_path):
    two, one = tmp_path / "nft-2", tmp_path / "nft-1"
    run = ["nft", "--model", tiny_model_dir, "--num_epochs", str(EPOCHS)] + NFT + TINY
    run_launched(LAUNCH, run + ["--output_dir", str(two)])
    distributed_run.main(run + ["--output_dir", str(one)])
    a, b = report(one), report(two)
    assert b["engine"] == "ddp" and b["num_processes"] == 2 and b["denoiser_class"] == "DistributedDataParallel"
    assert [c["identical"] for c in b["rank_checks"]] == [True] * EPOCHS
    for x, y in zip(a["metrics"], b["metrics"]):
        assert x["images"] == y["images"] == 8
        assert abs(x["reward_mean"] - y["reward_mean"]) <= REWARD_TOLERANCE, (x, y)
        assert y["loss"] == pytest.approx(x["loss"], rel=0.05, abs=1e-4)
    one_lora, two_lora = lora(one), lora(two)
    relative = relative_update_difference(one_lora, two_lora)
    print(f"nft: LoRA after {EPOCHS} epochs, 2 processes vs 1: max |difference| "
          f"{max_difference(one_lora, two_lora):.3g}, learned up-weights differ by {relative:.3%}")
    assert relative <= UPDATE_TOLERANCE


# FSDP2: a full fine-tune (the case sharding is for), PRDP's two-pass update with the lazy reference pass of the
# frozen copy (sharded too), unequal rows per process, gathered checkpoints and final weights.
FSDP = ["--use_lora", "false", "--train_two_pass", "true", "--train_micro_batch_size", "2",
        "--sample_compute_kl", "false", "--train_timestep_fraction", "0.5", "--train_num_inner_epochs", "2",
        "--train_prompts_per_step", "2", "--train_beta", "0.1", "--train_clip_eps", "0.01",
        "--train_learning_rate", "1e-4", "--num_epochs", "2", "--final_eval_num_images", "2"] + TINY


def unet(out):
    return load_file(os.path.join(out, "final", "unet", "diffusion_pytorch_model.safetensors"))


def test_fsdp2_sharded_full_fine_tune(ddp_runs, tiny_model_dir, tmp_path):
    """torch's `fully_shard` (FSDP2) on 2 CPU processes, applied by `distributed_run.py` where accelerate's FSDP plugin
    would (accelerate falls back to DDP on a CPU): the same trainer code on DTensor parameters."""
    two, one = ddp_runs / "fsdp-2", tmp_path / "fsdp-1"
    distributed_run.main(["prdp", "--model", tiny_model_dir, "--output_dir", str(one)] + FSDP)
    sharded = report(two)
    assert sharded["sharded"] and sharded["denoiser_class"] == "FSDPUNet2DConditionModel"
    assert sharded["reference_class"] == "FSDPUNet2DConditionModel"
    difference = max_difference(unet(one), unet(two))
    print(f"fsdp2: max |UNet(2 sharded processes) - UNet(1 process)| after 2 epochs = {difference:.3g}")
    assert difference <= 5e-4  # measured 3e-5
    a, b = unet(two), unet(str(two) + "-resumed")  # resumed from the gathered epoch-0 checkpoint
    assert report(str(two) + "-resumed")["first_epoch"] == 1
    assert all(torch.equal(a[k], b[k]) for k in a)
    with open(two / "final_eval.json") as f:
        assert json.load(f)["num_images"] == 2  # every process sampled (each forward gathers the shards)


# ------------------------------------------------------------------------------------------------ launch configs
def test_shipped_launch_configs_load_and_build_the_launch_command(monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    from diffalign.accelerate_configs import NAMES, LaunchConfigError, config_path, launch_command

    kinds = {n: load_config_from_file(config_path(n)) for n in NAMES}
    assert {n: str(c.distributed_type).split(".")[-1] for n, c in kinds.items()} == {
        "multi_gpu": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED",
        "multi_node": "MULTI_GPU"}
    assert kinds["fsdp"].fsdp_config["fsdp_version"] == 2
    assert [kinds[n].deepspeed_config["zero_stage"] for n in ("zero2", "zero3")] == [2, 3]
    monkeypatch.setattr("diffalign.accelerate_configs._local_devices", lambda: 4)
    command = launch_command("multi_node", ["train", "prdp"], extra=["--machine_rank", "1"])
    assert command[command.index("--num_processes") + 1] == "8"  # 4 GPUs x 2 machines
    assert command[-6:] == ["--machine_rank", "1", "-m", "diffalign.cli", "train", "prdp"]
    monkeypatch.setattr("diffalign.accelerate_configs._local_devices", lambda: 0)
    with pytest.raises(LaunchConfigError, match="no GPU"):
        launch_command("fsdp", ["train", "prdp"], extra=[])
    with pytest.raises(LaunchConfigError, match="neither a file nor one of"):
        config_path("zero4")
