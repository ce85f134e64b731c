"""Wan 2.2 A14B's trained experts (`train_experts`: high_noise, the default, low_noise or both) on the tiny A14B with
WanPipeline's boundary 0.875 (three steps: t = 1000 and 877 on `transformer`, 47 on `transformer_2`): a zero-window
rollout is still WanPipeline's; with both experts trained each step's log-prob is its own expert's (ratio 1, a KL to
the base on both sides, gradients into the expert of the row); a CLI run writes the two LoRA files that
`WanPipeline.load_lora_weights` loads into `transformer` and (`load_into_transformer_2=True`) into `transformer_2`,
each changing its half of the trajectory; bad values are one line (exit 2); with `-m slow`, the forward-process
trainers, a full fine-tune and kill + resume."""

import json
import os

import pytest
import torch

from diffalign.errors import ModelError
from diffalign.families import StableDiffusionFamily, WanFamily, family_for_pipeline
from diffalign.families.wan import WanExperts
from diffalign.kernels import FlowSDEKernel, sde_window_mask
from diffalign.rollout import sample_trajectories, step_log_probs
from diffalign.utils.peft_utils import LORA_WEIGHT_NAME, LOW_NOISE_LORA_WEIGHT_NAME, add_lora

PROMPTS = ["a photo of a cat", "a red car"]
BOUNDARY = 0.875  # Wan 2.2 T2V-A14B's boundary_ratio (the tiny model's own 0.03 sends every step to `transformer`)


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _family(train_experts=None):
    pipe = WanFamily.tiny_pipeline(version="2.2-a14b")
    pipe.register_to_config(boundary_ratio=BOUNDARY)
    family = family_for_pipeline(pipe)
    family.set_kernel_scheduler(pipe)
    family.configure(num_frames=5, guidance_scale_2=2.0, train_experts=train_experts)
    return family


def _lora_params(module, prefix):
    return [p for name, p in module.named_parameters() if p.requires_grad and name.startswith(prefix + ".")]


def test_both_experts_sample_as_wan_pipeline_and_give_ratio_one_with_their_own_expert():
    family = _family("both")
    pipe, experts = family.pipe, family.denoiser
    assert isinstance(experts, WanExperts) and experts.transformer is pipe.transformer
    assert experts.transformer_2 is pipe.transformer_2
    assert not any(m is pipe.transformer or m is pipe.transformer_2 for m in family.frozen_modules())

    # a zero-window rollout through both experts is WanPipeline's, adapters added (B = 0) or not
    latents = family.prepare_latents(2, 16, 16, torch.float32, "cpu", _generator(3))
    stock = pipe(prompt=PROMPTS, num_inference_steps=3, latents=latents, height=16, width=16, output_type="pt",
                 guidance_scale=4.0, **family.pipeline_call_kwargs(16, 16)).frames
    add_lora(experts, target_modules=family.default_lora_target_modules)
    ours = sample_trajectories(family, PROMPTS, num_inference_steps=3, guidance_scale=4.0, latents=latents,
                               height=16, width=16, stochastic_steps=sde_window_mask(3, 0)).images
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-4)

    # the adapters sit on both experts; trained, each step's recomputed log-prob is the sampler's (ratio 1) and the
    # base (adapters off) differs on both sides of the boundary
    assert _lora_params(experts, "transformer") and _lora_params(experts, "transformer_2")
    generator = _generator(2)
    for parameter in experts.parameters():
        if parameter.requires_grad:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1
    experts.eval()
    kernel = FlowSDEKernel(noise_level=0.7)
    traj = sample_trajectories(family, PROMPTS, num_inference_steps=3, guidance_scale=4.0, kernel=kernel, height=16,
                               width=16, generator=_generator(1), compute_reference=True,
                               stochastic_steps=sde_window_mask(3, 3))
    assert (pipe.scheduler.timesteps >= family.boundary_timestep()).tolist() == [True, True, False]
    assert (traj.kl_to_ref > 0).all()  # both experts' adapters move the policy away from the base
    rows, steps = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 2, 1, 2])
    log_probs, _, _ = step_log_probs(family, experts, kernel, traj, rows, steps, 4.0)
    ratio = torch.exp(log_probs - traj.log_probs[rows, steps])
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)

    # a low-noise row trains `transformer_2` alone; the high-noise expert takes part with a zero gradient
    log_probs[[1, 3]].sum().backward()
    high, low = _lora_params(experts, "transformer"), _lora_params(experts, "transformer_2")
    assert all(p.grad is not None and not p.grad.any() for p in high)
    assert sum(p.grad.abs().sum() for p in low) > 0


def test_a_mixed_batch_gives_each_row_its_trained_expert():
    family = _family("both")
    experts = family.denoiser
    add_lora(experts, target_modules=family.default_lora_target_modules)
    generator = _generator(4)
    for parameter in experts.parameters():
        if parameter.requires_grad:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1
    cond, negative = family.conditioning(PROMPTS, "", True, 16, 16)
    latents = family.prepare_latents(2, 16, 16, torch.float32, "cpu", _generator(1))
    pick = lambda mapping, row: {k: v[row:row + 1] for k, v in mapping.items()}  # noqa: E731
    with torch.no_grad():
        mixed = family.predict(experts, latents, torch.tensor([955.0, 7.0]), cond, negative, 4.0)
        for row, t in enumerate((955.0, 7.0)):
            alone = family.predict(experts, latents[row:row + 1], torch.tensor([t]), pick(cond, row),
                                   pick(negative, row), 4.0)
            torch.testing.assert_close(mixed[row:row + 1], alone, atol=1e-5, rtol=1e-4)
        experts.disable_adapters()
        base = family.predict(experts, latents, torch.tensor([955.0, 7.0]), cond, negative, 4.0)
        experts.enable_adapters()
    assert ((mixed - base).flatten(1).abs().amax(1) > 1e-4).all()  # the LoRA of each row's expert acts


def test_low_noise_trains_transformer_2_alone():
    family = _family("low_noise")
    pipe, experts = family.pipe, family.denoiser
    assert experts.trained == ("transformer_2",) and pipe.transformer in family.frozen_modules()
    add_lora(experts, target_modules=family.default_lora_target_modules)
    assert not _lora_params(experts, "transformer") and _lora_params(experts, "transformer_2")
    assert not getattr(pipe.transformer, "peft_config", None) and "default" in experts.peft_config
    # the default keeps `transformer` the denoiser and `transformer_2` frozen, as before the key existed
    default = _family()
    assert default.denoiser is default.pipe.transformer and default.pipe.transformer_2 in default.frozen_modules()


def test_train_experts_is_refused_in_one_line_where_it_cannot_apply(tmp_path, capsys):
    from cli_helpers import one_line

    from diffalign.cli import main
    from diffalign.trainers import DDPOConfig
    from diffalign.trainers.base_config import HASHED_WHEN_SET

    assert DDPOConfig(train_experts="high_noise").hash() == DDPOConfig().hash()  # earlier runs keep their hash
    assert DDPOConfig(train_experts="both").hash() != DDPOConfig().hash() and "train_experts" in HASHED_WHEN_SET
    assert "train_experts" not in DDPOConfig().family_kwargs()
    one_expert = family_for_pipeline(WanFamily.tiny_pipeline())
    with pytest.raises(ModelError, match="train_experts 'both' .* one expert"):
        one_expert.configure(train_experts="both")
    with pytest.raises(ModelError, match="train_experts 'low_noise' needs a two-expert model"):
        family_for_pipeline(StableDiffusionFamily.tiny_pipeline()).configure(train_experts="low_noise")
    model = WanFamily.save_tiny(str(tmp_path / "wan21"))
    for value, message in (("middle", "train_experts must be one of high_noise, low_noise, both"),
                           ("both", "train_experts 'both' trains Wan 2.2 A14B's low-noise expert")):
        assert main(["train", "ddpo", "--model", model, "--output_dir", str(tmp_path / value), "--num_frames", "5",
                     "--train_experts", value]) == 2
        assert message in one_line(capsys.readouterr().err)


def _a14b_model(tmp_path):
    return WanFamily.save_tiny(str(tmp_path / "wan"), version="2.2-a14b", boundary_ratio=BOUNDARY)


def _run_args(algorithm, model, *extra, epochs=2):
    """A run of `epochs` on the tiny A14B, a checkpoint every epoch (`--output_dir` left to the caller)."""
    batch = [] if algorithm == "prdp" else ["--train_batch_size", "4"]
    return ["train", algorithm, "--model", model, "--num_epochs", str(epochs), "--sample_num_steps", "3",
            "--sample_num_prompts_per_epoch", "2", "--sample_images_per_prompt", "2", "--sample_batch_size", "4",
            "--grid_num_images", "2", "--checkpoint_every", "1", "--seed", "3", "--reward", "jpeg_compressibility",
            "--prompts", "[a photo of a cat, a red car]", "--train_learning_rate", "0.05",
            "--sample_guidance_scale", "3.0", "--sample_resolution", "16", "--num_frames", "5",
            "--final_eval_num_images", "0", "--sample_compute_kl", "false", *batch, *extra]


def _videos(model, load):
    """WanPipeline's video of the first prompt with `load(pipe)` applied (three steps: two high-noise, one low)."""
    import diffusers

    pipe = diffusers.WanPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    load(pipe)
    return pipe(prompt=PROMPTS[0], num_inference_steps=3, height=16, width=16, num_frames=5, output_type="pt",
                guidance_scale=3.0, generator=_generator()).frames


ALGORITHM_ARGS = {
    "ddpo": [], "prdp": [], "nft": [],
    "awm": ["--train_timesteps", "2", "--train_timestep_fraction", "1.0", "--train_micro_batch_size", "4"],
    # every one of the three noise levels, so that both experts train
    "dgpo": ["--train_trunc_steps", "2", "--train_num_timesteps", "3", "--train_micro_batch_size", "4"],
}


@pytest.mark.parametrize("algorithm", [
    "ddpo",
    pytest.param("prdp", marks=pytest.mark.slow),
    pytest.param("nft", marks=pytest.mark.slow),  # the forward-process trainers: their old adapter on both experts
    pytest.param("awm", marks=pytest.mark.slow),
    pytest.param("dgpo", marks=pytest.mark.slow),
])
def test_cli_trains_both_experts_and_each_lora_loads_into_its_expert(algorithm, tmp_path):
    from diffalign.cli import main

    model = _a14b_model(tmp_path)
    out = str(tmp_path / "run")
    assert main(_run_args(algorithm, model, "--output_dir", out, "--train_experts", "both",
                          *ALGORITHM_ARGS[algorithm])) == 0
    final = os.path.join(out, "final")
    assert {LORA_WEIGHT_NAME, LOW_NOISE_LORA_WEIGHT_NAME} <= set(os.listdir(final))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["train_experts"] == "both"

    def high(pipe):
        pipe.load_lora_weights(final)
        assert pipe.transformer.peft_config and not getattr(pipe.transformer_2, "peft_config", None)

    def low(pipe):
        pipe.load_lora_weights(final, weight_name=LOW_NOISE_LORA_WEIGHT_NAME, load_into_transformer_2=True)
        assert pipe.transformer_2.peft_config and not getattr(pipe.transformer, "peft_config", None)

    before = _videos(model, lambda pipe: None)
    for load in (high, low):  # each LoRA changes its own half of the trajectory
        assert (_videos(model, load) - before).abs().max() > 1e-4

    card = open(os.path.join(final, "README.md")).read()
    assert 'pipe.load_lora_weights("final")\n' in card
    assert (f'pipe.load_lora_weights("final", weight_name="{LOW_NOISE_LORA_WEIGHT_NAME}", '
            f'load_into_transformer_2=True)') in card


@pytest.mark.slow
def test_cli_fully_fine_tunes_the_low_noise_expert(tmp_path):
    """`use_lora: false` with `low_noise`: `final/transformer_2` alone, which WanPipeline takes as its low-noise
    expert and whose videos differ; the high-noise expert is untouched."""
    from diffusers import WanTransformer3DModel

    from diffalign.cli import main

    model = _a14b_model(tmp_path)
    out = str(tmp_path / "run")
    assert main(_run_args("nft", model, "--output_dir", out, "--train_experts", "low_noise", "--use_lora", "false",
                          "--train_learning_rate", "0.001")) == 0
    final = os.path.join(out, "final")
    assert sorted(name for name in os.listdir(final) if name.startswith("transformer")) == ["transformer_2"]
    trained = WanTransformer3DModel.from_pretrained(final, subfolder="transformer_2")

    def swap(pipe):
        pipe.transformer_2 = trained

    assert (_videos(model, swap) - _videos(model, lambda pipe: None)).abs().max() > 1e-4
    card = open(os.path.join(final, "README.md")).read()
    assert 'transformer_2 = WanTransformer3DModel.from_pretrained("final", subfolder="transformer_2")' in card


@pytest.mark.slow  # three CLI runs in subprocesses per trainer
@pytest.mark.parametrize("algorithm, extra", [("ddpo", ["--ema_decay", "0.9"]), ("nft", [])], ids=["ddpo-ema", "nft"])
def test_killed_run_with_both_experts_resumes_bit_identically(algorithm, extra, tmp_path):
    """Both adapters, their optimizer state, (ddpo) their EMA and (nft) the old adapter on each expert come back."""
    from safetensors.torch import load_file

    from cli_helpers import assert_killed_run_resumes_bit_identically

    model = _a14b_model(tmp_path)
    args = _run_args(algorithm, model, "--train_experts", "both", *extra, epochs=3)
    assert_killed_run_resumes_bit_identically(args, tmp_path)
    straight, killed = (load_file(str(tmp_path / run / "final" / LOW_NOISE_LORA_WEIGHT_NAME))
                        for run in ("straight", "killed"))
    assert straight.keys() == killed.keys() and all(torch.equal(straight[k], killed[k]) for k in straight)


@pytest.mark.slow  # a 2-process launch (gloo)
def test_both_experts_train_under_ddp_with_identical_ranks(tmp_path):
    """Two DDP processes: batches of rows on one side of the boundary (DDPO) and mixed ones (NFT) reduce every
    trained parameter of both experts (the idle one's zero term), and the ranks hold the same weights every epoch."""
    import subprocess

    from test_distributed import ENV, LAUNCH

    model = _a14b_model(tmp_path)
    runs = []
    for algorithm, batch in (("ddpo", ["--train_batch_size", "2"]),
                             ("nft", ["--train_batch_size", "4", "--train_micro_batch_size", "2"])):
        runs += ["::"] * bool(runs) + [
            algorithm, "--model", model, "--output_dir", str(tmp_path / algorithm), "--num_epochs", "2",
            "--train_experts", "both", "--prompts", "[a cat, a dog, a bird, a fish]", "--sample_num_steps", "3",
            "--sample_num_prompts_per_epoch", "4", "--sample_images_per_prompt", "2", "--sample_batch_size", "4",
            "--grid_num_images", "1", "--reward", "jpeg_compressibility", "--seed", "3", "--num_frames", "5",
            "--sample_resolution", "16", "--final_eval_num_images", "0", *batch]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_run.py")
    done = subprocess.run(LAUNCH + [script] + runs, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for algorithm in ("ddpo", "nft"):
        with open(tmp_path / algorithm / "report.json") as f:
            report = json.load(f)
        assert report["denoiser_class"] == "DistributedDataParallel" and report["num_processes"] == 2
        assert [check["identical"] for check in report["rank_checks"]] == [True, True]
        assert {LORA_WEIGHT_NAME, LOW_NOISE_LORA_WEIGHT_NAME} <= set(os.listdir(tmp_path / algorithm / "final"))
