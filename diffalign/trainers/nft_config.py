"""`NFTConfig`: the settings of `NFTTrainer` (diffalign/trainers/nft.py)."""

from dataclasses import dataclass, field

from ..errors import ConfigError
from .forward_base_config import ForwardProcessConfig


@dataclass
class NFTConfig(ForwardProcessConfig):
    """DiffusionNFT (Zheng et al., 2025, arXiv 2509.16117): negative-aware fine-tuning on the forward process.

    Defaults are NVIDIA's (NVlabs/DiffusionNFT `config/base.py`, `config/nft.py`); the sampler, old-policy and
    noise-level keys are `ForwardProcessConfig`'s.

    > Parameters that control the implicit policies
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

    algorithm = "nft"

    def validate(self, num_processes: int = 1):
        super().validate(num_processes)
        from ..losses import OPTIMALITY_MODES  # beside its math; imported here so that parsing needs no torch

        for name in ("train_beta", "train_adv_clip_max"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0; got {getattr(self, name)}")
        if self.train_kl_coef < 0:
            raise ConfigError(f"train_kl_coef must be >= 0; got {self.train_kl_coef}")
        if self.train_adv_mode not in OPTIMALITY_MODES:
            raise ConfigError(f"train_adv_mode must be one of {', '.join(OPTIMALITY_MODES)}; got "
                              f"'{self.train_adv_mode}'")
