"""The FLUX family on tiny FLUX.1 components: a rollout equals FluxPipeline (packed latents, dynamic shift, embedded
guidance, optional true CFG), recorded log-probs are recomputed exactly, both trainers run from the CLI and write a
LoRA that FluxPipeline (and FluxRLGPipeline) loads."""

import json
import os

import pytest
import torch
from diffusers import FluxPipeline

from diffalign.errors import ModelError
from diffalign.families import FluxFamily, family_for_pipeline, load_family
from diffalign.kernels import sde_window_mask
from diffalign.rollout import default_kernel, sample_trajectories, step_log_probs
from diffalign.testing import save_tiny_pipeline, tiny_flux_pipeline
from diffalign.utils.peft_utils import add_lora

PROMPTS = ["a photo of a cat", "a red car"]


def _randomise_lora(model, seed=0, std=0.05):
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.data = torch.randn(param.shape, generator=generator) * std


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline()


@pytest.mark.parametrize("embedded,true_cfg,size", [(3.5, 1.0, (16, 16)), (2.0, 3.0, (16, 24))])
def test_zero_width_window_rollout_equals_flux_pipeline(pipe, embedded, true_cfg, size):
    family = family_for_pipeline(pipe)
    assert isinstance(family, FluxFamily)
    family.embedded_guidance = embedded
    height, width = size
    latents = family.prepare_latents(2, height, width, torch.float32, "cpu", torch.Generator().manual_seed(3))
    assert latents.shape == (2, (height // 4) * (width // 4), 16)  # packed 2x2: 4 latent channels x 4
    ours = sample_trajectories(family, PROMPTS, num_inference_steps=3, guidance_scale=true_cfg, latents=latents,
                               height=height, width=width, stochastic_steps=sde_window_mask(3, 0))
    cfg = {"true_cfg_scale": true_cfg, "negative_prompt": ""} if true_cfg != 1 else {}
    stock = pipe(PROMPTS, num_inference_steps=3, guidance_scale=embedded, latents=latents, height=height, width=width,
                 output_type="pt", **cfg).images
    torch.testing.assert_close(ours.images, stock, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.timesteps, pipe.scheduler.timesteps)  # FLUX sigmas, dynamic shift mu
    assert not ours.stochastic.any() and torch.isnan(ours.log_probs).all()
    assert ours.conditioning["guidance"].tolist() == [embedded] * 2
    assert (ours.negative_conditioning is not None) == (true_cfg != 1)

    # the embedded guidance is a model input: another value gives other images
    family.embedded_guidance = embedded + 2.0
    other = sample_trajectories(family, PROMPTS, num_inference_steps=3, guidance_scale=true_cfg, latents=latents,
                                height=height, width=width, stochastic_steps=sde_window_mask(3, 0))
    assert (other.images - ours.images).abs().max() > 1e-4


def test_recomputed_log_probs_give_ratio_one_and_window_steps_only():
    pipe = tiny_flux_pipeline()
    family = family_for_pipeline(pipe)
    family.configure(type("Config", (), {"sample_embedded_guidance": 2.5, "sample_max_sequence_length": 64})())
    assert family.max_sequence_length == 64
    assert family.embedded_guidance == 2.5
    add_lora(family.denoiser, target_modules=family.default_lora_target_modules)
    names = [name for name, _ in family.denoiser.named_parameters()]
    assert any("single_transformer_blocks" in name and "lora_A" in name for name in names)
    _randomise_lora(family.denoiser)
    family.denoiser.eval()
    kernel = default_kernel(family, noise_level=0.7)
    window = sde_window_mask(4, 2, start=1)
    traj = sample_trajectories(family, PROMPTS, num_inference_steps=4, guidance_scale=3.0, kernel=kernel, height=16,
                               width=16, generator=torch.Generator().manual_seed(1), compute_reference=True,
                               stochastic_steps=window)
    assert traj.latents.shape == (2, 5, 16, 16)
    assert traj.stochastic[0].tolist() == [False, True, True, False]
    assert torch.isfinite(traj.log_probs[:, 1:3]).all() and torch.isnan(traj.log_probs[:, [0, 3]]).all()
    rows, steps = torch.tensor([0, 0, 1, 1]), torch.tensor([1, 2, 1, 2])
    with torch.no_grad():
        log_probs, _, _ = step_log_probs(family, family.denoiser, kernel, traj, rows, steps, 3.0)
    ratio = torch.exp(log_probs - traj.log_probs[rows, steps])
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    assert (traj.ref_log_probs[:, 1:3] - traj.log_probs[:, 1:3]).abs().max() > 1e-5
    assert (traj.kl_to_ref[:, 1:3] > 0).all() and torch.isnan(traj.kl_to_ref[:, [0, 3]]).all()


def test_resolution_rules(pipe):
    family = family_for_pipeline(pipe)
    assert family.default_resolution() == 128 * 2  # FluxPipeline's default_sample_size x vae_scale_factor
    assert family.resolution_multiple() == 4
    with pytest.raises(ModelError, match="not a multiple of 4"):
        family.check_resolution(18)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_tiny_pipeline("flux", str(tmp_path_factory.mktemp("flux") / "model"))


CLI_SETTINGS = [
    "--num_epochs", "2", "--sample_num_steps", "3", "--sample_num_prompts_per_epoch", "2",
    "--sample_images_per_prompt", "2", "--sample_batch_size", "4", "--train_batch_size", "4",
    "--grid_num_images", "2", "--checkpoint_every", "2", "--reward", "jpeg_compressibility",
    "--prompts", "[a photo of a cat, a red car]", "--train_learning_rate", "0.05", "--sample_guidance_scale", "1.0",
    "--sample_embedded_guidance", "3.0", "--sample_resolution", "16", "--lora_rank", "4", "--lora_alpha", "8",
    "--train_clip_range", "1.0", "--train_clip_eps", "1.0", "--train_beta", "0.01", "--train_num_inner_epochs", "1",
]


def _cli_args(algorithm, model, output_dir, extra=()):
    settings = list(CLI_SETTINGS)
    drop = {"ddpo": ("--train_clip_eps", "--train_beta"), "prdp": ("--train_batch_size", "--train_clip_range")}
    for key in drop[algorithm]:
        i = settings.index(key)
        del settings[i : i + 2]
    return ["train", algorithm, "--model", model, "--output_dir", output_dir] + settings + list(extra)


@pytest.mark.parametrize("algorithm", ["ddpo", "prdp"])
def test_cli_trains_flux_and_the_lora_loads_in_flux_pipelines(flux_dir, tmp_path, algorithm):
    from diffalign.cli import main
    from diffalign.pipelines import FluxRLGPipeline

    out = str(tmp_path / "run")
    extra = ["--sample_sde_window_size", "2"] if algorithm == "ddpo" else []
    assert main(_cli_args(algorithm, flux_dir, out, extra)) == 0
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [line["epoch"] for line in lines] == [0, 1]
    lora_dir = os.path.join(out, "final")
    assert os.path.isfile(os.path.join(lora_dir, "pytorch_lora_weights.safetensors"))

    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, height=16, width=16, output_type="pt")
    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    before = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(lora_dir)
    after = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (after - before).abs().max() > 1e-4  # the trained LoRA is loaded and changes the images

    # the LoRA as trained (alpha 8, rank 4: the scale travels in the file's metadata) is the LoRA as loaded
    family = load_family(flux_dir)
    add_lora(family.denoiser, rank=4, alpha=8, target_modules=family.default_lora_target_modules)
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(os.path.join(lora_dir, "pytorch_lora_weights.safetensors"))
    set_peft_model_state_dict(family.denoiser, {k.removeprefix("transformer."): v for k, v in weights.items()})
    trained = family.pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(after, trained, atol=1e-5, rtol=1e-4)

    # ... and in FluxRLGPipeline: w = 1 is the LoRA model, w = 0 the base
    rlg = FluxRLGPipeline.from_pretrained(flux_dir)
    rlg.set_progress_bar_config(disable=True)
    rlg.load_lora_weights(lora_dir)
    for scale, expected in ((1.0, after), (0.0, before)):
        images = rlg(PROMPTS[0], generator=torch.Generator().manual_seed(0), rlg_scale=scale, **kwargs).images
        torch.testing.assert_close(images, expected, atol=1e-4, rtol=1e-4)


def test_generate_picks_flux_rlg_pipeline(flux_dir, tmp_path, monkeypatch):
    """`diffalign generate --model <FLUX dir> --lora DIR`: FluxRLGPipeline, the embedded guidance 3.5 by default;
    w = 0 is FluxPipeline on the base, w = 1 with the LoRA (written by the FLUX family)."""
    import argparse

    from diffalign import generate

    family = load_family(flux_dir)
    add_lora(family.denoiser, rank=4, alpha=8, target_modules=family.default_lora_target_modules)
    _randomise_lora(family.denoiser)
    lora_dir = str(tmp_path / "lora")
    family.save_lora(family.denoiser, lora_dir)

    calls = []
    sample_scales = generate.sample_scales
    monkeypatch.setattr(generate, "sample_scales", lambda *args, **kwargs: calls.append(kwargs) or sample_scales(
        *args, **kwargs))
    out = tmp_path / "out"
    argv = ["--model", flux_dir, "--lora", lora_dir, "--prompt", "a cat", "--rlg-scale", "0", "1", "--num-images", "1",
            "--steps", "2", "--resolution", "16", "--output-dir", str(out)]
    assert generate.run(generate.add_arguments(argparse.ArgumentParser()).parse_args(argv)) == 0
    assert (out / "rlg_grid.png").is_file()
    assert calls[0]["guidance_scale"] == 3.5 and calls[0]["height"] == 16 and "eta" in calls[0]

    pipe = generate.load_rlg_pipeline(flux_dir, lora=lora_dir, device="cpu")
    assert type(pipe).__name__ == "FluxRLGPipeline"
    kwargs = dict(num_inference_steps=2, guidance_scale=3.5, height=16, width=16)
    images = generate.sample_scales(pipe, ["a cat"], [0.0, 1.0], 1, 0, eta=0.0, **kwargs)
    stock = FluxPipeline.from_pretrained(flux_dir)
    stock.set_progress_bar_config(disable=True)
    run = lambda: stock("a cat", generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images  # noqa: E731
    torch.testing.assert_close(images[0.0], run(), atol=1e-4, rtol=1e-4)
    stock.load_lora_weights(lora_dir)
    torch.testing.assert_close(images[1.0], run(), atol=1e-4, rtol=1e-4)
    assert (images[1.0] - images[0.0]).abs().max() > 1e-3


def test_schnell_without_embedded_guidance_or_dynamic_shift():
    """FLUX.1-schnell: no `guidance_embeds` and a fixed-shift scheduler; the rollout still equals FluxPipeline and
    FluxRLGPipeline at w = 0 / 1 equals it too (the aligned model: a LoRA)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffalign.pipelines import FluxRLGPipeline
    from diffalign.testing import tiny_flux_components

    components = tiny_flux_components(guidance_embeds=False)
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    family = family_for_pipeline(pipe)
    latents = family.prepare_latents(2, 16, 16, torch.float32, "cpu", torch.Generator().manual_seed(3))
    ours = sample_trajectories(family, PROMPTS, num_inference_steps=3, guidance_scale=1.0, latents=latents,
                               height=16, width=16, stochastic_steps=sde_window_mask(3, 0))
    assert "guidance" not in ours.conditioning
    kwargs = dict(num_inference_steps=3, height=16, width=16, output_type="pt")
    stock = pipe(PROMPTS, latents=latents, **kwargs).images
    torch.testing.assert_close(ours.images, stock, atol=1e-5, rtol=1e-4)

    rlg = FluxRLGPipeline(**components)
    rlg.set_progress_bar_config(disable=True)
    add_lora(rlg.transformer, target_modules=family.default_lora_target_modules)
    _randomise_lora(rlg.transformer)
    torch.testing.assert_close(rlg(PROMPTS, latents=latents, rlg_scale=0.0, **kwargs).images, stock, atol=1e-4,
                               rtol=1e-4)
    aligned = FluxPipeline(**components)(PROMPTS, latents=latents, **kwargs).images  # the LoRA is on the transformer
    assert (aligned - stock).abs().max() > 1e-3
    torch.testing.assert_close(rlg(PROMPTS, latents=latents, rlg_scale=1.0, **kwargs).images, aligned, atol=1e-4,
                               rtol=1e-4)
