"""FLUX.2 [klein] (4B/9B, distilled and base) and FLUX.2 [dev]: an MM-DiT flow transformer on the stacked hidden
states of a Qwen3 (klein) or Mistral 3 (dev) text encoder, latents patchified 2x2 and normalised by the VAE's batch
norm; trajectories with Flow-GRPO's SDE.

What differs from FLUX.1, and where it lives here (checked against diffusers' `Flux2KleinPipeline`):

- prompts go through Qwen3's chat template (no thinking block) and are padded to `max_sequence_length`; the
  conditioning is the hidden states of layers 9, 18 and 27 stacked along the feature axis (`encode_prompt`), with
  its padding (the transformer gets no mask): every prompt has the same length.
- latents are drawn **patchified**: `(B, 4C, h/2, w/2)`, each channel group one 2x2 patch of a `C`-channel VAE
  latent, normalised by the VAE's batch-norm running statistics. Trajectories keep them in that 4-D form (the form
  `Flux2KleinPipeline(latents=...)` takes); `forward` flattens them into tokens `(B, (h/2)(w/2), 4C)` with 4-D
  position ids `(t, h, w, l)` and back (`flux2_pack`, `flux2_unpack`, `flux2_image_ids`, `flux2_text_ids`), and
  `decode` undoes the batch norm and the patchify before the VAE.
- timesteps: sigmas `linspace(1, 1/n, n)` and FLUX.2's empirical `mu` of the token count **and** the step count
  (`compute_empirical_mu`); the transformer takes `t / 1000` (and klein no guidance input).
- CFG: the base models sample with true CFG against the empty prompt (`u + s (c - u)`, `guidance_scale > 1`), the
  step-distilled ones (`is_distilled` in `model_index.json`) with no CFG whatever the scale: `samples_with_cfg` says
  so and rollouts follow the pipeline.
- FLUX.2 [dev] (`Flux2Family`, `Flux2Pipeline`) differs from klein only in its text encoder (Mistral 3, layers 10,
  20 and 30, after a system message) and its guidance: embedded (a transformer input, per row in the conditioning as
  FLUX.1-dev's), with no CFG in its pipeline. Its modular blocks take no guider: its RLG route is the classic
  `Flux2RLGPipeline` (pipelines/pipeline_flux2_rlg.py).
"""

import logging
from typing import List, Tuple

import torch

from ..kernels import FlowSDEKernel
from ..utils.peft_utils import unwrap
from .base import Conditioning, ModelFamily
from .zimage import tiny_qwen_tokenizer

logger = logging.getLogger(__name__)

# Qwen3's chat template for one user message, with the empty thinking block that `enable_thinking=False` (which
# Flux2KleinPipeline passes) adds after the generation prompt
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def flux2_pack(latents: torch.Tensor) -> torch.Tensor:
    """Patchified `(B, C, H, W)` latents to `(B, H W, C)` tokens, row-major (`Flux2KleinPipeline._pack_latents`)."""
    batch, channels, height, width = latents.shape
    return latents.reshape(batch, channels, height * width).permute(0, 2, 1)


def flux2_unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `flux2_pack`: `(B, H W, C)` tokens of an `H x W` grid back to `(B, C, H, W)`."""
    batch, _, channels = tokens.shape
    return tokens.permute(0, 2, 1).reshape(batch, channels, height, width)


def flux2_image_ids(batch: int, height: int, width: int, device) -> torch.Tensor:
    """`(B, H W, 4)` position ids `(t, h, w, l) = (0, row, column, 0)` of an `H x W` token grid, row-major
    (`Flux2KleinPipeline._prepare_latent_ids`)."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width), torch.arange(1))
    return ids.unsqueeze(0).expand(batch, -1, -1).to(device)


def flux2_text_ids(batch: int, length: int, device) -> torch.Tensor:
    """`(B, L, 4)` position ids `(0, 0, 0, l)` of `L` text tokens (`Flux2KleinPipeline._prepare_text_ids`)."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))
    return ids.unsqueeze(0).expand(batch, -1, -1).to(device)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """`(B, 4C, H, W)` patchified latents to the VAE's `(B, C, 2H, 2W)` (`Flux2KleinPipeline._unpatchify_latents`)."""
    batch, channels, height, width = latents.shape
    latents = latents.reshape(batch, channels // 4, 2, 2, height, width).permute(0, 1, 4, 2, 5, 3)
    return latents.reshape(batch, channels // 4, height * 2, width * 2)


def batch_norm_denormalise(latents: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                           eps: float) -> torch.Tensor:
    """`x sqrt(var + eps) + mean` per channel: the model's normalised latents back to the VAE's (patchified), as the
    pipeline undoes `AutoencoderKLFlux2.bn` before decoding."""
    mean = running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(running_var.view(1, -1, 1, 1) + eps).to(latents.device, latents.dtype)
    return latents * std + mean


def tiny_flux2_components(seed: int, joint_attention_dim: int, guidance_embeds: bool) -> dict:
    """The transformer, VAE and scheduler of a tiny FLUX.2: one double- and one single-stream block (16 input channels:
    4-channel latents patchified 2x2; `guidance_embeds`: the embedded guidance of FLUX.2 [dev]), a 4-channel
    `AutoencoderKLFlux2` (vae_scale_factor 4) whose batch-norm statistics are not the identity, and the scheduler
    diffusers' scripts/convert_flux2_to_diffusers.py puts into a FLUX.2 pipeline (FLUX.1-dev's: shift 3, dynamic
    shifting, the default shift bounds; the pipelines pass FLUX.2's empirical `mu`)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=joint_attention_dim, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, block_out_channels=(16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8, layers_per_block=1,
        mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False, sample_size=32,
    )
    generator = torch.Generator().manual_seed(seed)  # batch-norm statistics as a trained VAE has them
    vae.bn.running_mean.copy_(0.1 * torch.randn(vae.bn.num_features, generator=generator))
    vae.bn.running_var.copy_(torch.rand(vae.bn.num_features, generator=generator) + 0.5)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                time_shift_type="exponential")
    return {"transformer": transformer, "vae": vae, "scheduler": scheduler}


class Flux2KleinFamily(ModelFamily):
    name = "flux2"
    pipeline_class = "Flux2KleinPipeline"
    denoiser_name = "transformer"
    denoiser_class = "Flux2Transformer2DModel"
    kernel_class = FlowSDEKernel
    text_encoder_names = ("text_encoder",)
    pipeline_init_kwargs = {}  # no safety checker, no watermarker
    rlg_pipeline_class = None  # no classic RLG pipeline: the RLG guider goes through the modular blocks
    # the base models' modular blocks, which take a `guider` (the RLG guider's place); the distilled models' own
    # `Flux2KleinAutoBlocks` have none, so they take these too, with CFG off (`modular_cfg_guider_for`): the blocks
    # read `is_distilled` from the pipeline's config and encode no negative prompt, and the RLG guider mixes the two
    # models' conditional predictions
    modular_blocks_class = "Flux2KleinBaseAutoBlocks"
    hub_tags = ("flux2", "flux2-klein")
    guidance_kind = "cfg"
    default_guidance_scale = 4.0  # Flux2KleinPipeline's default (the base models; the distilled ones ignore it)
    # diffusers' examples/dreambooth/train_dreambooth_lora_flux2_klein.py (the default without `--lora_layers`): the
    # double-stream blocks' image attention, the single-stream blocks' fused qkv+MLP input projection and, named
    # one by one (a bare `to_out` would also match the double-stream blocks' ModuleList), their output projection
    default_lora_target_modules = ["to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                                   *[f"single_transformer_blocks.{i}.attn.to_out" for i in range(24)]]
    max_sequence_length = 512  # Qwen3 tokens per prompt, Flux2KleinPipeline's default
    text_encoder_out_layers = (9, 18, 27)  # the hidden states the pipeline stacks (its default)
    tiny_variants = {"distilled": {"is_distilled": True}}

    @property
    def is_distilled(self) -> bool:
        """Whether the model is step-distilled (`is_distilled` in model_index.json): it samples with no CFG."""
        return bool(self.pipe.config.get("is_distilled", False))

    without_cfg_because = "this FLUX.2 klein model is step-distilled: Flux2KleinPipeline samples it without CFG"

    # ------------------------------------------------------------------------ RLG
    @classmethod
    def modular_cfg_guider_for(cls, pipe):
        """A distilled model samples without CFG whatever the scale (as `Flux2KleinPipeline`): a disabled CFG guider,
        so its RLG guider mixes the base and aligned models' conditional predictions alone."""
        if not pipe.config.get("is_distilled", False):
            return cls.modular_cfg_guider
        from diffusers.guiders import ClassifierFreeGuidance

        return lambda guidance_scale: ClassifierFreeGuidance(guidance_scale=guidance_scale, enabled=False)

    # -------------------------------------------------------------------- prompts
    def encode_text(self, prompts: List[str], device) -> Conditioning:
        embeds, _ = self.pipe.encode_prompt(list(prompts), device=device, max_sequence_length=self.max_sequence_length,
                                            text_encoder_out_layers=self.text_encoder_out_layers)
        return {"encoder_hidden_states": embeds}

    def samples_with_cfg(self, guidance_scale: float) -> bool:
        """A distilled model samples with no CFG at any scale, as Flux2KleinPipeline does (with a warning)."""
        if self.is_distilled and guidance_scale != 1.0:
            if not getattr(self, "_warned_distilled", False):
                logger.warning(f"guidance scale {guidance_scale} is ignored: {self.without_cfg_because}")
                self._warned_distilled = True
            return False
        return super().samples_with_cfg(guidance_scale)

    # ----------------------------------------------------------- latents and time
    def default_resolution(self) -> int:
        return self.pipe.default_sample_size * self.vae_scale_factor

    @classmethod
    def resolution_limits(cls, denoiser_config, vae_scale_factor: int):
        """The VAE's downsampling, then the 2x2 patchify; rotary position ids bound no size."""
        return vae_scale_factor * 2, None

    def _grid(self, height: int, width: int) -> Tuple[int, int]:
        """The token grid of an image size, rounded down as `Flux2KleinPipeline.prepare_latents` does."""
        multiple = self.vae_scale_factor * 2
        return int(height) // multiple, int(width) // multiple

    def prepare_latents(self, batch_size, height, width, dtype, device, generator, latents=None, denoiser=None):
        """Patchified latents `(B, 4C, h/2, w/2)`, drawn as `Flux2KleinPipeline.prepare_latents` draws them."""
        from diffusers.utils.torch_utils import randn_tensor

        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        shape = (batch_size, self.latent_channels(denoiser), *self._grid(height, width))
        return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype)

    def set_timesteps(self, num_inference_steps: int, device, height: int, width: int) -> torch.Tensor:
        # As Flux2KleinPipeline.__call__: sigmas linspace(1, 1/n, n) (none with `use_flow_sigmas`) and the empirical
        # `mu` of the token count and the step count, always passed (a scheduler without dynamic shifting ignores it)
        import numpy as np
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(self.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        rows, columns = self._grid(height, width)
        mu = compute_empirical_mu(image_seq_len=rows * columns, num_steps=num_inference_steps)
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        return timesteps

    # ------------------------------------------------------------------ denoising
    def forward(self, denoiser, latents, timesteps, cond: Conditioning):
        """One FLUX.2 transformer call on patchified `(B, 4C, h, w)` latents: flattened into tokens with their
        position ids (the same for every row, as in the pipeline), the output folded back."""
        batch, _, rows, columns = latents.shape
        embeds, guidance = cond["encoder_hidden_states"], cond.get("guidance")  # guidance: FLUX.2 [dev] only
        out = denoiser(
            hidden_states=flux2_pack(latents).to(unwrap(denoiser).dtype), timestep=timesteps.to(latents.dtype) / 1000,
            guidance=guidance.float() if guidance is not None else None, encoder_hidden_states=embeds,
            txt_ids=flux2_text_ids(batch, embeds.shape[1], latents.device),
            img_ids=flux2_image_ids(batch, rows, columns, latents.device), return_dict=False,
        )[0]
        return flux2_unpack(out[:, : rows * columns], rows, columns)

    # ------------------------------------------------------------------- decoding
    def decode(self, latents: torch.Tensor, height=None, width=None) -> torch.Tensor:
        """The VAE's batch norm undone (`bn.running_mean`, `running_var`), unpatchified, decoded to `[0, 1]`."""
        vae = self.pipe.vae
        latents = batch_norm_denormalise(latents, vae.bn.running_mean, vae.bn.running_var, vae.config.batch_norm_eps)
        images = vae.decode(unpatchify(latents).to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ----------------------------------------------------------------------- LoRA
    def lora_state_dict(self, denoiser) -> dict:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(denoiser)  # as diffusers' train_dreambooth_lora_flux2_klein.py saves it

    # ------------------------------------------------------------ tiny test model
    @classmethod
    def tiny_components(cls, seed: int = 0, is_distilled: bool = False) -> dict:
        """Components of a tiny random `Flux2KleinPipeline`: `tiny_flux2_components`' transformer (no guidance
        input), VAE and scheduler, a 27-layer Qwen3 (the pipeline stacks layers 9, 18 and 27: joint attention dim
        3 x 16) with a byte-level BPE tokenizer and Qwen3's chat template; `is_distilled` the step-distilled klein (no
        CFG)."""
        from transformers import Qwen3Config, Qwen3ForCausalLM

        hidden = 16
        tokenizer = tiny_qwen_tokenizer()
        tokenizer.add_tokens(["<think>", "</think>"])
        tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
        torch.manual_seed(seed)
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=24,
            num_hidden_layers=max(cls.text_encoder_out_layers), num_attention_heads=2, num_key_value_heads=2,
            head_dim=8, max_position_embeddings=512,
        )).eval()
        return {**tiny_flux2_components(seed, joint_attention_dim=3 * hidden, guidance_embeds=False),
                "text_encoder": text_encoder, "tokenizer": tokenizer, "is_distilled": is_distilled}


# Mistral Small 3's chat template for text-only conversations whose contents are lists of {"type": "text"} parts (as
# Flux2Pipeline's `format_input` writes them): the system prompt, then each user message
MISTRAL3_CHAT_TEMPLATE = (
    "<s>{% for message in messages %}{% set text = message['content'] | map(attribute='text') | join('') %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]{% endif %}{% endfor %}"
)


class Flux2Family(Flux2KleinFamily):
    """FLUX.2 [dev]: klein's transformer, latents, batch norm and schedule, on a Mistral Small 3 text encoder (hidden
    states of layers 10, 20 and 30, after the pipeline's system message) and guidance distilled: the guidance scale is
    a transformer input (`guidance`, one value per row, recorded in the conditioning as FLUX.1's), and
    `Flux2Pipeline` has no CFG at all."""

    name = "flux2-dev"
    pipeline_class = "Flux2Pipeline"
    # diffusers' modular FLUX.2 [dev] blocks take no guider (the guidance is embedded), so the RLG route is a classic
    # RLG pipeline: pipelines/pipeline_flux2_rlg.py, each model with its embedded guidance inside its branch
    rlg_pipeline_class = "Flux2RLGPipeline"
    modular_blocks_class = "Flux2AutoBlocks"
    hub_tags = ("flux2", "flux2-dev")
    guidance_kind = "embedded"
    default_guidance_scale = 4.0  # Flux2Pipeline's default (embedded) `guidance_scale`
    embedded_guidance = default_guidance_scale  # set per run by `configure(embedded_guidance=...)`
    text_encoder_out_layers = (10, 20, 30)  # the hidden states Flux2Pipeline stacks (its default)
    # the klein script's targets (diffusers' train_dreambooth_lora_flux2_klein.py) over dev's 48 single-stream blocks
    default_lora_target_modules = ["to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                                   *[f"single_transformer_blocks.{i}.attn.to_out" for i in range(48)]]
    tiny_variants = {}

    without_cfg_because = ("FLUX.2 [dev] is guidance distilled: Flux2Pipeline has no CFG (its guidance is "
                           "sample_embedded_guidance)")

    @property
    def is_distilled(self) -> bool:
        return True  # guidance distilled: Flux2Pipeline samples without CFG

    @classmethod
    def pipeline_guidance_kwargs(cls, guidance_scale: float, embedded_guidance=None):
        """Flux2Pipeline's `guidance_scale` is the embedded guidance; it has no CFG (`guidance_scale` of a run, the
        CFG scale, has no counterpart)."""
        return {"guidance_scale": cls.default_guidance_scale if embedded_guidance is None else embedded_guidance}

    def uses_embedded_guidance(self) -> bool:
        return bool(unwrap(self.denoiser).config.get("guidance_embeds", False))

    def conditioning(self, prompts: List[str], negative_prompt: str, do_cfg: bool, height: int, width: int):
        """As `ModelFamily.conditioning`, plus the embedded guidance per row (`guidance`, float32 as Flux2Pipeline)."""
        cond, negative = super().conditioning(prompts, negative_prompt, do_cfg, height, width)
        if self.uses_embedded_guidance():
            device = cond["encoder_hidden_states"].device
            cond = {**cond, "guidance": torch.full((len(prompts),), self.embedded_guidance, device=device,
                                                   dtype=torch.float32)}
        return cond, negative

    @classmethod
    def tiny_components(cls, seed: int = 0) -> dict:
        """Components of a tiny random `Flux2Pipeline`: `tiny_flux2_components`' transformer (with the guidance
        input), VAE and scheduler, a Mistral 3 with a 30-layer language model (the pipeline stacks layers 10, 20, 30)
        and a tiny Pixtral vision tower, and as its `tokenizer` a byte-level BPE tokenizer with Mistral's chat
        template. The real model's `tokenizer` is a `PixtralProcessor`, which transformers builds only with
        torchvision; Flux2Pipeline calls nothing of it but `apply_chat_template` on text, which this tokenizer has."""
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

        hidden = 16
        tokenizer = tiny_qwen_tokenizer()
        tokenizer.add_special_tokens({"additional_special_tokens": [
            "<s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]})
        tokenizer.chat_template = MISTRAL3_CHAT_TEMPLATE
        torch.manual_seed(seed)
        text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
            vision_config=PixtralVisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                              num_attention_heads=2, head_dim=8, image_size=16, patch_size=4),
            text_config=MistralConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=24,
                                      num_hidden_layers=max(cls.text_encoder_out_layers), num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=8, max_position_embeddings=1024),
            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
        )).eval()
        return {**tiny_flux2_components(seed, joint_attention_dim=3 * hidden, guidance_embeds=True),
                "text_encoder": text_encoder, "tokenizer": tokenizer}
