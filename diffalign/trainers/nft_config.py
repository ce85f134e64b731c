"""`NFTConfig`: the settings of `NFTTrainer` (diffalign/trainers/nft.py)."""

from dataclasses import dataclass, field

from ..errors import ConfigError
from .base_config import TrainConfig


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
        # the choices live beside their math; imported here so that parsing a config needs no torch
        from ..forward_process import OLD_POLICY_DECAY_TYPES
        from ..losses import OPTIMALITY_MODES

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
