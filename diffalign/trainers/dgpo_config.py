"""`DGPOConfig`: the settings of `DGPOTrainer` (diffalign/trainers/dgpo.py)."""

from dataclasses import dataclass, field

from ..errors import ConfigError
from .forward_base_config import ForwardProcessConfig


@dataclass
class DGPOConfig(ForwardProcessConfig):
    """DGPO (Luo, Hu & Tang, ICLR 2026, arXiv 2510.08425): direct group preference optimisation on ODE samples.

    Defaults are the authors' default recipe (Luo-Yihong/DGPO, commit 01ceb4b, `config/dgpo.py`
    `general_ocr_sd3_4gpu`, "rollout w/ CFG, training w/o CFG"); each help names the authors' key. Their fully
    CFG-free mode is `sample_guidance_scale: 1` with either `train_ref_guidance_scale: 4.5` (`config/dgpo_wocfg.py`)
    or `train_use_ema_ref: true` (`config/dgpo_wocfg_emaref.py`, `beta_dpo` 2000, `clip_range` 1e-5).

    > Parameters that control the group preference, the clipping and the EMA reference
    """

    sample_guidance_scale: float = field(
        default=4.5, metadata={"help": "CFG scale of sampling (authors' `sample.guidance_scale`: 4.5; 1.0 in their "
                                       "CFG-free mode). The policy is always trained CFG-free."})
    train_beta_dpo: float = field(
        default=100.0, metadata={"help": "DPO inverse temperature of the group preference: larger = sharper sigmoid "
                                         "weights (authors' `train.beta_dpo`: 100; 10 PickScore; 2000 with an EMA "
                                         "reference)."})
    train_kl_coef: float = field(
        default=0.02, metadata={"help": "Weight of mean (out_theta - out_base)^2, the base model without adapters "
                                        "at `train_ref_guidance_scale` (authors' `train.beta`: 0.02; 0.001 "
                                        "PickScore); 0 skips it."})
    train_ref_guidance_scale: float = field(
        default=1.0, metadata={"help": "CFG scale of the base model as DPO and KL reference (authors' `kl_cfg`: 1.0; "
                                       "4.5 in their CFG-free mode with a frozen reference)."})
    train_use_ema_ref: bool = field(
        default=False, metadata={"help": "DPO reference = the EMA of the policy (the old-policy adapter) instead of "
                                         "the base model (authors' `use_ema_ref`, TDM-R1's dynamic reference)."})
    train_clip_range: float = field(
        default=1e-2, metadata={"help": "PPO-style trust region of exp(l_old - l_theta) around 1 (authors' "
                                        "`clip_range`: 1e-2; 1e-5 CFG-free)."})
    train_clip_dsm: bool = field(
        default=True, metadata={"help": "Rows outside the trust region give the DSM term no gradient (authors' "
                                        "`clip_dsm`)."})
    train_clip_kl: bool = field(
        default=False, metadata={"help": "Rows outside the trust region give the KL term no gradient (authors' "
                                         "`clip_kl`)."})
    train_adv_clip_max: float = field(
        default=5.0, metadata={"help": "Advantages are clipped to +-this (authors' `train.adv_clip_max`)."})
    train_global_std: bool = field(
        default=True, metadata={"help": "Normalise advantages by the batch's std instead of each prompt's "
                                        "(authors' `sample.global_std`: true; false for GenEval)."})
    train_num_timesteps: int = field(
        default=4, metadata={"help": "Noise levels trained per epoch, shared by every sample (authors' "
                                     "`num_train_timesteps`)."})
    train_trunc_steps: int = field(
        default=6, metadata={"help": "The noise levels are drawn from the sampler's steps 0..this, the noisiest "
                                     "(authors' `trunc_steps`: 6; 4 GenEval)."})
    train_shared_noise: bool = field(
        default=True, metadata={"help": "The images of a prompt share the forward-process noise at a noise level "
                                        "(authors' `use_shared_noise`)."})
    switch_ema_ref: int = field(
        default=200, metadata={"help": "After this many optimizer steps the EMA reference samples the rollouts; "
                                       "before, the policy (authors' `switch_ema_ref`: 200; 500 GenEval)."})
    ema_ref_decay_rate: float = field(
        default=0.001, metadata={"help": "The EMA reference follows the policy after every optimizer step i with decay "
                                         "min(rate i, ema_ref_max_decay) (authors' `ema_ref` update: 0.001)."})
    ema_ref_max_decay: float = field(
        default=0.3, metadata={"help": "Cap of that decay (authors': 0.3)."})

    algorithm = "dgpo"

    @property
    def num_train_steps(self) -> int:
        """Noise levels trained per sample: `train_num_timesteps`, shared by all samples of an epoch."""
        return self.train_num_timesteps

    @classmethod
    def fit_to_shapes(cls, values: dict) -> dict:
        """`train_trunc_steps` below `sample_num_steps` and `train_num_timesteps` at most `train_trunc_steps + 1`."""
        fields = cls.__dataclass_fields__
        steps = values.get("sample_num_steps", fields["sample_num_steps"].default)
        trunc = min(values.get("train_trunc_steps", fields["train_trunc_steps"].default), steps - 1)
        levels = min(values.get("train_num_timesteps", fields["train_num_timesteps"].default), trunc + 1)
        return {**values, "train_trunc_steps": trunc, "train_num_timesteps": levels}

    def validate(self, num_processes: int = 1):
        super().validate(num_processes)
        for name in ("train_beta_dpo", "train_adv_clip_max", "train_num_timesteps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0; got {getattr(self, name)}")
        for name in ("train_kl_coef", "train_clip_range", "switch_ema_ref", "ema_ref_decay_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)}")
        if not 0 <= self.ema_ref_max_decay < 1:
            raise ConfigError(f"ema_ref_max_decay must be in [0, 1); got {self.ema_ref_max_decay}")
        if self.train_ref_guidance_scale < 1:
            raise ConfigError(f"train_ref_guidance_scale must be >= 1 (1 = no CFG); got "
                              f"{self.train_ref_guidance_scale}")
        if not 0 <= self.train_trunc_steps < self.sample_num_steps:
            raise ConfigError(f"train_trunc_steps must be in [0, sample_num_steps - 1 = {self.sample_num_steps - 1}]; "
                              f"got {self.train_trunc_steps}")
        if self.train_num_timesteps > self.train_trunc_steps + 1:
            raise ConfigError(f"train_num_timesteps ({self.train_num_timesteps}) must be at most train_trunc_steps + 1 "
                              f"({self.train_trunc_steps + 1}), the noise levels it draws from")
        if self.old_policy_decay_type != 1:
            raise ConfigError("old_policy_decay_type does not apply to dgpo: its EMA reference follows "
                              "ema_ref_decay_rate and ema_ref_max_decay after every optimizer step")
        if self.train_batch_size % self.sample_images_per_prompt:
            raise ConfigError(f"train_batch_size ({self.train_batch_size}) must be a multiple of "
                              f"sample_images_per_prompt ({self.sample_images_per_prompt}): dgpo's optimizer steps "
                              "hold whole prompt groups")
