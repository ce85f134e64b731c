# Reinforcement Learning Guidance (RLG) for SANA (a linear-attention flow DiT sampled with DPM-Solver on flow sigmas):
# the alignment strength of a reward-fine-tuned model becomes a dial at inference. Jin et al., "Inference-time
# Alignment Control for Diffusion Models with Reinforcement Learning Guidance"
# (https://huggingface.co/papers/2508.21016).
#
# Self-contained diffusers pipeline (imports only torch, diffusers, transformers; peft lazily, for LoRA). It can be
# imported as `diffalign.pipelines.SanaRLGPipeline` or loaded as a community pipeline:
# `DiffusionPipeline.from_pretrained(repo, custom_pipeline="pipeline_sana_rlg.py", trust_remote_code=True)`. It
# subclasses diffusers' `SanaPipeline` (prompt encoding with the complex human instruction, resolution binning, checks
# and LoRA loading are SanaPipeline's own) and replaces `__call__`. diffusers has no modular SANA pipeline, so the RLG
# guider has no blocks to plug into: this classic pipeline is SANA's RLG route. The RLG machinery is the same as in
# `pipeline_stable_diffusion_rlg.py` (copied, so that each file stands alone): CFG inside each model, then `v = v_base
# + w (v_aligned - v_base)`, and the mixed velocity goes to SANA's own scheduler (DPM-Solver++ with flow sigmas and
# `flow_shift`, multistep: its history holds the mixed velocities, as it would hold a single model's).
#
# Licensed under the Apache License, Version 2.0. `__call__` is diffusers' `SanaPipeline.__call__` (diffusers 0.42.1;
# Copyright 2025 PixArt-Sigma Authors and The HuggingFace Team, Apache-2.0) with the RLG steps added; code marked
# "Copied from diffalign" is checked against its source by tests/test_copies.py.
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models import AutoencoderDC, SanaTransformer2DModel
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
from diffusers.pipelines.sana.pipeline_output import SanaPipelineOutput
from diffusers.pipelines.sana.pipeline_sana import ASPECT_RATIO_4096_BIN, SanaPipeline, retrieve_timesteps
from diffusers.schedulers import DPMSolverMultistepScheduler
from diffusers.utils import is_peft_available, is_torch_xla_available, logging, replace_example_docstring
from transformers import Gemma2PreTrainedModel, GemmaTokenizer, GemmaTokenizerFast

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
        >>> from diffalign.pipelines import SanaRLGPipeline

        >>> pipe = SanaRLGPipeline.from_pretrained(
        ...     "Efficient-Large-Model/Sana_1600M_1024px_diffusers", torch_dtype=torch.bfloat16
        ... ).to("cuda")
        >>> pipe.load_lora_weights("path/to/grpo_lora")  # e.g. a LoRA trained with `diffalign train ddpo`

        >>> prompt = "a photo of an astronaut riding a horse on mars"
        >>> # 0: base model, 1: aligned model, >1: stronger alignment than training gave
        >>> image = pipe(prompt, guidance_scale=4.5, num_inference_steps=20, rlg_scale=1.5).images[0]
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



class SanaRLGPipeline(SanaPipeline):
    r"""
    Pipeline for text-to-image generation using [Sana](https://huggingface.co/papers/2410.10629) with Reinforcement
    Learning Guidance (RLG).

    At every denoising step, classifier-free guidance is applied inside the base and the aligned (reward fine-tuned)
    model, then the two guided velocities are mixed: `v = v_base + rlg_scale * (v_aligned - v_base)`. `rlg_scale=0`
    samples the base model (exactly `SanaPipeline`), `1` the aligned model, values in between interpolate and values
    above 1 extrapolate. The mixed velocity is stepped with the pipeline's scheduler, as SanaPipeline does (SANA's
    DPM-Solver++ with flow sigmas and `flow_shift`, or a flow-matching Euler scheduler).

    The aligned model is either a LoRA adapter on `transformer` (load it with
    [`~loaders.SanaLoraLoaderMixin.load_lora_weights`]; the base is `transformer` with adapters off, and both
    predictions come from one batched forward pass of the same weights) or a fully fine-tuned `aligned_transformer`.

    Args:
        tokenizer, text_encoder, vae, transformer, scheduler: as in [`SanaPipeline`]. With a LoRA adapter loaded and
            no `aligned_transformer`, the adapter makes `transformer` the aligned model.
        aligned_transformer ([`SanaTransformer2DModel`], *optional*):
            A fully fine-tuned copy of `transformer` (same config). When given, `transformer` and
            `aligned_transformer` are used as they are (LoRA adapters on either stay as configured).
    """

    model_cpu_offload_seq = "text_encoder->transformer->aligned_transformer->vae"
    _optional_components = ["aligned_transformer"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    # text encoders a LoRA adapter may also change: the base model's prompt is encoded with the adapters off
    _rlg_text_encoders = ["text_encoder"]

    def __init__(
        self,
        tokenizer: Union[GemmaTokenizer, GemmaTokenizerFast],
        text_encoder: Gemma2PreTrainedModel,
        vae: AutoencoderDC,
        transformer: SanaTransformer2DModel,
        scheduler: DPMSolverMultistepScheduler,
        aligned_transformer: Optional[SanaTransformer2DModel] = None,
    ):
        super().__init__(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
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
        conditioning: Dict[str, tuple],
        single_pass: bool,
    ) -> Dict[str, torch.Tensor]:
        r"""
        Runs the transformers `models` on `hidden_states` and returns each one's raw float32 velocity (CFG rows
        included, learned-sigma channels kept), as SanaPipeline calls its transformer.

        With `single_pass`, all the LoRA variants of `transformer` (base rows with `"__base__"`, aligned rows with
        their adapter) go through one batched forward; otherwise each model gets its own forward pass.
        `conditioning[name]` is `(encoder_hidden_states, encoder_attention_mask)`; `timestep` is already multiplied by
        the transformer's `timestep_scale`.
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
            transformer_dtype = transformer.dtype
            with _lora_adapter_rows(transformer, adapter_rows):
                velocity = transformer(
                    torch.cat([hidden_states] * len(group)).to(dtype=transformer_dtype),
                    encoder_hidden_states=torch.cat([conditioning[model.name][0] for model in group]).to(
                        dtype=transformer_dtype
                    ),
                    encoder_attention_mask=torch.cat([conditioning[model.name][1] for model in group]),
                    timestep=torch.cat([timestep] * len(group)),
                    return_dict=False,
                    attention_kwargs=self.attention_kwargs,
                )[0]
            velocity = velocity.float()
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
        negative_prompt: str = "",
        num_inference_steps: int = 20,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        guidance_scale: float = 4.5,
        num_images_per_prompt: int | None = 1,
        height: int = 1024,
        width: int = 1024,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        clean_caption: bool = False,
        use_resolution_binning: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 300,
        complex_human_instruction: list[str] = [
            "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",
            "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",
            "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
            "Here are examples of how to transform or refine prompts:",
            "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
            "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",
            "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",
            "User Prompt: ",
        ],
        rlg_scale: Union[RLGScale, Dict[str, RLGScale]] = 1.0,
        rlg_start: float = 0.0,
        rlg_stop: float = 1.0,
        rlg_single_pass: bool = True,
    ) -> SanaPipelineOutput | tuple:
        r"""
        Function invoked when calling the pipeline for generation. The arguments shared with [`SanaPipeline`] mean the
        same.

        Args:
            prompt, negative_prompt, num_inference_steps, timesteps, sigmas, num_images_per_prompt, height, width, eta,
            generator, latents, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
            negative_prompt_attention_mask, output_type, return_dict, clean_caption, use_resolution_binning,
            attention_kwargs, max_sequence_length, complex_human_instruction:
                As in [`SanaPipeline.__call__`].
            guidance_scale (`float`, *optional*, defaults to 4.5):
                Classifier-free guidance scale, applied inside the base and the aligned model before RLG mixes them
                (CFG is off for `guidance_scale <= 1`).
            callback_on_step_end (`Callable`, *optional*):
                Called at the end of each step as `callback_on_step_end(self, step, timestep, callback_kwargs)`; it may
                replace `latents`, and `prompt_embeds` (the aligned model's, CFG rows included as in SanaPipeline; from
                the next step on every model then uses the returned embeddings). It may also set `pipe._rlg_scale` for
                the following steps.
            callback_on_step_end_tensor_inputs (`list`, *optional*):
                Tensors passed in `callback_kwargs`: any of `._callback_tensor_inputs`.
            rlg_scale (`float`, `List[float]`, `Callable[[int], float]` or `Dict[str, ...]`, *optional*, defaults to 1.0):
                Reinforcement Learning Guidance scale `w` in `v = v_base + w * (v_aligned - v_base)`: `0` is the base
                model, `1` the aligned model, `0 < w < 1` interpolates, `w > 1` extrapolates (the RLG authors
                recommend 1 to 3). A list (one value per denoising step) or a callable of the step index gives a
                per-step schedule. A dict `{adapter_name: w_i}` mixes several LoRA adapters of `transformer`,
                `v_base + sum_i w_i (v_i - v_base)`, each `w_i` again a float or a schedule. CFG is applied inside each
                model first.
            rlg_start (`float`, *optional*, defaults to 0.0):
                Fraction of the denoising steps after which RLG starts. Outside [`rlg_start`, `rlg_stop`) the aligned
                model runs alone, at the cost of plain sampling.
            rlg_stop (`float`, *optional*, defaults to 1.0):
                Fraction of the denoising steps at which RLG stops.
            rlg_single_pass (`bool`, *optional*, defaults to `True`):
                With a LoRA aligned model, compute the base and aligned velocities (CFG rows included) in one batched
                transformer forward (per-row adapter selection). `False` runs one forward per model; the results are
                the same up to float rounding.

        Examples:

        Returns:
            [`~pipelines.sana.pipeline_output.SanaPipelineOutput`] or `tuple`:
                If `return_dict` is `True`, [`~pipelines.sana.pipeline_output.SanaPipelineOutput`] is returned,
                otherwise a `tuple` is returned where the first element is a list with the generated images
        """

        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs. Raise error if not correct
        if use_resolution_binning:
            if self.transformer.config.sample_size == 128:
                aspect_ratio_bin = ASPECT_RATIO_4096_BIN
            elif self.transformer.config.sample_size == 64:
                aspect_ratio_bin = ASPECT_RATIO_2048_BIN
            elif self.transformer.config.sample_size == 32:
                aspect_ratio_bin = ASPECT_RATIO_1024_BIN
            elif self.transformer.config.sample_size == 16:
                aspect_ratio_bin = ASPECT_RATIO_512_BIN
            else:
                raise ValueError("Invalid sample size")
            orig_height, orig_width = height, width
            height, width = self.image_processor.classify_height_width_bin(height, width, ratios=aspect_ratio_bin)

        self.check_inputs(
            prompt,
            height,
            width,
            callback_on_step_end_tensor_inputs,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            prompt_attention_mask,
            negative_prompt_attention_mask,
        )
        self.check_rlg_inputs(rlg_scale, rlg_start, rlg_stop, prompt_embeds)

        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        is_constant = _is_number(rlg_scale)
        self._rlg_schedule = None if is_constant else rlg_scale
        self._rlg_scale = float(rlg_scale) if is_constant else None
        self._rlg_in_window = True
        rlg_models = self._prepare_rlg_models(rlg_scale)
        lora_layers = _lora_layers(self.transformer)
        self._rlg_active_adapters = list(lora_layers[0].active_adapters) if lora_layers else []

        # 2. Default height and width to transformer
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]

        device = self._execution_device
        lora_scale = self.attention_kwargs.get("scale", None) if self.attention_kwargs is not None else None

        # 3. Encode input prompt. A LoRA adapter may also change the text encoder: each LoRA variant of `transformer`
        # then gets the prompt encoded with the same adapter (or none, for the base model), when a step first needs
        # it. `encoded` is keyed by the text encoder's adapter; `None` runs it as configured, as diffusers does (the
        # aligned model's prompt).
        text_encoder_has_lora = (
            prompt_embeds is None
            and self.aligned_transformer is None
            and any(_lora_layers(getattr(self, name, None)) for name in self._rlg_text_encoders)
        )
        given_embeds = (prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask)

        def encode(adapter):
            with _lora_adapter_rows(self.text_encoder, adapter):
                return self.encode_prompt(
                    prompt,
                    self.do_classifier_free_guidance,
                    negative_prompt=negative_prompt,
                    num_images_per_prompt=num_images_per_prompt,
                    device=device,
                    prompt_embeds=given_embeds[0],
                    negative_prompt_embeds=given_embeds[2],
                    prompt_attention_mask=given_embeds[1],
                    negative_prompt_attention_mask=given_embeds[3],
                    clean_caption=clean_caption,
                    max_sequence_length=max_sequence_length,
                    complex_human_instruction=complex_human_instruction,
                    lora_scale=lora_scale,
                )

        def text_encoder_adapter(model):
            return self._rlg_text_encoder_adapter(model) if text_encoder_has_lora else None

        # with CFG, each model's negative and positive rows form a single batch
        def model_conditioning(embeds):
            prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = embeds
            if self.do_classifier_free_guidance:
                prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
                prompt_attention_mask = torch.cat([negative_prompt_attention_mask, prompt_attention_mask], dim=0)
            return prompt_embeds, prompt_attention_mask

        encoded = {None: encode(None)}
        negative_prompt_embeds = encoded[None][2]
        prompt_embeds, prompt_attention_mask = model_conditioning(encoded[None])

        # 4. Prepare timesteps
        if XLA_AVAILABLE:
            timestep_device = "cpu"
        else:
            timestep_device = device
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, timestep_device, timesteps, sigmas
        )
        self._check_rlg_schedule_length(rlg_scale, len(timesteps))

        # 5. Prepare latents.
        latent_channels = self.transformer.config.in_channels
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            latent_channels,
            height,
            width,
            torch.float32,
            device,
            generator,
            latents,
        )

        # 6. Prepare extra step kwargs. TODO: Logic should ideally just be moved out of the pipeline
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

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
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        self._num_timesteps = len(timesteps)

        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue

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

                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents

                # broadcast to batch dimension in a way that's compatible with ONNX/Core ML
                timestep = t.expand(latent_model_input.shape[0])
                timestep = timestep * self.transformer.config.timestep_scale

                # predict the velocity of every model, in one batched forward where possible
                noise_preds = self._rlg_forward(
                    step_models, latent_model_input, timestep, step_conditioning, rlg_single_pass
                )

                # perform guidance inside each model
                if self.do_classifier_free_guidance:
                    for name, noise_pred in noise_preds.items():
                        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                        noise_preds[name] = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)

                # perform reinforcement learning guidance: v_base + sum_i w_i (v_i - v_base)
                if self.do_rlg:
                    terms = [(noise_preds[name], w) for name, w in rlg_terms.items()]
                    noise_pred = rlg_mix(noise_preds["base"], terms)
                else:
                    noise_pred = noise_preds["aligned"]

                # learned sigma
                if self.transformer.config.out_channels // 2 == latent_channels:
                    noise_pred = noise_pred.chunk(2, dim=1)[0]

                # compute previous image: x_t -> x_t-1
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)

                    latents = callback_outputs.pop("latents", latents)
                    new_prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                    if new_prompt_embeds is not prompt_embeds:
                        # conditioning set by the callback applies to every model from the next step on
                        prompt_embeds = new_prompt_embeds
                        callback_conditioning = (prompt_embeds, prompt_attention_mask)
                        conditioning = {}

                # call the callback, if provided
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

                if XLA_AVAILABLE:
                    xm.mark_step()

        if output_type == "latent":
            image = latents
        else:
            latents = latents.to(self.vae.dtype)
            try:
                image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            except torch.OutOfMemoryError as e:
                warnings.warn(
                    f"{e}. \n"
                    f"Try to use VAE tiling for large images. For example: \n"
                    f"pipe.vae.enable_tiling(tile_sample_min_width=512, tile_sample_min_height=512)"
                )
            if use_resolution_binning:
                image = self.image_processor.resize_and_crop_tensor(image, orig_width, orig_height)

        if not output_type == "latent":
            image = self.image_processor.postprocess(image, output_type=output_type)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)

        return SanaPipelineOutput(images=image)
