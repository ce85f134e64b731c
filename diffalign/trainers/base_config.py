"""`TrainConfig`: the settings every trainer shares (one flat dataclass, TRL style), their checks (`validate`) and
the checkpoint-hash policy (which settings define a run). Each algorithm's config subclasses it in
`diffalign/trainers/<name>_config.py`, beside its trainer.

Imports neither torch nor diffusers: the CLI parses and checks a config before any heavy library loads.
"""

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from ..errors import ConfigError


def default_output_dir(name: str) -> str:
    """The output directory of a run when none is given: `runs/<name>`, `name` the preset's (or YAML file's) name, or
    the algorithm's without one. The one default of the CLI and the Python API."""
    return os.path.join("runs", os.path.splitext(os.path.basename(name))[0])


def run_dir_of(resume: str) -> str:
    """The run directory of a resume path (a run directory, or a checkpoint inside `<run>/checkpoints/`): a resumed
    run writes where it ran."""
    path = os.path.abspath(resume)
    if os.path.basename(os.path.dirname(path)) == "checkpoints":
        return os.path.dirname(os.path.dirname(path))
    return path


# ------------------------------------------------------------------------------------------- the checkpoint hash policy
# `TrainConfig.hash` is stored in every checkpoint; resuming with settings of another hash is refused. These sets say
# which fields do not define a run.
# Fields of the evaluations (held-out, final, grids): they sample with their own seeds and steps and leave the training
# untouched (not hashed).
EVALUATION_KEYS = frozenset({"eval_every", "eval_prompts", "eval_prompt_file", "eval_dataset_split", "eval_num_images",
                             "eval_num_steps"})
# Fields added after runs were made, hashed only when set: earlier runs' checkpoints keep their hash.
HASHED_WHEN_SET = frozenset({"prompt_dataset", "prompt_dataset_split", "prompt_column", "ema_decay", "ema_update_every",
                             "quantize_denoiser", "quantize_text_encoders", "train_ratio_norm", "num_frames",
                             "sample_guidance_scale_2", "video_reward_reduction", "train_experts",
                             "sample_strength"})
# Memory and speed levers that leave what is trained as it is (not hashed: a run may resume with other ones).
MEMORY_KEYS = frozenset({"offload_text_encoders", "vae_slicing", "vae_tiling", "attention_backend",
                         "reward_async", "gradient_checkpointing"})
# Values older checkpoints hashed for keys that no longer define a run (`gradient_checkpointing`: the same gradients)
# or were renamed (`compile_unet`, now `compile_denoiser`): `TrainConfig.hash` keeps them so those checkpoints resume.
LEGACY_HASHED = {"gradient_checkpointing": (False, True)}
RENAMED_KEYS = {"compile_unet": "compile_denoiser"}
# The levers whose default `auto` is resolved once the model is loaded (`diffalign.memory`).
AUTO_LEVERS = ("offload_text_encoders", "vae_slicing", "vae_tiling", "gradient_checkpointing")

# The names of `video_reward_reduction` (`diffalign.rewards.VIDEO_REDUCTIONS` holds their functions; this module
# imports no torch).
VIDEO_REWARD_REDUCTIONS = ("mean", "min", "max", "median")
# The values of `train_experts`: which experts of a two-expert model (Wan 2.2 A14B) the run trains.
TRAIN_EXPERTS = ("high_noise", "low_noise", "both")

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
    output_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Output directory of the run; default runs/<preset or YAML file name> (runs/<algorithm> "
                          "without one), or the run directory of resume_from."},
    )
    seed: int = field(default=0, metadata={"help": "Seed; each process samples with seed + rank."})
    num_epochs: int = field(default=100, metadata={"help": "Epochs: one epoch samples, scores, then updates."})
    mixed_precision: str = field(default="no", metadata={"help": "`no`, `fp16` or `bf16` (accelerate)."})
    allow_tf32: bool = field(default=True, metadata={"help": "Allow TF32 matmuls on Ampere+ GPUs."})
    gradient_checkpointing: Union[bool, str] = field(
        default="auto",
        metadata={"help": "Recompute the denoiser's activations in the backward (less memory, ~30% more training "
                          "time, the same gradients); `auto`: on where the run's memory estimate needs it "
                          "(diffalign.memory; always off on a CPU)."},
    )
    enable_xformers: bool = field(default=False, metadata={"help": "xformers attention (CUDA and the extra only)."})
    compile_denoiser: bool = field(default=False,
                                   metadata={"help": "torch.compile the denoiser (UNet or transformer)."})
    compile_unet: Optional[bool] = field(default=None, metadata={"help": "Deprecated name of compile_denoiser."})
    quantize_denoiser: str = field(
        default="none",
        metadata={"help": "Quantized frozen base under the LoRA (QLoRA-style), through diffusers' quantization "
                          "configs: `none`, `int8` (torchao int8 weight-only; CUDA or CPU), `fp8` (torchao float8 "
                          "weight-only; CUDA, compute capability 8.9+), `nf4` (bitsandbytes 4-bit; CUDA), `bnb_int8` "
                          "(bitsandbytes LLM.int8; CUDA). Needs use_lora; the saved LoRA loads on the unquantized "
                          "model. torchao: pip install diffalign[quant]."},
    )
    quantize_text_encoders: str = field(
        default="none",
        metadata={"help": "Quantize the frozen text encoders likewise (`none`, `int8`, `fp8`, `nf4`, `bnb_int8`)."},
    )
    offload_text_encoders: Union[bool, str] = field(
        default="auto",
        metadata={"help": "Keep the text encoders on the CPU and bring them to the accelerator only to encode prompts "
                          "not yet cached (each prompt is encoded once per run): frees their memory (T5-XXL: 9 GiB "
                          "in bf16) during sampling and training. `auto`: on where the run's memory estimate needs "
                          "it (diffalign.memory; always off on a CPU)."},
    )
    vae_slicing: Union[bool, str] = field(
        default="auto", metadata={"help": "Decode one image at a time (VAE memory); `auto` as offload_text_encoders."})
    vae_tiling: Union[bool, str] = field(
        default="auto",
        metadata={"help": "Decode in overlapping tiles (VAE memory at large sizes; the images change slightly at the "
                          "seams); `auto`: on only where nothing else fits the estimate."},
    )
    attention_backend: Optional[str] = field(
        default=None,
        metadata={"help": "diffusers attention backend of the denoiser (`set_attention_backend`): `native` (SDPA), "
                          "`flash`, `sage`, `xformers`, `_native_cudnn`, ... (the packages they need must be "
                          "installed); default diffusers' own."},
    )
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
    reward_async: bool = field(
        default=True,
        metadata={"help": "Score each sampled chunk in a background thread while the next one samples (same scores, "
                          "bit for bit, as false, which scores it in the sampling thread)."},
    )
    video_reward_reduction: str = field(
        default="mean",
        metadata={"help": "How an image reward scores a video: each frame is scored as an image and a video's score "
                          "is the `mean`, `min`, `max` or `median` of its frames' scores. Video-native rewards (e.g. "
                          "temporal_consistency) and image models ignore it."},
    )

    # > Model
    train_experts: str = field(
        default="high_noise",
        metadata={"help": "The experts a two-expert model trains (Wan 2.2 A14B): `high_noise` (`transformer`, the "
                          "steps at t >= boundary_ratio * 1000), `low_noise` (`transformer_2`, the steps below) or "
                          "`both`; each step is trained with the expert that sampled it. Other models refuse any but "
                          "the default."},
    )
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
        metadata={"help": "Text tokens per prompt of the families with a long-context text encoder (T5 of SD3 and "
                          "FLUX, Qwen of Qwen-Image and Z-Image; the pipelines' max_sequence_length); default the "
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
        metadata={"help": "CFG scale (1.0 = no CFG, also in training), in the family's form: for FLUX the optional "
                          "true CFG with an empty negative prompt (FluxPipeline's `true_cfg_scale`; 1.0 = off, "
                          "FLUX.1-dev's usual setting), for Qwen-Image true CFG with norm rescale (`true_cfg_scale`)."},
    )
    sample_embedded_guidance: float = field(
        default=3.5,
        metadata={"help": "FLUX.1-dev's embedded guidance, a transformer input (FluxPipeline's `guidance_scale`); "
                          "other families and models without `guidance_embeds` ignore it."},
    )
    sample_resolution: Optional[int] = field(default=None, metadata={"help": "Image side; default the model's."})
    num_frames: Optional[int] = field(
        default=None,
        metadata={"help": "Frames per video of video models (Wan: 4k + 1, e.g. 33, 49, 81); default the pipeline's "
                          "(WanPipeline: 81). Image models refuse it."},
    )
    sample_guidance_scale_2: Optional[float] = field(
        default=None,
        metadata={"help": "CFG scale of a two-expert model's low-noise expert (Wan 2.2 A14B's transformer_2, "
                          "WanPipeline's guidance_scale_2); default sample_guidance_scale. Other models refuse it."},
    )
    sample_strength: Optional[float] = field(
        default=None,
        metadata={"help": "How far a video-to-video model (wan_v2v) noises its condition video, in (0, 1] "
                          "(WanVideoToVideoPipeline's strength); default the pipeline's 0.8. The rollouts take "
                          "sample_num_steps steps, the last ones of the pipeline's longer schedule. Other models "
                          "refuse it."},
    )
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
    eval_num_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Denoising steps of the grids, the held-out and final evaluations and the model card's "
                          "pipeline call; default sample_num_steps. Lets a run train on samples of fewer steps "
                          "(the forward-process trainers need final samples only; NVIDIA's DiffusionNFT trains on "
                          "10 and evaluates with 40) and be judged as it will be used."},
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

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = default_output_dir(self.algorithm)
        if self.compile_unet is not None:  # the deprecated name: its value goes to compile_denoiser
            if self.compile_denoiser and not self.compile_unet:
                raise ConfigError("compile_unet is false but compile_denoiser is true: give compile_denoiser alone")
            logging.getLogger("diffalign").warning("compile_unet is deprecated: use compile_denoiser (same meaning)")
            self.compile_denoiser, self.compile_unet = bool(self.compile_unet), None

    @classmethod
    def fit_to_shapes(cls, values: dict) -> dict:
        """`values` (config keys) with the algorithm's own counts shrunk to fit smaller sampling shapes than its
        defaults assume (`bench` runs every algorithm at the shapes it is given); a no-op unless overridden."""
        return values

    def validate(self, num_processes: int = 1):
        """Checks values and batch arithmetic; raises `ConfigError`."""
        for f in dataclasses.fields(self):  # NaN passes every `<=` check below: refuse non-finite numbers first
            value = getattr(self, f.name)
            if isinstance(value, float) and (value != value or abs(value) == float("inf")):
                raise ConfigError(f"{f.name} must be a finite number; got {value}")
        if self.video_reward_reduction not in VIDEO_REWARD_REDUCTIONS:
            raise ConfigError(f"video_reward_reduction must be one of {', '.join(VIDEO_REWARD_REDUCTIONS)}; got "
                              f"{self.video_reward_reduction!r}")
        if self.train_experts not in TRAIN_EXPERTS:
            raise ConfigError(f"train_experts must be one of {', '.join(TRAIN_EXPERTS)}; got {self.train_experts!r}")
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
        if self.num_frames is not None and (isinstance(self.num_frames, bool) or not isinstance(self.num_frames, int)
                                            or self.num_frames < 1 or (self.num_frames - 1) % 4):
            nearest = (max(1, round((self.num_frames - 1) / 4) * 4 + 1)
                       if isinstance(self.num_frames, (int, float)) else 81)
            raise ConfigError(f"num_frames must be 4k + 1 frames (1, 5, 9, ..., 81: Wan's VAE keeps the first frame "
                              f"and compresses each 4 after it); got {self.num_frames!r}, try {nearest}")
        if self.sample_guidance_scale_2 is not None and not self.sample_guidance_scale_2 > 0:
            raise ConfigError(f"sample_guidance_scale_2 must be > 0; got {self.sample_guidance_scale_2}")
        if self.sample_strength is not None and (isinstance(self.sample_strength, bool)
                                                 or not 0 < self.sample_strength <= 1):
            raise ConfigError(f"sample_strength must be in (0, 1] (1 starts from pure noise); got "
                              f"{self.sample_strength!r}")
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
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise ConfigError(f"output_dir must be a directory path; got {self.output_dir!r}")
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise ConfigError(f"output_dir '{self.output_dir}' is a file, not a directory: choose another --output_dir")
        if self.resume_from and not os.path.exists(self.resume_from):
            raise ConfigError(f"resume path '{self.resume_from}' does not exist")
        self._validate_logging()
        self._validate_heldout_and_ema()
        self._validate_quantization()

    def _validate_quantization(self):
        """The quantized base: known methods, their package and device there, and a LoRA to train on top."""
        from ..quantization import check_quantization_method

        for key in ("quantize_denoiser", "quantize_text_encoders"):
            check_quantization_method(key, getattr(self, key))
        from ..memory import check_lever

        for name in AUTO_LEVERS:
            check_lever(name, getattr(self, name))
        if self.offload_text_encoders is True and self.quantize_text_encoders in ("nf4", "bnb_int8"):
            raise ConfigError(f"offload_text_encoders moves the text encoders between the CPU and the GPU, which "
                              f"bitsandbytes weights ({self.quantize_text_encoders}) cannot do: use int8/fp8 or keep "
                              f"them resident")
        if self.attention_backend is not None and (not isinstance(self.attention_backend, str)
                                                   or not self.attention_backend.strip()):
            raise ConfigError(f"attention_backend must be a diffusers backend name; got {self.attention_backend!r}")
        if self.quantize_denoiser != "none" and not self.use_lora:
            raise ConfigError(f"quantize_denoiser {self.quantize_denoiser} trains a LoRA on a frozen quantized base: "
                              f"set use_lora (a full fine-tune cannot update quantized weights)")

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
        if self.eval_num_steps is not None and self.eval_num_steps < 1:
            raise ConfigError(f"eval_num_steps must be >= 1 (unset: sample_num_steps); got {self.eval_num_steps}")
        if self.eval_num_images is not None and self.eval_num_images < 1:
            raise ConfigError(f"eval_num_images must be >= 1; got {self.eval_num_images}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1) (0 = off; Flow-GRPO uses 0.9); got {self.ema_decay}")
        if self.ema_update_every < 1:
            raise ConfigError(f"ema_update_every must be >= 1; got {self.ema_update_every}")

    def _validate_logging(self):
        """`report_to`, the trackers' names and the Hub settings (package checks wait for the trainer)."""
        import re

        from ..tracking import parse_report_to

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
    def evaluation_num_steps(self) -> int:
        """Denoising steps of the grids and evaluations: `eval_num_steps`, else `sample_num_steps`."""
        return self.eval_num_steps or self.sample_num_steps

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

    def check(self, num_processes: int = 1):
        """`validate(num_processes)` unless this config, with these values, passed it for that process count already:
        the way in (CLI, `load_config`) validates before anything heavy loads, a trainer built from the config checks
        again only if the values or the process count changed, and a config built in Python is validated by its
        trainer."""
        key = (num_processes, json.dumps(self.to_dict(), sort_keys=True, default=repr))
        if getattr(self, "_validated_for", None) != key:
            self.validate(num_processes)
            self._validated_for = key  # an attribute, not a field: neither hashed nor saved

    def resolved_model(self) -> str:
        """The local directory (or reachable hub id) of `model`, resolved once per value: the way in checks it before
        any model loads, the trainer loads from it without asking the hub again."""
        resolved = getattr(self, "_resolved_model", None)
        if resolved is None or resolved[0] != self.model:
            from ..utils.hub_utils import resolve_model_path

            resolved = self._resolved_model = (self.model, resolve_model_path(self.model))
        return resolved[1]

    def accepted_hashes(self) -> tuple:
        """The hashes a checkpoint of this run may carry: `hash()` first, then the model as written, then each
        `LEGACY_HASHED` value older checkpoints were written with."""
        hashes = [self.hash(), self.hash(resolve_model=False)]
        for key, values in LEGACY_HASHED.items():
            for value in values[1:]:
                hashes += [self.hash(legacy={key: value}), self.hash(resolve_model=False, legacy={key: value})]
        return tuple(dict.fromkeys(hashes))

    def family_kwargs(self) -> Dict[str, Any]:
        """The run's settings of the model family, as `ModelFamily.configure` takes them."""
        return {"max_sequence_length": self.sample_max_sequence_length,
                "embedded_guidance": self.sample_embedded_guidance, "num_frames": self.num_frames,
                "guidance_scale_2": self.sample_guidance_scale_2, "strength": self.sample_strength,
                # only when set: the families' `configure` that predate the key never see it
                **({"train_experts": self.train_experts} if self.train_experts != "high_noise" else {})}

    def kernel_kwargs(self) -> Dict[str, Any]:
        """The run's noise settings of every transition kernel, as `ModelFamily.make_kernel` takes them (each kernel
        takes its own: DDIM's `eta`, the flow SDE's `noise_level`)."""
        return {"eta": self.sample_eta, "noise_level": self.sample_noise_level}

    def hash(self, resolve_model: bool = True, legacy: Optional[Dict[str, Any]] = None) -> str:
        """A short hash of the settings that define the run (resuming with different ones is refused).

        A local model directory counts by its real path, so the same model given by a symlink or a relative path is
        the same run (`resolve_model=False`: as written, the hash of checkpoints from before). `legacy`: values of
        `LEGACY_HASHED` keys other than the first (the hash older checkpoints wrote with them)."""
        ignored = {"resume_from", "num_threads", "num_epochs", "checkpoint_every", "checkpoints_total_limit", "log_every", "output_dir"}
        ignored |= LOGGING_KEYS  # where a run reports to does not define it (and keeps older checkpoints' hashes)
        ignored |= EVALUATION_KEYS
        ignored |= MEMORY_KEYS | set(RENAMED_KEYS)
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in HASHED_WHEN_SET}
        ignored |= {k for k, default in defaults.items() if getattr(self, k) == default}
        if not self.ema_decay:
            ignored.add("ema_update_every")  # meaningless without EMA
        items = {k: v for k, v in self.to_dict().items() if k not in ignored}
        for old, new in RENAMED_KEYS.items():  # hashed under the name older checkpoints knew
            items[old] = items.pop(new)
        items.update({k: values[0] for k, values in LEGACY_HASHED.items()})
        items.update(legacy or {})
        from ..utils.hub_utils import BUNDLED_MODELS  # torch: hash() runs where the models do

        model = items.get("model")
        if resolve_model and isinstance(model, str) and model not in BUNDLED_MODELS and os.path.isdir(model):
            items["model"] = os.path.realpath(model)  # a bundled name wins over a directory of that name, as it loads
        return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]
