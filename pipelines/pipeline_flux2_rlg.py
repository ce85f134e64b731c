# Reinforcement Learning Guidance (RLG) for FLUX.2 [dev] (guidance-distilled flow matching on a Mistral Small 3 text
# encoder): the alignment strength of a reward-fine-tuned model becomes a dial at inference. Jin et al., "Inference-time
# Alignment Control for Diffusion Models with Reinforcement Learning Guidance"
# (https://huggingface.co/papers/2508.21016).
#
# Self-contained diffusers pipeline (imports only torch, numpy, diffusers, transformers; peft lazily, for LoRA). It can
# be imported as `diffalign.pipelines.Flux2RLGPipeline` or loaded as a community pipeline:
# `DiffusionPipeline.from_pretrained(repo, custom_pipeline="pipeline_flux2_rlg.py", trust_remote_code=True)`.
# It subclasses diffusers' `Flux2Pipeline` (prompt encoding with the system message, caption upsampling, patchified
# latents and their position ids, reference images, checks and LoRA loading are Flux2Pipeline's own) and replaces
# `__call__`. diffusers' modular FLUX.2 [dev] blocks (`Flux2AutoBlocks`) take no guider, so the RLG guider has no place
# to plug into: this classic pipeline is FLUX.2 [dev]'s RLG route. The RLG machinery is the same as in
# `pipeline_stable_diffusion_rlg.py` (copied, so that each file stands alone). FLUX.2 [dev] has no CFG: its guidance
# scale is an input of the transformer (`guidance`), given to the base and the aligned model alike inside each branch;
# then `v = v_base + w (v_aligned - v_base)`.
#
# Licensed under the Apache License, Version 2.0. `__call__` is diffusers' `Flux2Pipeline.__call__` (diffusers 0.42.1;
# Copyright 2025 Black Forest Labs and The HuggingFace Team, Apache-2.0) with the RLG steps added; code marked
# "Copied from diffalign" is checked against its source by tests/test_copies.py.
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import PIL
import torch
from diffusers.models import AutoencoderKLFlux2, Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline, compute_empirical_mu, retrieve_timesteps
from diffusers.pipelines.flux2.pipeline_output import Flux2PipelineOutput
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import is_peft_available, is_torch_xla_available, logging, replace_example_docstring
from diffusers.utils.torch_utils import get_module_execution_device
from transformers import AutoProcessor, Mistral3ForConditionalGeneration

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
        >>> from diffalign.pipelines import Flux2RLGPipeline

        >>> pipe = Flux2RLGPipeline.from_pretrained("black-forest-labs/FLUX.2-dev", torch_dtype=torch.bfloat16)
        >>> pipe = pipe.to("cuda")
        >>> pipe.load_lora_weights("path/to/grpo_lora")  # e.g. a LoRA trained with `diffalign train ddpo`

        >>> prompt = "a photo of an astronaut riding a horse on mars"
        >>> # 0: base model, 1: aligned model, >1: stronger alignment than training gave
        >>> image = pipe(prompt, guidance_scale=4.0, num_inference_steps=50, rlg_scale=1.5).images[0]
        ```
"""

# Name peft uses for "no adapter" rows in a mixed-adapter batch (`adapter_names=[...]`).
BASE_ADAPTER_NAME = "__base__"

RLGScale = Union[float, Sequence[float], Callable[[int], float]]


# Copied from diffalign.pipelines.pipeline_stable_diffusion_rlg._RLGModel with unet->transformer
class _RLGModel(NamedTuple):
    """One denoiser combined by RLG: `transformer_name` is the pipeline attribute, `adapter` the LoRA adapter it runs with
    (`"__base__"` for none, `None` to run the model exactly as it is configured)."""

    name: str
    transformer_name: str
    adapter: Optional[str]


# Copied from diffalign.guiders.rlg_mix
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


# Copied from diffalign.pipelines.pipeline_stable_diffusion_rlg._lora_layers
def _lora_layers(model) -> list:
    if model is None or not is_peft_available():
        return []
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


# Copied from diffalign.pipelines.pipeline_stable_diffusion_rlg._loaded_adapters
def _loaded_adapters(model) -> List[str]:
    names = set()
    for layer in _lora_layers(model):
        names |= set(layer.lora_A.keys()) | set(layer.lora_embedding_A.keys())
    return sorted(names)


# Copied from diffalign.pipelines.pipeline_stable_diffusion_rlg._uses_dora
def _uses_dora(lora_layers: list, adapter: str) -> bool:
    return any(layer.use_dora.get(adapter, False) for layer in lora_layers)


@contextmanager
# Copied from diffalign.pipelines.pipeline_stable_diffusion_rlg._lora_adapter_rows
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


# Copied from diffalign.pipelines.pipeline_stable_diffusion_rlg._is_number
def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Flux2RLGPipeline(Flux2Pipeline):
    r"""
    Pipeline for text-to-image generation using FLUX.2 [dev] with Reinforcement Learning Guidance (RLG).

    At every denoising step the base and the aligned (reward fine-tuned) model each predict a velocity, with FLUX.2
    [dev]'s embedded guidance (`guidance_scale`, a transformer input: the model is guidance distilled and samples
    without CFG); the two velocities are then mixed: `v = v_base + rlg_scale * (v_aligned - v_base)`. `rlg_scale=0`
    samples the base model (exactly `Flux2Pipeline`), `1` the aligned model, values in between interpolate and values
    above 1 extrapolate. Sampling is Flux2Pipeline's deterministic flow-matching ODE (Euler); reference images
    (`image`) condition every model, as in Flux2Pipeline.

    The aligned model is either a LoRA adapter on `transformer` (load it with
    [`~loaders.Flux2LoraLoaderMixin.load_lora_weights`]; the base is `transformer` with adapters off, and both
    predictions come from one batched forward pass of the same weights) or a fully fine-tuned `aligned_transformer`.

    Args:
        scheduler, vae, text_encoder, tokenizer, transformer: as in [`Flux2Pipeline`]. With a LoRA adapter loaded and
            no `aligned_transformer`, the adapter makes `transformer` the aligned model.
        aligned_transformer ([`Flux2Transformer2DModel`], *optional*):
            A fully fine-tuned copy of `transformer` (same config). When given, `transformer` and
            `aligned_transformer` are used as they are (LoRA adapters on either stay as configured).
    """

    model_cpu_offload_seq = "text_encoder->transformer->aligned_transformer->vae"
    _optional_components = ["aligned_transformer"]
    _callback_tensor_inputs = ["latents", "prompt_embeds"]
    # text encoders a LoRA adapter may also change (Flux2LoraLoaderMixin loads none, a peft adapter may): the base
    # model's prompt is then encoded with the adapters off
    _rlg_text_encoders = ["text_encoder"]

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKLFlux2,
        text_encoder: Mistral3ForConditionalGeneration,
        tokenizer: AutoProcessor,
        transformer: Flux2Transformer2DModel,
        aligned_transformer: Optional[Flux2Transformer2DModel] = None,
    ):
        super().__init__(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )
        self.register_modules(aligned_transformer=aligned_transformer)

    # Copied from diffalign.pipelines.pipeline_stable_diffusion_rlg.StableDiffusionRLGPipeline.check_rlg_inputs with unet->transformer
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

    # Copied from diffalign.pipelines.pipeline_stable_diffusion_rlg.StableDiffusionRLGPipeline._rlg_scale_at
    @staticmethod
    def _rlg_scale_at(scale, step: int) -> float:
        if callable(scale):
            return float(scale(step))
        if isinstance(scale, (list, tuple)):
            return float(scale[step])
        return float(scale)

    # Copied from diffalign.pipelines.pipeline_stable_diffusion_rlg.StableDiffusionRLGPipeline._check_rlg_schedule_length
    def _check_rlg_schedule_length(self, rlg_scale, num_steps: int):
        schedules = rlg_scale.items() if isinstance(rlg_scale, dict) else [(None, rlg_scale)]
        for name, scale in schedules:
            if isinstance(scale, (list, tuple)) and len(scale) != num_steps:
                where = "`rlg_scale`" if name is None else f"`rlg_scale['{name}']`"
                raise ValueError(f"{where} has {len(scale)} values, but the sampler runs {num_steps} steps.")

    # Copied from diffalign.pipelines.pipeline_stable_diffusion_rlg.StableDiffusionRLGPipeline._prepare_rlg_models with unet->transformer
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

    # Copied from diffalign.pipelines.pipeline_stable_diffusion_rlg.StableDiffusionRLGPipeline._rlg_text_encoder_adapter
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

    # Copied from diffalign.pipelines.pipeline_stable_diffusion_rlg.StableDiffusionRLGPipeline._rlg_terms
    def _rlg_terms(self) -> Dict[str, float]:
        r"""`{model: w}` for this step's combination `pred_base + sum_i w_i (pred_i - pred_base)`; `{}` is the base alone."""
        scales = self.rlg_scale if isinstance(self.rlg_scale, dict) else {"aligned": self.rlg_scale}
        return {name: w for name, w in scales.items() if w != 0}


    def _rlg_forward(
        self,
        models: List[_RLGModel],
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        guidance: torch.Tensor,
        conditioning: Dict[str, torch.Tensor],
        txt_ids: torch.Tensor,
        img_ids: torch.Tensor,
        single_pass: bool,
    ) -> Dict[str, torch.Tensor]:
        r"""
        Runs the transformers `models` on `hidden_states` (packed latents, reference image tokens appended) and returns
        each one's raw velocity over all its tokens.

        With `single_pass`, all the LoRA variants of `transformer` (base rows with `"__base__"`, aligned rows with their
        adapter) go through one batched forward; otherwise each model gets its own forward pass.
        `conditioning[name]` is the model's `encoder_hidden_states`; `timestep` is already divided by 1000 and
        `guidance` is the embedded guidance per row (ignored by transformers without `guidance_embeds`, as in
        Flux2Pipeline). The position ids `txt_ids`/`img_ids` are the same for every row.
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
            with _lora_adapter_rows(transformer, adapter_rows):
                velocity = transformer(
                    hidden_states=torch.cat([hidden_states] * len(group)).to(transformer.dtype),
                    timestep=torch.cat([timestep] * len(group)),
                    guidance=torch.cat([guidance] * len(group)),
                    encoder_hidden_states=torch.cat([conditioning[model.name] for model in group]),
                    txt_ids=txt_ids,
                    img_ids=img_ids,
                    joint_attention_kwargs=self.attention_kwargs,
                    return_dict=False,
                )[0]
            predictions.update(zip([model.name for model in group], velocity.chunk(len(group))))
        return predictions

    # Copied from diffalign.pipelines.pipeline_stable_diffusion_rlg.StableDiffusionRLGPipeline.rlg_scale
    @property
    def rlg_scale(self):
        r"""The RLG scale of the current step: a float, or `{adapter_name: float}` when mixing adapters."""
        return self._rlg_scale

    # Copied from diffalign.pipelines.pipeline_stable_diffusion_rlg.StableDiffusionRLGPipeline.do_rlg
    @property
    def do_rlg(self):
        r"""Whether the current step mixes the base model in (inside the `rlg_start`/`rlg_stop` window and
        `rlg_scale != 1`); otherwise the aligned model runs alone, with the cost of plain CFG."""
        return self._rlg_in_window and (isinstance(self._rlg_scale, dict) or self._rlg_scale != 1)


    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] = None,
        image: PIL.Image.Image | list[PIL.Image.Image] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = 4.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        text_encoder_out_layers: tuple[int] = (10, 20, 30),
        caption_upsample_temperature: float = None,
        rlg_scale: Union[RLGScale, Dict[str, RLGScale]] = 1.0,
        rlg_start: float = 0.0,
        rlg_stop: float = 1.0,
        rlg_single_pass: bool = True,
    ) -> Flux2PipelineOutput | tuple:
        r"""
        Function invoked when calling the pipeline for generation. The arguments shared with [`Flux2Pipeline`] mean
        the same; `prompt` comes first (Flux2Pipeline's first argument is `image`: pass it by name).

        Args:
            prompt, image, height, width, num_inference_steps, sigmas, num_images_per_prompt, generator, latents,
            prompt_embeds, output_type, return_dict, attention_kwargs, max_sequence_length, text_encoder_out_layers:
                As in [`Flux2Pipeline.__call__`]. The reference images `image` condition every model.
            guidance_scale (`float`, *optional*, defaults to 4.0):
                The embedded guidance of the guidance-distilled FLUX.2 [dev] (a transformer input), the same for the
                base and the aligned model. Ignored by transformers without `guidance_embeds`.
            caption_upsample_temperature (`float`, *optional*):
                As in [`Flux2Pipeline.__call__`]: the prompt is upsampled once, by the text encoder as configured, and
                every model is conditioned on the result.
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
                `v_base + sum_i w_i (v_i - v_base)`, each `w_i` again a float or a schedule.
            rlg_start (`float`, *optional*, defaults to 0.0):
                Fraction of the denoising steps after which RLG starts. Outside [`rlg_start`, `rlg_stop`) the aligned
                model runs alone, at the cost of plain sampling.
            rlg_stop (`float`, *optional*, defaults to 1.0):
                Fraction of the denoising steps at which RLG stops.
            rlg_single_pass (`bool`, *optional*, defaults to `True`):
                With a LoRA aligned model, compute the base and aligned velocities in one batched transformer forward
                (per-row adapter selection). `False` runs one forward per model; the results are the same up to float
                rounding.

        Examples:

        Returns:
            [`~pipelines.flux2.Flux2PipelineOutput`] or `tuple`: [`~pipelines.flux2.Flux2PipelineOutput`] if
            `return_dict` is True, otherwise a `tuple` whose first element is the generated images.
        """

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt=prompt,
            height=height,
            width=width,
            prompt_embeds=prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        self.check_rlg_inputs(rlg_scale, rlg_start, rlg_stop, prompt_embeds)

        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
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

        # 3. prepare text embeddings. A LoRA adapter may also change the text encoder: each LoRA variant of
        # `transformer` then gets the prompt encoded with the same adapter (or none, for the base model), when a step
        # first needs it. `encoded` is keyed by the text encoder's adapter; `None` runs it as configured, as
        # diffusers does (the aligned model's prompt).
        if caption_upsample_temperature:
            prompt = self.upsample_prompt(
                prompt, images=image, temperature=caption_upsample_temperature, device=device
            )
        text_encoder_has_lora = (
            prompt_embeds is None
            and self.aligned_transformer is None
            and any(_lora_layers(getattr(self, name, None)) for name in self._rlg_text_encoders)
        )
        given_embeds = prompt_embeds

        def encode(adapter):
            with _lora_adapter_rows(self.text_encoder, adapter):
                return self.encode_prompt(
                    prompt=prompt,
                    prompt_embeds=given_embeds,
                    device=device,
                    num_images_per_prompt=num_images_per_prompt,
                    max_sequence_length=max_sequence_length,
                    text_encoder_out_layers=text_encoder_out_layers,
                )

        def text_encoder_adapter(model):
            return self._rlg_text_encoder_adapter(model) if text_encoder_has_lora else None

        encoded = {None: encode(None)}
        prompt_embeds, text_ids = encoded[None]

        # 4. process images
        if image is not None and not isinstance(image, list):
            image = [image]

        condition_images = None
        if image is not None:
            for img in image:
                self.image_processor.check_image_input(img)

            condition_images = []
            for img in image:
                image_width, image_height = img.size
                if image_width * image_height > 1024 * 1024:
                    img = self.image_processor._resize_to_target_area(img, 1024 * 1024)
                    image_width, image_height = img.size

                multiple_of = self.vae_scale_factor * 2
                image_width = (image_width // multiple_of) * multiple_of
                image_height = (image_height // multiple_of) * multiple_of
                img = self.image_processor.preprocess(img, height=image_height, width=image_width, resize_mode="crop")
                condition_images.append(img)
                height = height or image_height
                width = width or image_width

        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor

        # 5. prepare latent variables
        num_channels_latents = self.transformer.config.in_channels // 4
        latents, latent_ids = self.prepare_latents(
            batch_size=batch_size * num_images_per_prompt,
            num_latents_channels=num_channels_latents,
            height=height,
            width=width,
            dtype=prompt_embeds.dtype,
            device=device,
            generator=generator,
            latents=latents,
        )

        image_latents = None
        image_latent_ids = None
        if condition_images is not None:
            image_latents, image_latent_ids = self.prepare_image_latents(
                images=condition_images,
                batch_size=batch_size * num_images_per_prompt,
                generator=generator,
                device=device,
                dtype=self.vae.dtype,
            )

        # 6. Prepare timesteps
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        if hasattr(self.scheduler.config, "use_flow_sigmas") and self.scheduler.config.use_flow_sigmas:
            sigmas = None
        image_seq_len = latents.shape[1]
        mu = compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_inference_steps)
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

        # handle guidance: the embedded guidance, one value per row, the same for every model
        guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32)
        guidance = guidance.expand(latents.shape[0])

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
                    conditioning[model.name] = encoded[adapter][0]
            return conditioning[model.name]

        rlg_start_step, rlg_stop_step = int(rlg_start * len(timesteps)), int(rlg_stop * len(timesteps))

        # 7. Denoising loop
        # We set the index here to remove DtoH sync, helpful especially during compilation.
        # Check out more details here: https://github.com/huggingface/diffusers/pull/11696
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

                # broadcast to batch dimension in a way that's compatible with ONNX/Core ML
                timestep = t.expand(latents.shape[0]).to(latents.dtype)

                latent_model_input = latents.to(self.transformer.dtype)
                latent_image_ids = latent_ids

                if image_latents is not None:
                    latent_model_input = torch.cat([latents, image_latents], dim=1).to(self.transformer.dtype)
                    latent_image_ids = torch.cat([latent_ids, image_latent_ids], dim=1)

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
                # the image tokens only (reference image tokens dropped)
                noise_preds = {name: pred[:, : latents.size(1) :] for name, pred in noise_preds.items()}

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
                        prompt_embeds = callback_conditioning = new_prompt_embeds
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
            latents = self._unpack_latents_with_ids(latents, latent_ids)

            latents_bn_mean = self.vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents_bn_std = torch.sqrt(self.vae.bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(
                latents.device, latents.dtype
            )
            latents = latents * latents_bn_std + latents_bn_mean
            latents = self._unpatchify_latents(latents)
            latents = latents.to(get_module_execution_device(self.vae))

            image = self.vae.decode(latents, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)

        return Flux2PipelineOutput(images=image)
