"""`ModelFamily`: every fact about one diffusers pipeline class that diffalign needs: for rollouts and trainers
(loading, conditioning, latents, the denoiser call, decoding, LoRA) and for the rest of the package (its RLG pipeline,
modular blocks, Hub tags, guidance kind, pipeline arguments and tiny test components)."""

import contextlib
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..errors import ModelError, first_line
from ..utils.peft_utils import LORA_WEIGHT_NAME, active_adapter, unwrap
from ..utils.torch_utils import dtype_kwarg

Conditioning = Dict[str, torch.Tensor]  # per-row conditioning tensors (batch first), the denoiser's keyword inputs

# How a family's pipeline takes guidance (`ModelFamily.guidance_kind`):
# - "cfg": `guidance_scale` is classifier-free guidance (SD, SDXL, SD3);
# - "embedded": `guidance_scale` is an input of a guidance-distilled denoiser, CFG is the optional `true_cfg_scale`
#   with a negative prompt (FLUX.1);
# - "true_cfg": CFG is `true_cfg_scale` with a negative prompt, there is no embedded guidance (Qwen-Image).
GUIDANCE_KINDS = ("cfg", "embedded", "true_cfg")

# The class attributes every family must set (not None or empty), beyond the methods it implements; see
# `missing_facts`.
REQUIRED_FACTS = ("name", "pipeline_class", "denoiser_name", "denoiser_class", "kernel_class", "text_encoder_names",
                  "default_lora_target_modules", "hub_tags", "default_guidance_scale")
# Facts each family states itself, because no default is right for every model (None or {} are values: no RLG
# pipeline, no modular blocks in diffusers, no safety checker to switch off).
DECLARED_FACTS = ("guidance_kind", "pipeline_init_kwargs", "rlg_pipeline_class", "modular_blocks_class")
# Methods each family implements (the base class's raise NotImplementedError).
REQUIRED_METHODS = ("encode_text", "forward", "tiny_components")


class ModelFamily:
    """Wraps a loaded pipeline of one model family and speaks for it to the rollout and the trainers.

    A family owns: loading the pipeline (`load`), encoding prompts into a conditioning mapping (cached per prompt),
    preparing latents and timesteps, the denoiser call with classifier-free guidance (`predict`), decoding, its
    default LoRA target modules and writing a LoRA in its diffusers format; and, for `generate`, `bench`, the model
    card and the tests: its RLG pipeline, modular blocks, Hub tags, guidance kind and default scale, the pipeline
    arguments that switch off safety checkers and watermarkers, and tiny random components (`tiny_components`).
    Subclasses set the class attributes (`REQUIRED_FACTS`, `DECLARED_FACTS`) and implement `encode_text`, `forward`
    and `tiny_components`; `missing_facts` lists what a subclass lacks, and the registry refuses such a family.

    Args:
        pipe (`DiffusionPipeline`): a pipeline of `pipeline_class`.
    """

    name = None  # short name (`save_tiny_pipeline("sdxl", ...)`, bench settings)
    pipeline_class = None  # diffusers class name, as written in model_index.json
    denoiser_name = "unet"  # the pipeline attribute holding the trained network
    denoiser_class = None  # its diffusers class name (loads a fully fine-tuned denoiser)
    kernel_class = None  # a `diffalign.kernels.TransitionKernel` subclass
    text_encoder_names: Tuple[str, ...] = ("text_encoder",)
    default_lora_target_modules: List[str] = ["to_q", "to_k", "to_v", "to_out.0"]
    # the pipeline's `__init__` / `from_pretrained` arguments that switch off a safety checker or watermarker
    pipeline_init_kwargs: Dict[str, Any] = {}
    # the RLG pipeline: a class name in `diffalign.pipelines`, or None (no RLG pipeline: `generate` runs the RLG
    # guider in the modular pipeline, `rlg_pipeline`, or refuses a model without one)
    rlg_pipeline_class: Optional[str] = None
    # the RLG pipeline of a fully fine-tuned aligned denoiser where `rlg_pipeline_class` is None (the modular route
    # switches LoRA adapters and takes no second model): Wan's `WanRLGPipeline`; None refuses `--aligned-denoiser`
    full_fine_tune_rlg_pipeline_class: Optional[str] = None
    # the blocks class in `diffusers.modular_pipelines` (None where diffusers has none); it runs the RLG guider when
    # its blocks take a `guider` component
    modular_blocks_class: Optional[str] = None
    hub_tags: Tuple[str, ...] = ()  # the Hub's tags for the model (the model card's front matter)
    guidance_kind: str = "cfg"  # one of GUIDANCE_KINDS
    default_guidance_scale: float = 5.0  # the pipeline's `guidance_scale` in `diffalign generate` when none is given
    embedded_guidance: Optional[float] = None  # the rollouts' embedded guidance (guidance_kind "embedded")
    # named settings of `tiny_components`, each a real configuration of the model the family tester runs too
    tiny_variants: Dict[str, Dict[str, Any]] = {}
    # settings with which the tests sample the tiny models where the pipeline's default is too large for a CPU (Wan:
    # 5 frames, not 81): `configure` keys, run config keys and pipeline call arguments of the same names
    tiny_settings: Dict[str, Any] = {}
    # condition images a prompt may carry (`diffalign.prompts.ConditionedPrompt`): 0 for text-to-image models; an
    # editing model (FLUX.1 Kontext) encodes them into its conditioning
    max_condition_images: int = 0
    # True where the pipeline cannot sample without a condition image (Qwen-Image-Edit); Kontext samples text-to-image
    requires_condition_image: bool = False
    # True where a prompt may carry a last frame (`last_image`: Wan image-to-video's FLF2V models); refused elsewhere
    takes_last_image: bool = False
    # True where a row's sampling depends on the batch's text padding in `pipeline_class` (QwenImage 2.1: the image's
    # rotary position follows the padded text): the family samples each prompt as the pipeline does alone
    samples_prompts_alone: bool = False
    # condition videos a prompt may carry (a prompt file's `video` / `videos`): 0 but for a video-to-video model (Wan's
    # `WanVideoToVideoPipeline`: 1), which starts its rollouts from the video; more are refused when a run starts
    max_condition_videos: int = 0
    # True where the pipeline cannot sample without a condition video (video-to-video)
    requires_condition_video: bool = False
    # what `decode` returns: "image", `(B, 3, H, W)`; "video", `(B, F, 3, H, W)` (frames first), float32 in [0, 1]
    output_kind: str = "image"

    @classmethod
    def missing_facts(cls) -> List[str]:
        """The facts and methods this family lacks (empty when it declares all): a required attribute that is None
        or empty, one of `DECLARED_FACTS` not declared by the family itself (inherited from `ModelFamily`), an
        unknown guidance kind, a required method (`REQUIRED_METHODS`) not implemented."""
        missing = [fact for fact in REQUIRED_FACTS if getattr(cls, fact, None) in (None, (), [])]
        if getattr(cls, "guidance_kind", None) not in GUIDANCE_KINDS:
            missing.append(f"guidance_kind (one of {', '.join(GUIDANCE_KINDS)})")
        missing += [fact for fact in DECLARED_FACTS if cls._owner(fact) in (None, ModelFamily)]
        missing += [f"{method}()" for method in REQUIRED_METHODS if cls._owner(method) is ModelFamily]
        return missing

    @classmethod
    def _owner(cls, attribute: str):
        """The class of the MRO that defines `attribute` (None: none does)."""
        return next((klass for klass in cls.__mro__ if attribute in vars(klass)), None)

    def __init__(self, pipe, max_cache: int = 4096):
        self.pipe = pipe
        self.max_cache = max_cache
        self._cache: Dict[str, Conditioning] = {}
        # the text prompts each `encode_text` call of the cache encoded together, since it was last cleared (None once
        # a prompt with condition images is encoded): `replay_encodings` rebuilds the cache bit for bit from them
        self._encoded_batches: Optional[List[List[str]]] = []
        # True: the text encoders wait on the CPU and come to the VAE's device only to encode uncached prompts
        self.offload_text_encoders = False

    # -------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str, torch_dtype: torch.dtype = torch.float32, quantization_config=None):
        """`pipeline_class.from_pretrained(path)` with safetensors weights only and the kernel's scheduler
        (`quantization_config`: diffusers' `PipelineQuantizationConfig`, `diffalign.quantization`)."""
        import diffusers

        pipeline_cls = getattr(diffusers, cls.pipeline_class)
        quantization = {} if quantization_config is None else {"quantization_config": quantization_config}
        try:
            pipe = pipeline_cls.from_pretrained(path, use_safetensors=True, **dtype_kwarg(torch_dtype),
                                                **cls.pipeline_init_kwargs, **quantization,
                                                **cls.loaded_components(path))
        except (OSError, EnvironmentError) as e:
            raise ModelError(f"model '{path}' could not be loaded with safetensors weights only: "
                             f"{first_line(e, with_type=False)}") from None
        cls.set_kernel_scheduler(pipe)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def loaded_components(cls, path: str) -> Dict[str, Any]:
        """Components `load` builds itself and passes to `from_pretrained`: none by default (Qwen-Image-Edit's
        processor where torchvision is missing)."""
        return {}

    # --------------------------------------------------------- tiny test models
    @classmethod
    def tiny_components(cls, seed: int = 0, **kwargs) -> Dict[str, Any]:
        """The components of a tiny random `pipeline_class` (fixed seed, built from configs, no hub), small enough
        that a rollout runs in milliseconds on a CPU; `kwargs` select a variant (`tiny_variants`)."""
        raise NotImplementedError

    @classmethod
    def tiny_pipeline(cls, seed: int = 0, **kwargs):
        """A tiny random `pipeline_class` from `tiny_components` (safety checker and watermarker off)."""
        import diffusers

        components = cls.tiny_components(seed, **kwargs)
        pipe = getattr(diffusers, cls.pipeline_class)(**{**cls.pipeline_init_kwargs, **components})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def save_tiny(cls, directory: str, seed: int = 0, **kwargs) -> str:
        """Writes `tiny_pipeline` in diffusers format (safetensors) to `directory` and returns it."""
        os.makedirs(directory, exist_ok=True)
        cls.tiny_pipeline(seed, **kwargs).save_pretrained(directory, safe_serialization=True)
        return directory

    # ------------------------------------------------------------------ sampling
    @classmethod
    def pipeline_guidance_kwargs(cls, guidance_scale: float, embedded_guidance: Optional[float] = None) -> Dict:
        """The `pipeline_class.__call__` guidance arguments that sample as a rollout with CFG scale `guidance_scale`
        (the run's `sample_guidance_scale`, 1 = no CFG) and embedded guidance `embedded_guidance` (the run's
        `sample_embedded_guidance`, for `guidance_kind == "embedded"`) does, by the family's guidance kind."""
        if cls.guidance_kind == "cfg":
            return {"guidance_scale": guidance_scale}
        kwargs = {"guidance_scale": embedded_guidance} if cls.guidance_kind == "embedded" else {}
        if guidance_scale != 1:  # true CFG: the negative half is the empty prompt, as in the rollout
            kwargs.update(true_cfg_scale=guidance_scale, negative_prompt="")
        return kwargs

    def pipeline_call_kwargs(self, height: Optional[int] = None, width: Optional[int] = None) -> Dict:
        """`pipeline_class.__call__` arguments that make the pipeline encode prompts as this family does (the T5
        length of families with a T5); none by default. `height`, `width`: the call's image size, for pipelines that
        would rescale it (FLUX.1 Kontext's `max_area`)."""
        tokens = getattr(self, "max_sequence_length", None)
        return {} if tokens is None else {"max_sequence_length": tokens}

    def pipeline_condition_kwargs(self, prompt) -> Dict:
        """`pipeline_class.__call__`'s condition-image arguments for one prompt (a `ConditionedPrompt`), for families
        that require one (`requires_condition_image`); none by default."""
        return {}

    def pipeline_num_inference_steps(self, num_steps: int) -> int:
        """The `pipeline_class.__call__` `num_inference_steps` whose sampling takes the rollouts' `num_steps` steps:
        `num_steps`, unless the pipeline samples the last steps of a longer schedule (video-to-video's `strength`)."""
        return num_steps

    def samples_with_cfg(self, guidance_scale: float) -> bool:
        """Whether a rollout at CFG scale `guidance_scale` evaluates a negative half: at any scale but 1, unless the
        model's pipeline samples without CFG (a step-distilled FLUX.2 klein)."""
        return guidance_scale != 1.0

    def uses_embedded_guidance(self) -> bool:
        """Whether the loaded denoiser takes the guidance scale as an input (`guidance_kind == "embedded"`)."""
        return self.guidance_kind == "embedded"

    # ------------------------------------------------------------------------ RLG
    @classmethod
    def modular_blocks(cls):
        """A `modular_blocks_class` instance when the family's diffusers modular blocks take a `guider` component
        (where the RLG guider plugs in); None otherwise (no modular blocks, or blocks without a guider: FLUX.1's)."""
        if not cls.modular_blocks_class:
            return None
        import diffusers.modular_pipelines

        blocks = getattr(diffusers.modular_pipelines, cls.modular_blocks_class)()
        return blocks if any(spec.name == "guider" for spec in blocks.expected_components) else None

    @classmethod
    def rlg_route(cls) -> Optional[str]:
        """How `diffalign generate` runs RLG for the family: "pipeline" (its RLG pipeline, `rlg_pipeline_class`),
        "guider (modular)" (`ReinforcementLearningGuidance` in its modular pipeline) or None (no route)."""
        if cls.rlg_pipeline_class:
            return "pipeline"
        return "guider (modular)" if cls.modular_blocks() is not None else None

    @classmethod
    def rlg_route_for(cls, pipe) -> Optional[str]:
        """`rlg_route` for the loaded `pipe`: the family's unless a model of it has none (Wan 2.2 TI2V-5B)."""
        return cls.rlg_route()

    @classmethod
    def modular_cfg_guider(cls, guidance_scale: float):
        """The model's own CFG guider in its modular pipeline: the guider with which the modular pipeline samples as
        `pipeline_class` does with CFG scale `guidance_scale` (the pipeline's CFG argument, as `diffalign generate
        --guidance-scale` gives it). diffusers' `ClassifierFreeGuidance`, `u + g (c - u)`, by default."""
        from diffusers.guiders import ClassifierFreeGuidance

        return ClassifierFreeGuidance(guidance_scale=guidance_scale)

    @classmethod
    def modular_cfg_guider_for(cls, pipe):
        """`modular_cfg_guider` for the loaded `pipe` (a function of the guidance scale): the same for every model of
        the family unless its pipeline's config changes its CFG (a step-distilled FLUX.2 klein samples without)."""
        return cls.modular_cfg_guider

    @classmethod
    def rlg_guidance_pipeline_kwargs(cls, guidance_scale: float) -> Dict:
        """The `pipeline_class.__call__` guidance arguments with which the family's pipeline samples as its RLG route
        (`rlg_pipeline`) does at w = 0 (adapters off) and 1 (on) with `guidance_scale`, the scale of `diffalign
        generate --guidance-scale`: the pipeline's own `guidance_scale` by default."""
        return {"guidance_scale": guidance_scale}

    @classmethod
    def rlg_pipeline(cls, pipe):
        """The family's RLG route on a loaded `pipe` of `pipeline_class`, on the same components (no copy of the
        weights): its RLG pipeline (`rlg_pipeline_class`) where it has one, else its modular pipeline with
        `ReinforcementLearningGuidance` around `modular_cfg_guider` (`diffalign.guiders.ModularRLGPipeline`). The
        aligned model is the denoiser's LoRA adapter (load it first), the base model the denoiser with it off.

        Raises a `ModelError` for a family with neither."""
        components = {name: value for name, value in pipe.components.items() if not name.startswith("aligned_")}
        if cls.rlg_pipeline_class:
            import diffalign.pipelines

            rlg = getattr(diffalign.pipelines, cls.rlg_pipeline_class)(**{**cls.pipeline_init_kwargs, **components})
        else:
            from ..guiders import ModularRLGPipeline

            blocks = cls.modular_blocks()
            if blocks is None:
                raise ModelError(f"the {cls.name} family has no RLG pipeline and no modular blocks with a guider")
            modular = blocks.init_pipeline()
            modular.update_components(**{name: value for name, value in components.items() if value is not None})
            # the blocks' configs from the pipeline's (FLUX.2 klein's `is_distilled`: no negative prompt to encode)
            configs = {spec.name: pipe.config[spec.name] for spec in blocks.expected_configs
                       if spec.name in pipe.config}
            if configs:
                modular.register_to_config(**configs)
            # the negative prompt with which the family's pipeline samples as the route (Qwen-Image: "")
            negative_prompt = cls.rlg_guidance_pipeline_kwargs(cls.default_guidance_scale).get("negative_prompt")
            rlg = ModularRLGPipeline(modular, cls.modular_cfg_guider_for(pipe), cls.default_guidance_scale,
                                     default_negative_prompt=negative_prompt)
        rlg.set_progress_bar_config(disable=True)
        return rlg

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

    def configure(self, *, max_sequence_length: Optional[int] = None, embedded_guidance: Optional[float] = None,
                  num_frames: Optional[int] = None, guidance_scale_2: Optional[float] = None,
                  train_experts: Optional[str] = None, strength: Optional[float] = None):
        """Takes a run's model settings (`TrainConfig.family_kwargs`); None keeps the family's default.

        Args:
            max_sequence_length (`int`, *optional*): T5 tokens per prompt, for families with a T5 (SD3, FLUX).
            embedded_guidance (`float`, *optional*): the embedded guidance, for families whose guidance kind is
                "embedded" (FLUX.1-dev); the others ignore it.
            num_frames, guidance_scale_2: settings of video families (`diffalign.families.wan`); an image family
                refuses them (one-line `ModelError`).
            train_experts (`str`, *optional*): the experts a two-expert model trains (Wan 2.2 A14B); a one-expert
                model refuses any but "high_noise" (one-line `ModelError`).
            strength (`float`, *optional*): how far a video-to-video model noises its condition
                (`diffalign.families.wan_v2v`); every other family refuses it.
        """
        for key, value in (("num_frames", num_frames), ("guidance_scale_2", guidance_scale_2)):
            if value is not None:
                raise ModelError(f"{key} is a setting of video models (wan); this {self.name} model samples images")
        if train_experts not in (None, "high_noise"):
            raise ModelError(f"train_experts {train_experts!r} needs a two-expert model (Wan 2.2 A14B); this "
                             f"{self.name} model has one denoiser")
        if strength is not None:
            raise ModelError(f"strength is a setting of video-to-video models (wan_v2v); this {self.name} model "
                             f"samples from noise")
        if max_sequence_length is not None and hasattr(self, "max_sequence_length"):
            self.max_sequence_length = max_sequence_length
            self._cache.clear()
            self._encoded_batches = []
        if embedded_guidance is not None and self.guidance_kind == "embedded":
            self.embedded_guidance = float(embedded_guidance)

    def make_kernel(self, **settings):
        """The family's transition kernel (`kernel_class`) with the settings it takes out of `settings` (`eta`,
        `noise_level`: `TrainConfig.kernel_kwargs`)."""
        return self.kernel_class.from_settings(**settings)

    # -------------------------------------------------------------------- prompts
    def encode_text(self, prompts: List[str], device) -> Conditioning:
        """Per-prompt conditioning tensors (batch first) of `prompts`, with the pipeline's own `encode_prompt`."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_prompts(self, prompts: List[str]) -> Conditioning:
        """`encode_text` of each distinct prompt once; a cache shared across epochs, keyed by a prompt's text and its
        condition images (`diffalign.prompts.prompt_key`)."""
        from ..prompts import check_condition_prompts, prompt_key

        check_condition_prompts(prompts, self.name, self.max_condition_images, max_videos=self.max_condition_videos,
                                takes_last_image=self.takes_last_image)
        keys = [prompt_key(p) for p in prompts]
        missing = {}
        for prompt, key in zip(prompts, keys):
            if key not in self._cache:
                missing.setdefault(key, prompt)
        order = sorted(missing, key=lambda key: (key, ()) if isinstance(key, str) else key)  # text prompts: by text
        if order:
            with self.text_encoders_on(self.device):
                encoded = self.encode_text([missing[key] for key in order], self.device)
            if len(self._cache) + len(order) > self.max_cache:
                self._cache.clear()
                self._encoded_batches = []
            for i, key in enumerate(order):
                self._cache[key] = self.cache_row(encoded, i)
            texts = [missing[key] for key in order]
            if self._encoded_batches is not None:
                self._encoded_batches = (self._encoded_batches + [texts] if all(isinstance(t, str) for t in texts)
                                         else None)
        names = self._cache[keys[0]].keys()
        return {k: cat_rows([self._cache[key][k][None] for key in keys]) for k in names}

    def encoding_history(self) -> Optional[List[List[str]]]:
        """The text prompts encoded together by each `encode_text` call since the cache was last cleared (None when
        a prompt with condition images was among them): a resumed run replays them (`replay_encodings`)."""
        return None if self._encoded_batches is None else [list(batch) for batch in self._encoded_batches]

    def replay_encodings(self, history: List[List[str]]):
        """Rebuilds the prompt cache from `encoding_history`: each batch encoded together again. A text encoder's
        output for a prompt can differ in the last bit with the batch it is encoded in (e.g. SD3's and SDXL's pooled
        CLIP projections), so a resumed run needs the cache of the run it continues to sample the same images."""
        self._cache.clear()
        self._encoded_batches = []
        for batch in history:
            self.encode_prompts(list(batch))

    def cache_row(self, encoded: Conditioning, index: int) -> Conditioning:
        """Row `index` of an `encode_text` batch, as the per-prompt cache keeps it (a family with variable-length
        conditioning drops the batch's padding here; `cat_rows` pads each batch to its own longest row)."""
        return {k: v[index] for k, v in encoded.items()}

    @contextlib.contextmanager
    def text_encoders_on(self, device):
        """With `offload_text_encoders`: the text encoders on `device` inside the block, back on the CPU after (their
        memory is free while the denoiser samples and trains); otherwise nothing moves."""
        encoders = [getattr(self.pipe, n, None) for n in self.text_encoder_names] if self.offload_text_encoders else []
        encoders = [e for e in encoders if e is not None]
        for encoder in encoders:
            encoder.to(device)
        try:
            yield
        finally:
            for encoder in encoders:
                encoder.to("cpu")

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

    def default_size(self) -> Tuple[int, int]:
        """`(height, width)` the pipeline samples when given neither: square `default_resolution` unless the
        pipeline's default is not square (Wan's 480 x 832)."""
        return self.default_resolution(), self.default_resolution()

    @classmethod
    def resolution_limits(cls, denoiser_config, vae_scale_factor: int) -> Tuple[int, Optional[int]]:
        """`(multiple, largest)`: the image sides a model of this family can sample are multiples of `multiple`, at
        most `largest` (None: no bound), from its denoiser's config and its VAE's downsampling factor. A UNet
        halves the latents once per down block but the last."""
        return vae_scale_factor * 2 ** (len(denoiser_config["down_block_types"]) - 1), None

    def resolution_multiple(self) -> int:
        """Image sides must be multiples of this."""
        return self._limits()[0]

    def _limits(self) -> Tuple[int, Optional[int]]:
        return self.resolution_limits(unwrap(self.denoiser).config, self.vae_scale_factor)

    def check_resolution(self, resolution: int):
        """A one-line `ModelError` naming the sizes this model can sample unless `resolution` is one of them."""
        check_resolution_in(resolution, *self._limits(), f"this {self.name} model")

    def latent_channels(self, denoiser=None) -> int:
        return unwrap(denoiser if denoiser is not None else self.denoiser).config.in_channels

    def prepare_latents(self, batch_size, height, width, dtype, device, generator, latents=None, denoiser=None):
        return self.pipe.prepare_latents(batch_size, self.latent_channels(denoiser), height, width, dtype, device,
                                         generator, latents)

    def set_timesteps(self, num_inference_steps: int, device, height: int, width: int) -> torch.Tensor:
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        return self.scheduler.timesteps

    def start_latents(self, noise: torch.Tensor, cond: Conditioning, timesteps: torch.Tensor) -> torch.Tensor:
        """A rollout's first latents from the noise `prepare_latents` drew for it (`timesteps`: the rollout's, from
        `set_timesteps`): the noise itself, unless the model starts from its condition (video-to-video: the condition
        video's latents noised to the first timestep). A rollout given `latents` starts from them as they are."""
        return noise

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
        both = {k: cat_rows([negative[k], cond[k]]) for k in cond}
        uncond, text = self.forward(
            denoiser, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both
        ).chunk(2)
        return uncond + guidance_scale * (text - uncond)

    def sampled_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The part of a latent-shaped batch `(B, ...)` that the sampler moves, what a loss on latents counts: all of
        it, unless the condition fixes part of the latents (Wan 2.2 TI2V-5B image-to-video: the frames after the
        condition image's first one, `diffalign.families.wan_i2v`); a view, so losses take it as any latents."""
        return latents

    # ------------------------------------------------------------------- decoding
    def final_latents(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The latents to decode at the end of a rollout: the sampled ones (a family whose condition fixes part of
        them puts it back: Wan 2.2 TI2V-5B's first frame, `diffalign.families.wan_i2v`)."""
        return latents

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

    def save_lora(self, denoiser, directory: str, weight_name: str = LORA_WEIGHT_NAME):
        """Writes `pytorch_lora_weights.safetensors` (`weight_name`) so `<pipeline_class>.load_lora_weights(directory)`
        loads it, with the adapter's peft config as metadata (as diffusers' LoRA training scripts do): without it
        diffusers loads a LoRA with `lora_alpha = r`, and one trained with another alpha would load at the wrong
        scale."""
        import diffusers

        model = unwrap(denoiser)
        adapter = active_adapter(model)  # the trained adapter (DiffusionNFT also holds a frozen "old" one)
        # peft keeps target_modules as a set, whose order changes with the process's hash seed: sorted, the
        # metadata of two identical runs is identical too
        metadata = {key: sorted(value) if isinstance(value, set) else value
                    for key, value in model.peft_config[adapter].to_dict().items()}
        os.makedirs(directory, exist_ok=True)
        getattr(diffusers, self.pipeline_class).save_lora_weights(
            directory, **{self.lora_layers_kwarg(): self.lora_state_dict(model),
                          f"{self.denoiser_name}_lora_adapter_metadata": metadata},
            safe_serialization=True, weight_name=weight_name,
        )


def cat_rows(tensors: List[torch.Tensor]) -> torch.Tensor:
    """`torch.cat` of batch-first tensors along the batch. Tensors whose token axis (dim 1) differs in length are
    zero-padded to the longest first (False for a boolean mask): variable-length conditioning, such as Qwen-Image's
    text states and their mask, padded to each batch's longest prompt. Tensors of equal shapes are concatenated as
    they are."""
    if all(tensor.shape[1:] == tensors[0].shape[1:] for tensor in tensors):
        return torch.cat(tensors)
    length = max(tensor.shape[1] for tensor in tensors)
    padded = []
    for tensor in tensors:
        padding = tensor.new_zeros(tensor.shape[0], length - tensor.shape[1], *tensor.shape[2:])
        padded.append(torch.cat([tensor, padding], dim=1))
    return torch.cat(padded)


def possible_sides(multiple: int, largest: Optional[int], shown: int = 4) -> str:
    """The image sides `multiple, 2 multiple, ...` up to `largest`, in words."""
    if largest is not None and largest < multiple:
        return "none"
    count = largest // multiple if largest is not None else shown
    sides = ", ".join(str(multiple * k) for k in range(1, min(count, shown) + 1))
    if largest is None:
        return f"multiples of {multiple} ({sides}, ...)"
    if count > shown:
        sides += f", ..., {largest // multiple * multiple}"
    return f"multiples of {multiple} up to {largest} ({sides})"


def check_resolution_in(resolution: int, multiple: int, largest: Optional[int], model: str):
    """A one-line `ModelError` unless `resolution` is a positive multiple of `multiple` no larger than `largest`;
    it names the sides `model` can do and the nearest one."""
    if resolution >= 1 and resolution % multiple == 0 and (largest is None or resolution <= largest):
        return
    nearest = max(multiple, round(resolution / multiple) * multiple)
    if largest is not None:
        nearest = min(nearest, largest // multiple * multiple)
    problem = (f"is larger than {largest}, the largest side of" if resolution % multiple == 0 and resolution >= 1
               else f"is not a multiple of {multiple} (or not positive) for")
    raise ModelError(f"resolution {resolution} {problem} {model}: it can sample "
                     f"{possible_sides(multiple, largest)}; try {nearest}")
