"""`PRDPConfig`: the settings of `PRDPTrainer` (diffalign/trainers/prdp.py)."""

from dataclasses import dataclass, field
from typing import Optional

from ..errors import ConfigError
from .base_config import TrainConfig


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
