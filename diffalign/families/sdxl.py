"""Stable Diffusion XL: a UNet conditioned on two CLIP text encoders (concatenated hidden states), the pooled
embedding of the second and the size/crop time ids; DDIM(eta) trajectories."""

from typing import List

import torch

from ..kernels import DDIMKernel
from .base import Conditioning, ModelFamily


class StableDiffusionXLFamily(ModelFamily):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    denoiser_name = "unet"
    kernel_class = DDIMKernel
    text_encoder_names = ("text_encoder", "text_encoder_2")
    denoiser_class = "UNet2DConditionModel"
    default_lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    pipeline_init_kwargs = {"add_watermarker": False}
    rlg_pipeline_class = "StableDiffusionXLRLGPipeline"
    modular_blocks_class = "StableDiffusionXLAutoBlocks"
    hub_tags = ("stable-diffusion-xl",)
    guidance_kind = "cfg"

    def encode_text(self, prompts: List[str], device) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def negative_conditioning(self, negative_prompt: str, batch_size: int) -> Conditioning:
        # As StableDiffusionXLPipeline with `negative_prompt=None`: zeros when the model asks for them.
        if not negative_prompt and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            cond = self.encode_prompts([""] * batch_size)
            return {k: torch.zeros_like(v) for k, v in cond.items()}
        return super().negative_conditioning(negative_prompt, batch_size)

    def add_resolution(self, cond: Conditioning, height: int, width: int) -> Conditioning:
        text_encoder_2 = self.pipe.text_encoder_2
        projection_dim = (
            int(cond["text_embeds"].shape[-1]) if text_encoder_2 is None else text_encoder_2.config.projection_dim
        )
        time_ids = self.pipe._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=cond["encoder_hidden_states"].dtype,
            text_encoder_projection_dim=projection_dim,
        )
        batch = cond["encoder_hidden_states"].shape[0]
        return {**cond, "time_ids": time_ids.to(cond["encoder_hidden_states"].device).repeat(batch, 1)}

    def forward(self, denoiser, latents, timesteps, cond: Conditioning):
        latents = self.scheduler.scale_model_input(latents, timesteps)
        return denoiser(
            latents, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]},
        ).sample

    @classmethod
    def tiny_components(cls, seed: int = 0, sample_size: int = 16) -> dict:
        """Components of a tiny random `StableDiffusionXLPipeline`, after diffusers' own SDXL tests: two CLIP text
        encoders (the second with a projection: the pooled embedding), a UNet with the text-time embedding
        (`projection_class_embeddings_input_dim` = 6 time ids x 8 + the pooled size 32)."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from .tiny import offline_clip_tokenizer, tiny_clip_text_kwargs, tiny_ddim_scheduler, tiny_vae

        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,
            cross_attention_dim=64,  # both text encoders' hidden states, concatenated
            norm_num_groups=8,
        )
        vae = tiny_vae(seed, sample_size * 2)
        config = CLIPTextConfig(**tiny_clip_text_kwargs(projection_dim=32))
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(config)
        text_encoder_2 = CLIPTextModelWithProjection(config)
        return {
            "unet": unet,
            "vae": vae,
            "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2,
            "tokenizer": offline_clip_tokenizer(),
            "tokenizer_2": offline_clip_tokenizer(),
            "scheduler": tiny_ddim_scheduler(),
            "image_encoder": None,
            "feature_extractor": None,
        }
