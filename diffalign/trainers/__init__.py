"""The trainers, one per algorithm, each beside its config class: `<name>.py` (the trainer, `config_class = ...`) and
`<name>_config.py` (the config dataclass, which declares the algorithm's `algorithm` name once).

The config classes import neither torch nor diffusers (the CLI parses and checks with them before anything heavy
loads); the trainers load on first use (`TRAINERS`, `trainer_class`, `BaseTrainer`, ...).

Adding an algorithm: `<name>_config.py` with a `TrainConfig` subclass (`algorithm = "<name>"`), `<name>.py` with a
`BaseTrainer` subclass (`config_class = <that class>`, its loss in `compute_loss`), and the config class in
`CONFIG_CLASSES` below. `diffalign train <name>`, presets, `bench` and the Python API all read this registry. A forward-process algorithm
(trained on noised final samples, as DiffusionNFT) derives from `ForwardProcessTrainer` and `ForwardProcessConfig`.
"""

import importlib

from .base_config import TrainConfig
from .forward_base_config import ForwardProcessConfig
from .ddpo_config import DDPOConfig
from .dgpo_config import DGPOConfig
from .nft_config import NFTConfig
from .awm_config import AWMConfig
from .prdp_config import PRDPConfig

# The registered algorithms by the name each config class declares.
CONFIG_CLASSES = {cls.algorithm: cls for cls in (DDPOConfig, PRDPConfig, NFTConfig, AWMConfig, DGPOConfig)}

# Algorithms defined outside this package (`register_algorithm`): their trainer by name.
_registered = {}

_LAZY = {"BaseTrainer": ".base", "NonFiniteError": ".base", "DDPOTrainer": ".ddpo", "PRDPTrainer": ".prdp",
         "NFTTrainer": ".nft", "AWMTrainer": ".awm", "DGPOTrainer": ".dgpo",
         "ForwardProcessTrainer": ".forward_base"}


def trainer_class(algorithm: str):
    """The trainer of a registered algorithm: the class in the module beside its config class (`ddpo_config.py` ->
    `ddpo.py`) whose `config_class` is that config class."""
    config_class = CONFIG_CLASSES[algorithm]
    trainer = _registered.get(algorithm)
    if trainer is not None and trainer.config_class is config_class:
        return trainer
    module = importlib.import_module(config_class.__module__[: -len("_config")])
    from .base import BaseTrainer

    found = [obj for obj in vars(module).values() if isinstance(obj, type) and issubclass(obj, BaseTrainer)
             and obj.__dict__.get("config_class") is config_class]
    if len(found) != 1:
        raise TypeError(f"{module.__name__} must define one trainer with config_class = {config_class.__name__}; "
                        f"found {len(found)}")
    return found[0]


def register_algorithm(trainer) -> None:
    """Registers an algorithm defined outside diffalign (TRL-style: a `TrainConfig` subclass with its `algorithm`
    name and a `BaseTrainer` subclass whose `config_class` is it), so that `bench`, `trainer_class` and `TRAINERS`
    know it as they know the built-in ones."""
    from .base import BaseTrainer

    config_class = getattr(trainer, "config_class", None)
    if not (isinstance(trainer, type) and issubclass(trainer, BaseTrainer)) or not (
            isinstance(config_class, type) and issubclass(config_class, TrainConfig)):
        raise TypeError("register_algorithm takes a BaseTrainer subclass whose config_class is a TrainConfig subclass")
    CONFIG_CLASSES[config_class.algorithm] = config_class
    _registered[config_class.algorithm] = trainer


def __getattr__(name):
    if name == "TRAINERS":  # the trainer of each registered algorithm (imports torch)
        return {algorithm: trainer_class(algorithm) for algorithm in CONFIG_CLASSES}
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BaseTrainer", "DDPOTrainer", "PRDPTrainer", "NFTTrainer", "AWMTrainer", "DGPOTrainer",
           "ForwardProcessTrainer", "NonFiniteError", "TRAINERS", "register_algorithm", "trainer_class",
           "CONFIG_CLASSES", "TrainConfig", "DDPOConfig", "PRDPConfig", "NFTConfig", "AWMConfig", "DGPOConfig",
           "ForwardProcessConfig"]
