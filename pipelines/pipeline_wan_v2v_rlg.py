# Reinforcement Learning Guidance (RLG) for Wan video-to-video (Wan 2.1 text-to-video models started from a noised
# input video, SDEdit): the alignment strength of a reward-fine-tuned video model becomes a dial at inference. Jin et
# al., "Inference-time Alignment Control for Diffusion Models with Reinforcement Learning Guidance"
# (https://huggingface.co/papers/2508.21016).
#
# Self-contained diffusers pipeline (imports only torch, diffusers, transformers, PIL; peft lazily, for LoRA). It can
# be imported as `diffalign.pipelines.WanVideoToVideoRLGPipeline` or loaded as a community pipeline:
# `DiffusionPipeline.from_pretrained(repo, custom_pipeline="pipeline_wan_v2v_rlg.py", trust_remote_code=True)`.
# It subclasses diffusers' `WanVideoToVideoPipeline` (prompt encoding, the input video's latents noised to the first
# kept timestep, `get_timesteps`, checks and LoRA loading are WanVideoToVideoPipeline's own) and replaces `__call__`.
# diffusers' modular Wan pipeline has no video-to-video blocks, so RLG runs in this pipeline. The RLG machinery is
# `pipeline_wan_rlg.py`'s (copied, so that each file stands alone). The input video only sets where sampling starts;
# both models denoise the same latents. Each model has classifier-free guidance inside (`guidance_scale`); then
# `v = v_base + w (v_aligned - v_base)`.
#
# Licensed under the Apache License, Version 2.0. The parts of `__call__` that are WanVideoToVideoPipeline's (checks,
# timesteps and `strength`, the input video's latents, decoding) are the HuggingFace Team's (Copyright 2025 The Wan
# Team and The HuggingFace Team, Apache-2.0), copied from diffusers 0.42.1.
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models import AutoencoderKLWan, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.pipelines.wan.pipeline_wan_video2video import WanVideoToVideoPipeline, retrieve_timesteps
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import is_peft_available, is_torch_xla_available, logging, replace_example_docstring
from PIL import Image
from transformers import AutoTokenizer, UMT5EncoderModel

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
        >>> from diffusers.utils import export_to_video, load_video
        >>> from diffalign.pipelines import WanVideoToVideoRLGPipeline

        >>> pipe = WanVideoToVideoRLGPipeline.from_pretrained(
        ...     "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16
        ... )
        >>> pipe = pipe.to("cuda")
        >>> pipe.load_lora_weights("path/to/grpo_lora")  # e.g. a LoRA trained with `diffalign train ddpo`

        >>> video = load_video("input.mp4")[:81]
        >>> # 0: base model, 1: aligned model, >1: stronger alignment than training gave
        >>> frames = pipe(
        ...     video=video, prompt="a cat surfing a wave", strength=0.7, num_inference_steps=50, rlg_scale=1.5
        ... ).frames[0]
        >>> export_to_video(frames, "rlg.mp4", fps=16)
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


class WanVideoToVideoRLGPipeline(WanVideoToVideoPipeline):
    r"""
    Pipeline for video-to-video generation using Wan 2.1 with Reinforcement Learning Guidance (RLG).

    Sampling starts, as `WanVideoToVideoPipeline`'s, from the input video's latents noised to the first timestep that
    `strength` keeps. At every denoising step the base and the aligned (reward fine-tuned) model each predict a
    velocity with classifier-free guidance inside (`guidance_scale`); the two velocities are then mixed:
    `v = v_base + rlg_scale * (v_aligned - v_base)`. `rlg_scale=0` samples the base model (`WanVideoToVideoPipeline`),
    `1` the aligned model, values in between interpolate and values above 1 extrapolate.

    The aligned model is either a LoRA adapter on `transformer` (load it with
    [`~loaders.WanLoraLoaderMixin.load_lora_weights`]; the base is `transformer` with adapters off) or a fully
    fine-tuned `aligned_transformer`.

    Args:
        tokenizer, text_encoder, transformer, vae, scheduler: as in [`WanVideoToVideoPipeline`].
        aligned_transformer ([`WanTransformer3DModel`], *optional*):
            A fully fine-tuned copy of `transformer` (same config). When given, `transformer` and
            `aligned_transformer` are used as they are (LoRA adapters on either stay as configured).
    """

    model_cpu_offload_seq = "text_encoder->transformer->aligned_transformer->vae"
    _optional_components = ["aligned_transformer"]
    # the expert RLG guides, with its fully fine-tuned counterpart's attribute (Wan video-to-video has one expert)
    _rlg_experts = {"transformer": "aligned_transformer"}
    # Wan's LoRA loader adapts the transformer only: the prompt is encoded once, for every model
    _rlg_text_encoders = []

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        transformer: WanTransformer3DModel,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchEulerDiscreteScheduler,
        aligned_transformer: Optional[WanTransformer3DModel] = None,
    ):
        super().__init__(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
        )
        self.register_modules(aligned_transformer=aligned_transformer)

    def _rlg_expert_names(self) -> List[str]:
        r"""The experts that denoise: `transformer` (Wan's video-to-video pipeline has one expert)."""
        return ["transformer"] if self.transformer is not None else []

    # Copied from diffalign.pipelines.pipeline_wan_rlg.WanRLGPipeline._aligned_model_of
    def _aligned_model_of(self, expert: str) -> Optional[str]:
        r"""How `expert` holds an aligned model: `"full"` (its fully fine-tuned counterpart, `aligned_transformer` or
        `aligned_transformer_2`), `"lora"` (LoRA layers on it) or `None` (it samples as configured at every scale)."""
        if getattr(self, self._rlg_experts[expert], None) is not None:
            return "full"
        return "lora" if _lora_layers(getattr(self, expert, None)) else None

    # Copied from diffalign.pipelines.pipeline_wan_rlg.WanRLGPipeline.check_rlg_inputs
    def check_rlg_inputs(self, rlg_scale, rlg_start: float, rlg_stop: float, prompt_embeds=None):
        r"""
        Validates the RLG arguments of `__call__` against the pipeline's models (see `__call__` for their meaning).
        Raises a `ValueError` rather than silently sampling the base model when no expert has an aligned model. Each
        expert with LoRA layers (`transformer`, and a two-expert model's `transformer_2`) is checked alike; an expert
        without an aligned model samples as configured. `prompt_embeds` is `__call__`'s (Wan's text encoder has no
        LoRA, so it is not checked).
        """
        is_schedule = isinstance(rlg_scale, (list, tuple)) or callable(rlg_scale)
        if not (_is_number(rlg_scale) or is_schedule or isinstance(rlg_scale, dict)):
            raise ValueError(
                f"`rlg_scale` must be a float, a list or callable schedule, or a dict of adapter names, but is {type(rlg_scale)}."
            )
        if not (0.0 <= rlg_start <= rlg_stop <= 1.0):
            raise ValueError(f"Need 0 <= `rlg_start` <= `rlg_stop` <= 1, but got {rlg_start} and {rlg_stop}.")
        if _is_number(rlg_scale) and rlg_scale == 1:
            return  # every expert's aligned model (or the expert itself) as configured: plain sampling

        experts = self._rlg_expert_names()
        aligned = {expert: self._aligned_model_of(expert) for expert in experts}
        if not any(aligned.values()):
            where = " or ".join(f"`{expert}`" for expert in experts)
            full = " or ".join(f"`{self._rlg_experts[expert]}`" for expert in experts)
            raise ValueError(
                f"`rlg_scale={rlg_scale}` needs an aligned model, but the pipeline has no {full} and no LoRA adapter"
                f" on {where}. Load one with `pipe.load_lora_weights(...)` or pass {full}."
            )
        lora_experts = [expert for expert, kind in aligned.items() if kind == "lora"]
        if isinstance(rlg_scale, dict):
            full = [self._rlg_experts[expert] for expert, kind in aligned.items() if kind == "full"]
            if full:
                raise ValueError(
                    f"A dict `rlg_scale` mixes LoRA adapters; it cannot be used with `{full[0]}`."
                )
            if len(rlg_scale) == 0:
                raise ValueError("`rlg_scale` is an empty dict; give at least one `{adapter_name: scale}`.")
            if (rlg_start, rlg_stop) != (0.0, 1.0):
                raise ValueError(
                    "`rlg_start`/`rlg_stop` need a single aligned model; with a dict `rlg_scale` use per-adapter schedules."
                )
            for name, scale in rlg_scale.items():
                if not (_is_number(scale) or isinstance(scale, (list, tuple)) or callable(scale)):
                    raise ValueError(f"`rlg_scale['{name}']` must be a float or a schedule, but is {type(scale)}.")
        for expert in lora_experts:
            lora_layers = _lora_layers(getattr(self, expert))
            if isinstance(rlg_scale, dict):
                loaded = _loaded_adapters(getattr(self, expert))
                unknown = [name for name in rlg_scale if name not in loaded]
                if unknown:
                    raise ValueError(
                        f"Unknown LoRA adapter(s) {unknown} of `{expert}` in `rlg_scale`; loaded adapters: {loaded}."
                    )
            if all(layer.disable_adapters for layer in lora_layers):
                # peft runs disabled adapters as the base model, whatever adapter a row selects
                raise ValueError(
                    f"The LoRA adapters of `{expert}` are disabled, so there is no aligned model; call"
                    " `pipe.enable_lora()`."
                )
            if not isinstance(rlg_scale, dict) and not lora_layers[0].active_adapters:
                raise ValueError(
                    f"No LoRA adapter of `{expert}` is active; activate one with `pipe.set_adapters(...)`."
                )
            # the base model comes from per-sample adapter selection (peft's mixed batch): unfused adapters only
            if any(layer.merged for layer in lora_layers):
                raise ValueError(
                    f"The LoRA adapters are fused into `{expert}`, so the base weights are gone and"
                    f" `rlg_scale={rlg_scale}` cannot run the base model; call `pipe.unfuse_lora()`."
                )
            if isinstance(rlg_scale, dict):
                dora = sorted(name for name in rlg_scale if _uses_dora(lora_layers, name))
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

    # Copied from diffalign.pipelines.pipeline_wan_rlg.WanRLGPipeline._prepare_rlg_models
    def _prepare_rlg_models(self, rlg_scale) -> Dict[str, Dict[str, _RLGModel]]:
        r"""The denoisers RLG combines this call, per expert (`transformer`, `transformer_2`) and by name: `"base"`
        and `"aligned"`, or `"base"` and one per adapter; `"aligned"` alone (the expert as configured) for an expert
        without an aligned model."""
        models = {}
        for expert, aligned_name in self._rlg_experts.items():
            kind = self._aligned_model_of(expert)
            if kind == "full":
                models[expert] = {
                    "base": _RLGModel("base", expert, None),
                    "aligned": _RLGModel("aligned", aligned_name, None),
                }
                continue
            if kind is None:
                # a constant `rlg_scale == 1`, or an expert that the aligned model leaves as it is
                models[expert] = {"aligned": _RLGModel("aligned", expert, None)}
                continue
            lora_layers = _lora_layers(getattr(self, expert))
            base = _RLGModel("base", expert, BASE_ADAPTER_NAME)
            if isinstance(rlg_scale, dict):
                models[expert] = {"base": base, **{name: _RLGModel(name, expert, name) for name in rlg_scale}}
                continue
            active = list(lora_layers[0].active_adapters)
            # several adapters active at once form one aligned model that a per-row adapter cannot express, nor can
            # a DoRA adapter be selected per row: the aligned model then runs in its own forward pass, as configured
            per_row = len(active) == 1 and not _uses_dora(lora_layers, active[0])
            models[expert] = {"base": base, "aligned": _RLGModel("aligned", expert, active[0] if per_row else None)}
        return models

    # Copied from diffalign.pipelines.pipeline_flux_rlg.FluxRLGPipeline._rlg_terms
    def _rlg_terms(self) -> Dict[str, float]:
        r"""`{model: w}` for this step's combination `pred_base + sum_i w_i (pred_i - pred_base)`; `{}` is the base alone."""
        scales = self.rlg_scale if isinstance(self.rlg_scale, dict) else {"aligned": self.rlg_scale}
        return {name: w for name, w in scales.items() if w != 0}

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


    # Copied from diffalign.pipelines.pipeline_wan_rlg.WanRLGPipeline._rlg_forward
    def _rlg_forward(
        self,
        models: List[_RLGModel],
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: Optional[torch.Tensor],
        image_embeds: Optional[torch.Tensor],
        single_pass: bool,
    ) -> Dict[str, tuple]:
        r"""
        Runs the transformers `models` on `hidden_states` and returns each one's `(conditional, unconditional)`
        velocity (`unconditional` is `None` without `negative_prompt_embeds`, i.e. without CFG).

        A model alone in its forward pass runs the conditional and the unconditional rows in two passes, as
        WanPipeline does (so `rlg_scale` 0 and 1 give WanPipeline's numbers). With `single_pass`, all the LoRA
        variants of `transformer` (base rows with `"__base__"`, aligned rows with their adapter) and both CFG halves
        go through one batched forward pass; otherwise each model gets its own. `timestep` is per row (`(B,)`) or
        per row and token (`(B, tokens)`, Wan 2.2 TI2V-5B); `image_embeds` (Wan 2.1 image-to-video's CLIP image
        embedding) is given to every row.
        """
        conditions = [prompt_embeds] + ([negative_prompt_embeds] if negative_prompt_embeds is not None else [])
        if single_pass:
            batched = [model for model in models if model.adapter is not None]
            groups = ([batched] if batched else []) + [[model] for model in models if model.adapter is None]
        else:
            groups = [[model] for model in models]

        num_rows = hidden_states.shape[0]
        predictions = {}
        for group in groups:
            transformer = getattr(self, group[0].transformer_name)
            active = self._rlg_active_adapters.get(group[0].transformer_name)
            if len(group) == 1 and (group[0].adapter is None or [group[0].adapter] == active):
                adapter_rows = None  # the model exactly as configured
            elif len(group) == 1:
                adapter_rows = group[0].adapter
            else:
                adapter_rows = [model.adapter for model in group for _ in conditions for _ in range(num_rows)]
            passes = [conditions] if len(group) > 1 else [[condition] for condition in conditions]
            outputs = []
            with _lora_adapter_rows(transformer, adapter_rows):
                for embeds in passes:
                    copies = len(group) * len(embeds)
                    image_rows = None if image_embeds is None else torch.cat([image_embeds] * copies)
                    velocity = transformer(
                        hidden_states=torch.cat([hidden_states] * copies),
                        timestep=torch.cat([timestep] * copies),
                        encoder_hidden_states=torch.cat([embed for _ in group for embed in embeds]),
                        encoder_hidden_states_image=image_rows,
                        attention_kwargs=self.attention_kwargs,
                        return_dict=False,
                    )[0]
                    outputs += list(velocity.chunk(copies))
            for k, model in enumerate(group):  # model-major, condition-minor
                velocities = outputs[k * len(conditions) : (k + 1) * len(conditions)]
                predictions[model.name] = (velocities[0], velocities[1] if len(velocities) > 1 else None)
        return predictions

    # Copied from diffalign.pipelines.pipeline_wan_rlg.WanRLGPipeline._cfg
    @staticmethod
    def _cfg(velocities: tuple, guidance_scale: float) -> torch.Tensor:
        r"""Classifier-free guidance inside one model, with WanPipeline's operations: `u + g (c - u)`, or `c` alone."""
        noise_pred, noise_uncond = velocities
        if noise_uncond is None:
            return noise_pred
        return noise_uncond + guidance_scale * (noise_pred - noise_uncond)

    # Copied from diffalign.pipelines.pipeline_wan_rlg.WanRLGPipeline._rlg_prediction
    def _rlg_prediction(
        self,
        step: int,
        t: torch.Tensor,
        latent_model_input: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: Optional[torch.Tensor],
        image_embeds: Optional[torch.Tensor],
        rlg_models: Dict[str, Dict[str, _RLGModel]],
        rlg_steps: tuple,
        boundary_timestep: Optional[float],
        single_pass: bool,
    ) -> torch.Tensor:
        r"""
        The velocity of step `step` at timestep `t`: `v_base + sum_i w_i (v_i - v_base)` of the CFG-guided models of
        the step's expert (`transformer`, or a two-expert model's `transformer_2` below `boundary_timestep`, with
        `guidance_scale_2`), the aligned model alone outside the RLG steps `[rlg_steps[0], rlg_steps[1])` or where
        `w == 1`, and the expert as configured where it has no aligned model.
        """
        negative = negative_prompt_embeds if self.do_classifier_free_guidance else None
        expert, guidance_scale = "transformer", self.guidance_scale
        if boundary_timestep is not None and t < boundary_timestep:
            # low-noise stage in wan2.2: the second expert, with its own CFG scale
            expert, guidance_scale = "transformer_2", self._guidance_scale_2
        models = rlg_models[expert]

        # RLG scale of this step, and the models it needs: the base model, plus each model with w != 0; the aligned
        # model alone when RLG is off (outside the window, or w == 1) or the expert alone when it has no aligned model
        self._rlg_in_window = rlg_steps[0] <= step < rlg_steps[1]
        if self._rlg_schedule is not None:
            if isinstance(self._rlg_schedule, dict):
                self._rlg_scale = {k: self._rlg_scale_at(v, step) for k, v in self._rlg_schedule.items()}
            else:
                self._rlg_scale = self._rlg_scale_at(self._rlg_schedule, step)
        mix = self.do_rlg and "base" in models
        rlg_terms = self._rlg_terms() if mix else {"aligned": 1.0}
        if mix:
            step_models = [models["base"]] + [models[name] for name in rlg_terms]
        else:
            step_models = [models["aligned"]]
        velocities = self._rlg_forward(
            step_models, latent_model_input, timestep, prompt_embeds, negative, image_embeds, single_pass
        )
        # classifier-free guidance inside each model, then reinforcement learning guidance
        guided = {name: self._cfg(pair, guidance_scale) for name, pair in velocities.items()}
        if not mix:
            return guided["aligned"]
        return rlg_mix(guided["base"], [(guided[name], w) for name, w in rlg_terms.items()])

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        video: list[Image.Image] = None,
        prompt: str | list[str] = None,
        negative_prompt: str | list[str] = None,
        height: int = 480,
        width: int = 832,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        guidance_scale: float = 5.0,
        strength: float = 0.8,
        num_videos_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str | None = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        rlg_scale: Union[RLGScale, Dict[str, RLGScale]] = 1.0,
        rlg_start: float = 0.0,
        rlg_stop: float = 1.0,
        rlg_single_pass: bool = True,
    ) -> WanPipelineOutput | tuple:
        r"""
        Function invoked when calling the pipeline for generation. The arguments shared with
        [`WanVideoToVideoPipeline`] mean the same.

        Args:
            video, prompt, negative_prompt, height, width, num_inference_steps, timesteps, strength, generator,
            latents, prompt_embeds, negative_prompt_embeds, output_type, return_dict, attention_kwargs,
            max_sequence_length:
                As in [`WanVideoToVideoPipeline.__call__`]: the video (its frames, resized to `height` x `width`) is
                encoded once and noised to the first of the `int(num_inference_steps * strength)` last timesteps of
                the schedule, which are the steps sampled; the prompt is encoded once, for the base and the aligned
                model.
            num_videos_per_prompt (`int`, *optional*, defaults to 1):
                Videos per prompt, each from its own noise (a list of generators: one per video).
                WanVideoToVideoPipeline samples one whatever this is.
            guidance_scale (`float`, *optional*, defaults to 5.0):
                Classifier-free guidance scale (enabled above 1), applied inside the base and the aligned model before
                RLG mixes them.
            callback_on_step_end (`Callable`, *optional*):
                Called at the end of each step as `callback_on_step_end(self, step, timestep, callback_kwargs)`; it may
                replace `latents`, `prompt_embeds` and `negative_prompt_embeds` (used by every model from the next
                step on). It may also set `pipe._rlg_scale` for the following steps.
            callback_on_step_end_tensor_inputs (`list`, *optional*):
                Tensors passed in `callback_kwargs`: any of `._callback_tensor_inputs`.
            rlg_scale (`float`, `List[float]`, `Callable[[int], float]` or `Dict[str, ...]`, *optional*, defaults to 1.0):
                Reinforcement Learning Guidance scale `w` in `v = v_base + w * (v_aligned - v_base)`: `0` is the base
                model, `1` the aligned model, `0 < w < 1` interpolates, `w > 1` extrapolates (the RLG authors
                recommend 1 to 3). A list (one value per sampled step: the steps `strength` keeps) or a callable of
                the step index gives a per-step schedule. A dict `{adapter_name: w_i}` mixes several LoRA adapters of
                `transformer`, `v_base + sum_i w_i (v_i - v_base)`, each `w_i` again a float or a schedule. CFG is
                applied inside each model first.
            rlg_start (`float`, *optional*, defaults to 0.0):
                Fraction of the sampled steps after which RLG starts. Outside [`rlg_start`, `rlg_stop`) the aligned
                model runs alone, at the cost of plain sampling.
            rlg_stop (`float`, *optional*, defaults to 1.0):
                Fraction of the sampled steps at which RLG stops.
            rlg_single_pass (`bool`, *optional*, defaults to `True`):
                With a LoRA aligned model, compute the base and aligned velocities (both CFG halves) in one batched
                transformer forward (per-row adapter selection). `False` runs one forward per model and condition;
                the results are the same up to float rounding.

        Examples:

        Returns:
            [`~WanPipelineOutput`] or `tuple`: [`WanPipelineOutput`] if `return_dict` is True, otherwise a `tuple`
            whose first element is the generated video.
        """

        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        height = height or self.transformer.config.sample_height * self.vae_scale_factor_spatial
        width = width or self.transformer.config.sample_width * self.vae_scale_factor_spatial
        num_videos_per_prompt = num_videos_per_prompt or 1

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            negative_prompt,
            height,
            width,
            video,
            latents,
            prompt_embeds,
            negative_prompt_embeds,
            callback_on_step_end_tensor_inputs,
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
        self._rlg_active_adapters = {
            expert: list(layers[0].active_adapters)
            for expert in self._rlg_experts
            if (layers := _lora_layers(getattr(self, expert, None)))
        }

        device = self._execution_device

        # 2. Define call parameters
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]

        # 3. Encode input prompt
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            num_videos_per_prompt=num_videos_per_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
            device=device,
        )

        transformer_dtype = self.transformer.dtype
        prompt_embeds = prompt_embeds.to(transformer_dtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(transformer_dtype)

        # 4. Prepare timesteps: the last `int(num_inference_steps * strength)` of the schedule
        if XLA_AVAILABLE:
            timestep_device = "cpu"
        else:
            timestep_device = device
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, timestep_device, timesteps
        )
        timesteps, num_inference_steps = self.get_timesteps(num_inference_steps, timesteps, strength, device)
        latent_timestep = timesteps[:1].repeat(batch_size * num_videos_per_prompt)
        self._num_timesteps = len(timesteps)
        self._check_rlg_schedule_length(rlg_scale, len(timesteps))

        if latents is None:
            video = self.video_processor.preprocess_video(video, height=height, width=width).to(
                device, dtype=torch.float32
            )

        # 5. Prepare latent variables: the video's latents (one, for every video) noised to `latent_timestep`
        num_channels_latents = self.transformer.config.in_channels
        latents = self.prepare_latents(
            video,
            batch_size * num_videos_per_prompt,
            num_channels_latents,
            height,
            width,
            torch.float32,
            device,
            generator,
            latents,
            latent_timestep,
        )

        # 6. Denoising loop
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        rlg_steps = (int(rlg_start * len(timesteps)), int(rlg_stop * len(timesteps)))

        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue

                self._current_timestep = t
                latent_model_input = latents.to(transformer_dtype)
                timestep = t.expand(latents.shape[0])

                # the velocity of every model (CFG inside each), mixed by RLG
                noise_pred = self._rlg_prediction(
                    i,
                    t,
                    latent_model_input,
                    timestep,
                    prompt_embeds,
                    negative_prompt_embeds,
                    None,
                    rlg_models,
                    rlg_steps,
                    None,
                    rlg_single_pass,
                )

                # compute the previous noisy sample x_t -> x_t-1
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)

                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                # call the callback, if provided
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

                if XLA_AVAILABLE:
                    xm.mark_step()

        self._current_timestep = None

        if not output_type == "latent":
            latents = latents.to(self.vae.dtype)
            latents_mean = (
                torch.tensor(self.vae.config.latents_mean)
                .view(1, self.vae.config.z_dim, 1, 1, 1)
                .to(latents.device, latents.dtype)
            )
            latents_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, self.vae.config.z_dim, 1, 1, 1).to(
                latents.device, latents.dtype
            )
            latents = latents / latents_std + latents_mean
            video = self.vae.decode(latents, return_dict=False)[0]
            video = self.video_processor.postprocess_video(video, output_type=output_type)
        else:
            video = latents

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (video,)

        return WanPipelineOutput(frames=video)
