"""Training configurations: one flat dataclass per algorithm, loaded from YAML presets and CLI overrides.

Precedence is defaults < YAML file (`--config path-or-preset`) < `--key value` flags. Unknown keys, values of the
wrong type and impossible batch arithmetic raise `ConfigError` with one line naming the problem.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Dict, List, Optional, Union

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A user error in a configuration (reported as one line, exit code 2, by the CLI)."""


def did_you_mean(word: str, candidates, prefix: str = "") -> str:
    """`"; did you mean '<prefix><closest>'?"` for the candidate closest to `word` (difflib), or `""` when none is
    close. Dashes and underscores count as the same character (`--sample-num-steps` is `sample_num_steps`)."""
    import difflib

    normal = {str(c).replace("-", "_"): str(c) for c in candidates}
    match = difflib.get_close_matches(word.replace("-", "_"), list(normal), n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{normal[match[0]]}'?" if match else ""


# Fields of the held-out evaluation: it samples with its own seeds and leaves the training untouched (not hashed).
HELDOUT_KEYS = frozenset({"eval_every", "eval_prompts", "eval_prompt_file", "eval_dataset_split", "eval_num_images"})
# Fields added after runs were made, hashed only when set: earlier runs' checkpoints keep their hash.
HASHED_WHEN_SET = frozenset({"prompt_dataset", "prompt_dataset_split", "prompt_column", "ema_decay", "ema_update_every"})


# Fields that say where a run is reported and published, not what it trains (left out of `TrainConfig.hash`).
LOGGING_KEYS = frozenset({"report_to", "tracker_project_name", "run_name", "log_images_every", "push_to_hub",
                          "hub_model_id", "hub_private", "hub_license", "hub_base_model"})


@dataclass
class TrainConfig:
    """Settings shared by all trainers, grouped as run, prompts and reward, model, sampling, training, reliability,
    logging and the Hub.

    Each field's `help` metadata documents it; `diffalign train ddpo --help` prints them all with their defaults.
    """

    # > Parameters that control the run
    model: str = field(
        default="digits",
        metadata={"help": "Local diffusers model directory (a StableDiffusion, StableDiffusionXL, StableDiffusion3 or "
                          "Flux pipeline), or a bundled model: `digits` (UNet), `digits-flow` (SD3 architecture)."},
    )
    output_dir: str = field(default="runs/diffalign", metadata={"help": "Output directory of the run."})
    seed: int = field(default=0, metadata={"help": "Seed; each process samples with seed + rank."})
    num_epochs: int = field(default=100, metadata={"help": "Epochs: one epoch samples, scores, then updates."})
    mixed_precision: str = field(default="no", metadata={"help": "`no`, `fp16` or `bf16` (accelerate)."})
    allow_tf32: bool = field(default=True, metadata={"help": "Allow TF32 matmuls on Ampere+ GPUs."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for UNet activation memory."})
    enable_xformers: bool = field(default=False, metadata={"help": "xformers attention (CUDA and the extra only)."})
    compile_unet: bool = field(default=False, metadata={"help": "torch.compile the UNet."})
    num_threads: Optional[int] = field(
        default=None,
        metadata={"help": "Torch CPU threads per process (torch.set_num_threads). Default: 1 for the bundled models "
                          "(digits, digits-flow) on a CPU, where one thread is the fastest on a shared machine and makes "
                          "a run bit-reproducible on any core count; torch's default otherwise."},
    )

    # > Prompts and reward
    prompts: Optional[List[str]] = field(default=None, metadata={"help": "Training prompts (cycled)."})
    prompt_file: Optional[str] = field(
        default=None,
        metadata={"help": "Prompt file: text, one prompt per line; or .jsonl / .csv rows with a prompt_column and "
                          "per-prompt metadata (the other fields) for the reward."},
    )
    prompt_fn: Optional[str] = field(
        default=None, metadata={"help": "Prompt source: `digits`, `simple_animals`, or `module:function` (user code)."}
    )
    prompt_dataset: Optional[str] = field(
        default=None,
        metadata={"help": "A Hugging Face `datasets` dataset on this machine (never the hub): a save_to_disk directory, "
                          "a directory of data files, or one .jsonl/.json/.csv/.parquet file; needs the `datasets` "
                          "extra. The other columns of a row are its prompt's metadata for the reward."},
    )
    prompt_dataset_split: str = field(default="train", metadata={"help": "Split of prompt_dataset to train on."})
    prompt_column: str = field(
        default="prompt",
        metadata={"help": "Column of the prompt in a .jsonl/.csv prompt_file, eval_prompt_file or prompt_dataset; the "
                          "other columns are handed to the reward as per-prompt metadata (e.g. GenEval's tag, include)."},
    )
    reward: Union[str, dict] = field(
        default="jpeg_compressibility",
        metadata={"help": "Reward name, `module:function` (user code), or a {name: weight} mixture."},
    )
    reward_kwargs: Dict[str, Any] = field(default_factory=dict, metadata={"help": "Keyword arguments of the reward."})
    eval_reward: Optional[Union[str, dict]] = field(
        default=None,
        metadata={"help": "A second scorer (name, module:function or mixture) logged on every epoch, never trained on."},
    )
    eval_reward_kwargs: Dict[str, Any] = field(default_factory=dict, metadata={"help": "Keyword arguments of it."})

    # > Model
    use_lora: bool = field(default=True, metadata={"help": "Train a peft LoRA adapter (else the full denoiser)."})
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=4.0, metadata={"help": "LoRA alpha (scale alpha / r)."})
    lora_target_modules: Optional[List[str]] = field(
        default=None,
        metadata={"help": "Denoiser modules given LoRA; default the family's (SD/SDXL: to_q, to_k, to_v, to_out.0; "
                          "SD3: also the text stream's add_q/k/v_proj and to_add_out, as Flow-GRPO; FLUX: these and "
                          "the feed-forwards, as diffusers' train_dreambooth_lora_flux.py)."},
    )

    # > Parameters that control sampling
    sample_num_steps: int = field(default=50, metadata={"help": "Denoising steps of each trajectory."})
    sample_eta: float = field(default=1.0, metadata={"help": "DDIM eta (> 0; 1.0 is DDPM), UNet families."})
    sample_noise_level: float = field(
        default=0.7, metadata={"help": "Flow-GRPO SDE noise level a (> 0), flow-matching families (SD3, FLUX)."}
    )
    sample_max_sequence_length: Optional[int] = field(
        default=None,
        metadata={"help": "T5 tokens per prompt (SD3, FLUX; the pipelines' max_sequence_length); default the "
                          "pipeline's (SD3 256, FLUX 512). Flow-GRPO trains SD3.5 with 128."},
    )
    sample_sde_window_size: Optional[int] = field(
        default=None,
        metadata={"help": "Sample only this many consecutive steps stochastically (the rest with the deterministic "
                          "ODE step) and train only those (Flow-GRPO-Fast, MixGRPO); default every step."},
    )
    sample_sde_window_range: Optional[List[int]] = field(
        default=None,
        metadata={"help": "[low, high): each epoch the SDE window starts at a step drawn uniformly so that it fits "
                          "in this range; default [0, sample_num_steps]."},
    )
    sample_guidance_scale: float = field(
        default=5.0,
        metadata={"help": "CFG scale (1.0 = no CFG, also in training); for FLUX the optional true CFG with an empty "
                          "negative prompt (FluxPipeline's `true_cfg_scale`; 1.0 = off, FLUX.1-dev's usual setting)."},
    )
    sample_embedded_guidance: float = field(
        default=3.5,
        metadata={"help": "FLUX.1-dev's embedded guidance, a transformer input (FluxPipeline's `guidance_scale`); "
                          "other families and models without `guidance_embeds` ignore it."},
    )
    sample_resolution: Optional[int] = field(default=None, metadata={"help": "Image side; default the model's."})
    sample_num_prompts_per_epoch: int = field(default=8, metadata={"help": "Prompts per epoch, all processes (N)."})
    sample_images_per_prompt: int = field(default=4, metadata={"help": "Images per prompt (B), one group."})
    sample_batch_size: int = field(default=8, metadata={"help": "Trajectories per sampling forward."})
    sample_compute_kl: bool = field(
        default=True, metadata={"help": "Record the reference model at sampling, to log KL to base every epoch."}
    )
    sample_prompt_selection: str = field(
        default="uniform",
        metadata={"help": "`uniform`, or `moderate`: draw each epoch's prompts from the list (with replacement) "
                          "weighted by the spread of their recent rewards, so prompts every sample already solves, "
                          "or none does, are drawn less (a prompt list only)."},
    )

    # > Parameters that control training
    train_learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate."})
    train_adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    train_adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    train_adam_weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    train_adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    train_max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip."})
    train_num_inner_epochs: int = field(default=1, metadata={"help": "Passes over each epoch's samples (K)."})
    train_timestep_fraction: float = field(default=1.0, metadata={"help": "Fraction of steps trained per sample."})
    train_micro_batch_size: int = field(
        default=16, metadata={"help": "(sample, step) rows per UNet forward+backward in training (memory knob)."}
    )
    train_lr_warmup_epochs: int = field(default=0, metadata={"help": "Linear learning-rate warm-up, in epochs."})
    ema_decay: float = field(
        default=0.0,
        metadata={"help": "Keep an exponential moving average of the trained weights with this decay (0 = off; "
                          "Flow-GRPO: 0.9) and use it for the after grid, the evaluations and the saved result; "
                          "training goes on from the live weights. Warms up as min(decay, (1 + n) / (10 + n))."},
    )
    ema_update_every: int = field(
        default=8, metadata={"help": "Optimizer steps between two EMA updates (Flow-GRPO: 8)."}
    )

    # > Reliability and outputs
    checkpoint_every: int = field(default=10, metadata={"help": "Save a resumable checkpoint every N epochs."})
    checkpoints_total_limit: int = field(default=3, metadata={"help": "How many checkpoints to keep."})
    resume_from: Optional[str] = field(default=None, metadata={"help": "Run directory or checkpoint to resume."})
    nonfinite_policy: str = field(
        default="skip", metadata={"help": "`skip` a batch with a NaN/inf reward, loss or gradient, or `error`."}
    )
    max_nonfinite_in_a_row: int = field(default=5, metadata={"help": "Stop after this many skipped batches in a row."})
    grid_num_images: int = field(default=16, metadata={"help": "Images in the before/after grids (fixed seeds)."})
    grid_prompts: Optional[List[str]] = field(default=None, metadata={"help": "Prompts of the grids (default: cycled)."})
    log_every: int = field(default=1, metadata={"help": "Print a metrics line every N epochs."})
    final_eval_num_images: int = field(
        default=0,
        metadata={"help": "After training, score this many fixed-seed samples of the base and of the trained model "
                          "(reward, eval reward, KL to base) into final_eval.json; 0 = off."},
    )
    eval_every: int = field(
        default=0,
        metadata={"help": "Every N epochs, score fixed-seed samples of the held-out prompts (eval_prompts, "
                          "eval_prompt_file or eval_dataset_split) with the reward and eval_reward, logged as "
                          "heldout_reward_mean, heldout_eval_mean; the same weights give the same numbers. 0 = off."},
    )
    eval_prompts: Optional[List[str]] = field(default=None, metadata={"help": "Held-out prompts."})
    eval_prompt_file: Optional[str] = field(
        default=None, metadata={"help": "Held-out prompt file (text, .jsonl or .csv, as prompt_file)."}
    )
    eval_dataset_split: Optional[str] = field(
        default=None, metadata={"help": "Held-out split of prompt_dataset (e.g. `test`)."}
    )
    eval_num_images: Optional[int] = field(
        default=None,
        metadata={"help": "Images per held-out evaluation, the held-out prompts in order (cycled); default one per "
                          "prompt. With held-out prompts the final evaluation uses them too."},
    )

    # > Logging and the Hub
    report_to: Optional[str] = field(
        default=None,
        metadata={"help": "Experiment trackers, through accelerate: `tensorboard` (under <output_dir>/logs), `wandb`, "
                          "`trackio`, `mlflow`, several comma-separated, or `all` (every one installed); each is a pip "
                          "extra (`diffalign[tensorboard]`, ..., `diffalign[trackers]`). Default: none "
                          "(metrics.jsonl is always written)."},
    )
    tracker_project_name: str = field(default="diffalign", metadata={"help": "Project of the trackers' runs."})
    run_name: Optional[str] = field(
        default=None, metadata={"help": "Trackers' run name; default the output directory's name."}
    )
    log_images_every: int = field(
        default=10,
        metadata={"help": "With report_to: log a fixed-seed sample grid captioned with prompts and rewards every N "
                          "epochs and after the last (grid_num_images images); 0 = off."},
    )
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "Upload final/ (weights, model card, before/after grid) to the Hub repo hub_model_id at the "
                          "end (token from `hf auth login` or HF_TOKEN). A failed push is one error line; every output "
                          "stays on disk."},
    )
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "Hub repo, `name` or `owner/name`."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo private."})
    hub_license: Optional[str] = field(
        default=None,
        metadata={"help": "Model card licence; default the base model's (from its README.md), else `other`."},
    )
    hub_base_model: Optional[str] = field(
        default=None,
        metadata={"help": "Hub id of the base model for the card's base_model, when `model` is a local directory that "
                          "is not a hub cache snapshot."},
    )

    algorithm = "base"

    def validate(self, num_processes: int = 1):
        """Checks values and batch arithmetic; raises `ConfigError`."""
        for f in dataclasses.fields(self):  # NaN passes every `<=` check below: refuse non-finite numbers first
            value = getattr(self, f.name)
            if isinstance(value, float) and (value != value or abs(value) == float("inf")):
                raise ConfigError(f"{f.name} must be a finite number; got {value}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be one of no, fp16, bf16; got '{self.mixed_precision}'")
        if self.sample_eta <= 0:
            raise ConfigError(f"sample_eta must be > 0 (log-probabilities need a stochastic sampler); got {self.sample_eta}")
        for name in ("num_epochs", "sample_num_steps", "sample_num_prompts_per_epoch", "sample_images_per_prompt",
                     "sample_batch_size", "train_num_inner_epochs", "train_micro_batch_size", "lora_rank",
                     "checkpoint_every", "checkpoints_total_limit", "grid_num_images", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.sample_noise_level <= 0:
            raise ConfigError(f"sample_noise_level must be > 0 (log-probabilities need a stochastic sampler); got "
                              f"{self.sample_noise_level}")
        if self.sample_sde_window_size is not None:
            if not 1 <= self.sample_sde_window_size <= self.sample_num_steps:
                raise ConfigError(f"sample_sde_window_size must be in [1, sample_num_steps={self.sample_num_steps}] "
                                  f"for training; got {self.sample_sde_window_size}")
            low, high = self.sde_window_range
            if not (0 <= low and high <= self.sample_num_steps and high - low >= self.sample_sde_window_size):
                raise ConfigError(f"sample_sde_window_range {[low, high]} must lie in [0, {self.sample_num_steps}] "
                                  f"and hold the window of {self.sample_sde_window_size} steps")
        elif self.sample_sde_window_range is not None:
            raise ConfigError("sample_sde_window_range needs sample_sde_window_size")
        if not 0 < self.train_timestep_fraction <= 1:
            raise ConfigError(f"train_timestep_fraction must be in (0, 1]; got {self.train_timestep_fraction}")
        if self.sample_prompt_selection not in ("uniform", "moderate"):
            raise ConfigError(
                f"sample_prompt_selection must be 'uniform' or 'moderate'; got '{self.sample_prompt_selection}'"
            )
        if self.nonfinite_policy not in ("skip", "error"):
            raise ConfigError(f"nonfinite_policy must be 'skip' or 'error'; got '{self.nonfinite_policy}'")
        if self.sample_num_prompts_per_epoch % num_processes:
            raise ConfigError(
                f"sample_num_prompts_per_epoch ({self.sample_num_prompts_per_epoch}) must be divisible by the number "
                f"of processes ({num_processes})"
            )
        sources = [s for s in (self.prompts, self.prompt_file, self.prompt_fn, self.prompt_dataset) if s]
        if len(sources) > 1:
            raise ConfigError("give only one of prompts, prompt_file, prompt_fn, prompt_dataset")
        for name in ("prompts", "grid_prompts", "eval_prompts"):
            value = getattr(self, name)
            if value is not None and (not value or not all(isinstance(p, str) and p.strip() for p in value)):
                raise ConfigError(f"{name} must be a non-empty list of non-empty prompts; got {value!r}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2^63); got {self.seed}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads must be >= 1; got {self.num_threads}")
        if self.sample_resolution is not None and self.sample_resolution < 1:
            raise ConfigError(f"sample_resolution must be a positive number of pixels; got {self.sample_resolution}")
        limits = {  # name: (lowest, whether the lowest is allowed, highest or None)
            "train_learning_rate": (0.0, False, None), "train_adam_beta1": (0.0, True, 1.0),
            "train_adam_beta2": (0.0, True, 1.0), "train_adam_epsilon": (0.0, True, None),
            "train_adam_weight_decay": (0.0, True, None), "train_max_grad_norm": (0.0, False, None),
            "lora_alpha": (0.0, False, None), "train_lr_warmup_epochs": (0, True, None),
            "final_eval_num_images": (0, True, None), "max_nonfinite_in_a_row": (1, True, None),
        }
        for name, (low, inclusive, high) in limits.items():
            value = getattr(self, name, None)
            if value is None:
                continue
            if value < low or (value == low and not inclusive) or (high is not None and value >= high):
                interval = f"{'[' if inclusive else '('}{low:g}, {high:g})" if high is not None else (
                    f"{'>=' if inclusive else '>'} {low:g}")
                raise ConfigError(f"{name} must be {'in ' if high is not None else ''}{interval}; got {value}")
        if isinstance(self.reward, dict) and not self.reward:
            raise ConfigError("reward: an empty mixture; give a reward name or {name: weight, ...}")
        if not isinstance(self.reward, (str, dict)):
            raise ConfigError(f"reward must be a name, 'module:function' or a {{name: weight}} mixture; got "
                              f"{self.reward!r}")
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise ConfigError(f"output_dir '{self.output_dir}' is a file, not a directory: choose another --output_dir")
        if self.resume_from and not os.path.exists(self.resume_from):
            raise ConfigError(f"resume path '{self.resume_from}' does not exist")
        self._validate_logging()
        self._validate_heldout_and_ema()

    def _validate_heldout_and_ema(self):
        """The prompt columns, the held-out evaluation and the EMA."""
        for name in ("prompt_column", "prompt_dataset_split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ConfigError(f"{name} must be a non-empty name; got {getattr(self, name)!r}")
        heldout = [name for name in ("eval_prompts", "eval_prompt_file", "eval_dataset_split") if getattr(self, name)]
        if len(heldout) > 1:
            raise ConfigError(f"give only one held-out prompt source; got {', '.join(heldout)}")
        if self.eval_dataset_split and not self.prompt_dataset:
            raise ConfigError("eval_dataset_split is a split of prompt_dataset: set prompt_dataset (or use "
                              "eval_prompts / eval_prompt_file)")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be >= 0 (0 = off); got {self.eval_every}")
        if self.eval_every and not heldout:
            raise ConfigError(f"eval_every {self.eval_every} needs held-out prompts: eval_prompts, eval_prompt_file "
                              f"or eval_dataset_split")
        if self.eval_num_images is not None and self.eval_num_images < 1:
            raise ConfigError(f"eval_num_images must be >= 1; got {self.eval_num_images}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1) (0 = off; Flow-GRPO uses 0.9); got {self.ema_decay}")
        if self.ema_update_every < 1:
            raise ConfigError(f"ema_update_every must be >= 1; got {self.ema_update_every}")

    def _validate_logging(self):
        """`report_to`, the trackers' names and the Hub settings (package checks wait for the trainer)."""
        import re

        from .tracking import parse_report_to

        parse_report_to(self.report_to)
        if self.log_images_every < 0:
            raise ConfigError(f"log_images_every must be >= 0 (0 = off); got {self.log_images_every}")
        for name in ("tracker_project_name", "run_name", "hub_license", "hub_base_model"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ConfigError(f"{name} must not be empty")
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("push_to_hub needs hub_model_id (the Hub repo, `name` or `owner/name`)")
        for name in ("hub_model_id", "hub_base_model"):
            value = getattr(self, name)
            if value is not None and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", value):
                raise ConfigError(f"{name} must be a Hub repo id, `name` or `owner/name`; got '{value}'")

    @property
    def num_sde_steps(self) -> int:
        """Stochastic steps per trajectory: the SDE window's, or every step."""
        return self.sample_num_steps if self.sample_sde_window_size is None else self.sample_sde_window_size

    @property
    def sde_window_range(self) -> List[int]:
        if self.sample_sde_window_range is None:
            return [0, self.sample_num_steps]
        if len(self.sample_sde_window_range) != 2:
            raise ConfigError(f"sample_sde_window_range must be [low, high]; got {self.sample_sde_window_range}")
        return list(self.sample_sde_window_range)

    @property
    def num_train_steps(self) -> int:
        """Denoising steps trained per sample (`timestep_fraction` of the stochastic steps, at least 1)."""
        return max(1, int(self.num_sde_steps * self.train_timestep_fraction))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self, resolve_model: bool = True) -> str:
        """A short hash of the settings that define the run (resuming with different ones is refused).

        A local model directory counts by its real path, so the same model given by a symlink or a relative path is
        the same run (`resolve_model=False`: as written, the hash of checkpoints from before)."""
        ignored = {"resume_from", "num_threads", "num_epochs", "checkpoint_every", "checkpoints_total_limit", "log_every", "output_dir"}
        ignored |= LOGGING_KEYS  # where a run reports to does not define it (and keeps older checkpoints' hashes)
        ignored |= HELDOUT_KEYS
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in HASHED_WHEN_SET}
        ignored |= {k for k, default in defaults.items() if getattr(self, k) == default}
        if not self.ema_decay:
            ignored.add("ema_update_every")  # meaningless without EMA
        items = {k: v for k, v in self.to_dict().items() if k not in ignored}
        from .modeling import BUNDLED_MODELS  # torch: hash() runs where the models do

        model = items.get("model")
        if resolve_model and isinstance(model, str) and model not in BUNDLED_MODELS and os.path.isdir(model):
            items["model"] = os.path.realpath(model)  # a bundled name wins over a directory of that name, as it loads
        return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class DDPOConfig(TrainConfig):
    """DDPO (Black et al., 2023): PPO-clipped policy gradient over denoising steps.

    > Parameters that control advantages and the update
    """

    advantage_mode: str = field(
        default="per_prompt",
        metadata={"help": "`per_prompt` (running tracker, batch fallback), `group` (GRPO) or `batch`."},
    )
    per_prompt_buffer_size: int = field(default=16, metadata={"help": "Rewards kept per prompt by the tracker."})
    per_prompt_min_count: int = field(default=16, metadata={"help": "Tracker size before per-prompt statistics."})
    group_global_std: bool = field(default=False, metadata={"help": "Group mode: divide by the batch std."})
    train_batch_size: int = field(
        default=8, metadata={"help": "Samples per optimizer step, over all processes (the run does not depend on their "
                                     "number)."})
    train_clip_range: float = field(default=1e-4, metadata={"help": "PPO ratio clip eps."})
    train_adv_clip_max: float = field(default=5.0, metadata={"help": "Advantages are clipped to +-this."})
    train_kl_coef: float = field(default=0.0, metadata={"help": "Weight of the per-step KL to the base model."})
    train_reuse_epochs: int = field(
        default=0,
        metadata={"help": "Also train on the samples of the last N epochs, with the log-probs and advantages recorded "
                          "when they were drawn: the PPO ratio against the policy that sampled them corrects for their "
                          "age and the clip bounds the step. Lets an epoch sample fewer fresh images."},
    )
    sample_compute_kl: bool = field(
        default=False,
        metadata={"help": "Run the base model at sampling to log KL to base every epoch (costs ~30% of an epoch; "
                          "PRDP always has it for free). The final evaluation reports it either way."},
    )

    algorithm = "ddpo"

    def validate(self, num_processes: int = 1):
        super().validate(num_processes)
        for name in ("train_batch_size", "per_prompt_buffer_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("train_clip_range", "train_adv_clip_max"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0; got {getattr(self, name)}")
        for name in ("train_kl_coef", "per_prompt_min_count"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.advantage_mode not in ("per_prompt", "group", "batch"):
            raise ConfigError(f"advantage_mode must be per_prompt, group or batch; got '{self.advantage_mode}'")
        samples = self.sample_num_prompts_per_epoch * self.sample_images_per_prompt
        if samples % self.train_batch_size:
            raise ConfigError(
                f"samples per epoch ({samples} = sample_num_prompts_per_epoch x sample_images_per_prompt) must be "
                f"divisible by train_batch_size ({self.train_batch_size}, samples per optimizer step over all processes)"
            )
        if self.train_reuse_epochs < 0:
            raise ConfigError(f"train_reuse_epochs must be >= 0; got {self.train_reuse_epochs}")
        if self.advantage_mode == "group" and self.sample_images_per_prompt < 2:
            raise ConfigError("advantage_mode 'group' needs sample_images_per_prompt >= 2")


@dataclass
class PRDPConfig(TrainConfig):
    """PRDP (Deng et al., CVPR 2024): reward-difference regression with proximal (clipped) updates.

    Defaults follow the paper's small-scale setting (Table 4) where it is algorithm-specific; beta and clip_eps are
    expressed against per-dimension-mean log-probs (see `diffalign.logprob`).
    """

    train_beta: float = field(default=3e-5, metadata={"help": "KL weight beta: targets are (r_a - r_b) / beta."})
    train_clip_eps: float = field(default=1e-6, metadata={"help": "Per-step clip eps of the log-ratio around theta_old."})
    train_prompts_per_step: int = field(
        default=0,
        metadata={"help": "Prompts (groups of B images) per optimizer step, over all processes; 0 = all of the epoch's, "
                          "i.e. one update per inner epoch as in Algorithm 1."},
    )
    train_two_pass: Optional[bool] = field(
        default=None,
        metadata={"help": "Exact gradient with activations for one micro-batch at a time (one extra no-grad forward), "
                          "so memory is bounded by train_micro_batch_size. Default: two passes when an update has "
                          "more (sample, step) rows than one micro-batch, else one pass (the same gradient)."},
    )
    train_num_inner_epochs: int = field(default=10, metadata={"help": "Gradient updates per epoch over all pairs (K)."})
    sample_compute_kl: bool = field(
        default=True,
        metadata={"help": "Record pi_ref at every sampling step and log KL to base every epoch. The loss needs pi_ref "
                          "only at the trained steps: with train_timestep_fraction < 1, `false` computes it for "
                          "those steps alone (cheaper; no per-epoch KL). With every step trained it is always on."},
    )

    algorithm = "prdp"

    def validate(self, num_processes: int = 1):
        super().validate(num_processes)
        if self.sample_images_per_prompt < 2:
            raise ConfigError("PRDP needs pairs: sample_images_per_prompt must be >= 2")
        if self.train_beta <= 0:
            raise ConfigError(f"train_beta must be > 0; got {self.train_beta}")
        if self.train_clip_eps <= 0:
            raise ConfigError(f"train_clip_eps must be > 0; got {self.train_clip_eps}")
        if self.train_prompts_per_step < 0:
            raise ConfigError(f"train_prompts_per_step must be >= 0; got {self.train_prompts_per_step}")
        if self.train_prompts_per_step and self.sample_num_prompts_per_epoch % self.train_prompts_per_step:
            raise ConfigError(
                f"sample_num_prompts_per_epoch ({self.sample_num_prompts_per_epoch}) must be divisible by "
                f"train_prompts_per_step ({self.train_prompts_per_step}, prompts per optimizer step over all processes)"
            )


@dataclass
class NFTConfig(TrainConfig):
    """DiffusionNFT (Zheng et al., 2025, arXiv 2509.16117): negative-aware fine-tuning on the forward process.

    Defaults are NVIDIA's (NVlabs/DiffusionNFT `config/base.py`, `config/nft.py`): CFG-free deterministic sampling
    with the old policy, one optimizer step per epoch, 9 of 10 sampling noise levels trained per sample.

    > Parameters that control the implicit policies and the old policy
    """

    train_beta: float = field(
        default=1.0,
        metadata={"help": "beta > 0: the step of the implicit policies from the old one, v+- = v_old +- beta (v_theta - "
                          "v_old) (NVIDIA's `beta`: 1.0; 0.1 for their OCR and multi-reward presets)."})
    train_adv_clip_max: float = field(
        default=5.0, metadata={"help": "Advantages are clipped to +-this before the optimality probability; also the "
                                       "scale of the policy loss (NVIDIA's `train.adv_clip_max`)."})
    train_adv_mode: str = field(
        default="all", metadata={"help": "Optimality probability from the advantage: `all`, `positive_only`, "
                                         "`negative_only`, `one_only` or `binary` (NVIDIA's `train.adv_mode`)."})
    train_kl_coef: float = field(
        default=1e-4, metadata={"help": "Weight of mean (v_theta - v_base)^2 on raw outputs, the base being the model "
                                        "without adapters (NVIDIA's `train.beta`); 0 skips the base model's forward."})
    train_batch_size: int = field(
        default=0, metadata={"help": "Samples per optimizer step, over all processes; 0 = all of the epoch's (one "
                                     "step per epoch, NVIDIA's `gradient_step_per_epoch: 1`)."})
    old_policy_decay_type: int = field(
        default=1, metadata={"help": "Schedule of the old (sampling) policy's EMA after each epoch, by optimizer steps "
                                     "i: 0 on-policy (a copy); 1 min(0.001 i, 0.5); 2 0 until i = 75 then "
                                     "min(0.0075 (i - 75), 0.999) (NVIDIA's `decay_type`)."})
    sample_deterministic: bool = field(
        default=True, metadata={"help": "Sample with the ODE step of the family's scheduler (no SDE noise); the loss "
                                        "needs only final samples, from any solver."})
    sample_guidance_scale: float = field(
        default=1.0, metadata={"help": "CFG scale of sampling and of the trained policy (1.0 = CFG-free, NVIDIA's)."})
    train_timestep_fraction: float = field(
        default=0.99, metadata={"help": "Fraction of the sampling noise levels each sample is trained at "
                                        "(int(steps x fraction), at least 1; 0.99 of 10 = 9)."})

    algorithm = "nft"

    @property
    def num_train_steps(self) -> int:
        """Noise levels trained per sample: `timestep_fraction` of the sampling steps, at least 1."""
        return max(1, int(self.sample_num_steps * self.train_timestep_fraction))

    def validate(self, num_processes: int = 1):
        super().validate(num_processes)
        from .forward_process import OLD_POLICY_DECAY_TYPES
        from .losses import OPTIMALITY_MODES

        for name in ("train_beta", "train_adv_clip_max"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0; got {getattr(self, name)}")
        for name in ("train_kl_coef", "train_batch_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.train_adv_mode not in OPTIMALITY_MODES:
            raise ConfigError(f"train_adv_mode must be one of {', '.join(OPTIMALITY_MODES)}; got "
                              f"'{self.train_adv_mode}'")
        if self.old_policy_decay_type not in OLD_POLICY_DECAY_TYPES:
            raise ConfigError(f"old_policy_decay_type must be one of {', '.join(map(str, OLD_POLICY_DECAY_TYPES))}; "
                              f"got {self.old_policy_decay_type}")
        if not self.use_lora:
            raise ConfigError("nft needs use_lora: true (the old policy and the base model are adapters of one model)")
        samples = self.sample_num_prompts_per_epoch * self.sample_images_per_prompt
        if self.train_batch_size and samples % self.train_batch_size:
            raise ConfigError(
                f"samples per epoch ({samples} = sample_num_prompts_per_epoch x sample_images_per_prompt) must be "
                f"divisible by train_batch_size ({self.train_batch_size}, samples per optimizer step over all processes)"
            )


# The algorithm registry: `diffalign train <name>`, presets, `bench` and the Python API all read it. Adding an algorithm
# is a config class here (with its `algorithm` name) and its trainer in `diffalign/trainers/` (whose `config_class` is
# that class), listed in `diffalign.trainers.TRAINERS`.
CONFIG_CLASSES = {cls.algorithm: cls for cls in (DDPOConfig, PRDPConfig, NFTConfig)}


def trainer_class(algorithm: str):
    """The trainer class of a registered algorithm (imported on demand: the CLI parses configs without torch)."""
    from diffalign.trainers import TRAINERS

    return TRAINERS[algorithm]


def preset_path(name_or_path: str) -> str:
    """A YAML path, or the name of a preset shipped in `diffalign.configs` (with or without `.yaml`)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    name = name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml"
    candidate = resources.files("diffalign.configs").joinpath(name)
    if candidate.is_file():
        return str(candidate)
    presets = sorted(p.name[:-5] for p in resources.files("diffalign.configs").iterdir() if p.name.endswith(".yaml"))
    hint = did_you_mean(os.path.basename(name_or_path)[:-5] if name_or_path.endswith(".yaml") else name_or_path,
                        presets)
    raise ConfigError(f"config '{name_or_path}' is neither a file nor a preset{hint} (presets: {', '.join(presets)})")


# ------------------------------------------------------------------------------------------------ parsing (TrlParser)
# `load_config` is TRL's `TrlParser` pattern on transformers' `HfArgumentParser`: the YAML file (or preset) and Python
# overrides become the parser's defaults, then the command line is parsed over them into the config dataclass. Its
# argparse options come from the dataclass fields alone (names, both spellings, `help` metadata, defaults), so fields
# added to the config classes need nothing here. `ConfigParser` adapts what HfArgumentParser does not do, each for a
# reason given where it is done: one-line `ConfigError`s instead of argparse's usage-and-exit, YAML values on the
# command line, and type checks of the YAML and Python values (argparse converts strings only).

_YAML_NULLS = frozenset({"null", "Null", "NULL", "~"})


def _hf_argparser():
    """transformers' `hf_argparser` module, without importing `transformers` when it is not loaded yet.

    `import transformers` takes ~0.7 s (its dependency checks and hub utilities) and would be in `sys.modules` after
    `diffalign train ... --help`, which promises neither; `hf_argparser.py` itself needs only the standard library
    and PyYAML, so that one file is loaded on its own. A transformers whose file needs more falls back to the regular
    import.
    """
    import importlib.util
    import sys

    for name in ("transformers.hf_argparser", "diffalign._hf_argparser"):
        if name in sys.modules:
            return sys.modules[name]
    try:
        location = importlib.util.find_spec("transformers").submodule_search_locations[0]
        spec = importlib.util.spec_from_file_location("diffalign._hf_argparser",
                                                      os.path.join(location, "hf_argparser.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (AttributeError, ImportError, OSError, SyntaxError):  # no such file, or it imports more now
        from transformers import hf_argparser as module

        return module
    sys.modules["diffalign._hf_argparser"] = module
    return module


def _members(tp) -> tuple:
    """The members of a Union other than None (`Optional[X]` -> `(X,)`), else `(tp,)`."""
    if typing.get_origin(tp) in (Union, getattr(types, "UnionType", Union)):
        return tuple(a for a in typing.get_args(tp) if a is not type(None))
    return (tp,)


def _allows_none(tp) -> bool:
    return typing.get_origin(tp) in (Union, getattr(types, "UnionType", Union)) and type(None) in typing.get_args(tp)


_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
          dict: "a mapping"}


def _kind(tp):
    """`str`, `int`, `float`, `bool`, `list`, `dict` or `Any` for an annotation this parser checks, else None."""
    if tp is Any:
        return Any
    origin = typing.get_origin(tp) or tp
    return origin if origin in _KINDS else None


def _check(name: str, value, tp):
    """`value` (from YAML or Python) as annotated by `tp`, ints widened to floats, or a one-line `ConfigError`.

    HfArgumentParser takes the values it is given as defaults (a YAML file's) as they are unless they are strings, as
    argparse does: this check is what makes `num_epochs: 2.5` in a file an error rather than a crash later.
    """
    if value is None and (_allows_none(tp) or tp is Any):
        return None
    members = _members(tp)
    if len(members) > 1:
        for member in members:
            try:
                return _check(name, value, member)
            except ConfigError:
                pass
        kinds = " or ".join(dict.fromkeys(_KINDS.get(_kind(m), _type_name(m)) for m in members))
        raise ConfigError(f"{name}: expected {kinds}, got {value!r}")
    (tp,) = members
    kind = _kind(tp)
    if kind is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp) or (Any,)
        return [_check(name, item, item_type) for item in value]
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if kind in (bool, int, float, str):
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{name}: expected {_KINDS[kind]}, got {value!r}")
    return value


def _from_text(name: str, text: str, tp):
    """A command-line string as a value of `tp`: numbers and booleans as written (transformers' `string_to_bool`,
    plus on/off), lists and mappings as YAML flow (`[a, b]`, `{pickscore: 10}`), a YAML null for an optional field.

    A field taking a string or something else (`reward`: a name or a mixture) tries the other types first and keeps
    the text otherwise, so a name is never re-read as YAML (`no`, `hpsv2.1` stay strings).
    """
    if text in _YAML_NULLS and _allows_none(tp):
        return None
    members = sorted(_members(tp), key=lambda m: m is str)  # str last: the fallback
    problems = []
    for member in members:
        kind = _kind(member)
        if kind is str:
            return text
        try:
            if kind is bool:
                if text.lower() in ("on", "off"):
                    return text.lower() == "on"
                try:
                    return _hf_argparser().string_to_bool(text)
                except argparse.ArgumentTypeError:
                    raise ConfigError(f"{name}: expected true or false, got {text!r}") from None
            if kind is int:
                try:
                    return int(text)
                except ValueError:
                    raise ConfigError(f"{name}: expected an integer, got {text!r}") from None
            if kind is float:
                try:
                    return float(text)
                except ValueError:
                    raise ConfigError(f"{name}: expected a number, got {text!r}") from None
            return _check(name, _parse_cli_value(text), member)
        except ConfigError as e:
            problems.append(e)
    if len(problems) == 1:
        raise problems[0]
    raise ConfigError(f"{name}: expected {' or '.join(_KINDS.get(_kind(m), _type_name(m)) for m in members)}, "
                      f"got {text!r}")


class _CliType:
    """The argparse `type=` of a field: `_from_text`, its `ConfigError` as argparse's `ArgumentTypeError`."""

    def __init__(self, name: str, tp):
        self.name, self.tp = name, tp
        self.__name__ = _type_name(tp)  # argparse names the type in some messages

    def __call__(self, text: str):
        try:
            return _from_text(self.name, text, self.tp)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None


def _metavar(tp) -> str:
    kinds = [_kind(m) for m in _members(tp)]
    if None in kinds:
        return None
    names = {str: "STR", int: "INT", float: "FLOAT", bool: "BOOL", list: "LIST", dict: "MAPPING", Any: "YAML"}
    return "|".join(dict.fromkeys(names[k] for k in kinds))


def _config_parser(cls):
    """An `HfArgumentParser` of the config class `cls` (a subclass defined on first use: its base loads lazily)."""
    import copy
    import re

    HfArgumentParser = _hf_argparser().HfArgumentParser

    class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
        """argparse's help with defaults, one spelling per key (the description says both work)."""

        def __init__(self, prog):
            super().__init__(prog, max_help_position=36)

        def _format_action_invocation(self, action):
            if not action.option_strings or action.nargs == 0:
                return super()._format_action_invocation(action)
            metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
            return f"{action.option_strings[0]} {metavar}"

    class ConfigParser(HfArgumentParser):
        """HfArgumentParser of one config class, with these adaptations:

        - errors raise a one-line `ConfigError` (the CLI prints it, exit code 2) instead of printing the usage and
          exiting: `error()` raises and `exit_on_error=False` lets `argparse.ArgumentError` through to `parse`;
        - every field takes one value, read as its annotation says (`_from_text`): lists and mappings as YAML flow,
          `--prompts '[a cat, a dog]'` (HfArgumentParser's `nargs="+"` would make `--prompts notalist` a list and
          `--reward '{pickscore: 10}'` is no type it can call); `Union[str, Dict]` fields, which it narrows to one
          type, get both;
        - a boolean, `Optional[bool]` too, may stand alone (`--use_lora`); its `--no_<name>` stays out of `--help`;
        - no abbreviations (`--sample_num_step` is a typo to report with a suggestion, not `--sample_num_steps`);
        - `-1e-4` and `-inf` are values, not options (argparse knows only `-1` and `-.5`);
        - the dataclass's fields are left as they are (HfArgumentParser narrows `field.type` in place).
        """

        def __init__(self):
            self.hints = typing.get_type_hints(cls)
            super().__init__(cls, prog=f"diffalign train {cls.algorithm}", add_help=False, allow_abbrev=False,
                             exit_on_error=False, formatter_class=HelpFormatter)
            self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf(inity)?$",
                                                       re.IGNORECASE)

        def _parse_dataclass_field(self, parser, field):
            start = len(parser._actions)
            try:
                HfArgumentParser._parse_dataclass_field(parser, copy.copy(field))
            except (ValueError, TypeError):  # a Union it refuses (not Optional[X], no str): one value, read by type
                default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
                spellings = dict.fromkeys([f"--{field.name}", f"--{field.name.replace('_', '-')}"])
                parser.add_argument(*spellings, default=default, help=field.metadata.get("help"))
            hint = self.hints[field.name]
            for action in parser._actions[start:]:
                if isinstance(action, argparse._StoreFalseAction):  # `--no_<name>`: works, not listed
                    action.help = argparse.SUPPRESS
                    continue
                action.help = (action.help or "").replace("%", "%%")
                if action.choices is not None or any(_kind(m) is None for m in _members(hint)):
                    continue  # Literal / Enum choices, or a type this parser does not know: HfArgumentParser's own
                action.type = _CliType(field.name, hint)
                action.metavar = _metavar(hint)
                if any(_kind(m) is bool for m in _members(hint)):
                    action.nargs, action.const = "?", True
                elif action.nargs == "+":
                    action.nargs = None

        def error(self, message):
            raise ConfigError(message)

        def set_defaults_with_config(self, values: dict):
            """TrlParser's: the YAML (and override) values become the options' defaults, under the command line."""
            for action in self._actions:
                if action.dest in values:
                    action.default = values[action.dest]
                    action.required = False

        def parse(self, args: List[str]):
            """`(config, unparsed strings)`; argparse's errors as one-line `ConfigError`s."""
            try:
                *parsed, rest = self.parse_args_into_dataclasses(args=args, return_remaining_strings=True,
                                                                 look_for_args_file=False)
            except argparse.ArgumentError as e:
                option = (e.argument_name or "").split("/")[0]
                dest = option.lstrip("-").replace("-", "_")
                if e.message.startswith("expected "):  # "expected one argument": a value-less `--key` before `--x`
                    raise ConfigError(f"option '{option}' needs a value") from None
                if e.message.startswith(f"{dest}:"):  # a `_from_text` ConfigError
                    raise ConfigError(e.message) from None
                raise ConfigError(f"{option}: {e.message}") from None
            return parsed[0], rest

    return ConfigParser()


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _parse_cli_value(text: str):
    # CLI values are YAML scalars/flows: `3e-4`, `true`, `[a, b]`, `{pickscore: 10}`.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _yaml_error_place(error) -> str:
    """` at line L, column C: <problem>` of a YAML syntax error (PyYAML's marks count from 0)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or (str(error).splitlines() or [type(error).__name__])[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}"


def load_config(algorithm: str, config: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None,
                cli_overrides: Optional[List[str]] = None):
    """Builds the config of `algorithm` from defaults, an optional YAML file/preset and overrides.

    Args:
        algorithm (`str`): `ddpo` or `prdp`.
        config (`str`, *optional*): YAML path or preset name.
        overrides (`dict`, *optional*): already-typed values (highest precedence after `cli_overrides`).
        cli_overrides (`List[str]`, *optional*): `["--key", "value", ...]` from the command line (both spellings,
            `--key=value`, a boolean `--key` alone).
    """
    if algorithm not in CONFIG_CLASSES:
        raise ConfigError(f"unknown algorithm '{algorithm}'; choose from {', '.join(CONFIG_CLASSES)}")
    cls = CONFIG_CLASSES[algorithm]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values: Dict[str, Any] = {}

    if config:
        path = preset_path(config)
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML{_yaml_error_place(e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
        declared = data.pop("algorithm", algorithm)
        if declared != algorithm:
            raise ConfigError(f"{path} is a '{declared}' config, not '{algorithm}'")
        for key, value in data.items():
            if key not in known:
                raise ConfigError(f"unknown config key '{key}' in {path}{did_you_mean(str(key), known)}")
            values[key] = value

    for key, value in (overrides or {}).items():
        if key not in known:
            raise ConfigError(f"unknown config key '{key}'{did_you_mean(str(key), known)}")
        values[key] = value

    parser = _config_parser(cls)
    parser.set_defaults_with_config(values)
    result, rest = parser.parse(list(cli_overrides or []))
    if rest:
        flag = rest[0]
        if not flag.startswith("--"):
            raise ConfigError(f"unexpected argument '{flag}' (options look like --key value)")
        key = flag[2:].partition("=")[0].replace("-", "_")
        raise ConfigError(f"unknown option '--{key}' for {algorithm}{did_you_mean(key, known, '--')}")
    for key in values:  # file and Python values: argparse converted the strings among them, not the rest
        setattr(result, key, _check(key, getattr(result, key), hints[key]))
    return result


def config_help(algorithm: str) -> str:
    """`--help` of `diffalign train <algorithm>`: every config key with its type, meaning and default (argparse's help
    of the HfArgumentParser)."""
    parser = _config_parser(CONFIG_CLASSES[algorithm])
    parser.usage = (f"diffalign train {algorithm} [--config FILE_OR_PRESET] [--resume RUN_OR_CHECKPOINT] "
                    f"[--accelerate-config NAME] [--key value ...]")
    parser.description = ("Config keys, in a YAML file (--config) or as --key value (both spellings; lists and "
                          "mappings as YAML, e.g. --prompts '[a cat, a dog]' --reward '{pickscore: 10}'; a boolean "
                          "--key alone is true, --no_key false). Flags override the file.")
    return parser.format_help().rstrip()
