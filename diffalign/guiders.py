"""Reinforcement Learning Guidance as a diffusers guider, for modular pipelines.

`ReinforcementLearningGuidance` is a `diffusers.guiders.BaseGuidance`: swap it into any modular pipeline whose
denoising loop takes a `guider` component (SDXL, SD3, QwenImage, ...) with
`pipe.update_components(guider=ReinforcementLearningGuidance(...))`, or build it around the model's own CFG guider
with `ReinforcementLearningGuidance.from_cfg_guider(...)`; `ModularRLGPipeline` calls such a modular pipeline like
diffalign's RLG pipelines (`diffalign generate` runs models without an RLG pipeline, e.g. Z-Image, through it). The
denoiser carries the reward fine-tune as a
LoRA adapter: the base model is the denoiser with its adapters off, the aligned model the denoiser with its adapters
on (or one named adapter). Classifier-free guidance is applied inside each model, then

    pred = pred_base + rlg_scale * (pred_aligned - pred_base)

(Jin et al., "Inference-time Alignment Control for Diffusion Models with Reinforcement Learning Guidance",
https://huggingface.co/papers/2508.21016). The same contract as diffalign's RLG pipelines
(`diffalign.pipelines.StableDiffusionRLGPipeline` and its SDXL and SD3 siblings).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Union

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput, rescale_noise_cfg
from diffusers.utils import is_peft_available

if TYPE_CHECKING:
    from diffusers.modular_pipelines.modular_pipeline import BlockState

__all__ = ["ModularRLGPipeline", "NormRescaledCFGGuidance", "ReinforcementLearningGuidance", "norm_rescaled",
           "rlg_mix", "set_modular_progress_bar_config"]


def rlg_mix(pred_base: torch.Tensor, terms) -> torch.Tensor:
    """Reinforcement Learning Guidance's mixing of predictions: `pred_base + sum_i w_i (pred_i - pred_base)`.

    With one term `(pred_aligned, w)` this is `pred_base + w * (pred_aligned - pred_base)`: `w = 0` is the base model,
    `w = 1` the aligned model, `w > 1` extrapolates. The terms are added in order (the guider's order).

    Args:
        pred_base (`torch.Tensor`): the base model's (CFG-guided) prediction.
        terms (iterable of `(torch.Tensor, float)`): each aligned model's prediction and its scale `w_i`.
    """
    pred = pred_base
    for pred_aligned, w in terms:
        pred = pred + w * (pred_aligned - pred_base)
    return pred


def norm_rescaled(pred: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`pred` rescaled so that each token (the last axis) has the norm of `reference`: Qwen-Image's true-CFG rescale
    of the guided prediction to the conditional prediction's norm, with the operations of diffusers' modular Qwen-Image
    denoise blocks (`pred * (norm(reference) / norm(pred))`), so that it gives their bits."""
    return pred * (torch.norm(reference, dim=-1, keepdim=True) / torch.norm(pred, dim=-1, keepdim=True))


# Name peft uses for "no adapter" rows in a mixed-adapter batch (`adapter_names=[...]`).
BASE_ADAPTER_NAME = "__base__"

RLGScale = Union[float, list[float]]


# Copied from diffalign.pipelines.pipeline_stable_diffusion_rlg._lora_layers
def _lora_layers(model) -> list:
    if model is None or not is_peft_available():
        return []
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


# Copied from diffalign.pipelines.pipeline_stable_diffusion_rlg._uses_dora
def _uses_dora(lora_layers: list, adapter: str) -> bool:
    return any(layer.use_dora.get(adapter, False) for layer in lora_layers)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class NormRescaledCFGGuidance(ClassifierFreeGuidance):
    r"""Classifier-free guidance whose guided prediction is rescaled per token to the conditional prediction's norm
    (`norm_rescaled`): Qwen-Image's true CFG (`QwenImagePipeline`: `u + s (c - u)`, then `* |c| / |.|`), inside the
    guider rather than after it.

    diffusers' modular Qwen-Image denoise blocks apply that rescale after the guider, to its `pred` with its
    `pred_cond`'s norm. This guider returns the rescaled prediction as both, so the blocks' own rescale multiplies by
    `|pred| / |pred|`, exactly 1: in those blocks it samples bit for bit as diffusers' `ClassifierFreeGuidance`. Its
    point is `ReinforcementLearningGuidance.from_cfg_guider`, which then rescales inside each model's branch
    (Qwen-Image's CFG per model) before mixing, instead of the blocks rescaling the mix.
    """

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        pred = norm_rescaled(super().forward(pred_cond, pred_uncond).pred, pred_cond)
        # `pred_cond=pred`: a block that rescales the output to `pred_cond`'s norm leaves it unchanged
        return GuiderOutput(pred=pred, pred_cond=pred, pred_uncond=pred_uncond)


class ReinforcementLearningGuidance(BaseGuidance):
    r"""
    Reinforcement Learning Guidance (RLG): https://huggingface.co/papers/2508.21016

    Mixes a base model and its reward fine-tuned (aligned) version at every denoising step. Both are the pipeline's
    denoiser: the aligned model is a LoRA adapter on it, the base model the denoiser with its adapters off (selected per
    forward pass through peft's per-sample adapters, injected in `prepare_models` and removed in `cleanup_models`; the
    adapters' configuration is never changed). Classifier-free guidance is applied inside each model, then
    `pred = pred_base + rlg_scale * (pred_aligned - pred_base)`: `rlg_scale=0` samples the base model, `1` the aligned
    model (plain CFG), `0 < w < 1` interpolates and `w > 1` extrapolates.

    Several adapters (e.g. one per reward) mix as `pred_base + sum_i w_i (pred_i - pred_base)`: pass
    `rlg_scale={"aesthetic": 1.2, "jpeg": 0.5}`, or `adapters=["aesthetic", "jpeg"]` with one `rlg_scale` for all.

    Each condition (model x conditional/unconditional) is one forward pass of the denoiser, as with diffusers' other
    guiders: 4 per step with RLG and CFG, 2 outside the RLG window or where the scale is 1 (the aligned model's CFG
    alone). The guider only changes the denoiser: a LoRA that also adapts the text encoders is applied to the prompt of
    both models (use diffalign's RLG pipelines to encode the base model's prompt without it).

    Args:
        guidance_scale (`float`, defaults to `7.5`):
            Classifier-free guidance scale, applied inside each model. `1.0` disables CFG (one condition per model).
        rlg_scale (`float`, `list[float]` or `dict[str, float | list[float]]`, defaults to `1.0`):
            The RLG scale `w`. A list gives one value per denoising step (its length must be the number of steps). A
            dict `{adapter_name: w_i}` mixes several LoRA adapters of the denoiser, each `w_i` a float or a list.
        adapters (`str` or `list[str]`, *optional*):
            The LoRA adapter(s) forming the aligned model. `None` (default): the denoiser exactly as configured (its
            active adapters, as `set_adapters` left them). A name: that adapter. A list of names: each is an aligned
            model with the same `rlg_scale`, mixed as above. Leave it `None` with a dict `rlg_scale`.
        guidance_rescale (`float`, defaults to `0.0`):
            Rescale factor of [Common Diffusion Noise Schedules and Sample Steps are
            Flawed](https://huggingface.co/papers/2305.08891), applied to each model's guided prediction before the
            mix (so `w = 0` and `w = 1` still match `ClassifierFreeGuidance`).
        use_original_formulation (`bool`, defaults to `False`):
            Use CFG's original formulation `cond + g (cond - uncond)`; see
            [`~guiders.classifier_free_guidance.ClassifierFreeGuidance`].
        norm_rescale (`bool`, defaults to `False`):
            Rescale each model's guided prediction per token to the norm of its conditional prediction
            (`norm_rescaled`, Qwen-Image's true CFG, `NormRescaledCFGGuidance`) before the mix. The output's
            `pred_cond` is then the mixed prediction itself, so that a denoise block that rescales the guider's output
            to `pred_cond`'s norm (diffusers' modular Qwen-Image) leaves it unchanged rather than rescaling the mix.
        start (`float`, defaults to `0.0`):
            Fraction of the denoising steps after which RLG starts. Outside [`start`, `stop`) the aligned model runs
            alone, with CFG. Needs a single aligned model (not several adapters).
        stop (`float`, defaults to `1.0`):
            Fraction of the denoising steps at which RLG stops.
        enabled (`bool`, defaults to `True`):
            Whether RLG is enabled. When disabled, the denoiser runs as configured, with CFG.
    """

    _input_predictions = ["pred_cond", "pred_uncond", "pred_cond_base", "pred_uncond_base"]

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        rlg_scale: RLGScale | dict[str, RLGScale] = 1.0,
        adapters: str | list[str] | None = None,
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        norm_rescale: bool = False,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        super().__init__(start, stop, enabled)

        self.guidance_scale = guidance_scale
        self.rlg_scale = rlg_scale
        self.adapters = adapters
        self.guidance_rescale = guidance_rescale
        self.use_original_formulation = use_original_formulation
        self.norm_rescale = norm_rescale

        def is_scale(value):
            return _is_number(value) or (isinstance(value, (list, tuple)) and all(_is_number(v) for v in value))

        if isinstance(rlg_scale, dict):
            if adapters is not None:
                raise ValueError(
                    "Give the adapters either as the keys of a dict `rlg_scale` or as `adapters`, not both."
                )
            if not rlg_scale or not all(is_scale(value) for value in rlg_scale.values()):
                raise ValueError(f"A dict `rlg_scale` maps adapter names to floats or lists, but is {rlg_scale}.")
        elif not is_scale(rlg_scale):
            raise ValueError(f"`rlg_scale` must be a float, a list of floats or a dict, but is {rlg_scale!r}.")
        if not (adapters is None or isinstance(adapters, str) or (isinstance(adapters, (list, tuple)) and adapters)):
            raise ValueError(f"`adapters` must be an adapter name or a non-empty list of names, but is {adapters!r}.")
        if self._mixes_adapters and (start, stop) != (0.0, 1.0):
            raise ValueError(
                "`start`/`stop` need a single aligned model to fall back to; with several adapters use per-adapter"
                " schedules (lists) instead."
            )

        self._batches: list[tuple[str, bool]] = []  # (model, conditional?) of each prepared batch, in order
        self._terms: dict[str, float] | None = None
        self._hook_handles = []

    @classmethod
    def from_cfg_guider(cls, cfg_guider, **rlg_kwargs) -> "ReinforcementLearningGuidance":
        r"""The RLG guider with `cfg_guider`'s classifier-free guidance inside each model: a model's modular pipeline
        samples the same with this guider at `rlg_scale=0` (adapters off) and `1` (adapters on) as with `cfg_guider`.

        Args:
            cfg_guider (`ClassifierFreeGuidance` or `NormRescaledCFGGuidance`): the model's own CFG guider (its scale,
                formulation and rescales; a disabled one means no CFG). Its own step window is not taken: CFG runs at
                every step, as in the models' pipelines.
            rlg_kwargs: `rlg_scale`, `adapters`, `start`, `stop`, `enabled` of the RLG guider.
        """
        if type(cfg_guider) not in (ClassifierFreeGuidance, NormRescaledCFGGuidance):
            raise ValueError(f"RLG applies ClassifierFreeGuidance inside each model; {type(cfg_guider).__name__} is"
                             " another guidance method")
        if (cfg_guider._start, cfg_guider._stop) != (0.0, 1.0):
            raise ValueError("RLG applies CFG at every step: give a CFG guider without a start/stop window")
        original = cfg_guider.use_original_formulation
        # CFG off is the scale at which the guider runs the conditional prediction alone
        scale = cfg_guider.guidance_scale if cfg_guider._enabled else (0.0 if original else 1.0)
        return cls(guidance_scale=scale, guidance_rescale=cfg_guider.guidance_rescale,
                   use_original_formulation=original,
                   norm_rescale=isinstance(cfg_guider, NormRescaledCFGGuidance), **rlg_kwargs)

    # --- which models run this step -----------------------------------------------------------------------------

    @property
    def _mixes_adapters(self) -> bool:
        return isinstance(self.rlg_scale, dict) or isinstance(self.adapters, (list, tuple))

    def _scale_at(self, scale: RLGScale) -> float:
        if isinstance(scale, (list, tuple)):
            if self._num_inference_steps is not None and len(scale) != self._num_inference_steps:
                raise ValueError(
                    f"The `rlg_scale` schedule has {len(scale)} values, but the sampler runs"
                    f" {self._num_inference_steps} steps."
                )
            return float(scale[self._step or 0])
        return float(scale)

    def _is_rlg_enabled(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is None:
            return True
        start_step = int(self._start * self._num_inference_steps)
        stop_step = int(self._stop * self._num_inference_steps)
        return start_step <= (self._step or 0) < stop_step

    def _is_cfg_enabled(self) -> bool:
        if self.use_original_formulation:
            return not math.isclose(self.guidance_scale, 0.0)
        return not math.isclose(self.guidance_scale, 1.0)

    def _rlg_terms(self) -> dict[str, float] | None:
        r"""`{model: w}` of this step's `pred_base + sum_i w_i (pred_i - pred_base)` (`{}`: the base alone), or `None`
        when RLG is off (outside the window, disabled, or `w == 1`): the aligned model alone."""
        if not self._is_rlg_enabled():
            return None
        if isinstance(self.rlg_scale, dict):
            scales = {f"adapter:{name}": self._scale_at(scale) for name, scale in self.rlg_scale.items()}
        elif isinstance(self.adapters, (list, tuple)):
            scales = {f"adapter:{name}": self._scale_at(self.rlg_scale) for name in self.adapters}
        else:
            w = self._scale_at(self.rlg_scale)
            if w == 1:
                return None
            scales = {"aligned": w}
        return {name: w for name, w in scales.items() if w != 0}

    def _plan(self) -> list[tuple[str, bool]]:
        terms = self._rlg_terms()
        models = ["aligned"] if terms is None else ["base"] + list(terms)
        conditions = [True, False] if self._is_cfg_enabled() else [True]
        return [(model, conditional) for model in models for conditional in conditions]

    @staticmethod
    def _identifier(model: str, conditional: bool) -> str:
        prediction = "pred_cond" if conditional else "pred_uncond"
        return prediction if model == "aligned" else f"{prediction}_{model}"

    def _adapter_of(self, model: str) -> str | None:
        r"""The LoRA adapter `model` runs with: `"__base__"` for none, `None` for the denoiser as configured."""
        if model == "base":
            return BASE_ADAPTER_NAME
        if model.startswith("adapter:"):
            return model[len("adapter:") :]
        return self.adapters if isinstance(self.adapters, str) else None

    # --- BaseGuidance interface ---------------------------------------------------------------------------------

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        self._terms = self._rlg_terms()  # also checks the schedules' lengths

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list["BlockState"]:
        self._batches = self._plan()
        self._terms = self._rlg_terms()
        return [
            self._prepare_batch(data, 0 if conditional else 1, self._identifier(model, conditional))
            for model, conditional in self._batches
        ]

    def prepare_inputs_from_block_state(
        self, data: "BlockState", input_fields: dict[str, str | tuple[str, str]]
    ) -> list["BlockState"]:
        self._batches = self._plan()
        self._terms = self._rlg_terms()
        return [
            self._prepare_batch_from_block_state(
                input_fields, data, 0 if conditional else 1, self._identifier(model, conditional)
            )
            for model, conditional in self._batches
        ]

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        model, _ = self._batches[self._count_prepared - 1]
        adapter = self._adapter_of(model)
        if adapter is None:
            return  # the denoiser exactly as configured
        lora_layers = _lora_layers(denoiser)
        self._check_adapter(lora_layers, adapter)
        if adapter != BASE_ADAPTER_NAME and [adapter] == list(lora_layers[0].active_adapters):
            return  # the adapter the denoiser runs anyway

        def hook(module, args, kwargs):
            inputs = args[0] if args else kwargs["x"]
            return args, {**kwargs, "adapter_names": [adapter] * inputs.shape[0]}

        self._hook_handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in lora_layers]

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    def _check_adapter(self, lora_layers: list, adapter: str):
        r"""Raises a `ValueError` rather than silently sampling the wrong model."""
        if not lora_layers:
            raise ValueError(
                "RLG needs the aligned model as a LoRA adapter on the denoiser (the base model is the denoiser with its"
                " adapters off), but the denoiser has none; load one with `pipe.load_lora_weights(...)`."
            )
        if any(layer.merged for layer in lora_layers):
            raise ValueError(
                "The LoRA adapters are fused into the denoiser, so its base weights are gone; call"
                " `pipe.unfuse_lora()` (or the denoiser's `unfuse_lora()`)."
            )
        if all(layer.disable_adapters for layer in lora_layers):
            # peft runs disabled adapters as the base model, whatever adapter a forward pass selects
            raise ValueError("The LoRA adapters of the denoiser are disabled, so there is no aligned model.")
        if adapter == BASE_ADAPTER_NAME:
            return
        loaded = sorted({name for layer in lora_layers for name in layer.lora_A})
        if adapter not in loaded:
            raise ValueError(f"Unknown LoRA adapter '{adapter}'; the denoiser has {loaded}.")
        if _uses_dora(lora_layers, adapter) and [adapter] != list(lora_layers[0].active_adapters):
            raise ValueError(
                f"LoRA adapter '{adapter}' uses DoRA, which peft cannot select per forward pass; activate it with"
                " `set_adapters` and leave `adapters=None`."
            )

    def forward(self, **predictions: torch.Tensor) -> GuiderOutput:
        # classifier-free guidance inside each model
        guided, conditional, unconditional = {}, {}, {}
        for model in dict.fromkeys(model for model, _ in self._batches):
            pred_cond = predictions[self._identifier(model, True)]
            pred_uncond = predictions.get(self._identifier(model, False))
            if self._is_cfg_enabled():
                shift = pred_cond - pred_uncond
                pred = pred_cond if self.use_original_formulation else pred_uncond
                pred = pred + self.guidance_scale * shift
            else:
                pred = pred_cond
            if self.guidance_rescale > 0.0:
                pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
            if self.norm_rescale:
                pred = norm_rescaled(pred, pred_cond)
            guided[model], conditional[model], unconditional[model] = pred, pred_cond, pred_uncond

        # reinforcement learning guidance: pred_base + sum_i w_i (pred_i - pred_base)
        if self._terms is None:
            pred = guided["aligned"]
        else:
            pred = rlg_mix(guided["base"], [(guided[model], w) for model, w in self._terms.items()])
        main = "aligned" if "aligned" in guided else "base"
        # with the rescale inside each model, `pred_cond=pred` makes a block's rescale after the guider a no-op
        pred_cond = pred if self.norm_rescale else conditional[main]
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=unconditional[main])

    @property
    def is_conditional(self) -> bool:
        if 0 < self._count_prepared <= len(self._batches):
            return self._batches[self._count_prepared - 1][1]
        return False

    @property
    def num_conditions(self) -> int:
        return len(self._plan())

    def get_state(self):
        state = super().get_state()
        state["rlg_terms"] = self._terms
        return state


def set_modular_progress_bar_config(modular_pipeline, **kwargs):
    """`set_progress_bar_config(**kwargs)` on every block of a modular pipeline, nested ones included (diffusers'
    `ModularPipeline.set_progress_bar_config` reaches the top-level blocks only, which misses e.g. Z-Image's denoising
    loop inside its auto blocks)."""
    pending = [modular_pipeline._blocks]  # the pipeline's own blocks (`.blocks` is a copy)
    while pending:
        block = pending.pop()
        if hasattr(block, "set_progress_bar_config"):
            block.set_progress_bar_config(**kwargs)
        pending += list(getattr(block, "sub_blocks", {}).values())


class ModularRLGPipeline:
    r"""A diffusers modular pipeline that samples with `ReinforcementLearningGuidance`, called like diffalign's RLG
    pipelines (`pipe(prompt, rlg_scale=..., rlg_start=..., rlg_stop=..., guidance_scale=..., ...).images`): the RLG
    route of a model that has modular blocks and no RLG pipeline (`ModelFamily.rlg_pipeline`).

    Each call puts a fresh RLG guider into the modular pipeline, built around the model's own CFG guider for that
    call's `guidance_scale` (`cfg_guider(guidance_scale)`): `rlg_scale=0` is the model with its LoRA adapters off and
    `1` the model as configured (adapters on), each sampled exactly as the modular pipeline samples with that CFG
    guider. The aligned model is a LoRA adapter on the denoiser (a fully fine-tuned denoiser has no route here).

    Args:
        modular_pipeline (`ModularPipeline`): the model's modular pipeline; its components are shared, not copied.
        cfg_guider (`Callable[[float], ClassifierFreeGuidance]`): the model's own CFG guider for a `guidance_scale`.
        default_guidance_scale (`float`): the `guidance_scale` of a call that gives none.
        default_negative_prompt (`str`, *optional*): the negative prompt of a call that gives none (`None`: the
            blocks' own default). A string negative prompt goes to the blocks as a list, once per prompt (diffusers'
            modular Qwen-Image encodes its default `""` once, whatever the number of prompts, and stops; its
            Qwen-Image-Edit blocks replace a string `""` by `" "`).
        output (`str`): the blocks' output returned as `.images` ("videos" for a video model: `(B, F, 3, H, W)`).
        second_expert_guider (`Callable[[float], ClassifierFreeGuidance]`, *optional*): the CFG guider of a
            two-expert model's second expert (`guider_2`, Wan 2.2 A14B's low-noise `transformer_2`), built for a
            call's `guidance_scale_2` (default its `guidance_scale`). Each expert that carries LoRA adapters samples
            with the RLG guider around its own CFG guider (the same `rlg_scale`, window and adapters), the other
            one with its CFG guider alone (`expert_guiders`): `rlg_scale=0` is both experts with their adapters off.
    """

    def __init__(self, modular_pipeline, cfg_guider, default_guidance_scale: float,
                 default_negative_prompt: str | None = None, output: str = "images", second_expert_guider=None):
        self.modular_pipeline = modular_pipeline
        self.cfg_guider = cfg_guider
        self.default_guidance_scale = default_guidance_scale
        self.default_negative_prompt = default_negative_prompt
        self.output = output
        self.second_expert_guider = second_expert_guider

    @property
    def components(self) -> dict:
        return self.modular_pipeline.components

    @property
    def _execution_device(self) -> torch.device:
        return self.modular_pipeline._execution_device

    def set_progress_bar_config(self, **kwargs):
        set_modular_progress_bar_config(self.modular_pipeline, **kwargs)

    def to(self, *args, **kwargs) -> "ModularRLGPipeline":
        self.modular_pipeline.to(*args, **kwargs)
        return self

    def guider(self, guidance_scale: float | None = None, rlg_scale: RLGScale | dict[str, RLGScale] = 1.0,
               rlg_start: float = 0.0, rlg_stop: float = 1.0, adapters: str | list[str] | None = None):
        r"""The RLG guider of a call: the model's own CFG for `guidance_scale` inside each model."""
        scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        return ReinforcementLearningGuidance.from_cfg_guider(
            self.cfg_guider(scale), rlg_scale=rlg_scale, adapters=adapters, start=rlg_start, stop=rlg_stop
        )

    def expert_guiders(self, guidance_scale: float | None = None, guidance_scale_2: float | None = None,
                       **rlg_kwargs) -> dict:
        r"""`{"guider": ..., "guider_2": ...}` of a two-expert model's call (`second_expert_guider`): the RLG guider
        (`rlg_kwargs`: `rlg_scale`, `start`, `stop`, `adapters`) around the expert's own CFG guider where the expert
        (`transformer`, `transformer_2`) carries LoRA adapters, its CFG guider alone where it carries none (the base
        at every `rlg_scale`). The blocks give each guider its own expert, so the RLG guider selects the adapters of
        the expert of the step. With no adapters on either expert the first is the RLG guider, which then refuses a
        `rlg_scale` other than 1 as on a one-expert model."""
        scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        scale_2 = scale if guidance_scale_2 is None else guidance_scale_2
        cfg = {"guider": self.cfg_guider(scale), "guider_2": self.second_expert_guider(scale_2)}
        tuned = {guider: bool(_lora_layers(self.components.get(expert)))
                 for guider, expert in (("guider", "transformer"), ("guider_2", "transformer_2"))}
        if not any(tuned.values()):
            tuned["guider"] = True
        return {guider: ReinforcementLearningGuidance.from_cfg_guider(cfg[guider], **rlg_kwargs) if tuned[guider]
                else cfg[guider] for guider in cfg}

    def __call__(self, prompt, guidance_scale: float | None = None, rlg_scale: RLGScale | dict[str, RLGScale] = 1.0,
                 rlg_start: float = 0.0, rlg_stop: float = 1.0, adapters: str | list[str] | None = None,
                 negative_prompt=None, true_cfg_scale: float | None = None, guidance_scale_2: float | None = None,
                 **kwargs):
        r"""Images of `prompt` (`.images`, as `output_type` asks) with RLG scale `rlg_scale` in the steps
        [`rlg_start`, `rlg_stop`); `kwargs` go to the modular pipeline (`num_inference_steps`, `generator`,
        `height`, `width`, `num_images_per_prompt`, `latents`, `output_type`, ...). `true_cfg_scale`, where given,
        is the CFG scale (the argument of pipelines with true CFG, e.g. Qwen-Image's) instead of `guidance_scale`."""
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

        scale = true_cfg_scale if true_cfg_scale is not None else guidance_scale
        if self.second_expert_guider is not None:
            self.modular_pipeline.update_components(**self.expert_guiders(
                scale, guidance_scale_2, rlg_scale=rlg_scale, start=rlg_start, stop=rlg_stop, adapters=adapters))
        elif guidance_scale_2 is not None:
            raise ValueError("guidance_scale_2 is the second expert's CFG scale; this model has one expert")
        else:
            self.modular_pipeline.update_components(
                guider=self.guider(scale, rlg_scale, rlg_start, rlg_stop, adapters))
        # some text encoder blocks write the templated prompts into the list they get (Z-Image's): hand them copies
        copy = lambda text: list(text) if isinstance(text, (list, tuple)) else text  # noqa: E731
        negative_prompt = self.default_negative_prompt if negative_prompt is None else negative_prompt
        if isinstance(negative_prompt, str):  # one per prompt, and as a list even for one prompt: diffusers' modular
            # Qwen-Image-Edit encodes a falsy string negative prompt as " " (`negative_prompt or " "`), its pipelines
            # the "" given
            negative_prompt = [negative_prompt] * (len(prompt) if isinstance(prompt, (list, tuple)) else 1)
        if negative_prompt is not None:
            kwargs["negative_prompt"] = copy(negative_prompt)
        if self.output == "videos" and "num_images_per_prompt" in kwargs:  # a video pipeline's name for it
            kwargs["num_videos_per_prompt"] = kwargs.pop("num_images_per_prompt")
        images = self.modular_pipeline(prompt=copy(prompt), output=self.output, **kwargs)
        return ImagePipelineOutput(images=images)
