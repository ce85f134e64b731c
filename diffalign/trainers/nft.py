"""DiffusionNFT (Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process", 2025,
arXiv 2509.16117): negative-aware fine-tuning of final samples on the forward process, as NVlabs/DiffusionNFT."""

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ..advantages import group_advantages
from .nft_config import NFTConfig
from ..forward_process import (OLD_POLICY_DECAY_TYPES, add_noise, flow_schedule, old_policy_decay,
                               update_old_policy_, vp_schedule)
from ..losses import nft_loss, optimality_probability
from ..rollout import select_rows
from ..utils.peft_utils import BASE_ADAPTER, adapter_active, adapter_rows, unwrap
from .base import BaseTrainer, TrainingBatch
from ..utils.torch_utils import seed_for
from .update_plan import Rows

OLD_ADAPTER = "old"  # the sampling policy, a frozen second LoRA adapter beside the trained one


@dataclass
class NFTBatch(TrainingBatch):
    """The epoch's final samples with each one's optimality probability `optimality` and the global index of its
    first sample (`first_index`, seeds each row's noise whatever the process count)."""

    optimality: Optional[torch.Tensor] = None
    first_index: int = 0
    epoch: int = 0


class NFTTrainer(BaseTrainer):
    """DiffusionNFT: sample final images with the old policy (CFG-free, deterministic), score them, then pull the
    implicit positive policy towards high-reward samples and the negative one towards low-reward ones at noise
    levels of the sampler (`diffalign.losses.nft_loss`); the old policy follows the trained one by an EMA.

    ```python
    from diffalign.config import load_config
    from diffalign.trainers import NFTTrainer

    NFTTrainer(load_config("nft", "digits-flow-nft")).train()
    ```
    """

    config_class = NFTConfig
    keeps_trajectory = False
    loss_stats = ("loss", "policy_loss", "kl", "old_deviation", "old_kl")

    # ------------------------------------------------------------------ setup
    def _prepare_training(self, denoiser, optimizer):
        """Adds the old policy as a frozen LoRA adapter with the trained adapter's config, a copy of it (the
        optimizer, built before, holds the trained adapter alone)."""
        trained = next(iter(denoiser.peft_config))
        with warnings.catch_warnings():  # peft warns that the model will hold several adapters: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            denoiser.add_adapter(denoiser.peft_config[trained], adapter_name=OLD_ADAPTER)
        for layer in _lora_layers(denoiser):
            layer.set_adapter(trained)  # diffusers activated the added adapter: back to the trained one, trainable
        self.old_params, self.policy_params = _paired_adapter_params(denoiser, trained, OLD_ADAPTER)
        for old, new in zip(self.old_params, self.policy_params):
            old.data = old.data.to(new.dtype)  # the EMA of fp32 weights stays fp32
        update_old_policy_(self.old_params, self.policy_params, 0.0)
        return super()._prepare_training(denoiser, optimizer)

    def needs_reference(self) -> bool:
        return False

    def stochastic_steps(self, epoch: int) -> torch.Tensor:
        if self.config.sample_deterministic:
            return torch.zeros(self.config.sample_num_steps, dtype=torch.bool)
        return super().stochastic_steps(epoch)

    @torch.no_grad()
    def sample(self, *args, **kwargs):
        """The epoch's rollout, with the old policy."""
        with adapter_active(self.denoiser, OLD_ADAPTER):
            return super().sample(*args, **kwargs)

    # --------------------------------------------------------------- the loop
    def training_batch(self, trajectories, rewards, all_rewards, all_prompts: List[str], epoch: int) -> NFTBatch:
        """Advantages over the epoch's global batch (per prompt mean, the batch's std: NVIDIA's
        `PerPromptStatTracker(global_std=True)`), and this process's optimality probabilities."""
        config = self.config
        ids = {prompt: i for i, prompt in enumerate(dict.fromkeys(all_prompts))}
        advantages = group_advantages(all_rewards, torch.tensor([ids[p] for p in all_prompts]), global_std=True)
        n = len(trajectories)
        first = self.global_sample_offset(n)
        optimality = optimality_probability(advantages[first : first + n], config.train_adv_clip_max,
                                            config.train_adv_mode)
        return NFTBatch(trajectories.to(self.device), rewards=rewards.to(self.device),
                        all_rewards=all_rewards.detach().cpu().float(), optimality=optimality.to(self.device),
                        first_index=first, epoch=epoch)

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

    def model_outputs(self, model, batch: NFTBatch, rows: Rows):
        """At `x_t = alpha_t x0 + sigma_t eps` (the sampler's noise level of each row, fresh noise): the trained
        policy's output (with gradients), and the old policy's and the base model's (one no-grad forward)."""
        config, family = self.config, self.family
        trajectories = batch.trajectories
        samples = rows.samples
        steps = rows.steps if rows.steps is not None else torch.zeros_like(samples)  # a padding forward
        x0 = trajectories.final_latents[samples]
        t = trajectories.timesteps.to(x0.device)[steps]
        noise = torch.stack([
            torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(
                seed_for(config.seed, batch.epoch, 11, batch.first_index + int(i), int(j))), dtype=x0.dtype)
            for i, j in zip(samples.tolist(), steps.tolist())]).to(x0.device)
        alpha_t, sigma_t, prediction_type = self.forward_process(t, x0)
        x_t = add_noise(x0, noise, alpha_t, sigma_t)
        cond = select_rows(trajectories.conditioning, samples)
        negative = trajectories.negative_conditioning
        negative = select_rows(negative, samples) if negative is not None else None
        guidance = config.sample_guidance_scale
        names = [OLD_ADAPTER] * len(samples) + ([BASE_ADAPTER] * len(samples) if config.train_kl_coef > 0 else [])
        repeat = len(names) // len(samples)
        module = unwrap(model)
        training = module.training
        module.eval()  # peft runs rows through different adapters in eval mode only
        try:
            with torch.no_grad(), adapter_rows(model, names * (2 if negative is not None else 1)), \
                    self.accelerator.autocast():
                frozen = family.predict(
                    model, x_t.repeat(repeat, *[1] * (x_t.ndim - 1)), t.repeat(repeat),
                    {k: v.repeat(repeat, *[1] * (v.ndim - 1)) for k, v in cond.items()},
                    {k: v.repeat(repeat, *[1] * (v.ndim - 1)) for k, v in negative.items()}
                    if negative is not None else None, guidance).float()
        finally:
            module.train(training)
        old_output, ref_output = (frozen.chunk(2) if repeat == 2 else (frozen, None))
        with self.accelerator.autocast():
            output = family.predict(model, x_t, t, cond, negative, guidance).float()
        return output, old_output, ref_output, x_t, x0, alpha_t, sigma_t, prediction_type

    def forward_process(self, t: torch.Tensor, x0: torch.Tensor):
        """`(alpha_t, sigma_t, prediction_type)` of the family's scheduler at its timesteps `t`: a DDPM-type table
        (`alphas_cumprod`, the scheduler's `prediction_type`) or rectified flow (noise level `t / 1000`, as NVIDIA)."""
        scheduler = self.family.scheduler
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is not None and not scheduler.config.get("use_flow_sigmas", False):  # SANA's DPM: a flow
            return (*vp_schedule(alphas_cumprod, t, x0), scheduler.config.prediction_type)
        num_train_timesteps = scheduler.config.num_train_timesteps
        return (*flow_schedule(t.float() / num_train_timesteps, x0), "flow_velocity")

    def compute_loss(self, outputs, batch: NFTBatch, rows: Rows):
        """`nft_loss` of a micro-batch of (sample, noise level) rows."""
        config = self.config
        output, old_output, ref_output, x_t, x0, alpha_t, sigma_t, prediction_type = outputs
        out = nft_loss(output, old_output, ref_output, x_t, x0, alpha_t, sigma_t, batch.optimality[rows.samples],
                       config.train_beta, config.train_adv_clip_max, config.train_kl_coef, prediction_type)
        return out["loss"], {key: out[key].detach() for key in self.loss_stats}

    def train_on_samples(self, trajectories, rewards, all_rewards, all_prompts: List[str],
                         epoch: int) -> Dict[str, float]:
        """The epoch's updates, then the old policy's EMA step: `theta_old <- eta theta_old + (1 - eta) theta`
        with `eta` by `old_policy_decay_type` at the optimizer steps made so far."""
        metrics = super().train_on_samples(trajectories, rewards, all_rewards, all_prompts, epoch)
        config = self.config
        samples = config.sample_num_prompts_per_epoch * config.sample_images_per_prompt
        steps_per_epoch = config.train_num_inner_epochs * (samples // (config.train_batch_size or samples))
        decay = old_policy_decay((epoch + 1) * steps_per_epoch, *OLD_POLICY_DECAY_TYPES[config.old_policy_decay_type])
        update_old_policy_(self.old_params, self.policy_params, decay)
        metrics["old_policy_decay"] = decay
        return metrics

    # ------------------------------------------------------- checkpoint/resume
    def extra_state(self) -> dict:
        return {**super().extra_state(), "old_policy": [p.detach().cpu().clone() for p in self.old_params]}

    def load_extra_state(self, state: dict):
        super().load_extra_state(state)
        if "old_policy" in state:
            with torch.no_grad():
                for param, saved in zip(self.old_params, state["old_policy"]):
                    param.copy_(saved)


def _lora_layers(denoiser):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unwrap(denoiser).modules() if isinstance(m, BaseTunerLayer)]


def _paired_adapter_params(denoiser, trained: str, other: str):
    """`(other adapter's parameters, trained adapter's parameters)` in the same order."""
    params = dict(unwrap(denoiser).named_parameters())
    policy = [name for name in params if f".{trained}." in name]
    return [params[name.replace(f".{trained}.", f".{other}.")] for name in policy], [params[name] for name in policy]
