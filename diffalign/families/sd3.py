"""Stable Diffusion 3 / 3.5: an MM-DiT transformer on two CLIP text encoders and an optional T5, flow matching;
trajectories with Flow-GRPO's SDE."""

from typing import List

from ..kernels import FlowSDEKernel
from ..utils.peft_utils import unwrap
from .base import Conditioning, ModelFamily


class StableDiffusion3Family(ModelFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    kernel_class = FlowSDEKernel
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
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

    def resolution_multiple(self) -> int:
        return self.vae_scale_factor * unwrap(self.denoiser).config.patch_size

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
