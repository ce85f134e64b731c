"""Wan 2.1 and 2.2 text-to-video (`WanPipeline`): a flow DiT over video latents `(B, C, F, h, w)` on UMT5 text states;
trajectories with Flow-GRPO's SDE, as the other flow families.

What differs from the image families, and where it lives here:

- **video latents**: `(B, C, F, h, w)` with `F = (num_frames - 1) / 4 + 1` latent frames, not packed (the
  transformer patchifies itself). `num_frames` (`4k + 1`, WanPipeline's default 81) is a run setting
  (`TrainConfig.num_frames`, `configure(num_frames=...)`). The kernels, log-probs and losses average over every
  non-batch dimension, frames included. `decode` returns `(B, F, 3, H, W)` float32 in [0, 1], WanPipeline's
  `output_type="pt"` (`output_kind = "video"`).
- **prompts**: `WanPipeline.encode_prompt`: UMT5's last hidden states of the real tokens, zero-padded to
  `max_sequence_length` (512, the pipeline's default); the transformer takes no mask. The negative prompt is
  encoded the same way (the run's empty one, as the pipeline's default).
- **CFG**: `u + g (c - u)`, both halves in one forward (the pipeline runs two; equal to float rounding).
- **scheduler**: the published models sample with `UniPCMultistepScheduler` (`flow_prediction`, `flow_shift`);
  rollouts step `FlowMatchEulerDiscreteScheduler` with the same shift (`set_kernel_scheduler`), the flow SDE's
  scheduler, as the other flow families.
- **Wan 2.2 TI2V-5B** (`expand_timesteps`): the z_dim-48 VAE (16x spatial), and the timestep given per latent token
  (`(B, tokens)`, all equal for text-to-video), as WanPipeline does (`forward`).
- **Wan 2.2 A14B** (`boundary_ratio`, `transformer_2`): two experts, `transformer` for timesteps `t >= boundary_ratio
  * num_train_timesteps` (high noise) and `transformer_2` below (low noise), with the CFG scale `guidance_scale_2`
  there (`configure(guidance_scale_2=...)`, default the run's scale, as WanPipeline). `configure(train_experts=...)`
  (`TrainConfig.train_experts`) picks the trained experts. "high_noise" (the default): the LoRA trains `transformer`
  (the denoiser, what `WanPipeline.load_lora_weights` loads into by default); `transformer_2` stays frozen, so steps
  below the boundary give the policy's and the reference's predictions alike (ratio 1, no gradient).
  "low_noise" / "both": the denoiser is `WanExperts`, one module holding both experts with the adapters on the
  trained one(s), so the optimizer, EMA, checkpoints and the trainers' adapter switches (reference = adapters off,
  DiffusionNFT's old adapter) cover every trained expert; each row is predicted by the expert WanPipeline samples
  its timestep with. The low-noise LoRA is saved beside the high-noise one as `LOW_NOISE_LORA_WEIGHT_NAME`, which
  `load_lora_weights(dir, weight_name=..., load_into_transformer_2=True)` loads into `transformer_2`.
- **RLG**: the RLG guider in diffusers' modular Wan pipeline (`WanBlocks`; `Wan22Blocks` for A14B, on each expert
  that carries the LoRA, the plain CFG guider on one that does not). TI2V-5B: diffalign's `WanRLGPipeline`, as
  diffusers' modular Wan takes neither `expand_timesteps` nor the 16x VAE (`rlg_route_for`).
"""

import os
from typing import List, Optional, Tuple

import torch

from ..errors import ModelError
from ..kernels import FlowSDEKernel
from ..utils.peft_utils import LORA_WEIGHT_NAME, LOW_NOISE_LORA_WEIGHT_NAME, unwrap
from .base import Conditioning, ModelFamily

DEFAULT_NUM_FRAMES = 81  # WanPipeline.__call__'s default (5 s at 16 fps)
# `TrainConfig.train_experts` -> the pipeline attributes of the experts trained
TRAINED_EXPERTS = {"high_noise": ("transformer",), "low_noise": ("transformer_2",),
                   "both": ("transformer", "transformer_2")}


def check_num_frames(num_frames, temporal_factor: int = 4):
    """A one-line `ModelError` unless `num_frames` is `k * temporal_factor + 1` frames (the VAE compresses
    `temporal_factor` frames into one latent frame after the first): 1, 5, 9, ..., 81 for every Wan VAE.
    (`TrainConfig.validate` checks `4k + 1` before the model loads; this checks against the loaded VAE.)"""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1 \
            or (num_frames - 1) % temporal_factor:
        raise ModelError(f"num_frames must be {temporal_factor}k + 1 for this model's VAE (1, {1 + temporal_factor}, "
                         f"{1 + 2 * temporal_factor}, ...); got {num_frames!r}")


def clean_prompts_as_wan_pipeline(module_name: str):
    """diffusers' Wan image-to-video and video-to-video pipelines and its modular Wan text encoder clean prompts with
    ftfy unconditionally (a `NameError` where ftfy is missing), `WanPipeline` only where ftfy is installed: without
    ftfy, the `basic_clean` of `module_name` becomes `WanPipeline`'s, so it samples at all and encodes a prompt as
    the family does (with ftfy nothing changes)."""
    import importlib

    from diffusers.pipelines.wan import pipeline_wan

    if not pipeline_wan.is_ftfy_available():
        importlib.import_module(module_name).basic_clean = pipeline_wan.basic_clean


def clean_modular_prompts_as_the_pipeline():
    """`clean_prompts_as_wan_pipeline` for diffusers' modular Wan text encoder (the RLG guider's route)."""
    clean_prompts_as_wan_pipeline("diffusers.modular_pipelines.wan.encoders")


class WanExperts(torch.nn.Module):
    """Wan 2.2 A14B's two experts as the one module a run trains (`train_experts` "low_noise" or "both"):
    `transformer` (high noise) and `transformer_2` (low noise), the pipeline's own modules (no copy), with the LoRA
    adapters, `requires_grad_` and full fine-tuning on the `trained` ones only. `forward(..., expert=name)` runs
    that expert (`WanFamily.predict` picks it per timestep); the peft calls the trainers make on a denoiser
    (`add_adapter`, `disable_adapters`, `peft_config`, ...) reach every trained expert.

    Every trained expert takes part in every forward with gradients, the others through a zero term: DDP reduces
    every trained parameter in each backward, and a micro-batch whose rows all sit on one side still has a loss
    with a gradient (the idle expert's is zero)."""

    def __init__(self, transformer, transformer_2, trained: Tuple[str, ...]):
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.trained = tuple(trained)
        for name in ("transformer", "transformer_2"):
            if name not in self.trained:
                getattr(self, name).requires_grad_(False)  # never trained (`requires_grad_` leaves it frozen)

    def trained_experts(self) -> list:
        return [getattr(self, name) for name in self.trained]

    def forward(self, *args, expert: str, **kwargs):
        output = getattr(self, expert)(*args, **kwargs)
        if not torch.is_grad_enabled():
            return output
        idle = [p for name in self.trained if name != expert
                for p in getattr(self, name).parameters() if p.requires_grad]
        if not idle:
            return output
        zero = sum(p.reshape(-1)[:1].sum() for p in idle) * 0.0
        sample = output[0] if isinstance(output, tuple) else output.sample
        sample = sample + zero.to(sample.dtype)
        return (sample, *output[1:]) if isinstance(output, tuple) else type(output)(sample=sample)

    # what the trainers read from a denoiser: the high-noise expert's config and dtype
    @property
    def config(self):
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def _supports_gradient_checkpointing(self) -> bool:
        return self.transformer._supports_gradient_checkpointing

    def requires_grad_(self, requires_grad: bool = True):
        """On the trained experts alone: the others stay frozen (a full fine-tune trains the chosen experts)."""
        for expert in self.trained_experts():
            expert.requires_grad_(requires_grad)
        return self

    # peft adapters, on the trained experts
    @property
    def peft_config(self) -> dict:
        return getattr(self.trained_experts()[0], "peft_config", None) or {}

    def add_adapter(self, adapter_config, adapter_name: str = "default"):
        for expert in self.trained_experts():
            expert.add_adapter(adapter_config, adapter_name=adapter_name)

    def set_adapter(self, adapter_name):
        for expert in self.trained_experts():
            expert.set_adapter(adapter_name)

    def disable_adapters(self):
        for expert in self.trained_experts():
            expert.disable_adapters()

    def enable_adapters(self):
        for expert in self.trained_experts():
            expert.enable_adapters()

    # memory and attention settings, on both experts (both sample)
    def enable_gradient_checkpointing(self):
        for expert in (self.transformer, self.transformer_2):
            expert.enable_gradient_checkpointing()

    def set_attention_backend(self, backend: str):
        for expert in (self.transformer, self.transformer_2):
            expert.set_attention_backend(backend)

    def enable_xformers_memory_efficient_attention(self):
        for expert in (self.transformer, self.transformer_2):
            expert.enable_xformers_memory_efficient_attention()

    def save_pretrained(self, directory: str, **kwargs):
        """A full fine-tune's result: each trained expert in the folder of its pipeline attribute beside `directory`
        (`final/transformer`, `final/transformer_2`), as `WanPipeline.from_pretrained(..., transformer=...,
        transformer_2=...)` takes them."""
        parent = os.path.dirname(directory)
        for name in self.trained:
            getattr(self, name).save_pretrained(os.path.join(parent, name), **kwargs)


class _ExpertCall:
    """`denoiser(...)` that runs `expert` of a (wrapped) `WanExperts`; `unwrap` reaches the module through `module`."""

    def __init__(self, denoiser, expert: str):
        self.module = denoiser
        self.expert = expert

    def __call__(self, *args, **kwargs):
        return self.module(*args, expert=self.expert, **kwargs)

def wan_rlg_pipeline(pipe, class_name: str):
    """diffalign's RLG pipeline `class_name` (`WanRLGPipeline`, `WanImageToVideoRLGPipeline`) on the components of a
    loaded Wan `pipe` (shared, not copied) and its configs, `expand_timesteps` and `boundary_ratio`, which
    `pipe.components` leaves out."""
    import diffalign.pipelines

    components = {name: value for name, value in pipe.components.items() if not name.startswith("aligned_")}
    configs = {name: pipe.config[name] for name in ("boundary_ratio", "expand_timesteps") if name in pipe.config}
    rlg = getattr(diffalign.pipelines, class_name)(**components, **configs)
    rlg.set_progress_bar_config(disable=True)
    return rlg


class WanFamily(ModelFamily):
    name = "wan"
    pipeline_class = "WanPipeline"
    # the diffusers module whose prompt cleaning needs ftfy unconditionally (`clean_prompts_as_wan_pipeline`): None
    # for `WanPipeline`, which cleans with ftfy only where it is installed
    prompt_cleaning_module: Optional[str] = None
    denoiser_name = "transformer"
    denoiser_class = "WanTransformer3DModel"
    kernel_class = FlowSDEKernel
    text_encoder_names = ("text_encoder",)
    pipeline_init_kwargs = {}  # no safety checker, no watermarker
    rlg_pipeline_class = None  # the RLG guider runs in diffusers' modular Wan pipeline
    # a fully fine-tuned aligned model's RLG route (`diffalign generate --aligned-denoiser`, the card's snippet): the
    # modular guider switches LoRA adapters, not models; this pipeline takes `aligned_transformer` and, for A14B,
    # `aligned_transformer_2`, and samples Wan 2.1, TI2V-5B and A14B as WanPipeline at w = 0 / 1
    full_fine_tune_rlg_pipeline_class = "WanRLGPipeline"
    modular_blocks_class = "WanBlocks"  # Wan 2.1; Wan22Blocks for a two-expert model (`modular_blocks_for`)
    hub_tags = ("wan", "text-to-video")
    guidance_kind = "cfg"
    default_guidance_scale = 5.0  # WanPipeline's default `guidance_scale`
    output_kind = "video"
    # the self- and cross-attention projections of every WanTransformerBlock (`attn1`, `attn2`), the targets of
    # diffusers' Wan LoRA examples and of Flow-GRPO's Wan trainer
    default_lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    max_sequence_length = 512  # UMT5 tokens per prompt, WanPipeline.__call__'s default
    num_frames = DEFAULT_NUM_FRAMES
    guidance_scale_2: Optional[float] = None  # the low-noise expert's CFG scale (A14B); None: the run's scale
    train_experts = "high_noise"  # the experts trained (A14B, `TRAINED_EXPERTS`); "high_noise": `transformer`
    experts: Optional[WanExperts] = None  # the trained module when it is not `transformer` alone
    # the published models' scheduler (UniPC flow), Wan 2.2 TI2V-5B (expand_timesteps, the z_dim-48 VAE)
    # and Wan 2.2 A14B (two experts)
    tiny_variants = {"unipc": {"unipc_scheduler": True}, "ti2v_5b": {"version": "2.2-ti2v"},
                     "a14b": {"version": "2.2-a14b"}}
    tiny_settings = {"num_frames": 5}  # two latent frames: the temporal axis is exercised, 81 frames would be slow

    # -------------------------------------------------------------------- loading
    @classmethod
    def clean_prompts(cls):
        """`clean_prompts_as_wan_pipeline` for the family's pipeline where it needs it (`prompt_cleaning_module`),
        before that pipeline can sample: when a family wraps it, loads it or builds a tiny one."""
        if cls.prompt_cleaning_module:
            clean_prompts_as_wan_pipeline(cls.prompt_cleaning_module)

    def __init__(self, pipe, max_cache: int = 4096):
        super().__init__(pipe, max_cache)
        self.clean_prompts()

    @classmethod
    def load(cls, path: str, torch_dtype: torch.dtype = torch.float32, quantization_config=None):
        cls.clean_prompts()  # the pipeline loaded here may sample before a family wraps it
        return super().load(path, torch_dtype, quantization_config=quantization_config)

    @classmethod
    def set_kernel_scheduler(cls, pipe):
        """The flow SDE steps `FlowMatchEulerDiscreteScheduler`: a UniPC flow scheduler (the published Wan models')
        becomes one with its `flow_shift` as `shift` (`from_config` would drop the shift)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = pipe.scheduler.config
        if type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
            return
        if config.get("prediction_type") != "flow_prediction" and not config.get("use_flow_sigmas"):
            raise ModelError(f"this Wan model's scheduler ({type(pipe.scheduler).__name__}) is not a flow-matching "
                             f"one: the flow SDE needs flow_prediction")
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=config.get("num_train_timesteps", 1000), shift=config.get("flow_shift", 1.0))

    def configure(self, *, num_frames: Optional[int] = None, guidance_scale_2: Optional[float] = None,
                  train_experts: Optional[str] = None, **settings):
        """As `ModelFamily.configure`, plus the video's `num_frames`, and the low-noise expert's `guidance_scale_2`
        and the trained experts `train_experts` ("high_noise", "low_noise", "both"; see the module docstring) of a
        two-expert Wan 2.2 A14B (a one-line `ModelError` for another model, or another value)."""
        super().configure(**settings)
        if train_experts is not None:
            self.set_train_experts(train_experts)
        if num_frames is not None:
            check_num_frames(num_frames, self.pipe.vae_scale_factor_temporal)
            self.num_frames = int(num_frames)
        if guidance_scale_2 is not None:
            if self.boundary_timestep() is None:
                raise ModelError("guidance_scale_2 is the CFG scale of Wan 2.2 A14B's low-noise expert; this Wan "
                                 "model has one expert (no boundary_ratio)")
            self.guidance_scale_2 = float(guidance_scale_2)

    def set_train_experts(self, train_experts: str):
        """The experts a run trains: "high_noise" keeps `transformer` the denoiser; "low_noise" and "both" make it a
        `WanExperts` (a two-expert model only). Call before adapters are added."""
        if train_experts not in TRAINED_EXPERTS:
            raise ModelError(f"train_experts must be one of {', '.join(TRAINED_EXPERTS)}; got {train_experts!r}")
        if train_experts != "high_noise" and self.boundary_timestep() is None:
            raise ModelError(f"train_experts {train_experts!r} trains Wan 2.2 A14B's low-noise expert; this Wan model "
                             f"has one expert (no boundary_ratio)")
        self.train_experts = train_experts
        self.experts = None if train_experts == "high_noise" else WanExperts(
            self.pipe.transformer, self.pipe.transformer_2, TRAINED_EXPERTS[train_experts])

    @property
    def denoiser(self):
        """`transformer`, or the `WanExperts` that trains the experts of `train_experts`."""
        return self.experts if self.experts is not None else self.pipe.transformer

    def frozen_modules(self) -> list:
        """The VAE, the text encoder and the experts of a two-expert model that are not trained (by default the
        low-noise one: the LoRA trains `transformer`)."""
        trained = TRAINED_EXPERTS[self.train_experts]
        experts = [getattr(self.pipe, name, None) for name in ("transformer", "transformer_2") if name not in trained]
        return super().frozen_modules() + [expert for expert in experts if expert is not None]

    def boundary_timestep(self) -> Optional[float]:
        """The timestep at which a two-expert model switches to `transformer_2` (`boundary_ratio *
        num_train_timesteps`, as WanPipeline), None for one expert."""
        ratio = self.pipe.config.get("boundary_ratio")
        if ratio is None:
            return None
        return ratio * self.scheduler.config.num_train_timesteps

    # -------------------------------------------------------------------- prompts
    def encode_text(self, prompts: List[str], device) -> Conditioning:
        """`WanPipeline.encode_prompt`: the prompt cleaned, UMT5's states of its real tokens, zeros after them up to
        `max_sequence_length`."""
        embeds, _ = self.pipe.encode_prompt([str(p) for p in prompts], do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length, device=device)
        return {"encoder_hidden_states": embeds}

    def pipeline_call_kwargs(self, height: Optional[int] = None, width: Optional[int] = None) -> dict:
        """The UMT5 length, the number of frames and (A14B) the low-noise expert's CFG scale the rollouts use."""
        kwargs = {"max_sequence_length": self.max_sequence_length, "num_frames": self.num_frames}
        if self.guidance_scale_2 is not None:
            kwargs["guidance_scale_2"] = self.guidance_scale_2
        return kwargs

    # ----------------------------------------------------------- latents and time
    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor_spatial

    def default_resolution(self) -> int:
        return 480  # WanPipeline's default height (its default width is 832: `default_size`)

    def default_size(self) -> Tuple[int, int]:
        return 480, 832  # WanPipeline's default height and width

    @classmethod
    def resolution_limits(cls, denoiser_config, vae_scale_factor: int):
        """The VAE's spatial downsampling, then the transformer's spatial patches; the rotary tables hold
        `rope_max_seq_len` patches a side (1024 in the published models: 16384 pixels)."""
        multiple = vae_scale_factor * denoiser_config.get("patch_size", (1, 2, 2))[1]
        positions = denoiser_config.get("rope_max_seq_len")
        return multiple, positions * multiple if positions else None

    def prepare_latents(self, batch_size, height, width, dtype, device, generator, latents=None, denoiser=None):
        """`(B, C, F, h, w)` Gaussian noise drawn as `WanPipeline.prepare_latents` draws it (float32, the same numbers
        for the same generator), in `dtype`."""
        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        noise = self.pipe.prepare_latents(batch_size, self.latent_channels(denoiser), int(height), int(width),
                                          self.num_frames, torch.float32, torch.device(device), generator)
        return noise.to(dtype)

    def set_timesteps(self, num_inference_steps: int, device, height: int, width: int) -> torch.Tensor:
        self.scheduler.set_timesteps(num_inference_steps, device=device)  # as WanPipeline.__call__
        return self.scheduler.timesteps

    # ------------------------------------------------------------------ denoising
    def forward(self, denoiser, latents, timesteps, cond: Conditioning):
        """One Wan transformer call on a batch of rows. With `expand_timesteps` (Wan 2.2 TI2V-5B) the timestep is
        given per latent token, `(B, F * h/2 * w/2)`, as WanPipeline builds it from its all-ones mask."""
        model = unwrap(denoiser)
        timestep = timesteps
        if self.pipe.config.get("expand_timesteps"):
            _, patch_h, patch_w = model.config.patch_size
            frames, rows, columns = latents.shape[2], -(-latents.shape[3] // patch_h), -(-latents.shape[4] // patch_w)
            timestep = timesteps[:, None].expand(-1, frames * rows * columns)
        return denoiser(hidden_states=latents.to(model.dtype), timestep=timestep,
                        encoder_hidden_states=cond["encoder_hidden_states"].to(model.dtype), return_dict=False)[0]

    def predict(self, denoiser, latents, timesteps, cond: Conditioning, negative: Optional[Conditioning],
                guidance_scale: float) -> torch.Tensor:
        """CFG as `ModelFamily.predict`; for a two-expert model, rows at timesteps below the boundary go to
        `transformer_2` with `guidance_scale_2` (default `guidance_scale`), as WanPipeline switches.

        A batch on one side of the boundary (every rollout step) runs that expert alone. A batch mixing both sides
        (the forward-process trainers draw a time per row) runs both experts on every row and keeps each row's own:
        the denoiser sees the whole batch in order, as per-row adapters (`adapter_rows`) expect, at twice the
        compute; rows of an untrained expert get no gradient.

        `denoiser` is `transformer` (`transformer_2` is the pipeline's, frozen) or a `WanExperts` (the policy, or a
        full fine-tune's frozen reference copy of it), whose experts both come from it."""
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        boundary = self.boundary_timestep()
        if boundary is None:
            return super().predict(denoiser, latents, timesteps, cond, negative, guidance_scale)
        high = timesteps >= boundary
        scale_2 = guidance_scale if self.guidance_scale_2 is None else self.guidance_scale_2
        if isinstance(unwrap(denoiser), WanExperts):
            high_expert, low_expert = _ExpertCall(denoiser, "transformer"), _ExpertCall(denoiser, "transformer_2")
        else:
            high_expert, low_expert = denoiser, self.pipe.transformer_2
        if bool(high.all()):
            return super().predict(high_expert, latents, timesteps, cond, negative, guidance_scale)
        low_noise = super().predict(low_expert, latents, timesteps, cond, negative, scale_2)
        if not bool(high.any()):
            return low_noise
        high_noise = super().predict(high_expert, latents, timesteps, cond, negative, guidance_scale)
        return torch.where(high.view(-1, *[1] * (latents.ndim - 1)), high_noise, low_noise.to(high_noise.dtype))

    # ------------------------------------------------------------------- decoding
    def decode(self, latents: torch.Tensor, height: Optional[int] = None, width: Optional[int] = None) -> torch.Tensor:
        """`(B, F, 3, H, W)` float32 in [0, 1]: the VAE's per-channel normalisation undone (`latents_mean`,
        `latents_std`), decoded, and arranged frames first, as WanPipeline with `output_type="pt"`."""
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        video = vae.decode(latents / inverse_std + mean, return_dict=False)[0]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    # ----------------------------------------------------------------------- LoRA
    def lora_state_dict(self, denoiser) -> dict:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(denoiser)  # `transformer.<module>.lora_A.weight`, as WanPipeline loads

    def save_lora(self, denoiser, directory: str, weight_name: str = LORA_WEIGHT_NAME):
        """`ModelFamily.save_lora` of each trained expert: the high-noise one as `pytorch_lora_weights.safetensors`
        (`load_lora_weights(directory)`), the low-noise one as `LOW_NOISE_LORA_WEIGHT_NAME`
        (`load_lora_weights(directory, weight_name=LOW_NOISE_LORA_WEIGHT_NAME, load_into_transformer_2=True)`)."""
        model = unwrap(denoiser)
        if not isinstance(model, WanExperts):
            return super().save_lora(denoiser, directory, weight_name)
        for name in model.trained:
            super().save_lora(getattr(model, name), directory,
                              LOW_NOISE_LORA_WEIGHT_NAME if name == "transformer_2" else weight_name)

    # ------------------------------------------------------------------------ RLG
    @classmethod
    def modular_blocks(cls):
        """`ModelFamily.modular_blocks`, with the modular text encoder cleaning prompts as WanPipeline does."""
        clean_modular_prompts_as_the_pipeline()
        return super().modular_blocks()

    @classmethod
    def rlg_route_for(cls, pipe) -> Optional[str]:
        """Wan 2.2 TI2V-5B: an RLG pipeline (`WanRLGPipeline`), as diffusers' modular Wan samples neither its
        per-token timesteps nor with its 16x VAE."""
        return "pipeline" if pipe.config.get("expand_timesteps") else cls.rlg_route()

    @classmethod
    def rlg_pipeline(cls, pipe):
        """`ModelFamily.rlg_pipeline` on diffusers' modular Wan: `WanBlocks`, or `Wan22Blocks` for a two-expert model
        (the RLG guider on each expert that carries LoRA adapters, `transformer_2` with `guidance_scale_2`; the
        model's plain CFG guider on one that carries none: `ModularRLGPipeline.expert_guiders`).
        TI2V-5B, and a family with an RLG pipeline (image-to-video): that pipeline (`wan_rlg_pipeline`)."""
        if cls.rlg_pipeline_class or pipe.config.get("expand_timesteps"):
            return wan_rlg_pipeline(pipe, cls.rlg_pipeline_class or "WanRLGPipeline")
        from ..guiders import ModularRLGPipeline
        import diffusers.modular_pipelines

        clean_modular_prompts_as_the_pipeline()
        two_experts = pipe.config.get("boundary_ratio") is not None
        blocks = getattr(diffusers.modular_pipelines, "Wan22Blocks" if two_experts else cls.modular_blocks_class)()
        modular = blocks.init_pipeline()
        components = {name: value for name, value in pipe.components.items() if value is not None}
        modular.update_components(**{name: value for name, value in components.items()
                                     if name in {spec.name for spec in blocks.expected_components}})
        if two_experts:
            modular.register_to_config(boundary_ratio=pipe.config["boundary_ratio"])
        rlg = ModularRLGPipeline(modular, cls.modular_cfg_guider, cls.default_guidance_scale, output="videos",
                                 second_expert_guider=cls.modular_cfg_guider if two_experts else None)
        rlg.set_progress_bar_config(disable=True)
        return rlg

    # --------------------------------------------------------- tiny test models
    @classmethod
    def tiny_components(cls, seed: int = 0, version: str = "2.1", unipc_scheduler: bool = False,
                        boundary_ratio: Optional[float] = None) -> dict:
        """Components of a tiny random `WanPipeline` (the configs of diffusers' Wan tests): a two-block
        `WanTransformer3DModel` (patches 1x2x2), a small `AutoencoderKLWan` (8x spatial, 4x temporal), a tiny UMT5
        encoder with a word-level T5 tokenizer built in code, and a flow-match scheduler with shift 7, as diffusers' Wan
        tests (`unipc_scheduler`: the published models' UniPC flow scheduler, with that shift).

        `version`: "2.1"; "2.2-ti2v" (TI2V-5B: the z_dim-48 residual VAE with 2x2 patches, 16x spatial, and
        `expand_timesteps`); "2.2-a14b" (A14B: a second expert `transformer_2` and a `boundary_ratio`, 0.03 unless
        `boundary_ratio` is given: the published model's 0.875 sends the steps below it to `transformer_2`)."""
        from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler,
                               WanTransformer3DModel)
        from transformers import UMT5Config, UMT5EncoderModel

        from .tiny import tiny_t5_tokenizer

        if version not in ("2.1", "2.2-ti2v", "2.2-a14b"):
            raise ValueError(f"unknown tiny Wan version {version!r}")
        ti2v = version == "2.2-ti2v"
        channels = 48 if ti2v else 16
        torch.manual_seed(seed)
        if ti2v:
            vae = AutoencoderKLWan(base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True,
                                   patch_size=2, latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
                                   dim_mult=[1, 1, 1, 1], num_res_blocks=1, scale_factor_spatial=16,
                                   scale_factor_temporal=4, temperal_downsample=[False, True, True])
        else:  # base_dim 16, not diffusers' tests' 3: through 3 channels a LoRA's change of the latents hardly shows
            vae = AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                   temperal_downsample=[False, True, True])

        def transformer(offset: int):
            torch.manual_seed(seed + offset)
            return WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=channels,
                out_channels=channels, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=64)  # 64 patches: WanPipeline's 832 wide

        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=37, num_layers=1,
                                                   num_heads=4)).eval()
        if unipc_scheduler:
            # the published models' scheduler class and settings; their flow_shift is 3 (480p) or 5 (720p), 7 here as
            # the flow-match shift of diffusers' Wan tests
            scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                flow_shift=7.0)
        else:
            scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)  # diffusers' Wan tests
        components = {"transformer": transformer(0), "vae": vae, "text_encoder": text_encoder,
                      "tokenizer": tiny_t5_tokenizer(), "scheduler": scheduler}
        if version == "2.2-a14b":
            # A14B's boundary is 0.875. At 0.03 every step of the family tester (the last at t = 47 at shift 7) goes
            # to the first expert, whose LoRA then visibly changes the tiny model's frames (the last, largest step
            # decides them); tests/test_family_wan.py switches at 0.875
            components.update(transformer_2=transformer(1),
                              boundary_ratio=0.03 if boundary_ratio is None else boundary_ratio)
        if ti2v:
            components.update(expand_timesteps=True)
        return components
