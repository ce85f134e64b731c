"""The sample -> score -> update loop shared by the trainers, with its collaborators: the update planner
(`update_plan`), the `Checkpointer`, the `Evaluator` and the callbacks. An algorithm states its config class and its
loss (`compute_loss`, with `model_outputs`, `training_batch` and the other hooks of the loop section)."""

import contextlib
import copy
import json
import logging
import math
import os
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from ..checkpoint import atomic_save_dir, nothing_to_resume
from .base_config import TrainConfig
from ..distributed import (ddp_kwargs, engine_name, full_parameters, full_state_dict_view, gradient_sync, is_dtensor,
                           is_sharded, prepare_reference)
from .. import tracking
from ..errors import ConfigError, NonFiniteError
from ..runlog import append_metrics, prepare_output_dir, read_metrics, release_run_lock, write_metrics
from ..utils.redaction import redact, reveal
from ..families import load_family
from ..kernels import sde_window_mask
from ..memory import describe_levers, resolve_run_levers
from ..plotting import plot_metrics
from ..ema import ParameterEMA
from ..prompts import PromptDifficulty, PromptError, check_condition_prompts, heldout_prompt_source, prompt_source
from ..rollout import Trajectories, as_family, step_log_probs
from ..utils.peft_utils import add_lora, check_lora_target_modules, record_lora_config, unwrap
from ..utils.process_utils import launched_processes
from ..utils.torch_utils import seed_for, set_torch_threads
from .callbacks import HubCallback, ModelCardCallback, TrackerCallback, TrainerCallback, TrainerState
from .checkpointing import Checkpointer, trainable_names
from .evaluation import Evaluator, sample_in_chunks
from .update_plan import GlobalLayout, Rows, UpdatePlan, plan_updates, run_update, update_mode

logger = logging.getLogger("diffalign")


@dataclass
class TrainingBatch:
    """What an epoch's optimizer steps train on: this process's `trajectories` (replayed ones first) and per-sample
    values (`rewards`, `advantages`), plus the epoch's gathered rewards in global sample order (`all_rewards`)."""

    trajectories: Trajectories
    rewards: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    all_rewards: Optional[torch.Tensor] = None


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

    # The algorithm's config class; its `algorithm` is the trainer's name (declared once, on the config).
    config_class = TrainConfig
    algorithm = TrainConfig.algorithm
    # Whether the rollout keeps every latent of a trajectory (trainers that train on per-step transitions); trainers
    # that train on final samples only (forward-process losses) set it False, and the rollout keeps `x_0` alone.
    keeps_trajectory = True
    # How the loss of an optimizer step is formed (`diffalign.trainers.update_plan`): "rows", a mean over rows that
    # each micro-batch backpropagates on its own; "update", a loss that needs every row of the step at once (pairs).
    loss_scope = "rows"
    # The statistics `compute_loss` returns, in order; `row_stats`: those averaged over rows, not the loss weight
    # (loss_scope "update").
    loss_stats: Tuple[str, ...] = ("loss",)
    row_stats: Tuple[str, ...] = ()
    # The metrics an epoch reports of its optimizer steps (means over them), in order; by default the `loss_stats`
    # then the optimizer's `grad_norm` and `skipped`.
    update_metrics: Optional[Tuple[str, ...]] = None
    # The order of the two random draws of an inner epoch (step plan, unit order); each algorithm keeps the one its
    # runs were made with, so the same seed gives the same run.
    step_plan_first = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.algorithm = cls.config_class.algorithm

    def __new__(cls, config=None, *args, **kwargs):
        # checked before any `__init__` reads the config: a DDPO config given to PRDP is named, not an AttributeError
        if config is not None and not isinstance(config, cls.config_class):
            raise TypeError(f"{cls.__name__} takes a {cls.config_class.__name__}, not a {type(config).__name__} "
                            f"(load_config('{cls.algorithm}', ...) builds one)")
        return super().__new__(cls)

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
        config.check(accelerator.num_processes if accelerator is not None else launched_processes())
        # trackers (report_to) are checked here, before any model loads: a missing package is one line
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp_kwargs()],
            **tracking.accelerator_kwargs(config),
        )
        if accelerator is not None:
            tracking.check_accelerator(accelerator, config)
        acc = self.accelerator
        config.check(acc.num_processes)  # checked once per process count: the CLI's check holds unless it changed
        if config.resume_from and nothing_to_resume(config.resume_from):
            logger.info("%s has no checkpoint (the run stopped before its first one): starting from scratch",
                        config.resume_from)
            config.resume_from = None
        self._release_run_lock = lambda: None
        if acc.is_main_process:  # one run per output directory: lock it (and refuse to start over an earlier run)
            self._run_lock = prepare_output_dir(config.output_dir, resume=bool(config.resume_from))
            self._release_run_lock = weakref.finalize(self, release_run_lock, self._run_lock)
        self.device = acc.device
        self.checkpointer = Checkpointer(acc, config)
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

            reward_fn = get_reward(config.reward, **reveal(config.reward_kwargs, "reward_kwargs"))
        self.reward_fn = reward_fn
        self.eval_reward_fn = None
        if config.eval_reward:
            from diffalign.rewards import get_reward

            self.eval_reward_fn = get_reward(config.eval_reward,
                                             **reveal(config.eval_reward_kwargs, "eval_reward_kwargs"))

        quantization = {key: getattr(config, key) for key in ("quantize_denoiser", "quantize_text_encoders")}
        quantized = any(method != "none" for method in quantization.values())
        if pipeline is not None:
            self.family = as_family(pipeline)
            self.family.set_kernel_scheduler(self.family.pipe)
            if quantized:  # a pipeline built in memory: its linear layers are quantized where they are
                from ..quantization import quantize_pipeline_in_place

                quantize_pipeline_in_place(self.family, **quantization, compute_dtype=self.weight_dtype)
        elif quantized:  # quantized as it loads, its other layers already in the run's dtype
            self.family = load_family(config.resolved_model(), torch_dtype=self.weight_dtype, resolved=True,
                                      **quantization)
        else:
            self.family = load_family(config.resolved_model(), resolved=True)
        self.pipe = self.family.pipe
        self.pipe.set_progress_bar_config(disable=True)
        for source, what in ((self.prompts, "prompt"), (self.heldout, "held-out prompt")):  # condition images
            if source is not None:  # a text-to-image model given images, or an edit model more than it takes
                check_condition_prompts(source.prompts, self.family.name, self.family.max_condition_images, what,
                                        self.family.requires_condition_image, self.family.max_condition_videos,
                                        self.family.requires_condition_video, self.family.takes_last_image)
        self.family.configure(**config.family_kwargs())
        self.kernel = self.family.make_kernel(**config.kernel_kwargs())
        if config.sample_resolution:
            self.family.check_resolution(config.sample_resolution)
        self.resolution = config.sample_resolution or self.family.default_resolution()
        if config.use_lora:
            check_lora_target_modules(self.family.denoiser, config.lora_target_modules)
        self._setup_models()
        self.evaluator = Evaluator(
            config=config, accelerator=acc, family=self.family, kernel=self.kernel, resolution=self.resolution,
            denoiser=self.denoiser, ref_denoiser=self.ref_denoiser, sharded=self.sharded, prompts=self.prompts,
            heldout=self.heldout, ema_weights=self.ema_weights, score=self.score, gather=self.gather)

        self.first_epoch = 0
        self.metrics_history: List[Dict] = []
        # more `TrainerCallback`s, told after the built-in ones (trackers, model card, Hub push)
        self.callbacks: List[TrainerCallback] = []
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        if self._resume_states is not None:
            self._apply_resume(*self._resume_states)
            self._resume_states = None

    # ------------------------------------------------------------------ setup
    def _setup_models(self):
        config, acc, family = self.config, self.accelerator, self.family
        # the memory levers, `auto` resolved from the loaded model and the device (`diffalign.memory`)
        self.memory_levers = levers = resolve_run_levers(config, family, self.device, self.weight_dtype,
                                                         self.resolution)
        if acc.is_main_process:
            logger.info(describe_levers(levers))
        offloaded = levers["offload_text_encoders"]
        encoders = [getattr(self.pipe, n, None) for n in family.text_encoder_names] if offloaded else []
        for frozen in family.frozen_modules():
            # offloaded text encoders wait on the CPU (`ModelFamily.offload_text_encoders`)
            placed = torch.device("cpu") if any(frozen is e for e in encoders) else self.device
            _place(frozen.requires_grad_(False), placed, self.weight_dtype)
        family.offload_text_encoders = offloaded
        if levers["vae_slicing"]:
            self.pipe.vae.enable_slicing()
        if levers["vae_tiling"]:
            self.pipe.vae.enable_tiling()
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
        if levers["gradient_checkpointing"]:
            denoiser.enable_gradient_checkpointing()
        if config.enable_xformers and torch.cuda.is_available():
            denoiser.enable_xformers_memory_efficient_attention()
        if config.attention_backend:
            _set_attention_backend(denoiser, config.attention_backend)
        # a resumed run's weights go into the module before it is prepared (sharded engines split them then)
        self._resume_states = self.checkpointer.load(config.resume_from, denoiser) if config.resume_from else None
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
        self.denoiser = torch.compile(self.prepared) if config.compile_denoiser else self.prepared
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
        return sample_in_chunks(
            self.family, prompts, config.sample_batch_size, generators, self.accelerator.autocast,
            group_ids=group_ids, progress=progress, desc=f"epoch {epoch}: sampling",
            num_inference_steps=config.sample_num_steps, guidance_scale=config.sample_guidance_scale,
            height=self.resolution, width=self.resolution, denoiser=self.denoiser, ref_denoiser=self.ref_denoiser,
            compute_reference=compute_reference, keep_reference_means=keep_reference_means, kernel=self.kernel,
            stochastic_steps=self.stochastic_steps(epoch), keep_latents=self.keeps_trajectory,
            on_chunk=self._on_sampled_chunk, keep_step_means=self.keep_step_means(),
        )

    def score(self, trajectories: Trajectories, metadata: Optional[List[dict]] = None) -> Dict[str, torch.Tensor]:
        """The reward (and eval reward) of each sample, in one call. `metadata` (one dict per sample, in the order of
        `trajectories.prompts`) holds its prompt's fields from a JSONL/CSV prompt file or dataset; the reward gets
        them with the sample's `group_id` (a groupwise reward, the group ids too)."""
        # a reward that raises, or returns None, strings or the wrong shape or count: one line naming it (RewardError)
        return self.reward_scorer().score(trajectories.images, trajectories.prompts, metadata,
                                          trajectories.group_ids.cpu())

    # `step` sets it to its `EpochScoring.add` while it samples: `sample` hands over each chunk as it is decoded
    _on_sampled_chunk = None

    def reward_scorer(self):
        """How `reward_fn` and `eval_reward_fn` are called (`diffalign.rewards.scoring.RewardScorer`), asynchronously
        with `reward_async`, videos through `video_reward_reduction`; rebuilt when either is replaced."""
        from diffalign.rewards import reward_name
        from diffalign.rewards.scoring import RewardScorer

        scorer = getattr(self, "_reward_scorer", None)
        if (scorer is None or scorer.reward_fn is not self.reward_fn
                or scorer.eval_reward_fn is not self.eval_reward_fn
                or scorer.video_reduction != self.config.video_reward_reduction):
            scorer = self._reward_scorer = RewardScorer(
                self.reward_fn, getattr(self, "reward_label", None) or reward_name(self.reward_fn),
                self.eval_reward_fn, reward_name(self.eval_reward_fn, self.config.eval_reward),
                asynchronous=self.config.reward_async, video_reduction=self.config.video_reward_reduction)
        return scorer

    # ------------------------------------------------------------- the loop
    def needs_reference(self) -> bool:
        return self.config.sample_compute_kl

    def keep_reference_means(self) -> bool:
        return False

    def keep_step_means(self) -> bool:
        """Whether sampling keeps the policy's step means (`Trajectories.step_means`)."""
        return False

    # The algorithm's hooks: what it trains on (`training_batch`), the units and order of its optimizer steps, and
    # what it computes per micro-batch (`model_outputs`, `compute_loss`). The planning across processes, the padding
    # forwards, the loss scale, the gradient syncs and the two-pass trick are `diffalign.trainers.update_plan`'s.
    def training_batch(self, trajectories: Trajectories, rewards: torch.Tensor, all_rewards: torch.Tensor,
                       all_prompts: List[str], epoch: int) -> "TrainingBatch":
        """What the epoch's updates train on: this process's samples (on the device) and their per-sample values."""
        return TrainingBatch(trajectories.to(self.device), rewards=rewards.to(self.device),
                             all_rewards=all_rewards.detach().cpu().float())

    def unit_size(self) -> int:
        """Samples per unit of an optimizer step (a unit is never split across steps or processes)."""
        return 1

    def units_per_step(self, num_units: int) -> int:
        """Units per optimizer step over all processes."""
        return self.config.train_batch_size

    def loss_weight(self, batch: "TrainingBatch", units: torch.Tensor) -> Optional[int]:
        """The count the loss of the global `units` is a mean over, for loss_scope "update" (None: their rows)."""
        return None

    def prepare_step_plans(self, batch: "TrainingBatch", layout: GlobalLayout, stochastic, epoch: int):
        """Step plans of every inner epoch drawn before training (PRDP's lazy reference), or None to draw each
        inner epoch's plan with its order."""
        return None

    def model_outputs(self, model, batch: "TrainingBatch", rows: Rows):
        """The forward of a micro-batch of rows (with gradients when enabled): by default `log pi` of the recorded
        transitions `(rows.samples, rows.steps)` under `model`. With loss_scope "update", a tensor of one value per
        row."""
        with self.accelerator.autocast():
            log_probs, _, _ = step_log_probs(self.family, model, self.kernel, batch.trajectories, rows.samples,
                                             rows.steps, self.config.sample_guidance_scale)
        return log_probs

    def compute_loss(self, outputs, batch: "TrainingBatch", rows) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """`(loss, stats)` of the algorithm (the `loss_stats`). loss_scope "rows": of a micro-batch (`rows: Rows`),
        the loss and stats as means over its rows. loss_scope "update": of this process's part of an optimizer step
        (`rows: UpdatePlan`, `outputs` `(n, S)`), the loss as a mean over its loss weight and the stats as sums."""
        raise NotImplementedError

    def epoch_records(self, batch: "TrainingBatch") -> Dict[str, float]:
        """Metrics of the epoch's training beyond the update means."""
        return {}

    def run_update(self, batch: "TrainingBatch", plan: UpdatePlan, mode: str) -> Dict[str, float]:
        """Forwards and backwards of one optimizer step (`diffalign.trainers.update_plan.run_update`)."""
        return run_update(self, batch, plan, mode)

    def two_pass(self) -> Optional[bool]:
        """Two passes for loss_scope "update" (None: when a step needs more than one micro-batch)."""
        return None

    def draw_order_and_plan(self, num_units: int, stochastic, generator: torch.Generator):
        """An inner epoch's unit order and `(num_global, S)` step plan, drawn in the algorithm's order."""
        if not self.keeps_trajectory:
            return torch.randperm(num_units, generator=generator), None
        if self.step_plan_first:
            plan = self.train_step_plan(stochastic, generator)
            return torch.randperm(num_units, generator=generator), plan
        order = torch.randperm(num_units, generator=generator)
        return order, self.train_step_plan(stochastic, generator)

    def train_on_samples(self, trajectories: Trajectories, rewards: torch.Tensor, all_rewards: torch.Tensor,
                         all_prompts: List[str], epoch: int) -> Dict[str, float]:
        """K inner epochs over the epoch's global batch: each optimizer step takes units (samples or prompt groups)
        of a global permutation (the same on every process and for any number of processes); each process
        backpropagates its own rows among them, and the step's gradient is the global mean."""
        config, acc = self.config, self.accelerator
        batch = self.training_batch(trajectories, rewards, all_rewards, all_prompts, epoch)
        layout = GlobalLayout(len(batch.trajectories), len(rewards), acc.num_processes, acc.process_index)
        stochastic = layout.global_rows(batch.trajectories.stochastic.cpu()) if self.keeps_trajectory else None
        generator = torch.Generator().manual_seed(seed_for(config.seed, epoch, 2))
        plans = self.prepare_step_plans(batch, layout, stochastic, epoch)
        unit = self.unit_size()
        num_units = layout.num_global // unit
        totals = {key: 0.0 for key in self.update_metrics or self.loss_stats + ("grad_norm", "skipped")}
        num_updates = 0
        for inner in range(config.train_num_inner_epochs):
            if plans is not None:
                order, plan = torch.randperm(num_units, generator=generator), plans[inner]
            else:
                order, plan = self.draw_order_and_plan(num_units, stochastic, generator)
            weight = None
            if self.loss_scope == "update":
                weight = lambda units: self.loss_weight(batch, units)  # noqa: E731
            for update in plan_updates(layout, order, unit, self.units_per_step(num_units), plan,
                                       config.train_micro_batch_size, weight, sorted_samples=unit > 1):
                stats = self.run_update(batch, update, update_mode(self.loss_scope, self.two_pass(), update.slots))
                stats.update(self.optimizer_step())
                for key in totals:
                    totals[key] += stats.get(key, 0.0)
                num_updates += 1
        metrics = {key: value / max(num_updates, 1) for key, value in totals.items()}
        metrics.update(self.epoch_records(batch))
        return metrics

    def step(self, epoch: int, progress: bool = False) -> Dict[str, float]:
        """One epoch: SAMPLING -> SCORING -> TRAINING. Returns the epoch's metrics."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        t0 = time.perf_counter()
        prompts, metadata = self.local_items(epoch)

        # ------------------------------------------------ SAMPLING, SCORING each chunk as it is sampled
        # (`reward_async`: in a background thread while the next chunk samples; `diffalign.rewards.scoring`)
        with self.reward_scorer().epoch(metadata, self.config.sample_images_per_prompt) as scoring:
            self._on_sampled_chunk = scoring.add
            try:
                trajectories = self.sample(epoch, prompts, self.needs_reference(), self.keep_reference_means(),
                                           progress)
            finally:
                self._on_sampled_chunk = None
            t1 = time.perf_counter()
            scoring_in_sampling = scoring.blocked_seconds
            scores = scoring.finish(trajectories)
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
            time_sample=t1 - t0 - scoring_in_sampling,
            time_reward=t2 - t1 + scoring_in_sampling,  # what the loop waited for; the calls: time_reward_calls
            time_reward_calls=scoring.call_seconds,
            time_train=t3 - t2,
            time_epoch=t3 - t0,
            images=len(all_rewards),
        )
        if self.config.eval_every and (epoch + 1) % self.config.eval_every == 0:
            metrics.update(self.heldout_evaluation())
        return metrics

    def heldout_evaluation(self) -> Dict[str, float]:
        """Reward of fixed-seed samples of the held-out prompts (`Evaluator.heldout_evaluation`)."""
        return self.evaluator.heldout_evaluation()

    def train(self, progress: bool = True) -> List[Dict]:
        """Runs epochs `first_epoch .. num_epochs - 1`, writing metrics, curves, grids, checkpoints and the result;
        the callbacks (trackers, the model card, the Hub push, then `self.callbacks`) are told along the way.

        Log lines (the per-epoch metrics) go through `tqdm.write` while the progress bar runs, so that they do not
        run on from the bar; the run directory is unlocked when the run ends (finished, failed or interrupted)."""
        from tqdm.contrib.logging import logging_redirect_tqdm

        try:
            with logging_redirect_tqdm():
                return self._train(progress)
        finally:
            self._release_run_lock()

    def _train(self, progress: bool) -> List[Dict]:
        config, acc = self.config, self.accelerator
        state = TrainerState(config, acc, family=self.family, resolution=self.resolution,
                             reward_label=self.reward_label, scored_grid=self.evaluator.scored_grid,
                             metrics_history=self.metrics_history, epoch=self.first_epoch - 1)
        callbacks = [TrackerCallback(state), ModelCardCallback(), HubCallback()] + list(self.callbacks)
        for callback in callbacks:
            callback.on_train_begin(state)
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
            state.epoch, state.metrics_history = epoch, self.metrics_history
            for callback in callbacks:
                callback.on_epoch_end(state, metrics)
            if (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.num_epochs:
                self.save_checkpoint(epoch)
        self.save_final()
        self.save_grid("grid_after.png")
        if acc.is_main_process:
            self.plot()
        if config.final_eval_num_images:
            self.final_evaluation()
        state.metrics_history = self.metrics_history
        if acc.is_main_process:  # the model card's example prompt
            state.grid_prompt = (config.grid_prompts or self.prompts.grid_prompts(1, config.seed))[0]
        for callback in callbacks:
            callback.on_save(state)
        acc.wait_for_everyone()
        for callback in callbacks:
            callback.on_train_end(state)
        return self.metrics_history

    def final_evaluation(self) -> Dict[str, Dict[str, float]]:
        """Base vs trained model on the same prompts and seeds (`Evaluator.final_evaluation`)."""
        return self.evaluator.final_evaluation()

    # ----------------------------------------------------------------- outputs
    def grid_images(self) -> torch.Tensor:
        return self.evaluator.grid_trajectories().images

    def grid_trajectories(self) -> Trajectories:
        """The fixed-seed grid samples of the current weights (`Evaluator.grid_trajectories`)."""
        return self.evaluator.grid_trajectories()

    def save_grid(self, filename: str):
        self.evaluator.save_grid(filename)

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
            # secrets never reach a file; the levers as resolved beside the settings (`auto` says how they were set)
            json.dump({**redact(self.config.to_dict()), "resolved_memory_levers": self.memory_levers}, f, indent=1,
                      default=str)

    # ------------------------------------------------------- checkpoint/resume
    def trainable_names(self) -> List[str]:
        return trainable_names(self.prepared)

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        """The trainable weights by name, full (gathered) on the main process; `{}` on the others when the denoiser
        is sharded. Collective then: call it on every process."""
        return full_parameters(self.accelerator, self.prepared, self.trainable_names())

    def extra_state(self) -> dict:
        """Algorithm state beyond the weights, saved in checkpoints (nested dicts/lists of JSON values and tensors).
        Called on every process."""
        state = {}
        history = self.family.encoding_history()
        if history is not None:  # how the prompt cache was filled: a resumed run rebuilds it bit for bit
            state["prompt_encodings"] = history
        if self.prompt_difficulty is not None:
            state["prompt_difficulty"] = self.prompt_difficulty.state_dict()
        return state

    def load_extra_state(self, state: dict):
        if "prompt_encodings" in state:
            self.family.replay_encodings(state["prompt_encodings"])
        if self.prompt_difficulty is not None and "prompt_difficulty" in state:
            self.prompt_difficulty.load_state_dict(state["prompt_difficulty"])

    def save_checkpoint(self, epoch: int):
        """One checkpoint in the same format for every engine and process count (`Checkpointer.save`)."""
        self.checkpointer.save(epoch, self.prepared, self.optimizer, self.lr_scheduler, self.ema, lambda: {
            "epoch": epoch, "nonfinite_total": self.nonfinite_total, "nonfinite_in_a_row": self.nonfinite_in_a_row,
            **self.extra_state()})

    def _apply_resume(self, checkpoint: str, states: dict):
        """The optimizer (each process takes its shard), LR schedule, RNG and trainer state of a loaded checkpoint."""
        checkpointer = self.checkpointer
        with checkpointer.applying(checkpoint):
            trainer = checkpointer.apply(checkpoint, states, self.prepared, self.optimizer, self.lr_scheduler)
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


def _set_attention_backend(denoiser, backend: str):
    """diffusers' `set_attention_backend` on the denoiser; a one-line `ConfigError` for an unknown backend or one
    whose package or hardware is missing."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = [b.value for b in AttentionBackendName]
    if backend not in known:
        raise ConfigError(f"attention_backend '{backend}' is not a diffusers backend; known: {', '.join(known)}")
    processors = [getattr(m, "processor", None) for m in unwrap(denoiser).modules()]
    if not any(hasattr(p, "_attention_backend") for p in processors):  # diffusers would ignore the setting
        raise ConfigError(f"attention_backend '{backend}': this {type(unwrap(denoiser)).__name__}'s attention "
                          f"processors take no backend (diffusers dispatches FLUX-style processors only); use "
                          f"enable_xformers or leave it unset")
    try:
        denoiser.set_attention_backend(backend)
    except (ImportError, RuntimeError, ValueError) as e:
        raise ConfigError(f"attention_backend '{backend}': {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                          ) from None


def _place(module, device, dtype):
    """Moves `module` to `device` and casts it only if its dtype differs (diffusers warns on needless casts). A
    quantized module (`diffalign.quantization`) keeps its storage: it is moved only if it is elsewhere (bitsandbytes
    refuses some moves), never cast."""
    from ..quantization import is_quantized

    if is_quantized(module):
        if next(module.parameters()).device.type != torch.device(device).type:
            module.to(device)
        return module
    module.to(device)
    if module.dtype != dtype:
        module.to(dtype=dtype)
    return module
