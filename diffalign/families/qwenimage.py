"""Qwen-Image (and Qwen-Image 2512): a 20B double-stream MM-DiT flow transformer on the last hidden states of a
Qwen2.5-VL text encoder, latents packed 2x2 into tokens; trajectories with Flow-GRPO's SDE.

What differs from FLUX.1, and where it lives here:

- prompts are wrapped in Qwen-Image's prompt template (a system message, then the prompt as the user message) and
  encoded to the text encoder's last hidden states; the template's first `prompt_template_encode_start_idx` tokens
  (the system message and `<|im_start|>user\\n`) and the padding are dropped, so each prompt's conditioning has its
  own length. `encode_text` is `QwenImagePipeline.encode_prompt`; the per-prompt cache keeps each prompt's real
  tokens only (`cache_row`) and `ModelFamily.encode_prompts` pads each batch to its longest prompt
  (`diffalign.families.base.cat_rows`), with the mask `encoder_hidden_states_mask`.
- guidance is **true CFG** only (`true_cfg_scale` with a negative prompt; no embedded guidance in Qwen-Image):
  `u + s (c - u)`, then rescaled per token to the norm of the conditional prediction (`true_cfg_rescaled`), as
  `QwenImagePipeline.__call__`. `predict` runs both halves in one forward (conditional rows first), padded to a
  common text length, as Flow-GRPO's Qwen-Image trainer does.
- latents are packed 2x2 (`diffalign.families.packed_latents`); the VAE (`AutoencoderKLQwenImage`) is a video VAE
  with a frame axis and per-channel `latents_mean` / `latents_std` in place of a scaling factor and shift.
- the transformer takes `img_shapes` (frames, rows, columns of the packed grid) for its rotary embedding, and the
  text mask; text positions follow the image's, so padding the text changes nothing but the mask.
- timesteps: sigmas `linspace(1, 1/n, n)` and the dynamic shift `mu` from the image sequence length, as
  `QwenImagePipeline.__call__` (Qwen-Image's scheduler shifts exponentially with a terminal sigma of 0.02).
"""

from typing import List, Optional

import torch

from ..kernels import FlowSDEKernel
from .base import Conditioning, ModelFamily, cat_rows
from .packed_latents import pack_latents, packed_grid, unpack_latents


def true_cfg_rescaled(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen-Image's true CFG: `u + s (c - u)`, rescaled so that each token (the last axis) keeps the norm of the
    conditional prediction `c` (`QwenImagePipeline.__call__`'s `comb_pred * (cond_norm / noise_norm)`)."""
    combined = uncond + scale * (cond - uncond)
    return combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))


# Qwen-Image's prompt template (QwenImagePipeline.prompt_template_encode): its system message and the user turn's
# opening are the first 34 tokens of Qwen2.5-VL's tokenizer, which the pipeline drops after encoding
TEMPLATE_WORDS = ("system user assistant Describe Ġthe Ġimage Ġby Ġdetailing Ġcolor Ġshape Ġsize Ġtexture Ġquantity "
                  "Ġtext Ġspatial Ġrelationships Ġof Ġobjects Ġand Ġbackground").split()
# a few words of the tests' prompts, whole tokens as in a real vocabulary
PROMPT_WORDS = "Ġa Ġphoto Ġcat Ġred Ġcar Ġdog".split()
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                  "<|video_pad|>"]


def word_merges(words: List[str]) -> List[tuple]:
    """Byte-pair merges that build each word (in byte-level symbols, `Ġ` for a leading space) left to right, in
    order and without repeats: `("Ġ", "c"), ("Ġc", "a"), ("Ġca", "t")` makes `Ġcat` one token."""
    merges = []
    for word in words:
        for end in range(1, len(word)):
            merge = (word[:end], word[end])
            if merge not in merges:
                merges.append(merge)
    return merges


def tiny_qwen2_tokenizer(model_max_length: int = 1024):
    """A byte-level BPE `Qwen2Tokenizer` built in code from vocabulary and merges objects (no files, no hub): the 256
    byte symbols, whole-word merges for the words of Qwen-Image's prompt template (so that its system prefix is 34
    tokens, as with Qwen2.5-VL's tokenizer) and of the tests' prompts, and Qwen2.5-VL's chat and vision tokens
    (`<|endoftext|>` pads)."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = word_merges(TEMPLATE_WORDS + PROMPT_WORDS)
    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    for first, second in merges:
        vocab.setdefault(first + second, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return tokenizer


class QwenImageFamily(ModelFamily):
    name = "qwenimage"
    pipeline_class = "QwenImagePipeline"
    denoiser_name = "transformer"
    denoiser_class = "QwenImageTransformer2DModel"
    kernel_class = FlowSDEKernel
    text_encoder_names = ("text_encoder",)
    pipeline_init_kwargs = {}  # no safety checker, no watermarker
    rlg_pipeline_class = None  # no RLG pipeline: `generate` refuses Qwen-Image models
    # diffusers' modular Qwen-Image (its blocks take a `guider`), the RLG route through modular blocks
    modular_blocks_class = "QwenImageAutoBlocks"
    hub_tags = ("qwen-image",)
    guidance_kind = "true_cfg"
    default_guidance_scale = 4.0  # QwenImagePipeline's default `true_cfg_scale`
    # both streams' attention projections and feed-forwards of every QwenImageTransformerBlock: Flow-GRPO's
    # scripts/train_qwenimage.py list, in diffusers' module names (the transformer's tensor-parallel plan names the
    # same twelve); diffusers' train_dreambooth_lora_qwen_image.py defaults to the image stream's attention alone
    # (`to_k`, `to_q`, `to_v`, `to_out.0`), which `lora_target_modules` selects
    default_lora_target_modules = [
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
    ]
    max_sequence_length = 512  # text tokens per prompt at most, QwenImagePipeline.__call__'s default
    # Qwen-Image-Lightning's scheduler (the few-step distilled LoRAs: a fixed exponential shift 3, no terminal sigma)
    tiny_variants = {"lightning": {"lightning_scheduler": True}}

    # -------------------------------------------------------------------- prompts
    def encode_text(self, prompts: List[str], device) -> Conditioning:
        """The pipeline's own encoding (template, last hidden states, template prefix dropped), padded to the
        longest prompt, with the mask of each prompt's real tokens."""
        embeds, mask = self.pipe.encode_prompt(list(prompts), device=device,
                                               max_sequence_length=self.max_sequence_length)
        if mask is None:  # the pipeline drops an all-true mask (prompts of one length)
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask.bool()}

    def cache_row(self, encoded: Conditioning, index: int) -> Conditioning:
        """A prompt's real tokens alone, so that a batch is padded to its own longest prompt (`cat_rows`)."""
        length = int(encoded["encoder_hidden_states_mask"][index].sum())
        return {k: v[index, :length] for k, v in encoded.items()}

    # ----------------------------------------------------------- latents and time
    def default_resolution(self) -> int:
        return self.pipe.default_sample_size * self.vae_scale_factor  # 1024 for Qwen-Image

    @classmethod
    def resolution_limits(cls, denoiser_config, vae_scale_factor: int):
        """The VAE's downsampling, then 2x2 packing; the rotary tables (4096 positions each way) bound no size a
        model of this family samples."""
        return vae_scale_factor * denoiser_config.get("patch_size", 2), None

    def latent_channels(self, denoiser=None) -> int:
        return super().latent_channels(denoiser) // 4  # the transformer sees 2x2-packed channels

    def _grid(self, height: int, width: int):
        """The packed token grid `(rows, columns)` of an image size, as `QwenImagePipeline.prepare_latents`."""
        return packed_grid(height, width, self.vae_scale_factor)

    def add_resolution(self, cond: Conditioning, height: int, width: int) -> Conditioning:
        """Adds `image_size` `(B, 2)`: packed latents do not say their 2-D grid, which `forward` needs
        (`img_shapes`)."""
        embeds = cond["encoder_hidden_states"]
        size = torch.tensor([int(height), int(width)], device=embeds.device)
        return {**cond, "image_size": size.expand(embeds.shape[0], 2).clone()}

    def prepare_latents(self, batch_size, height, width, dtype, device, generator, latents=None, denoiser=None):
        """Packed latents `(B, rows * columns, 4C)`: Gaussian noise drawn as `QwenImagePipeline.prepare_latents` draws
        it (a frame axis of 1: the same numbers for the same generator), then packed."""
        from diffusers.utils.torch_utils import randn_tensor

        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        rows, columns = self._grid(height, width)
        shape = (batch_size, 1, self.latent_channels(denoiser), 2 * rows, 2 * columns)
        noise = randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype)
        return pack_latents(noise[:, 0])

    def set_timesteps(self, num_inference_steps: int, device, height: int, width: int) -> torch.Tensor:
        # As QwenImagePipeline.__call__: sigmas linspace(1, 1/n, n) and `mu` from the image sequence length.
        import numpy as np
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

        scheduler = self.scheduler
        rows, columns = self._grid(height, width)
        mu = calculate_shift(
            rows * columns, scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        return timesteps

    # ------------------------------------------------------------------ denoising
    def forward(self, denoiser, latents, timesteps, cond: Conditioning):
        """One Qwen-Image transformer call on packed latents; any batch of rows (CFG doubles it). The text is cut to
        the batch's longest prompt, and the mask is dropped when no row is padded, as in the pipeline."""
        mask = cond["encoder_hidden_states_mask"]
        length = int(mask.sum(1).max())
        embeds, mask = cond["encoder_hidden_states"][:, :length], mask[:, :length]
        height, width = cond["image_size"][0].tolist()
        rows, columns = self._grid(height, width)
        return denoiser(
            hidden_states=latents, timestep=timesteps.to(latents.dtype) / 1000, encoder_hidden_states=embeds,
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[[(1, rows, columns)]] * latents.shape[0], return_dict=False,
        )[0]

    def predict(self, denoiser, latents, timesteps, cond: Conditioning, negative: Optional[Conditioning],
                guidance_scale: float) -> torch.Tensor:
        """True CFG as QwenImagePipeline: one forward of `[conditional, negative]` rows (text padded to a common
        length), then `true_cfg_rescaled`."""
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        if negative is None:
            return self.forward(denoiser, latents, timesteps, cond)
        both = {k: cat_rows([cond[k], negative[k]]) for k in cond}
        text, uncond = self.forward(denoiser, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                                    both).chunk(2)
        return true_cfg_rescaled(text, uncond, guidance_scale)

    # ------------------------------------------------------------------- decoding
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Unpacks to `(B, C, 1, h, w)` (one frame), undoes the per-channel normalisation (`latents * std + mean`,
        the VAE's `latents_std` / `latents_mean`) and decodes the frame."""
        vae = self.pipe.vae
        latents = unpack_latents(latents, height, width, self.vae_scale_factor)[:, :, None].to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        images = vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ----------------------------------------------------------------------- LoRA
    def lora_state_dict(self, denoiser) -> dict:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(denoiser)  # as diffusers' train_dreambooth_lora_qwen_image.py saves it

    # --------------------------------------------------------- tiny test models
    @classmethod
    def tiny_components(cls, seed: int = 0, lightning_scheduler: bool = False) -> dict:
        """A tiny Qwen-Image: a 2-block transformer (64 input channels: the 16-channel latents packed 2x2), a
        16-channel `AutoencoderKLQwenImage` with Qwen-Image's `latents_mean` / `latents_std` (vae_scale_factor 8, as
        Qwen-Image's), a 2-layer Qwen2.5-VL (text model and a 1-block vision tower), the byte-level BPE tokenizer of
        `tiny_qwen2_tokenizer`, and Qwen-Image's scheduler (dynamic exponential shift, terminal sigma 0.02), or with
        `lightning_scheduler` Qwen-Image-Lightning's (`base_shift = max_shift = log 3`, no terminal sigma)."""
        import math

        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
        )
        torch.manual_seed(seed)
        # AutoencoderKLQwenImage's defaults for latents_mean / latents_std are Qwen-Image's
        vae = AutoencoderKLQwenImage(base_dim=4, z_dim=16, dim_mult=[1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True])
        tokenizer = tiny_qwen2_tokenizer()
        ids = tokenizer.convert_tokens_to_ids
        torch.manual_seed(seed)
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(
                hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
                rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
                bos_token_id=tokenizer.pad_token_id, eos_token_id=ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id,
            ),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32),
            vocab_size=len(tokenizer), image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        )).eval()
        if lightning_scheduler:  # the scheduler published with Qwen-Image-Lightning ("shift=3 in distillation")
            shifts = dict(base_shift=math.log(3), max_shift=math.log(3), shift_terminal=None)
        else:  # Qwen/Qwen-Image's scheduler/scheduler_config.json
            shifts = dict(base_shift=0.5, max_shift=0.9, shift_terminal=0.02)
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_image_seq_len=256,
            max_image_seq_len=8192, time_shift_type="exponential", **shifts,
        )
        return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
                "scheduler": scheduler}
