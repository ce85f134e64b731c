"""Stable Diffusion 1.x / 2.x: a UNet with cross-attention on one CLIP text encoder, DDIM(eta) trajectories."""

from typing import List

import torch

from ..kernels import DDIMKernel
from .base import Conditioning, ModelFamily


class StableDiffusionFamily(ModelFamily):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    denoiser_name = "unet"
    kernel_class = DDIMKernel
    text_encoder_names = ("text_encoder",)
    denoiser_class = "UNet2DConditionModel"
    default_lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    pipeline_init_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    rlg_pipeline_class = "StableDiffusionRLGPipeline"
    modular_blocks_class = None  # diffusers has no modular Stable Diffusion 1.x/2.x pipeline
    hub_tags = ("stable-diffusion",)
    guidance_kind = "cfg"
    tiny_variants = {"v_prediction": {"prediction_type": "v_prediction"}}

    def encode_text(self, prompts: List[str], device) -> Conditioning:
        embeds, _ = self.pipe.encode_prompt(prompts, device, 1, False)
        return {"encoder_hidden_states": embeds}

    def forward(self, denoiser, latents, timesteps, cond: Conditioning):
        latents = self.scheduler.scale_model_input(latents, timesteps)
        return denoiser(latents, timesteps, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    @classmethod
    def tiny_components(cls, seed: int = 0, sample_size: int = 16, prediction_type: str = "epsilon") -> dict:
        """Returns the components of a tiny `StableDiffusionPipeline` (random weights, fixed seed).

        Args:
            seed (`int`, *optional*, defaults to 0):
                Seed of the random initialisation; the same seed gives the same weights.
            sample_size (`int`, *optional*, defaults to 16):
                Latent side length; images are twice as large (the tiny VAE downsamples by 2).
            prediction_type (`str`, *optional*, defaults to `"epsilon"`):
                `"epsilon"` or `"v_prediction"`, set on the scheduler.
        """
        from transformers import CLIPTextConfig, CLIPTextModel

        from .tiny import offline_clip_tokenizer, tiny_clip_text_kwargs, tiny_ddim_scheduler, tiny_unet, tiny_vae

        unet = tiny_unet(seed, sample_size)
        vae = tiny_vae(seed, sample_size * 2)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_clip_text_kwargs()))
        scheduler = tiny_ddim_scheduler(prediction_type=prediction_type)
        return {
            "unet": unet,
            "vae": vae,
            "text_encoder": text_encoder,
            "tokenizer": offline_clip_tokenizer(),
            "scheduler": scheduler,
            "safety_checker": None,
            "feature_extractor": None,
        }
