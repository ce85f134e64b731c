"""FluxRLGPipeline on tiny FLUX.1 components: identities against FluxPipeline (w = 0 the base, w = 1 the LoRA or the
aligned transformer), a hand-written flow-matching RLG loop with FLUX's embedded guidance (and true CFG inside each
model), one batched forward equal to one forward per model, schedules, callbacks and community-pipeline loading."""

import copy
import inspect
import os

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from peft import LoraConfig

from diffalign.pipelines import FluxRLGPipeline
from diffalign.testing import perturbed_unet, tiny_flux_components

HERE = os.path.dirname(os.path.abspath(__file__))
PIPELINE_FILE = os.path.join(HERE, "..", "pipelines", "pipeline_flux_rlg.py")
PROMPT = "a photo of a cat"
STEPS = 3
SIZE = 16
MAX_SEQUENCE_LENGTH = 16
ATOL = 1e-4


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def add_lora(transformer, adapter_name="default", seed=0, std=0.1):
    """A LoRA adapter with random (non-zero) B weights on both streams and the single-stream blocks."""
    config = LoraConfig(
        r=4,
        lora_alpha=4,
        init_lora_weights="gaussian",
        target_modules=["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "proj_out"],
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
        "guidance_scale": 3.5,
        "height": SIZE,
        "width": SIZE,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "output_type": "np",
        "generator": gen(),
        **kwargs,
    }


TRUE_CFG = {"true_cfg_scale": 3.0, "negative_prompt": "a dog"}


@pytest.fixture(scope="module")
def base_components():
    return tiny_flux_components()


@pytest.fixture
def lora_components(base_components):
    return {**base_components, "transformer": add_lora(copy.deepcopy(base_components["transformer"]))}


def transformer_velocity(transformer):
    def velocity(x, t, guidance, embeds, pooled, txt_ids, img_ids):
        return transformer(
            hidden_states=x,
            timestep=t.expand(x.shape[0]) / 1000,
            guidance=guidance.expand(x.shape[0]),
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
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


def hand_rlg_latents(pipe, velocities, weights, guidance_scale=3.5, true_cfg=None):
    """A plain flow-matching Euler loop on FLUX's packed latents with `v = v_base + sum_i w_i (v_i - v_base)`, the
    embedded guidance given to every model and true CFG (`true_cfg`: `(scale, negative prompt)`) inside each.

    `velocities` maps "base" and each name in `weights` to `(x, t, guidance, embeds, pooled, txt_ids, img_ids) -> v`.
    """
    embeds, pooled, txt_ids = pipe.encode_prompt(PROMPT, device="cpu", max_sequence_length=MAX_SEQUENCE_LENGTH)
    if true_cfg is not None:
        negative, negative_pooled, _ = pipe.encode_prompt(
            true_cfg[1], device="cpu", max_sequence_length=MAX_SEQUENCE_LENGTH
        )
        embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
    latents, img_ids = pipe.prepare_latents(1, 4, SIZE, SIZE, embeds.dtype, "cpu", gen())
    scheduler = copy.deepcopy(pipe.scheduler)
    sigmas = np.linspace(1.0, 1 / STEPS, STEPS)  # FLUX's sigmas, shifted by mu of the sequence length
    scheduler.set_timesteps(sigmas=sigmas, mu=calculate_shift(latents.shape[1], 256, 4096, 0.5, 1.15))
    guidance = torch.tensor([guidance_scale])
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            guided = {}
            for name, velocity in velocities.items():
                x = torch.cat([latents] * 2) if true_cfg is not None else latents
                v = velocity(x, t, guidance, embeds, pooled, txt_ids, img_ids)
                if true_cfg is not None:
                    uncond, cond = v.chunk(2)
                    v = uncond + true_cfg[0] * (cond - uncond)
                guided[name] = v
            w_at = {name: (w(i) if callable(w) else w) for name, w in weights.items()}
            v = guided["base"] + sum(w * (guided[name] - guided["base"]) for name, w in w_at.items())
            latents = latents + (scheduler.sigmas[i + 1] - scheduler.sigmas[i]) * v
    return latents


def test_call_signature_extends_flux():
    flux_params = inspect.signature(FluxPipeline.__call__).parameters
    rlg_params = inspect.signature(FluxRLGPipeline.__call__).parameters
    for name, param in flux_params.items():  # same names, same defaults
        assert rlg_params[name].default == param.default, name
    assert {"rlg_scale", "rlg_start", "rlg_stop", "rlg_single_pass"} <= set(rlg_params)


# --- LoRA aligned model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [{}, TRUE_CFG], ids=["embedded-guidance", "true-cfg"])
def test_lora_identities_formula_and_single_pass(base_components, lora_components, cfg):
    pipe = make(FluxRLGPipeline, lora_components)
    base = make(FluxPipeline, base_components)(**call_kwargs(**cfg)).images
    aligned = make(FluxPipeline, lora_components)(**call_kwargs(**cfg)).images
    assert np.abs(base - aligned).max() > 1e-2  # the adapter changes the model

    np.testing.assert_allclose(pipe(**call_kwargs(rlg_scale=0.0, **cfg)).images, base, atol=ATOL)
    for single_pass in (True, False):
        images = pipe(**call_kwargs(rlg_scale=1.0, rlg_single_pass=single_pass, **cfg)).images
        np.testing.assert_allclose(images, aligned, atol=ATOL)

    rows = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    single = pipe(**call_kwargs(rlg_scale=1.6, output_type="latent", **cfg)).images
    double = pipe(**call_kwargs(rlg_scale=1.6, output_type="latent", rlg_single_pass=False, **cfg)).images
    handle.remove()
    per_model = 2 if cfg else 1  # true CFG: the negative and positive rows of each model in one batch
    assert rows == [2 * per_model] * STEPS + [per_model] * (2 * STEPS)  # base + aligned in one forward, or one each
    torch.testing.assert_close(single, double, atol=ATOL, rtol=0)

    transformer = pipe.transformer
    velocities = {"base": adapters_off_velocity(transformer), "aligned": transformer_velocity(transformer)}
    true_cfg = (cfg["true_cfg_scale"], cfg["negative_prompt"]) if cfg else None
    expected = hand_rlg_latents(pipe, velocities, {"aligned": 1.6}, true_cfg=true_cfg)
    torch.testing.assert_close(single, expected, atol=ATOL, rtol=0)

    # the embedded guidance is an input of both models: another value, other images (as in FluxPipeline)
    other = pipe(**call_kwargs(rlg_scale=1.6, output_type="latent", guidance_scale=1.0, **cfg)).images
    assert (other - single).abs().max() > 1e-4
    expected = hand_rlg_latents(pipe, velocities, {"aligned": 1.6}, guidance_scale=1.0, true_cfg=true_cfg)
    torch.testing.assert_close(other, expected, atol=ATOL, rtol=0)


def test_full_weight_aligned_transformer(base_components):
    aligned_transformer = perturbed_unet(base_components["transformer"])  # any model: a noisy copy of the weights
    pipe = make(FluxRLGPipeline, base_components, aligned_transformer=aligned_transformer)
    base = make(FluxPipeline, base_components)(**call_kwargs()).images
    aligned = make(FluxPipeline, {**base_components, "transformer": aligned_transformer})(**call_kwargs()).images
    assert np.abs(base - aligned).max() > 1e-2
    np.testing.assert_allclose(pipe(**call_kwargs(rlg_scale=0.0)).images, base, atol=ATOL)
    np.testing.assert_allclose(pipe(**call_kwargs(rlg_scale=1.0)).images, aligned, atol=ATOL)

    velocities = {"base": transformer_velocity(pipe.transformer), "aligned": transformer_velocity(aligned_transformer)}
    expected = hand_rlg_latents(pipe, velocities, {"aligned": lambda i: [2.4, 1.6, 0.5][i]})
    latents = pipe(**call_kwargs(rlg_scale=[2.4, 1.6, 0.5], output_type="latent")).images
    torch.testing.assert_close(latents, expected, atol=ATOL, rtol=0)


def test_schedules_window_and_adapter_mix(lora_components):
    pipe = make(FluxRLGPipeline, lora_components)
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
    from peft.utils import get_peft_model_state_dict

    FluxPipeline.save_lora_weights(
        str(tmp_path), transformer_lora_layers=get_peft_model_state_dict(lora_components["transformer"])
    )
    base = make(FluxPipeline, base_components)(**call_kwargs()).images
    reference = make(FluxPipeline, copy.deepcopy(base_components))
    reference.load_lora_weights(str(tmp_path))
    aligned = reference(**call_kwargs()).images

    pipe = make(FluxRLGPipeline, copy.deepcopy(base_components))
    with pytest.raises(ValueError, match="needs an aligned model"):
        pipe(**call_kwargs(rlg_scale=1.6))
    pipe.load_lora_weights(str(tmp_path))
    np.testing.assert_allclose(pipe(**call_kwargs(rlg_scale=0.0)).images, base, atol=ATOL)
    np.testing.assert_allclose(pipe(**call_kwargs(rlg_scale=1.0)).images, aligned, atol=ATOL)

    # fused: the default scale runs like diffusers; RLG needs the base weights back
    pipe.fuse_lora()
    np.testing.assert_allclose(pipe(**call_kwargs()).images, aligned, atol=ATOL)
    with pytest.raises(ValueError, match=r"fused into `transformer`"):
        pipe(**call_kwargs(rlg_scale=1.6))


def test_errors(base_components, lora_components):
    plain = make(FluxRLGPipeline, base_components)
    with pytest.raises(ValueError, match="no `aligned_transformer` and no LoRA adapter on `transformer`"):
        plain(**call_kwargs(rlg_scale=1.5))
    pipe = make(FluxRLGPipeline, lora_components)
    with pytest.raises(ValueError, match=r"Unknown LoRA adapter\(s\) \['typo'\]"):
        pipe(**call_kwargs(rlg_scale={"typo": 1.0}))
    with pytest.raises(ValueError, match="has 2 values, but the sampler runs 3 steps"):
        pipe(**call_kwargs(rlg_scale=[1.0, 2.0]))
    with pytest.raises(ValueError, match="rlg_start"):
        pipe(**call_kwargs(rlg_scale=1.5, rlg_start=0.8, rlg_stop=0.2))
    with pytest.raises(ValueError, match="IP-Adapter"):
        pipe(**call_kwargs(rlg_scale=1.5, ip_adapter_image_embeds=[torch.zeros(1, 1, 4)]))
    pipe.disable_lora()
    with pytest.raises(ValueError, match="disabled"):
        pipe(**call_kwargs(rlg_scale=1.5))


# --- pipeline plumbing ----------------------------------------------------------------------------------------


def test_custom_pipeline_from_pipe_and_save_load(base_components, tmp_path):
    aligned_transformer = perturbed_unet(base_components["transformer"])
    expected = make(FluxRLGPipeline, base_components, aligned_transformer=aligned_transformer)(
        **call_kwargs(rlg_scale=1.6)
    ).images

    # a plain FLUX folder loads as a community pipeline, offline, without an aligned transformer
    make(FluxPipeline, base_components).save_pretrained(str(tmp_path / "flux"), safe_serialization=True)
    custom = DiffusionPipeline.from_pretrained(
        str(tmp_path / "flux"), custom_pipeline=os.path.abspath(PIPELINE_FILE), trust_remote_code=True
    )
    custom.set_progress_bar_config(disable=True)
    assert type(custom).__name__ == "FluxRLGPipeline" and custom.aligned_transformer is None
    custom.register_modules(aligned_transformer=aligned_transformer)
    np.testing.assert_allclose(custom(**call_kwargs(rlg_scale=1.6)).images, expected, atol=1e-5)

    from_pipe = FluxRLGPipeline.from_pipe(make(FluxPipeline, base_components), aligned_transformer=aligned_transformer)
    np.testing.assert_allclose(from_pipe(**call_kwargs(rlg_scale=1.6)).images, expected, atol=1e-5)

    custom.save_pretrained(str(tmp_path / "rlg"), safe_serialization=True)
    loaded = FluxRLGPipeline.from_pretrained(str(tmp_path / "rlg"))
    loaded.set_progress_bar_config(disable=True)
    assert loaded.aligned_transformer is not None
    np.testing.assert_allclose(loaded(**call_kwargs(rlg_scale=1.6)).images, expected, atol=1e-5)


def test_outputs_and_callbacks(lora_components):
    pipe = make(FluxRLGPipeline, lora_components)
    kwargs = {
        "rlg_scale": 1.6,
        "num_inference_steps": 2,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "height": SIZE,
        "width": SIZE,
    }

    pil = pipe(PROMPT, generator=gen(), **kwargs).images
    assert len(pil) == 1 and pil[0].size == (SIZE, SIZE)
    assert pipe(PROMPT, generator=gen(), output_type="pt", **kwargs).images.shape == (1, 3, SIZE, SIZE)
    assert pipe(PROMPT, generator=gen(), output_type="latent", **kwargs).images.shape == (1, 16, 16)  # packed
    (images,) = pipe(PROMPT, generator=gen(), output_type="np", return_dict=False, **kwargs)
    assert images.shape == (1, SIZE, SIZE, 3)

    # two prompts x two images, one generator per image: each image depends only on its own generator
    batch = pipe(
        [PROMPT, "a dog"], num_images_per_prompt=2, generator=[gen(s) for s in range(4)], output_type="np", **kwargs
    ).images
    single = pipe("a dog", generator=gen(2), output_type="np", **kwargs).images
    assert batch.shape == (4, SIZE, SIZE, 3)
    np.testing.assert_allclose(batch[2], single[0], atol=ATOL)

    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append((step, sorted(callback_kwargs), pipeline.rlg_scale, pipeline.do_rlg))
        pipeline._rlg_scale = 0.5  # from the next step on
        if step == 1:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs

    inputs = ["latents", "prompt_embeds"]
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

    # prompt embeddings replaced by the callback condition every model from the next step on
    other_embeds = pipe.encode_prompt("a dog", device="cpu", max_sequence_length=MAX_SEQUENCE_LENGTH)[0]

    def swap(pipeline, step, timestep, callback_kwargs):
        return {"prompt_embeds": other_embeds} if step == 0 else {}

    swapped = pipe(
        PROMPT,
        generator=gen(),
        output_type="latent",
        callback_on_step_end=swap,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
        **kwargs,
    ).images
    plain = pipe(PROMPT, generator=gen(), output_type="latent", **kwargs).images
    assert (swapped - plain).abs().max() > 1e-4
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(PROMPT, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise_pred"], **kwargs)
