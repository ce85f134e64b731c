"""The forward-process trainers (`nft`, `awm`, `dgpo`) on every core family, from the CLI: a 2-epoch run writes a LoRA
that the family's pipeline loads (`load_lora_weights`) and that changes its images, on tiny SD (epsilon and
v-prediction), SDXL, SD3 and FLUX directories; a killed run resumed with `--resume` is bit-identical on a flow family;
AWM on 2 processes follows 1 process; and the deterministic sampler they train on is the diffusers scheduler's own step
(DDIM with eta 0, flow Euler), the rollout the family pipeline's.

The combinations the trainers' own files run (tests/test_nft_trainer.py: nft on sd, sd3, flux; tests/test_awm.py: awm
on sd, sd3; tests/test_dgpo.py: dgpo on sd, sd3; each with a UNet kill-and-resume) are not repeated here. One
combination runs in the default suite; the others with `-m slow` (each is a CLI run of several seconds to minutes).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import assert_killed_run_resumes_bit_identically
from diffalign.cli import main
from diffalign.families import family_named

SIZE = 16  # image side: a multiple of every core family's resolution multiple, and fast
PROMPT = "a photo of a cat"

# a run of a few seconds: 2 prompts x 2 images, 3 sampling steps, 2 epochs, one optimizer step per epoch
TINY_RUN = [
    "--prompts", "[a photo of a cat, a red car]", "--num_epochs", "2", "--sample_num_steps", "3",
    "--sample_num_prompts_per_epoch", "2", "--sample_images_per_prompt", "2", "--sample_batch_size", "4",
    "--grid_num_images", "1", "--reward", "jpeg_compressibility", "--final_eval_num_images", "0",
    "--sample_resolution", str(SIZE), "--seed", "3",
]
LORA_LEARNING_RATE = ["--train_learning_rate", "1e-2"]
# each trainer's keys for that run: every sampled noise level trained, a KL term so the base model is evaluated too
TRAINER_RUN = {
    "nft": ["--train_micro_batch_size", "4"],
    "awm": ["--train_micro_batch_size", "4", "--train_timesteps", "2", "--train_timestep_fraction", "1.0",
            "--train_kl_coef", "0.01"],
    "dgpo": ["--train_micro_batch_size", "3", "--train_trunc_steps", "2", "--train_num_timesteps", "2",
             "--train_use_ema_ref", "true", "--train_kl_coef", "0.01"],
}
# the keys each trainer logs every epoch
LOGGED = {
    "nft": ("loss", "policy_loss", "kl", "old_deviation", "grad_norm", "old_policy_decay"),
    "awm": ("loss", "policy_loss", "kl", "ema_kl", "matching_loss", "grad_norm", "old_policy_decay"),
    "dgpo": ("loss", "policy_loss", "dsm", "ref_dsm", "kl", "group_weight", "grad_norm", "old_policy_decay"),
}
# (family, tiny-model variant): SD with an epsilon and a v-prediction UNet, SDXL, SD3, FLUX.1
FAMILIES = {"sd": ("sd", {}), "sd-v_prediction": ("sd", {"prediction_type": "v_prediction"}), "sdxl": ("sdxl", {}),
            "sd3": ("sd3", {}), "flux": ("flux", {})}
IN_TRAINER_FILES = {("nft", "sd"), ("nft", "sd3"), ("nft", "flux"), ("awm", "sd"), ("awm", "sd3"), ("dgpo", "sd"),
                    ("dgpo", "sd3")}
DEFAULT_SUITE = ("awm", "sd-v_prediction")  # the one combination of the default suite: a few seconds


def combinations():
    params = []
    for trainer in TRAINER_RUN:
        for family in FAMILIES:
            if (trainer, family) in IN_TRAINER_FILES:
                continue
            marks = () if (trainer, family) == DEFAULT_SUITE else (pytest.mark.slow,)
            params.append(pytest.param(trainer, family, marks=marks, id=f"{trainer}-{family}"))
    return params


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """`family key -> tiny model directory`, each written once for the module."""
    root, made = tmp_path_factory.mktemp("forward_families"), {}

    def get(key):
        if key not in made:
            name, variant = FAMILIES[key]
            made[key] = family_named(name).save_tiny(str(root / key), **variant)
        return made[key]

    return get


def family_pipeline(family, model):
    import diffusers

    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(model, **family.pipeline_init_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(family, pipe):
    kwargs = dict(num_inference_steps=2, height=SIZE, width=SIZE, output_type="pt",
                  **family.pipeline_guidance_kwargs(1.0, 3.5))
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("trainer,family_key", combinations())
def test_two_epoch_cli_run_writes_a_lora_that_loads_and_changes_images(trainer, family_key, model_dirs, tmp_path):
    family = family_named(FAMILIES[family_key][0])
    model = model_dirs(family_key)
    out = str(tmp_path / "run")
    assert main(["train", trainer, "--model", model, "--output_dir", out] + TINY_RUN + LORA_LEARNING_RATE
                + TRAINER_RUN[trainer]) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [0, 1]
    for key in LOGGED[trainer]:
        assert key in records[-1], key
    assert records[-1]["grad_norm"] > 0
    weights = load_file(os.path.join(out, "final", "pytorch_lora_weights.safetensors"))
    assert weights and not any(".old." in key for key in weights)  # the trained adapter alone

    pipe = family_pipeline(family, model)
    if FAMILIES[family_key][1]:
        assert pipe.scheduler.config.prediction_type == "v_prediction"
    before = images(family, pipe)
    pipe.load_lora_weights(os.path.join(out, "final"))
    after = images(family, pipe)
    assert (after - before).abs().max() > 1e-4  # the trained LoRA is loaded and changes the images


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.slow  # three CLI runs of 3 epochs each
@pytest.mark.parametrize("trainer", ["awm", "dgpo"])
def test_killed_and_resumed_run_on_a_flow_family_is_bit_identical(trainer, model_dirs, tmp_path):
    """SD3 (a flow transformer; the trainers' own files resume an epsilon UNet): SIGKILL after the first checkpoint,
    then `--resume`; the EMA adapter samples (AWM off-policy, DGPO after `switch_ema_ref 0`), so it must come back
    from the checkpoint for the LoRA and every logged metric to equal a straight run's."""
    extra = {"awm": ["--train_off_policy", "true", "--train_clip_range", "0.01"], "dgpo": ["--switch_ema_ref", "0"]}
    args = (["train", trainer, "--model", model_dirs("sd3"), "--checkpoint_every", "1"] + TINY_RUN
            + LORA_LEARNING_RATE + TRAINER_RUN[trainer] + extra[trainer] + ["--num_epochs", "3"])
    assert_killed_run_resumes_bit_identically(args, tmp_path)


# ------------------------------------------------------------------------------------------------ 2 processes
@pytest.mark.slow  # a 2-process launch and a 1-process run
def test_awm_two_processes_follow_the_one_process_run(tiny_model_dir, tmp_path):
    """2 DDP processes (gloo, CPU) against 1, as tests/test_distributed.py checks the other trainers: the same rewards,
    losses and ranks' weights, and a LoRA within float tolerance. Off-policy with a KL term, so the EMA adapter's and
    the base model's frozen outputs enter the loss; optimizer steps of 4 samples put 2 on each process."""
    import distributed_run

    here = os.path.dirname(os.path.abspath(__file__))
    paths = [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(paths))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]

    def args(out):
        return ["awm", "--model", tiny_model_dir, "--output_dir", str(out), "--num_epochs", "3", "--prompts",
                "[a cat, a dog, a bird, a fish]", "--sample_num_steps", "2", "--sample_num_prompts_per_epoch", "4",
                "--sample_images_per_prompt", "2", "--sample_batch_size", "4", "--grid_num_images", "1", "--reward",
                "distributed_run:brightness", "--seed", "3", "--train_timesteps", "2", "--train_timestep_fraction",
                "1.0", "--train_batch_size", "4", "--train_micro_batch_size", "2", "--train_off_policy", "true",
                "--train_clip_range", "0.05", "--train_kl_coef", "0.01", "--train_learning_rate", "1e-3",
                "--final_eval_num_images", "0"]

    result = subprocess.run(launch + [os.path.join(here, "distributed_run.py")] + args(tmp_path / "two"), env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    distributed_run.main(args(tmp_path / "one"))
    with open(tmp_path / "two" / "report.json") as f:
        two = json.load(f)
    with open(tmp_path / "one" / "report.json") as f:
        one = json.load(f)
    assert two["engine"] == "ddp" and two["num_processes"] == 2
    assert [c["identical"] for c in two["rank_checks"]] == [True] * 3  # same weights on both ranks, every epoch
    for a, b in zip(one["metrics"], two["metrics"]):
        assert a["images"] == b["images"] == 8
        assert abs(a["reward_mean"] - b["reward_mean"]) <= 1e-4, (a, b)
        for key in ("loss", "matching_loss", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), (key, a, b)
    lora_one = load_file(str(tmp_path / "one" / "final" / "pytorch_lora_weights.safetensors"))
    lora_two = load_file(str(tmp_path / "two" / "final" / "pytorch_lora_weights.safetensors"))
    ups = [k for k in lora_one if "lora_B" in k or "lora.up" in k]
    difference = sum(((lora_one[k].double() - lora_two[k].double()) ** 2).sum() for k in ups).sqrt()
    relative = difference / sum((lora_one[k].double() ** 2).sum() for k in ups).sqrt()
    print(f"awm: LoRA after 3 epochs, 2 processes vs 1: learned up-weights differ by {float(relative):.3%}")
    assert relative <= 0.02


# ------------------------------------------------------------------------------------------------ the sampler
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_the_ddim_kernels_deterministic_step_is_ddims_step_with_eta_0(prediction_type, set_alpha_to_one):
    """The step the forward trainers sample with on a UNet (`sample_deterministic`), against
    `DDIMScheduler.step(..., eta=0)` at every step of a schedule, the last one (to `final_alpha_cumprod`) included."""
    from diffalign.kernels import DDIMKernel
    from diffalign.testing import tiny_ddim_scheduler

    scheduler = tiny_ddim_scheduler(prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one)
    scheduler.set_timesteps(7)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(3, 4, 6, 6, generator=g)
    kernel = DDIMKernel(eta=1.0)
    for timestep in scheduler.timesteps:
        output = torch.randn(sample.shape, generator=g)
        ours = kernel.step(scheduler, output, timestep, sample, stochastic=False)[0]
        expected = scheduler.step(output, timestep, sample, eta=0.0).prev_sample
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
        sample = expected


@pytest.mark.parametrize("family_key", ["sd", "sd-v_prediction", "sd3"])
def test_a_forward_trainers_rollout_is_the_family_pipeline_with_the_schedulers_own_step(family_key, tmp_path):
    """The final images a forward trainer trains on (CFG-free, deterministic: NVIDIA's defaults) are the family
    pipeline's at guidance 1 with the same initial noise: DDIM with eta 0 (epsilon and v UNets), Euler on SD3."""
    from diffalign.config import NFTConfig
    from diffalign.trainers import NFTTrainer

    name, variant = FAMILIES[family_key]
    family = family_named(name)
    pipe = family.tiny_pipeline(**variant)
    family.set_kernel_scheduler(pipe)
    expected_scheduler = "FlowMatchEulerDiscreteScheduler" if name == "sd3" else "DDIMScheduler"
    assert type(pipe.scheduler).__name__ == expected_scheduler
    config = NFTConfig(model="unused", output_dir=str(tmp_path / "run"), prompts=[PROMPT, "a red car"], num_epochs=1,
                       sample_num_steps=4, sample_num_prompts_per_epoch=2, sample_images_per_prompt=1,
                       sample_batch_size=2, grid_num_images=1, sample_resolution=SIZE)
    trainer = NFTTrainer(config, pipeline=pipe,
                         reward_fn=lambda images, prompts, metadata=None: images.mean(dim=(1, 2, 3)))
    with torch.no_grad():  # a LoRA that changes the model: the old policy (a copy of it) samples
        for param in trainer.policy_params + trainer.old_params:
            param.fill_(0.05)
    prompts = trainer.local_prompts(0)
    trajectories = trainer.sample(0, prompts, False)
    assert not trajectories.stochastic.any()
    generators = trainer.sample_generators(0, range(len(prompts)))
    latents = torch.cat([trainer.family.prepare_latents(1, SIZE, SIZE, torch.float32, "cpu", g) for g in generators])
    pipe.unet.eval() if hasattr(pipe, "unet") else pipe.transformer.eval()
    stock = pipe(prompt=prompts, num_inference_steps=4, latents=latents, height=SIZE, width=SIZE, output_type="pt",
                 **family.pipeline_guidance_kwargs(1.0, 3.5)).images
    torch.testing.assert_close(trajectories.images, stock, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ full fine-tuning
FULL_FINE_TUNES = [pytest.param(trainer, family, id=f"{trainer}-{family}",
                                marks=() if (trainer, family) == ("nft", "sd") else (pytest.mark.slow,))
                   for trainer in TRAINER_RUN for family in ("sd", "sd3")]


@pytest.mark.parametrize("trainer,family_key", FULL_FINE_TUNES)
def test_full_fine_tune_saves_a_denoiser_that_loads_with_the_familys_class(trainer, family_key, model_dirs,
                                                                             tmp_path):
    """`use_lora: false`: the whole denoiser trains (the old policy a frozen copy of it), is saved as safetensors in
    `final/<denoiser>/`, loads with the family's diffusers class, differs from the base model's and changes the
    pipeline's images."""
    import diffusers

    family = family_named(FAMILIES[family_key][0])
    model = model_dirs(family_key)
    out = tmp_path / "run"
    assert main(["train", trainer, "--model", model, "--output_dir", str(out), "--use_lora", "false",
                 "--train_learning_rate", "1e-3"] + TINY_RUN + TRAINER_RUN[trainer]) == 0
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [0, 1] and records[-1]["grad_norm"] > 0
    saved = out / "final" / family.denoiser_name
    assert (saved / "diffusion_pytorch_model.safetensors").is_file()
    assert not (out / "final" / "pytorch_lora_weights.safetensors").exists()
    pipe = family_pipeline(family, model)
    base_denoiser = getattr(pipe, family.denoiser_name)
    trained = type(base_denoiser).from_pretrained(str(saved))
    assert isinstance(trained, getattr(diffusers, type(base_denoiser).__name__))
    base, new = base_denoiser.state_dict(), trained.state_dict()
    assert base.keys() == new.keys()
    assert any(not torch.equal(base[k], new[k]) for k in base)
    before = images(family, pipe)
    setattr(pipe, family.denoiser_name, trained.eval())
    assert (images(family, pipe) - before).abs().max() > 1e-4


@pytest.mark.slow  # three CLI runs of 3 epochs each
def test_killed_and_resumed_full_fine_tune_is_bit_identical(model_dirs, tmp_path):
    """A full fine-tune's old policy is a frozen copy of the denoiser, outside the trained weights: it comes back from
    the checkpoint (DGPO's EMA reference samples from epoch 1 on and clips the loss), so the saved UNet and every
    logged metric equal a straight run's."""
    args = (["train", "dgpo", "--model", model_dirs("sd"), "--checkpoint_every", "1", "--use_lora", "false",
             "--train_learning_rate", "1e-3", "--switch_ema_ref", "0"] + TINY_RUN + TRAINER_RUN["dgpo"]
            + ["--num_epochs", "3"])
    assert_killed_run_resumes_bit_identically(args, tmp_path, final_weights="unet/diffusion_pytorch_model.safetensors")


def test_full_fine_tune_samples_with_a_frozen_old_copy_that_follows_by_its_decay(tmp_path, tiny_pipe):
    """The old policy of a full fine-tune is a frozen copy of the denoiser: it samples (moving the trained weights does
    not move the rollout), the loss gets its output and the base copy's, and after the epoch it follows the trained
    weights by NVIDIA's decay; checkpoints carry it."""
    from diffalign.config import NFTConfig
    from diffalign.forward_process import old_policy_decay
    from diffalign.trainers import NFTTrainer
    from diffalign.trainers.base import BaseTrainer
    from diffalign.trainers.update_plan import Rows
    from diffalign.utils.peft_utils import has_lora

    config = NFTConfig(model="unused", output_dir=str(tmp_path / "run"), prompts=["a cat", "a dog"], num_epochs=1,
                       sample_num_steps=3, sample_num_prompts_per_epoch=2, sample_images_per_prompt=2,
                       sample_batch_size=4, grid_num_images=1, train_learning_rate=1e-3, train_micro_batch_size=3,
                       use_lora=False)
    config.validate()
    trainer = NFTTrainer(config, pipeline=tiny_pipe, reward_fn=lambda images, prompts, metadata=None:
                         images.mean(dim=(1, 2, 3)))
    denoiser = trainer.family.denoiser
    assert not has_lora(denoiser) and trainer.old_denoiser is not denoiser and trainer.ref_denoiser is not None
    assert len(trainer.policy_params) == len(list(denoiser.parameters())) == len(trainer.trainable_params)
    assert all(p.requires_grad for p in trainer.policy_params) and not any(p.requires_grad for p in trainer.old_params)
    assert all(torch.equal(a, b) for a, b in zip(trainer.old_params, trainer.policy_params))

    prompts = trainer.local_prompts(0)
    first = trainer.sample(0, prompts, False).final_latents
    with torch.no_grad():
        for param in trainer.policy_params:
            param.add_(0.02 * torch.randn_like(param))
    assert torch.equal(trainer.sample(0, prompts, False).final_latents, first)  # the old copy samples
    assert not torch.equal(BaseTrainer.sample(trainer, 0, prompts, False).final_latents, first)
    assert trainer.denoiser is trainer.prepared  # the live denoiser is back after sampling

    trajectories = trainer.sample(0, prompts, False)
    rewards = trainer.score(trajectories)["reward"]
    batch = trainer.training_batch(trajectories, rewards, rewards, prompts, epoch=0)
    rows = Rows(torch.tensor([2, 0]), torch.tensor([1, 2]))
    output, old_output, ref_output, noised = trainer.model_outputs(trainer.denoiser, batch, rows)
    with torch.no_grad():
        for model, frozen in ((trainer.old_denoiser, old_output), (trainer.ref_denoiser, ref_output)):
            expected = trainer.family.predict(model, noised.denoiser_input, noised.t, noised.conditioning, None, 1.0)
            torch.testing.assert_close(frozen, expected, rtol=0, atol=0)
        live = trainer.family.predict(trainer.denoiser, noised.denoiser_input, noised.t, noised.conditioning, None, 1.0)
    torch.testing.assert_close(output, live, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(output, old_output) and torch.allclose(old_output, ref_output)  # old = base still

    old_before = [p.detach().clone() for p in trainer.old_params]
    metrics = trainer.step(0)
    eta = old_policy_decay(1, 0, 0.001, 0.5)
    assert metrics["old_policy_decay"] == eta and metrics["grad_norm"] > 0
    for old0, old, new in zip(old_before, trainer.old_params, trainer.policy_params):
        assert torch.equal(old, old0 * eta + new * (1 - eta))
    state = trainer.extra_state()["old_policy"]
    assert len(state) == len(trainer.old_params) and all(torch.equal(a, b) for a, b in zip(state, trainer.old_params))


# ------------------------------------------------------------------------------------------------ the prompt cache
def test_a_resumed_trainer_encodes_its_prompts_as_the_run_it_continues(tmp_path):
    """SD3's pooled CLIP projection of a prompt differs in the last bit with the batch it is encoded in, and the
    family caches each prompt's conditioning from its first encoding: a resumed run must rebuild the cache as the
    killed run filled it (here the grid's prompt alone, then the epoch's others), or it samples other images."""
    from diffalign.config import NFTConfig
    from diffalign.trainers import NFTTrainer

    def trainer(run="run", **overrides):
        config = NFTConfig(model="unused", output_dir=str(tmp_path / run), prompts=["a cat", "a dog", "a bird"],
                           num_epochs=2, sample_num_steps=2, sample_num_prompts_per_epoch=3,
                           sample_images_per_prompt=1, sample_batch_size=3, grid_num_images=1,
                           sample_resolution=SIZE, **overrides)
        return NFTTrainer(config, pipeline=family_named("sd3").tiny_pipeline(),
                          reward_fn=lambda images, prompts, metadata=None: images.mean(dim=(1, 2, 3)))

    killed = trainer()
    prompts = killed.local_prompts(0)
    killed.family.encode_prompts([prompts[0]])  # as the grid before training encodes its prompt
    killed.step(0)
    killed.save_checkpoint(0)
    resumed = trainer(resume_from=str(tmp_path / "run"))
    assert resumed.first_epoch == 1
    ours, theirs = resumed.family.encode_prompts(prompts), killed.family.encode_prompts(prompts)
    fresh = trainer("fresh").family.encode_prompts(prompts)  # all three in one batch
    assert not torch.equal(fresh["pooled_projections"], theirs["pooled_projections"])  # the batch matters
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    torch.testing.assert_close(resumed.sample(1, resumed.local_prompts(1), False).final_latents,
                               killed.sample(1, killed.local_prompts(1), False).final_latents, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ GRPO-Guard
# `train ddpo --train_ratio_norm` (GRPO-Guard's RatioNorm; tests/test_grpo_guard.py: the loss against the authors' code
# and an SD3 run). It needs a flow model (a DDIM one is refused there): the flow families here.
RATIO_NORM_RUN = ["--train_ratio_norm", "true", "--train_batch_size", "4", "--train_clip_range", "1e-3",
                  "--advantage_mode", "group", "--sample_guidance_scale", "3.0", "--sample_embedded_guidance", "3.5",
                  "--lora_rank", "4", "--lora_alpha", "8"] + LORA_LEARNING_RATE


@pytest.mark.slow  # a CLI run per family
@pytest.mark.parametrize("family_key", ["sd3", "flux"])
def test_grpo_guard_run_writes_a_lora_that_loads_and_changes_images(family_key, model_dirs, tmp_path):
    family = family_named(FAMILIES[family_key][0])
    model = model_dirs(family_key)
    out = str(tmp_path / "run")
    assert main(["train", "ddpo", "--model", model, "--output_dir", out] + TINY_RUN + RATIO_NORM_RUN) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [0, 1] and all(r["grad_norm"] > 0 for r in records)
    pipe = family_pipeline(family, model)
    before = images(family, pipe)
    pipe.load_lora_weights(os.path.join(out, "final"))
    assert (images(family, pipe) - before).abs().max() > 1e-4


@pytest.mark.slow  # three CLI runs of 3 epochs each
def test_grpo_guard_killed_and_resumed_run_is_bit_identical(model_dirs, tmp_path):
    args = (["train", "ddpo", "--model", model_dirs("sd3"), "--checkpoint_every", "1"] + TINY_RUN + RATIO_NORM_RUN
            + ["--num_epochs", "3"])
    assert_killed_run_resumes_bit_identically(args, tmp_path)
