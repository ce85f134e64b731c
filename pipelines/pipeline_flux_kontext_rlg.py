# Reinforcement Learning Guidance (RLG) for FLUX.1 Kontext (image editing with guidance-distilled flow matching): the
# alignment strength of a reward-fine-tuned editing model becomes a dial at inference. Jin et al., "Inference-time
# Alignment Control for Diffusion Models with Reinforcement Learning Guidance"
# (https://huggingface.co/papers/2508.21016).
#
# Self-contained diffusers pipeline (imports only torch, numpy, diffusers, transformers; peft lazily, for LoRA). It can
# be imported as `diffalign.pipelines.FluxKontextRLGPipeline` or loaded as a community pipeline:
# `DiffusionPipeline.from_pretrained(repo, custom_pipeline="pipeline_flux_kontext_rlg.py", trust_remote_code=True)`.
# It subclasses diffusers' `FluxKontextPipeline` (prompt encoding, condition-image encoding and packing, latent
# preparation, checks and LoRA loading are FluxKontextPipeline's own) and replaces `__call__`. diffusers' modular
# Kontext blocks take no guider (FLUX.1's guidance is embedded), so RLG runs in this pipeline. The RLG machinery is
# `pipeline_flux_rlg.py`'s (copied, so that each file stands alone): the condition image's tokens follow the noisy
# latents in every model's input, as in FluxKontextPipeline, and each model's output is cut back to the latents'
# tokens. Each model has its own guidance inside (the embedded `guidance_scale`, and true CFG when `true_cfg_scale > 1`
# with a negative prompt); then `v = v_base + w (v_aligned - v_base)`.
#
# Licensed under the Apache License, Version 2.0. The parts of `__call__` that are FluxKontextPipeline's (sizes,
# condition-image preprocessing, timesteps, decoding) are the HuggingFace Team's (Copyright 2025 Black Forest Labs and
# The HuggingFace Team, Apache-2.0), copied from diffusers 0.42.1.
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from diffusers.image_processor import PipelineImageInput
from diffusers.models import AutoencoderKL, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux_kontext import (
    PREFERRED_KONTEXT_RESOLUTIONS,
    FluxKontextPipeline,
    calculate_shift,
    retrieve_timesteps,
)
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import is_peft_available, is_torch_xla_available, logging, replace_example_docstring
from diffusers.utils.torch_utils import get_module_execution_device
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    T5EncoderModel,
    T5TokenizerFast,
)

if is_torch_xla_available():
    import torch_xla.core.xla_model as xm

    XLA_AVAILABLE = True
else:
    XLA_AVAILABLE = False

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers.utils import load_image
        >>> from diffalign.pipelines import FluxKontextRLGPipeline

        >>> pipe = FluxKontextRLGPipeline.from_pretrained(
        ...     "black-forest-labs/FLUX.1-Kontext-dev", torch_dtype=torch.bfloat16
        ... )
        >>> pipe = pipe.to("cuda")
        >>> pipe.load_lora_weights("path/to/grpo_lora")  # e.g. a LoRA trained with `diffalign train ddpo`

        >>> image = load_image("input.png").convert("RGB")
        >>> # 0: base model, 1: aligned model, >1: stronger alignment than training gave
        >>> edit = pipe(image=image, prompt="make the car red", guidance_scale=2.5, rlg_scale=1.5).images[0]
        ```
"""

# Name peft uses for "no adapter" rows in a mixed-adapter batch (`adapter_names=[...]`).
BASE_ADAPTER_NAME = "__base__"

RLGScale = Union[float, Sequence[float], Callable[[int], float]]


# Copied from diffalign.pipelines.pipeline_flux_rlg._RLGModel
class _RLGModel(NamedTuple):
    """One denoiser combined by RLG: `transformer_name` is the pipeline attribute, `adapter` the LoRA adapter it runs with
    (`"__base__"` for none, `None` to run the model exactly as it is configured)."""

    name: str
    transformer_name: str
    adapter: Optional[str]


# Copied from diffalign.pipelines.pipeline_flux_rlg.rlg_mix
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


# Copied from diffalign.pipelines.pipeline_flux_rlg._lora_layers
def _lora_layers(model) -> list:
    if model is None or not is_peft_available():
        return []
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


# Copied from diffalign.pipelines.pipeline_flux_rlg._loaded_adapters
def _loaded_adapters(model) -> List[str]:
    names = set()
    for layer in _lora_layers(model):
        names |= set(layer.lora_A.keys()) | set(layer.lora_embedding_A.keys())
    return sorted(names)


# Copied from diffalign.pipelines.pipeline_flux_rlg._uses_dora
def _uses_dora(lora_layers: list, adapter: str) -> bool:
    return any(layer.use_dora.get(adapter, False) for layer in lora_layers)


@contextmanager
# Copied from diffalign.pipelines.pipeline_flux_rlg._lora_adapter_rows
def _lora_adapter_rows(model, adapter_names: Union[str, List[str], None]):
    r"""
    Runs every peft `LoraLayer` of `model` with a per-sample adapter: row `j` of each layer's input goes through
    `adapter_names[j]` (`"__base__"` for no adapter). This is peft's mixed-batch inference (exact, no copy of the
    weights), injected with forward pre-hooks because diffusers models do not forward `adapter_names`. A single name
    applies to every row. `None` leaves the model untouched.
    """
    if adapter_names is None:
        yield
        return

    def hook(module, args, kwargs):
        names = adapter_names
        if isinstance(names, str):
            inputs = args[0] if args else kwargs["x"]
            names = [names] * inputs.shape[0]
        return args, {**kwargs, "adapter_names": names}

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in _lora_layers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# Copied from diffalign.pipelines.pipeline_flux_rlg._is_number
def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)



class FluxKontextRLGPipeline(FluxKontextPipeline):
    r"""
    Pipeline for image editing (and text-to-image generation) using FLUX.1 Kontext with Reinforcement Learning
    Guidance (RLG).

    At every denoising step the base and the aligned (reward fine-tuned) model each predict a velocity for the noisy
    latents followed by the condition image's tokens, with FLUX's embedded guidance (`guidance_scale`, a transformer
    input of guidance-distilled models such as FLUX.1 Kontext [dev]) and, when `true_cfg_scale > 1` and a negative
    prompt is given, true classifier-free guidance inside each model; the two velocities are then mixed:
    `v = v_base + rlg_scale * (v_aligned - v_base)`. `rlg_scale=0` samples the base model (exactly
    `FluxKontextPipeline`), `1` the aligned model, values in between interpolate and values above 1 extrapolate.
    Sampling is FluxKontextPipeline's deterministic flow-matching ODE (Euler).

    The aligned model is either a LoRA adapter on `transformer` (load it with
    [`~loaders.FluxLoraLoaderMixin.load_lora_weights`]; the base is `transformer` with adapters off, and both
    predictions come from one batched forward pass of the same weights) or a fully fine-tuned `aligned_transformer`.

    Args:
        scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer, image_encoder,
        feature_extractor: as in [`FluxKontextPipeline`]. With a LoRA adapter loaded and no `aligned_transformer`, the
            adapter makes `transformer` the aligned model.
        aligned_transformer ([`FluxTransformer2DModel`], *optional*):
            A fully fine-tuned copy of `transformer` (same config). When given, `transformer` and
            `aligned_transformer` are used as they are (LoRA adapters on either stay as configured).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->transformer->aligned_transformer->vae"
    _optional_components = ["image_encoder", "feature_extractor", "aligned_transformer"]
    _callback_tensor_inputs = ["latents", "prompt_embeds"]
    # text encoders a LoRA adapter may also change: the base model's prompt is encoded with the adapters off
    _rlg_text_encoders = ["text_encoder", "text_encoder_2"]

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: FluxTransformer2DModel,
        image_encoder: CLIPVisionModelWithProjection = None,
        feature_extractor: CLIPImageProcessor = None,
        aligned_transformer: Optional[FluxTransformer2DModel] = None,
    ):
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.register_modules(aligned_transformer=aligned_transformer)

    # Copied from diffalign.pipelines.pipeline_flux_rlg.FluxRLGPipeline.check_rlg_inputs
    def check_rlg_inputs(self, rlg_scale, rlg_start: float, rlg_stop: float, prompt_embeds=None):
        r"""
        Validates the RLG arguments of `__call__` against the pipeline's models (see `__call__` for their meaning).
        Raises a `ValueError` rather than silently sampling the base model when no aligned model is available.
        `prompt_embeds` is `__call__`'s: when given, the text encoders are not used.
        """
        is_schedule = isinstance(rlg_scale, (list, tuple)) or callable(rlg_scale)
        if not (_is_number(rlg_scale) or is_schedule or isinstance(rlg_scale, dict)):
            raise ValueError(
                f"`rlg_scale` must be a float, a list or callable schedule, or a dict of adapter names, but is {type(rlg_scale)}."
            )
        if not (0.0 <= rlg_start <= rlg_stop <= 1.0):
            raise ValueError(f"Need 0 <= `rlg_start` <= `rlg_stop` <= 1, but got {rlg_start} and {rlg_stop}.")

        lora_layers = _lora_layers(self.transformer)
        if isinstance(rlg_scale, dict):
            if self.aligned_transformer is not None:
                raise ValueError(
                    "A dict `rlg_scale` mixes LoRA adapters of `transformer`; it cannot be used with `aligned_transformer`."
                )
            if len(rlg_scale) == 0:
                raise ValueError("`rlg_scale` is an empty dict; give at least one `{adapter_name: scale}`.")
            if (rlg_start, rlg_stop) != (0.0, 1.0):
                raise ValueError(
                    "`rlg_start`/`rlg_stop` need a single aligned model; with a dict `rlg_scale` use per-adapter schedules."
                )
            loaded = _loaded_adapters(self.transformer)
            unknown = [name for name in rlg_scale if name not in loaded]
            if unknown:
                raise ValueError(f"Unknown LoRA adapter(s) {unknown} in `rlg_scale`; loaded adapters: {loaded}.")
            if all(layer.disable_adapters for layer in lora_layers):
                # peft runs disabled adapters as the base model, whatever adapter a row selects
                raise ValueError("The LoRA adapters of `transformer` are disabled; call `pipe.enable_lora()`.")
            for name, scale in rlg_scale.items():
                if not (_is_number(scale) or isinstance(scale, (list, tuple)) or callable(scale)):
                    raise ValueError(f"`rlg_scale['{name}']` must be a float or a schedule, but is {type(scale)}.")
        elif self.aligned_transformer is None and not (_is_number(rlg_scale) and rlg_scale == 1):
            if not lora_layers:
                raise ValueError(
                    f"`rlg_scale={rlg_scale}` needs an aligned model, but the pipeline has no `aligned_transformer` and no LoRA"
                    " adapter on `transformer`. Load one with `pipe.load_lora_weights(...)` or pass `aligned_transformer`."
                )
            if all(layer.disable_adapters for layer in lora_layers):
                raise ValueError(
                    "The LoRA adapters of `transformer` are disabled, so there is no aligned model; call `pipe.enable_lora()`."
                )
            if not lora_layers[0].active_adapters:
                raise ValueError(
                    "No LoRA adapter of `transformer` is active; activate one with `pipe.set_adapters(...)`."
                )

        if self.aligned_transformer is None and not (_is_number(rlg_scale) and rlg_scale == 1):
            # the base model is needed: it comes from per-sample adapter selection (peft's mixed batch), in the
            # denoiser and in each text encoder with a LoRA, which needs unfused adapters
            models = {"transformer": lora_layers}
            if prompt_embeds is None:
                models.update({name: _lora_layers(getattr(self, name, None)) for name in self._rlg_text_encoders})
            fused = [f"`{name}`" for name, layers in models.items() if any(layer.merged for layer in layers)]
            if fused:
                raise ValueError(
                    f"The LoRA adapters are fused into {', '.join(fused)}, so the base weights are gone and"
                    f" `rlg_scale={rlg_scale}` cannot run the base model; call `pipe.unfuse_lora()`."
                )
            if isinstance(rlg_scale, dict):
                dora = sorted({name for name in rlg_scale for layers in models.values() if _uses_dora(layers, name)})
                if dora:
                    raise ValueError(
                        f"LoRA adapter(s) {dora} use DoRA, which peft cannot select per sample; a dict `rlg_scale`"
                        " mixes plain LoRA adapters only."
                    )

    # Copied from diffalign.pipelines.pipeline_flux_rlg.FluxRLGPipeline._rlg_scale_at
    @staticmethod
    def _rlg_scale_at(scale, step: int) -> float:
        if callable(scale):
            return float(scale(step))
        if isinstance(scale, (list, tuple)):
            return float(scale[step])
        return float(scale)

    # Copied from diffalign.pipelines.pipeline_flux_rlg.FluxRLGPipeline._check_rlg_schedule_length
    def _check_rlg_schedule_length(self, rlg_scale, num_steps: int):
        schedules = rlg_scale.items() if isinstance(rlg_scale, dict) else [(None, rlg_scale)]
        for name, scale in schedules:
            if isinstance(scale, (list, tuple)) and len(scale) != num_steps:
                where = "`rlg_scale`" if name is None else f"`rlg_scale['{name}']`"
                raise ValueError(f"{where} has {len(scale)} values, but the sampler runs {num_steps} steps.")

    # Copied from diffalign.pipelines.pipeline_flux_rlg.FluxRLGPipeline._prepare_rlg_models
    def _prepare_rlg_models(self, rlg_scale) -> Dict[str, _RLGModel]:
        r"""The denoisers RLG combines this call, by name: `"base"` and `"aligned"`, or `"base"` and one per adapter."""
        if self.aligned_transformer is not None:
            return {
                "base": _RLGModel("base", "transformer", None),
                "aligned": _RLGModel("aligned", "aligned_transformer", None),
            }
        lora_layers = _lora_layers(self.transformer)
        if not lora_layers:
            # only reached with a constant `rlg_scale == 1` (see `check_rlg_inputs`): plain sampling with `transformer`
            return {"aligned": _RLGModel("aligned", "transformer", None)}
        base = _RLGModel("base", "transformer", BASE_ADAPTER_NAME)
        if isinstance(rlg_scale, dict):
            return {"base": base, **{name: _RLGModel(name, "transformer", name) for name in rlg_scale}}
        active = list(lora_layers[0].active_adapters)
        # several adapters active at once form one aligned model that a per-row adapter cannot express, nor can a
        # DoRA adapter be selected per row: the aligned model then runs in its own forward pass, exactly as configured
        per_row = len(active) == 1 and not _uses_dora(lora_layers, active[0])
        aligned = _RLGModel("aligned", "transformer", active[0] if per_row else None)
        return {"base": base, "aligned": aligned}

    # Copied from diffalign.pipelines.pipeline_flux_rlg.FluxRLGPipeline._rlg_text_encoder_adapter
    def _rlg_text_encoder_adapter(self, model: _RLGModel) -> Optional[str]:
        r"""
        The LoRA adapter the text encoders encode `model`'s prompt with, when the LoRA also adapts them: `None` runs
        them exactly as configured (no per-sample adapter: fused and DoRA adapters work), as for the aligned model.
        """
        if model.adapter is None:
            return None
        for name in self._rlg_text_encoders:
            layers = _lora_layers(getattr(self, name, None))
            if layers and [model.adapter] != list(layers[0].active_adapters):
                return model.adapter
        return None

    # Copied from diffalign.pipelines.pipeline_flux_rlg.FluxRLGPipeline._rlg_terms
    def _rlg_terms(self) -> Dict[str, float]:
        r"""`{model: w}` for this step's combination `pred_base + sum_i w_i (pred_i - pred_base)`; `{}` is the base alone."""
        scales = self.rlg_scale if isinstance(self.rlg_scale, dict) else {"aligned": self.rlg_scale}
        return {name: w for name, w in scales.items() if w != 0}

    # Copied from diffalign.pipelines.pipeline_flux_rlg.FluxRLGPipeline._rlg_forward
    def _rlg_forward(
        self,
        models: List[_RLGModel],
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        guidance: Optional[torch.Tensor],
        conditioning: Dict[str, tuple],
        txt_ids: torch.Tensor,
        img_ids: torch.Tensor,
        single_pass: bool,
    ) -> Dict[str, torch.Tensor]:
        r"""
        Runs the transformers `models` on `hidden_states` (packed latents) and returns each one's raw velocity (true
        CFG rows included).

        With `single_pass`, all the LoRA variants of `transformer` (base rows with `"__base__"`, aligned rows with their
        adapter) go through one batched forward; otherwise each model gets its own forward pass.
        `conditioning[name]` is `(encoder_hidden_states, pooled_projections)`; `timestep` is already divided by 1000
        and `guidance` is the embedded guidance per row (used by transformers with `guidance_embeds`). The position
        ids `txt_ids`/`img_ids` are the same for every row.
        """
        if single_pass:
            batched = [model for model in models if model.adapter is not None]
            groups = ([batched] if batched else []) + [[model] for model in models if model.adapter is None]
        else:
            groups = [[model] for model in models]

        num_rows = hidden_states.shape[0]
        predictions = {}
        for group in groups:
            transformer = getattr(self, group[0].transformer_name)
            if len(group) == 1 and (group[0].adapter is None or [group[0].adapter] == self._rlg_active_adapters):
                adapter_rows = None  # the model exactly as configured
            elif len(group) == 1:
                adapter_rows = group[0].adapter
            else:
                adapter_rows = [model.adapter for model in group for _ in range(num_rows)]
            group_guidance = None
            if guidance is not None and transformer.config.guidance_embeds:
                group_guidance = torch.cat([guidance] * len(group))
            with _lora_adapter_rows(transformer, adapter_rows):
                velocity = transformer(
                    hidden_states=torch.cat([hidden_states] * len(group)),
                    timestep=torch.cat([timestep] * len(group)),
                    guidance=group_guidance,
                    pooled_projections=torch.cat([conditioning[model.name][1] for model in group]),
                    encoder_hidden_states=torch.cat([conditioning[model.name][0] for model in group]),
                    txt_ids=txt_ids,
                    img_ids=img_ids,
                    joint_attention_kwargs=self.joint_attention_kwargs,
                    return_dict=False,
                )[0]
            predictions.update(zip([model.name for model in group], velocity.chunk(len(group))))
        return predictions

    # Copied from diffalign.pipelines.pipeline_flux_rlg.FluxRLGPipeline.true_cfg_scale
    @property
    def true_cfg_scale(self):
        return self._true_cfg_scale

    # Copied from diffalign.pipelines.pipeline_flux_rlg.FluxRLGPipeline.do_true_cfg
    @property
    def do_true_cfg(self):
        r"""Whether true classifier-free guidance (a negative prompt and `true_cfg_scale > 1`) runs in each model."""
        return self._do_true_cfg

    # Copied from diffalign.pipelines.pipeline_flux_rlg.FluxRLGPipeline.rlg_scale
    @property
    def rlg_scale(self):
        r"""The RLG scale of the current step: a float, or `{adapter_name: float}` when mixing adapters."""
        return self._rlg_scale

    # Copied from diffalign.pipelines.pipeline_flux_rlg.FluxRLGPipeline.do_rlg
    @property
    def do_rlg(self):
        r"""Whether the current step mixes the base model in (inside the `rlg_start`/`rlg_stop` window and
        `rlg_scale != 1`); otherwise the aligned model runs alone, with the cost of plain CFG."""
        return self._rlg_in_window and (isinstance(self._rlg_scale, dict) or self._rlg_scale != 1)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: PipelineImageInput | None = None,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image=None,
        negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        max_area: int = 1024**2,
        _auto_resize: bool = True,
        rlg_scale: Union[RLGScale, Dict[str, RLGScale]] = 1.0,
        rlg_start: float = 0.0,
        rlg_stop: float = 1.0,
        rlg_single_pass: bool = True,
    ) -> FluxPipelineOutput | tuple:
        r"""
        Function invoked when calling the pipeline for editing (or, without `image`, generation). The arguments
        shared with [`FluxKontextPipeline`] mean the same; IP-Adapter inputs are not supported.

        Args:
            image, prompt, prompt_2, negative_prompt, negative_prompt_2, height, width, num_inference_steps, sigmas,
            num_images_per_prompt, generator, latents, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
            negative_pooled_prompt_embeds, output_type, return_dict, joint_attention_kwargs, max_sequence_length,
            max_area, _auto_resize:
                As in [`FluxKontextPipeline.__call__`]: the condition `image` is encoded once and its tokens follow the
                noisy latents' in the base and the aligned model alike; the output has about `max_area` pixels.
            true_cfg_scale (`float`, *optional*, defaults to 1.0):
                True classifier-free guidance, enabled when `true_cfg_scale > 1` and a negative prompt (or negative
                embeddings) is given; applied inside the base and the aligned model before RLG mixes them.
            guidance_scale (`float`, *optional*, defaults to 3.5):
                The embedded guidance of guidance-distilled models (FLUX.1 Kontext [dev]: a transformer input; its
                model card recommends 2.5), the same for
                the base and the aligned model. Ignored by transformers without `guidance_embeds`.
            callback_on_step_end (`Callable`, *optional*):
                Called at the end of each step as `callback_on_step_end(self, step, timestep, callback_kwargs)`; it may
                replace `latents`, and `prompt_embeds` (the aligned model's; from the next step on every model then
                uses the returned embeddings). It may also set `pipe._rlg_scale` for the following steps.
            callback_on_step_end_tensor_inputs (`list`, *optional*):
                Tensors passed in `callback_kwargs`: any of `._callback_tensor_inputs`.
            rlg_scale (`float`, `List[float]`, `Callable[[int], float]` or `Dict[str, ...]`, *optional*, defaults to 1.0):
                Reinforcement Learning Guidance scale `w` in `v = v_base + w * (v_aligned - v_base)`: `0` is the base
                model, `1` the aligned model, `0 < w < 1` interpolates, `w > 1` extrapolates (the RLG authors
                recommend 1 to 3). A list (one value per denoising step) or a callable of the step index gives a
                per-step schedule. A dict `{adapter_name: w_i}` mixes several LoRA adapters of `transformer`,
                `v_base + sum_i w_i (v_i - v_base)`, each `w_i` again a float or a schedule. True CFG is applied
                inside each model first.
            rlg_start (`float`, *optional*, defaults to 0.0):
                Fraction of the denoising steps after which RLG starts. Outside [`rlg_start`, `rlg_stop`) the aligned
                model runs alone, at the cost of plain sampling.
            rlg_stop (`float`, *optional*, defaults to 1.0):
                Fraction of the denoising steps at which RLG stops.
            rlg_single_pass (`bool`, *optional*, defaults to `True`):
                With a LoRA aligned model, compute the base and aligned velocities (true CFG rows included) in one
                batched transformer forward (per-row adapter selection). `False` runs one forward per model; the
                results are the same up to float rounding.

        Examples:

        Returns:
            [`~pipelines.flux.FluxPipelineOutput`] or `tuple`: [`~pipelines.flux.FluxPipelineOutput`] if `return_dict`
            is True, otherwise a `tuple` whose first element is the generated images.
        """

        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor

        # as FluxKontextPipeline: the output size keeps the aspect ratio with `max_area` pixels
        original_height, original_width = height, width
        aspect_ratio = width / height
        width = round((max_area * aspect_ratio) ** 0.5)
        height = round((max_area / aspect_ratio) ** 0.5)

        multiple_of = self.vae_scale_factor * 2
        width = width // multiple_of * multiple_of
        height = height // multiple_of * multiple_of

        if height != original_height or width != original_width:
            logger.warning(
                f"Generation `height` and `width` have been adjusted to {height} and {width} to fit the model requirements."
            )

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        ip_inputs = (ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image)
        if any(value is not None for value in (*ip_inputs, negative_ip_adapter_image_embeds)):
            raise ValueError(
                "FluxKontextRLGPipeline does not support IP-Adapter inputs; use FluxKontextPipeline for them."
            )
        self.check_rlg_inputs(rlg_scale, rlg_start, rlg_stop, prompt_embeds)

        self._guidance_scale = guidance_scale
        self._true_cfg_scale = true_cfg_scale
        self._joint_attention_kwargs = joint_attention_kwargs if joint_attention_kwargs is not None else {}
        self._current_timestep = None
        self._interrupt = False
        is_constant = _is_number(rlg_scale)
        self._rlg_schedule = None if is_constant else rlg_scale
        self._rlg_scale = float(rlg_scale) if is_constant else None
        self._rlg_in_window = True
        rlg_models = self._prepare_rlg_models(rlg_scale)
        lora_layers = _lora_layers(self.transformer)
        self._rlg_active_adapters = list(lora_layers[0].active_adapters) if lora_layers else []

        # 2. Define call parameters
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]

        device = self._execution_device

        lora_scale = self.joint_attention_kwargs.get("scale", None)
        has_neg_prompt = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None
        )
        do_true_cfg = true_cfg_scale > 1 and has_neg_prompt
        self._do_true_cfg = do_true_cfg
        if do_true_cfg and prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    "`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly, but"
                    f" got: `prompt_embeds` {prompt_embeds.shape} != `negative_prompt_embeds`"
                    f" {negative_prompt_embeds.shape}."
                )

        # 3. Encode input prompt. A LoRA adapter may also change the text encoders: each LoRA variant of
        # `transformer` then gets the prompt encoded with the same adapter (or none, for the base model), when a step
        # first needs it. `encoded` is keyed by the text encoders' adapter; `None` runs them as configured, as
        # diffusers does (the aligned model's prompt).
        text_encoder_has_lora = (
            prompt_embeds is None
            and self.aligned_transformer is None
            and any(_lora_layers(getattr(self, name, None)) for name in self._rlg_text_encoders)
        )
        given_embeds = (prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds)

        def encode(adapter):
            with _lora_adapter_rows(self.text_encoder, adapter), _lora_adapter_rows(self.text_encoder_2, adapter):
                embeds, pooled, text_ids = self.encode_prompt(
                    prompt=prompt,
                    prompt_2=prompt_2,
                    prompt_embeds=given_embeds[0],
                    pooled_prompt_embeds=given_embeds[1],
                    device=device,
                    num_images_per_prompt=num_images_per_prompt,
                    max_sequence_length=max_sequence_length,
                    lora_scale=lora_scale,
                )
                negative_embeds = negative_pooled = None
                if do_true_cfg:
                    negative_embeds, negative_pooled, _ = self.encode_prompt(
                        prompt=negative_prompt,
                        prompt_2=negative_prompt_2,
                        prompt_embeds=given_embeds[2],
                        pooled_prompt_embeds=given_embeds[3],
                        device=device,
                        num_images_per_prompt=num_images_per_prompt,
                        max_sequence_length=max_sequence_length,
                        lora_scale=lora_scale,
                    )
                    if negative_embeds.shape != embeds.shape:
                        raise ValueError(
                            "The negative prompt must encode to the shape of the prompt (true CFG runs both in one"
                            f" batch), but got {tuple(negative_embeds.shape)} and {tuple(embeds.shape)}."
                        )
            return embeds, pooled, negative_embeds, negative_pooled, text_ids

        def text_encoder_adapter(model):
            return self._rlg_text_encoder_adapter(model) if text_encoder_has_lora else None

        # with true CFG, each model's negative and positive rows form a single batch
        def model_conditioning(embeds):
            prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds = embeds[:4]
            if do_true_cfg:
                prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
                pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds], dim=0)
            return prompt_embeds, pooled_prompt_embeds

        encoded = {None: encode(None)}
        prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds, text_ids = encoded[
            None
        ]

        # 4. Preprocess the condition image, as FluxKontextPipeline (resized to a preferred Kontext resolution unless
        # `_auto_resize=False`)
        if image is not None and not (isinstance(image, torch.Tensor) and image.size(1) == self.latent_channels):
            img = image[0] if isinstance(image, list) else image
            image_height, image_width = self.image_processor.get_default_height_width(img)
            aspect_ratio = image_width / image_height
            if _auto_resize:
                # Kontext is trained on specific resolutions, using one of them is recommended
                _, image_width, image_height = min(
                    (abs(aspect_ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS
                )
            image_width = image_width // multiple_of * multiple_of
            image_height = image_height // multiple_of * multiple_of
            image = self.image_processor.resize(image, image_height, image_width)
            image = self.image_processor.preprocess(image, image_height, image_width)

        # 5. Prepare latent variables: the noisy latents, and the condition image's packed latents with their
        # position ids (first axis 1) after the latents' (the same for every model)
        num_channels_latents = self.transformer.config.in_channels // 4
        latents, image_latents, latent_image_ids, image_ids = self.prepare_latents(
            image,
            batch_size * num_images_per_prompt,
            num_channels_latents,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )

        if image_ids is not None:
            latent_image_ids = torch.cat([latent_image_ids, image_ids], dim=0)  # dim 0 is the sequence dimension

        # 6. Prepare timesteps (as FluxKontextPipeline: FLUX's sigmas and the dynamic shift of the image sequence length)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        image_seq_len = latents.shape[1]
        mu = calculate_shift(
            image_seq_len,
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler,
            num_inference_steps,
            device,
            sigmas=sigmas,
            mu=mu,
        )
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        self._num_timesteps = len(timesteps)
        self._check_rlg_schedule_length(rlg_scale, len(timesteps))

        # handle guidance: the embedded guidance, one value per row (true CFG rows included)
        rows = latents.shape[0] * (2 if do_true_cfg else 1)
        guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(rows)

        # 6.1 Conditioning of each model, computed when a step first needs the model, and the RLG window in steps
        conditioning = {}
        callback_conditioning = None  # set by `callback_on_step_end`, shared by every model

        def conditioning_of(model):
            if model.name not in conditioning:
                if callback_conditioning is not None:
                    conditioning[model.name] = callback_conditioning
                else:
                    adapter = text_encoder_adapter(model)
                    if adapter not in encoded:
                        encoded[adapter] = encode(adapter)
                    conditioning[model.name] = model_conditioning(encoded[adapter])
            return conditioning[model.name]

        rlg_start_step, rlg_stop_step = int(rlg_start * len(timesteps)), int(rlg_stop * len(timesteps))

        # 7. Denoising loop
        self.scheduler.set_begin_index(0)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue

                self._current_timestep = t

                # 7.1 RLG scale of this step, and the models it needs: the base model, plus each model with w != 0;
                # the aligned model alone when RLG is off (outside the window, or w == 1)
                self._rlg_in_window = rlg_start_step <= i < rlg_stop_step
                if self._rlg_schedule is not None:
                    if isinstance(self._rlg_schedule, dict):
                        self._rlg_scale = {k: self._rlg_scale_at(v, i) for k, v in self._rlg_schedule.items()}
                    else:
                        self._rlg_scale = self._rlg_scale_at(self._rlg_schedule, i)
                rlg_terms = self._rlg_terms() if self.do_rlg else {"aligned": 1.0}
                if self.do_rlg:
                    step_models = [rlg_models["base"]] + [rlg_models[name] for name in rlg_terms]
                else:
                    step_models = [rlg_models["aligned"]]
                step_conditioning = {model.name: conditioning_of(model) for model in step_models}

                latent_model_input = latents
                if image_latents is not None:
                    latent_model_input = torch.cat([latents, image_latents], dim=1)
                latent_model_input = torch.cat([latent_model_input] * 2) if do_true_cfg else latent_model_input
                # broadcast to batch dimension in a way that's compatible with ONNX/Core ML
                timestep = t.expand(latent_model_input.shape[0]).to(latents.dtype)

                # predict the velocity of every model, in one batched forward where possible
                noise_preds = self._rlg_forward(
                    step_models,
                    latent_model_input,
                    timestep / 1000,
                    guidance,
                    step_conditioning,
                    text_ids,
                    latent_image_ids,
                    rlg_single_pass,
                )
                # the velocities of the noisy latents' tokens (the condition tokens come after them)
                noise_preds = {name: noise_pred[:, : latents.size(1)] for name, noise_pred in noise_preds.items()}

                # perform true classifier-free guidance inside each model
                if do_true_cfg:
                    for name, noise_pred in noise_preds.items():
                        neg_noise_pred, noise_pred = noise_pred.chunk(2)
                        noise_preds[name] = neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)

                # perform reinforcement learning guidance: v_base + sum_i w_i (v_i - v_base)
                if self.do_rlg:
                    terms = [(noise_preds[name], w) for name, w in rlg_terms.items()]
                    noise_pred = rlg_mix(noise_preds["base"], terms)
                else:
                    noise_pred = noise_preds["aligned"]

                # compute the previous noisy sample x_t -> x_t-1
                latents_dtype = latents.dtype
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if latents.dtype != latents_dtype:
                    if torch.backends.mps.is_available():
                        # some platforms (eg. apple mps) misbehave due to a pytorch bug: https://github.com/pytorch/pytorch/pull/99272
                        latents = latents.to(latents_dtype)

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)

                    latents = callback_outputs.pop("latents", latents)
                    new_prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    if new_prompt_embeds is not prompt_embeds:
                        # conditioning set by the callback applies to every model from the next step on
                        prompt_embeds = new_prompt_embeds
                        negative = (negative_prompt_embeds, negative_pooled_prompt_embeds)
                        callback_conditioning = model_conditioning((prompt_embeds, pooled_prompt_embeds, *negative))
                        conditioning = {}

                # call the callback, if provided
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

                if XLA_AVAILABLE:
                    xm.mark_step()

        self._current_timestep = None

        if output_type == "latent":
            image = latents
        else:
            latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            latents = latents.to(get_module_execution_device(self.vae))
            image = self.vae.decode(latents, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)

        return FluxPipelineOutput(images=image)
