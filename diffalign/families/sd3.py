"""Stable Diffusion 3 / 3.5: an MM-DiT transformer on two CLIP text encoders and an optional T5, flow matching;
trajectories with Flow-GRPO's SDE."""

from typing import List

import torch

from ..kernels import FlowSDEKernel
from ..utils.peft_utils import unwrap
from .base import Conditioning, ModelFamily


class StableDiffusion3Family(ModelFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    kernel_class = FlowSDEKernel
    denoiser_class = "SD3Transformer2DModel"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    pipeline_init_kwargs = {}  # no safety checker, no watermarker
    rlg_pipeline_class = "StableDiffusion3RLGPipeline"
    modular_blocks_class = "StableDiffusion3AutoBlocks"
    hub_tags = ("sd3",)
    guidance_kind = "cfg"
    tiny_variants = {"without_t5": {"with_t5": False}}
    # Flow-GRPO's SD3.5 LoRA targets (config/grpo.py): joint attention of the image and the text stream.
    default_lora_target_modules = [
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
    ]
    max_sequence_length = 256  # T5 tokens: StableDiffusion3Pipeline's default (Flow-GRPO trains SD3.5 with 128)

    def encode_text(self, prompts: List[str], device) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    @classmethod
    def resolution_limits(cls, denoiser_config, vae_scale_factor: int):
        """Patches of `patch_size` latents; the learned position embedding covers at most `pos_embed_max_size`
        patches per side (larger images fail inside the transformer)."""
        multiple = vae_scale_factor * denoiser_config["patch_size"]
        patches = denoiser_config.get("pos_embed_max_size")
        return multiple, patches * multiple if patches else None

    def set_timesteps(self, num_inference_steps: int, device, height: int, width: int):
        # As StableDiffusion3Pipeline: `mu` from the image sequence length when the scheduler shifts dynamically.
        scheduler = self.scheduler
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            patch = unwrap(self.denoiser).config.patch_size
            seq_len = (height // self.vae_scale_factor // patch) * (width // self.vae_scale_factor // patch)
            kwargs["mu"] = calculate_shift(
                seq_len, scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
        return scheduler.timesteps

    def forward(self, denoiser, latents, timesteps, cond: Conditioning):
        return denoiser(
            hidden_states=latents, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"], return_dict=False,
        )[0]

    def lora_state_dict(self, denoiser) -> dict:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(denoiser)  # as diffusers' train_dreambooth_lora_sd3.py saves it

    @classmethod
    def tiny_components(cls, seed: int = 0, sample_size: int = 8, with_t5: bool = True) -> dict:
        """Components of a tiny random `StableDiffusion3Pipeline`: an MM-DiT transformer, two CLIP text encoders with
        projections, a tiny T5 (or none: the pipeline then feeds zeros), a flow-matching scheduler with shift 3."""
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        from .tiny import (
            offline_clip_tokenizer,
            tiny_clip_text_kwargs,
            tiny_flow_scheduler,
            tiny_t5_encoder,
            tiny_t5_tokenizer,
            tiny_vae,
        )

        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=1,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
        )
        vae = tiny_vae(seed, sample_size * 2, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                       scaling_factor=1.5035)
        config = CLIPTextConfig(**tiny_clip_text_kwargs(projection_dim=32))
        torch.manual_seed(seed)
        text_encoder = CLIPTextModelWithProjection(config)
        torch.manual_seed(seed + 1)
        text_encoder_2 = CLIPTextModelWithProjection(config)
        return {
            "transformer": transformer,
            "vae": vae,
            "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2,
            "text_encoder_3": tiny_t5_encoder(seed) if with_t5 else None,
            "tokenizer": offline_clip_tokenizer(),
            "tokenizer_2": offline_clip_tokenizer(),
            "tokenizer_3": tiny_t5_tokenizer() if with_t5 else None,
            "scheduler": tiny_flow_scheduler(),
        }
