"""`ForwardProcessTrainer`: what the forward-process algorithms share (DiffusionNFT, AWM, DGPO). They sample final
images with a slowly-updated old policy and any solver (a deterministic one by default), score them, then train at
noise levels of the sampler on the forward process of those samples, `x_t = alpha_t x0 + sigma_t eps`, with the
model's own denoising output: no log-probs of the sampler, no trajectory kept.

A subclass gives its batch (`training_batch`, e.g. advantages of the epoch's rewards), its per-row outputs
(`model_outputs`, using `noised_rows` and `frozen_predictions`) and its loss (`compute_loss`).

With LoRA the old policy is a second adapter and the base model the denoiser with its adapters off; a full fine-tune
(`use_lora: false`) keeps the old policy as a frozen copy of the denoiser (fp32, as the trained weights) beside the
frozen base copy every full fine-tune has (`ref_denoiser`)."""

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ..distributed import is_sharded
from ..errors import ConfigError
from ..forward_process import (OLD_POLICY_DECAY_TYPES, add_noise, flow_schedule, old_policy_decay,
                               update_old_policy_, vp_schedule)
from ..rollout import select_rows
from ..utils.peft_utils import BASE_ADAPTER, adapter_active, adapter_rows, unwrap
from ..utils.torch_utils import seed_for
from .base import BaseTrainer, TrainingBatch
from .forward_base_config import ForwardProcessConfig
from .update_plan import Rows

OLD_ADAPTER = "old"  # the sampling policy, a frozen second LoRA adapter beside the trained one


@dataclass
class ForwardProcessBatch(TrainingBatch):
    """The epoch's final samples, with the global index of this process's first sample (`first_index`, seeds each
    row's noise whatever the process count) and the epoch."""

    first_index: int = 0
    epoch: int = 0


@dataclass
class NoisedRows:
    """A micro-batch of (sample, noise level) rows on the forward process: `x_t = alpha_t x0 + sigma_t noise` at the
    sampler's timestep `t` of each row, with the samples' conditioning.

    `denoiser_input` is the whole noised latents, what the denoiser takes; `x0`, `noise` and `x_t` are their sampled
    part (`ModelFamily.sampled_latents`: all of it, but for Wan 2.2 TI2V-5B image-to-video's fixed first frame), as
    the predictions of `policy_prediction` and `frozen_predictions`: what the losses count."""

    x0: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    alpha_t: torch.Tensor
    sigma_t: torch.Tensor
    prediction_type: str
    conditioning: dict
    denoiser_input: torch.Tensor
    negative_conditioning: dict = None


class ForwardProcessTrainer(BaseTrainer):
    """The shared part of the forward-process trainers: the old policy as a frozen second LoRA adapter that samples
    (CFG-free and deterministic by default) and follows the trained adapter by an EMA after each epoch; each
    sample trained at `num_train_steps` distinct noise levels of the sampler, drawn per sample."""

    config_class = ForwardProcessConfig
    keeps_trajectory = False

    # ------------------------------------------------------------------ setup
    def _prepare_training(self, denoiser, optimizer):
        """Adds the old policy as a frozen LoRA adapter with the trained adapter's config, a copy of it (the
        optimizer, built before, holds the trained adapter alone); in a full fine-tune, a frozen copy of the
        denoiser."""
        if not self.config.use_lora:
            self.old_denoiser = copy.deepcopy(denoiser).requires_grad_(False).eval()
            # the trained weights (all of them, but for the frozen expert of a two-expert model, `WanExperts`)
            pairs = [(old, new) for old, new in zip(self.old_denoiser.parameters(), denoiser.parameters())
                     if new.requires_grad]
            self.old_params, self.policy_params = [old for old, _ in pairs], [new for _, new in pairs]
            prepared = super()._prepare_training(denoiser, optimizer)
            if is_sharded(self.accelerator, prepared[0]):  # the old copy's EMA needs the whole weights
                raise ConfigError(f"{self.config.algorithm} with use_lora: false needs the whole weights on every "
                                  "process: not with FSDP or DeepSpeed ZeRO-3 (use DDP, or ZeRO-1/2, or a LoRA)")
            return prepared
        trained = next(iter(denoiser.peft_config))
        with warnings.catch_warnings():  # peft warns that the model will hold several adapters: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            denoiser.add_adapter(denoiser.peft_config[trained], adapter_name=OLD_ADAPTER)
        for layer in lora_layers(denoiser):
            layer.set_adapter(trained)  # diffusers activated the added adapter: back to the trained one, trainable
        self.old_params, self.policy_params = paired_adapter_params(denoiser, trained, OLD_ADAPTER)
        for old, new in zip(self.old_params, self.policy_params):
            old.data = old.data.to(new.dtype)  # the EMA of fp32 weights stays fp32
        update_old_policy_(self.old_params, self.policy_params, 0.0)
        return super()._prepare_training(denoiser, optimizer)

    def needs_reference(self) -> bool:
        return False  # the base model is the denoiser with its adapters off

    def stochastic_steps(self, epoch: int) -> torch.Tensor:
        if self.config.sample_deterministic:
            return torch.zeros(self.config.sample_num_steps, dtype=torch.bool)
        return super().stochastic_steps(epoch)

    @torch.no_grad()
    def sample(self, *args, **kwargs):
        """The epoch's rollout, with the old policy."""
        with self.old_policy_sampling():
            return super().sample(*args, **kwargs)

    @contextlib.contextmanager
    def old_policy_sampling(self):
        """Context in which `self.denoiser` samples as the old policy: its adapter active, or (full fine-tune) the
        old copy in the denoiser's place."""
        if self.config.use_lora:
            with adapter_active(self.denoiser, OLD_ADAPTER):
                yield
            return
        live, self.denoiser = self.denoiser, self.old_denoiser
        try:
            yield
        finally:
            self.denoiser = live

    # --------------------------------------------------------------- the loop
    def units_per_step(self, num_units: int) -> int:
        return self.config.train_batch_size or num_units

    def draw_order_and_plan(self, num_units: int, stochastic, generator: torch.Generator):
        """The sample order, then each sample's noise levels: the first `num_train_steps` of a random permutation of
        the sampling steps (NVIDIA draws one permutation per sample)."""
        order = torch.randperm(num_units, generator=generator)
        steps = self.config.sample_num_steps
        plan = torch.stack([torch.randperm(steps, generator=generator)[: self.config.num_train_steps]
                            for _ in range(num_units)])
        return order, plan

    def forward_process(self, t: torch.Tensor, x0: torch.Tensor):
        """`(alpha_t, sigma_t, prediction_type)` of the family's scheduler at its timesteps `t`: a DDPM-type table
        (`alphas_cumprod`, the scheduler's `prediction_type`) or rectified flow (noise level `t / 1000`, as NVIDIA)."""
        scheduler = self.family.scheduler
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is not None and not scheduler.config.get("use_flow_sigmas", False):  # SANA's DPM: a flow
            return (*vp_schedule(alphas_cumprod, t, x0), scheduler.config.prediction_type)
        num_train_timesteps = scheduler.config.num_train_timesteps
        return (*flow_schedule(t.float() / num_train_timesteps, x0), "flow_velocity")

    def noise_seed(self, batch: ForwardProcessBatch, sample: int, step: int) -> int:
        """The seed of the forward-process noise of a row (a local sample at a sampler step): one per (global
        sample, step), whatever the process count or the micro-batching."""
        return seed_for(self.config.seed, batch.epoch, 11, batch.first_index + sample, step)

    def noised_rows(self, batch: ForwardProcessBatch, rows: Rows) -> NoisedRows:
        """The rows' final samples noised to their noise levels with fresh noise, seeded per (global sample, step)
        so that it does not depend on the process count or the micro-batching; the noise is drawn for the whole
        latents, the losses see their sampled part (`NoisedRows`)."""
        trajectories = batch.trajectories
        samples = rows.samples
        steps = rows.steps if rows.steps is not None else torch.zeros_like(samples)  # a padding forward
        x0 = trajectories.final_latents[samples]
        t = trajectories.timesteps.to(x0.device)[steps]
        noise = torch.stack([
            torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(self.noise_seed(batch, i, j)),
                        dtype=x0.dtype)
            for i, j in zip(samples.tolist(), steps.tolist())]).to(x0.device)
        alpha_t, sigma_t, prediction_type = self.forward_process(t, x0)
        x_t = add_noise(x0, noise, alpha_t, sigma_t)
        sampled = self.family.sampled_latents
        negative = trajectories.negative_conditioning
        return NoisedRows(sampled(x0), sampled(noise), sampled(x_t), t, alpha_t, sigma_t, prediction_type,
                          select_rows(trajectories.conditioning, samples), denoiser_input=x_t,
                          negative_conditioning=select_rows(negative, samples) if negative is not None else None)

    def policy_prediction(self, model, rows: NoisedRows, guidance_scale: Optional[float] = None) -> torch.Tensor:
        """The trained policy's output at the rows (with gradients), CFG at `guidance_scale` (by default
        `sample_guidance_scale`; rows without negative conditioning give the conditional output alone); its sampled
        part, as `rows.x_t`."""
        guidance_scale = self.config.sample_guidance_scale if guidance_scale is None else guidance_scale
        with self.accelerator.autocast():
            output = self.family.predict(model, rows.denoiser_input, rows.t, rows.conditioning,
                                         rows.negative_conditioning, guidance_scale)
        return self.family.sampled_latents(output).float()

    def frozen_predictions(self, model, adapters: Sequence[str], rows: NoisedRows,
                           guidance_scale: Optional[float] = None) -> List[torch.Tensor]:
        """The outputs of frozen adapters at the rows (e.g. the old policy, `BASE_ADAPTER` for the base model), in one
        no-grad forward: each row repeated once per adapter, routed to it by peft's per-row adapters (a full
        fine-tune: the old and base copies, a forward each). CFG at `guidance_scale`, by default
        `sample_guidance_scale`. Their sampled parts, as `rows.x_t`."""
        guidance_scale = self.config.sample_guidance_scale if guidance_scale is None else guidance_scale
        if not adapters:
            return []
        if not self.config.use_lora:  # full fine-tune: the frozen copies, one forward each
            frozen_models = {OLD_ADAPTER: self.old_denoiser, BASE_ADAPTER: self.ref_denoiser}
            with torch.no_grad(), self.accelerator.autocast():
                return [self.family.sampled_latents(self.family.predict(
                    frozen_models[name], rows.denoiser_input, rows.t, rows.conditioning, rows.negative_conditioning,
                    guidance_scale)).float() for name in adapters]
        names = [name for name in adapters for _ in range(len(rows.t))]
        repeat = len(adapters)
        x_t, t, cond, negative = rows.denoiser_input, rows.t, rows.conditioning, rows.negative_conditioning
        module = unwrap(model)
        training = module.training
        module.eval()  # peft runs rows through different adapters in eval mode only
        try:
            with torch.no_grad(), adapter_rows(model, names * (2 if negative is not None else 1)), \
                    self.accelerator.autocast():
                frozen = self.family.predict(
                    model, x_t.repeat(repeat, *[1] * (x_t.ndim - 1)), t.repeat(repeat),
                    {k: v.repeat(repeat, *[1] * (v.ndim - 1)) for k, v in cond.items()},
                    {k: v.repeat(repeat, *[1] * (v.ndim - 1)) for k, v in negative.items()}
                    if negative is not None else None, guidance_scale).float()
        finally:
            module.train(training)
        return [self.family.sampled_latents(output) for output in frozen.chunk(repeat)]

    def train_on_samples(self, trajectories, rewards, all_rewards, all_prompts: List[str],
                         epoch: int) -> Dict[str, float]:
        """The epoch's updates, then the old policy's EMA step: `theta_old <- eta theta_old + (1 - eta) theta`
        with `eta` by `old_policy_decay_type` at the optimizer steps made so far."""
        metrics = super().train_on_samples(trajectories, rewards, all_rewards, all_prompts, epoch)
        metrics.update(self.update_old_policy(epoch))
        return metrics

    def optimizer_steps_per_epoch(self) -> int:
        """Optimizer steps of an epoch: `train_num_inner_epochs` passes of `train_batch_size` samples each."""
        config = self.config
        samples = config.sample_num_prompts_per_epoch * config.sample_images_per_prompt
        return config.train_num_inner_epochs * (samples // (config.train_batch_size or samples))

    def update_old_policy(self, epoch: int) -> Dict[str, float]:
        """The old policy's EMA step after an epoch; returns its metrics (`old_policy_decay`)."""
        decay = self.old_policy_decay_at((epoch + 1) * self.optimizer_steps_per_epoch())
        update_old_policy_(self.old_params, self.policy_params, decay)
        return {"old_policy_decay": decay}

    def old_policy_decay_at(self, step: int) -> float:
        """The old policy's EMA weight `eta` after `step` optimizer steps (`old_policy_decay_type`'s schedule)."""
        return old_policy_decay(step, *OLD_POLICY_DECAY_TYPES[self.config.old_policy_decay_type])

    # ------------------------------------------------------- checkpoint/resume
    def extra_state(self) -> dict:
        return {**super().extra_state(), "old_policy": [p.detach().cpu().clone() for p in self.old_params]}

    def load_extra_state(self, state: dict):
        super().load_extra_state(state)
        if "old_policy" in state:
            with torch.no_grad():
                for param, saved in zip(self.old_params, state["old_policy"]):
                    param.copy_(saved)


def lora_layers(denoiser):
    """The peft LoRA layers of a (wrapped) denoiser."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unwrap(denoiser).modules() if isinstance(m, BaseTunerLayer)]


def paired_adapter_params(denoiser, trained: str, other: str):
    """`(other adapter's parameters, trained adapter's parameters)` in the same order."""
    params = dict(unwrap(denoiser).named_parameters())
    policy = [name for name in params if f".{trained}." in name]
    return [params[name.replace(f".{trained}.", f".{other}.")] for name in policy], [params[name] for name in policy]
