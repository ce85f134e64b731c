"""The training configs' public names, kept here for user code: the classes live beside their trainers
(`diffalign/trainers/base_config.py`, `ddpo_config.py`, `prdp_config.py`), the registry in `diffalign.trainers`, the
way in (`load_config`, `config_help`, `preset_path`) in `diffalign.cli.parser`. Nothing inside diffalign imports this
module."""

from .cli.parser import config_help, load_config, preset_path
from .errors import ConfigError
from .trainers import CONFIG_CLASSES
from .trainers.awm_config import AWMConfig
from .trainers.base_config import TrainConfig
from .trainers.ddpo_config import DDPOConfig
from .trainers.dgpo_config import DGPOConfig
from .trainers.nft_config import NFTConfig
from .trainers.prdp_config import PRDPConfig

__all__ = ["load_config", "config_help", "preset_path", "TrainConfig", "DDPOConfig", "NFTConfig", "PRDPConfig",
           "AWMConfig", "DGPOConfig", "CONFIG_CLASSES", "ConfigError"]
