"""Z-Image (and Z-Image-Turbo): a single-stream flow DiT on a Qwen3 text encoder's hidden states; trajectories with
Flow-GRPO's SDE.

What differs from SD3 and FLUX, and where it lives here:

- prompts are wrapped in Qwen3's chat template and encoded to the second-to-last hidden states of the text encoder,
  **only the prompt's real tokens** (`ZImagePipeline.encode_prompt` drops the padding): the conditioning is of
  variable length. `encode_text` pads each prompt's states to `max_sequence_length` and keeps the mask
  (`encoder_attention_mask`), so that per-prompt cache entries stack into batches; `forward` cuts each row back to
  its own tokens, so the transformer sees exactly the pipeline's lists.
- the transformer takes lists (one `(C, 1, H, W)` latent and one `(L_i, D)` caption per row), the time as
  `(1000 - t) / 1000` and predicts the negative of the flow velocity that `FlowMatchEulerDiscreteScheduler` steps:
  `forward` negates it, as the pipeline does.
- CFG is written `c + g (c - u)` in `ZImagePipeline` (g = 0: no CFG), the usual `u + s (c - u)` with `s = g + 1`:
  `pipeline_guidance_kwargs` maps a rollout's scale `s` to the pipeline's `g = s - 1`, and `predict` evaluates it in
  the pipeline's order (conditional half first) and form, so a rollout is the pipeline's sampling. The pipeline's
  optional `cfg_normalization` and `cfg_truncation` (off by default) are not used by rollouts.
- latents are not packed (the transformer patchifies 2x2 itself); sigmas `linspace(1, 1/n, n)` and the dynamic
  shift `mu` from the number of 2x2 patches, as `ZImagePipeline.__call__`.
"""

from typing import List, Optional

import torch

from ..kernels import FlowSDEKernel
from ..utils.peft_utils import unwrap
from .base import Conditioning, ModelFamily


def pad_rows(rows: List[torch.Tensor], length: int):
    """`(padded, mask)`: variable-length `(L_i, D)` rows zero-padded to `(B, length, D)`, and the `(B, length)` mask
    of their real tokens (each `L_i <= length`)."""
    padded = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    mask = torch.zeros(len(rows), length, dtype=torch.bool, device=rows[0].device)
    for i, row in enumerate(rows):
        padded[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = True
    return padded, mask


def unpad_rows(padded: torch.Tensor, mask: torch.Tensor) -> List[torch.Tensor]:
    """The inverse of `pad_rows`: each row's real tokens `(L_i, D)`."""
    return [row[row_mask] for row, row_mask in zip(padded, mask)]


# Qwen's chat template, as Qwen3's tokenizer applies it to one user message (no thinking block: the generation
# prompt ends the text, as with `enable_thinking=True`, which ZImagePipeline passes)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# a few byte-pair merges, so that common test words are single tokens as in a real BPE vocabulary
_MERGES = [("Ġ", "a"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at"), ("Ġ", "r"), ("e", "d"), ("Ġr", "ed"), ("o", "t"),
           ("Ġ", "p"), ("h", "ot"), ("Ġp", "hot")]


def tiny_qwen_tokenizer(model_max_length: int = 512):
    """A byte-level BPE `Qwen2Tokenizer` built in code from a vocabulary and merges objects (no files, no hub): the
    256 byte symbols, `_MERGES`, Qwen's special tokens (`<|endoftext|>` pads) and its chat template."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    for first, second in _MERGES:
        vocab[first + second] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(_MERGES), model_max_length=model_max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


class ZImageFamily(ModelFamily):
    name = "zimage"
    pipeline_class = "ZImagePipeline"
    denoiser_name = "transformer"
    denoiser_class = "ZImageTransformer2DModel"
    kernel_class = FlowSDEKernel
    text_encoder_names = ("text_encoder",)
    pipeline_init_kwargs = {}  # no safety checker, no watermarker
    rlg_pipeline_class = None  # RLG runs as the guider in the modular pipeline (`rlg_pipeline`)
    modular_blocks_class = "ZImageAutoBlocks"  # diffusers' modular Z-Image: its blocks take a `guider`
    hub_tags = ("z-image",)
    guidance_kind = "cfg"
    default_guidance_scale = 5.0  # ZImagePipeline's default `guidance_scale` (Turbo samples with 0)
    # the attention and feed-forward of every ZImageTransformerBlock (main layers and both refiners)
    default_lora_target_modules = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                                   "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    max_sequence_length = 512  # Qwen3 tokens per prompt, ZImagePipeline's default
    # ZImagePipeline always computes the dynamic shift `mu`; the published schedulers shift by a constant, so the
    # variant runs the `mu` path (FLUX's dynamic-shift settings) against the pipeline too
    tiny_variants = {"dynamic_shift": {"use_dynamic_shifting": True}}

    # -------------------------------------------------------------------- prompts
    def encode_text(self, prompts: List[str], device) -> Conditioning:
        """The pipeline's own encoding (chat template, hidden_states[-2], padding dropped), padded back to
        `max_sequence_length` with its mask so that rows of different prompts stack."""
        # encode_prompt writes the chat-templated prompts into the list it is given: hand it a copy
        embeds, _ = self.pipe.encode_prompt(list(prompts), device=device, do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length)
        padded, mask = pad_rows(embeds, self.max_sequence_length)
        return {"encoder_hidden_states": padded, "encoder_attention_mask": mask}

    @classmethod
    def pipeline_guidance_kwargs(cls, guidance_scale: float, embedded_guidance: Optional[float] = None):
        """ZImagePipeline's `guidance_scale` g is the CFG scale minus one (`c + g (c - u)`; 0: no CFG)."""
        return {"guidance_scale": guidance_scale - 1}

    @classmethod
    def modular_cfg_guider(cls, guidance_scale: float):
        """ZImagePipeline's CFG `c + g (c - u)` (g = 0: none) is diffusers' CFG guider in its original formulation;
        the modular pipeline runs the two halves in separate forwards (the pipeline in one batch), so its images
        agree with the pipeline's to float rounding (about 1e-6), not bit for bit."""
        from diffusers.guiders import ClassifierFreeGuidance

        return ClassifierFreeGuidance(guidance_scale=guidance_scale, use_original_formulation=True)

    # ----------------------------------------------------------- latents and time
    def default_resolution(self) -> int:
        return 1024  # ZImagePipeline's default height and width, whatever the model's size

    @classmethod
    def resolution_limits(cls, denoiser_config, vae_scale_factor: int):
        """The VAE's downsampling, then the transformer's patches; the rotary tables bound the patch grid
        (`axes_lens` of the height and width axes)."""
        patch = denoiser_config.get("all_patch_size", [2])[0]
        lengths = denoiser_config.get("axes_lens")
        largest = min(lengths[1:]) * patch * vae_scale_factor if lengths else None
        return vae_scale_factor * patch, largest

    def set_timesteps(self, num_inference_steps: int, device, height: int, width: int) -> torch.Tensor:
        # As ZImagePipeline.__call__: its default sigmas and `mu` from the number of 2x2 latent patches (a scheduler
        # without dynamic shifting ignores it).
        from diffusers.pipelines.z_image.pipeline_z_image import (calculate_shift, get_default_z_image_sigmas,
                                                                  retrieve_timesteps)

        scheduler = self.scheduler
        side = lambda pixels: 2 * (int(pixels) // (self.vae_scale_factor * 2))  # noqa: E731 (prepare_latents)
        mu = calculate_shift(
            (side(height) // 2) * (side(width) // 2), scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, device,
                                          sigmas=get_default_z_image_sigmas(num_inference_steps), mu=mu)
        return timesteps

    # ------------------------------------------------------------------ denoising
    def forward(self, denoiser, latents, timesteps, cond: Conditioning):
        """One Z-Image transformer call on a batch of rows (lists, as the pipeline passes them), returning the flow
        velocity the scheduler steps (the negated model output, float32 as in the pipeline)."""
        dtype = unwrap(denoiser).dtype
        images = list(latents.to(dtype).unsqueeze(2).unbind(dim=0))
        captions = unpad_rows(cond["encoder_hidden_states"], cond["encoder_attention_mask"])
        out = denoiser(images, (1000 - timesteps) / 1000, captions, return_dict=False)[0]
        return -torch.stack([row.float() for row in out], dim=0).squeeze(2)

    def predict(self, denoiser, latents, timesteps, cond: Conditioning, negative: Optional[Conditioning],
                guidance_scale: float) -> torch.Tensor:
        """CFG as ZImagePipeline writes it: one forward of `[conditional, unconditional]` rows, then
        `c + (s - 1)(c - u)` (the negated velocities give the same negated combination)."""
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        if negative is None:
            return self.forward(denoiser, latents, timesteps, cond)
        both = {k: torch.cat([cond[k], negative[k]]) for k in cond}
        text, uncond = self.forward(denoiser, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                                    both).chunk(2)
        return text + (guidance_scale - 1) * (text - uncond)

    # --------------------------------------------------------- tiny test models
    @classmethod
    def tiny_components(cls, seed: int = 0, use_dynamic_shifting: bool = False):
        """A tiny Z-Image: a 2-layer transformer, a 16-channel VAE (vae_scale_factor 4, no mid-block attention, so
        the pipeline's default 1024 px image stays cheap), a 2-layer Qwen3 and a byte-level BPE tokenizer with
        Qwen's chat template; the scheduler is Z-Image-Turbo's (shift 3), or with `use_dynamic_shifting` FLUX's
        dynamic shift (`mu` from the image size)."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
        from transformers import Qwen3Config, Qwen3Model

        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32, rope_theta=256.0,
            t_scale=1000.0, axes_dims=[8, 4, 4], axes_lens=[1024, 512, 512],
        )
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, block_out_channels=(16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=16, norm_num_groups=8, layers_per_block=1, mid_block_add_attention=False,
            use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
        )
        tokenizer = tiny_qwen_tokenizer()
        torch.manual_seed(seed)
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        )).eval()
        if use_dynamic_shifting:
            scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        else:  # a constant shift 3, as Z-Image-Turbo's scheduler_config.json (from memory: no hub here to check)
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                                        use_dynamic_shifting=False)
        return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
                "scheduler": scheduler}
