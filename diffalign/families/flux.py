"""FLUX.1 (dev, schnell): a guidance-distilled MM-DiT flow transformer on CLIP (pooled) and T5 text, latents packed
2x2 into tokens; trajectories with Flow-GRPO's SDE.

What differs from SD3, and where it lives here:

- the guidance scale of FLUX.1-dev is an **input** of the transformer (`guidance`, when `guidance_embeds`), not a CFG
  pair: `embedded_guidance` (the run's `sample_embedded_guidance`, default 3.5 as `FluxPipeline`) travels in the
  conditioning mapping as one value per row, so a recorded trajectory is re-evaluated with the guidance it was
  sampled with. The generic CFG of `ModelFamily.predict` (`sample_guidance_scale != 1`, a negative prompt) is
  FluxPipeline's optional *true* CFG (`true_cfg_scale`); both halves then go through one forward.
- latents are packed: `(B, (h/2)(w/2), 4C)` (`diffalign.families.packed_latents`). `prepare_latents` returns packed
  latents (as `FluxPipeline`), the kernels step them as they are, `decode` unpacks them. `img_ids`/`txt_ids` are
  not per row: `forward` builds them from the shapes, as the pipeline does.
- timesteps: FLUX's sigmas `linspace(1, 1/n, n)` and the dynamic shift `mu` from the image sequence length, exactly
  as `FluxPipeline.__call__`; the transformer takes `t / 1000`.
"""

from typing import List, Tuple

import torch

from ..kernels import FlowSDEKernel
from ..utils.peft_utils import unwrap
from .base import Conditioning, ModelFamily
from .packed_latents import latent_image_ids, pack_latents, packed_grid, unpack_latents


class FluxFamily(ModelFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    denoiser_name = "transformer"
    kernel_class = FlowSDEKernel
    denoiser_class = "FluxTransformer2DModel"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    pipeline_init_kwargs = {}  # no safety checker, no watermarker
    rlg_pipeline_class = "FluxRLGPipeline"
    # diffusers' modular FLUX takes no guider (FLUX.1-dev's guidance is embedded), so the RLG guider does not apply
    modular_blocks_class = "FluxAutoBlocks"
    hub_tags = ("flux",)
    guidance_kind = "embedded"
    default_guidance_scale = 3.5  # FluxPipeline's default (embedded) `guidance_scale`
    tiny_variants = {"schnell": {"guidance_embeds": False, "use_dynamic_shifting": False}}
    # diffusers' examples/dreambooth/train_dreambooth_lora_flux.py (the default `--lora_layers`): the attention of
    # both streams of the double-stream blocks and their feed-forwards; the single-stream blocks' attention matches
    # the `attn.to_q/k/v` suffixes too.
    default_lora_target_modules = [
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    ]
    max_sequence_length = 512  # T5 tokens, FluxPipeline's default (FLUX.1-dev; Flow-GRPO and DanceGRPO train so)
    embedded_guidance = default_guidance_scale  # set per run by `configure(embedded_guidance=...)`

    # -------------------------------------------------------------------- prompts
    def encode_text(self, prompts: List[str], device) -> Conditioning:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def uses_embedded_guidance(self) -> bool:
        return bool(unwrap(self.denoiser).config.get("guidance_embeds", False))

    def conditioning(self, prompts: List[str], negative_prompt: str, do_cfg: bool, height: int, width: int):
        """As `ModelFamily.conditioning`, plus the embedded guidance per row (`guidance`, float32 as FluxPipeline)."""
        cond, negative = super().conditioning(prompts, negative_prompt, do_cfg, height, width)
        if self.uses_embedded_guidance():
            device = cond["encoder_hidden_states"].device
            guidance = torch.full((len(prompts),), self.embedded_guidance, device=device, dtype=torch.float32)
            cond = {**cond, "guidance": guidance}
            if negative is not None:
                negative = {**negative, "guidance": guidance.clone()}
        return cond, negative

    # ----------------------------------------------------------- latents and time
    def default_resolution(self) -> int:
        return self.pipe.default_sample_size * self.vae_scale_factor

    @classmethod
    def resolution_limits(cls, denoiser_config, vae_scale_factor: int):
        """The VAE's downsampling, then 2x2 packing; rotary position ids bound no size (no `pos_embed_max_size`)."""
        patches = denoiser_config.get("pos_embed_max_size")
        return vae_scale_factor * 2, patches * vae_scale_factor * 2 if patches else None

    def latent_channels(self, denoiser=None) -> int:
        return super().latent_channels(denoiser) // 4  # the transformer sees 2x2-packed channels

    def _grid(self, height: int, width: int) -> Tuple[int, int]:
        """The packed token grid `(rows, columns)` of an image size, as `FluxPipeline.prepare_latents` rounds it."""
        return packed_grid(height, width, self.vae_scale_factor)

    def add_resolution(self, cond: Conditioning, height: int, width: int) -> Conditioning:
        """Adds `image_size` `(B, 2)`: packed latents do not say their 2-D grid, which `forward` needs (img_ids)."""
        batch = cond["encoder_hidden_states"].shape[0]
        size = torch.tensor([int(height), int(width)], device=cond["encoder_hidden_states"].device)
        return {**cond, "image_size": size.expand(batch, 2).clone()}

    def prepare_latents(self, batch_size, height, width, dtype, device, generator, latents=None, denoiser=None):
        """Packed latents `(B, (h/2)(w/2), 4C)`: Gaussian noise drawn as `FluxPipeline.prepare_latents` draws it (the
        same numbers for the same generator), then packed (given `latents` must be packed already)."""
        from diffusers.utils.torch_utils import randn_tensor

        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        rows, columns = self._grid(height, width)
        shape = (batch_size, self.latent_channels(denoiser), 2 * rows, 2 * columns)
        return pack_latents(randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype))

    def set_timesteps(self, num_inference_steps: int, device, height: int, width: int) -> torch.Tensor:
        # As FluxPipeline.__call__: sigmas linspace(1, 1/n, n) (none with `use_flow_sigmas`) and `mu` from the image
        # sequence length, always passed (a scheduler without dynamic shifting ignores it).
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        scheduler = self.scheduler
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        rows, columns = self._grid(height, width)
        mu = calculate_shift(
            rows * columns, scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        return timesteps

    # ------------------------------------------------------------------ denoising
    def forward(self, denoiser, latents, timesteps, cond: Conditioning):
        """One FLUX transformer call on packed latents; any batch of rows (CFG doubles it): the position ids are the
        same for every row, built from the shapes as in `FluxPipeline`."""
        height, width = cond["image_size"][0].tolist()
        rows, columns = self._grid(height, width)
        embeds = cond["encoder_hidden_states"]
        img_ids = latent_image_ids(rows, columns, latents.device, embeds.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=embeds.dtype)
        guidance = cond.get("guidance")
        return denoiser(
            hidden_states=latents, timestep=timesteps.to(latents.dtype) / 1000,
            guidance=guidance.float() if guidance is not None else None,
            pooled_projections=cond["pooled_projections"], encoder_hidden_states=embeds, txt_ids=txt_ids,
            img_ids=img_ids, return_dict=False,
        )[0]

    # ------------------------------------------------------------------- decoding
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Unpacks (`packed_latents.unpack_latents`), then `latents / scaling_factor + shift_factor` and the VAE."""
        return super().decode(unpack_latents(latents, height, width, self.vae_scale_factor), height, width)

    # ----------------------------------------------------------------------- LoRA
    def lora_state_dict(self, denoiser) -> dict:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(denoiser)  # as diffusers' train_dreambooth_lora_flux.py saves it

    # ------------------------------------------------------------ tiny test model
    @classmethod
    def tiny_components(cls, seed: int = 0, guidance_embeds: bool = True, use_dynamic_shifting: bool = True) -> dict:
        """Components of a tiny random `FluxPipeline`: a FLUX transformer with one double- and one single-stream block
        (16 input channels: the 4-channel latents packed 2x2), the embedded guidance of FLUX.1-dev (`guidance_embeds`;
        False is FLUX.1-schnell), a CLIP text encoder (its pooled output) and a tiny T5, a 4-channel VAE with FLUX's
        latent scaling and shift, and FLUX.1-dev's scheduler (dynamic shifting from the image sequence length; with
        `use_dynamic_shifting=False`, FLUX.1-schnell's fixed shift 1)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from .tiny import offline_clip_tokenizer, tiny_clip_text_kwargs, tiny_t5_encoder, tiny_t5_tokenizer, tiny_vae

        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
            guidance_embeds=guidance_embeds,
        )
        vae = tiny_vae(seed, 32, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                       scaling_factor=0.3611)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_clip_text_kwargs()))
        if use_dynamic_shifting:  # FLUX.1-dev's scheduler_config.json
            scheduler = FlowMatchEulerDiscreteScheduler(
                shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                max_image_seq_len=4096,
            )
        else:  # FLUX.1-schnell's
            scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
        return {
            "transformer": transformer,
            "vae": vae,
            "text_encoder": text_encoder,
            "text_encoder_2": tiny_t5_encoder(seed),
            "tokenizer": offline_clip_tokenizer(),
            "tokenizer_2": tiny_t5_tokenizer(),
            "scheduler": scheduler,
        }
