"""`DDPOConfig`: the settings of `DDPOTrainer` (diffalign/trainers/ddpo.py)."""

from dataclasses import dataclass, field

from ..errors import ConfigError
from .base_config import TrainConfig


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
    train_ratio_norm: bool = field(
        default=False,
        metadata={"help": "GRPO-Guard's RatioNorm (Wang et al. 2025, arXiv 2510.22319), flow models only: the PPO "
                          "ratio is re-centred on 1 (its mean bias ||mu_theta - mu_old||^2 / 2s^2 added back) and "
                          "scaled by the step std s, and each step's loss is weighted by 1/dt, so the clip bounds "
                          "positive-advantage updates at every step. The normalised ratio moves less than the raw "
                          "one: the authors pair it with a train_clip_range of 2e-6 to 4e-6 on SD3.5-M."},
    )
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
        if not isinstance(self.train_ratio_norm, bool):
            raise ConfigError(f"train_ratio_norm must be true or false; got {self.train_ratio_norm!r}")
        if self.train_reuse_epochs < 0:
            raise ConfigError(f"train_reuse_epochs must be >= 0; got {self.train_reuse_epochs}")
        if self.advantage_mode == "group" and self.sample_images_per_prompt < 2:
            raise ConfigError("advantage_mode 'group' needs sample_images_per_prompt >= 2")
