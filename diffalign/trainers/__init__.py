from .base import BaseTrainer, NonFiniteError
from .ddpo import DDPOTrainer
from .nft import NFTTrainer
from .prdp import PRDPTrainer

# The trainer of each registered algorithm, by the name its config class declares (`diffalign.config.CONFIG_CLASSES`).
TRAINERS = {cls.algorithm: cls for cls in (DDPOTrainer, PRDPTrainer, NFTTrainer)}

__all__ = ["BaseTrainer", "DDPOTrainer", "PRDPTrainer", "NFTTrainer", "NonFiniteError", "TRAINERS"]
