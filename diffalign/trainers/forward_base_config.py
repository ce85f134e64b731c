"""`ForwardProcessConfig`: the settings every forward-process trainer shares (`ForwardProcessTrainer`,
diffalign/trainers/forward_base.py): DiffusionNFT's, AWM's and DGPO's configs derive from it."""

from dataclasses import dataclass, field

from ..errors import ConfigError
from .base_config import TrainConfig


@dataclass
class ForwardProcessConfig(TrainConfig):
    """Sampling with a slowly-updated old policy, then training on the forward process of the final samples.

    Defaults are DiffusionNFT's (NVlabs/DiffusionNFT `config/base.py`, `config/nft.py`), which the AWM and DGPO
    codes share: CFG-free deterministic sampling with the old policy, one optimizer step per epoch, 9 of 10 sampling
    noise levels trained per sample.

    > Parameters that control the sampler, the old policy and the trained noise levels
    """

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

    @property
    def num_train_steps(self) -> int:
        """Noise levels trained per sample: `timestep_fraction` of the sampling steps, at least 1."""
        return max(1, int(self.sample_num_steps * self.train_timestep_fraction))

    def validate(self, num_processes: int = 1):
        super().validate(num_processes)
        # the choices live beside their math; imported here so that parsing a config needs no torch
        from ..forward_process import OLD_POLICY_DECAY_TYPES

        if self.train_batch_size < 0:
            raise ConfigError(f"train_batch_size must be >= 0; got {self.train_batch_size}")
        if self.old_policy_decay_type not in OLD_POLICY_DECAY_TYPES:
            raise ConfigError(f"old_policy_decay_type must be one of {', '.join(map(str, OLD_POLICY_DECAY_TYPES))}; "
                              f"got {self.old_policy_decay_type}")
        samples = self.sample_num_prompts_per_epoch * self.sample_images_per_prompt
        if self.train_batch_size and samples % self.train_batch_size:
            raise ConfigError(
                f"samples per epoch ({samples} = sample_num_prompts_per_epoch x sample_images_per_prompt) must be "
                f"divisible by train_batch_size ({self.train_batch_size}, samples per optimizer step over all processes)"
            )
