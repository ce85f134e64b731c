"""Flux2RLGPipeline on tiny FLUX.2 [dev] components (`Flux2Family.tiny_components`): bit-for-bit identities against
Flux2Pipeline (w = 0 the base, adapters off; w = 1 the LoRA or the aligned transformer), with and without a reference
image; the mix `v_base + w (v_aligned - v_base)` with the embedded guidance inside each branch against a hand-written
loop; errors, callbacks, community-pipeline loading; and `diffalign generate --model DIR` through the CLI."""

import copy
import inspect
import os

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from diffalign.families.flux2 import Flux2Family
from diffalign.pipelines import Flux2RLGPipeline
from diffalign.testing import perturbed_unet

PIPELINE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pipelines", "pipeline_flux2_rlg.py")
PROMPT = "a photo of a cat"
STEPS = 3
SIZE = 16
GUIDANCE = 3.0


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def add_lora(transformer, adapter_name="default", seed=0, std=0.1):
    """A LoRA adapter with random (non-zero) B weights on the family's default targets."""
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                        target_modules=Flux2Family.default_lora_target_modules)
    transformer.add_adapter(config, adapter_name=adapter_name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if f"lora_B.{adapter_name}." in name:
                param.copy_(std * torch.randn(param.shape, generator=generator))
    return transformer


def make(cls, components, **kwargs):
    pipe = cls(**components, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(**kwargs):
    return {"prompt": PROMPT, "num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "height": SIZE,
            "width": SIZE, "output_type": "latent", "generator": gen(), **kwargs}


@pytest.fixture(scope="module")
def base_components():
    components = Flux2Family.tiny_components()
    components["transformer"].requires_grad_(False)  # as inference has it (peft freezes it when adding the LoRA)
    return components


@pytest.fixture(scope="module")
def lora_components(base_components):
    return {**base_components, "transformer": add_lora(copy.deepcopy(base_components["transformer"]))}


def stock(components, adapters=True, **kwargs):
    """Flux2Pipeline on `components`, with the transformer's LoRA adapters on or off."""
    transformer = components["transformer"]
    if not adapters:
        transformer.disable_adapters()
    try:
        return make(Flux2Pipeline, components)(**call_kwargs(**kwargs)).images
    finally:
        if not adapters:
            transformer.enable_adapters()


def test_call_signature_extends_flux2():
    """Every Flux2Pipeline argument with its default; `prompt` first (as `diffalign generate` calls it)."""
    flux2_params = inspect.signature(Flux2Pipeline.__call__).parameters
    rlg_params = inspect.signature(Flux2RLGPipeline.__call__).parameters
    for name, param in flux2_params.items():
        assert rlg_params[name].default == param.default, name
    assert list(rlg_params)[1] == "prompt"
    assert {"rlg_scale", "rlg_start", "rlg_stop", "rlg_single_pass"} <= set(rlg_params)


def test_w0_is_the_base_and_w1_the_lora_model_bit_for_bit(lora_components):
    """One model per step at w = 0 and 1 (`rlg_single_pass` changes nothing): the base with every LoRA row routed to
    no adapter, the aligned model as configured."""
    base, aligned = stock(lora_components, adapters=False), stock(lora_components)
    assert (base - aligned).abs().max() > 1e-3
    pipe = make(Flux2RLGPipeline, lora_components)
    assert torch.equal(pipe(**call_kwargs(rlg_scale=0.0)).images, base)
    assert torch.equal(pipe(**call_kwargs(rlg_scale=1.0)).images, aligned)


def test_reference_image_conditions_every_model(lora_components):
    """Flux2Pipeline's reference images (`image`, at least 64 px): their tokens condition the base and the aligned
    model alike."""
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    pipe = make(Flux2RLGPipeline, lora_components)
    base = stock(lora_components, adapters=False, image=image)
    assert (base - stock(lora_components, adapters=False)).abs().max() > 1e-4  # the image is used
    assert torch.equal(pipe(**call_kwargs(rlg_scale=0.0, image=image)).images, base)
    assert torch.equal(pipe(**call_kwargs(rlg_scale=1.0, image=image)).images, stock(lora_components, image=image))


def hand_rlg_latents(pipe, w):
    """A plain flow-matching Euler loop on FLUX.2's packed latents: `v = v_base + w (v_aligned - v_base)`, the LoRA
    adapters off for the base, the embedded guidance given to both."""
    transformer = pipe.transformer
    embeds, txt_ids = pipe.encode_prompt(PROMPT, device="cpu")
    latents, img_ids = pipe.prepare_latents(1, 4, SIZE, SIZE, embeds.dtype, "cpu", gen())
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS),
                            mu=compute_empirical_mu(image_seq_len=latents.shape[1], num_steps=STEPS))

    def velocity(t):
        return transformer(hidden_states=latents, timestep=t.expand(1) / 1000, guidance=torch.tensor([GUIDANCE]),
                           encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            aligned = velocity(t)
            transformer.disable_adapters()
            base = velocity(t)
            transformer.enable_adapters()
            latents = latents + (scheduler.sigmas[i + 1] - scheduler.sigmas[i]) * (base + w * (aligned - base))
    return latents


def test_mix_with_the_embedded_guidance_in_each_branch(lora_components):
    pipe = make(Flux2RLGPipeline, lora_components)
    expected = hand_rlg_latents(pipe, 1.6)
    for single_pass in (True, False):
        mixed = pipe(**call_kwargs(rlg_scale=1.6, rlg_single_pass=single_pass)).images
        torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=0)
    assert (expected - stock(lora_components)).abs().max() > 1e-4  # w > 1 extrapolates
    # outside the window the aligned model runs alone (w = 1)
    latents = lambda **kwargs: pipe(**call_kwargs(**kwargs)).images  # noqa: E731
    torch.testing.assert_close(latents(rlg_scale=2.0, rlg_stop=0.5), latents(rlg_scale=[2.0, 1.0, 1.0]))


def test_full_weight_aligned_transformer(base_components):
    aligned_transformer = perturbed_unet(base_components["transformer"], scale=0.05)
    pipe = make(Flux2RLGPipeline, base_components, aligned_transformer=aligned_transformer)
    base = stock(base_components)
    aligned = stock({**base_components, "transformer": aligned_transformer})
    assert (base - aligned).abs().max() > 1e-3
    assert torch.equal(pipe(**call_kwargs(rlg_scale=0.0)).images, base)
    assert torch.equal(pipe(**call_kwargs(rlg_scale=1.0)).images, aligned)


def test_load_lora_weights_and_errors(base_components, lora_components, tmp_path):
    """The user path: a LoRA saved by diffusers, `pipe.load_lora_weights(dir)`; each misuse is one clear error."""
    Flux2Pipeline.save_lora_weights(str(tmp_path),
                                    transformer_lora_layers=get_peft_model_state_dict(lora_components["transformer"]))
    pipe = make(Flux2RLGPipeline, copy.deepcopy(base_components))
    with pytest.raises(ValueError, match="needs an aligned model"):
        pipe(**call_kwargs(rlg_scale=1.6))
    pipe.load_lora_weights(str(tmp_path))
    reference = make(Flux2Pipeline, copy.deepcopy(base_components))
    reference.load_lora_weights(str(tmp_path))
    assert torch.equal(pipe(**call_kwargs(rlg_scale=1.0)).images, reference(**call_kwargs()).images)

    with pytest.raises(ValueError, match=r"Unknown LoRA adapter\(s\) \['typo'\]"):
        pipe(**call_kwargs(rlg_scale={"typo": 1.0}))
    with pytest.raises(ValueError, match="has 2 values, but the sampler runs 3 steps"):
        pipe(**call_kwargs(rlg_scale=[1.0, 2.0]))
    with pytest.raises(ValueError, match="rlg_start"):
        pipe(**call_kwargs(rlg_scale=1.5, rlg_start=0.8, rlg_stop=0.2))
    pipe.fuse_lora()
    with pytest.raises(ValueError, match="fused into `transformer`"):
        pipe(**call_kwargs(rlg_scale=1.6))


def test_custom_pipeline_and_from_pipe(base_components, tmp_path):
    """A saved Flux2Pipeline folder loads as a community pipeline (offline), and `from_pipe` shares the components."""
    aligned_transformer = perturbed_unet(base_components["transformer"], scale=0.05)
    expected = make(Flux2RLGPipeline, base_components, aligned_transformer=aligned_transformer)(
        **call_kwargs(rlg_scale=1.6)).images
    make(Flux2Pipeline, base_components).save_pretrained(str(tmp_path / "flux2"), safe_serialization=True)
    custom = DiffusionPipeline.from_pretrained(
        str(tmp_path / "flux2"), custom_pipeline=os.path.abspath(PIPELINE_FILE), trust_remote_code=True
    )
    custom.set_progress_bar_config(disable=True)
    assert type(custom).__name__ == "Flux2RLGPipeline" and custom.aligned_transformer is None
    custom.register_modules(aligned_transformer=aligned_transformer)
    torch.testing.assert_close(custom(**call_kwargs(rlg_scale=1.6)).images, expected, atol=1e-5, rtol=0)
    from_pipe = Flux2RLGPipeline.from_pipe(make(Flux2Pipeline, base_components),
                                           aligned_transformer=aligned_transformer)
    from_pipe.set_progress_bar_config(disable=True)
    assert torch.equal(from_pipe(**call_kwargs(rlg_scale=1.6)).images, expected)


def test_callbacks(lora_components):
    pipe = make(Flux2RLGPipeline, lora_components)
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append((step, sorted(callback_kwargs), pipeline.rlg_scale, pipeline.do_rlg))
        pipeline._rlg_scale = 0.5  # from the next step on
        if step == 1:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs

    inputs = ["latents", "prompt_embeds"]
    latents = pipe(**call_kwargs(rlg_scale=1.0, num_inference_steps=2, callback_on_step_end=callback,
                                 callback_on_step_end_tensor_inputs=inputs)).images
    assert seen == [(0, inputs, 1.0, False), (1, inputs, 0.5, True)]
    assert torch.count_nonzero(latents) == 0

    # prompt embeddings replaced by the callback condition every model from the next step on
    other = pipe.encode_prompt("a dog", device="cpu")[0]
    swap = lambda pipeline, step, timestep, kwargs: {"prompt_embeds": other} if step == 0 else {}  # noqa: E731
    swapped = pipe(**call_kwargs(rlg_scale=1.6, callback_on_step_end=swap,
                                 callback_on_step_end_tensor_inputs=["prompt_embeds"])).images
    assert (swapped - pipe(**call_kwargs(rlg_scale=1.6)).images).abs().max() > 1e-4
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(**call_kwargs(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise_pred"]))


def _png(path):
    return torch.from_numpy(np.asarray(Image.open(path), dtype=np.int16))


def _as_png(images):
    """`diffalign generate`'s rounding of `[0, 1]` images to 8 bits."""
    return torch.from_numpy((images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.int16))


def test_diffalign_generate_runs_flux2_dev_through_the_cli(base_components, lora_components, tmp_path, capsys):
    """`diffalign generate --model FLUX2_DEV_DIR --lora DIR`: w = 0 the base, w = 1 the LoRA model, as Flux2Pipeline
    samples them with the family's embedded guidance; a missing LoRA is one line and exit code 2."""
    from diffalign.cli import main

    model, lora = str(tmp_path / "flux2-dev"), str(tmp_path / "lora")
    make(Flux2Pipeline, base_components).save_pretrained(model, safe_serialization=True)
    Flux2Pipeline.save_lora_weights(lora,
                                    transformer_lora_layers=get_peft_model_state_dict(lora_components["transformer"]))
    out = tmp_path / "out"
    common = ["--prompt", PROMPT, "--steps", "2", "--resolution", str(SIZE), "--num-images", "1"]
    assert main(["generate", "--model", model, "--lora", lora, "--rlg-scale", "0", "1", "--output-dir", str(out),
                 *common]) == 0
    assert (out / "rlg_grid.png").is_file()
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, height=SIZE, width=SIZE, output_type="pt",
                  guidance_scale=Flux2Family.default_guidance_scale)
    reference = make(Flux2Pipeline, copy.deepcopy(base_components))
    for scale in ("0", "1"):
        if scale == "1":
            reference.load_lora_weights(lora)
        expected = _as_png(reference(generator=gen(), **kwargs).images)[0]
        assert (_png(out / "rlg_images" / f"w{scale}" / "p00_seed0.png") - expected).abs().max() <= 1

    capsys.readouterr()
    assert main(["generate", "--model", model, "--lora", str(tmp_path / "missing"), "--output-dir", str(out),
                 *common]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line
