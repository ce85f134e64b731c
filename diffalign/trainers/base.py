"""The sample -> score -> update loop shared by the trainers; algorithms implement `train_on_samples`."""

import contextlib
import copy
import json
import logging
import math
import os
import random
import time
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError, atomic_save_dir, load_resumable, save_checkpoint
from ..config import TrainConfig
from ..distributed import (ddp_kwargs, engine_name, full_parameters, full_state_dict_view, gradient_sync, is_dtensor,
                           is_sharded, load_optimizer_state, optimizer_state, prepare_reference)
from ..errors import ConfigError, NonFiniteError
from ..runlog import append_metrics, finite_json, prepare_output_dir, read_metrics, write_metrics
from ..families import load_family
from .. import tracking
from ..modelcard import push_to_hub, warn_if_offline, write_model_card
from ..kernels import sde_window_mask
from ..plotting import grid_scale, image_grid, labelled_rows, plot_metrics
from ..ema import ParameterEMA
from ..prompts import PromptDifficulty, PromptError, heldout_prompt_source, prompt_source
from ..rollout import Trajectories, as_family, concat_trajectories, sample_trajectories
from ..utils.peft_utils import add_lora, check_lora_target_modules, record_lora_config, reference_model, unwrap
from ..utils.process_utils import launched_processes
from ..utils.torch_utils import seed_for, set_torch_threads

logger = logging.getLogger("diffalign")


class GlobalLayout:
    """Where the samples of a training set live across processes, so that the trainers can plan on the global batch.

    Each process holds `num_local` samples in blocks of `per_block` (one block per epoch: replayed epochs first, then
    the fresh one). Global block `b` is every process's block `b` in process order, so a global index `g` lives on
    process `(g % (per_block * P)) // per_block`. With one process, global and local indices coincide.
    """

    def __init__(self, num_local: int, per_block: int, num_processes: int, process_index: int):
        self.per_block = per_block
        self.blocks = num_local // per_block
        self.global_block = per_block * num_processes
        self.num_global = self.blocks * self.global_block
        self.process_index = process_index

    def owner(self, index: torch.Tensor) -> torch.Tensor:
        return (index % self.global_block) // self.per_block

    def local_index(self, index: torch.Tensor) -> torch.Tensor:
        """Local positions of global indices owned by this process."""
        return (index // self.global_block) * self.per_block + (index % self.global_block) % self.per_block

    def global_rows(self, local_rows: torch.Tensor) -> torch.Tensor:
        """`(num_global, ...)` from per-sample values that are the same for every sample of a block (the SDE window
        of an epoch)."""
        firsts = local_rows[:: self.per_block][: self.blocks]
        return firsts.repeat_interleave(self.global_block, dim=0)


class BaseTrainer:
    """Owns the epoch loop: sample trajectories, score them, update the policy, log and checkpoint.

    Args:
        config (`TrainConfig`): the run's settings.
        pipeline (`DiffusionPipeline` or `ModelFamily`, *optional*): a loaded pipeline of a supported family (SD,
            SDXL, SD3, FLUX); by default `config.model` is loaded with its family (`diffalign.families`).
        reward_fn (*optional*): `reward(images, prompts, metadata) -> Tensor[B]`; by default `config.reward`.
        prompt_fn (*optional*): a `diffalign.prompts.PromptSource`; by default from the config's prompt fields.
        accelerator (`accelerate.Accelerator`, *optional*).
        lora_config (`peft.LoraConfig`, *optional*): the LoRA adapter to train, instead of the one built from
            `lora_rank`, `lora_alpha` and `lora_target_modules` (its targets default to the family's when it names
            none); its rank, alpha and target list are written into `config`, which the checkpoints and the model
            card describe the run by. Needs `use_lora`.
    """

    algorithm = "base"

    def __init__(self, config: TrainConfig, pipeline=None, reward_fn=None, prompt_fn=None, accelerator=None,
                 lora_config=None):
        from accelerate import Accelerator

        self.config = config
        self.lora_config = lora_config
        if lora_config is not None:
            record_lora_config(config, lora_config)
        set_torch_threads(config)
        # validate before the Accelerator is built (it fails on a bad mixed_precision with a traceback); the
        # process count is the launcher's until the Accelerator knows it
        config.validate(accelerator.num_processes if accelerator is not None else launched_processes())
        # trackers (report_to) are checked here, before any model loads: a missing package is one line
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp_kwargs()],
            **tracking.accelerator_kwargs(config),
        )
        if accelerator is not None:
            tracking.check_accelerator(accelerator, config)
        acc = self.accelerator
        config.validate(acc.num_processes)
        if acc.is_main_process:  # one run per output directory: lock it (and refuse to start over an earlier run)
            self._run_lock = prepare_output_dir(config.output_dir, resume=bool(config.resume_from), owner=self)
        self.device = acc.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True

        self.prompts = prompt_fn or prompt_source(config.prompts, config.prompt_file, config.prompt_fn,
                                                  config.prompt_dataset, config.prompt_dataset_split,
                                                  config.prompt_column)
        # held-out prompts (with their metadata) for `heldout_evaluation` and the final evaluation; None when not given
        self.heldout = heldout_prompt_source(config.eval_prompts, config.eval_prompt_file, config.eval_dataset_split,
                                             config.prompt_dataset, config.prompt_column)
        self.prompt_difficulty = None
        if config.sample_prompt_selection == "moderate":
            if not self.prompts.is_list:
                raise PromptError("sample_prompt_selection 'moderate' needs a prompt list (prompts, prompt_file or a "
                                  "built-in set), not a prompt function")
            self.prompt_difficulty = PromptDifficulty()
        from diffalign.rewards import reward_name

        self.reward_label = reward_name(reward_fn, config.reward if reward_fn is None else None)
        if reward_fn is None:
            from diffalign.rewards import get_reward

            reward_fn = get_reward(config.reward, **config.reward_kwargs)
        self.reward_fn = reward_fn
        self.eval_reward_fn = None
        if config.eval_reward:
            from diffalign.rewards import get_reward

            self.eval_reward_fn = get_reward(config.eval_reward, **config.eval_reward_kwargs)

        if pipeline is not None:
            self.family = as_family(pipeline)
            self.family.set_kernel_scheduler(self.family.pipe)
        else:
            self.family = load_family(config.model)
        self.pipe = self.family.pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.family.configure(config)
        self.kernel = self.family.make_kernel(config)
        if config.sample_resolution:
            self.family.check_resolution(config.sample_resolution)
        self.resolution = config.sample_resolution or self.family.default_resolution()
        if config.use_lora:
            check_lora_target_modules(self.family.denoiser, config.lora_target_modules)  # a LoraConfig's too
        self._setup_models()

        self.first_epoch = 0
        self.metrics_history: List[Dict] = []
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        if self._resume_states is not None:
            self._apply_resume(*self._resume_states)
            self._resume_states = None

    # ------------------------------------------------------------------ setup
    def _setup_models(self):
        config, acc, family = self.config, self.accelerator, self.family
        for frozen in family.frozen_modules():
            _place(frozen.requires_grad_(False), self.device, self.weight_dtype)
        denoiser = family.denoiser
        ref_denoiser = None
        torch.manual_seed(config.seed)  # same LoRA initialisation on every process
        if config.use_lora:
            _place(denoiser, self.device, self.weight_dtype)
            add_lora(denoiser, config.lora_rank, config.lora_alpha,
                     config.lora_target_modules or family.default_lora_target_modules, lora_config=self.lora_config)
        else:
            ref_denoiser = _place(copy.deepcopy(denoiser).requires_grad_(False), self.device, self.weight_dtype).eval()
            _place(denoiser.requires_grad_(True), self.device, torch.float32)
        if config.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        if config.enable_xformers and torch.cuda.is_available():
            denoiser.enable_xformers_memory_efficient_attention()
        # a resumed run's weights go into the module before it is prepared (sharded engines split them then)
        self._resume_states = self._load_resume(config.resume_from, denoiser) if config.resume_from else None
        optimizer = torch.optim.AdamW(
            [p for p in denoiser.parameters() if p.requires_grad],
            lr=config.train_learning_rate,
            betas=(config.train_adam_beta1, config.train_adam_beta2),
            weight_decay=config.train_adam_weight_decay,
            eps=config.train_adam_epsilon,
        )
        warmup = config.train_lr_warmup_epochs
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: min(1.0, (epoch + 1) / warmup) if warmup else 1.0
        )
        # The denoiser and its optimizer go through accelerate: DDP by default, FSDP or DeepSpeed from the launch
        # config (`diffalign.accelerate_configs`). Gradients are reduced in the last backward of each optimizer step
        # (`gradient_sync`); adapters are toggled on the unwrapped module (`diffalign.rollout.unwrap`).
        self.prepared, self.optimizer = self._prepare_training(denoiser, optimizer)
        self.ref_denoiser = self._prepare_reference(ref_denoiser) if ref_denoiser is not None else None
        self.trainable_params = [p for p in self.prepared.parameters() if p.requires_grad]
        self.sharded = is_sharded(acc, self.prepared)
        self.denoiser = torch.compile(self.prepared) if config.compile_unet else self.prepared
        self.ema = None
        if config.ema_decay:
            if self.sharded:  # each process would average only its shard, and checkpoints need the full average
                raise ConfigError("ema_decay needs the whole weights on every process: not with FSDP or DeepSpeed "
                                  "ZeRO-3 (use DDP, or ZeRO-1/2)")
            self.ema = ParameterEMA(self.trainable_params, config.ema_decay, config.ema_update_every)

    def _prepare_training(self, denoiser, optimizer):
        """`(prepared denoiser, prepared optimizer)` for the launch's engine (DDP, FSDP, DeepSpeed or one process)."""
        acc = self.accelerator
        if engine_name(acc) == "deepspeed":
            ds_config = acc.state.deepspeed_plugin.deepspeed_config
            if ds_config.get("gradient_clipping", "auto") == "auto":  # DeepSpeed clips inside its step
                ds_config["gradient_clipping"] = self.config.train_max_grad_norm
            if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                ds_config["train_micro_batch_size_per_gpu"] = 1  # batching is the trainer's; DeepSpeed never sees it
        prepared, optimizer = acc.prepare(denoiser, optimizer)
        if acc.mixed_precision != "no":
            # the trainers autocast themselves; accelerate's forward wrapper would also cast outputs to fp32
            acc.unwrap_model(prepared, keep_fp32_wrapper=False)
        return prepared, optimizer

    def _prepare_reference(self, ref_denoiser):
        """The frozen reference copy (full fine-tuning), placed per engine (`diffalign.distributed`)."""
        return prepare_reference(self.accelerator, ref_denoiser)

    # ---------------------------------------------------------------- helpers
    def gradient_sync(self, last: bool):
        """Context for one backward of an optimizer step: gradients are reduced across processes (averaged, by DDP,
        FSDP or DeepSpeed) only in the `last` one. Every process runs the same sequence (`diffalign.distributed`)."""
        return gradient_sync(self.accelerator, self.prepared, last)

    def optimizer_step(self) -> Dict[str, float]:
        """Clips and applies the accumulated (already averaged) gradients unless any is non-finite (then skips).

        Under DeepSpeed the engine steps inside the last backward and clips with `gradient_clipping`; its fp16 loss
        scaler skips overflowing steps."""
        grad_norm = self.accelerator.clip_grad_norm_(self.trainable_params, self.config.train_max_grad_norm)
        if is_dtensor(grad_norm):
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not finite and self.weight_dtype != torch.float16 and engine_name(self.accelerator) != "deepspeed":
            # fp16's scaler legitimately skips overflowing steps; anything else is a real non-finite gradient.
            self._record_nonfinite("gradient")
        return {"grad_norm": grad_norm, "skipped": 0.0 if finite else 1.0}

    def ema_weights(self):
        """Context in which the denoiser holds the EMA of its trained weights (`ema_decay`), for grids, evaluations
        and the saved result; the live weights come back afterwards. Does nothing without EMA."""
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor):
        self.accelerator.backward(loss)

    def _record_nonfinite(self, what: str):
        self.nonfinite_total += 1
        self.nonfinite_in_a_row += 1
        if self.config.nonfinite_policy == "error":
            raise NonFiniteError(f"non-finite {what} (nonfinite_policy: error)")
        if self.nonfinite_in_a_row >= self.config.max_nonfinite_in_a_row:
            raise NonFiniteError(
                f"non-finite {what} in {self.nonfinite_in_a_row} batches in a row (max_nonfinite_in_a_row): stopping"
            )
        logger.warning("non-finite %s: batch skipped, weights untouched", what)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor.to(self.device)).cpu()

    def train_step_plan(self, stochastic: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`(num_samples, S)` step indices to train: an independent random subset of S of each sample's stochastic
        steps (`stochastic`: `(num_samples, T)` bool, see `Trajectories.stochastic`)."""
        keep = self.config.num_train_steps
        plans = []
        for mask in stochastic.cpu():
            candidates = mask.nonzero().squeeze(1)
            plans.append(candidates[torch.randperm(candidates.shape[0], generator=generator)[:keep]])
        return torch.stack(plans)

    def stochastic_steps(self, epoch: int) -> torch.Tensor:
        """`(T,)` bool: the steps sampled with the SDE this epoch. With `sample_sde_window_size`, a window whose start
        is drawn per epoch from `sample_sde_window_range` (the same on every process), else every step."""
        config = self.config
        size = config.sample_sde_window_size
        if size is None:
            return sde_window_mask(config.sample_num_steps, None)
        low, high = config.sde_window_range
        generator = torch.Generator().manual_seed(seed_for(config.seed, epoch, 4))
        start = low + int(torch.randint(high - size - low + 1, (1,), generator=generator))
        return sde_window_mask(config.sample_num_steps, size, start)

    # --------------------------------------------------------------- sampling
    def local_items(self, epoch: int) -> Tuple[List[str], List[dict]]:
        """This process's prompts of `epoch`, one per sample (`sample_images_per_prompt` in a row), and each one's
        metadata for the reward. Every process draws the epoch's whole list and takes its block, so a prompt and its
        metadata stay together on whichever process samples them."""
        config, acc = self.config, self.accelerator
        weights = None
        if self.prompt_difficulty is not None:
            # every process holds the same gathered statistics, so every process draws the same prompts
            weights = self.prompt_difficulty.weights(self.prompts.prompts)
        items = self.prompts.epoch_items(epoch, config.sample_num_prompts_per_epoch, config.seed, weights)
        per_process = len(items) // acc.num_processes
        mine = [item for item in items[acc.process_index * per_process : (acc.process_index + 1) * per_process]
                for _ in range(config.sample_images_per_prompt)]
        return [prompt for prompt, _ in mine], [metadata for _, metadata in mine]

    def local_prompts(self, epoch: int) -> List[str]:
        return self.local_items(epoch)[0]

    def global_sample_offset(self, num_local: int) -> int:
        """The global index of this process's first sample of an epoch (processes hold consecutive blocks of the
        epoch's `sample_num_prompts_per_epoch x sample_images_per_prompt` samples, whole prompt groups each)."""
        return self.accelerator.process_index * num_local

    def sample_generators(self, epoch: int, indices) -> List[torch.Generator]:
        """One generator per sample, seeded by its global index: the initial noise and every step's noise of a
        sample are the same whichever process draws it and however the batch is split."""
        return [torch.Generator(self.device).manual_seed(seed_for(self.config.seed, epoch, 10, i)) for i in indices]

    @torch.no_grad()
    def sample(self, epoch: int, prompts: List[str], compute_reference: bool, keep_reference_means: bool = False,
               progress: bool = False, first_index: Optional[int] = None) -> Trajectories:
        """Samples `prompts` (this process's block of the epoch, see `local_prompts`). Sample `i` of the block has
        the global index `first_index + i` (by default `global_sample_offset`), which seeds its noise and gives its
        group id: the prompt slot `global index // sample_images_per_prompt`."""
        config = self.config
        first = self.global_sample_offset(len(prompts)) if first_index is None else first_index
        indices = list(range(first, first + len(prompts)))
        generators = self.sample_generators(epoch, indices)
        group_ids = torch.tensor([i // config.sample_images_per_prompt for i in indices], dtype=torch.long)
        self.denoiser.eval()
        stochastic_steps = self.stochastic_steps(epoch)
        batches = []
        for start in tqdm(range(0, len(prompts), config.sample_batch_size), desc=f"epoch {epoch}: sampling",
                          leave=False, disable=not progress):
            chunk = prompts[start : start + config.sample_batch_size]
            with self.accelerator.autocast():
                batches.append(
                    sample_trajectories(
                        self.family,
                        chunk,
                        num_inference_steps=config.sample_num_steps,
                        guidance_scale=config.sample_guidance_scale,
                        height=self.resolution,
                        width=self.resolution,
                        generator=generators[start : start + config.sample_batch_size],
                        denoiser=self.denoiser,
                        ref_denoiser=self.ref_denoiser,
                        compute_reference=compute_reference,
                        keep_reference_means=keep_reference_means,
                        group_ids=group_ids[start : start + config.sample_batch_size],
                        kernel=self.kernel,
                        stochastic_steps=stochastic_steps,
                    )
                )
        return concat_trajectories(batches)

    def score(self, trajectories: Trajectories, metadata: Optional[List[dict]] = None) -> Dict[str, torch.Tensor]:
        """The reward (and eval reward) of each sample. `metadata` (one dict per sample, in the order of
        `trajectories.prompts`) holds its prompt's fields from a JSONL/CSV prompt file or dataset; the reward gets
        them with the sample's `group_id`."""
        from diffalign.rewards import call_reward, reward_name

        # a reward that raises, or returns None, strings or the wrong shape or count: one line naming it (RewardError)
        rows = metadata if metadata is not None else [{}] * len(trajectories)
        metadata = [{**row, "group_id": int(g)} for row, g in zip(rows, trajectories.group_ids)]
        rewards = call_reward(self.reward_fn, trajectories.images, trajectories.prompts, metadata,
                              name=getattr(self, "reward_label", None))
        scores = {"reward": rewards}
        for name, part in getattr(self.reward_fn, "last_parts", {}).items():
            scores[f"reward_{name}"] = torch.as_tensor(part, dtype=torch.float32).reshape(-1).cpu()
        if self.eval_reward_fn is not None:
            scores["eval"] = call_reward(self.eval_reward_fn, trajectories.images, trajectories.prompts, metadata,
                                         name=reward_name(self.eval_reward_fn, self.config.eval_reward))
        return scores

    # ------------------------------------------------------------- the loop
    def needs_reference(self) -> bool:
        return self.config.sample_compute_kl

    def keep_reference_means(self) -> bool:
        return False

    def train_on_samples(self, trajectories: Trajectories, rewards: torch.Tensor, all_rewards: torch.Tensor,
                         all_prompts: List[str], epoch: int) -> Dict[str, float]:
        raise NotImplementedError

    def step(self, epoch: int, progress: bool = False) -> Dict[str, float]:
        """One epoch: SAMPLING -> SCORING -> TRAINING. Returns the epoch's metrics."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        t0 = time.perf_counter()
        prompts, metadata = self.local_items(epoch)

        # ------------------------------------------------------------ SAMPLING
        trajectories = self.sample(epoch, prompts, self.needs_reference(), self.keep_reference_means(), progress)
        t1 = time.perf_counter()

        # ------------------------------------------------------------- SCORING
        scores = self.score(trajectories, metadata)
        rewards = scores["reward"]
        t2 = time.perf_counter()
        all_rewards = self.gather(rewards)
        all_prompts = gather_object(list(trajectories.prompts)) if acc.num_processes > 1 else list(prompts)
        metrics = {"epoch": epoch, "reward_mean": all_rewards.mean().item(), "reward_std": all_rewards.std().item(),
                   "reward_min": all_rewards.min().item(), "reward_max": all_rewards.max().item()}
        for key, value in scores.items():
            if key != "reward":
                name = "eval_mean" if key == "eval" else f"{key}_mean"
                metrics[name] = self.gather(value).mean().item()
        if self.prompt_difficulty is not None:
            self.prompt_difficulty.record(all_prompts, all_rewards.numpy())
            metrics["distinct_prompts"] = len(set(all_prompts))
        if trajectories.kl_to_ref is not None:
            metrics["kl_to_base"] = self.gather(trajectories.kl_to_ref.nanmean(dim=1)).mean().item()

        # ------------------------------------------------------------ TRAINING
        if not torch.isfinite(all_rewards).all():
            self._record_nonfinite("reward")
            metrics["skipped_nonfinite"] = 1.0
        else:
            self.denoiser.train()
            metrics.update(self.train_on_samples(trajectories, rewards, all_rewards, all_prompts, epoch))
            if metrics.get("skipped", 0) < 1:
                self.nonfinite_in_a_row = 0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")  # a skipped update
            self.lr_scheduler.step()
        t3 = time.perf_counter()
        metrics.update(
            lr=self.lr_scheduler.get_last_lr()[0],
            nonfinite_total=self.nonfinite_total,
            time_sample=t1 - t0,
            time_reward=t2 - t1,
            time_train=t3 - t2,
            time_epoch=t3 - t0,
            images=len(all_rewards),
        )
        if self.config.eval_every and (epoch + 1) % self.config.eval_every == 0:
            metrics.update(self.heldout_evaluation())
        return metrics

    @torch.no_grad()
    def heldout_evaluation(self) -> Dict[str, float]:
        """Reward (and eval reward) of fixed-seed samples of the held-out prompts (`eval_prompts`, `eval_prompt_file`
        or `eval_dataset_split`), of the EMA weights when `ema_decay` is set.

        Image `i` is held-out prompt `i` (cycled) with the noise of seed `(seed, i)` whatever the epoch, so the same
        weights give the same images and numbers, and a resumed run the uninterrupted run's. The images are shared
        out over the processes (each samples as many, so a sharded denoiser runs the same forwards everywhere) and
        the scores gathered; the global RNG is left as it was, so evaluating does not change the training."""
        config, acc = self.config, self.accelerator
        t0 = time.perf_counter()
        n = config.eval_num_images or len(self.heldout.prompts)
        items = self.heldout.grid_items(n, config.seed)
        mine = list(range(acc.process_index, n, acc.num_processes))
        per_process = math.ceil(n / acc.num_processes)
        index = mine + [mine[-1] if mine else 0] * (per_process - len(mine))  # padding, dropped after the gather
        generators = [torch.Generator(self.device).manual_seed(seed_for(config.seed, 2**31, 11, i)) for i in index]
        batches = []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.ema_weights():
            self.denoiser.eval()
            for start in range(0, per_process, config.sample_batch_size):
                chunk = index[start : start + config.sample_batch_size]
                with acc.autocast():
                    batches.append(sample_trajectories(
                        self.family, [items[i][0] for i in chunk], config.sample_num_steps, config.sample_guidance_scale,
                        height=self.resolution, width=self.resolution, generator=generators[start : start + len(chunk)],
                        denoiser=self.denoiser, kernel=self.kernel, group_ids=torch.tensor(chunk) % len(self.heldout.prompts),
                    ))
        trajectories = concat_trajectories(batches)
        scores = self.score(trajectories, [items[i][1] for i in index])
        real = torch.tensor([1.0] * len(mine) + [0.0] * (per_process - len(mine)))
        gathered_real = self.gather(real).bool()
        gathered_index = self.gather(torch.tensor(index, dtype=torch.long))[gathered_real]
        order = gathered_index.argsort()  # image order, whatever the number of processes
        metrics = {}
        for key, value in scores.items():
            values = self.gather(value.float())[gathered_real][order]
            name = {"reward": "heldout_reward", "eval": "heldout_eval"}.get(key, f"heldout_{key}")
            metrics[f"{name}_mean"] = values.mean().item()
            if key == "reward":
                metrics["heldout_reward_std"] = values.std().item() if len(values) > 1 else 0.0
        metrics["time_heldout"] = time.perf_counter() - t0
        return metrics

    def train(self, progress: bool = True) -> List[Dict]:
        """Runs epochs `first_epoch .. num_epochs - 1`, writing metrics, curves, grids, checkpoints and the result."""
        config, acc = self.config, self.accelerator
        tracker = tracking.RunTracker(self)  # report_to: accelerate's trackers (none by default)
        tracker.start()
        warn_if_offline(config)  # push_to_hub while offline: said now, the one-line error comes at the end
        if self.first_epoch == 0:
            self.save_grid("grid_before.png")  # every process samples (a sharded denoiser needs them all)
        bar = tqdm(range(self.first_epoch, config.num_epochs), desc=f"{self.algorithm}", disable=not (
            progress and acc.is_local_main_process), initial=self.first_epoch, total=config.num_epochs)
        for epoch in bar:
            metrics = self.step(epoch)
            self.metrics_history.append(metrics)
            if acc.is_main_process:  # strict JSON (non-finite values as null); a cut last line is tolerated
                append_metrics(os.path.join(config.output_dir, "metrics.jsonl"), metrics)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.4f}", **({"kl": f"{metrics['kl_to_base']:.2e}"} if
                                metrics.get("kl_to_base") is not None else {}))  # KL only when it is computed
                if epoch % config.log_every == 0:
                    logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in metrics.items()))
            tracker.log_epoch(metrics, epoch)
            if (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.num_epochs:
                self.save_checkpoint(epoch)
        self.save_final()
        self.save_grid("grid_after.png")
        if acc.is_main_process:
            self.plot()
        if config.final_eval_num_images:
            self.final_evaluation()
        if acc.is_main_process:
            write_model_card(self)  # final/README.md, after final_eval.json (its table) exists
        acc.wait_for_everyone()
        tracker.end()
        if config.push_to_hub and acc.is_main_process:
            push_to_hub(config)  # last: a failed push (one line) loses nothing
        return self.metrics_history

    @torch.no_grad()
    def final_evaluation(self) -> Dict[str, Dict[str, float]]:
        """Base vs trained model (its EMA with `ema_decay`) on the same prompts and seeds: mean reward, eval reward
        and KL to base. The prompts are the held-out ones when the config has them, else the training prompts."""
        config = self.config
        if not self._takes_part():
            return {}
        n = config.final_eval_num_images
        source = self.heldout if self.heldout is not None else self.prompts
        items = source.grid_items(n, config.seed + 1)
        prompts, metadata = [prompt for prompt, _ in items], [row for _, row in items]
        results = {}
        ref_module, ref_context = reference_model(self.denoiser, self.ref_denoiser)
        for name in ("base", "trained"):
            batches = []
            generator = torch.Generator(self.device).manual_seed(seed_for(config.seed, 2**31, 7))
            for start in range(0, n, config.sample_batch_size):
                chunk = prompts[start : start + config.sample_batch_size]
                context = ref_context() if name == "base" else self.ema_weights()
                with context, self.accelerator.autocast():
                    batches.append(sample_trajectories(
                        self.family, chunk, config.sample_num_steps, config.sample_guidance_scale,
                        height=self.resolution, width=self.resolution, generator=generator,
                        denoiser=ref_module if name == "base" else self.denoiser, ref_denoiser=self.ref_denoiser,
                        compute_reference=name == "trained", kernel=self.kernel,
                    ))
            trajectories = concat_trajectories(batches)
            scores = self.score(trajectories, metadata)
            results[name] = {"reward_mean": scores["reward"].mean().item(), "reward_std": scores["reward"].std().item()}
            if "eval" in scores:
                results[name]["eval_mean"] = scores["eval"].mean().item()
            if trajectories.kl_to_ref is not None:
                results[name]["kl_to_base"] = trajectories.kl_to_ref.nanmean().item()
        results["num_images"] = n
        if not self.accelerator.is_main_process:
            return results
        with open(os.path.join(config.output_dir, "final_eval.json"), "w") as f:
            json.dump(finite_json(results), f, indent=1, allow_nan=False)  # a NaN reward is written as null
        logger.info("final evaluation (%d images, fixed seeds): %s", n, json.dumps(results))
        return results

    # ----------------------------------------------------------------- outputs
    @torch.no_grad()
    def grid_images(self) -> torch.Tensor:
        return self.grid_trajectories().images

    @torch.no_grad()
    def grid_trajectories(self) -> Trajectories:
        """The fixed-seed grid samples (`grid_num_images`, `grid_prompts`) of the current weights."""
        config = self.config
        n = config.grid_num_images
        source = config.grid_prompts or self.prompts.grid_prompts(n, config.seed)
        prompts = [source[i % len(source)] for i in range(n)]
        generator = torch.Generator(self.device).manual_seed(seed_for(config.seed, 2**31))
        self.denoiser.eval()
        with self.ema_weights(), self.accelerator.autocast():
            trajectories = sample_trajectories(
                self.family, prompts, config.sample_num_steps, config.sample_guidance_scale,
                height=self.resolution, width=self.resolution, generator=generator, denoiser=self.denoiser,
                kernel=self.kernel,
            )
        return trajectories

    def _takes_part(self) -> bool:
        """Whether this process runs the main process's sampling (grids, final evaluation): every process when the
        denoiser is sharded (each forward gathers the weights from all of them), else the main one alone."""
        return self.sharded or self.accelerator.is_main_process

    def save_grid(self, filename: str):
        if not self._takes_part():
            return
        images = self.grid_images()
        if not self.accelerator.is_main_process:
            return
        nrow = math.ceil(math.sqrt(len(images)))
        image_grid(images, nrow=nrow, scale=grid_scale(self.resolution)).save(os.path.join(self.config.output_dir, filename))
        before = os.path.join(self.config.output_dir, "grid_before.png")
        if filename == "grid_after.png" and os.path.exists(before):
            from PIL import Image

            combined = labelled_rows([Image.open(before).convert("RGB"), image_grid(images, nrow=nrow, scale=grid_scale(
                self.resolution))], ["before", "after"], label_width=60)
            combined.save(os.path.join(self.config.output_dir, "grid_before_after.png"))

    def plot(self):
        records = self.read_metrics()
        keys = ["reward_mean", "eval_mean", "heldout_reward_mean", "kl_to_base", "loss"]
        keys += sorted({k for r in records for k in r if k.startswith("reward_") and k.endswith("_mean")} - {"reward_mean"})
        plot_metrics(records, keys, os.path.join(self.config.output_dir, "reward_curve.png"),
                     title=f"{self.algorithm.upper()} on {os.path.basename(str(self.config.model))}")

    def read_metrics(self) -> List[Dict]:
        # tolerant: a line cut by a kill mid-append is skipped with a warning
        return read_metrics(os.path.join(self.config.output_dir, "metrics.jsonl"))

    def save_final(self):
        """`final/pytorch_lora_weights.safetensors` (LoRA, in the family's diffusers format) or `final/unet/`
        (`final/transformer/`) for a full fine-tune, written atomically by the main process (from the gathered weights
        when the denoiser is sharded: every process takes part then). With `ema_decay`, the EMA weights."""
        with self.ema_weights():
            self._save_final()

    def _save_final(self):
        acc = self.accelerator
        module = unwrap(self.denoiser)
        full = None
        if self.sharded or engine_name(acc) == "deepspeed":
            names = list(self.trainable_names()) if self.config.use_lora else None
            full = full_parameters(acc, self.prepared, names, buffers=not self.config.use_lora)
        if not acc.is_main_process:
            return
        final = os.path.join(self.config.output_dir, "final")
        with full_state_dict_view(module, full) if full is not None else contextlib.nullcontext():
            if self.config.use_lora:
                atomic_save_dir(lambda tmp: self.family.save_lora(module, tmp), final)
            else:
                atomic_save_dir(lambda tmp: module.save_pretrained(
                    os.path.join(tmp, self.family.denoiser_name), safe_serialization=True), final)
        with open(os.path.join(self.config.output_dir, "config.json"), "w") as f:
            json.dump(self.config.to_dict(), f, indent=1, default=str)

    # ------------------------------------------------------- checkpoint/resume
    def trainable_names(self) -> List[str]:
        return [n for n, p in unwrap(self.prepared).named_parameters() if p.requires_grad]

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        """The trainable weights by name, full (gathered) on the main process; `{}` on the others when the denoiser
        is sharded. Collective then: call it on every process."""
        return full_parameters(self.accelerator, self.prepared, self.trainable_names())

    def extra_state(self) -> dict:
        """Algorithm state beyond the weights, saved in checkpoints (nested dicts/lists of JSON values and tensors).
        Called on every process."""
        if self.prompt_difficulty is None:
            return {}
        return {"prompt_difficulty": self.prompt_difficulty.state_dict()}

    def load_extra_state(self, state: dict):
        if self.prompt_difficulty is not None and "prompt_difficulty" in state:
            self.prompt_difficulty.load_state_dict(state["prompt_difficulty"])

    def save_checkpoint(self, epoch: int):
        """One checkpoint in the same format for every engine and process count: the weights and the optimizer state
        by parameter name, gathered from the shards when the denoiser is sharded, written by the main process
        (atomically, with a checksummed manifest: `diffalign.checkpoint`)."""
        acc = self.accelerator
        rng = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_to_list(np.random.get_state()),
            "python": random.getstate(),
        }
        extra = self.extra_state()  # on every process: it may gather per-process state
        model = self.trainable_state()  # on every process: collective when sharded
        optimizer = optimizer_state(acc, self.prepared, self.optimizer)
        if optimizer is None:  # DeepSpeed's partitioned optimizer is not saved (resume starts fresh moments)
            optimizer = {"engine": "deepspeed"}
        if acc.is_main_process:
            states = {
                "model": model,
                "optimizer": optimizer,
                "scheduler": self.lr_scheduler.state_dict(),
                "rng": rng,
                "trainer": {"epoch": epoch, "nonfinite_total": self.nonfinite_total,
                            "nonfinite_in_a_row": self.nonfinite_in_a_row, **extra},
            }
            if self.ema is not None:  # the average of the trained weights, by parameter name (float32)
                states["ema"] = self.ema.state_dict(self.trainable_names())
            save_checkpoint(self.config.output_dir, epoch, states, self.config.hash(), self.config.checkpoints_total_limit)
        acc.wait_for_everyone()

    def _load_resume(self, path: str, denoiser):
        """Loads the newest usable checkpoint of `path` (every process reads it) and puts its weights into
        `denoiser` before it is prepared; returns `(checkpoint, states)` for `_apply_resume`."""
        params = dict(denoiser.named_parameters())
        expected = {n: p for n, p in params.items() if p.requires_grad}

        def check(checkpoint: str, states: dict):
            # what the checkpoint's states must hold before anything is applied; a failure skips to the previous
            # complete checkpoint (or names the problem in one line)
            def bad(what: str):
                return CheckpointError(f"checkpoint '{checkpoint}' does not fit this run: {what}")

            model, trainer = states["model"], states["trainer"]
            if not isinstance(model, dict) or set(model) != set(expected):
                keys = set(model) if isinstance(model, dict) else set()
                raise bad(f"model.safetensors holds {len(keys)} tensors, {len(keys - set(expected))} unknown, "
                          f"{len(set(expected) - keys)} missing (of {len(expected)} trainable)")
            for name, value in model.items():
                if not isinstance(value, torch.Tensor) or value.shape != expected[name].shape:
                    raise bad(f"'{name}' has shape {getattr(value, 'shape', None)}, not {tuple(expected[name].shape)}")
            if not isinstance(trainer, dict):
                raise bad("trainer.json is not a mapping")
            for key in ("epoch", "nonfinite_total", "nonfinite_in_a_row"):
                if not isinstance(trainer.get(key), int) or isinstance(trainer.get(key), bool) or trainer[key] < 0:
                    raise bad(f"trainer.json has no valid '{key}'")
            rng = states["rng"]
            if not isinstance(rng, dict) or not {"torch", "numpy", "python"} <= set(rng):
                raise bad("rng.json lacks the torch, numpy or python state")
            for name in ("optimizer", "scheduler"):
                if not isinstance(states[name], dict):
                    raise bad(f"{name}.json is not a mapping")
            if ema:
                weights = states["ema"].get("weights") if isinstance(states["ema"], dict) else None
                if not isinstance(weights, dict) or set(weights) != set(expected) or any(
                        getattr(weights[n], "shape", None) != expected[n].shape for n in expected):
                    raise bad("ema.safetensors does not hold the EMA of every trainable weight")

        ema = bool(self.config.ema_decay)
        names = ["model", "optimizer", "scheduler", "rng", "trainer"] + (["ema"] if ema else [])
        checkpoint, manifest, states = load_resumable(
            path, names, config_hash=self.config.hash(), check=check,
            finite=["model", "optimizer", "scheduler"] + (["ema"] if ema else []),
        )
        with self._applying(checkpoint):
            with torch.no_grad():
                for name, value in states["model"].items():
                    params[name].data.copy_(value)
        return checkpoint, states

    @contextlib.contextmanager
    def _applying(self, checkpoint: str):
        try:
            yield
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise CheckpointError(f"checkpoint '{checkpoint}' cannot be applied to this run: {type(e).__name__}: "
                                  f"{detail}") from e

    def _apply_resume(self, checkpoint: str, states: dict):
        """The optimizer (each process takes its shard), LR schedule, RNG and trainer state of a loaded checkpoint."""
        with self._applying(checkpoint):
            optimizer = states["optimizer"]
            if engine_name(self.accelerator) == "deepspeed" or "param_groups" not in optimizer:
                logger.warning("checkpoint '%s': the optimizer state is not restored under DeepSpeed (fresh Adam "
                               "moments)", checkpoint)
            else:
                self.optimizer.state_dict()  # materialise accelerate's wrapper before loading
                load_optimizer_state(self.accelerator, self.prepared, self.optimizer, optimizer)
            self.lr_scheduler.load_state_dict(states["scheduler"])
            rng = states["rng"]
            torch.set_rng_state(rng["torch"])
            np.random.set_state(_numpy_state_from_list(rng["numpy"]))
            random.setstate(_to_tuple(rng["python"]))
            trainer = states["trainer"]
            self.first_epoch = trainer["epoch"] + 1
            self.nonfinite_total = trainer["nonfinite_total"]
            self.nonfinite_in_a_row = trainer["nonfinite_in_a_row"]
            self.load_extra_state(trainer)
            if self.ema is not None:
                self.ema.load_state_dict(states["ema"], self.trainable_names())
        # metrics.jsonl may hold epochs after the checkpoint (the run was killed later): drop them, rewriting the
        # file atomically (a kill during the rewrite leaves the old file whole)
        if self.accelerator.is_main_process:
            records = [r for r in self.read_metrics()
                       if isinstance(r.get("epoch"), int) and r["epoch"] < self.first_epoch]
            write_metrics(os.path.join(self.config.output_dir, "metrics.jsonl"), records)
            self.metrics_history = records
        logger.info("resumed from %s at epoch %d", checkpoint, self.first_epoch)


def _place(module, device, dtype):
    """Moves `module` to `device` and casts it only if its dtype differs (diffusers warns on needless casts)."""
    module.to(device)
    if module.dtype != dtype:
        module.to(dtype=dtype)
    return module


def _numpy_state_to_list(state) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _numpy_state_from_list(state) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, cached


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value
