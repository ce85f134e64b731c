"""Stable Diffusion 1.x / 2.x: a UNet with cross-attention on one CLIP text encoder, DDIM(eta) trajectories."""

from typing import List

from ..kernels import DDIMKernel
from .base import Conditioning, ModelFamily


class StableDiffusionFamily(ModelFamily):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    denoiser_name = "unet"
    kernel_class = DDIMKernel
    text_encoder_names = ("text_encoder",)
    default_lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    load_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def encode_text(self, prompts: List[str], device) -> Conditioning:
        embeds, _ = self.pipe.encode_prompt(prompts, device, 1, False)
        return {"encoder_hidden_states": embeds}

    def forward(self, denoiser, latents, timesteps, cond: Conditioning):
        latents = self.scheduler.scale_model_input(latents, timesteps)
        return denoiser(latents, timesteps, encoder_hidden_states=cond["encoder_hidden_states"]).sample
