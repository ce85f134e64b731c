"""StableDiffusionRLGPipeline: exact identities against Stable Diffusion and a hand-written RLG loop, tiny components."""

import copy
import inspect
import os

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from diffalign.pipelines import StableDiffusionRLGPipeline
from diffalign.testing import perturbed_unet, tiny_sd_components

PIPELINE_FILE = os.path.join(os.path.dirname(__file__), "..", "pipelines", "pipeline_stable_diffusion_rlg.py")
PROMPT = "a photo of a cat"
STEPS = 3
ATOL = 1e-4


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def add_lora(unet, adapter_name="default", seed=0, std=0.1):
    """Adds a LoRA adapter with random (non-zero) B weights, so that it changes the model."""
    config = LoraConfig(
        r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    unet.add_adapter(config, adapter_name=adapter_name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if f"lora_B.{adapter_name}." in name:
                param.copy_(std * torch.randn(param.shape, generator=generator))
    return unet


def rlg_pipe(components, **kwargs):
    pipe = StableDiffusionRLGPipeline(**components, **kwargs, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_pipe(components):
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(**kwargs):
    return {"prompt": PROMPT, "num_inference_steps": STEPS, "output_type": "np", "generator": gen(), **kwargs}


@pytest.fixture
def components():
    return tiny_sd_components()


@pytest.fixture
def lora_components():
    components = tiny_sd_components()
    add_lora(components["unet"])
    return components


def hand_rlg_latents(pipe, eps_models, weights, guidance_scale=5.0, steps=STEPS, seed=0):
    """A plain DDIM loop with `pred = pred_base + sum_i w_i (pred_i - pred_base)`, CFG inside each model.

    `eps_models` maps "base" and each name in `weights` to a function `(x, t, embeds) -> eps`.
    """
    prompt_embeds, negative_embeds = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    embeds = torch.cat([negative_embeds, prompt_embeds])
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    latents = pipe.prepare_latents(1, 4, 32, 32, embeds.dtype, "cpu", gen(seed))
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            guided = {}
            for name, model in eps_models.items():
                uncond, cond = model(torch.cat([latents] * 2), t, embeds).chunk(2)
                guided[name] = uncond + guidance_scale * (cond - uncond)
            w_at = {name: (w(i) if callable(w) else w) for name, w in weights.items()}
            pred = guided["base"] + sum(w * (guided[name] - guided["base"]) for name, w in w_at.items())
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return latents


def unet_eps(unet):
    return lambda x, t, embeds: unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]


def test_call_signature_extends_stable_diffusion():
    sd_params = set(inspect.signature(StableDiffusionPipeline.__call__).parameters)
    rlg_params = set(inspect.signature(StableDiffusionRLGPipeline.__call__).parameters)
    assert sd_params <= rlg_params
    assert {"rlg_scale", "rlg_start", "rlg_stop", "rlg_single_pass"} <= rlg_params


# --- full-weight aligned UNet -----------------------------------------------------------------------------------


def test_full_weight_identities_and_formula(components):
    aligned = perturbed_unet(components["unet"])
    pipe = rlg_pipe(components, aligned_unet=aligned)
    base_images = sd_pipe(components)(**call_kwargs()).images
    aligned_images = sd_pipe({**components, "unet": aligned})(**call_kwargs()).images
    assert np.abs(base_images - aligned_images).max() > 1e-2  # the two models differ

    np.testing.assert_allclose(pipe(**call_kwargs(rlg_scale=0.0)).images, base_images, atol=ATOL)
    np.testing.assert_allclose(pipe(**call_kwargs(rlg_scale=1.0)).images, aligned_images, atol=ATOL)

    # guidance_rescale acts inside each model, so the identities hold with it too
    rescaled = sd_pipe(components)(**call_kwargs(guidance_rescale=0.7)).images
    np.testing.assert_allclose(pipe(**call_kwargs(rlg_scale=0.0, guidance_rescale=0.7)).images, rescaled, atol=ATOL)

    expected = hand_rlg_latents(pipe, {"base": unet_eps(pipe.unet), "aligned": unet_eps(aligned)}, {"aligned": 1.7})
    latents = pipe(**call_kwargs(rlg_scale=1.7, guidance_scale=5.0, output_type="latent")).images
    torch.testing.assert_close(latents, expected, atol=ATOL, rtol=0)


# --- LoRA aligned model ---------------------------------------------------------------------------------------


def test_lora_identities(lora_components):
    pipe = rlg_pipe(lora_components)
    base_components = {**lora_components, "unet": tiny_sd_components()["unet"]}  # same seed: the weights before LoRA
    base_images = sd_pipe(base_components)(**call_kwargs()).images
    np.testing.assert_allclose(pipe(**call_kwargs(rlg_scale=0.0)).images, base_images, atol=ATOL)

    fused = sd_pipe({**lora_components, "unet": copy.deepcopy(lora_components["unet"])})
    fused.fuse_lora()
    fused_images = fused(**call_kwargs()).images
    assert np.abs(base_images - fused_images).max() > 1e-2  # the adapter changes the model
    for single_pass in (True, False):
        images = pipe(**call_kwargs(rlg_scale=1.0, rlg_single_pass=single_pass)).images
        np.testing.assert_allclose(images, fused_images, atol=ATOL)


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_lora_single_pass_matches_two_pass_and_formula(lora_components, guidance_scale):
    pipe = rlg_pipe(lora_components)
    unet = pipe.unet
    rows = []
    handle = unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    kwargs = call_kwargs(rlg_scale=1.5, guidance_scale=guidance_scale, output_type="latent")
    single = pipe(**{**kwargs, "generator": gen()}, rlg_single_pass=True).images
    single_rows, rows[:] = list(rows), []
    double = pipe(**{**kwargs, "generator": gen()}, rlg_single_pass=False).images
    double_rows = list(rows)
    handle.remove()

    cfg_rows = 2 if guidance_scale > 1 else 1
    assert single_rows == [2 * cfg_rows] * STEPS  # base and aligned (with CFG) in one forward per step
    assert double_rows == [cfg_rows] * (2 * STEPS)
    torch.testing.assert_close(single, double, atol=ATOL, rtol=0)

    if guidance_scale > 1:  # the formula, with the adapter toggled through diffusers' public API

        def base_eps(x, t, embeds):
            unet.disable_lora()
            try:
                return unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
            finally:
                unet.enable_lora()

        expected = hand_rlg_latents(pipe, {"base": base_eps, "aligned": unet_eps(unet)}, {"aligned": 1.5})
        torch.testing.assert_close(single, expected, atol=ATOL, rtol=0)


def test_bfloat16(lora_components):
    pipe = rlg_pipe(lora_components).to(torch.bfloat16)
    kwargs = call_kwargs(rlg_scale=1.5, output_type="latent", num_inference_steps=2)
    single = pipe(**kwargs).images
    double = pipe(**{**kwargs, "generator": gen()}, rlg_single_pass=False).images
    assert single.dtype == torch.bfloat16 and torch.isfinite(single.float()).all()
    torch.testing.assert_close(single.float(), double.float(), atol=5e-2, rtol=0)


def test_load_lora_weights_user_path(lora_components, tmp_path):
    """A LoRA saved like the trainers save it loads with `load_lora_weights` and gives the in-memory results."""
    from diffusers.utils import convert_state_dict_to_diffusers

    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path),
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(lora_components["unet"])),
        safe_serialization=True,
    )
    expected = rlg_pipe(lora_components)(**call_kwargs(rlg_scale=1.5)).images

    pipe = rlg_pipe(tiny_sd_components())
    with pytest.raises(ValueError, match="needs an aligned model"):
        pipe(**call_kwargs(rlg_scale=1.5))
    pipe.load_lora_weights(str(tmp_path), adapter_name="reward")
    np.testing.assert_allclose(pipe(**call_kwargs(rlg_scale=1.5)).images, expected, atol=ATOL)


def test_multi_adapter_mix(lora_components):
    unet = lora_components["unet"]
    add_lora(unet, "other", seed=1)
    pipe = rlg_pipe(lora_components)
    weights = {"default": 1.2, "other": lambda i: 0.5 * i}

    def adapter_eps(name):
        def eps(x, t, embeds):
            active = unet.active_adapters()
            unet.set_adapters([name])
            try:
                return unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
            finally:
                unet.set_adapters(active)

        return eps

    def base_eps(x, t, embeds):
        unet.disable_lora()
        try:
            return unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
        finally:
            unet.enable_lora()

    eps = {"base": base_eps, "default": adapter_eps("default"), "other": adapter_eps("other")}
    expected = hand_rlg_latents(pipe, eps, weights)
    for single_pass in (True, False):
        latents = pipe(
            **call_kwargs(rlg_scale=weights, guidance_scale=5.0, output_type="latent", rlg_single_pass=single_pass)
        ).images
        torch.testing.assert_close(latents, expected, atol=ATOL, rtol=0)


def test_schedules_and_window(lora_components):
    pipe = rlg_pipe(lora_components)
    kwargs = call_kwargs(output_type="latent", num_inference_steps=4)

    def run(**extra):
        return pipe(**{**kwargs, "generator": gen(), **extra}).images

    constant = run(rlg_scale=1.5)
    torch.testing.assert_close(run(rlg_scale=[1.5] * 4), constant, atol=1e-6, rtol=0)
    torch.testing.assert_close(run(rlg_scale=lambda i: 1.5), constant, atol=1e-6, rtol=0)
    torch.testing.assert_close(run(rlg_scale={"default": [1.5] * 4}), constant, atol=1e-6, rtol=0)

    # outside [rlg_start, rlg_stop) the aligned model runs alone (plain CFG rows), i.e. w = 1
    rows = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    windowed = run(rlg_scale=2.0, rlg_start=0.5)
    handle.remove()
    assert rows == [2, 2, 4, 4]
    torch.testing.assert_close(windowed, run(rlg_scale=[1.0, 1.0, 2.0, 2.0]), atol=1e-6, rtol=0)
    assert not torch.allclose(windowed, run(rlg_scale=2.0), atol=1e-3)


def test_rlg_scale_callback_changes_scale(lora_components):
    pipe = rlg_pipe(lora_components)
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append((pipeline.rlg_scale, pipeline.do_rlg))
        pipeline._rlg_scale = 0.5
        return callback_kwargs

    latents = pipe(**call_kwargs(rlg_scale=2.0, output_type="latent", callback_on_step_end=callback)).images
    assert seen == [(2.0, True), (0.5, True), (0.5, True)]
    torch.testing.assert_close(
        latents, pipe(**call_kwargs(rlg_scale=[2.0, 0.5, 0.5], output_type="latent")).images, atol=1e-6, rtol=0
    )


def test_text_encoder_lora(tmp_path):
    """A LoRA that also adapts the text encoder: the base model gets the prompt encoded without it."""
    from diffusers.utils import convert_state_dict_to_diffusers

    components = tiny_sd_components()
    add_lora(components["unet"])
    text_encoder = components["text_encoder"]
    text_encoder_lora = LoraConfig(
        r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["q_proj", "v_proj"]
    )
    inject_adapter_in_model(text_encoder_lora, text_encoder)
    with torch.no_grad():
        for name, param in text_encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path),
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(components["unet"])),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder)),
    )
    base = sd_pipe(tiny_sd_components())(**call_kwargs()).images
    with_lora = sd_pipe(tiny_sd_components())
    with_lora.load_lora_weights(str(tmp_path))
    aligned = with_lora(**call_kwargs()).images

    pipe = rlg_pipe(tiny_sd_components())
    pipe.load_lora_weights(str(tmp_path))
    np.testing.assert_allclose(pipe(**call_kwargs(rlg_scale=0.0)).images, base, atol=ATOL)
    np.testing.assert_allclose(pipe(**call_kwargs(rlg_scale=1.0)).images, aligned, atol=ATOL)
    half = pipe(**call_kwargs(rlg_scale=0.5)).images
    assert np.abs(half - base).max() > 1e-3 and np.abs(half - aligned).max() > 1e-3


def count_forwards(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls, handle


def test_text_encoder_lora_fused_or_dora_at_default_scale(tmp_path):
    """Regression: a fused (or DoRA) text-encoder LoRA runs at the default `rlg_scale=1` like diffusers' pipeline, the
    text encoder runs as often as there, and `rlg_scale != 1` with a fused one raises one clear error."""
    test_text_encoder_lora(tmp_path)  # writes the unet + text encoder LoRA to tmp_path
    fused_sd = sd_pipe(tiny_sd_components())
    fused_sd.load_lora_weights(str(tmp_path))
    fused_sd.fuse_lora()
    sd_calls, handle = count_forwards(fused_sd.text_encoder)
    expected = fused_sd(**call_kwargs()).images
    handle.remove()

    pipe = rlg_pipe(tiny_sd_components())
    pipe.load_lora_weights(str(tmp_path))
    pipe.fuse_lora()
    calls, handle = count_forwards(pipe.text_encoder)
    np.testing.assert_allclose(pipe(**call_kwargs()).images, expected, atol=ATOL)
    handle.remove()
    assert len(calls) == len(sd_calls) == 2  # prompt and negative prompt, once each
    with pytest.raises(ValueError, match=r"fused into `unet`, `text_encoder`.*unfuse_lora"):
        pipe(**call_kwargs(rlg_scale=1.5))
    pipe.unfuse_lora()
    pipe(**call_kwargs(rlg_scale=1.5))  # runs again

    # DoRA adapters on the UNet and the text encoder: the default scale runs like diffusers, and RLG runs the DoRA
    # aligned model in its own pass (peft cannot select DoRA per row), the base with the adapters off
    components = tiny_sd_components()
    dora = LoraConfig(r=4, lora_alpha=4, use_dora=True, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])
    components["unet"].add_adapter(dora)
    inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=4, use_dora=True, init_lora_weights="gaussian", target_modules=["q_proj"]),
        components["text_encoder"],
    )
    with torch.no_grad():
        for model in (components["unet"], components["text_encoder"]):
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    reference = sd_pipe(components)
    calls, handle = count_forwards(components["text_encoder"])
    aligned = reference(**call_kwargs()).images
    reference.disable_lora()
    base = reference(**call_kwargs()).images
    reference.enable_lora()
    assert np.abs(aligned - base).max() > 1e-2
    pipe = rlg_pipe(components)
    np.testing.assert_allclose(pipe(**call_kwargs()).images, aligned, atol=ATOL)
    assert len(calls) == 2 * 2 + 2  # 2 per call: the two reference calls and RLG's at rlg_scale=1
    handle.remove()
    np.testing.assert_allclose(pipe(**call_kwargs(rlg_scale=0.0)).images, base, atol=ATOL)
    single = pipe(**call_kwargs(rlg_scale=1.5, output_type="latent")).images
    double = pipe(**call_kwargs(rlg_scale=1.5, output_type="latent", rlg_single_pass=False)).images
    torch.testing.assert_close(single, double, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"\['default'\] use DoRA"):
        pipe(**call_kwargs(rlg_scale={"default": 1.5}))


# --- errors ---------------------------------------------------------------------------------------------------


def test_errors(components, lora_components):
    plain = rlg_pipe(components)
    for scale in (0.0, 1.5, [1.0] * STEPS, lambda i: 1.0):
        with pytest.raises(ValueError, match="needs an aligned model"):
            plain(**call_kwargs(rlg_scale=scale))
    with pytest.raises(ValueError, match="Unknown LoRA adapter"):
        plain(**call_kwargs(rlg_scale={"default": 1.0}))

    pipe = rlg_pipe(lora_components)
    with pytest.raises(ValueError, match=r"Unknown LoRA adapter\(s\) \['typo'\]"):
        pipe(**call_kwargs(rlg_scale={"typo": 1.0}))
    with pytest.raises(ValueError, match="has 2 values, but the sampler runs 3 steps"):
        pipe(**call_kwargs(rlg_scale=[1.0, 2.0]))
    with pytest.raises(ValueError, match=r"`rlg_scale\['default'\]` has 4 values"):
        pipe(**call_kwargs(rlg_scale={"default": [1.0] * 4}))
    with pytest.raises(ValueError, match="rlg_start"):
        pipe(**call_kwargs(rlg_scale=1.5, rlg_start=0.8, rlg_stop=0.2))
    with pytest.raises(ValueError, match="must be a float"):
        pipe(**call_kwargs(rlg_scale="1.5"))

    pipe.disable_lora()
    with pytest.raises(ValueError, match="disabled"):
        pipe(**call_kwargs(rlg_scale=1.5))
    pipe.enable_lora()
    pipe.fuse_lora()
    with pytest.raises(ValueError, match="fused"):
        pipe(**call_kwargs(rlg_scale=1.5))

    with pytest.raises(ValueError, match="cannot be used with `aligned_unet`"):
        rlg_pipe(components, aligned_unet=perturbed_unet(components["unet"]))(**call_kwargs(rlg_scale={"a": 1.0}))


# --- pipeline plumbing ----------------------------------------------------------------------------------------


def test_save_load_round_trip_and_custom_pipeline(components, tmp_path):
    aligned = perturbed_unet(components["unet"])
    pipe = rlg_pipe(components, aligned_unet=aligned)
    expected = pipe(**call_kwargs(rlg_scale=1.5)).images

    pipe.save_pretrained(str(tmp_path / "rlg"), safe_serialization=True)
    loaded = StableDiffusionRLGPipeline.from_pretrained(str(tmp_path / "rlg"))
    loaded.set_progress_bar_config(disable=True)
    assert loaded.aligned_unet is not None
    np.testing.assert_allclose(loaded(**call_kwargs(rlg_scale=1.5)).images, expected, atol=1e-5)

    # a plain Stable Diffusion folder loads as a community pipeline, offline, without an aligned UNet
    sd_pipe(components).save_pretrained(str(tmp_path / "sd"), safe_serialization=True)
    custom = DiffusionPipeline.from_pretrained(
        str(tmp_path / "sd"), custom_pipeline=os.path.abspath(PIPELINE_FILE), trust_remote_code=True
    )
    custom.set_progress_bar_config(disable=True)
    assert type(custom).__name__ == "StableDiffusionRLGPipeline" and custom.aligned_unet is None
    base = custom(**call_kwargs()).images
    custom.register_modules(aligned_unet=aligned)  # a component can be added afterwards
    np.testing.assert_allclose(custom(**call_kwargs(rlg_scale=1.5)).images, expected, atol=1e-5)

    from_pipe = StableDiffusionRLGPipeline.from_pipe(sd_pipe(components), aligned_unet=aligned)
    np.testing.assert_allclose(from_pipe(**call_kwargs(rlg_scale=1.5)).images, expected, atol=1e-5)
    assert base.shape == expected.shape


def test_outputs_batching_and_callbacks(lora_components):
    pipe = rlg_pipe(lora_components)
    kwargs = {"rlg_scale": 1.5, "num_inference_steps": 2}

    pil = pipe(PROMPT, generator=gen(), **kwargs).images
    assert len(pil) == 1 and pil[0].size == (32, 32)
    pt = pipe(PROMPT, generator=gen(), output_type="pt", **kwargs).images
    assert pt.shape == (1, 3, 32, 32)
    latent = pipe(PROMPT, generator=gen(), output_type="latent", **kwargs).images
    assert latent.shape == (1, 4, 16, 16)
    images, nsfw = pipe(PROMPT, generator=gen(), output_type="np", return_dict=False, **kwargs)
    assert images.shape == (1, 32, 32, 3) and nsfw is None

    # two prompts x two images, with one generator per image: each image depends only on its own generator
    batch = pipe(
        [PROMPT, "a dog"], num_images_per_prompt=2, generator=[gen(s) for s in range(4)], output_type="np", **kwargs
    ).images
    assert batch.shape == (4, 32, 32, 3)
    single = pipe("a dog", generator=gen(2), output_type="np", **kwargs).images
    np.testing.assert_allclose(batch[2], single[0], atol=ATOL)

    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append((step, sorted(callback_kwargs)))
        if step == 1:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs

    latents = pipe(
        PROMPT,
        generator=gen(),
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        **kwargs,
    ).images
    assert seen == [(0, ["latents", "prompt_embeds"]), (1, ["latents", "prompt_embeds"])]
    assert torch.count_nonzero(latents) == 0
