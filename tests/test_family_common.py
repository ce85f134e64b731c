"""The family tester: every check that must hold for every model family, parametrised over the family registry
(`diffalign.families.FAMILIES`), in the spirit of diffusers' `PipelineTesterMixin`. A new family is tested by
registering it: the tests run on its tiny components (`tiny_components`) and their variants (`tiny_variants`), and
read every other fact from the family (guidance kind, pipeline arguments, RLG pipeline, LoRA targets).

The checks: the family declares every fact the shared code needs (and the registry refuses one that does not); a
deterministic rollout equals the family's diffusers pipeline; recorded log-probs are recomputed exactly; resolution
rules; every trainer (`ddpo`, `prdp`, and the forward-process `nft`, `awm`, `dgpo`) runs from the CLI and writes a
LoRA that the family's pipeline and its RLG route load; the LoRA reloads at its trained scale; `diffalign generate`
picks the family's RLG route (its RLG pipeline, or the RLG guider in its modular pipeline:
`ModelFamily.rlg_pipeline`); the RLG route is the base at w = 0 and the aligned model at w = 1 (the guider route bit
for bit against its modular pipeline with the model's own CFG guider).
"""

import argparse
import inspect
import json
import math
import os
import re

import pytest
import torch
from safetensors import safe_open

from diffalign.families import FAMILIES, ModelFamily, StableDiffusionFamily, family_for_pipeline, load_family, registry
from diffalign.families.base import GUIDANCE_KINDS
from diffalign.kernels import TransitionKernel, sde_window_mask
from diffalign.errors import ModelError
from diffalign.utils.peft_utils import add_lora
from diffalign.rollout import default_kernel, sample_trajectories, step_log_probs

PROMPTS = ["a photo of a cat", "a red car"]
SIZE = 16  # image side of the tests: a multiple of every family's resolution multiple, and fast
FAMILY_LIST = sorted(FAMILIES.values(), key=lambda family: family.name)


def families():
    return [pytest.param(family, id=family.name) for family in FAMILY_LIST]


def variants():
    """Each family's tiny model, then each of its variants (e.g. FLUX.1-schnell, SD3 without T5)."""
    params = []
    for family in FAMILY_LIST:
        params.append(pytest.param(family, {}, id=family.name))
        params += [pytest.param(family, kwargs, id=f"{family.name}-{name}")
                   for name, kwargs in family.tiny_variants.items()]
    return params


def _randomise_lora(model, seed=0, std=0.05):
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.data = torch.randn(param.shape, generator=generator) * std


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _condition_image(directory) -> str:
    """A random RGB PNG in `directory` (not of the sampled size: the resize is exercised), for editing families."""
    import numpy as np
    from PIL import Image

    path = os.path.join(str(directory), "condition.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(autouse=True)
def _small_condition_images(monkeypatch):
    """Qwen-Image-Edit's condition images at 64^2 pixels instead of its pipelines' 1024^2, in its pipelines and its
    families alike (`diffalign.testing.shrink_qwenimage_edit_conditions`)."""
    from diffalign.testing import shrink_qwenimage_edit_conditions

    shrink_qwenimage_edit_conditions(monkeypatch)


_CONDITION_IMAGE = []
_CONDITION_VIDEO = []


def _condition_video() -> str:
    """A random RGB GIF of 5 frames, 20 x 28 (Wan's tiny 5 frames, not of the sampled size), written once."""
    if not _CONDITION_VIDEO:
        import tempfile

        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        frames = [Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)) for _ in range(5)]
        path = os.path.join(tempfile.mkdtemp(), "condition.gif")
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
        _CONDITION_VIDEO.append(path)
    return _CONDITION_VIDEO[0]


def _prompts(family):
    """The tests' prompts for `family`: `PROMPTS`, each with a condition image where the family's pipeline cannot
    sample without one (Qwen-Image-Edit; one random PNG, 20 x 28, written once), or a condition video (video-to-video:
    `_condition_video`)."""
    from diffalign.prompts import ConditionedPrompt

    if family.requires_condition_video:
        return [ConditionedPrompt(prompt, (), (_condition_video(),)) for prompt in PROMPTS]
    if not family.requires_condition_image:
        return list(PROMPTS)
    if not _CONDITION_IMAGE:
        import tempfile

        import numpy as np
        from PIL import Image

        path = os.path.join(tempfile.mkdtemp(), "condition.png")
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(path)
        _CONDITION_IMAGE.append(path)
    return [ConditionedPrompt(prompt, (_CONDITION_IMAGE[0],)) for prompt in PROMPTS]


def _condition(family, prompt=None):
    """The pipeline's condition-image (or video) arguments for `prompt` (the first test prompt by default), with the
    family's tiny settings (a video's first 5 frames): none for most."""
    if not (family.requires_condition_image or family.requires_condition_video):
        return {}
    sampler = family_for_pipeline(family.tiny_pipeline())
    sampler.configure(**family.tiny_settings)
    return sampler.pipeline_condition_kwargs(prompt or _prompts(family)[0])


def _sampled(output):
    """The images of a pipeline's output, or the frames of a video pipeline's (`(B, F, 3, H, W)`, WanPipeline's)."""
    return output.frames if hasattr(output, "frames") else output.images


def _side(family) -> int:
    """The tests' square image side for `family`: SIZE, or the family's `tiny_resolution` where SIZE is not a multiple
    of its resolution multiple (QwenImage 2.1's 32)."""
    return getattr(family, "tiny_resolution", SIZE)


def _sizes(family, wide: bool):
    """`(height, width)` of the rollout checks: SIZE (square) or SIZE + 8 wide, or the nearest multiples of the
    family's resolution multiple where those are not (Wan's 16, 32 for Wan 2.2 TI2V-5B)."""
    multiple = family.resolution_multiple()
    side = math.lcm(SIZE, multiple)
    return side, side + (math.lcm(8, multiple) if wide else 0)


# ------------------------------------------------------------------------------------------------------- facts
def check_facts(family):
    """What `generate`, `bench`, the model card and the tests need from a family, resolved against diffusers and
    diffalign (an `AssertionError` naming the first fact that fails)."""
    import diffusers
    import diffusers.modular_pipelines

    import diffalign.pipelines

    assert family.missing_facts() == [], f"{family.__name__} lacks {family.missing_facts()}"
    assert hasattr(diffusers, family.pipeline_class), family.pipeline_class
    assert hasattr(diffusers, family.denoiser_class), family.denoiser_class
    assert issubclass(family.kernel_class, TransitionKernel)
    assert family.guidance_kind in GUIDANCE_KINDS and family.default_guidance_scale > 0
    assert all(isinstance(tag, str) and tag for tag in family.hub_tags)
    pipelines = [getattr(diffusers, family.pipeline_class)]
    if family.rlg_pipeline_class is not None:
        pipelines.append(getattr(diffalign.pipelines, family.rlg_pipeline_class))
    for pipeline in pipelines:  # the init arguments are ones the pipelines take
        assert set(family.pipeline_init_kwargs) <= set(inspect.signature(pipeline.__init__).parameters), pipeline
    if family.modular_blocks_class is not None:
        assert hasattr(diffusers.modular_pipelines, family.modular_blocks_class), family.modular_blocks_class
    tiny_arguments = inspect.signature(family.tiny_components).parameters
    for name, kwargs in family.tiny_variants.items():
        assert set(kwargs) <= set(tiny_arguments), f"tiny variant {name}: {kwargs}"


@pytest.mark.parametrize("family", families())
def test_family_declares_every_fact(family):
    check_facts(family)


def _complete_family(**overrides):
    """A family with every fact (those of SD), written out on a `ModelFamily` subclass; `overrides` remove or change
    some (the value `...` deletes one)."""
    facts = {name: inspect.getattr_static(StableDiffusionFamily, name) for name in (
        "name", "pipeline_class", "denoiser_name", "denoiser_class", "kernel_class", "text_encoder_names",
        "default_lora_target_modules", "hub_tags", "guidance_kind", "default_guidance_scale", "pipeline_init_kwargs",
        "rlg_pipeline_class", "modular_blocks_class", "encode_text", "forward", "tiny_components")}
    facts.update(overrides)
    return type("NewFamily", (ModelFamily,), {k: v for k, v in facts.items() if v is not ...})


@pytest.mark.parametrize("overrides, missing", [
    ({}, None),
    ({"denoiser_class": ...}, "denoiser_class"),
    ({"hub_tags": ()}, "hub_tags"),
    ({"guidance_kind": "negative"}, "guidance_kind"),
    ({"guidance_kind": ...}, "guidance_kind"),  # "cfg" is ModelFamily's default, but a family must say so
    ({"pipeline_init_kwargs": ...}, "pipeline_init_kwargs"),  # {} is a fact (nothing to switch off); unset is not
    ({"rlg_pipeline_class": ...}, "rlg_pipeline_class"),  # None is a fact (no RLG pipeline); unset is not
    ({"modular_blocks_class": ...}, "modular_blocks_class"),
    ({"tiny_components": ...}, "tiny_components()"),
    ({"forward": ...}, "forward()"),
], ids=["complete", "denoiser_class", "hub_tags", "unknown_guidance_kind", "guidance_kind", "pipeline_init_kwargs",
        "rlg_pipeline_class", "modular_blocks_class", "tiny_components", "forward"])
def test_a_family_lacking_a_fact_is_refused(overrides, missing):
    family = _complete_family(name="new", pipeline_class="NewPipeline", **overrides)
    if missing is None:
        assert family.missing_facts() == []
        assert registry([family]) == {"NewPipeline": family}
        return
    assert any(item.startswith(missing) for item in family.missing_facts())
    with pytest.raises(TypeError, match=f"NewFamily lacks .*{re.escape(missing)}"):
        registry([StableDiffusionFamily, family])
    with pytest.raises(AssertionError):  # the tester's own check catches it too
        check_facts(family)


def test_the_registry_refuses_a_repeated_family():
    with pytest.raises(TypeError, match="repeats"):
        registry([StableDiffusionFamily, _complete_family()])  # SD's name and pipeline class again


# ----------------------------------------------------------------------------------------------- rollouts
@pytest.mark.parametrize("guidance, embedded, wide", [(1.0, 3.5, False), (3.0, 2.0, True)],
                         ids=["no-cfg-square", "cfg-wide"])
@pytest.mark.parametrize("family_class, variant", variants())
def test_zero_width_window_rollout_equals_the_family_pipeline(family_class, variant, guidance, embedded, wide):
    """A rollout with no stochastic step is the pipeline's own sampling: same latents, timesteps, CFG (or embedded
    guidance and true CFG), images."""
    pipe = family_class.tiny_pipeline(**variant)
    family = family_for_pipeline(pipe)
    assert type(family) is family_class
    family.set_kernel_scheduler(pipe)  # e.g. SDXL's default Euler scheduler -> DDIM, as the trainers load it
    family.configure(**family.tiny_settings)  # e.g. Wan's 5 frames
    family.embedded_guidance = embedded
    height, width = _sizes(family, wide)
    latents = family.prepare_latents(2, height, width, torch.float32, "cpu", _generator(3))
    prompts = _prompts(family_class)

    def rollout():
        return sample_trajectories(family, prompts, num_inference_steps=3, guidance_scale=guidance, latents=latents,
                                   height=height, width=width, stochastic_steps=sde_window_mask(3, 0))

    ours = rollout()
    # the pipeline's steps whose sampling takes the rollout's 3 (video-to-video: a longer schedule, its last 3)
    call = dict(num_inference_steps=family.pipeline_num_inference_steps(3), height=height, width=width,
                output_type="pt", **family.pipeline_guidance_kwargs(guidance, embedded),
                **family.pipeline_call_kwargs(height, width))
    # one call per prompt with its images (Edit-Plus samples one prompt a call), or alone (QwenImage 2.1: a batch's
    # text padding moves each row's image)
    # (a video-to-video pipeline given latents starts from them, as the rollout does: no video)
    if family.requires_condition_image or family.samples_prompts_alone:
        stock = torch.cat([_sampled(pipe(prompt=str(prompt), latents=latents[i : i + 1], **call,
                                         **family.pipeline_condition_kwargs(prompt)))
                           for i, prompt in enumerate(prompts)])
    else:
        stock = _sampled(pipe(prompt=PROMPTS, latents=latents, **call))
    torch.testing.assert_close(ours.images, stock[..., :3, :, :], atol=1e-5, rtol=1e-4)  # QwenImage 2.1's alpha dropped
    # e.g. FLUX's sigmas and dynamic shift; video-to-video: the last 3 of the pipeline's schedule
    torch.testing.assert_close(ours.timesteps, pipe.scheduler.timesteps[len(pipe.scheduler.timesteps) - 3 :])
    assert len(pipe.scheduler.timesteps) == call["num_inference_steps"]
    assert not ours.stochastic.any() and torch.isnan(ours.log_probs).all()
    assert (ours.negative_conditioning is not None) == family.samples_with_cfg(guidance)  # a distilled klein: no CFG
    assert ("guidance" in ours.conditioning) == family.uses_embedded_guidance()
    if family.uses_embedded_guidance():
        assert ours.conditioning["guidance"].tolist() == [embedded] * 2
        family.embedded_guidance = embedded + 2.0  # a model input: another value gives other images
        assert (rollout().images - ours.images).abs().max() > 1e-4


@pytest.mark.parametrize("family_class", families())
def test_recomputed_log_probs_give_ratio_one_and_window_steps_only(family_class):
    pipe = family_class.tiny_pipeline()
    family = family_for_pipeline(pipe)
    family.set_kernel_scheduler(pipe)
    family.configure(embedded_guidance=2.5, max_sequence_length=64, **family.tiny_settings)
    if getattr(family_class, "max_sequence_length", None) is not None:
        assert family.max_sequence_length == 64
    if family.guidance_kind == "embedded":
        assert family.embedded_guidance == 2.5
    add_lora(family.denoiser, target_modules=family.default_lora_target_modules)
    # the default targets reach every attention of the denoiser (e.g. FLUX's single-stream blocks too)
    attentions = [name for name, module in family.denoiser.named_modules() if hasattr(module, "to_q")]
    assert attentions and all(hasattr(family.denoiser.get_submodule(name).to_q, "lora_A") for name in attentions)
    _randomise_lora(family.denoiser)
    family.denoiser.eval()
    kernel = default_kernel(family, eta=1.0, noise_level=0.7)
    window = sde_window_mask(4, 2, start=1)
    traj = sample_trajectories(family, _prompts(family_class), num_inference_steps=4, guidance_scale=3.0,
                               kernel=kernel, height=_side(family), width=_side(family), generator=_generator(1),
                               compute_reference=True, stochastic_steps=window)
    side = _side(family)
    latent_shape = family.prepare_latents(1, side, side, torch.float32, "cpu", _generator()).shape[1:]
    assert traj.latents.shape == (2, 5, *latent_shape)  # FLUX's packed latents too
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


@pytest.mark.parametrize("family_class", families())
def test_resolution_rules(family_class):
    pipe = family_class.tiny_pipeline()
    family = family_for_pipeline(pipe)
    family.configure(**family.tiny_settings)  # e.g. Wan's 5 frames
    multiple = family.resolution_multiple()
    assert _side(family) % multiple == 0
    family.check_resolution(4 * multiple)
    with pytest.raises(ModelError, match=f"not a multiple of {multiple}"):
        family.check_resolution(4 * multiple + 1)
    # the default is the pipeline's own default image size (FLUX: default_sample_size x vae_scale_factor)
    guidance = family.pipeline_guidance_kwargs(1.0, family.default_guidance_scale)
    image = pipe(prompt=PROMPTS[0], num_inference_steps=family.pipeline_num_inference_steps(1), output_type="pt",
                 **guidance, **_condition(family_class),
                 **family.pipeline_call_kwargs())
    assert tuple(_sampled(image).shape[-2:]) == family.default_size()  # Wan's 480 x 832


# ----------------------------------------------------------------------------------------- loading and CLI
def test_unsupported_pipeline_is_one_line(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ModelError, match="unsupported model: pipeline class 'KandinskyPipeline'"):
        load_family(str(tmp_path))
    assert set(FAMILIES) >= {"StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline",
                             "FluxPipeline"}


@pytest.mark.parametrize("family_class", families())
def test_pickle_weights_are_refused(family_class, tmp_path):
    pipe = family_class.tiny_pipeline()
    pipe.save_pretrained(str(tmp_path), safe_serialization=True)
    denoiser_dir = tmp_path / family_class.denoiser_name  # the denoiser's weights as a pickle instead
    for weights in denoiser_dir.glob("*.safetensors"):
        weights.unlink()
    torch.save(getattr(pipe, family_class.denoiser_name).state_dict(), denoiser_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelError, match="safetensors"):
        load_family(str(tmp_path))


@pytest.fixture(scope="module", params=[family.name for family in FAMILY_LIST])
def family_dir(request, tmp_path_factory):
    """`(family class, tiny model directory)` of each registered family."""
    family = next(f for f in FAMILY_LIST if f.name == request.param)
    return family, family.save_tiny(str(tmp_path_factory.mktemp("families") / family.name))


CLI_SETTINGS = [
    "--num_epochs", "2", "--sample_num_steps", "3", "--sample_num_prompts_per_epoch", "2",
    "--sample_images_per_prompt", "2", "--sample_batch_size", "4", "--train_batch_size", "4",
    "--grid_num_images", "2", "--checkpoint_every", "2", "--reward", "jpeg_compressibility",
    "--prompts", "[a photo of a cat, a red car]", "--train_learning_rate", "0.05", "--sample_guidance_scale", "3.0",
    "--sample_embedded_guidance", "3.0", "--sample_resolution", str(SIZE), "--lora_rank", "4", "--lora_alpha", "8",
    "--train_clip_range", "1.0", "--train_clip_eps", "1.0", "--train_beta", "0.01", "--train_num_inner_epochs", "1",
]


def _with_prompt_file(settings, family, prompt_file, edits=False):
    """`settings` with `--prompts` replaced by a prompt file of the prompts with their image (or video), for a family
    that cannot sample without one (`requires_condition_image`, `requires_condition_video`), or with `edits` for one
    that takes condition images (FLUX.1 Kontext); as they are for the others."""
    if family is None or not (family.requires_condition_image or family.requires_condition_video
                              or (edits and family.max_condition_images)):
        return settings
    with open(prompt_file, "w") as f:
        for prompt in PROMPTS:
            condition = ({"video": _condition_video()} if family.requires_condition_video
                         else {"image": _prompts(_EditingFamily)[0].condition_images[0]})
            f.write(json.dumps({"prompt": prompt, **condition}) + "\n")
    settings = list(settings)
    i = settings.index("--prompts")
    settings[i : i + 2] = ["--prompt_file", prompt_file]
    return settings


class _EditingFamily:
    """What `_prompts` reads of a family that cannot sample without a condition image: its shared test image."""

    requires_condition_image, requires_condition_video = True, False


def _cli_args(algorithm, model, output_dir, extra=(), family=None, edits=False):
    settings = list(CLI_SETTINGS)
    if family is not None:
        settings[settings.index("--sample_resolution") + 1] = str(_side(family))
    settings = _with_prompt_file(settings, family, output_dir + "-prompts.jsonl", edits)
    # the keys each trainer does not take (NFT's `train_beta` is its own: its default)
    drop = {"ddpo": ("--train_clip_eps", "--train_beta"), "prdp": ("--train_batch_size", "--train_clip_range"),
            "nft": ("--train_clip_eps", "--train_beta", "--train_clip_range"),
            "awm": ("--train_clip_eps", "--train_beta"), "dgpo": ("--train_clip_eps", "--train_beta")}
    for key in drop[algorithm]:
        i = settings.index(key)
        del settings[i : i + 2]
    return ["train", algorithm, "--model", model, "--output_dir", output_dir] + settings + list(extra)


# the forward-process trainers' own keys of the 2-epoch run (as tests/test_forward_families.py): every sampled noise
# level trained, a KL term so that the base model's output enters the loss too, DGPO's micro-batches with a padding one
FORWARD_RUN = {
    "nft": ["--train_micro_batch_size", "4"],
    "awm": ["--train_micro_batch_size", "4", "--train_timesteps", "2", "--train_timestep_fraction", "1.0",
            "--train_kl_coef", "0.01"],
    "dgpo": ["--train_micro_batch_size", "3", "--train_trunc_steps", "2", "--train_num_timesteps", "2",
             "--train_use_ema_ref", "true", "--train_kl_coef", "0.01"],
}


@pytest.mark.parametrize("algorithm", ["ddpo", "prdp"])
def test_cli_trains_each_family_and_the_lora_loads_in_its_pipelines(family_dir, tmp_path, algorithm):
    family, model = family_dir
    out = str(tmp_path / "run")
    extra = ["--sample_sde_window_size", "2"] if algorithm == "ddpo" else []  # an SDE window
    extra += [item for key, value in family.tiny_settings.items() for item in (f"--{key}", str(value))]
    _assert_trains_a_lora_that_loads_in_the_family_pipelines(family, model, _cli_args(algorithm, model, out, extra,
                                                                                      family), out)


@pytest.mark.parametrize("algorithm", ["nft", "awm", "dgpo"])
def test_forward_trainers_train_each_family_and_the_lora_loads_in_its_pipelines(family_dir, tmp_path, algorithm):
    """The forward-process trainers on every family, with no algorithm code per family: a 2-epoch CLI run (CFG 3 in
    sampling, and in training but for DGPO's CFG-free policy; an editing or video family from a prompt file with its
    condition image or video) writes a LoRA that the family's pipeline and its RLG route load, and that changes the
    pipeline's output."""
    family, model = family_dir
    out = str(tmp_path / "run")
    extra = FORWARD_RUN[algorithm] + [item for key, value in family.tiny_settings.items()
                                      for item in (f"--{key}", str(value))]
    argv = _cli_args(algorithm, model, out, extra, family, edits=True)
    assert ("--prompt_file" in argv) == bool(family.max_condition_images or family.requires_condition_video)
    _assert_trains_a_lora_that_loads_in_the_family_pipelines(family, model, argv, out)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert all(record["grad_norm"] > 0 for record in records)


def _assert_trains_a_lora_that_loads_in_the_family_pipelines(family, model, argv, out):
    """`diffalign train` with `argv` runs 2 epochs into `out`; its LoRA loads with the family's pipeline
    (`load_lora_weights`) and changes its output, and its RLG route is the base at w = 0 and that model at w = 1."""
    import diffusers

    import diffalign.pipelines
    from diffalign.cli import main

    assert main(argv) == 0
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [line["epoch"] for line in lines] == [0, 1]
    lora_dir = os.path.join(out, "final")
    assert os.path.isfile(os.path.join(lora_dir, "pytorch_lora_weights.safetensors"))

    kwargs = dict(num_inference_steps=2, height=_side(family), width=_side(family), output_type="pt",
                  **family.pipeline_guidance_kwargs(3.0, 3.0))
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(model, **family.pipeline_init_kwargs,
                                                                     **family.loaded_components(model))
    pipe.set_progress_bar_config(disable=True)
    sampled = family_for_pipeline(pipe)
    sampled.configure(**family.tiny_settings)  # e.g. Wan's 5 frames, as trained
    kwargs.update(sampled.pipeline_call_kwargs(_side(family), _side(family)))  # e.g. Kontext's max_area
    kwargs.update(_condition(family))
    before = _sampled(pipe(prompt=PROMPTS[0], generator=_generator(), **kwargs))
    pipe.load_lora_weights(lora_dir)
    after = _sampled(pipe(prompt=PROMPTS[0], generator=_generator(), **kwargs))
    assert (after - before).abs().max() > 1e-4  # the trained LoRA is loaded and changes the images

    # ... and in the family's RLG route: w = 1 is the LoRA model, w = 0 the base
    if family.rlg_route() is None:
        return
    if family.rlg_pipeline_class is not None:
        rlg = getattr(diffalign.pipelines, family.rlg_pipeline_class).from_pretrained(model,
                                                                                     **family.pipeline_init_kwargs)
        rlg.set_progress_bar_config(disable=True)
        rlg.load_lora_weights(lora_dir)
    else:  # the RLG guider in the modular pipeline, on the components of the family's pipeline with the LoRA
        fresh = getattr(diffusers, family.pipeline_class).from_pretrained(model, **family.pipeline_init_kwargs,
                                                                          **family.loaded_components(model))
        fresh.load_lora_weights(lora_dir)
        rlg = family.rlg_pipeline(fresh)
    for scale, expected in ((1.0, after), (0.0, before)):
        images = _sampled(rlg(prompt=PROMPTS[0], generator=_generator(), rlg_scale=scale, **kwargs))  # Wan: frames
        torch.testing.assert_close(images, expected, atol=1e-4, rtol=1e-4)


def test_cli_names_the_supported_families_for_another_pipeline(tmp_path, capsys):
    from diffalign.cli import main

    model = tmp_path / "kandinsky"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    assert main(["train", "ddpo", "--model", str(model), "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unsupported model" in err[0]
    assert all(family.pipeline_class in err[0] for family in FAMILY_LIST)


@pytest.mark.parametrize("family_class", families())
def test_saved_lora_reloads_at_its_trained_scale(family_class, tmp_path):
    # alpha != rank: diffusers needs the adapter's config as metadata, else it loads the LoRA with alpha = rank
    pipe = family_class.tiny_pipeline()
    family = family_for_pipeline(pipe)
    family.configure(**family.tiny_settings)
    add_lora(family.denoiser, rank=4, alpha=8.0, target_modules=family.default_lora_target_modules)
    _randomise_lora(family.denoiser, std=0.2)
    side = _side(family)
    kwargs = dict(num_inference_steps=2, height=side, width=side, output_type="pt",
                  **family.pipeline_guidance_kwargs(3.0, family.default_guidance_scale),
                  **family.pipeline_call_kwargs(side, side), **_condition(family_class))
    trained = _sampled(pipe(prompt=PROMPTS[0], generator=_generator(), **kwargs))
    family.save_lora(family.denoiser, str(tmp_path))
    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    targets = metadata[f"{family.denoiser_name}.target_modules"]
    assert targets == sorted(targets)  # not a set's hash-seed order: two identical runs write the same metadata
    fresh = family_class.tiny_pipeline()
    fresh.load_lora_weights(str(tmp_path))
    reloaded = _sampled(fresh(prompt=PROMPTS[0], generator=_generator(), **kwargs))
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- RLG
def test_generate_picks_the_family_rlg_pipeline(family_dir, tmp_path, monkeypatch):
    """`diffalign generate --model <dir> --lora DIR`: the family's RLG route (its RLG pipeline, or the RLG guider in
    its modular pipeline) with the family's default guidance; w = 0 is the family's pipeline on the base, w = 1 with
    the LoRA (written by the family)."""
    import diffusers

    from diffalign import generate
    from diffalign.guiders import ModularRLGPipeline

    family_class, model = family_dir
    if family_class.rlg_route() is None:
        pytest.skip(f"{family_class.name} has no RLG route")
    family = load_family(model)
    add_lora(family.denoiser, rank=4, alpha=8, target_modules=family.default_lora_target_modules)
    _randomise_lora(family.denoiser)
    lora_dir = str(tmp_path / "lora")
    family.save_lora(family.denoiser, lora_dir)

    calls = []
    sample_scales = generate.sample_scales
    monkeypatch.setattr(generate, "sample_scales", lambda *args, **kwargs: calls.append(kwargs) or sample_scales(
        *args, **kwargs))
    out = tmp_path / "out"
    argv = ["--model", model, "--lora", lora_dir, "--prompt", "a cat", "--rlg-scale", "0", "1", "--num-images", "1",
            "--steps", "2", "--resolution", str(_side(family_class)), "--output-dir", str(out)]
    edit = {}  # an editing family (FLUX.1 Kontext) edits `--image`
    if family_class.max_condition_images:
        argv += ["--image", _condition_image(tmp_path)]
    if family_class.requires_condition_video:  # a video-to-video family (wan_v2v) starts from `--video`
        argv += ["--video", _condition_video()]
    argv += [item for key, value in family_class.tiny_settings.items()  # e.g. Wan's --num-frames 5
             for item in (f"--{key.replace('_', '-')}", str(value))]
    assert generate.run(generate.add_arguments(argparse.ArgumentParser()).parse_args(argv)) == 0
    if family_class.output_kind == "video":  # an animated grid, a row per scale
        from diffalign.plotting import find_video, read_video

        frames = read_video(find_video(str(out / "rlg_grid.png")))
        assert len(frames) == family_class.tiny_settings.get("num_frames", len(frames))
    else:
        assert (out / "rlg_grid.png").is_file()
    assert calls[0]["guidance_scale"] == family_class.default_guidance_scale
    assert calls[0]["height"] == _side(family_class)

    pipe = generate.load_rlg_pipeline(model, lora=lora_dir, device="cpu")
    if family_class.rlg_pipeline_class is not None:
        assert type(pipe).__name__ == family_class.rlg_pipeline_class
    else:
        assert isinstance(pipe, ModularRLGPipeline) and family_class.rlg_route() == "guider (modular)"
        # the modular pipeline runs the weights the family's pipeline loaded: no second copy
        assert pipe.components[family_class.denoiser_name].peft_config
    kwargs = dict(num_inference_steps=2, height=_side(family_class), width=_side(family_class),
                  **family_class.tiny_settings)
    if family_class.max_condition_images:
        edit = generate.edit_call_kwargs(family_class, pipe, _condition_image(tmp_path), SIZE)
        kwargs.update({**edit, **family_class.tiny_settings})  # e.g. Wan's 5 frames over its pipeline's 81
    if family_class.requires_condition_video:  # the video's first frames, the strength and the longer schedule
        kwargs = generate.video_call_kwargs(family_class, pipe, _condition_video(), _side(family_class), steps=2,
                                            **family_class.tiny_settings)
    scale = family_class.default_guidance_scale
    images = generate.sample_scales(pipe, ["a cat"], [0.0, 1.0], 1, 0, eta=0.0, guidance_scale=scale, **kwargs)
    stock = getattr(diffusers, family_class.pipeline_class).from_pretrained(model, **family_class.pipeline_init_kwargs,
                                                                            **family_class.loaded_components(model))
    stock.set_progress_bar_config(disable=True)
    # the pipeline's arguments for generate's guidance scale (Qwen-Image: `true_cfg_scale` against "", not its
    # `guidance_scale`, which samples without CFG)
    kwargs.update(family_class.rlg_guidance_pipeline_kwargs(scale))
    run = lambda: _sampled(stock(prompt="a cat", generator=_generator(), output_type="pt", **kwargs))  # noqa: E731
    torch.testing.assert_close(images[0.0], run(), atol=1e-4, rtol=1e-4)
    stock.load_lora_weights(lora_dir)
    torch.testing.assert_close(images[1.0], run(), atol=1e-4, rtol=1e-4)
    assert (images[1.0] - images[0.0]).abs().max() > 1e-3


@pytest.mark.parametrize("family_class, variant", variants())
def test_rlg_pipeline_is_the_base_at_0_and_the_aligned_model_at_1(family_class, variant, tmp_path):
    """On the same components: the family's RLG route (`rlg_pipeline`) at w = 0 is the family's pipeline without the
    LoRA on the denoiser, at w = 1 the pipeline with it (e.g. FLUX.1-schnell: no embedded guidance, a fixed-shift
    scheduler). The guider route (modular) is also bit for bit its modular pipeline with the model's own CFG guider,
    adapters off (w = 0) and on (w = 1)."""
    import diffusers

    components = {**family_class.pipeline_init_kwargs, **family_class.tiny_components(**variant)}
    pipeline = getattr(diffusers, family_class.pipeline_class)
    if family_class.rlg_route_for(pipeline(**components)) is None:  # e.g. FLUX.1
        with pytest.raises(ModelError, match="RLG"):  # refused in one line
            family_class.rlg_pipeline(pipeline(**components))
        pytest.skip(f"{family_class.name} {variant} has no RLG route")
    side = max(_side(family_class), _sizes(family_for_pipeline(pipeline(**components)), False)[0])  # TI2V-5B's 32
    kwargs = dict(num_inference_steps=3, height=side, width=side, output_type="pt",
                  **family_class.pipeline_guidance_kwargs(3.0, family_class.default_guidance_scale),
                  **family_class.tiny_settings)
    # Qwen-Image-Edit's pipelines take one prompt a call with its images (the image of a call goes to every prompt)
    call_prompts = PROMPTS[:1] if family_class.requires_condition_image else PROMPTS
    if "negative_prompt" in kwargs:  # true CFG: one negative prompt per prompt (FluxRLGPipeline needs as many)
        kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(call_prompts)
    if family_class.max_condition_images:  # an editing family edits an image, sampled as its rollouts do
        from diffalign import generate

        kwargs.update(generate.edit_call_kwargs(family_class, pipeline(**components), _condition_image(tmp_path),
                                                side))
        kwargs.update(family_class.tiny_settings)  # e.g. Wan's 5 frames over its pipeline's 81
    if family_class.requires_condition_video:  # video-to-video: the video's frames (no `num_frames`), as rollouts
        from diffalign import generate

        kwargs.pop("num_frames", None)
        kwargs.update(generate.video_call_kwargs(family_class, pipeline(**components), _condition_video(), side,
                                                 steps=3, **family_class.tiny_settings))

    def sample(pipe, **extra):
        pipe.set_progress_bar_config(disable=True)
        # a copy of the prompts: some pipelines write the chat-templated prompts into the list (Z-Image's)
        # `prompt=` by name: Flux2KleinPipeline's first argument is `image`
        return _sampled(pipe(prompt=list(call_prompts), generator=_generator(), **kwargs, **extra))

    # peft freezes the base weights when it injects the LoRA below, and on CPU a weight that requires grad can take
    # another matmul kernel (SANA's attention output projection: ~1e-7 per call): freeze first, as inference does
    components[family_class.denoiser_name].requires_grad_(False)
    stock_pipe = pipeline(**components)
    stock = sample(stock_pipe)
    rlg = family_class.rlg_pipeline(pipeline(**components))
    assert all(rlg.components[name] is component for name, component in components.items()  # shared, not copied
               if name in rlg.components and isinstance(component, torch.nn.Module))
    denoiser = components[family_class.denoiser_name]
    add_lora(denoiser, target_modules=family_class.default_lora_target_modules)
    _randomise_lora(denoiser, std=0.1)  # 0.05 changes the tiny FLUX.2 klein's images by less than 1e-3
    at_0 = sample(rlg, rlg_scale=0.0)
    torch.testing.assert_close(at_0, stock, atol=1e-4, rtol=1e-4)
    aligned = sample(pipeline(**components))  # the LoRA is on the shared denoiser
    assert (aligned - stock).abs().max() > 1e-3
    at_1 = sample(rlg, rlg_scale=1.0)
    torch.testing.assert_close(at_1, aligned, atol=1e-4, rtol=1e-4)
    from diffalign.guiders import ModularRLGPipeline

    if not isinstance(rlg, ModularRLGPipeline):  # an RLG pipeline (also a model's, e.g. Wan 2.2 TI2V-5B's)
        return

    # the guider route, bit for bit: the modular pipeline with the model's own CFG guider (as the family's pipeline
    # samples with `kwargs`), the LoRA adapters off for the base and on for the aligned model
    modular = rlg.modular_pipeline
    scale = kwargs.get("true_cfg_scale", kwargs.get("guidance_scale"))
    modular_kwargs = {k: v for k, v in kwargs.items() if k not in ("guidance_scale", "true_cfg_scale")}

    def plain_modular():
        modular.update_components(guider=family_class.modular_cfg_guider_for(stock_pipe)(scale))
        prompts = {"negative_prompt": list(modular_kwargs["negative_prompt"])} if "negative_prompt" in kwargs else {}
        return modular(prompt=list(call_prompts), generator=_generator(), output=rlg.output,
                       **{**modular_kwargs, **prompts})

    denoiser.disable_adapters()
    base = plain_modular()
    denoiser.enable_adapters()
    torch.testing.assert_close(at_0, base, atol=0, rtol=0)
    torch.testing.assert_close(at_1, plain_modular(), atol=0, rtol=0)
    assert (sample(rlg, rlg_scale=1.5) - at_1).abs().max() > 1e-4  # w > 1 extrapolates


# ---------------------------------------------------------------------------------------------- kill + resume
def _resume_args(algorithm, model, side=SIZE):
    """A 3-epoch run of the CLI settings above with a checkpoint every epoch (`--output_dir` left to the helper)."""
    settings = dict(zip(CLI_SETTINGS[::2], CLI_SETTINGS[1::2]))
    for key in {"ddpo": ("--train_clip_eps", "--train_beta"),
                "nft": ("--train_clip_range", "--train_clip_eps", "--train_beta")}[algorithm]:  # NFT: its own beta
        del settings[key]
    settings.update({"--num_epochs": "3", "--checkpoint_every": "1", "--seed": "3", "--final_eval_num_images": "0",
                     "--sample_resolution": str(side)})
    settings.update({"ddpo": {"--sample_sde_window_size": "2"}, "nft": {"--train_micro_batch_size": "4"}}[algorithm])
    return ["train", algorithm, "--model", model] + [item for pair in settings.items() for item in pair]


@pytest.mark.slow  # three CLI runs in subprocesses per family and trainer (two at once): ~40 s each for SD on 2 cores
@pytest.mark.parametrize("algorithm", ["ddpo", "nft"])
def test_killed_run_resumes_bit_identically(family_dir, tmp_path, algorithm):
    """A run SIGKILLed after its first checkpoint and resumed with `--resume` ends with the LoRA and the metrics of
    an uninterrupted run, bit for bit: the prompt cache, the RNG streams and (NFT) the old policy come back."""
    from cli_helpers import assert_killed_run_resumes_bit_identically

    family, model = family_dir
    args = _with_prompt_file(_resume_args(algorithm, model, _side(family)), family, str(tmp_path / "prompts.jsonl"))
    args += [item for key, value in family.tiny_settings.items() for item in (f"--{key}", str(value))]  # Wan: 5 frames
    assert_killed_run_resumes_bit_identically(args, tmp_path)
