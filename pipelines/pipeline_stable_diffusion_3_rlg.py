# Reinforcement Learning Guidance (RLG) for Stable Diffusion 3 (flow matching): the alignment strength of a
# reward-fine-tuned model becomes a dial at inference. Jin et al., "Inference-time Alignment Control for Diffusion
# Models with Reinforcement Learning Guidance" (https://huggingface.co/papers/2508.21016).
#
# Self-contained diffusers pipeline (imports only torch, diffusers, transformers; peft lazily, for LoRA). It can be
# imported as `diffalign.pipelines.StableDiffusion3RLGPipeline` or loaded as a community pipeline:
# `DiffusionPipeline.from_pretrained(repo, custom_pipeline="pipeline_stable_diffusion_3_rlg.py", trust_remote_code=True)`.
# The RLG machinery is the same as in `pipeline_stable_diffusion_rlg.py` (copied, so that each file stands alone), with
# the velocity of a flow-matching transformer in place of the UNet's noise prediction: CFG inside each model, then
# `v = v_base + w (v_aligned - v_base)`, as in the authors' SD3 pipeline (jinluo12345/Reinforcement-learning-guidance,
# `rlg/diffusers_patch/sd3_pipeline_with_rlg.py`, `determistic=True`), which this reproduces.
#
# Licensed under the Apache License, Version 2.0. Methods marked "Copied from diffusers" are the HuggingFace Team's
# (Copyright 2025 Stability AI, The HuggingFace Team and The InstantX Team, Apache-2.0), copied from diffusers 0.42.1
# without changes.
import inspect
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.loaders import FromSingleFileMixin, SD3IPAdapterMixin, SD3LoraLoaderMixin
from diffusers.models.autoencoders import AutoencoderKL
from diffusers.models.transformers import SD3Transformer2DModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import (
    USE_PEFT_BACKEND,
    is_peft_available,
    is_torch_xla_available,
    logging,
    replace_example_docstring,
    scale_lora_layers,
    unscale_lora_layers,
)
from diffusers.utils.torch_utils import randn_tensor
from transformers import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    SiglipImageProcessor,
    SiglipVisionModel,
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
        >>> from diffalign.pipelines import StableDiffusion3RLGPipeline

        >>> pipe = StableDiffusion3RLGPipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-3.5-medium", torch_dtype=torch.bfloat16
        ... ).to("cuda")
        >>> pipe.load_lora_weights("path/to/flow_grpo_lora")  # e.g. a Flow-GRPO LoRA

        >>> prompt = "a photo of an astronaut riding a horse on mars"
        >>> # 0: base model, 1: aligned model, >1: stronger alignment than training gave
        >>> image = pipe(prompt, guidance_scale=4.5, num_inference_steps=20, rlg_scale=1.6).images[0]
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


# Copied from diffusers.pipelines.flux.pipeline_flux.calculate_shift
def calculate_shift(
    image_seq_len,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
):
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    mu = image_seq_len * m + b
    return mu


# Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.retrieve_timesteps
def retrieve_timesteps(
    scheduler,
    num_inference_steps: int | None = None,
    device: str | torch.device | None = None,
    timesteps: list[int] | None = None,
    sigmas: list[float] | None = None,
    **kwargs,
):
    r"""
    Calls the scheduler's `set_timesteps` method and retrieves timesteps from the scheduler after the call. Handles
    custom timesteps. Any kwargs will be supplied to `scheduler.set_timesteps`.

    Args:
        scheduler (`SchedulerMixin`):
            The scheduler to get timesteps from.
        num_inference_steps (`int`):
            The number of diffusion steps used when generating samples with a pre-trained model. If used, `timesteps`
            must be `None`.
        device (`str` or `torch.device`, *optional*):
            The device to which the timesteps should be moved to. If `None`, the timesteps are not moved.
        timesteps (`list[int]`, *optional*):
            Custom timesteps used to override the timestep spacing strategy of the scheduler. If `timesteps` is passed,
            `num_inference_steps` and `sigmas` must be `None`.
        sigmas (`list[float]`, *optional*):
            Custom sigmas used to override the timestep spacing strategy of the scheduler. If `sigmas` is passed,
            `num_inference_steps` and `timesteps` must be `None`.

    Returns:
        `tuple[torch.Tensor, int]`: A tuple where the first element is the timestep schedule from the scheduler and the
        second element is the number of inference steps.
    """
    if timesteps is not None and sigmas is not None:
        raise ValueError("Only one of `timesteps` or `sigmas` can be passed. Please choose one to set custom values")
    if timesteps is not None:
        accepts_timesteps = "timesteps" in set(inspect.signature(scheduler.set_timesteps).parameters.keys())
        if not accepts_timesteps:
            raise ValueError(
                f"The current scheduler class {scheduler.__class__}'s `set_timesteps` does not support custom"
                f" timestep schedules. Please check whether you are using the correct scheduler."
            )
        scheduler.set_timesteps(timesteps=timesteps, device=device, **kwargs)
        timesteps = scheduler.timesteps
        num_inference_steps = len(timesteps)
    elif sigmas is not None:
        accept_sigmas = "sigmas" in set(inspect.signature(scheduler.set_timesteps).parameters.keys())
        if not accept_sigmas:
            raise ValueError(
                f"The current scheduler class {scheduler.__class__}'s `set_timesteps` does not support custom"
                f" sigmas schedules. Please check whether you are using the correct scheduler."
            )
        scheduler.set_timesteps(sigmas=sigmas, device=device, **kwargs)
        timesteps = scheduler.timesteps
        num_inference_steps = len(timesteps)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
        timesteps = scheduler.timesteps
    return timesteps, num_inference_steps


class StableDiffusion3RLGPipeline(DiffusionPipeline, SD3LoraLoaderMixin, FromSingleFileMixin, SD3IPAdapterMixin):
    r"""
    Pipeline for text-to-image generation using Stable Diffusion 3 with Reinforcement Learning Guidance (RLG).

    At every denoising step, classifier-free guidance (and skip-layer guidance, if used) is applied inside the base and
    the aligned (reward fine-tuned) model, then the two guided velocities are mixed:
    `v = v_base + rlg_scale * (v_aligned - v_base)`. `rlg_scale=0` samples the base model, `1` the aligned model,
    values in between interpolate and values above 1 extrapolate. Sampling is the deterministic flow-matching ODE
    (Euler) of `FlowMatchEulerDiscreteScheduler`, as the RLG authors evaluate.

    The aligned model is either a LoRA adapter on `transformer` (load it with
    [`~loaders.SD3LoraLoaderMixin.load_lora_weights`], e.g. a Flow-GRPO LoRA; the base is `transformer` with adapters
    off, and both predictions come from one batched forward pass of the same weights) or a fully fine-tuned
    `aligned_transformer`.

    Args:
        transformer ([`SD3Transformer2DModel`]):
            The base Conditional Transformer (MMDiT). With a LoRA adapter loaded and no `aligned_transformer`, the
            adapter makes it the aligned model.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]):
            A scheduler to be used in combination with `transformer` to denoise the encoded image latents.
        vae ([`AutoencoderKL`]):
            Variational Auto-Encoder (VAE) Model to encode and decode images to and from latent representations.
        text_encoder ([`CLIPTextModelWithProjection`]):
            [CLIP](https://huggingface.co/docs/transformers/model_doc/clip#transformers.CLIPTextModelWithProjection),
            specifically the [clip-vit-large-patch14](https://huggingface.co/openai/clip-vit-large-patch14) variant,
            with an additional added projection layer that is initialized with a diagonal matrix with the `hidden_size`
            as its dimension.
        text_encoder_2 ([`CLIPTextModelWithProjection`]):
            [CLIP](https://huggingface.co/docs/transformers/model_doc/clip#transformers.CLIPTextModelWithProjection),
            specifically the
            [laion/CLIP-ViT-bigG-14-laion2B-39B-b160k](https://huggingface.co/laion/CLIP-ViT-bigG-14-laion2B-39B-b160k)
            variant.
        text_encoder_3 ([`T5EncoderModel`]):
            Frozen text-encoder. Stable Diffusion 3 uses
            [T5](https://huggingface.co/docs/transformers/model_doc/t5#transformers.T5EncoderModel), specifically the
            [t5-v1_1-xxl](https://huggingface.co/google/t5-v1_1-xxl) variant.
        tokenizer (`CLIPTokenizer`):
            Tokenizer of class
            [CLIPTokenizer](https://huggingface.co/docs/transformers/v4.21.0/en/model_doc/clip#transformers.CLIPTokenizer).
        tokenizer_2 (`CLIPTokenizer`):
            Second Tokenizer of class
            [CLIPTokenizer](https://huggingface.co/docs/transformers/v4.21.0/en/model_doc/clip#transformers.CLIPTokenizer).
        tokenizer_3 (`T5TokenizerFast`):
            Tokenizer of class
            [T5Tokenizer](https://huggingface.co/docs/transformers/model_doc/t5#transformers.T5Tokenizer).
        image_encoder (`SiglipVisionModel`, *optional*):
            Pre-trained Vision Model for IP Adapter.
        feature_extractor (`SiglipImageProcessor`, *optional*):
            Image processor for IP Adapter.
        aligned_transformer ([`SD3Transformer2DModel`], *optional*):
            A fully fine-tuned copy of `transformer` (same config). When given, `transformer` and
            `aligned_transformer` are used as they are (LoRA adapters on either stay as configured).
    """

    model_cpu_offload_seq = (
        "text_encoder->text_encoder_2->text_encoder_3->image_encoder->transformer->aligned_transformer->vae"
    )
    _optional_components = ["image_encoder", "feature_extractor", "aligned_transformer"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "pooled_prompt_embeds"]
    # text encoders a LoRA adapter may also change: the base model's prompt is encoded with the adapters off
    _rlg_text_encoders = ["text_encoder", "text_encoder_2", "text_encoder_3"]

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel,
        tokenizer_3: T5TokenizerFast,
        image_encoder: SiglipVisionModel = None,
        feature_extractor: SiglipImageProcessor = None,
        aligned_transformer: Optional[SD3Transformer2DModel] = None,
    ):
        super().__init__()

        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            text_encoder_3=text_encoder_3,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            tokenizer_3=tokenizer_3,
            transformer=transformer,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            aligned_transformer=aligned_transformer,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.tokenizer_max_length = (
            self.tokenizer.model_max_length if hasattr(self, "tokenizer") and self.tokenizer is not None else 77
        )
        self.default_sample_size = (
            self.transformer.config.sample_size
            if hasattr(self, "transformer") and self.transformer is not None
            else 128
        )
        self.patch_size = (
            self.transformer.config.patch_size if hasattr(self, "transformer") and self.transformer is not None else 2
        )

    # Copied from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3.StableDiffusion3Pipeline._get_t5_prompt_embeds
    def _get_t5_prompt_embeds(
        self,
        prompt: str | list[str] = None,
        num_images_per_prompt: int = 1,
        max_sequence_length: int = 256,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        device = device or self._execution_device
        dtype = dtype or self.text_encoder.dtype

        prompt = [prompt] if isinstance(prompt, str) else prompt
        batch_size = len(prompt)

        if self.text_encoder_3 is None:
            return torch.zeros(
                (
                    batch_size * num_images_per_prompt,
                    max_sequence_length,
                    self.transformer.config.joint_attention_dim,
                ),
                device=device,
                dtype=dtype,
            )

        text_inputs = self.tokenizer_3(
            prompt,
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        text_input_ids = text_inputs.input_ids
        untruncated_ids = self.tokenizer_3(prompt, padding="longest", return_tensors="pt").input_ids

        if untruncated_ids.shape[-1] >= text_input_ids.shape[-1] and not torch.equal(text_input_ids, untruncated_ids):
            removed_text = self.tokenizer_3.batch_decode(untruncated_ids[:, self.tokenizer_max_length - 1 : -1])
            logger.warning(
                "The following part of your input was truncated because `max_sequence_length` is set to "
                f" {max_sequence_length} tokens: {removed_text}"
            )

        prompt_embeds = self.text_encoder_3(text_input_ids.to(device))[0]

        dtype = self.text_encoder_3.dtype
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device)

        _, seq_len, _ = prompt_embeds.shape

        # duplicate text embeddings and attention mask for each generation per prompt, using mps friendly method
        prompt_embeds = prompt_embeds.repeat(1, num_images_per_prompt, 1)
        prompt_embeds = prompt_embeds.view(batch_size * num_images_per_prompt, seq_len, -1)

        return prompt_embeds

    # Copied from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3.StableDiffusion3Pipeline._get_clip_prompt_embeds
    def _get_clip_prompt_embeds(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        device: torch.device | None = None,
        clip_skip: int | None = None,
        clip_model_index: int = 0,
    ):
        device = device or self._execution_device

        clip_tokenizers = [self.tokenizer, self.tokenizer_2]
        clip_text_encoders = [self.text_encoder, self.text_encoder_2]

        tokenizer = clip_tokenizers[clip_model_index]
        text_encoder = clip_text_encoders[clip_model_index]

        prompt = [prompt] if isinstance(prompt, str) else prompt
        batch_size = len(prompt)

        text_inputs = tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer_max_length,
            truncation=True,
            return_tensors="pt",
        )

        text_input_ids = text_inputs.input_ids
        untruncated_ids = tokenizer(prompt, padding="longest", return_tensors="pt").input_ids
        if untruncated_ids.shape[-1] >= text_input_ids.shape[-1] and not torch.equal(text_input_ids, untruncated_ids):
            removed_text = tokenizer.batch_decode(untruncated_ids[:, self.tokenizer_max_length - 1 : -1])
            logger.warning(
                "The following part of your input was truncated because CLIP can only handle sequences up to"
                f" {self.tokenizer_max_length} tokens: {removed_text}"
            )
        prompt_embeds = text_encoder(text_input_ids.to(device), output_hidden_states=True)
        pooled_prompt_embeds = prompt_embeds[0]

        if clip_skip is None:
            prompt_embeds = prompt_embeds.hidden_states[-2]
        else:
            prompt_embeds = prompt_embeds.hidden_states[-(clip_skip + 2)]

        prompt_embeds = prompt_embeds.to(dtype=self.text_encoder.dtype, device=device)

        _, seq_len, _ = prompt_embeds.shape
        # duplicate text embeddings for each generation per prompt, using mps friendly method
        prompt_embeds = prompt_embeds.repeat(1, num_images_per_prompt, 1)
        prompt_embeds = prompt_embeds.view(batch_size * num_images_per_prompt, seq_len, -1)

        pooled_prompt_embeds = pooled_prompt_embeds.repeat(1, num_images_per_prompt)
        pooled_prompt_embeds = pooled_prompt_embeds.view(batch_size * num_images_per_prompt, -1)

        return prompt_embeds, pooled_prompt_embeds

    # Copied from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3.StableDiffusion3Pipeline.encode_prompt
    def encode_prompt(
        self,
        prompt: str | list[str],
        prompt_2: str | list[str],
        prompt_3: str | list[str],
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        clip_skip: int | None = None,
        max_sequence_length: int = 256,
        lora_scale: float | None = None,
    ):
        r"""

        Args:
            prompt (`str` or `list[str]`, *optional*):
                prompt to be encoded
            prompt_2 (`str` or `list[str]`, *optional*):
                The prompt or prompts to be sent to the `tokenizer_2` and `text_encoder_2`. If not defined, `prompt` is
                used in all text-encoders
            prompt_3 (`str` or `list[str]`, *optional*):
                The prompt or prompts to be sent to the `tokenizer_3` and `text_encoder_3`. If not defined, `prompt` is
                used in all text-encoders
            device: (`torch.device`):
                torch device
            num_images_per_prompt (`int`):
                number of images that should be generated per prompt
            do_classifier_free_guidance (`bool`):
                whether to use classifier free guidance or not
            negative_prompt (`str` or `list[str]`, *optional*):
                The prompt or prompts not to guide the image generation. If not defined, one has to pass
                `negative_prompt_embeds` instead. Ignored when not using guidance (i.e., ignored if `guidance_scale` is
                less than `1`).
            negative_prompt_2 (`str` or `list[str]`, *optional*):
                The prompt or prompts not to guide the image generation to be sent to `tokenizer_2` and
                `text_encoder_2`. If not defined, `negative_prompt` is used in all the text-encoders.
            negative_prompt_3 (`str` or `list[str]`, *optional*):
                The prompt or prompts not to guide the image generation to be sent to `tokenizer_3` and
                `text_encoder_3`. If not defined, `negative_prompt` is used in all the text-encoders.
            prompt_embeds (`torch.FloatTensor`, *optional*):
                Pre-generated text embeddings. Can be used to easily tweak text inputs, *e.g.* prompt weighting. If not
                provided, text embeddings will be generated from `prompt` input argument.
            negative_prompt_embeds (`torch.FloatTensor`, *optional*):
                Pre-generated negative text embeddings. Can be used to easily tweak text inputs, *e.g.* prompt
                weighting. If not provided, negative_prompt_embeds will be generated from `negative_prompt` input
                argument.
            pooled_prompt_embeds (`torch.FloatTensor`, *optional*):
                Pre-generated pooled text embeddings. Can be used to easily tweak text inputs, *e.g.* prompt weighting.
                If not provided, pooled text embeddings will be generated from `prompt` input argument.
            negative_pooled_prompt_embeds (`torch.FloatTensor`, *optional*):
                Pre-generated negative pooled text embeddings. Can be used to easily tweak text inputs, *e.g.* prompt
                weighting. If not provided, pooled negative_prompt_embeds will be generated from `negative_prompt`
                input argument.
            clip_skip (`int`, *optional*):
                Number of layers to be skipped from CLIP while computing the prompt embeddings. A value of 1 means that
                the output of the pre-final layer will be used for computing the prompt embeddings.
            lora_scale (`float`, *optional*):
                A lora scale that will be applied to all LoRA layers of the text encoder if LoRA layers are loaded.
        """
        device = device or self._execution_device

        # set lora scale so that monkey patched LoRA
        # function of text encoder can correctly access it
        if lora_scale is not None and isinstance(self, SD3LoraLoaderMixin):
            self._lora_scale = lora_scale

            # dynamically adjust the LoRA scale
            if self.text_encoder is not None and USE_PEFT_BACKEND:
                scale_lora_layers(self.text_encoder, lora_scale)
            if self.text_encoder_2 is not None and USE_PEFT_BACKEND:
                scale_lora_layers(self.text_encoder_2, lora_scale)

        prompt = [prompt] if isinstance(prompt, str) else prompt
        if prompt is not None:
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]

        if prompt_embeds is None:
            prompt_2 = prompt_2 or prompt
            prompt_2 = [prompt_2] if isinstance(prompt_2, str) else prompt_2

            prompt_3 = prompt_3 or prompt
            prompt_3 = [prompt_3] if isinstance(prompt_3, str) else prompt_3

            prompt_embed, pooled_prompt_embed = self._get_clip_prompt_embeds(
                prompt=prompt,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                clip_skip=clip_skip,
                clip_model_index=0,
            )
            prompt_2_embed, pooled_prompt_2_embed = self._get_clip_prompt_embeds(
                prompt=prompt_2,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                clip_skip=clip_skip,
                clip_model_index=1,
            )
            clip_prompt_embeds = torch.cat([prompt_embed, prompt_2_embed], dim=-1)

            t5_prompt_embed = self._get_t5_prompt_embeds(
                prompt=prompt_3,
                num_images_per_prompt=num_images_per_prompt,
                max_sequence_length=max_sequence_length,
                device=device,
            )

            clip_prompt_embeds = torch.nn.functional.pad(
                clip_prompt_embeds, (0, t5_prompt_embed.shape[-1] - clip_prompt_embeds.shape[-1])
            )

            prompt_embeds = torch.cat([clip_prompt_embeds, t5_prompt_embed], dim=-2)
            pooled_prompt_embeds = torch.cat([pooled_prompt_embed, pooled_prompt_2_embed], dim=-1)

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt = negative_prompt or ""
            negative_prompt_2 = negative_prompt_2 or negative_prompt
            negative_prompt_3 = negative_prompt_3 or negative_prompt

            # normalize str to list
            negative_prompt = batch_size * [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            negative_prompt_2 = (
                batch_size * [negative_prompt_2] if isinstance(negative_prompt_2, str) else negative_prompt_2
            )
            negative_prompt_3 = (
                batch_size * [negative_prompt_3] if isinstance(negative_prompt_3, str) else negative_prompt_3
            )

            if prompt is not None and type(prompt) is not type(negative_prompt):
                raise TypeError(
                    f"`negative_prompt` should be the same type to `prompt`, but got {type(negative_prompt)} !="
                    f" {type(prompt)}."
                )
            elif batch_size != len(negative_prompt):
                raise ValueError(
                    f"`negative_prompt`: {negative_prompt} has batch size {len(negative_prompt)}, but `prompt`:"
                    f" {prompt} has batch size {batch_size}. Please make sure that passed `negative_prompt` matches"
                    " the batch size of `prompt`."
                )

            negative_prompt_embed, negative_pooled_prompt_embed = self._get_clip_prompt_embeds(
                negative_prompt,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                clip_skip=None,
                clip_model_index=0,
            )
            negative_prompt_2_embed, negative_pooled_prompt_2_embed = self._get_clip_prompt_embeds(
                negative_prompt_2,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                clip_skip=None,
                clip_model_index=1,
            )
            negative_clip_prompt_embeds = torch.cat([negative_prompt_embed, negative_prompt_2_embed], dim=-1)

            t5_negative_prompt_embed = self._get_t5_prompt_embeds(
                prompt=negative_prompt_3,
                num_images_per_prompt=num_images_per_prompt,
                max_sequence_length=max_sequence_length,
                device=device,
            )

            negative_clip_prompt_embeds = torch.nn.functional.pad(
                negative_clip_prompt_embeds,
                (0, t5_negative_prompt_embed.shape[-1] - negative_clip_prompt_embeds.shape[-1]),
            )

            negative_prompt_embeds = torch.cat([negative_clip_prompt_embeds, t5_negative_prompt_embed], dim=-2)
            negative_pooled_prompt_embeds = torch.cat(
                [negative_pooled_prompt_embed, negative_pooled_prompt_2_embed], dim=-1
            )

        if self.text_encoder is not None:
            if isinstance(self, SD3LoraLoaderMixin) and USE_PEFT_BACKEND:
                # Retrieve the original scale by scaling back the LoRA layers
                unscale_lora_layers(self.text_encoder, lora_scale)

        if self.text_encoder_2 is not None:
            if isinstance(self, SD3LoraLoaderMixin) and USE_PEFT_BACKEND:
                # Retrieve the original scale by scaling back the LoRA layers
                unscale_lora_layers(self.text_encoder_2, lora_scale)

        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    # Copied from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3.StableDiffusion3Pipeline.check_inputs
    def check_inputs(
        self,
        prompt,
        prompt_2,
        prompt_3,
        height,
        width,
        negative_prompt=None,
        negative_prompt_2=None,
        negative_prompt_3=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        callback_on_step_end_tensor_inputs=None,
        max_sequence_length=None,
    ):
        if (
            height % (self.vae_scale_factor * self.patch_size) != 0
            or width % (self.vae_scale_factor * self.patch_size) != 0
        ):
            raise ValueError(
                f"`height` and `width` have to be divisible by {self.vae_scale_factor * self.patch_size} but are {height} and {width}."
                f"You can use height {height - height % (self.vae_scale_factor * self.patch_size)} and width {width - width % (self.vae_scale_factor * self.patch_size)}."
            )

        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but found {[k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]}"
            )

        if prompt is not None and prompt_embeds is not None:
            raise ValueError(
                f"Cannot forward both `prompt`: {prompt} and `prompt_embeds`: {prompt_embeds}. Please make sure to"
                " only forward one of the two."
            )
        elif prompt_2 is not None and prompt_embeds is not None:
            raise ValueError(
                f"Cannot forward both `prompt_2`: {prompt_2} and `prompt_embeds`: {prompt_embeds}. Please make sure to"
                " only forward one of the two."
            )
        elif prompt_3 is not None and prompt_embeds is not None:
            raise ValueError(
                f"Cannot forward both `prompt_3`: {prompt_2} and `prompt_embeds`: {prompt_embeds}. Please make sure to"
                " only forward one of the two."
            )
        elif prompt is None and prompt_embeds is None:
            raise ValueError(
                "Provide either `prompt` or `prompt_embeds`. Cannot leave both `prompt` and `prompt_embeds` undefined."
            )
        elif prompt is not None and (not isinstance(prompt, str) and not isinstance(prompt, list)):
            raise ValueError(f"`prompt` has to be of type `str` or `list` but is {type(prompt)}")
        elif prompt_2 is not None and (not isinstance(prompt_2, str) and not isinstance(prompt_2, list)):
            raise ValueError(f"`prompt_2` has to be of type `str` or `list` but is {type(prompt_2)}")
        elif prompt_3 is not None and (not isinstance(prompt_3, str) and not isinstance(prompt_3, list)):
            raise ValueError(f"`prompt_3` has to be of type `str` or `list` but is {type(prompt_3)}")

        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError(
                f"Cannot forward both `negative_prompt`: {negative_prompt} and `negative_prompt_embeds`:"
                f" {negative_prompt_embeds}. Please make sure to only forward one of the two."
            )
        elif negative_prompt_2 is not None and negative_prompt_embeds is not None:
            raise ValueError(
                f"Cannot forward both `negative_prompt_2`: {negative_prompt_2} and `negative_prompt_embeds`:"
                f" {negative_prompt_embeds}. Please make sure to only forward one of the two."
            )
        elif negative_prompt_3 is not None and negative_prompt_embeds is not None:
            raise ValueError(
                f"Cannot forward both `negative_prompt_3`: {negative_prompt_3} and `negative_prompt_embeds`:"
                f" {negative_prompt_embeds}. Please make sure to only forward one of the two."
            )

        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    "`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly, but"
                    f" got: `prompt_embeds` {prompt_embeds.shape} != `negative_prompt_embeds`"
                    f" {negative_prompt_embeds.shape}."
                )

        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError(
                "If `prompt_embeds` are provided, `pooled_prompt_embeds` also have to be passed. Make sure to generate `pooled_prompt_embeds` from the same text encoder that was used to generate `prompt_embeds`."
            )

        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError(
                "If `negative_prompt_embeds` are provided, `negative_pooled_prompt_embeds` also have to be passed. Make sure to generate `negative_pooled_prompt_embeds` from the same text encoder that was used to generate `negative_prompt_embeds`."
            )

        if max_sequence_length is not None and max_sequence_length > 512:
            raise ValueError(f"`max_sequence_length` cannot be greater than 512 but is {max_sequence_length}")

    # Copied from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3.StableDiffusion3Pipeline.prepare_latents
    def prepare_latents(
        self,
        batch_size,
        num_channels_latents,
        height,
        width,
        dtype,
        device,
        generator,
        latents=None,
    ):
        if latents is not None:
            return latents.to(device=device, dtype=dtype)

        shape = (
            batch_size,
            num_channels_latents,
            int(height) // self.vae_scale_factor,
            int(width) // self.vae_scale_factor,
        )

        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"You have passed a list of generators of length {len(generator)}, but requested an effective batch"
                f" size of {batch_size}. Make sure the batch size matches the length of the generators."
            )

        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)

        return latents

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
        skip_layers: Optional[List[int]] = None,
    ) -> Dict[str, torch.Tensor]:
        r"""
        Runs the transformers `models` on `hidden_states` and returns each one's raw velocity (CFG rows included).

        With `single_pass`, all the LoRA variants of `transformer` (base rows with `"__base__"`, aligned rows with their
        adapter) go through one batched forward; otherwise each model gets its own forward pass.
        `conditioning[name]` is `(encoder_hidden_states, pooled_projections)`; `skip_layers` is passed to the
        transformer (skip-layer guidance).
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
            joint_attention_kwargs = self.joint_attention_kwargs
            if joint_attention_kwargs is not None and "ip_adapter_image_embeds" in joint_attention_kwargs:
                # the IP-Adapter image embeddings follow the rows of every model in the batch
                image_embeds = joint_attention_kwargs["ip_adapter_image_embeds"]
                joint_attention_kwargs = {
                    **joint_attention_kwargs,
                    "ip_adapter_image_embeds": torch.cat([image_embeds] * len(group)),
                }
            with _lora_adapter_rows(transformer, adapter_rows):
                velocity = transformer(
                    hidden_states=torch.cat([hidden_states] * len(group)),
                    timestep=torch.cat([timestep] * len(group)),
                    encoder_hidden_states=torch.cat([conditioning[model.name][0] for model in group]),
                    pooled_projections=torch.cat([conditioning[model.name][1] for model in group]),
                    joint_attention_kwargs=joint_attention_kwargs,
                    return_dict=False,
                    skip_layers=skip_layers,
                )[0]
            predictions.update(zip([model.name for model in group], velocity.chunk(len(group))))
        return predictions

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def skip_guidance_layers(self):
        return self._skip_guidance_layers

    @property
    def clip_skip(self):
        return self._clip_skip

    # here `guidance_scale` is defined analog to the guidance weight `w` of equation (2)
    # of the Imagen paper: https://huggingface.co/papers/2205.11487 . `guidance_scale = 1`
    # corresponds to doing no classifier free guidance.
    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1

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

    @property
    def joint_attention_kwargs(self):
        return self._joint_attention_kwargs

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    # Copied from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3.StableDiffusion3Pipeline.encode_image
    def encode_image(self, image: PipelineImageInput, device: torch.device) -> torch.Tensor:
        """Encodes the given image into a feature representation using a pre-trained image encoder.

        Args:
            image (`PipelineImageInput`):
                Input image to be encoded.
            device: (`torch.device`):
                Torch device.

        Returns:
            `torch.Tensor`: The encoded image feature representation.
        """
        if not isinstance(image, torch.Tensor):
            image = self.feature_extractor(image, return_tensors="pt").pixel_values

        image = image.to(device=device, dtype=self.dtype)

        return self.image_encoder(image, output_hidden_states=True).hidden_states[-2]

    # Copied from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3.StableDiffusion3Pipeline.prepare_ip_adapter_image_embeds
    def prepare_ip_adapter_image_embeds(
        self,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: torch.Tensor | None = None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
    ) -> torch.Tensor:
        """Prepares image embeddings for use in the IP-Adapter.

        Either `ip_adapter_image` or `ip_adapter_image_embeds` must be passed.

        Args:
            ip_adapter_image (`PipelineImageInput`, *optional*):
                The input image to extract features from for IP-Adapter.
            ip_adapter_image_embeds (`torch.Tensor`, *optional*):
                Precomputed image embeddings.
            device: (`torch.device`, *optional*):
                Torch device.
            num_images_per_prompt (`int`, defaults to 1):
                Number of images that should be generated per prompt.
            do_classifier_free_guidance (`bool`, defaults to True):
                Whether to use classifier free guidance or not.
        """
        device = device or self._execution_device

        if ip_adapter_image_embeds is not None:
            if do_classifier_free_guidance:
                single_negative_image_embeds, single_image_embeds = ip_adapter_image_embeds.chunk(2)
            else:
                single_image_embeds = ip_adapter_image_embeds
        elif ip_adapter_image is not None:
            single_image_embeds = self.encode_image(ip_adapter_image, device)
            if do_classifier_free_guidance:
                single_negative_image_embeds = torch.zeros_like(single_image_embeds)
        else:
            raise ValueError("Neither `ip_adapter_image_embeds` or `ip_adapter_image_embeds` were provided.")

        image_embeds = torch.cat([single_image_embeds] * num_images_per_prompt, dim=0)

        if do_classifier_free_guidance:
            negative_image_embeds = torch.cat([single_negative_image_embeds] * num_images_per_prompt, dim=0)
            image_embeds = torch.cat([negative_image_embeds, image_embeds], dim=0)

        return image_embeds.to(device=device)

    # Copied from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3.StableDiffusion3Pipeline.enable_sequential_cpu_offload
    def enable_sequential_cpu_offload(self, *args, **kwargs):
        if self.image_encoder is not None and "image_encoder" not in self._exclude_from_cpu_offload:
            logger.warning(
                "`pipe.enable_sequential_cpu_offload()` might fail for `image_encoder` if it uses "
                "`torch.nn.MultiheadAttention`. You can exclude `image_encoder` from CPU offloading by calling "
                "`pipe._exclude_from_cpu_offload.append('image_encoder')` before `pipe.enable_sequential_cpu_offload()`."
            )

        super().enable_sequential_cpu_offload(*args, **kwargs)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 256,
        skip_guidance_layers: list[int] = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: float | None = None,
        rlg_scale: Union[RLGScale, Dict[str, RLGScale]] = 1.0,
        rlg_start: float = 0.0,
        rlg_stop: float = 1.0,
        rlg_single_pass: bool = True,
    ) -> StableDiffusion3PipelineOutput | tuple:
        r"""
        Function invoked when calling the pipeline for generation.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompt or prompts to guide the image generation. If not defined, one has to pass `prompt_embeds`.
                instead.
            prompt_2 (`str` or `list[str]`, *optional*):
                The prompt or prompts to be sent to `tokenizer_2` and `text_encoder_2`. If not defined, `prompt` is
                will be used instead
            prompt_3 (`str` or `list[str]`, *optional*):
                The prompt or prompts to be sent to `tokenizer_3` and `text_encoder_3`. If not defined, `prompt` is
                will be used instead
            height (`int`, *optional*, defaults to self.unet.config.sample_size * self.vae_scale_factor):
                The height in pixels of the generated image. This is set to 1024 by default for the best results.
            width (`int`, *optional*, defaults to self.unet.config.sample_size * self.vae_scale_factor):
                The width in pixels of the generated image. This is set to 1024 by default for the best results.
            num_inference_steps (`int`, *optional*, defaults to 50):
                The number of denoising steps. More denoising steps usually lead to a higher quality image at the
                expense of slower inference.
            sigmas (`list[float]`, *optional*):
                Custom sigmas to use for the denoising process with schedulers which support a `sigmas` argument in
                their `set_timesteps` method. If not defined, the default behavior when `num_inference_steps` is passed
                will be used.
            guidance_scale (`float`, *optional*, defaults to 7.0):
                Guidance scale as defined in [Classifier-Free Diffusion
                Guidance](https://huggingface.co/papers/2207.12598). `guidance_scale` is defined as `w` of equation 2.
                of [Imagen Paper](https://huggingface.co/papers/2205.11487). Guidance scale is enabled by setting
                `guidance_scale > 1`. Higher guidance scale encourages to generate images that are closely linked to
                the text `prompt`, usually at the expense of lower image quality.
            negative_prompt (`str` or `list[str]`, *optional*):
                The prompt or prompts not to guide the image generation. If not defined, one has to pass
                `negative_prompt_embeds` instead. Ignored when not using guidance (i.e., ignored if `guidance_scale` is
                less than `1`).
            negative_prompt_2 (`str` or `list[str]`, *optional*):
                The prompt or prompts not to guide the image generation to be sent to `tokenizer_2` and
                `text_encoder_2`. If not defined, `negative_prompt` is used instead
            negative_prompt_3 (`str` or `list[str]`, *optional*):
                The prompt or prompts not to guide the image generation to be sent to `tokenizer_3` and
                `text_encoder_3`. If not defined, `negative_prompt` is used instead
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                The number of images to generate per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                One or a list of [torch generator(s)](https://pytorch.org/docs/stable/generated/torch.Generator.html)
                to make generation deterministic.
            latents (`torch.FloatTensor`, *optional*):
                Pre-generated noisy latents, sampled from a Gaussian distribution, to be used as inputs for image
                generation. Can be used to tweak the same generation with different prompts. If not provided, a latents
                tensor will be generated by sampling using the supplied random `generator`.
            prompt_embeds (`torch.FloatTensor`, *optional*):
                Pre-generated text embeddings. Can be used to easily tweak text inputs, *e.g.* prompt weighting. If not
                provided, text embeddings will be generated from `prompt` input argument.
            negative_prompt_embeds (`torch.FloatTensor`, *optional*):
                Pre-generated negative text embeddings. Can be used to easily tweak text inputs, *e.g.* prompt
                weighting. If not provided, negative_prompt_embeds will be generated from `negative_prompt` input
                argument.
            pooled_prompt_embeds (`torch.FloatTensor`, *optional*):
                Pre-generated pooled text embeddings. Can be used to easily tweak text inputs, *e.g.* prompt weighting.
                If not provided, pooled text embeddings will be generated from `prompt` input argument.
            negative_pooled_prompt_embeds (`torch.FloatTensor`, *optional*):
                Pre-generated negative pooled text embeddings. Can be used to easily tweak text inputs, *e.g.* prompt
                weighting. If not provided, pooled negative_prompt_embeds will be generated from `negative_prompt`
                input argument.
            ip_adapter_image (`PipelineImageInput`, *optional*):
                Optional image input to work with IP Adapters.
            ip_adapter_image_embeds (`torch.Tensor`, *optional*):
                Pre-generated image embeddings for IP-Adapter. Should be a tensor of shape `(batch_size, num_images,
                emb_dim)`. It should contain the negative image embedding if `do_classifier_free_guidance` is set to
                `True`. If not provided, embeddings are computed from the `ip_adapter_image` input argument.
            output_type (`str`, *optional*, defaults to `"pil"`):
                The output format of the generate image. Choose between
                [PIL](https://pillow.readthedocs.io/en/stable/): `PIL.Image.Image` or `np.array`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether or not to return a [`~pipelines.stable_diffusion_3.StableDiffusion3PipelineOutput`] instead of
                a plain tuple.
            joint_attention_kwargs (`dict`, *optional*):
                A kwargs dictionary that if specified is passed along to the `AttentionProcessor` as defined under
                `self.processor` in
                [diffusers.models.attention_processor](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/attention_processor.py).
            clip_skip (`int`, *optional*):
                Number of layers to be skipped from CLIP while computing the prompt embeddings. A value of 1 means that
                the output of the pre-final layer will be used for computing the prompt embeddings.
            callback_on_step_end (`Callable`, *optional*):
                A function that calls at the end of each denoising steps during the inference. The function is called
                with the following arguments: `callback_on_step_end(self: DiffusionPipeline, step: int, timestep: int,
                callback_kwargs: Dict)`. `callback_kwargs` will include a list of all tensors as specified by
                `callback_on_step_end_tensor_inputs`.
            callback_on_step_end_tensor_inputs (`list`, *optional*):
                The list of tensor inputs for the `callback_on_step_end` function. The tensors specified in the list
                will be passed as `callback_kwargs` argument. You will only be able to include variables listed in the
                `._callback_tensor_inputs` attribute of your pipeline class.
            max_sequence_length (`int` defaults to 256): Maximum sequence length to use with the `prompt`.
            skip_guidance_layers (`list[int]`, *optional*):
                A list of integers that specify layers to skip during guidance. If not provided, all layers will be
                used for guidance. If provided, the guidance will only be applied to the layers specified in the list.
                Recommended value by StabiltyAI for Stable Diffusion 3.5 Medium is [7, 8, 9].
            skip_layer_guidance_scale (`int`, *optional*): The scale of the guidance for the layers specified in
                `skip_guidance_layers`. The guidance will be applied to the layers specified in `skip_guidance_layers`
                with a scale of `skip_layer_guidance_scale`. The guidance will be applied to the rest of the layers
                with a scale of `1`.
            skip_layer_guidance_stop (`int`, *optional*): The step at which the guidance for the layers specified in
                `skip_guidance_layers` will stop. The guidance will be applied to the layers specified in
                `skip_guidance_layers` until the fraction specified in `skip_layer_guidance_stop`. Recommended value by
                StabiltyAI for Stable Diffusion 3.5 Medium is 0.2.
            skip_layer_guidance_start (`int`, *optional*): The step at which the guidance for the layers specified in
                `skip_guidance_layers` will start. The guidance will be applied to the layers specified in
                `skip_guidance_layers` from the fraction specified in `skip_layer_guidance_start`. Recommended value by
                StabiltyAI for Stable Diffusion 3.5 Medium is 0.01.
            mu (`float`, *optional*): `mu` value used for `dynamic_shifting`.
            rlg_scale (`float`, `List[float]`, `Callable[[int], float]` or `Dict[str, ...]`, *optional*, defaults to 1.0):
                Reinforcement Learning Guidance scale `w` in `v = v_base + w * (v_aligned - v_base)`: `0` is the base
                model, `1` the aligned model, `0 < w < 1` interpolates, `w > 1` extrapolates (the RLG authors
                recommend 1 to 3). A list (one value per denoising step) or a callable of the step index gives a
                per-step schedule. A dict `{adapter_name: w_i}` mixes several LoRA adapters of `transformer`,
                `v_base + sum_i w_i (v_i - v_base)`, each `w_i` again a float or a schedule. Classifier-free guidance
                (and skip-layer guidance) is applied inside each model first.
            rlg_start (`float`, *optional*, defaults to 0.0):
                Fraction of the denoising steps after which RLG starts. Outside [`rlg_start`, `rlg_stop`) the aligned
                model runs alone, at the cost of plain CFG.
            rlg_stop (`float`, *optional*, defaults to 1.0):
                Fraction of the denoising steps at which RLG stops.
            rlg_single_pass (`bool`, *optional*, defaults to `True`):
                With a LoRA aligned model, compute the base and aligned velocities (CFG rows included) in one batched
                transformer forward (per-row adapter selection). `False` runs one forward per model; the results are
                the same up to float rounding.

        Examples:

        Returns:
            [`~pipelines.stable_diffusion_3.StableDiffusion3PipelineOutput`] or `tuple`:
            [`~pipelines.stable_diffusion_3.StableDiffusion3PipelineOutput`] if `return_dict` is True, otherwise a
            `tuple`. When returning a tuple, the first element is a list with the generated images.
        """

        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor

        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            prompt_2,
            prompt_3,
            height,
            width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        self.check_rlg_inputs(rlg_scale, rlg_start, rlg_stop, prompt_embeds)

        self._guidance_scale = guidance_scale
        self._skip_layer_guidance_scale = skip_layer_guidance_scale
        self._skip_guidance_layers = skip_guidance_layers
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
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

        lora_scale = (
            self.joint_attention_kwargs.get("scale", None) if self.joint_attention_kwargs is not None else None
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
        given_embeds = (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)

        def encode(adapter):
            with (
                _lora_adapter_rows(self.text_encoder, adapter),
                _lora_adapter_rows(self.text_encoder_2, adapter),
                _lora_adapter_rows(self.text_encoder_3, adapter),
            ):
                return self.encode_prompt(
                    prompt=prompt,
                    prompt_2=prompt_2,
                    prompt_3=prompt_3,
                    negative_prompt=negative_prompt,
                    negative_prompt_2=negative_prompt_2,
                    negative_prompt_3=negative_prompt_3,
                    do_classifier_free_guidance=self.do_classifier_free_guidance,
                    prompt_embeds=given_embeds[0],
                    negative_prompt_embeds=given_embeds[1],
                    pooled_prompt_embeds=given_embeds[2],
                    negative_pooled_prompt_embeds=given_embeds[3],
                    device=device,
                    clip_skip=self.clip_skip,
                    num_images_per_prompt=num_images_per_prompt,
                    max_sequence_length=max_sequence_length,
                    lora_scale=lora_scale,
                )

        def text_encoder_adapter(model):
            return self._rlg_text_encoder_adapter(model) if text_encoder_has_lora else None

        # for classifier free guidance, each model's unconditional and text embeddings form a single batch; skip-layer
        # guidance runs on the text embeddings alone
        def model_conditioning(embeds):
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = embeds
            original_prompt_embeds, original_pooled_prompt_embeds = prompt_embeds, pooled_prompt_embeds
            if self.do_classifier_free_guidance:
                prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
                pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds], dim=0)
            return prompt_embeds, pooled_prompt_embeds, original_prompt_embeds, original_pooled_prompt_embeds

        encoded = {None: encode(None)}
        prompt_embeds, pooled_prompt_embeds, original_prompt_embeds, original_pooled_prompt_embeds = (
            model_conditioning(encoded[None])
        )

        # 4. Prepare latent variables
        num_channels_latents = self.transformer.config.in_channels
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            num_channels_latents,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )

        # 5. Prepare timesteps
        scheduler_kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            _, _, height, width = latents.shape
            image_seq_len = (height // self.transformer.config.patch_size) * (
                width // self.transformer.config.patch_size
            )
            mu = calculate_shift(
                image_seq_len,
                self.scheduler.config.get("base_image_seq_len", 256),
                self.scheduler.config.get("max_image_seq_len", 4096),
                self.scheduler.config.get("base_shift", 0.5),
                self.scheduler.config.get("max_shift", 1.16),
            )
            scheduler_kwargs["mu"] = mu
        elif mu is not None:
            scheduler_kwargs["mu"] = mu
        if XLA_AVAILABLE:
            timestep_device = "cpu"
        else:
            timestep_device = device
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler,
            num_inference_steps,
            timestep_device,
            sigmas=sigmas,
            **scheduler_kwargs,
        )
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        self._num_timesteps = len(timesteps)
        self._check_rlg_schedule_length(rlg_scale, len(timesteps))

        # 6. Prepare image embeddings
        if (ip_adapter_image is not None and self.is_ip_adapter_active) or ip_adapter_image_embeds is not None:
            ip_adapter_image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image,
                ip_adapter_image_embeds,
                device,
                batch_size * num_images_per_prompt,
                self.do_classifier_free_guidance,
            )

            if self.joint_attention_kwargs is None:
                self._joint_attention_kwargs = {"ip_adapter_image_embeds": ip_adapter_image_embeds}
            else:
                self._joint_attention_kwargs.update(ip_adapter_image_embeds=ip_adapter_image_embeds)

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

                # expand the latents if we are doing classifier free guidance
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                # broadcast to batch dimension in a way that's compatible with ONNX/Core ML
                timestep = t.expand(latent_model_input.shape[0])
                # on TPU, a view into `timesteps` makes `torch.compile` recompile every step
                if timestep.device.type == "tpu":
                    timestep = timestep.clone()

                # predict the velocity of every model, in one batched forward where possible
                noise_preds = self._rlg_forward(
                    step_models, latent_model_input, timestep, step_conditioning, rlg_single_pass
                )

                # perform guidance inside each model
                if self.do_classifier_free_guidance:
                    should_skip_layers = (
                        True
                        if i > num_inference_steps * skip_layer_guidance_start
                        and i < num_inference_steps * skip_layer_guidance_stop
                        else False
                    )
                    if skip_guidance_layers is not None and should_skip_layers:
                        timestep = t.expand(latents.shape[0])
                        if timestep.device.type == "tpu":
                            timestep = timestep.clone()
                        noise_preds_skip_layers = self._rlg_forward(
                            step_models,
                            latents,
                            timestep,
                            {name: cond[2:] for name, cond in step_conditioning.items()},
                            rlg_single_pass,
                            skip_layers=skip_guidance_layers,
                        )
                    for name, noise_pred in noise_preds.items():
                        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                        noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
                        if skip_guidance_layers is not None and should_skip_layers:
                            noise_pred_skip_layers = noise_preds_skip_layers[name]
                            noise_pred = (
                                noise_pred
                                + (noise_pred_text - noise_pred_skip_layers) * self._skip_layer_guidance_scale
                            )
                        noise_preds[name] = noise_pred

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
                    new_pooled_prompt_embeds = callback_outputs.pop("pooled_prompt_embeds", pooled_prompt_embeds)
                    if new_prompt_embeds is not prompt_embeds or new_pooled_prompt_embeds is not pooled_prompt_embeds:
                        # conditioning set by the callback applies to every model from the next step on
                        prompt_embeds, pooled_prompt_embeds = new_prompt_embeds, new_pooled_prompt_embeds
                        callback_conditioning = (
                            prompt_embeds,
                            pooled_prompt_embeds,
                            original_prompt_embeds,
                            original_pooled_prompt_embeds,
                        )
                        conditioning = {}

                # call the callback, if provided
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

                if XLA_AVAILABLE:
                    xm.mark_step()

        if output_type == "latent":
            image = latents

        else:
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor

            image = self.vae.decode(latents, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)

        return StableDiffusion3PipelineOutput(images=image)
