# Reinforcement Learning Guidance (RLG) for Stable Diffusion: the alignment strength of a reward-fine-tuned model
# becomes a dial at inference. Jin et al., "Inference-time Alignment Control for Diffusion Models with Reinforcement
# Learning Guidance" (https://huggingface.co/papers/2508.21016).
#
# Self-contained diffusers pipeline (imports only torch, diffusers, transformers; peft lazily, for LoRA). It can be
# imported as `diffalign.pipelines.StableDiffusionRLGPipeline` or loaded as a community pipeline:
# `DiffusionPipeline.from_pretrained(repo, custom_pipeline="pipeline_stable_diffusion_rlg.py", trust_remote_code=True)`.
#
# Licensed under the Apache License, Version 2.0. Methods marked "Copied from diffusers" are the HuggingFace Team's
# (Copyright 2026 The HuggingFace Team, Apache-2.0), copied from diffusers 0.42.1 without changes.
import inspect
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.configuration_utils import FrozenDict
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.loaders import (
    FromSingleFileMixin,
    IPAdapterMixin,
    StableDiffusionLoraLoaderMixin,
    TextualInversionLoaderMixin,
)
from diffusers.models import AutoencoderKL, ImageProjection, UNet2DConditionModel
from diffusers.models.lora import adjust_lora_scale_text_encoder
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import (
    USE_PEFT_BACKEND,
    deprecate,
    is_peft_available,
    is_torch_xla_available,
    logging,
    replace_example_docstring,
    scale_lora_layers,
    unscale_lora_layers,
)
from diffusers.utils.torch_utils import randn_tensor
from packaging import version
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

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
        >>> from diffalign.pipelines import StableDiffusionRLGPipeline

        >>> pipe = StableDiffusionRLGPipeline.from_pretrained(
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5", torch_dtype=torch.float16
        ... ).to("cuda")
        >>> pipe.load_lora_weights("path/to/reward_lora")  # e.g. the output dir of `diffalign train`

        >>> prompt = "a photo of an astronaut riding a horse on mars"
        >>> # 0: base model, 1: aligned model, >1: stronger alignment than training gave
        >>> images = [pipe(prompt, rlg_scale=w, generator=torch.manual_seed(0)).images[0] for w in (0.0, 1.0, 2.0)]
        ```
"""

# Name peft uses for "no adapter" rows in a mixed-adapter batch (`adapter_names=[...]`).
BASE_ADAPTER_NAME = "__base__"

RLGScale = Union[float, Sequence[float], Callable[[int], float]]


class _RLGModel(NamedTuple):
    """One denoiser combined by RLG: `unet_name` is the pipeline attribute, `adapter` the LoRA adapter it runs with
    (`"__base__"` for none, `None` to run the model exactly as it is configured)."""

    name: str
    unet_name: str
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


def _lora_layers(model) -> list:
    if model is None or not is_peft_available():
        return []
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def _loaded_adapters(model) -> List[str]:
    names = set()
    for layer in _lora_layers(model):
        names |= set(layer.lora_A.keys()) | set(layer.lora_embedding_A.keys())
    return sorted(names)


def _uses_dora(lora_layers: list, adapter: str) -> bool:
    return any(layer.use_dora.get(adapter, False) for layer in lora_layers)


@contextmanager
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


def _cat_added_cond_kwargs(added_cond_kwargs: List[Optional[Dict[str, Any]]]) -> Optional[Dict[str, Any]]:
    """Concatenates the `added_cond_kwargs` of several row groups (tensors, or lists of tensors) along the batch."""
    if added_cond_kwargs[0] is None:
        return None
    out = {}
    for key, value in added_cond_kwargs[0].items():
        if isinstance(value, (list, tuple)):
            out[key] = [torch.cat([kwargs[key][j] for kwargs in added_cond_kwargs]) for j in range(len(value))]
        else:
            out[key] = torch.cat([kwargs[key] for kwargs in added_cond_kwargs])
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.rescale_noise_cfg
def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale=0.0):
    r"""
    Rescales `noise_cfg` tensor based on `guidance_rescale` to improve image quality and fix overexposure. Based on
    Section 3.4 from [Common Diffusion Noise Schedules and Sample Steps are
    Flawed](https://huggingface.co/papers/2305.08891).

    Args:
        noise_cfg (`torch.Tensor`):
            The predicted noise tensor for the guided diffusion process.
        noise_pred_text (`torch.Tensor`):
            The predicted noise tensor for the text-guided diffusion process.
        guidance_rescale (`float`, *optional*, defaults to 0.0):
            A rescale factor applied to the noise predictions.

    Returns:
        noise_cfg (`torch.Tensor`): The rescaled noise prediction tensor.
    """
    std_text = noise_pred_text.std(dim=list(range(1, noise_pred_text.ndim)), keepdim=True)
    std_cfg = noise_cfg.std(dim=list(range(1, noise_cfg.ndim)), keepdim=True)
    # rescale the results from guidance (fixes overexposure)
    noise_pred_rescaled = noise_cfg * (std_text / std_cfg)
    # mix with the original results from guidance by factor guidance_rescale to avoid "plain looking" images
    noise_cfg = guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_cfg
    return noise_cfg


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


class StableDiffusionRLGPipeline(
    DiffusionPipeline,
    StableDiffusionMixin,
    TextualInversionLoaderMixin,
    StableDiffusionLoraLoaderMixin,
    IPAdapterMixin,
    FromSingleFileMixin,
):
    r"""
    Pipeline for text-to-image generation using Stable Diffusion with Reinforcement Learning Guidance (RLG).

    At every denoising step, classifier-free guidance is applied inside the base and the aligned (reward fine-tuned)
    model, then the two guided predictions are mixed: `pred = pred_base + rlg_scale * (pred_aligned - pred_base)`.
    `rlg_scale=0` samples the base model, `1` the aligned model, values in between interpolate and values above 1
    extrapolate (for a KL-regularised fine-tune, like training with the KL coefficient divided by `rlg_scale`).

    The aligned model is either a LoRA adapter on `unet` (load it with
    [`~loaders.StableDiffusionLoraLoaderMixin.load_lora_weights`]; the base is `unet` with adapters off, and both
    predictions come from one batched forward pass of the same weights) or a fully fine-tuned `aligned_unet`.

    This model inherits from [`DiffusionPipeline`]. Check the superclass documentation for the generic methods
    implemented for all pipelines (downloading, saving, running on a particular device, etc.).

    The pipeline also inherits the following loading methods:
        - [`~loaders.TextualInversionLoaderMixin.load_textual_inversion`] for loading textual inversion embeddings
        - [`~loaders.StableDiffusionLoraLoaderMixin.load_lora_weights`] for loading LoRA weights
        - [`~loaders.StableDiffusionLoraLoaderMixin.save_lora_weights`] for saving LoRA weights
        - [`~loaders.FromSingleFileMixin.from_single_file`] for loading `.ckpt` files
        - [`~loaders.IPAdapterMixin.load_ip_adapter`] for loading IP Adapters

    Args:
        vae ([`AutoencoderKL`]):
            Variational Auto-Encoder (VAE) model to encode and decode images to and from latent representations.
        text_encoder ([`~transformers.CLIPTextModel`]):
            Frozen text-encoder ([clip-vit-large-patch14](https://huggingface.co/openai/clip-vit-large-patch14)).
        tokenizer ([`~transformers.CLIPTokenizer`]):
            A `CLIPTokenizer` to tokenize text.
        unet ([`UNet2DConditionModel`]):
            The base `UNet2DConditionModel`. With a LoRA adapter loaded and no `aligned_unet`, the adapter makes it
            the aligned model.
        scheduler ([`SchedulerMixin`]):
            A scheduler to be used in combination with `unet` to denoise the encoded image latents. Can be one of
            [`DDIMScheduler`], [`LMSDiscreteScheduler`], or [`PNDMScheduler`].
        safety_checker ([`StableDiffusionSafetyChecker`]):
            Classification module that estimates whether generated images could be considered offensive or harmful.
            Please refer to the [model card](https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5) for
            more details about a model's potential harms.
        feature_extractor ([`~transformers.CLIPImageProcessor`]):
            A `CLIPImageProcessor` to extract features from generated images; used as inputs to the `safety_checker`.
        image_encoder ([`~transformers.CLIPVisionModelWithProjection`], *optional*):
            Image encoder for IP-Adapters.
        aligned_unet ([`UNet2DConditionModel`], *optional*):
            A fully fine-tuned copy of `unet` (same config). When given, `unet` and `aligned_unet` are used as they
            are (LoRA adapters on either stay as configured).
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->unet->aligned_unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder", "aligned_unet"]
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    # text encoders a LoRA adapter may also change: the base model's prompt is encoded with the adapters off
    _rlg_text_encoders = ["text_encoder"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker,
        feature_extractor: CLIPImageProcessor,
        image_encoder: CLIPVisionModelWithProjection = None,
        aligned_unet: Optional[UNet2DConditionModel] = None,
        requires_safety_checker: bool = True,
    ):
        super().__init__()

        if scheduler is not None and getattr(scheduler.config, "steps_offset", 1) != 1:
            deprecation_message = (
                f"The configuration file of this scheduler: {scheduler} is outdated. `steps_offset`"
                f" should be set to 1 instead of {scheduler.config.steps_offset}. Please make sure "
                "to update the config accordingly as leaving `steps_offset` might led to incorrect results"
                " in future versions. If you have downloaded this checkpoint from the Hugging Face Hub,"
                " it would be very nice if you could open a Pull request for the `scheduler/scheduler_config.json`"
                " file"
            )
            deprecate("steps_offset!=1", "1.0.0", deprecation_message, standard_warn=False)
            new_config = dict(scheduler.config)
            new_config["steps_offset"] = 1
            scheduler._internal_dict = FrozenDict(new_config)

        if scheduler is not None and getattr(scheduler.config, "clip_sample", False) is True:
            deprecation_message = (
                f"The configuration file of this scheduler: {scheduler} has not set the configuration `clip_sample`."
                " `clip_sample` should be set to False in the configuration file. Please make sure to update the"
                " config accordingly as not setting `clip_sample` in the config might lead to incorrect results in"
                " future versions. If you have downloaded this checkpoint from the Hugging Face Hub, it would be very"
                " nice if you could open a Pull request for the `scheduler/scheduler_config.json` file"
            )
            deprecate("clip_sample not set", "1.0.0", deprecation_message, standard_warn=False)
            new_config = dict(scheduler.config)
            new_config["clip_sample"] = False
            scheduler._internal_dict = FrozenDict(new_config)

        if safety_checker is None and requires_safety_checker:
            logger.warning(
                f"You have disabled the safety checker for {self.__class__} by passing `safety_checker=None`. Ensure"
                " that you abide to the conditions of the Stable Diffusion license and do not expose unfiltered"
                " results in services or applications open to the public. Both the diffusers team and Hugging Face"
                " strongly recommend to keep the safety filter enabled in all public facing circumstances, disabling"
                " it only for use-cases that involve analyzing network behavior or auditing its results. For more"
                " information, please have a look at https://github.com/huggingface/diffusers/pull/254 ."
            )

        if safety_checker is not None and feature_extractor is None:
            raise ValueError(
                "Make sure to define a feature extractor when loading {self.__class__} if you want to use the safety"
                " checker. If you do not want to use the safety checker, you can pass `'safety_checker=None'` instead."
            )

        is_unet_version_less_0_9_0 = (
            unet is not None
            and hasattr(unet.config, "_diffusers_version")
            and version.parse(version.parse(unet.config._diffusers_version).base_version) < version.parse("0.9.0.dev0")
        )
        self._is_unet_config_sample_size_int = unet is not None and isinstance(unet.config.sample_size, int)
        is_unet_sample_size_less_64 = (
            unet is not None
            and hasattr(unet.config, "sample_size")
            and self._is_unet_config_sample_size_int
            and unet.config.sample_size < 64
        )
        if is_unet_version_less_0_9_0 and is_unet_sample_size_less_64:
            deprecation_message = (
                "The configuration file of the unet has set the default `sample_size` to smaller than"
                " 64 which seems highly unlikely. If your checkpoint is a fine-tuned version of any of the"
                " following: \n- CompVis/stable-diffusion-v1-4 \n- CompVis/stable-diffusion-v1-3 \n-"
                " CompVis/stable-diffusion-v1-2 \n- CompVis/stable-diffusion-v1-1 \n- stable-diffusion-v1-5/stable-diffusion-v1-5"
                " \n- stable-diffusion-v1-5/stable-diffusion-inpainting \n you should change 'sample_size' to 64 in the"
                " configuration file. Please make sure to update the config accordingly as leaving `sample_size=32`"
                " in the config might lead to incorrect results in future versions. If you have downloaded this"
                " checkpoint from the Hugging Face Hub, it would be very nice if you could open a Pull request for"
                " the `unet/config.json` file"
            )
            deprecate("sample_size<64", "1.0.0", deprecation_message, standard_warn=False)
            new_config = dict(unet.config)
            new_config["sample_size"] = 64
            unet._internal_dict = FrozenDict(new_config)

        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            aligned_unet=aligned_unet,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.register_to_config(requires_safety_checker=requires_safety_checker)

    # Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.encode_prompt
    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ):
        r"""
        Encodes the prompt into text encoder hidden states.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                prompt to be encoded
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
            prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated text embeddings. Can be used to easily tweak text inputs, *e.g.* prompt weighting. If not
                provided, text embeddings will be generated from `prompt` input argument.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated negative text embeddings. Can be used to easily tweak text inputs, *e.g.* prompt
                weighting. If not provided, negative_prompt_embeds will be generated from `negative_prompt` input
                argument.
            lora_scale (`float`, *optional*):
                A LoRA scale that will be applied to all LoRA layers of the text encoder if LoRA layers are loaded.
            clip_skip (`int`, *optional*):
                Number of layers to be skipped from CLIP while computing the prompt embeddings. A value of 1 means that
                the output of the pre-final layer will be used for computing the prompt embeddings.
        """
        # set lora scale so that monkey patched LoRA
        # function of text encoder can correctly access it
        if lora_scale is not None and isinstance(self, StableDiffusionLoraLoaderMixin):
            self._lora_scale = lora_scale

            # dynamically adjust the LoRA scale
            if not USE_PEFT_BACKEND:
                adjust_lora_scale_text_encoder(self.text_encoder, lora_scale)
            else:
                scale_lora_layers(self.text_encoder, lora_scale)

        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]

        if prompt_embeds is None:
            # textual inversion: process multi-vector tokens if necessary
            if isinstance(self, TextualInversionLoaderMixin):
                prompt = self.maybe_convert_prompt(prompt, self.tokenizer)

            text_inputs = self.tokenizer(
                prompt,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            text_input_ids = text_inputs.input_ids
            untruncated_ids = self.tokenizer(prompt, padding="longest", return_tensors="pt").input_ids

            if untruncated_ids.shape[-1] >= text_input_ids.shape[-1] and not torch.equal(
                text_input_ids, untruncated_ids
            ):
                removed_text = self.tokenizer.batch_decode(
                    untruncated_ids[:, self.tokenizer.model_max_length - 1 : -1]
                )
                logger.warning(
                    "The following part of your input was truncated because CLIP can only handle sequences up to"
                    f" {self.tokenizer.model_max_length} tokens: {removed_text}"
                )

            if hasattr(self.text_encoder.config, "use_attention_mask") and self.text_encoder.config.use_attention_mask:
                attention_mask = text_inputs.attention_mask.to(device)
            else:
                attention_mask = None

            if clip_skip is None:
                prompt_embeds = self.text_encoder(text_input_ids.to(device), attention_mask=attention_mask)
                prompt_embeds = prompt_embeds[0]
            else:
                prompt_embeds = self.text_encoder(
                    text_input_ids.to(device), attention_mask=attention_mask, output_hidden_states=True
                )
                # Access the `hidden_states` first, that contains a tuple of
                # all the hidden states from the encoder layers. Then index into
                # the tuple to access the hidden states from the desired layer.
                prompt_embeds = prompt_embeds[-1][-(clip_skip + 1)]
                # We also need to apply the final LayerNorm here to not mess with the
                # representations. The `last_hidden_states` that we typically use for
                # obtaining the final prompt representations passes through the LayerNorm
                # layer.
                prompt_embeds = self.text_encoder.text_model.final_layer_norm(prompt_embeds)

        if self.text_encoder is not None:
            prompt_embeds_dtype = self.text_encoder.dtype
        elif self.unet is not None:
            prompt_embeds_dtype = self.unet.dtype
        else:
            prompt_embeds_dtype = prompt_embeds.dtype

        prompt_embeds = prompt_embeds.to(dtype=prompt_embeds_dtype, device=device)

        bs_embed, seq_len, _ = prompt_embeds.shape
        # duplicate text embeddings for each generation per prompt, using mps friendly method
        prompt_embeds = prompt_embeds.repeat(1, num_images_per_prompt, 1)
        prompt_embeds = prompt_embeds.view(bs_embed * num_images_per_prompt, seq_len, -1)

        # get unconditional embeddings for classifier free guidance
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            uncond_tokens: list[str]
            if negative_prompt is None:
                uncond_tokens = [""] * batch_size
            elif prompt is not None and type(prompt) is not type(negative_prompt):
                raise TypeError(
                    f"`negative_prompt` should be the same type to `prompt`, but got {type(negative_prompt)} !="
                    f" {type(prompt)}."
                )
            elif isinstance(negative_prompt, str):
                uncond_tokens = [negative_prompt]
            elif batch_size != len(negative_prompt):
                raise ValueError(
                    f"`negative_prompt`: {negative_prompt} has batch size {len(negative_prompt)}, but `prompt`:"
                    f" {prompt} has batch size {batch_size}. Please make sure that passed `negative_prompt` matches"
                    " the batch size of `prompt`."
                )
            else:
                uncond_tokens = negative_prompt

            # textual inversion: process multi-vector tokens if necessary
            if isinstance(self, TextualInversionLoaderMixin):
                uncond_tokens = self.maybe_convert_prompt(uncond_tokens, self.tokenizer)

            max_length = prompt_embeds.shape[1]
            uncond_input = self.tokenizer(
                uncond_tokens,
                padding="max_length",
                max_length=max_length,
                truncation=True,
                return_tensors="pt",
            )

            if hasattr(self.text_encoder.config, "use_attention_mask") and self.text_encoder.config.use_attention_mask:
                attention_mask = uncond_input.attention_mask.to(device)
            else:
                attention_mask = None

            negative_prompt_embeds = self.text_encoder(
                uncond_input.input_ids.to(device),
                attention_mask=attention_mask,
            )
            negative_prompt_embeds = negative_prompt_embeds[0]

        if do_classifier_free_guidance:
            # duplicate unconditional embeddings for each generation per prompt, using mps friendly method
            seq_len = negative_prompt_embeds.shape[1]

            negative_prompt_embeds = negative_prompt_embeds.to(dtype=prompt_embeds_dtype, device=device)

            negative_prompt_embeds = negative_prompt_embeds.repeat(1, num_images_per_prompt, 1)
            negative_prompt_embeds = negative_prompt_embeds.view(batch_size * num_images_per_prompt, seq_len, -1)

        if self.text_encoder is not None:
            if isinstance(self, StableDiffusionLoraLoaderMixin) and USE_PEFT_BACKEND:
                # Retrieve the original scale by scaling back the LoRA layers
                unscale_lora_layers(self.text_encoder, lora_scale)

        return prompt_embeds, negative_prompt_embeds

    # Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.encode_image
    def encode_image(self, image, device, num_images_per_prompt, output_hidden_states=None):
        dtype = next(self.image_encoder.parameters()).dtype

        if not isinstance(image, torch.Tensor):
            image = self.feature_extractor(image, return_tensors="pt").pixel_values

        image = image.to(device=device, dtype=dtype)
        if output_hidden_states:
            image_enc_hidden_states = self.image_encoder(image, output_hidden_states=True).hidden_states[-2]
            image_enc_hidden_states = image_enc_hidden_states.repeat_interleave(num_images_per_prompt, dim=0)
            uncond_image_enc_hidden_states = self.image_encoder(
                torch.zeros_like(image), output_hidden_states=True
            ).hidden_states[-2]
            uncond_image_enc_hidden_states = uncond_image_enc_hidden_states.repeat_interleave(
                num_images_per_prompt, dim=0
            )
            return image_enc_hidden_states, uncond_image_enc_hidden_states
        else:
            image_embeds = self.image_encoder(image).image_embeds
            image_embeds = image_embeds.repeat_interleave(num_images_per_prompt, dim=0)
            uncond_image_embeds = torch.zeros_like(image_embeds)

            return image_embeds, uncond_image_embeds

    # Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.prepare_ip_adapter_image_embeds
    def prepare_ip_adapter_image_embeds(
        self, ip_adapter_image, ip_adapter_image_embeds, device, num_images_per_prompt, do_classifier_free_guidance
    ):
        image_embeds = []
        if do_classifier_free_guidance:
            negative_image_embeds = []
        if ip_adapter_image_embeds is None:
            if not isinstance(ip_adapter_image, list):
                ip_adapter_image = [ip_adapter_image]

            if len(ip_adapter_image) != len(self.unet.encoder_hid_proj.image_projection_layers):
                raise ValueError(
                    f"`ip_adapter_image` must have same length as the number of IP Adapters. Got {len(ip_adapter_image)} images and {len(self.unet.encoder_hid_proj.image_projection_layers)} IP Adapters."
                )

            for single_ip_adapter_image, image_proj_layer in zip(
                ip_adapter_image, self.unet.encoder_hid_proj.image_projection_layers
            ):
                output_hidden_state = not isinstance(image_proj_layer, ImageProjection)
                single_image_embeds, single_negative_image_embeds = self.encode_image(
                    single_ip_adapter_image, device, 1, output_hidden_state
                )

                image_embeds.append(single_image_embeds[None, :])
                if do_classifier_free_guidance:
                    negative_image_embeds.append(single_negative_image_embeds[None, :])
        else:
            for single_image_embeds in ip_adapter_image_embeds:
                if do_classifier_free_guidance:
                    single_negative_image_embeds, single_image_embeds = single_image_embeds.chunk(2)
                    negative_image_embeds.append(single_negative_image_embeds)
                image_embeds.append(single_image_embeds)

        ip_adapter_image_embeds = []
        for i, single_image_embeds in enumerate(image_embeds):
            single_image_embeds = torch.cat([single_image_embeds] * num_images_per_prompt, dim=0)
            if do_classifier_free_guidance:
                single_negative_image_embeds = torch.cat([negative_image_embeds[i]] * num_images_per_prompt, dim=0)
                single_image_embeds = torch.cat([single_negative_image_embeds, single_image_embeds], dim=0)

            single_image_embeds = single_image_embeds.to(device=device)
            ip_adapter_image_embeds.append(single_image_embeds)

        return ip_adapter_image_embeds

    # Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.run_safety_checker
    def run_safety_checker(self, image, device, dtype):
        if self.safety_checker is None:
            has_nsfw_concept = None
        else:
            if torch.is_tensor(image):
                feature_extractor_input = self.image_processor.postprocess(image, output_type="pil")
            else:
                feature_extractor_input = self.image_processor.numpy_to_pil(image)
            safety_checker_input = self.feature_extractor(feature_extractor_input, return_tensors="pt").to(device)
            image, has_nsfw_concept = self.safety_checker(
                images=image, clip_input=safety_checker_input.pixel_values.to(dtype)
            )
        return image, has_nsfw_concept

    # Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.prepare_extra_step_kwargs
    def prepare_extra_step_kwargs(self, generator, eta):
        # prepare extra kwargs for the scheduler step, since not all schedulers have the same signature
        # eta (η) is only used with the DDIMScheduler, it will be ignored for other schedulers.
        # eta corresponds to η in DDIM paper: https://huggingface.co/papers/2010.02502
        # and should be between [0, 1]

        accepts_eta = "eta" in set(inspect.signature(self.scheduler.step).parameters.keys())
        extra_step_kwargs = {}
        if accepts_eta:
            extra_step_kwargs["eta"] = eta

        # check if the scheduler accepts generator
        accepts_generator = "generator" in set(inspect.signature(self.scheduler.step).parameters.keys())
        if accepts_generator:
            extra_step_kwargs["generator"] = generator
        return extra_step_kwargs

    # Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.check_inputs
    def check_inputs(
        self,
        prompt,
        height,
        width,
        callback_steps,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
        callback_on_step_end_tensor_inputs=None,
    ):
        if height % 8 != 0 or width % 8 != 0:
            raise ValueError(f"`height` and `width` have to be divisible by 8 but are {height} and {width}.")

        if callback_steps is not None and (not isinstance(callback_steps, int) or callback_steps <= 0):
            raise ValueError(
                f"`callback_steps` has to be a positive integer but is {callback_steps} of type"
                f" {type(callback_steps)}."
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
        elif prompt is None and prompt_embeds is None:
            raise ValueError(
                "Provide either `prompt` or `prompt_embeds`. Cannot leave both `prompt` and `prompt_embeds` undefined."
            )
        elif prompt is not None and (not isinstance(prompt, str) and not isinstance(prompt, list)):
            raise ValueError(f"`prompt` has to be of type `str` or `list` but is {type(prompt)}")

        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError(
                f"Cannot forward both `negative_prompt`: {negative_prompt} and `negative_prompt_embeds`:"
                f" {negative_prompt_embeds}. Please make sure to only forward one of the two."
            )

        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    "`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly, but"
                    f" got: `prompt_embeds` {prompt_embeds.shape} != `negative_prompt_embeds`"
                    f" {negative_prompt_embeds.shape}."
                )

        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise ValueError(
                "Provide either `ip_adapter_image` or `ip_adapter_image_embeds`. Cannot leave both `ip_adapter_image` and `ip_adapter_image_embeds` defined."
            )

        if ip_adapter_image_embeds is not None:
            if not isinstance(ip_adapter_image_embeds, list):
                raise ValueError(
                    f"`ip_adapter_image_embeds` has to be of type `list` but is {type(ip_adapter_image_embeds)}"
                )
            elif ip_adapter_image_embeds[0].ndim not in [3, 4]:
                raise ValueError(
                    f"`ip_adapter_image_embeds` has to be a list of 3D or 4D tensors but is {ip_adapter_image_embeds[0].ndim}D"
                )

    # Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.prepare_latents
    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator, latents=None):
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

        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device)

        # scale the initial noise by the standard deviation required by the scheduler
        latents = latents * self.scheduler.init_noise_sigma
        return latents

    # Copied from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img.LatentConsistencyModelPipeline.get_guidance_scale_embedding
    def get_guidance_scale_embedding(
        self, w: torch.Tensor, embedding_dim: int = 512, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """
        See https://github.com/google-research/vdm/blob/dc27b98a554f65cdc654b800da5aa1846545d41b/model_vdm.py#L298

        Args:
            w (`torch.Tensor`):
                Generate embedding vectors with a specified guidance scale to subsequently enrich timestep embeddings.
            embedding_dim (`int`, *optional*, defaults to 512):
                Dimension of the embeddings to generate.
            dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
                Data type of the generated embeddings.

        Returns:
            `torch.Tensor`: Embedding vectors with shape `(len(w), embedding_dim)`.
        """
        assert len(w.shape) == 1
        w = w * 1000.0

        half_dim = embedding_dim // 2
        emb = torch.log(torch.tensor(10000.0)) / (half_dim - 1)
        emb = torch.exp(torch.arange(half_dim, dtype=dtype) * -emb)
        emb = w.to(dtype)[:, None] * emb[None, :]
        emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
        if embedding_dim % 2 == 1:  # zero pad
            emb = torch.nn.functional.pad(emb, (0, 1))
        assert emb.shape == (w.shape[0], embedding_dim)
        return emb

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

        lora_layers = _lora_layers(self.unet)
        if isinstance(rlg_scale, dict):
            if self.aligned_unet is not None:
                raise ValueError(
                    "A dict `rlg_scale` mixes LoRA adapters of `unet`; it cannot be used with `aligned_unet`."
                )
            if len(rlg_scale) == 0:
                raise ValueError("`rlg_scale` is an empty dict; give at least one `{adapter_name: scale}`.")
            if (rlg_start, rlg_stop) != (0.0, 1.0):
                raise ValueError(
                    "`rlg_start`/`rlg_stop` need a single aligned model; with a dict `rlg_scale` use per-adapter schedules."
                )
            loaded = _loaded_adapters(self.unet)
            unknown = [name for name in rlg_scale if name not in loaded]
            if unknown:
                raise ValueError(f"Unknown LoRA adapter(s) {unknown} in `rlg_scale`; loaded adapters: {loaded}.")
            if all(layer.disable_adapters for layer in lora_layers):
                # peft runs disabled adapters as the base model, whatever adapter a row selects
                raise ValueError("The LoRA adapters of `unet` are disabled; call `pipe.enable_lora()`.")
            for name, scale in rlg_scale.items():
                if not (_is_number(scale) or isinstance(scale, (list, tuple)) or callable(scale)):
                    raise ValueError(f"`rlg_scale['{name}']` must be a float or a schedule, but is {type(scale)}.")
        elif self.aligned_unet is None and not (_is_number(rlg_scale) and rlg_scale == 1):
            if not lora_layers:
                raise ValueError(
                    f"`rlg_scale={rlg_scale}` needs an aligned model, but the pipeline has no `aligned_unet` and no LoRA"
                    " adapter on `unet`. Load one with `pipe.load_lora_weights(...)` or pass `aligned_unet`."
                )
            if all(layer.disable_adapters for layer in lora_layers):
                raise ValueError(
                    "The LoRA adapters of `unet` are disabled, so there is no aligned model; call `pipe.enable_lora()`."
                )
            if not lora_layers[0].active_adapters:
                raise ValueError("No LoRA adapter of `unet` is active; activate one with `pipe.set_adapters(...)`.")

        if self.aligned_unet is None and not (_is_number(rlg_scale) and rlg_scale == 1):
            # the base model is needed: it comes from per-sample adapter selection (peft's mixed batch), in the
            # denoiser and in each text encoder with a LoRA, which needs unfused adapters
            models = {"unet": lora_layers}
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

    @staticmethod
    def _rlg_scale_at(scale, step: int) -> float:
        if callable(scale):
            return float(scale(step))
        if isinstance(scale, (list, tuple)):
            return float(scale[step])
        return float(scale)

    def _check_rlg_schedule_length(self, rlg_scale, num_steps: int):
        schedules = rlg_scale.items() if isinstance(rlg_scale, dict) else [(None, rlg_scale)]
        for name, scale in schedules:
            if isinstance(scale, (list, tuple)) and len(scale) != num_steps:
                where = "`rlg_scale`" if name is None else f"`rlg_scale['{name}']`"
                raise ValueError(f"{where} has {len(scale)} values, but the sampler runs {num_steps} steps.")

    def _prepare_rlg_models(self, rlg_scale) -> Dict[str, _RLGModel]:
        r"""The denoisers RLG combines this call, by name: `"base"` and `"aligned"`, or `"base"` and one per adapter."""
        if self.aligned_unet is not None:
            return {"base": _RLGModel("base", "unet", None), "aligned": _RLGModel("aligned", "aligned_unet", None)}
        lora_layers = _lora_layers(self.unet)
        if not lora_layers:
            # only reached with a constant `rlg_scale == 1` (see `check_rlg_inputs`): plain sampling with `unet`
            return {"aligned": _RLGModel("aligned", "unet", None)}
        base = _RLGModel("base", "unet", BASE_ADAPTER_NAME)
        if isinstance(rlg_scale, dict):
            return {"base": base, **{name: _RLGModel(name, "unet", name) for name in rlg_scale}}
        active = list(lora_layers[0].active_adapters)
        # several adapters active at once form one aligned model that a per-row adapter cannot express, nor can a
        # DoRA adapter be selected per row: the aligned model then runs in its own forward pass, exactly as configured
        per_row = len(active) == 1 and not _uses_dora(lora_layers, active[0])
        aligned = _RLGModel("aligned", "unet", active[0] if per_row else None)
        return {"base": base, "aligned": aligned}

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

    def _rlg_terms(self) -> Dict[str, float]:
        r"""`{model: w}` for this step's combination `pred_base + sum_i w_i (pred_i - pred_base)`; `{}` is the base alone."""
        scales = self.rlg_scale if isinstance(self.rlg_scale, dict) else {"aligned": self.rlg_scale}
        return {name: w for name, w in scales.items() if w != 0}

    def _rlg_forward(
        self,
        models: List[_RLGModel],
        latent_model_input: torch.Tensor,
        t,
        conditioning: Dict[str, tuple],
        timestep_cond: Optional[torch.Tensor],
        single_pass: bool,
    ) -> Dict[str, torch.Tensor]:
        r"""
        Runs the denoisers `models` on `latent_model_input` and returns each one's raw prediction (CFG rows included).

        With `single_pass`, all the LoRA variants of `unet` (base rows with `"__base__"`, aligned rows with their
        adapter) go through one batched forward; otherwise each model gets its own forward pass.
        `conditioning[name]` is `(encoder_hidden_states, added_cond_kwargs)`.
        """
        if single_pass:
            batched = [model for model in models if model.adapter is not None]
            groups = ([batched] if batched else []) + [[model] for model in models if model.adapter is None]
        else:
            groups = [[model] for model in models]

        num_rows = latent_model_input.shape[0]
        predictions = {}
        for group in groups:
            unet = getattr(self, group[0].unet_name)
            if len(group) == 1 and (group[0].adapter is None or [group[0].adapter] == self._rlg_active_adapters):
                adapter_rows = None  # the model exactly as configured
            elif len(group) == 1:
                adapter_rows = group[0].adapter
            else:
                adapter_rows = [model.adapter for model in group for _ in range(num_rows)]
            with _lora_adapter_rows(unet, adapter_rows):
                noise_pred = unet(
                    torch.cat([latent_model_input] * len(group)),
                    t,
                    encoder_hidden_states=torch.cat([conditioning[model.name][0] for model in group]),
                    timestep_cond=None if timestep_cond is None else torch.cat([timestep_cond] * len(group)),
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    added_cond_kwargs=_cat_added_cond_kwargs([conditioning[model.name][1] for model in group]),
                    return_dict=False,
                )[0]
            predictions.update(zip([model.name for model in group], noise_pred.chunk(len(group))))
        return predictions

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def guidance_rescale(self):
        return self._guidance_rescale

    @property
    def clip_skip(self):
        return self._clip_skip

    # here `guidance_scale` is defined analog to the guidance weight `w` of equation (2)
    # of the Imagen paper: https://huggingface.co/papers/2205.11487 . `guidance_scale = 1`
    # corresponds to doing no classifier free guidance.
    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    @property
    def rlg_scale(self):
        r"""The RLG scale of the current step: a float, or `{adapter_name: float}` when mixing adapters."""
        return self._rlg_scale

    @property
    def do_rlg(self):
        r"""Whether the current step mixes the base model in (inside the `rlg_start`/`rlg_stop` window and
        `rlg_scale != 1`); otherwise the aligned model runs alone, with the cost of plain CFG."""
        return self._rlg_in_window and (isinstance(self._rlg_scale, dict) or self._rlg_scale != 1)

    @property
    def cross_attention_kwargs(self):
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: Union[str, List[str]] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        timesteps: List[int] = None,
        sigmas: List[float] = None,
        guidance_scale: float = 7.5,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        num_images_per_prompt: Optional[int] = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        ip_adapter_image: Optional[PipelineImageInput] = None,
        ip_adapter_image_embeds: Optional[List[torch.Tensor]] = None,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        guidance_rescale: float = 0.0,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[
            Union[Callable[[int, int, Dict], None], PipelineCallback, MultiPipelineCallbacks]
        ] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
        rlg_scale: Union[RLGScale, Dict[str, RLGScale]] = 1.0,
        rlg_start: float = 0.0,
        rlg_stop: float = 1.0,
        rlg_single_pass: bool = True,
        **kwargs,
    ):
        r"""
        The call function to the pipeline for generation.

        Args:
            prompt (`str` or `List[str]`, *optional*):
                The prompt or prompts to guide image generation. If not defined, you need to pass `prompt_embeds`.
            height (`int`, *optional*, defaults to `self.unet.config.sample_size * self.vae_scale_factor`):
                The height in pixels of the generated image.
            width (`int`, *optional*, defaults to `self.unet.config.sample_size * self.vae_scale_factor`):
                The width in pixels of the generated image.
            num_inference_steps (`int`, *optional*, defaults to 50):
                The number of denoising steps. More denoising steps usually lead to a higher quality image at the
                expense of slower inference.
            timesteps (`List[int]`, *optional*):
                Custom timesteps to use for the denoising process with schedulers which support a `timesteps` argument
                in their `set_timesteps` method. If not defined, the default behavior when `num_inference_steps` is
                passed will be used. Must be in descending order.
            sigmas (`List[float]`, *optional*):
                Custom sigmas to use for the denoising process with schedulers which support a `sigmas` argument in
                their `set_timesteps` method. If not defined, the default behavior when `num_inference_steps` is passed
                will be used.
            guidance_scale (`float`, *optional*, defaults to 7.5):
                A higher guidance scale value encourages the model to generate images closely linked to the text
                `prompt` at the expense of lower image quality. Guidance scale is enabled when `guidance_scale > 1`.
                Classifier-free guidance is applied inside the base and the aligned model, before RLG mixes them.
            negative_prompt (`str` or `List[str]`, *optional*):
                The prompt or prompts to guide what to not include in image generation. If not defined, you need to
                pass `negative_prompt_embeds` instead. Ignored when not using guidance (`guidance_scale < 1`).
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                The number of images to generate per prompt.
            eta (`float`, *optional*, defaults to 0.0):
                Corresponds to parameter eta (η) from the [DDIM](https://huggingface.co/papers/2010.02502) paper. Only
                applies to the [`~schedulers.DDIMScheduler`], and is ignored in other schedulers.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*):
                A [`torch.Generator`](https://pytorch.org/docs/stable/generated/torch.Generator.html) to make
                generation deterministic.
            latents (`torch.Tensor`, *optional*):
                Pre-generated noisy latents sampled from a Gaussian distribution, to be used as inputs for image
                generation. Can be used to tweak the same generation with different prompts. If not provided, a latents
                tensor is generated by sampling using the supplied random `generator`.
            prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated text embeddings. Can be used to easily tweak text inputs (prompt weighting). If not
                provided, text embeddings are generated from the `prompt` input argument.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated negative text embeddings. Can be used to easily tweak text inputs (prompt weighting). If
                not provided, `negative_prompt_embeds` are generated from the `negative_prompt` input argument.
            ip_adapter_image: (`PipelineImageInput`, *optional*): Optional image input to work with IP Adapters.
            ip_adapter_image_embeds (`List[torch.Tensor]`, *optional*):
                Pre-generated image embeddings for IP-Adapter. It should be a list of length same as number of
                IP-adapters. Each element should be a tensor of shape `(batch_size, num_images, emb_dim)`. It should
                contain the negative image embedding if `do_classifier_free_guidance` is set to `True`. If not
                provided, embeddings are computed from the `ip_adapter_image` input argument.
            output_type (`str`, *optional*, defaults to `"pil"`):
                The output format of the generated image. Choose between `PIL.Image`, `np.array`, `pt` or `latent`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether or not to return a [`~pipelines.stable_diffusion.StableDiffusionPipelineOutput`] instead of a
                plain tuple.
            cross_attention_kwargs (`dict`, *optional*):
                A kwargs dictionary that if specified is passed along to the [`AttentionProcessor`] as defined in
                [`self.processor`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/attention_processor.py).
            guidance_rescale (`float`, *optional*, defaults to 0.0):
                Guidance rescale factor from [Common Diffusion Noise Schedules and Sample Steps are
                Flawed](https://huggingface.co/papers/2305.08891). Guidance rescale factor should fix overexposure when
                using zero terminal SNR. Applied to each model's guided prediction before the RLG combination, so that
                `rlg_scale=0` and `rlg_scale=1` reproduce Stable Diffusion on the base and on the aligned model.
            clip_skip (`int`, *optional*):
                Number of layers to be skipped from CLIP while computing the prompt embeddings. A value of 1 means that
                the output of the pre-final layer will be used for computing the prompt embeddings.
            callback_on_step_end (`Callable`, `PipelineCallback`, `MultiPipelineCallbacks`, *optional*):
                A function or a subclass of `PipelineCallback` or `MultiPipelineCallbacks` that is called at the end of
                each denoising step during the inference. with the following arguments: `callback_on_step_end(self:
                DiffusionPipeline, step: int, timestep: int, callback_kwargs: Dict)`. `callback_kwargs` will include a
                list of all tensors as specified by `callback_on_step_end_tensor_inputs`. With a constant float
                `rlg_scale`, a callback may change `pipeline._rlg_scale` for the following steps.
            callback_on_step_end_tensor_inputs (`List`, *optional*):
                The list of tensor inputs for the `callback_on_step_end` function. The tensors specified in the list
                will be passed as `callback_kwargs` argument. You will only be able to include variables listed in the
                `._callback_tensor_inputs` attribute of your pipeline class.
            rlg_scale (`float`, `List[float]`, `Callable[[int], float]` or `Dict[str, ...]`, *optional*, defaults to 1.0):
                Reinforcement Learning Guidance scale `w` in `pred = pred_base + w * (pred_aligned - pred_base)`:
                `0` is the base model, `1` the aligned model, `0 < w < 1` interpolates, `w > 1` extrapolates. A list
                (one value per denoising step) or a callable of the step index gives a per-step schedule. A dict
                `{adapter_name: w_i}` mixes several LoRA adapters of `unet`, `pred_base + sum_i w_i (pred_i -
                pred_base)`, each `w_i` again a float or a schedule.
            rlg_start (`float`, *optional*, defaults to 0.0):
                Fraction of the denoising steps after which RLG starts. Outside [`rlg_start`, `rlg_stop`) the aligned
                model runs alone, at the cost of plain CFG.
            rlg_stop (`float`, *optional*, defaults to 1.0):
                Fraction of the denoising steps at which RLG stops.
            rlg_single_pass (`bool`, *optional*, defaults to `True`):
                With a LoRA aligned model, compute the base and aligned predictions (CFG rows included) in one batched
                UNet forward (per-row adapter selection). `False` runs one forward per model, like the reference
                implementation; the results are the same up to float rounding.

        Examples:

        Returns:
            [`~pipelines.stable_diffusion.StableDiffusionPipelineOutput`] or `tuple`:
                If `return_dict` is `True`, [`~pipelines.stable_diffusion.StableDiffusionPipelineOutput`] is returned,
                otherwise a `tuple` is returned where the first element is a list with the generated images and the
                second element is a list of `bool`s indicating whether the corresponding generated image contains
                "not-safe-for-work" (nsfw) content.
        """

        callback = kwargs.pop("callback", None)
        callback_steps = kwargs.pop("callback_steps", None)

        if callback is not None:
            deprecate(
                "callback",
                "1.0.0",
                "Passing `callback` as an input argument to `__call__` is deprecated, consider using `callback_on_step_end`",
            )
        if callback_steps is not None:
            deprecate(
                "callback_steps",
                "1.0.0",
                "Passing `callback_steps` as an input argument to `__call__` is deprecated, consider using `callback_on_step_end`",
            )

        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height and width to unet
        if not height or not width:
            height = (
                self.unet.config.sample_size
                if self._is_unet_config_sample_size_int
                else self.unet.config.sample_size[0]
            )
            width = (
                self.unet.config.sample_size
                if self._is_unet_config_sample_size_int
                else self.unet.config.sample_size[1]
            )
            height, width = height * self.vae_scale_factor, width * self.vae_scale_factor
        # to deal with lora scaling and other possible forward hooks

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            height,
            width,
            callback_steps,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            ip_adapter_image,
            ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs,
        )
        self.check_rlg_inputs(rlg_scale, rlg_start, rlg_stop, prompt_embeds)

        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        is_constant = _is_number(rlg_scale)
        self._rlg_schedule = None if is_constant else rlg_scale
        self._rlg_scale = float(rlg_scale) if is_constant else None
        self._rlg_in_window = True
        rlg_models = self._prepare_rlg_models(rlg_scale)
        lora_layers = _lora_layers(self.unet)
        self._rlg_active_adapters = list(lora_layers[0].active_adapters) if lora_layers else []

        # 2. Define call parameters
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]

        device = self._execution_device

        # 3. Encode input prompt
        lora_scale = (
            self.cross_attention_kwargs.get("scale", None) if self.cross_attention_kwargs is not None else None
        )

        # A LoRA adapter may also change the text encoder: each LoRA variant of `unet` then gets the prompt encoded
        # with the same adapter (or none, for the base model), when a step first needs it. `encoded` is keyed by the
        # text encoder's adapter; `None` runs it as configured, as diffusers does (the aligned model's prompt).
        text_encoder_has_lora = (
            prompt_embeds is None and self.aligned_unet is None and len(_lora_layers(self.text_encoder)) > 0
        )

        given_embeds = (prompt_embeds, negative_prompt_embeds)

        def encode(adapter):
            with _lora_adapter_rows(self.text_encoder, adapter):
                return self.encode_prompt(
                    prompt,
                    device,
                    num_images_per_prompt,
                    self.do_classifier_free_guidance,
                    negative_prompt,
                    prompt_embeds=given_embeds[0],
                    negative_prompt_embeds=given_embeds[1],
                    lora_scale=lora_scale,
                    clip_skip=self.clip_skip,
                )

        def text_encoder_adapter(model):
            return self._rlg_text_encoder_adapter(model) if text_encoder_has_lora else None

        encoded = {None: encode(None)}
        prompt_embeds, negative_prompt_embeds = encoded[None]

        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image,
                ip_adapter_image_embeds,
                device,
                batch_size * num_images_per_prompt,
                self.do_classifier_free_guidance,
            )

        # 4. Prepare timesteps
        timestep_device = device
        if XLA_AVAILABLE:
            timestep_device = "cpu"
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, timestep_device, timesteps, sigmas
        )
        self._check_rlg_schedule_length(rlg_scale, len(timesteps))

        # 5. Prepare latent variables
        num_channels_latents = self.unet.config.in_channels
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

        # 6. Prepare extra step kwargs. TODO: Logic should ideally just be moved out of the pipeline
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 6.1 Add image embeds for IP-Adapter
        added_cond_kwargs = (
            {"image_embeds": image_embeds}
            if (ip_adapter_image is not None or ip_adapter_image_embeds is not None)
            else None
        )

        # 6.2 Optionally get Guidance Scale Embedding
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(batch_size * num_images_per_prompt)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        # 6.3 Conditioning of each model: for classifier free guidance, the unconditional and text embeddings are
        # concatenated into a single batch, as in Stable Diffusion
        def model_conditioning(embeds):
            positive, negative = embeds
            return (
                torch.cat([negative, positive]) if self.do_classifier_free_guidance else positive,
                added_cond_kwargs,
            )

        conditioning = {}  # by model name, filled when a step first needs the model
        callback_embeds = None  # embeddings set by `callback_on_step_end`, shared by every model

        def conditioning_of(model):
            if model.name not in conditioning:
                if callback_embeds is not None:
                    embeds = callback_embeds
                else:
                    adapter = text_encoder_adapter(model)
                    if adapter not in encoded:
                        encoded[adapter] = encode(adapter)
                    embeds = encoded[adapter]
                conditioning[model.name] = model_conditioning(embeds)
            return conditioning[model.name]

        # 6.4 RLG window, in steps
        rlg_start_step, rlg_stop_step = int(rlg_start * len(timesteps)), int(rlg_stop * len(timesteps))

        # 7. Denoising loop
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
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

                # expand the latents if we are doing classifier free guidance
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                if hasattr(self.scheduler, "scale_model_input"):
                    latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

                # predict the noise residual of every model, in one batched forward where possible
                step_conditioning = {model.name: conditioning_of(model) for model in step_models}
                noise_preds = self._rlg_forward(
                    step_models, latent_model_input, t, step_conditioning, timestep_cond, rlg_single_pass
                )

                # perform guidance inside each model
                for name, noise_pred in noise_preds.items():
                    if self.do_classifier_free_guidance:
                        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                        noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)

                    if self.do_classifier_free_guidance and self.guidance_rescale > 0.0:
                        # Based on 3.4. in https://huggingface.co/papers/2305.08891
                        noise_pred = rescale_noise_cfg(
                            noise_pred, noise_pred_text, guidance_rescale=self.guidance_rescale
                        )
                    noise_preds[name] = noise_pred

                # perform reinforcement learning guidance: pred_base + sum_i w_i (pred_i - pred_base)
                if self.do_rlg:
                    terms = [(noise_preds[name], w) for name, w in rlg_terms.items()]
                    noise_pred = rlg_mix(noise_preds["base"], terms)
                else:
                    noise_pred = noise_preds["aligned"]

                # compute the previous noisy sample x_t -> x_t-1
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)

                    latents = callback_outputs.pop("latents", latents)
                    new_prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    new_negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                    if (
                        new_prompt_embeds is not prompt_embeds
                        or new_negative_prompt_embeds is not negative_prompt_embeds
                    ):
                        # embeddings set by the callback condition every model from the next step on
                        prompt_embeds, negative_prompt_embeds = new_prompt_embeds, new_negative_prompt_embeds
                        callback_embeds = (prompt_embeds, negative_prompt_embeds)
                        conditioning = {}

                # call the callback, if provided
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
                    if callback is not None and i % callback_steps == 0:
                        step_idx = i // getattr(self.scheduler, "order", 1)
                        callback(step_idx, t, latents)

                if XLA_AVAILABLE:
                    xm.mark_step()

        if not output_type == "latent":
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[
                0
            ]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
        else:
            image = latents
            has_nsfw_concept = None

        if has_nsfw_concept is None:
            do_denormalize = [True] * image.shape[0]
        else:
            do_denormalize = [not has_nsfw for has_nsfw in has_nsfw_concept]
        if XLA_AVAILABLE:
            xm.mark_step()
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image, has_nsfw_concept)

        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)
