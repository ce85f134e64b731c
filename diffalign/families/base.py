"""`ModelFamily`: everything model-specific that rollouts and trainers need, for one diffusers pipeline class."""

import os
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import ModelError
from ..utils.peft_utils import LORA_WEIGHT_NAME, unwrap
from ..utils.torch_utils import dtype_kwarg

Conditioning = Dict[str, torch.Tensor]  # per-row conditioning tensors (batch first), the denoiser's keyword inputs


class ModelFamily:
    """Wraps a loaded pipeline of one model family and speaks for it to the rollout and the trainers.

    A family owns: loading the pipeline (`load`), encoding prompts into a conditioning mapping (cached per prompt),
    preparing latents and timesteps, the denoiser call with classifier-free guidance (`predict`), decoding, its
    default LoRA target modules and writing a LoRA in its diffusers format. Subclasses set the class attributes and
    implement `encode_text`, `forward` and `lora_layers_kwarg`.

    Args:
        pipe (`DiffusionPipeline`): a pipeline of `pipeline_class`.
    """

    name = "base"
    pipeline_class = None  # diffusers class name, as written in model_index.json
    denoiser_name = "unet"  # the pipeline attribute holding the trained network
    kernel_class = None  # a `diffalign.kernels.TransitionKernel` subclass
    text_encoder_names: Tuple[str, ...] = ("text_encoder",)
    default_lora_target_modules: List[str] = ["to_q", "to_k", "to_v", "to_out.0"]
    load_kwargs: dict = {}  # extra `from_pretrained` arguments (e.g. no safety checker)

    def __init__(self, pipe, max_cache: int = 4096):
        self.pipe = pipe
        self.max_cache = max_cache
        self._cache: Dict[str, Conditioning] = {}

    # -------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str, torch_dtype: torch.dtype = torch.float32):
        """`pipeline_class.from_pretrained(path)` with safetensors weights only and the kernel's scheduler."""
        import diffusers

        pipeline_cls = getattr(diffusers, cls.pipeline_class)
        try:
            pipe = pipeline_cls.from_pretrained(path, use_safetensors=True, **dtype_kwarg(torch_dtype),
                                                **cls.load_kwargs)
        except (OSError, EnvironmentError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"model '{path}' could not be loaded with safetensors weights only: {first[:300]}") from None
        cls.set_kernel_scheduler(pipe)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def set_kernel_scheduler(cls, pipe):
        """Swaps in the scheduler the kernel needs (keeping the model's noise schedule) if it differs."""
        import diffusers

        wanted = cls.kernel_class.scheduler_class
        if type(pipe.scheduler).__name__ != wanted:
            pipe.scheduler = getattr(diffusers, wanted).from_config(pipe.scheduler.config)

    # ----------------------------------------------------------------- components
    @property
    def denoiser(self):
        return getattr(self.pipe, self.denoiser_name)

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def device(self) -> torch.device:
        return self.pipe.vae.device

    def frozen_modules(self) -> list:
        """The modules that are never trained: the VAE and every text encoder present."""
        modules = [self.pipe.vae]
        modules += [getattr(self.pipe, n) for n in self.text_encoder_names if getattr(self.pipe, n, None) is not None]
        return modules

    def configure(self, config):
        """Takes the run's model settings: `sample_max_sequence_length` (T5 tokens) for families with a T5."""
        tokens = getattr(config, "sample_max_sequence_length", None)
        if tokens is not None and hasattr(self, "max_sequence_length"):
            self.max_sequence_length = tokens
            self._cache.clear()

    def make_kernel(self, config):
        return self.kernel_class.from_config(config)

    # -------------------------------------------------------------------- prompts
    def encode_text(self, prompts: List[str], device) -> Conditioning:
        """Per-prompt conditioning tensors (batch first) of `prompts`, with the pipeline's own `encode_prompt`."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_prompts(self, prompts: List[str]) -> Conditioning:
        """`encode_text` of each distinct prompt once; a cache shared across epochs."""
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            encoded = self.encode_text(missing, self.device)
            if len(self._cache) + len(missing) > self.max_cache:
                self._cache.clear()
            for i, prompt in enumerate(missing):
                self._cache[prompt] = {k: v[i] for k, v in encoded.items()}
        keys = self._cache[prompts[0]].keys()
        return {k: torch.stack([self._cache[p][k] for p in prompts]) for k in keys}

    def negative_conditioning(self, negative_prompt: str, batch_size: int) -> Conditioning:
        return self.encode_prompts([negative_prompt] * batch_size)

    def conditioning(self, prompts: List[str], negative_prompt: str, do_cfg: bool, height: int, width: int):
        """`(conditioning, negative_conditioning or None)` for a batch of prompts at a resolution."""
        cond = self.add_resolution(self.encode_prompts(prompts), height, width)
        negative = None
        if do_cfg:
            negative = self.add_resolution(self.negative_conditioning(negative_prompt, len(prompts)), height, width)
        return cond, negative

    def add_resolution(self, cond: Conditioning, height: int, width: int) -> Conditioning:
        """Adds resolution-dependent inputs (SDXL's time ids); none by default."""
        return cond

    # ----------------------------------------------------------- latents and time
    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    def default_resolution(self) -> int:
        return unwrap(self.denoiser).config.sample_size * self.vae_scale_factor

    def resolution_multiple(self) -> int:
        """Image sides must be multiples of this."""
        num_down = len(unwrap(self.denoiser).config.down_block_types) - 1
        return self.vae_scale_factor * 2**num_down

    def check_resolution(self, resolution: int):
        multiple = self.resolution_multiple()
        if resolution < 1 or resolution % multiple:
            raise ModelError(
                f"resolution {resolution} is not a multiple of {multiple} (or not positive) for this {self.name} model; try "
                f"{max(multiple, round(resolution / multiple) * multiple)}"
            )

    def latent_channels(self, denoiser=None) -> int:
        return unwrap(denoiser if denoiser is not None else self.denoiser).config.in_channels

    def prepare_latents(self, batch_size, height, width, dtype, device, generator, latents=None, denoiser=None):
        return self.pipe.prepare_latents(batch_size, self.latent_channels(denoiser), height, width, dtype, device,
                                         generator, latents)

    def set_timesteps(self, num_inference_steps: int, device, height: int, width: int) -> torch.Tensor:
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        return self.scheduler.timesteps

    # ------------------------------------------------------------------ denoising
    def forward(self, denoiser, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The raw denoiser output for a batch of rows, one timestep per row."""
        raise NotImplementedError

    def predict(self, denoiser, latents, timesteps, cond: Conditioning, negative: Optional[Conditioning],
                guidance_scale: float) -> torch.Tensor:
        """Classifier-free guided prediction `u + g (c - u)`, both halves in one batched forward.

        With `negative=None` the conditional prediction alone is returned (no CFG). Unlike diffusers' pipelines, a
        guidance scale below 1 is honoured (it mixes towards the unconditional model), which gives reward
        fine-tuning headroom on small models.
        """
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        if negative is None:
            return self.forward(denoiser, latents, timesteps, cond)
        both = {k: torch.cat([negative[k], cond[k]]) for k in cond}
        uncond, text = self.forward(
            denoiser, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both
        ).chunk(2)
        return uncond + guidance_scale * (text - uncond)

    # ------------------------------------------------------------------- decoding
    def decode(self, latents: torch.Tensor, height: Optional[int] = None, width: Optional[int] = None) -> torch.Tensor:
        """VAE decode to images in [0, 1], `(B, 3, H, W)` float32 (`height`, `width`: the image size, for families
        whose latents do not show it)."""
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            latents = latents + vae.config.shift_factor
        images = vae.decode(latents.to(vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ----------------------------------------------------------------------- LoRA
    def lora_state_dict(self, denoiser) -> dict:
        """The denoiser's LoRA weights in this family's diffusers key format."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))

    def lora_layers_kwarg(self) -> str:
        """`save_lora_weights`' argument name for the denoiser's layers."""
        return f"{self.denoiser_name}_lora_layers"

    def save_lora(self, denoiser, directory: str):
        """Writes `pytorch_lora_weights.safetensors` so `<pipeline_class>.load_lora_weights(directory)` loads it, with
        the adapter's peft config as metadata (as diffusers' LoRA training scripts do): without it diffusers loads a
        LoRA with `lora_alpha = r`, and one trained with another alpha would load at the wrong scale."""
        import diffusers

        model = unwrap(denoiser)
        (adapter,) = model.peft_config  # the one trained adapter
        # peft keeps target_modules as a set, whose order changes with the process's hash seed: sorted, the
        # metadata of two identical runs is identical too
        metadata = {key: sorted(value) if isinstance(value, set) else value
                    for key, value in model.peft_config[adapter].to_dict().items()}
        os.makedirs(directory, exist_ok=True)
        getattr(diffusers, self.pipeline_class).save_lora_weights(
            directory, **{self.lora_layers_kwarg(): self.lora_state_dict(model),
                          f"{self.denoiser_name}_lora_adapter_metadata": metadata},
            safe_serialization=True, weight_name=LORA_WEIGHT_NAME,
        )
