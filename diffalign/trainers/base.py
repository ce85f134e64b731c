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
from typing import Dict, List

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError, atomic_save_dir, load_resumable, save_checkpoint
from ..config import TrainConfig
from ..errors import UserError
from ..runlog import append_metrics, prepare_output_dir, read_metrics, write_metrics
from ..validation import check_lora_target_modules
from ..families import load_family
from ..kernels import sde_window_mask
from ..modeling import add_lora
from ..plotting import grid_scale, image_grid, labelled_rows, plot_metrics
from ..prompts import PromptDifficulty, PromptError, prompt_source
from ..rollout import Trajectories, as_family, concat_trajectories, reference_model, sample_trajectories, unwrap

logger = logging.getLogger("diffalign")


class NonFiniteError(UserError, RuntimeError):
    """Too many non-finite rewards, losses or gradients in a row (or one, with `nonfinite_policy: error`)."""


def _launched_processes() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _seed_for(*parts: int) -> int:
    # A deterministic 63-bit seed from (seed, epoch, rank, purpose): resumed runs draw the same numbers.
    return int(np.random.default_rng(list(parts)).integers(0, 2**63 - 1))


class BaseTrainer:
    """Owns the epoch loop: sample trajectories, score them, update the policy, log and checkpoint.

    Args:
        config (`TrainConfig`): the run's settings.
        pipeline (`DiffusionPipeline` or `ModelFamily`, *optional*): a loaded pipeline of a supported family (SD,
            SDXL, SD3); by default `config.model` is loaded with its family (`diffalign.families`).
        reward_fn (*optional*): `reward(images, prompts, metadata) -> Tensor[B]`; by default `config.reward`.
        prompt_fn (*optional*): a `diffalign.prompts.PromptSource`; by default from the config's prompt fields.
        accelerator (`accelerate.Accelerator`, *optional*).
    """

    algorithm = "base"

    def __init__(self, config: TrainConfig, pipeline=None, reward_fn=None, prompt_fn=None, accelerator=None):
        from accelerate import Accelerator

        self.config = config
        # validate before the Accelerator is built (it fails on a bad mixed_precision with a traceback); the
        # process count is the launcher's until the Accelerator knows it
        config.validate(accelerator.num_processes if accelerator is not None else _launched_processes())
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available()
        )
        acc = self.accelerator
        config.validate(acc.num_processes)
        if acc.is_main_process:  # one run per output directory: lock it (and refuse to start over an earlier run)
            self._run_lock = prepare_output_dir(config.output_dir, resume=bool(config.resume_from), owner=self)
        self.device = acc.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True

        self.prompts = prompt_fn or prompt_source(config.prompts, config.prompt_file, config.prompt_fn)
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
            check_lora_target_modules(self.family.denoiser, config.lora_target_modules)
        self._setup_models()

        self.first_epoch = 0
        self.metrics_history: List[Dict] = []
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        if config.resume_from:
            self._resume(config.resume_from)

    # ------------------------------------------------------------------ setup
    def _setup_models(self):
        config, acc, family = self.config, self.accelerator, self.family
        for frozen in family.frozen_modules():
            _place(frozen.requires_grad_(False), self.device, self.weight_dtype)
        denoiser = family.denoiser
        self.ref_denoiser = None
        torch.manual_seed(config.seed)  # same LoRA initialisation on every process
        if config.use_lora:
            _place(denoiser, self.device, self.weight_dtype)
            add_lora(denoiser, config.lora_rank, config.lora_alpha,
                     config.lora_target_modules or family.default_lora_target_modules)
        else:
            self.ref_denoiser = _place(
                copy.deepcopy(denoiser).requires_grad_(False), self.device, self.weight_dtype
            ).eval()
            _place(denoiser.requires_grad_(True), self.device, torch.float32)
        if config.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        if config.enable_xformers and torch.cuda.is_available():
            denoiser.enable_xformers_memory_efficient_attention()
        self.trainable_params = [p for p in denoiser.parameters() if p.requires_grad]
        self._broadcast_parameters()
        optimizer = torch.optim.AdamW(
            self.trainable_params,
            lr=config.train_learning_rate,
            betas=(config.train_adam_beta1, config.train_adam_beta2),
            weight_decay=config.train_adam_weight_decay,
            eps=config.train_adam_epsilon,
        )
        warmup = config.train_lr_warmup_epochs
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: min(1.0, (epoch + 1) / warmup) if warmup else 1.0
        )
        # The denoiser is not wrapped in DDP: gradients are averaged explicitly in `sync_gradients`, which keeps the
        # multi-forward PRDP update and the adapter toggling simple. The optimizer goes through accelerate for the
        # fp16 gradient scaler.
        self.optimizer = acc.prepare(optimizer)
        self.denoiser = torch.compile(denoiser) if config.compile_unet else denoiser

    def _broadcast_parameters(self):
        if self.accelerator.num_processes > 1:
            import torch.distributed as dist

            for param in self.trainable_params:
                dist.broadcast(param.data, src=0)

    # ---------------------------------------------------------------- helpers
    def sync_gradients(self):
        """Averages the trainable parameters' gradients over processes (one flat all-reduce)."""
        if self.accelerator.num_processes == 1:
            return
        import torch.distributed as dist

        params = [p for p in self.trainable_params if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.accelerator.num_processes
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def optimizer_step(self) -> Dict[str, float]:
        """Syncs, clips and applies the accumulated gradients unless any is non-finite (then skips the step)."""
        self.sync_gradients()
        grad_norm = self.accelerator.clip_grad_norm_(self.trainable_params, self.config.train_max_grad_norm)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not finite and self.weight_dtype != torch.float16:
            # fp16's scaler legitimately skips overflowing steps; anything else is a real non-finite gradient.
            self._record_nonfinite("gradient")
        return {"grad_norm": grad_norm, "skipped": 0.0 if finite else 1.0}

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
        generator = torch.Generator().manual_seed(_seed_for(config.seed, epoch, 4))
        start = low + int(torch.randint(high - size - low + 1, (1,), generator=generator))
        return sde_window_mask(config.sample_num_steps, size, start)

    # --------------------------------------------------------------- sampling
    def local_prompts(self, epoch: int) -> List[str]:
        config, acc = self.config, self.accelerator
        weights = None
        if self.prompt_difficulty is not None:
            # every process holds the same gathered statistics, so every process draws the same prompts
            weights = self.prompt_difficulty.weights(self.prompts.prompts)
        prompts = self.prompts.epoch_prompts(epoch, config.sample_num_prompts_per_epoch, config.seed, weights)
        per_process = len(prompts) // acc.num_processes
        mine = prompts[acc.process_index * per_process : (acc.process_index + 1) * per_process]
        return [p for p in mine for _ in range(config.sample_images_per_prompt)]

    @torch.no_grad()
    def sample(self, epoch: int, prompts: List[str], compute_reference: bool, keep_reference_means: bool = False,
               progress: bool = False) -> Trajectories:
        config = self.config
        generator = torch.Generator(self.device).manual_seed(
            _seed_for(config.seed, epoch, self.accelerator.process_index, 1)
        )
        ids = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        group_ids = torch.tensor([ids[p] for p in prompts], dtype=torch.long)
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
                        generator=generator,
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

    def score(self, trajectories: Trajectories) -> Dict[str, torch.Tensor]:
        from diffalign.rewards import call_reward, reward_name

        # a reward that raises, or returns None, strings or the wrong shape or count: one line naming it (RewardError)
        metadata = [{"group_id": int(g)} for g in trajectories.group_ids]
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
        prompts = self.local_prompts(epoch)

        # ------------------------------------------------------------ SAMPLING
        trajectories = self.sample(epoch, prompts, self.needs_reference(), self.keep_reference_means(), progress)
        t1 = time.perf_counter()

        # ------------------------------------------------------------- SCORING
        scores = self.score(trajectories)
        rewards = scores["reward"]
        t2 = time.perf_counter()
        all_rewards = self.gather(rewards)
        all_prompts = gather_object(list(trajectories.prompts)) if acc.num_processes > 1 else list(prompts)
        metrics = {"epoch": epoch, "reward_mean": all_rewards.mean().item(), "reward_std": all_rewards.std().item()}
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
        if acc.num_processes > 1:
            metrics["params_max_rank_diff"] = self.parameter_divergence()
        return metrics

    @torch.no_grad()
    def parameter_divergence(self) -> float:
        """Largest difference of a parameter fingerprint across processes (0.0 when every rank holds the same
        weights, which explicit gradient averaging guarantees; logged so a desync can never go unnoticed)."""
        fingerprint = torch.stack([p.double().sum() for p in self.trainable_params]).sum().reshape(1)
        fingerprints = self.accelerator.gather(fingerprint.to(self.device))
        return (fingerprints.max() - fingerprints.min()).item()

    def train(self, progress: bool = True) -> List[Dict]:
        """Runs epochs `first_epoch .. num_epochs - 1`, writing metrics, curves, grids, checkpoints and the result."""
        config, acc = self.config, self.accelerator
        if self.first_epoch == 0 and acc.is_main_process:
            self.save_grid("grid_before.png")
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
            if (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.num_epochs:
                self.save_checkpoint(epoch)
        if acc.is_main_process:
            self.save_final()
            self.save_grid("grid_after.png")
            self.plot()
            if config.final_eval_num_images:
                self.final_evaluation()
        acc.wait_for_everyone()
        return self.metrics_history

    @torch.no_grad()
    def final_evaluation(self) -> Dict[str, Dict[str, float]]:
        """Base vs trained model on the same prompts and seeds: mean reward, eval reward and KL to base."""
        config = self.config
        n = config.final_eval_num_images
        prompts = self.prompts.grid_prompts(n, config.seed + 1)
        results = {}
        ref_module, ref_context = reference_model(self.denoiser, self.ref_denoiser)
        for name in ("base", "trained"):
            batches = []
            generator = torch.Generator(self.device).manual_seed(_seed_for(config.seed, 2**31, 7))
            for start in range(0, n, config.sample_batch_size):
                chunk = prompts[start : start + config.sample_batch_size]
                context = ref_context() if name == "base" else contextlib.nullcontext()
                with context, self.accelerator.autocast():
                    batches.append(sample_trajectories(
                        self.family, chunk, config.sample_num_steps, config.sample_guidance_scale,
                        height=self.resolution, width=self.resolution, generator=generator,
                        denoiser=ref_module if name == "base" else self.denoiser, ref_denoiser=self.ref_denoiser,
                        compute_reference=name == "trained", kernel=self.kernel,
                    ))
            trajectories = concat_trajectories(batches)
            scores = self.score(trajectories)
            results[name] = {"reward_mean": scores["reward"].mean().item(), "reward_std": scores["reward"].std().item()}
            if "eval" in scores:
                results[name]["eval_mean"] = scores["eval"].mean().item()
            if trajectories.kl_to_ref is not None:
                results[name]["kl_to_base"] = trajectories.kl_to_ref.nanmean().item()
        results["num_images"] = n
        with open(os.path.join(config.output_dir, "final_eval.json"), "w") as f:
            json.dump(results, f, indent=1)
        logger.info("final evaluation (%d images, fixed seeds): %s", n, json.dumps(results))
        return results

    # ----------------------------------------------------------------- outputs
    @torch.no_grad()
    def grid_images(self) -> torch.Tensor:
        config = self.config
        n = config.grid_num_images
        source = config.grid_prompts or self.prompts.grid_prompts(n, config.seed)
        prompts = [source[i % len(source)] for i in range(n)]
        generator = torch.Generator(self.device).manual_seed(_seed_for(config.seed, 2**31))
        self.denoiser.eval()
        with self.accelerator.autocast():
            trajectories = sample_trajectories(
                self.family, prompts, config.sample_num_steps, config.sample_guidance_scale,
                height=self.resolution, width=self.resolution, generator=generator, denoiser=self.denoiser,
                kernel=self.kernel,
            )
        return trajectories.images

    def save_grid(self, filename: str):
        images = self.grid_images()
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
        keys = ["reward_mean", "eval_mean", "kl_to_base", "loss"]
        keys += sorted({k for r in records for k in r if k.startswith("reward_") and k.endswith("_mean")} - {"reward_mean"})
        plot_metrics(records, keys, os.path.join(self.config.output_dir, "reward_curve.png"),
                     title=f"{self.algorithm.upper()} on {os.path.basename(str(self.config.model))}")

    def read_metrics(self) -> List[Dict]:
        # tolerant: a line cut by a kill mid-append is skipped with a warning
        return read_metrics(os.path.join(self.config.output_dir, "metrics.jsonl"))

    def save_final(self):
        """`final/pytorch_lora_weights.safetensors` (LoRA, in the family's diffusers format) or `final/unet/`
        (`final/transformer/`) for a full fine-tune, written atomically."""
        denoiser = unwrap(self.denoiser)
        final = os.path.join(self.config.output_dir, "final")
        if self.config.use_lora:
            atomic_save_dir(lambda tmp: self.family.save_lora(denoiser, tmp), final)
        else:
            atomic_save_dir(lambda tmp: denoiser.save_pretrained(
                os.path.join(tmp, self.family.denoiser_name), safe_serialization=True), final)
        with open(os.path.join(self.config.output_dir, "config.json"), "w") as f:
            json.dump(self.config.to_dict(), f, indent=1, default=str)

    # ------------------------------------------------------- checkpoint/resume
    def trainable_state(self) -> Dict[str, torch.Tensor]:
        names = {id(p): n for n, p in unwrap(self.denoiser).named_parameters()}
        return {names[id(p)]: p.detach() for p in self.trainable_params}

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
        acc = self.accelerator
        rng = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_to_list(np.random.get_state()),
            "python": random.getstate(),
        }
        extra = self.extra_state()  # on every process: it may gather per-process state
        if acc.is_main_process:
            states = {
                "model": self.trainable_state(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.lr_scheduler.state_dict(),
                "rng": rng,
                "trainer": {"epoch": epoch, "nonfinite_total": self.nonfinite_total,
                            "nonfinite_in_a_row": self.nonfinite_in_a_row, **extra},
            }
            save_checkpoint(self.config.output_dir, epoch, states, self.config.hash(), self.config.checkpoints_total_limit)
        acc.wait_for_everyone()

    def _resume(self, path: str):
        params = dict(unwrap(self.denoiser).named_parameters())
        expected = self.trainable_state()

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

        checkpoint, manifest, states = load_resumable(
            path, ["model", "optimizer", "scheduler", "rng", "trainer"], config_hash=self.config.hash(), check=check,
            finite=["model", "optimizer", "scheduler"],
        )
        try:
            for name, value in states["model"].items():
                params[name].data.copy_(value)
            self.optimizer.state_dict()  # materialise accelerate's wrapper before loading
            self.optimizer.load_state_dict(states["optimizer"])
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
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint '{checkpoint}' cannot be applied to this run: "
                                  f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
                                  ) from e
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
