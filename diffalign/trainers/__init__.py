from .base import BaseTrainer, NonFiniteError
from .ddpo import DDPOTrainer
from .prdp import PRDPTrainer

# The trainer of each registered algorithm, by the name its config class declares (`diffalign.config.CONFIG_CLASSES`).
TRAINERS = {cls.algorithm: cls for cls in (DDPOTrainer, PRDPTrainer)}


def trainer_class(algorithm: str):
    """The trainer class of a registered algorithm (the CLI imports this module only once the config is parsed:
    parsing needs no torch)."""
    return TRAINERS[algorithm]


__all__ = ["BaseTrainer", "DDPOTrainer", "PRDPTrainer", "NonFiniteError", "TRAINERS", "trainer_class"]
