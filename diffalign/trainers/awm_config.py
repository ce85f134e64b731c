"""`AWMConfig`: the settings of `AWMTrainer` (diffalign/trainers/awm.py)."""

from dataclasses import dataclass, field

from ..errors import ConfigError
from .forward_base_config import ForwardProcessConfig

# The training-time draws of the authors' `time_type` that use the sampler's noise levels (the only ones here; their
# continuous `logit_normal` and `uniform` draws are not supported).
AWM_TIME_TYPES = ("discrete", "discrete_with_init", "discrete_wo_init")
AWM_EMA_DECAY_TYPES = ("linear", "constant")


@dataclass
class AWMConfig(ForwardProcessConfig):
    """Advantage Weighted Matching (Xue et al., 2025, arXiv 2509.25050): advantage-weighted denoising loss on the
    forward process of the final samples, with a PPO-style ratio.

    Defaults are the authors' published SD3.5-M settings (scxue/advantage_weighted_matching
    `config/dgx_awm.py`, identical for GenEval, OCR and PickScore except where a help says otherwise); the keys that
    their `config/base_awm.py` sets come from there. The sampler and noise-level keys are `ForwardProcessConfig`'s;
    the old-policy adapter is their "ema" adapter (`kl_ema_*` keys below replace `old_policy_decay_type`).

    > Parameters that control the matching loss, its ratio and its regularisers
    """

    train_timestep_fraction: float = field(
        default=0.9, metadata={"help": "The trained noise levels are drawn among the first int(steps x fraction) "
                                       "sampling steps (the authors' `train.timestep_fraction`: 0.9)."})
    train_timesteps: int = field(
        default=6, metadata={"help": "Noise levels trained per sample, one per equal stratum of the sampling steps "
                                     "(the authors' `train.train_timesteps`: 6)."})
    train_time_type: str = field(
        default="discrete", metadata={"help": "Strata of the trained noise levels: `discrete` (from step 0), "
                                              "`discrete_wo_init` (from step 1: no pure-noise level) or "
                                              "`discrete_with_init` (step 0, then strata from 1) (the authors' "
                                              "`time_type`: discrete for PickScore, discrete_wo_init for GenEval "
                                              "and OCR)."})
    train_weighting: str = field(
        default="ghuber", metadata={"help": "Time weighting of the matching loss: `Uniform`, `t`, `t**2`, `huber` or "
                                            "`ghuber` (the authors' `train.weighting`)."})
    train_ghuber_power: float = field(
        default=0.25, metadata={"help": "Power p of the `ghuber` weighting (the authors' `train.ghuber_power`)."})
    train_loss_type: str = field(
        default="exp_first", metadata={"help": "Ratio per (sample, noise level), `exp_first`, or of the sample's mean "
                                               "log-likelihood, `sum_first` (the authors' `train.loss_type`)."})
    train_clip_range: float = field(
        default=1.0, metadata={"help": "PPO clip range of the ratio (the authors' `train.clip_range`: 1 in their "
                                       "presets, 1e-4 in base_awm.py)."})
    train_adv_clip_max: float = field(
        default=5.0, metadata={"help": "Advantages are clipped to +-this (the authors' `train.adv_clip_max`)."})
    train_advantage_max: float = field(
        default=1.0, metadata={"help": "Clipped advantages are rescaled to +-this; 0 keeps them as clipped (the "
                                       "authors' `train.advantage_max`)."})
    train_global_std: bool = field(
        default=True, metadata={"help": "Advantages divide by the batch's reward std instead of the prompt's (the "
                                        "authors' `sample.global_std`)."})
    train_kl_coef: float = field(
        default=1e-4, metadata={"help": "Weight of the KL to the base model (adapters off) on raw outputs (the "
                                        "authors' `train.beta`: 1e-4 PickScore, 1e-3 GenEval, 3e-3 OCR); 0 skips "
                                        "the base model's forward."})
    train_kl_weight: str = field(
        default="Uniform", metadata={"help": "`Uniform` or `ELBO` (divided by 2 std_t^2) weighting of that KL (the "
                                             "authors' `train.kl_weight`)."})
    train_ema_kl_coef: float = field(
        default=1.0, metadata={"help": "Weight of the KL to the EMA (old) adapter (the authors' `train.ema_beta`); "
                                       "0 skips its forward when on-policy."})
    train_ema_kl_weight: str = field(
        default="Uniform", metadata={"help": "`Uniform` or `ELBO` weighting of the EMA KL (the authors' "
                                             "`train.kl_ema_weight`)."})
    train_kl_ema_decay: float = field(
        default=0.3, metadata={"help": "Decay of the EMA adapter after each epoch (the authors' "
                                       "`train.kl_ema_decay`)."})
    train_kl_ema_decay_type: str = field(
        default="linear", metadata={"help": "`linear`: min(decay, 0.001 x optimizer steps); `constant`: decay (the "
                                            "authors' `train.kl_ema_decay_type`)."})
    train_off_policy: bool = field(
        default=False, metadata={"help": "Sample with the EMA adapter and take the ratio against its log-likelihood; "
                                         "false samples with the trained policy, ratio 1 (the authors' "
                                         "`train.off_policy`)."})

    algorithm = "awm"

    @classmethod
    def fit_to_shapes(cls, values: dict) -> dict:
        """`train_timesteps` at most what the strata of `sample_num_steps` hold (see `validate`)."""
        fields = cls.__dataclass_fields__
        steps = values.get("sample_num_steps", fields["sample_num_steps"].default)
        fraction = values.get("train_timestep_fraction", fields["train_timestep_fraction"].default)
        time_type = values.get("train_time_type", fields["train_time_type"].default)
        room = int(steps * fraction) - (time_type != "discrete") + (time_type == "discrete_with_init")
        timesteps = values.get("train_timesteps", fields["train_timesteps"].default)
        return {**values, "train_timesteps": max(1, min(timesteps, room))}

    @property
    def num_train_steps(self) -> int:
        """Noise levels trained per sample: `train_timesteps`."""
        return self.train_timesteps

    @property
    def max_train_step(self) -> int:
        """The strata end at sampling step `int(steps x timestep_fraction)` (exclusive), as the authors'."""
        return int(self.sample_num_steps * self.train_timestep_fraction)

    def validate(self, num_processes: int = 1):
        super().validate(num_processes)
        from ..losses import AWM_KL_WEIGHTS, AWM_LOSS_TYPES, AWM_WEIGHTINGS  # beside the math; parsing needs no torch

        for name, choices in (("train_time_type", AWM_TIME_TYPES), ("train_weighting", AWM_WEIGHTINGS),
                              ("train_loss_type", AWM_LOSS_TYPES), ("train_kl_weight", AWM_KL_WEIGHTS),
                              ("train_ema_kl_weight", AWM_KL_WEIGHTS),
                              ("train_kl_ema_decay_type", AWM_EMA_DECAY_TYPES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}; got '{getattr(self, name)}'")
        for name in ("train_clip_range", "train_adv_clip_max", "train_ghuber_power"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0; got {getattr(self, name)}")
        for name in ("train_advantage_max", "train_kl_coef", "train_ema_kl_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)}")
        if not 0 <= self.train_kl_ema_decay < 1:
            raise ConfigError(f"train_kl_ema_decay must be in [0, 1); got {self.train_kl_ema_decay}")
        if self.train_timesteps < 1:
            raise ConfigError(f"train_timesteps must be >= 1; got {self.train_timesteps}")
        first = 0 if self.train_time_type == "discrete" else 1
        strata = self.train_timesteps - (self.train_time_type == "discrete_with_init")
        if strata > 0 and self.max_train_step - first < strata:
            raise ConfigError(
                f"train_timesteps ({self.train_timesteps}) needs that many sampling steps in its strata: "
                f"{self.train_time_type} draws from steps {first}..{self.max_train_step - 1} (int(sample_num_steps x "
                f"train_timestep_fraction) = {self.max_train_step}); raise sample_num_steps or the fraction")
        if self.train_loss_type == "sum_first" and self.train_micro_batch_size % self.train_timesteps:
            raise ConfigError(f"train_loss_type sum_first needs whole samples per micro-batch: train_micro_batch_size "
                              f"({self.train_micro_batch_size}) must be a multiple of train_timesteps "
                              f"({self.train_timesteps})")
