from .base import BaseTrainer, NonFiniteError
from .ddpo import DDPOTrainer
from .prdp import PRDPTrainer

__all__ = ["BaseTrainer", "DDPOTrainer", "PRDPTrainer", "NonFiniteError"]
