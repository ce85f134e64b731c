"""Sampling denoising trajectories with per-step log-probabilities through a pipeline's own components.

The loop uses only public pipeline API (`encode_prompt`, `prepare_latents`, `scheduler.set_timesteps`, the UNet
and the VAE), so any Stable-Diffusion-style `DiffusionPipeline` works, and the same function serves SD1.5 on a
GPU and the tiny test models.
"""

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from .logprob import ddim_step_mean_std, ddim_step_with_logprob, gaussian_kl, gaussian_log_prob


@dataclass
class Trajectories:
    """A batch of B sampled trajectories of T denoising steps.

    Attributes:
        prompts (`List[str]`): the B prompts.
        group_ids (`torch.LongTensor`): `(B,)`, equal for samples of the same prompt.
        prompt_embeds (`torch.Tensor`): `(B, L, D)` text-encoder states of the prompts.
        negative_prompt_embeds (`torch.Tensor` or `None`): `(B, L, D)`, `None` when sampled without CFG.
        latents (`torch.Tensor`): `(B, T + 1, C, h, w)`, `x_T, ..., x_0`.
        timesteps (`torch.LongTensor`): `(T,)`, the scheduler's timesteps, `timesteps[j]` takes `latents[:, j]` to
            `latents[:, j + 1]`.
        log_probs (`torch.Tensor`): `(B, T)`, `log pi_old(x_{t-1} | x_t)` under the sampling weights (float32).
        images (`torch.Tensor`): `(B, 3, H, W)` decoded images in [0, 1].
        ref_log_probs (`torch.Tensor`, *optional*): `(B, T)`, the same transitions under the reference (base) model.
        kl_to_ref (`torch.Tensor`, *optional*): `(B, T)`, `KL(pi_old || pi_ref)` of each step (closed form).
        ref_means (`torch.Tensor`, *optional*): `(B, T, C, h, w)`, the reference model's step means, kept when a
            KL penalty is trained (the reference is fixed, so it never needs recomputing).
    """

    prompts: List[str]
    group_ids: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: Optional[torch.Tensor]
    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    images: Optional[torch.Tensor] = None
    ref_log_probs: Optional[torch.Tensor] = None
    kl_to_ref: Optional[torch.Tensor] = None
    ref_means: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def select(self, index: torch.Tensor) -> "Trajectories":
        """The trajectories at `index` (a 1-D tensor of sample indices)."""
        values = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "timesteps" or value is None:
                values[field.name] = value
            elif field.name == "prompts":
                values[field.name] = [value[i] for i in index.tolist()]
            else:
                values[field.name] = value[index.to(value.device)]
        return Trajectories(**values)

    def to(self, device) -> "Trajectories":
        values = {}
        for field in fields(self):
            value = getattr(self, field.name)
            values[field.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return Trajectories(**values)


def unwrap(model):
    """The module inside accelerate/DDP/compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def has_lora(unet) -> bool:
    return bool(getattr(unwrap(unet), "peft_config", None))


@contextmanager
def adapters_disabled(unet):
    """Runs the base model of a peft-LoRA UNet: the reference policy without a second copy of the weights."""
    model = unwrap(unet)
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


def reference_model(unet, ref_unet=None):
    """`(module, context_factory)` computing the reference model: a frozen `ref_unet`, or `unet` with its LoRA
    disabled. Run the module inside `with context_factory():`."""
    if ref_unet is not None:
        return ref_unet, nullcontext
    if has_lora(unet):
        return unet, lambda: adapters_disabled(unet)
    raise ValueError("a reference model needs either a LoRA adapter on the UNet or a frozen `ref_unet`")


BASE_ADAPTER = "__base__"  # peft's name for "no adapter" rows in a mixed-adapter batch


@contextmanager
def adapter_rows(unet, adapter_names: List[str]):
    """Runs each row of the next UNet forwards through its own LoRA adapter (`"__base__"`: none).

    peft's mixed-batch inference, injected with forward pre-hooks on every `LoraLayer` because diffusers' UNet does not
    pass `adapter_names` down. Exact, and needs no second copy of the weights (the model must be in eval mode).
    """
    from peft.tuners.lora import LoraLayer

    def hook(module, args, kwargs):
        return args, {**kwargs, "adapter_names": adapter_names}

    layers = [m for m in unwrap(unet).modules() if isinstance(m, LoraLayer)]
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def policy_and_reference_noise_pred(unet, latents, t, prompt_embeds, negative_prompt_embeds, guidance_scale):
    """Guided predictions of the LoRA policy and of its base model from **one** batched UNet forward."""
    (adapter,) = unwrap(unet).peft_config  # the one trained adapter
    b = latents.shape[0]
    names = [adapter] * b + [BASE_ADAPTER] * b
    if negative_prompt_embeds is not None:
        names = names * 2  # guided_noise_pred stacks [all uncond rows, all cond rows]
        negative_prompt_embeds = torch.cat([negative_prompt_embeds, negative_prompt_embeds])
    with adapter_rows(unet, names):
        pred = guided_noise_pred(
            unet, torch.cat([latents, latents]), t, torch.cat([prompt_embeds, prompt_embeds]), negative_prompt_embeds,
            guidance_scale,
        )
    return pred.chunk(2)


def guided_noise_pred(unet, latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale: float):
    """Classifier-free guided prediction `eps_u + g (eps_c - eps_u)`, both halves in one batched forward.

    With `negative_prompt_embeds=None` the conditional prediction alone is returned (no CFG). Unlike
    `StableDiffusionPipeline`, a guidance scale below 1 is honoured (it mixes towards the unconditional model),
    which gives reward fine-tuning headroom on small models.
    """
    timesteps = torch.as_tensor(timesteps, device=latents.device)
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(latents.shape[0])
    if negative_prompt_embeds is None:
        return unet(latents, timesteps, encoder_hidden_states=prompt_embeds).sample
    model_input = torch.cat([latents, latents])
    embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
    noise_uncond, noise_cond = unet(model_input, torch.cat([timesteps, timesteps]), encoder_hidden_states=embeds).sample.chunk(2)
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)


class PromptEncoder:
    """Encodes prompts with the pipeline's text encoder, once per distinct prompt (a cache shared across epochs)."""

    def __init__(self, pipe, device=None, max_cache: int = 4096):
        self.pipe = pipe
        self.device = device
        self.max_cache = max_cache
        self.cache: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: List[str]) -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in self.cache})
        if missing:
            device = self.device or self.pipe.text_encoder.device
            embeds, _ = self.pipe.encode_prompt(missing, device, 1, False)
            if len(self.cache) + len(missing) > self.max_cache:
                self.cache.clear()
            self.cache.update(zip(missing, embeds))
        return torch.stack([self.cache[p] for p in prompts])


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode to images in [0, 1], `(B, 3, H, W)` float32."""
    latents = latents / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        latents = latents + vae.config.shift_factor
    images = vae.decode(latents.to(vae.dtype)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def sample_trajectories(
    pipe,
    prompts: List[str],
    num_inference_steps: int = 50,
    guidance_scale: float = 5.0,
    eta: float = 1.0,
    height: Optional[int] = None,
    width: Optional[int] = None,
    negative_prompt: str = "",
    generator: Optional[torch.Generator] = None,
    latents: Optional[torch.Tensor] = None,
    unet=None,
    ref_unet=None,
    compute_reference: bool = False,
    keep_reference_means: bool = False,
    prompt_encoder: Optional[PromptEncoder] = None,
    group_ids: Optional[torch.Tensor] = None,
    decode: bool = True,
    progress: bool = False,
) -> Trajectories:
    """Samples one trajectory per prompt with DDIM(eta) and records every latent and per-step log-probability.

    Args:
        pipe (`StableDiffusionPipeline`): supplies tokenizer, text encoder, scheduler and VAE (and the UNet unless
            `unet` is given).
        prompts (`List[str]`): one prompt per trajectory (repeat a prompt for several images of it).
        num_inference_steps, guidance_scale, eta, height, width, negative_prompt, generator, latents: as in
            `StableDiffusionPipeline.__call__`; `eta` must be > 0 (log-probs need noise). CFG is applied whenever
            `guidance_scale != 1`.
        unet (*optional*): the policy UNet (e.g. the accelerate-prepared one); defaults to `pipe.unet`.
        ref_unet (*optional*): a frozen reference UNet (full fine-tuning); with LoRA the reference is the UNet with
            its adapters disabled.
        compute_reference (`bool`): also record `ref_log_probs` and `kl_to_ref` (one more UNet forward per step).
        keep_reference_means (`bool`): also keep the reference step means (for a trained KL penalty).
        prompt_encoder (`PromptEncoder`, *optional*): a cache of text embeddings reused across calls.
        group_ids (`torch.LongTensor`, *optional*): ids of the prompts; by default equal prompts share an id.
        decode (`bool`): decode `x_0` to images.

    Returns:
        `Trajectories`.
    """
    unet = unet if unet is not None else pipe.unet
    device = pipe.vae.device
    batch_size = len(prompts)
    prompt_encoder = prompt_encoder or PromptEncoder(pipe, device)
    do_cfg = guidance_scale != 1.0

    prompt_embeds = prompt_encoder(prompts).to(device)
    negative_prompt_embeds = prompt_encoder([negative_prompt] * batch_size).to(device) if do_cfg else None
    if group_ids is None:
        ids = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        group_ids = torch.tensor([ids[p] for p in prompts], dtype=torch.long)

    height = height or unwrap(unet).config.sample_size * pipe.vae_scale_factor
    width = width or unwrap(unet).config.sample_size * pipe.vae_scale_factor
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    x = pipe.prepare_latents(
        batch_size, unwrap(unet).config.in_channels, height, width, prompt_embeds.dtype, device, generator, latents
    )

    all_latents, all_log_probs = [x], []
    ref_log_probs, kls, ref_means = [], [], []
    if compute_reference:
        ref_module, ref_context = reference_model(unet, ref_unet)
    # With one LoRA adapter, policy and reference rows share a forward (the model must be in eval mode for peft).
    one_forward = (
        compute_reference and ref_unet is None and has_lora(unet) and len(unwrap(unet).peft_config) == 1
        and not unwrap(unet).training
    )
    for t in tqdm(timesteps, desc="sampling", leave=False, disable=not progress):
        x_in = scheduler.scale_model_input(x, t)
        if one_forward:
            noise_pred, ref_pred = policy_and_reference_noise_pred(
                unet, x_in, t, prompt_embeds, negative_prompt_embeds, guidance_scale
            )
        else:
            noise_pred = guided_noise_pred(unet, x_in, t, prompt_embeds, negative_prompt_embeds, guidance_scale)
        x_prev, log_prob = ddim_step_with_logprob(scheduler, noise_pred, t, x, eta=eta, generator=generator)
        if compute_reference:
            mean, std = ddim_step_mean_std(scheduler, noise_pred, t, x, eta)
            if not one_forward:
                with ref_context():
                    ref_pred = guided_noise_pred(
                        ref_module, x_in, t, prompt_embeds, negative_prompt_embeds, guidance_scale
                    )
            ref_mean, _ = ddim_step_mean_std(scheduler, ref_pred, t, x, eta)
            ref_log_probs.append(gaussian_log_prob(x_prev, ref_mean, std))
            kls.append(gaussian_kl(mean, ref_mean, std))
            if keep_reference_means:
                ref_means.append(ref_mean)
        x = x_prev
        all_latents.append(x)
        all_log_probs.append(log_prob)

    return Trajectories(
        prompts=list(prompts),
        group_ids=group_ids,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        latents=torch.stack(all_latents, dim=1),
        timesteps=timesteps.clone(),
        log_probs=torch.stack(all_log_probs, dim=1),
        images=decode_latents(pipe.vae, x) if decode else None,
        ref_log_probs=torch.stack(ref_log_probs, dim=1) if compute_reference else None,
        kl_to_ref=torch.stack(kls, dim=1) if compute_reference else None,
        ref_means=torch.stack(ref_means, dim=1) if keep_reference_means else None,
    )


def step_log_probs(
    unet,
    scheduler,
    trajectories: Trajectories,
    rows: torch.Tensor,
    steps: torch.Tensor,
    guidance_scale: float,
    eta: float,
):
    """Recomputes `log pi_theta(x_{t-1} | x_t)` (with gradients) of recorded transitions, in one UNet forward.

    Args:
        trajectories (`Trajectories`): the recorded batch.
        rows (`torch.LongTensor`): `(N,)` sample indices into `trajectories` (repeat a sample to train several of its
            steps in one forward).
        steps (`torch.LongTensor`): `(N,)` step positions `j` (transition `latents[:, j] -> latents[:, j + 1]`).
        guidance_scale, eta: the sampling settings (the CFG-guided prediction is what was sampled from).

    Returns:
        `(log_prob, mean, std)`: `log_prob` `(N,)` float32, and the step means and stds (for a KL penalty).
    """
    device = trajectories.latents.device
    rows, steps = rows.to(device), steps.to(device)
    x_t = trajectories.latents[rows, steps]
    x_prev = trajectories.latents[rows, steps + 1]
    t = trajectories.timesteps.to(device)[steps]
    negative = trajectories.negative_prompt_embeds
    noise_pred = guided_noise_pred(
        unet,
        scheduler.scale_model_input(x_t, t),
        t,
        trajectories.prompt_embeds[rows],
        negative[rows] if negative is not None else None,
        guidance_scale,
    )
    mean, std = ddim_step_mean_std(scheduler, noise_pred, t, x_t, eta)
    return gaussian_log_prob(x_prev, mean, std), mean, std
