"""The model-family layer on tiny SD, SDXL and SD3 models: rollouts equal each family's diffusers pipeline, recorded
log-probs are recomputed exactly, both trainers run from the CLI and write LoRAs the family's pipeline loads."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from diffalign.errors import ModelError
from diffalign.families import FAMILIES, family_for_pipeline, load_family
from diffalign.kernels import sde_window_mask
from diffalign.rollout import default_kernel, sample_trajectories, step_log_probs
from diffalign.testing import save_tiny_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline
from diffalign.utils.peft_utils import add_lora

PIPELINES = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "sd3": tiny_sd3_pipeline}
PROMPTS = ["a photo of a cat", "a red car"]


def _randomise_lora(model, seed=0, std=0.05):
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.data = torch.randn(param.shape, generator=generator) * std


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3"])
def test_zero_width_window_rollout_equals_the_family_pipeline(name):
    pipe = PIPELINES[name]()
    family = family_for_pipeline(pipe)
    family.set_kernel_scheduler(pipe)  # SDXL's default Euler scheduler -> DDIM, as the trainers load it
    size = family.default_resolution()
    latents = torch.randn(2, 4, size // 2, size // 2, generator=torch.Generator().manual_seed(3))
    ours = sample_trajectories(family, PROMPTS, num_inference_steps=3, guidance_scale=4.0, latents=latents,
                               stochastic_steps=sde_window_mask(3, 0))
    stock = pipe(PROMPTS, num_inference_steps=3, guidance_scale=4.0, latents=latents, output_type="pt").images
    torch.testing.assert_close(ours.images, stock, atol=1e-5, rtol=1e-4)
    assert not ours.stochastic.any() and torch.isnan(ours.log_probs).all()


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3"])
def test_recomputed_log_probs_give_ratio_one_and_window_steps_only(name):
    pipe = PIPELINES[name]()
    family = family_for_pipeline(pipe)
    family.set_kernel_scheduler(pipe)
    add_lora(family.denoiser, target_modules=family.default_lora_target_modules)
    _randomise_lora(family.denoiser)
    family.denoiser.eval()
    kernel = default_kernel(family, eta=1.0, noise_level=0.7)
    window = sde_window_mask(4, 2, start=1)
    traj = sample_trajectories(family, PROMPTS, num_inference_steps=4, guidance_scale=3.0, kernel=kernel,
                               generator=torch.Generator().manual_seed(1), compute_reference=True,
                               stochastic_steps=window)
    assert traj.stochastic[0].tolist() == [False, True, True, False]
    assert torch.isfinite(traj.log_probs[:, 1:3]).all() and torch.isnan(traj.log_probs[:, [0, 3]]).all()
    rows, steps = torch.tensor([0, 0, 1, 1]), torch.tensor([1, 2, 1, 2])
    with torch.no_grad():
        log_probs, _, _ = step_log_probs(family, family.denoiser, kernel, traj, rows, steps, 3.0)
    ratio = torch.exp(log_probs - traj.log_probs[rows, steps])
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    # the base model (adapters off) gives other log-probs and a positive KL, only at the window's steps
    assert (traj.ref_log_probs[:, 1:3] - traj.log_probs[:, 1:3]).abs().max() > 1e-5
    assert (traj.kl_to_ref[:, 1:3] > 0).all() and torch.isnan(traj.kl_to_ref[:, [0, 3]]).all()


def test_unsupported_pipeline_is_one_line(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ModelError, match="unsupported model: pipeline class 'KandinskyPipeline'"):
        load_family(str(tmp_path))
    assert set(FAMILIES) >= {"StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline"}


def test_pickle_weights_are_refused(tmp_path):
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(str(tmp_path), safe_serialization=False)
    with pytest.raises(ModelError, match="safetensors"):
        load_family(str(tmp_path))


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: save_tiny_pipeline(name, str(root / name)) for name in ("sdxl", "sd3")}


CLI_SETTINGS = [
    "--num_epochs", "2", "--sample_num_steps", "3", "--sample_num_prompts_per_epoch", "2",
    "--sample_images_per_prompt", "2", "--sample_batch_size", "4", "--train_batch_size", "4",
    "--grid_num_images", "2", "--checkpoint_every", "2", "--reward", "jpeg_compressibility",
    "--prompts", "[a photo of a cat, a red car]", "--train_learning_rate", "0.05", "--sample_guidance_scale", "3.0",
    "--train_clip_range", "1.0", "--train_clip_eps", "1.0", "--train_beta", "0.01", "--train_num_inner_epochs", "1",
]


def _cli_args(algorithm, model, output_dir, extra=()):
    args = ["train", algorithm, "--model", model, "--output_dir", output_dir]
    settings = list(CLI_SETTINGS)
    drop = {"ddpo": ("--train_clip_eps", "--train_beta"), "prdp": ("--train_batch_size", "--train_clip_range")}
    for key in drop[algorithm]:
        i = settings.index(key)
        del settings[i : i + 2]
    return args + settings + list(extra)


@pytest.mark.parametrize("name,algorithm", [("sdxl", "ddpo"), ("sdxl", "prdp"), ("sd3", "ddpo"), ("sd3", "prdp")])
def test_cli_trains_each_family_and_the_lora_loads_in_its_pipeline(family_dirs, tmp_path, name, algorithm):
    import diffusers

    from diffalign.cli import main

    model = family_dirs[name]
    out = str(tmp_path / "run")
    extra = ["--sample_sde_window_size", "2"] if name == "sd3" and algorithm == "ddpo" else []
    assert main(_cli_args(algorithm, model, out, extra)) == 0
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [line["epoch"] for line in lines] == [0, 1]
    lora_dir = os.path.join(out, "final")
    assert os.path.isfile(os.path.join(lora_dir, "pytorch_lora_weights.safetensors"))

    pipeline_cls = getattr(diffusers, FAMILIES[json.load(open(os.path.join(model, "model_index.json")))["_class_name"]]
                           .pipeline_class)
    pipe = pipeline_cls.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, output_type="pt")
    before = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(lora_dir)
    after = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (after - before).abs().max() > 1e-4  # the trained LoRA is loaded and changes the images

    # ... and in the family's RLG pipeline: w = 1 is the LoRA model, w = 0 the base
    import diffalign.pipelines

    rlg_cls = getattr(diffalign.pipelines, pipeline_cls.__name__.replace("Pipeline", "RLGPipeline"))
    rlg = rlg_cls.from_pretrained(model)
    rlg.set_progress_bar_config(disable=True)
    rlg.load_lora_weights(lora_dir)
    for scale, expected in ((1.0, after), (0.0, before)):
        images = rlg(PROMPTS[0], generator=torch.Generator().manual_seed(0), rlg_scale=scale, **kwargs).images
        torch.testing.assert_close(images, expected, atol=1e-4, rtol=1e-4)


def test_cli_names_the_supported_families_for_another_pipeline(tmp_path, capsys):
    from diffalign.cli import main

    model = tmp_path / "kandinsky"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    assert main(["train", "ddpo", "--model", str(model), "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unsupported model" in err[0] and "StableDiffusion3Pipeline" in err[0]


@pytest.mark.parametrize("name", ["sd", "sd3"])
def test_saved_lora_reloads_at_its_trained_scale(name, tmp_path):
    # alpha != rank: diffusers needs the adapter's config as metadata, else it loads the LoRA with alpha = rank
    pipe = PIPELINES[name]()
    family = family_for_pipeline(pipe)
    add_lora(family.denoiser, rank=4, alpha=8.0, target_modules=family.default_lora_target_modules)
    _randomise_lora(family.denoiser, std=0.2)
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, output_type="pt")
    trained = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kwargs).images
    family.save_lora(family.denoiser, str(tmp_path))
    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    targets = metadata[f"{family.denoiser_name}.target_modules"]
    assert targets == sorted(targets)  # not a set's hash-seed order: two identical runs write the same metadata
    fresh = PIPELINES[name]()
    fresh.load_lora_weights(str(tmp_path))
    reloaded = fresh(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=1e-4)
