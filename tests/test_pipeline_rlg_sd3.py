"""StableDiffusion3RLGPipeline on tiny SD3 components: identities against StableDiffusion3Pipeline, a hand-written
flow-matching RLG loop, and the RLG authors' own SD3 pipeline (tests/rlg_reference)."""

import copy
import importlib
import importlib.util
import inspect
import os
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from diffalign.pipelines import StableDiffusion3RLGPipeline
from diffalign.testing import perturbed_unet, tiny_flow_scheduler, tiny_sd3_components

HERE = os.path.dirname(os.path.abspath(__file__))
PIPELINE_FILE = os.path.join(HERE, "..", "pipelines", "pipeline_stable_diffusion_3_rlg.py")
PROMPT = "a photo of a cat"
STEPS = 3
MAX_SEQUENCE_LENGTH = 16
ATOL = 1e-4


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def add_lora(transformer, adapter_name="default", seed=0, std=0.1):
    """A LoRA adapter with random (non-zero) B weights, so that it changes the model."""
    config = LoraConfig(
        r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
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
    return {
        "prompt": PROMPT,
        "num_inference_steps": STEPS,
        "guidance_scale": 5.0,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "output_type": "np",
        "generator": gen(),
        **kwargs,
    }


@pytest.fixture(scope="module")
def base_components():
    return tiny_sd3_components()


@pytest.fixture
def lora_components(base_components):
    return {**base_components, "transformer": add_lora(copy.deepcopy(base_components["transformer"]))}


def transformer_velocity(transformer):
    def velocity(x, t, embeds, pooled):
        return transformer(
            hidden_states=x,
            timestep=t.expand(x.shape[0]),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]

    return velocity


def adapters_off_velocity(transformer):
    def velocity(*args):
        transformer.disable_adapters()
        try:
            return transformer_velocity(transformer)(*args)
        finally:
            transformer.enable_adapters()

    return velocity


def hand_rlg_latents(pipe, velocities, weights, guidance_scale=5.0, steps=STEPS):
    """A plain flow-matching Euler loop with `v = v_base + sum_i w_i (v_i - v_base)`, CFG inside each model.

    `velocities` maps "base" and each name in `weights` to a function `(x, t, embeds, pooled) -> v`.
    """
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPT, PROMPT, PROMPT, device="cpu", max_sequence_length=MAX_SEQUENCE_LENGTH
    )
    embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    latents = pipe.prepare_latents(1, 4, 16, 16, embeds.dtype, "cpu", gen())
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            guided = {}
            for name, velocity in velocities.items():
                uncond, cond = velocity(torch.cat([latents] * 2), t, embeds, pooled).chunk(2)
                guided[name] = uncond + guidance_scale * (cond - uncond)
            w_at = {name: (w(i) if callable(w) else w) for name, w in weights.items()}
            v = guided["base"] + sum(w * (guided[name] - guided["base"]) for name, w in w_at.items())
            # Euler step of the probability-flow ODE dx/dsigma = v, from sigma_i to sigma_{i+1}
            latents = latents + (scheduler.sigmas[i + 1] - scheduler.sigmas[i]) * v
    return latents


def test_call_signature_extends_stable_diffusion_3():
    sd3_params = inspect.signature(StableDiffusion3Pipeline.__call__).parameters
    rlg_params = inspect.signature(StableDiffusion3RLGPipeline.__call__).parameters
    for name, param in sd3_params.items():  # same names, same defaults
        assert rlg_params[name].default == param.default, name
    assert {"rlg_scale", "rlg_start", "rlg_stop", "rlg_single_pass"} <= set(rlg_params)


# --- LoRA aligned model ---------------------------------------------------------------------------------------


def test_lora_identities_formula_and_single_pass(base_components, lora_components):
    pipe = make(StableDiffusion3RLGPipeline, lora_components)
    base = make(StableDiffusion3Pipeline, base_components)(**call_kwargs()).images
    aligned = make(StableDiffusion3Pipeline, lora_components)(**call_kwargs()).images
    assert np.abs(base - aligned).max() > 1e-2  # the adapter changes the model

    np.testing.assert_allclose(pipe(**call_kwargs(rlg_scale=0.0)).images, base, atol=ATOL)
    for single_pass in (True, False):
        np.testing.assert_allclose(
            pipe(**call_kwargs(rlg_scale=1.0, rlg_single_pass=single_pass)).images, aligned, atol=ATOL
        )

    rows = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    single = pipe(**call_kwargs(rlg_scale=1.6, output_type="latent")).images
    double = pipe(**call_kwargs(rlg_scale=1.6, output_type="latent", rlg_single_pass=False)).images
    handle.remove()
    assert rows == [4] * STEPS + [2] * (2 * STEPS)  # base + aligned (CFG rows) in one forward, or one forward each
    torch.testing.assert_close(single, double, atol=ATOL, rtol=0)

    transformer = pipe.transformer
    velocities = {"base": adapters_off_velocity(transformer), "aligned": transformer_velocity(transformer)}
    torch.testing.assert_close(single, hand_rlg_latents(pipe, velocities, {"aligned": 1.6}), atol=ATOL, rtol=0)


def test_full_weight_aligned_transformer(base_components):
    aligned_transformer = perturbed_unet(base_components["transformer"])  # any model: a noisy copy of the weights
    pipe = make(StableDiffusion3RLGPipeline, base_components, aligned_transformer=aligned_transformer)
    base = make(StableDiffusion3Pipeline, base_components)(**call_kwargs()).images
    aligned = make(StableDiffusion3Pipeline, {**base_components, "transformer": aligned_transformer})(**call_kwargs())
    assert np.abs(base - aligned.images).max() > 1e-2
    np.testing.assert_allclose(pipe(**call_kwargs(rlg_scale=0.0)).images, base, atol=ATOL)
    np.testing.assert_allclose(pipe(**call_kwargs(rlg_scale=1.0)).images, aligned.images, atol=ATOL)

    velocities = {"base": transformer_velocity(pipe.transformer), "aligned": transformer_velocity(aligned_transformer)}
    expected = hand_rlg_latents(pipe, velocities, {"aligned": lambda i: [2.4, 1.6, 0.5][i]})
    latents = pipe(**call_kwargs(rlg_scale=[2.4, 1.6, 0.5], output_type="latent")).images
    torch.testing.assert_close(latents, expected, atol=ATOL, rtol=0)


def test_skip_layer_guidance_inside_each_model(base_components, lora_components):
    """SD3's skip-layer guidance, like CFG, acts inside each model: w = 0 and w = 1 still match SD3."""
    slg = {"skip_guidance_layers": [1], "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 1.0}
    base = make(StableDiffusion3Pipeline, base_components)(**call_kwargs(**slg)).images
    assert np.abs(base - make(StableDiffusion3Pipeline, base_components)(**call_kwargs()).images).max() > 1e-3
    aligned = make(StableDiffusion3Pipeline, lora_components)(**call_kwargs(**slg)).images
    pipe = make(StableDiffusion3RLGPipeline, lora_components)
    np.testing.assert_allclose(pipe(**call_kwargs(rlg_scale=0.0, **slg)).images, base, atol=ATOL)
    np.testing.assert_allclose(pipe(**call_kwargs(rlg_scale=1.0, **slg)).images, aligned, atol=ATOL)
    single = pipe(**call_kwargs(rlg_scale=2.0, output_type="latent", **slg)).images
    double = pipe(**call_kwargs(rlg_scale=2.0, output_type="latent", rlg_single_pass=False, **slg)).images
    torch.testing.assert_close(single, double, atol=ATOL, rtol=0)


def test_schedules_window_and_adapter_mix(base_components, lora_components):
    pipe = make(StableDiffusion3RLGPipeline, lora_components)
    latents = lambda **kwargs: pipe(**call_kwargs(output_type="latent", **kwargs)).images  # noqa: E731
    # outside the window the aligned model runs alone, i.e. w = 1
    torch.testing.assert_close(latents(rlg_scale=2.0, rlg_stop=0.5), latents(rlg_scale=[2.0, 1.0, 1.0]))
    torch.testing.assert_close(latents(rlg_scale=lambda i: 2.0 - i), latents(rlg_scale=[2.0, 1.0, 0.0]))
    torch.testing.assert_close(latents(rlg_scale={"default": 1.6}), latents(rlg_scale=1.6), atol=ATOL, rtol=0)

    # two adapters: v_base + w_a (v_a - v_base) + w_b (v_b - v_base), in one forward
    add_lora(pipe.transformer, "other", seed=1)
    pipe.transformer.set_adapters("default")
    mixed = latents(rlg_scale={"default": 0.7, "other": 0.5})
    transformer = pipe.transformer

    def adapter_velocity(name):
        def velocity(*args):
            transformer.set_adapters(name)
            try:
                return transformer_velocity(transformer)(*args)
            finally:
                transformer.set_adapters("default")

        return velocity

    velocities = {
        "base": adapters_off_velocity(transformer),
        "default": adapter_velocity("default"),
        "other": adapter_velocity("other"),
    }
    expected = hand_rlg_latents(pipe, velocities, {"default": 0.7, "other": 0.5})
    torch.testing.assert_close(mixed, expected, atol=ATOL, rtol=0)


# --- the user path: a LoRA saved by diffusers, loaded with load_lora_weights -----------------------------------


def test_load_lora_weights_then_call(base_components, lora_components, tmp_path):
    """`pipe.load_lora_weights(dir)` then `pipe(prompt, rlg_scale=1.6)`, with defaults; a LoRA that also adapts the
    CLIP text encoders: the base model gets the prompt encoded without it."""
    text_encoder = copy.deepcopy(base_components["text_encoder"])
    inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["q_proj", "v_proj"]), text_encoder
    )
    with torch.no_grad():
        for name, param in text_encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    StableDiffusion3Pipeline.save_lora_weights(
        str(tmp_path),
        transformer_lora_layers=get_peft_model_state_dict(lora_components["transformer"]),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder)),
    )
    base = make(StableDiffusion3Pipeline, base_components)(**call_kwargs()).images
    reference = make(StableDiffusion3Pipeline, copy.deepcopy(base_components))
    reference.load_lora_weights(str(tmp_path))
    aligned = reference(**call_kwargs()).images

    pipe = make(StableDiffusion3RLGPipeline, copy.deepcopy(base_components))
    with pytest.raises(ValueError, match="needs an aligned model"):
        pipe(**call_kwargs(rlg_scale=1.6))
    pipe.load_lora_weights(str(tmp_path))
    image = pipe(PROMPT, rlg_scale=1.6, num_inference_steps=2).images[0]  # SD3's defaults otherwise
    assert image.size == (16, 16)
    np.testing.assert_allclose(pipe(**call_kwargs(rlg_scale=0.0)).images, base, atol=ATOL)
    np.testing.assert_allclose(pipe(**call_kwargs(rlg_scale=1.0)).images, aligned, atol=ATOL)

    # fused: the default scale runs like diffusers; RLG needs the base weights back
    pipe.fuse_lora()
    np.testing.assert_allclose(pipe(**call_kwargs()).images, aligned, atol=ATOL)
    with pytest.raises(ValueError, match=r"fused into `transformer`, `text_encoder`"):
        pipe(**call_kwargs(rlg_scale=1.6))


# --- the RLG authors' pipeline ----------------------------------------------------------------------------------


def reference_module():
    """`tests/rlg_reference/sd3_pipeline_with_rlg.py` (the authors' file, unchanged), imported as a package."""
    name = "rlg_reference"
    if name not in sys.modules:
        folder = os.path.join(HERE, name)
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{name}.sd3_pipeline_with_rlg")


def with_disable_adapter(transformer):
    """The authors load the LoRA as a `peft.PeftModel`, whose `disable_adapter()` is a context manager; a diffusers
    transformer with `add_adapter` has `disable_adapters()` / `enable_adapters()`: wrap them."""

    @contextmanager
    def disable_adapter():
        transformer.disable_adapters()
        try:
            yield
        finally:
            transformer.enable_adapters()

    transformer.disable_adapter = disable_adapter
    return transformer


def test_matches_the_authors_pipeline(lora_components):
    pipeline_with_logprob = reference_module().pipeline_with_logprob
    components = {**lora_components, "transformer": with_disable_adapter(lora_components["transformer"])}
    authors = make(StableDiffusion3Pipeline, components)
    pipe = make(StableDiffusion3RLGPipeline, components)
    kwargs = call_kwargs(output_type="pt", guidance_scale=4.5, negative_prompt="")
    del kwargs["generator"]  # a fresh one per call
    expected = {}
    for w in (0.0, 1.0, 1.6, 2.4):
        output = pipeline_with_logprob(authors, **kwargs, generator=gen(), tuned_guidance_scale=w, determistic=True)
        expected[w] = output[0].images
        for single_pass in (True, False):
            images = pipe(**kwargs, generator=gen(), rlg_scale=w, rlg_single_pass=single_pass).images
            torch.testing.assert_close(images, expected[w], atol=ATOL, rtol=0)
    assert (expected[2.4] - expected[1.0]).abs().max() > 1e-2 and (expected[1.0] - expected[0.0]).abs().max() > 1e-2

    # what the authors' file gets wrong, and ours does not: `output_type="latent"` and dynamic shifting
    with pytest.raises(NameError, match="latent"):
        pipeline_with_logprob(authors, **call_kwargs(output_type="latent"), tuned_guidance_scale=1.6, determistic=True)
    latents = pipe(**call_kwargs(output_type="latent", rlg_scale=1.6)).images
    assert latents.shape == (1, 4, 8, 8)

    shifting = tiny_flow_scheduler(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)
    authors.scheduler, pipe.scheduler = copy.deepcopy(shifting), copy.deepcopy(shifting)
    with pytest.raises(NameError, match="calculate_shift"):
        pipeline_with_logprob(authors, **call_kwargs(), tuned_guidance_scale=1.6, determistic=True)
    reference = make(StableDiffusion3Pipeline, {**components, "scheduler": copy.deepcopy(shifting)})
    np.testing.assert_allclose(pipe(**call_kwargs()).images, reference(**call_kwargs()).images, atol=ATOL)
    np.testing.assert_allclose(pipe(**call_kwargs(mu=2.0)).images, reference(**call_kwargs(mu=2.0)).images, atol=ATOL)
    shifted = pipe(**call_kwargs(rlg_scale=1.6)).images
    pipe.scheduler = copy.deepcopy(lora_components["scheduler"])
    assert np.abs(shifted - pipe(**call_kwargs(rlg_scale=1.6)).images).max() > 1e-4  # the shift changed the schedule


# --- errors ---------------------------------------------------------------------------------------------------


def test_errors(base_components, lora_components):
    plain = make(StableDiffusion3RLGPipeline, base_components)
    for scale in (0.0, 1.5, [1.0] * STEPS, lambda i: 1.0):
        with pytest.raises(ValueError, match="no `aligned_transformer` and no LoRA adapter on `transformer`"):
            plain(**call_kwargs(rlg_scale=scale))
    with pytest.raises(ValueError, match="Unknown LoRA adapter"):
        plain(**call_kwargs(rlg_scale={"default": 1.0}))

    pipe = make(StableDiffusion3RLGPipeline, lora_components)
    with pytest.raises(ValueError, match=r"Unknown LoRA adapter\(s\) \['typo'\]"):
        pipe(**call_kwargs(rlg_scale={"typo": 1.0}))
    with pytest.raises(ValueError, match="has 2 values, but the sampler runs 3 steps"):
        pipe(**call_kwargs(rlg_scale=[1.0, 2.0]))
    with pytest.raises(ValueError, match="rlg_start"):
        pipe(**call_kwargs(rlg_scale=1.5, rlg_start=0.8, rlg_stop=0.2))
    with pytest.raises(ValueError, match="must be a float"):
        pipe(**call_kwargs(rlg_scale="1.5"))
    pipe.disable_lora()
    for scale in (1.5, {"default": 1.5}):
        with pytest.raises(ValueError, match="disabled"):
            pipe(**call_kwargs(rlg_scale=scale))
    pipe.enable_lora()
    with pytest.raises(ValueError, match="cannot be used with `aligned_transformer`"):
        make(StableDiffusion3RLGPipeline, base_components, aligned_transformer=lora_components["transformer"])(
            **call_kwargs(rlg_scale={"default": 1.0})
        )


# --- pipeline plumbing ----------------------------------------------------------------------------------------


def test_custom_pipeline_from_pipe_and_save_load(base_components, tmp_path):
    aligned_transformer = perturbed_unet(base_components["transformer"])
    expected = make(StableDiffusion3RLGPipeline, base_components, aligned_transformer=aligned_transformer)(
        **call_kwargs(rlg_scale=1.6)
    ).images

    # a plain SD3 folder (with its T5) loads as a community pipeline, offline, without an aligned transformer
    make(StableDiffusion3Pipeline, base_components).save_pretrained(str(tmp_path / "sd3"), safe_serialization=True)
    custom = DiffusionPipeline.from_pretrained(
        str(tmp_path / "sd3"), custom_pipeline=os.path.abspath(PIPELINE_FILE), trust_remote_code=True
    )
    custom.set_progress_bar_config(disable=True)
    assert type(custom).__name__ == "StableDiffusion3RLGPipeline" and custom.aligned_transformer is None
    custom.register_modules(aligned_transformer=aligned_transformer)
    np.testing.assert_allclose(custom(**call_kwargs(rlg_scale=1.6)).images, expected, atol=1e-5)

    from_pipe = StableDiffusion3RLGPipeline.from_pipe(
        make(StableDiffusion3Pipeline, base_components), aligned_transformer=aligned_transformer
    )
    np.testing.assert_allclose(from_pipe(**call_kwargs(rlg_scale=1.6)).images, expected, atol=1e-5)

    custom.save_pretrained(str(tmp_path / "rlg"), safe_serialization=True)
    loaded = StableDiffusion3RLGPipeline.from_pretrained(str(tmp_path / "rlg"))
    loaded.set_progress_bar_config(disable=True)
    assert loaded.aligned_transformer is not None
    np.testing.assert_allclose(loaded(**call_kwargs(rlg_scale=1.6)).images, expected, atol=1e-5)


def test_outputs_and_callbacks(lora_components):
    pipe = make(StableDiffusion3RLGPipeline, lora_components)
    kwargs = {"rlg_scale": 1.6, "num_inference_steps": 2, "max_sequence_length": MAX_SEQUENCE_LENGTH}

    pil = pipe(PROMPT, generator=gen(), **kwargs).images
    assert len(pil) == 1 and pil[0].size == (16, 16)
    assert pipe(PROMPT, generator=gen(), output_type="pt", **kwargs).images.shape == (1, 3, 16, 16)
    assert pipe(PROMPT, generator=gen(), output_type="latent", **kwargs).images.shape == (1, 4, 8, 8)
    (images,) = pipe(PROMPT, generator=gen(), output_type="np", return_dict=False, **kwargs)
    assert images.shape == (1, 16, 16, 3)

    # two prompts x two images, one generator per image: each image depends only on its own generator
    batch = pipe(
        [PROMPT, "a dog"], num_images_per_prompt=2, generator=[gen(s) for s in range(4)], output_type="np", **kwargs
    ).images
    single = pipe("a dog", generator=gen(2), output_type="np", **kwargs).images
    assert batch.shape == (4, 16, 16, 3)
    np.testing.assert_allclose(batch[2], single[0], atol=ATOL)

    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append((step, sorted(callback_kwargs), pipeline.rlg_scale, pipeline.do_rlg))
        pipeline._rlg_scale = 0.5  # from the next step on
        if step == 1:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs

    inputs = ["latents", "pooled_prompt_embeds", "prompt_embeds"]
    latents = pipe(
        PROMPT,
        generator=gen(),
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=inputs,
        **{**kwargs, "rlg_scale": 1.0},
    ).images
    assert seen == [(0, inputs, 1.0, False), (1, inputs, 0.5, True)]
    assert torch.count_nonzero(latents) == 0
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(PROMPT, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise_pred"], **kwargs)
