"""Sampling denoising trajectories with per-step log-probabilities, for every model family.

The loop is written out here once: the family (`diffalign.families`) encodes prompts, prepares latents and
timesteps, calls its denoiser with CFG and decodes; the transition kernel (`diffalign.kernels`) takes each step and
gives its log-probability. The same function serves SD1.5, SDXL, SD3.5 and FLUX on a GPU and the tiny test models.
"""

from dataclasses import dataclass, fields
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from .families.base import cat_rows
from .logprob import gaussian_kl, gaussian_log_prob
from .utils.peft_utils import BASE_ADAPTER, active_adapter, adapter_rows, has_lora, reference_model, unwrap


def select_rows(value, index: torch.Tensor):
    """Rows `index` of a batch-first tensor or of each tensor of a conditioning mapping (on the value's device)."""
    if isinstance(value, dict):
        return {k: v[index.to(v.device)] for k, v in value.items()}
    return value[index.to(value.device)]


def _to(value, device):
    if isinstance(value, dict):
        return {k: v.to(device) for k, v in value.items()}
    return value.to(device) if isinstance(value, torch.Tensor) else value


@dataclass
class Trajectories:
    """A batch of B sampled trajectories of T denoising steps.

    Attributes:
        prompts (`List[str]`): the B prompts.
        group_ids (`torch.LongTensor`): `(B,)`, equal for samples of the same prompt.
        conditioning (`Dict[str, torch.Tensor]`): the family's denoiser inputs of the prompts (each `(B, ...)`), e.g.
            `encoder_hidden_states` (all families), `text_embeds` and `time_ids` (SDXL), `pooled_projections` (SD3).
        negative_conditioning (`Dict[str, torch.Tensor]` or `None`): the same for the negative prompt; `None` when
            sampled without CFG.
        latents (`torch.Tensor`): `(B, T + 1, C, h, w)`, `x_T, ..., x_0`; `(B, 1, C, h, w)`, `x_0` alone, when
            sampled with `keep_latents=False`.
        timesteps (`torch.Tensor`): `(T,)`, the scheduler's timesteps, `timesteps[j]` takes `latents[:, j]` to
            `latents[:, j + 1]`.
        log_probs (`torch.Tensor`): `(B, T)`, `log pi_old` of each transition under the sampling weights (float32);
            NaN at deterministic steps.
        stochastic (`torch.BoolTensor`): `(B, T)`, the steps sampled stochastically (all of them unless an SDE
            window was used); only these have log-probabilities and are trained.
        images (`torch.Tensor`): `(B, 3, H, W)` decoded images in [0, 1]; `(B, F, 3, H, W)` for a video family.
        ref_log_probs (`torch.Tensor`, *optional*): `(B, T)`, the same transitions under the reference (base) model.
        kl_to_ref (`torch.Tensor`, *optional*): `(B, T)`, `KL(pi_old || pi_ref)` of each step (closed form; NaN at
            deterministic steps).
        ref_means (`torch.Tensor`, *optional*): `(B, T, C, h, w)`, the reference model's step means, kept when a
            KL penalty is trained (the reference is fixed, so it never needs recomputing).
        step_means (`torch.Tensor`, *optional*): `(B, T, C, h, w)`, the sampling policy's step means `mu_old` (zeros at
            deterministic steps), kept for GRPO-Guard's RatioNorm (`diffalign.losses.ratio_norm_ppo_loss`).
    """

    prompts: List[str]
    group_ids: torch.Tensor
    conditioning: Dict[str, torch.Tensor]
    negative_conditioning: Optional[Dict[str, torch.Tensor]]
    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    stochastic: torch.Tensor
    images: Optional[torch.Tensor] = None
    ref_log_probs: Optional[torch.Tensor] = None
    kl_to_ref: Optional[torch.Tensor] = None
    ref_means: Optional[torch.Tensor] = None
    step_means: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def final_latents(self) -> torch.Tensor:
        """`(B, C, h, w)`, the sampled `x_0` (kept whether or not the whole trajectory was)."""
        return self.latents[:, -1]

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
                values[field.name] = select_rows(value, index)
        return Trajectories(**values)

    def to(self, device) -> "Trajectories":
        return Trajectories(**{field.name: _to(getattr(self, field.name), device) for field in fields(self)})


def concat_trajectories(batches: List[Trajectories]) -> Trajectories:
    """One `Trajectories` of several batches sampled with the same timesteps."""
    if len(batches) == 1:
        return batches[0]
    values = {}
    for field in fields(batches[0]):
        items = [getattr(b, field.name) for b in batches]
        if field.name == "timesteps":
            values[field.name] = items[0]
        elif items[0] is None:
            values[field.name] = None
        elif field.name == "prompts":
            values[field.name] = [p for item in items for p in item]
        elif isinstance(items[0], dict):
            values[field.name] = {k: cat_rows([item[k] for item in items]) for k in items[0]}
        else:
            values[field.name] = torch.cat(items)
    return Trajectories(**values)


def policy_and_reference_pred(family, denoiser, latents, t, cond, negative, guidance_scale: float):
    """Guided predictions of the LoRA policy (its active adapter) and of its base model from **one** batched
    denoiser forward."""
    adapter = active_adapter(denoiser)
    b = latents.shape[0]
    names = [adapter] * b + [BASE_ADAPTER] * b
    if negative is not None:
        names = names * 2  # `predict` stacks [all uncond rows, all cond rows]
        negative = {k: torch.cat([v, v]) for k, v in negative.items()}
    with adapter_rows(denoiser, names):
        pred = family.predict(
            denoiser, torch.cat([latents, latents]), t, {k: torch.cat([v, v]) for k, v in cond.items()}, negative,
            guidance_scale,
        )
    return pred.chunk(2)


def as_family(pipe_or_family):
    """The `ModelFamily` of a pipeline (or the family itself)."""
    from .families import ModelFamily, family_for_pipeline

    return pipe_or_family if isinstance(pipe_or_family, ModelFamily) else family_for_pipeline(pipe_or_family)


def default_kernel(family, eta: float = 1.0, noise_level: float = 0.7):
    """The family's transition kernel with the given noise (DDIM's `eta`, the flow SDE's `noise_level`)."""
    return family.make_kernel(eta=eta, noise_level=noise_level)


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
    denoiser=None,
    ref_denoiser=None,
    compute_reference: bool = False,
    keep_reference_means: bool = False,
    group_ids: Optional[torch.Tensor] = None,
    decode: bool = True,
    progress: bool = False,
    kernel=None,
    noise_level: float = 0.7,
    stochastic_steps: Optional[torch.Tensor] = None,
    keep_latents: bool = True,
    keep_step_means: bool = False,
) -> Trajectories:
    """Samples one trajectory per prompt and records every latent and per-step log-probability.

    Args:
        pipe (`DiffusionPipeline` or `ModelFamily`): a pipeline of a supported family (SD, SDXL, SD3), or its family
            (which keeps the prompt-embedding cache across calls).
        prompts (`List[str]`): one prompt per trajectory (repeat a prompt for several images of it).
        num_inference_steps, guidance_scale, height, width, negative_prompt, generator, latents: as in the family's
            diffusers pipeline. CFG is applied whenever `guidance_scale != 1` (and the model samples with CFG:
            `ModelFamily.samples_with_cfg`).
        eta (`float`): DDIM's noise weight (UNet families), > 0.
        denoiser (*optional*): the policy UNet/transformer (e.g. the accelerate-prepared one); defaults to the
            pipeline's.
        ref_denoiser (*optional*): a frozen reference copy (full fine-tuning); with LoRA the reference is the
            denoiser with its adapters disabled.
        compute_reference (`bool`): also record `ref_log_probs` and `kl_to_ref` (one more forward per step).
        keep_reference_means (`bool`): also keep the reference step means (for a trained KL penalty).
        group_ids (`torch.LongTensor`, *optional*): ids of the prompts; by default equal prompts share an id.
        decode (`bool`): decode `x_0` to images.
        kernel (`TransitionKernel`, *optional*): the step; defaults to the family's with `eta` / `noise_level`.
        noise_level (`float`): the flow SDE's noise level `a` (flow families), > 0.
        stochastic_steps (`torch.BoolTensor`, *optional*): `(T,)`, the steps to sample stochastically (an SDE window,
            see `diffalign.kernels.sde_window_mask`); the others take the deterministic ODE step. Default: all.
        keep_latents (`bool`): keep every latent of the trajectory (`latents` `(B, T + 1, ...)`, for training on its
            transitions); `False` keeps the final sample alone (`(B, 1, ...)`, for losses on final samples only).
        keep_step_means (`bool`): also keep the policy's step means (`step_means`, for GRPO-Guard's RatioNorm).

    Returns:
        `Trajectories`.
    """
    family = as_family(pipe)
    denoiser = denoiser if denoiser is not None else family.denoiser
    kernel = kernel or default_kernel(family, eta, noise_level)
    device = family.device
    batch_size = len(prompts)
    do_cfg = family.samples_with_cfg(guidance_scale)
    if group_ids is None:
        ids = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        group_ids = torch.tensor([ids[p] for p in prompts], dtype=torch.long)

    default_height, default_width = family.default_size()
    height = height or default_height
    width = width or default_width
    cond, negative = family.conditioning(list(prompts), negative_prompt, do_cfg, height, width)
    cond, negative = _to(cond, device), _to(negative, device) if negative is not None else None
    timesteps = family.set_timesteps(num_inference_steps, device, height, width)
    if stochastic_steps is None:
        stochastic_steps = torch.ones(len(timesteps), dtype=torch.bool)
    dtype = cond["encoder_hidden_states"].dtype
    x = family.prepare_latents(batch_size, height, width, dtype, device, generator, latents, denoiser)
    if latents is None:  # e.g. video-to-video: the condition's latents noised to the first timestep
        x = family.start_latents(x, cond, timesteps)

    all_latents, all_log_probs = [x] if keep_latents else [], []
    ref_log_probs, kls, ref_means, step_means = [], [], [], []
    if compute_reference:
        ref_module, ref_context = reference_model(denoiser, ref_denoiser)
    # With LoRA, policy (the active adapter) and reference rows share a forward (peft needs eval mode for that).
    one_forward = compute_reference and ref_denoiser is None and has_lora(denoiser) and not unwrap(denoiser).training
    nan = torch.full((batch_size,), float("nan"), device=device)
    for j, t in enumerate(tqdm(timesteps, desc="sampling", leave=False, disable=not progress)):
        stochastic = bool(stochastic_steps[j])
        reference_here = compute_reference and stochastic
        if reference_here and one_forward:
            pred, ref_pred = policy_and_reference_pred(family, denoiser, x, t, cond, negative, guidance_scale)
        else:
            pred = family.predict(denoiser, x, t, cond, negative, guidance_scale)
        x_next, log_prob = kernel.step(family.scheduler, pred, t, x, stochastic=stochastic, generator=generator)
        if keep_step_means:
            step_means.append(kernel.mean_std(family.scheduler, pred, t, x)[0] if stochastic
                              else torch.zeros_like(x, dtype=torch.float32))
        if compute_reference:
            if reference_here:
                mean, std = kernel.mean_std(family.scheduler, pred, t, x)
                if not one_forward:
                    with ref_context():
                        ref_pred = family.predict(ref_module, x, t, cond, negative, guidance_scale)
                ref_mean, _ = kernel.mean_std(family.scheduler, ref_pred, t, x)
                ref_log_probs.append(gaussian_log_prob(x_next, ref_mean, std))
                kls.append(gaussian_kl(mean, ref_mean, std))
            else:
                ref_mean = torch.zeros_like(x)
                ref_log_probs.append(nan)
                kls.append(nan)
            if keep_reference_means:
                ref_means.append(ref_mean)
        x = x_next
        if keep_latents:
            all_latents.append(x)
        all_log_probs.append(log_prob if log_prob is not None else nan)

    return Trajectories(
        prompts=list(prompts),
        group_ids=group_ids,
        conditioning=cond,
        negative_conditioning=negative,
        latents=torch.stack(all_latents, dim=1) if keep_latents else x[:, None],
        timesteps=timesteps.clone(),
        log_probs=torch.stack(all_log_probs, dim=1),
        stochastic=stochastic_steps.to(device)[None].expand(batch_size, -1).clone(),
        images=family.decode(family.final_latents(x, cond), height, width) if decode else None,
        ref_log_probs=torch.stack(ref_log_probs, dim=1) if compute_reference else None,
        kl_to_ref=torch.stack(kls, dim=1) if compute_reference else None,
        ref_means=torch.stack(ref_means, dim=1) if keep_reference_means else None,
        step_means=torch.stack(step_means, dim=1) if keep_step_means else None,
    )


def step_log_probs(family, denoiser, kernel, trajectories: Trajectories, rows: torch.Tensor, steps: torch.Tensor,
                   guidance_scale: float):
    """Recomputes `log pi_theta` (with gradients) of recorded transitions, in one denoiser forward.

    Args:
        family (`ModelFamily`), denoiser, kernel (`TransitionKernel`): the model and the step that was sampled.
        trajectories (`Trajectories`): the recorded batch.
        rows (`torch.LongTensor`): `(N,)` sample indices into `trajectories` (repeat a sample to train several of its
            steps in one forward).
        steps (`torch.LongTensor`): `(N,)` step positions `j` (transition `latents[:, j] -> latents[:, j + 1]`);
            stochastic steps only.
        guidance_scale (`float`): the sampling CFG scale (the guided prediction is what was sampled from).

    Returns:
        `(log_prob, mean, std)`: `log_prob` `(N,)` float32, and the step means and stds (for a KL penalty).
    """
    device = trajectories.latents.device
    rows, steps = rows.to(device), steps.to(device)
    x_t = trajectories.latents[rows, steps]
    x_next = trajectories.latents[rows, steps + 1]
    t = trajectories.timesteps.to(device)[steps]
    negative = trajectories.negative_conditioning
    pred = family.predict(
        denoiser, x_t, t, select_rows(trajectories.conditioning, rows),
        select_rows(negative, rows) if negative is not None else None, guidance_scale,
    )
    mean, std = kernel.mean_std(family.scheduler, pred, t, x_t)
    return gaussian_log_prob(x_next, mean, std), mean, std
