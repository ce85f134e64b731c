"""QwenImage 2.1 (`QwenImage21Pipeline`): a single-stream block-causal flow transformer on the last decoder layer of
a Qwen3-VL encoder, unpatched 64-channel latents of a 16x VAE that decodes RGBA; trajectories with Flow-GRPO's SDE.
A family **built on diffusers' modular blocks** (`QwenImage21AutoBlocks`), as Krea 2 (`diffalign.families.krea2`):
the text encoding, latent preparation, timesteps and decoding are the blocks' own steps (`run_step`); this module
holds the denoiser call with its CFG and the family's facts.

- `encode_text`: the blocks' text-to-image text-encoder step (Qwen-Image 2.1's raw template, the system tokens
  dropped), **one prompt a call**: each prompt's embedding at its own length, as the pipeline encodes a lone prompt.
- the transformer places the target image after the text, at the rotary frame position the text reaches: padding the
  text moves the image (the pipeline's batch of prompts of different lengths samples each prompt otherwise than
  alone). `forward` therefore runs the rows of each text length together, unpadded (`rows_by_length`): a row's
  prediction does not depend on its batch, so recomputed log-probs match whatever the micro-batches, and a rollout
  equals the pipeline called with that prompt alone (`samples_prompts_alone`). CFG's negative half is such a group.
- CFG is the pipeline's `true_cfg_scale` with a negative prompt, `u + s (c - u)` without a rescale.
- `decode`: the unpack and decode steps; the VAE decodes RGBA (`AutoencoderKLQwenImage21`), the family returns RGB
  (the alpha dropped) for the rewards.
- the processor is a `Qwen3VLProcessor` (`diffalign.families.vl_processors`: image-only where torchvision is
  missing).
"""

from collections import defaultdict
from typing import Dict, List, Optional

import torch

from ..kernels import FlowSDEKernel
from ..utils.peft_utils import lora_adapter_names_rewritten
from . import vl_processors
from .base import Conditioning, ModelFamily, cat_rows
from .krea2 import run_step

# Qwen3-VL's chat template reduced to what the pipeline reads (`apply_chat_template` of its system message, to count
# the tokens it drops): text content of each message between `<|im_start|>role` and `<|im_end|>`
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}{{ c['text'] }}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def rows_by_length(mask: torch.Tensor) -> Dict[int, List[int]]:
    """The rows of a `(B, L)` text mask grouped by their number of real tokens (in row order): `{length: rows}`."""
    groups = defaultdict(list)
    for row, length in enumerate(mask.sum(1).tolist()):
        groups[int(length)].append(row)
    return dict(groups)


def rows_adapters(denoiser, rows: List[int], batch_size: int):
    """peft's mixed-adapter batches (`diffalign.utils.peft_utils.adapter_rows`) name one adapter per row of the
    `batch_size` rows `forward` was given; inside this block each LoRA layer gets the names of `rows` alone (the rows
    of one denoiser call), after `adapter_rows`' hook."""

    def rewrite(inputs, names):
        if names is None or len(names) != batch_size:
            return None
        return [names[row] for row in rows]

    return lora_adapter_names_rewritten(denoiser, rewrite)


class QwenImage21Family(ModelFamily):
    name = "qwenimage21"
    pipeline_class = "QwenImage21Pipeline"
    denoiser_name = "transformer"
    denoiser_class = "QwenImage21Transformer2DModel"
    kernel_class = FlowSDEKernel
    text_encoder_names = ("text_encoder",)
    pipeline_init_kwargs = {}  # no safety checker, no watermarker
    rlg_pipeline_class = None  # the RLG guider goes through the modular blocks
    modular_blocks_class = "QwenImage21AutoBlocks"
    hub_tags = ("qwen-image",)  # not checked against the Hub (offline)
    guidance_kind = "true_cfg"
    default_guidance_scale = 4.0  # as Qwen-Image's `true_cfg_scale` (QwenImage21Pipeline's default is 1: no CFG)
    # the attention projections of every QwenImage21 transformer block (the tester checks that they reach all)
    default_lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    samples_prompts_alone = True  # the tester compares a rollout with the pipeline called per prompt
    tiny_resolution = 32  # the tests' image side: the smallest the pipeline samples (one 2x2 slot)

    def _run(self, name: str, **inputs) -> dict:
        """`run_step` of the blocks' step `name` on the loaded pipeline's components (no copy of the weights)."""
        from diffusers.modular_pipelines import QwenImage21AutoBlocks

        modular = QwenImage21AutoBlocks().init_pipeline()
        modular.update_components(**{name: value for name, value in self.pipe.components.items() if value is not None})
        return run_step(self._step(name), modular, **inputs)

    @staticmethod
    def _step(name: str):
        from diffusers.modular_pipelines import QwenImage21AutoBlocks

        blocks = QwenImage21AutoBlocks().sub_blocks
        if name == "text_encoder":
            return blocks["text_encoder"].sub_blocks["text2image"]
        if name == "decode":
            return blocks["decode"]
        return blocks["denoise"].sub_blocks["text2image"].sub_blocks[name]

    # -------------------------------------------------------------------- prompts
    def encode_text(self, prompts: List[str], device) -> Conditioning:
        """Each prompt alone through the blocks' text-encoder step, padded to the longest, with the mask of each
        prompt's real tokens."""
        embeds = [self._run("text_encoder", prompt=[str(prompt)])["prompt_embeds"][0].to(device) for prompt in prompts]
        mask = torch.zeros(len(embeds), max(e.shape[0] for e in embeds), dtype=torch.bool, device=device)
        for row, embed in enumerate(embeds):
            mask[row, : embed.shape[0]] = True
        return {"encoder_hidden_states": torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True),
                "encoder_hidden_states_mask": mask}

    def cache_row(self, encoded: Conditioning, index: int) -> Conditioning:
        """A prompt's real tokens alone, so that a batch is padded to its own longest prompt (`cat_rows`)."""
        length = int(encoded["encoder_hidden_states_mask"][index].sum())
        return {k: v[index, :length] for k, v in encoded.items()}

    @classmethod
    def rlg_guidance_pipeline_kwargs(cls, guidance_scale: float):
        """The pipeline's CFG is `true_cfg_scale` with a negative prompt (the modular pipeline's is the empty one)."""
        return {"true_cfg_scale": guidance_scale, "negative_prompt": ""}

    # ----------------------------------------------------------- latents and time
    def default_resolution(self) -> int:
        return 1024  # QwenImage21Pipeline's `output_resolution`

    @classmethod
    def resolution_limits(cls, denoiser_config, vae_scale_factor: int):
        """The pipeline rounds sizes down to multiples of twice the VAE's 16x downsampling (a 2x2 group of latent
        tokens is one slot of the encoder's sequence)."""
        return vae_scale_factor * 2, None

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    def latent_channels(self, denoiser=None) -> int:
        return (denoiser or self.denoiser).config.in_channels

    def add_resolution(self, cond: Conditioning, height: int, width: int) -> Conditioning:
        """Adds `image_size` `(B, 2)`: packed latents do not say their grid, which the rotary positions need."""
        embeds = cond["encoder_hidden_states"]
        size = torch.tensor([int(height), int(width)], device=embeds.device)
        return {**cond, "image_size": size.expand(embeds.shape[0], 2).clone()}

    def prepare_latents(self, batch_size, height, width, dtype, device, generator, latents=None, denoiser=None):
        return self._run("prepare_latents", batch_size=batch_size, height=height, width=width,
                         dtype=dtype, generator=generator, latents=latents)["latents"].to(device)

    def set_timesteps(self, num_inference_steps: int, device, height: int, width: int) -> torch.Tensor:
        tokens = (int(height) // self.vae_scale_factor) * (int(width) // self.vae_scale_factor)
        return self._run("set_timesteps", num_inference_steps=num_inference_steps,
                         latents=torch.empty(1, tokens, 1))["timesteps"].to(device)

    # ------------------------------------------------------------------ denoising
    def forward(self, denoiser, latents, timesteps, cond: Conditioning):
        """QwenImage 2.1's transformer on the rows of each text length together, unpadded (`rows_by_length`), the
        target image's slots after the text (`img_mask`), no KV cache (the pipeline's cache is the same computation
        split across steps); the output cut to the image tokens. A mixed-adapter batch's names follow each call's
        rows (`rows_adapters`)."""
        height, width = cond["image_size"][0].tolist()
        shape = (1, int(height) // self.vae_scale_factor, int(width) // self.vae_scale_factor)
        tokens = latents.shape[1]
        out = latents.new_empty(latents.shape)
        for length, rows in rows_by_length(cond["encoder_hidden_states_mask"]).items():
            index = torch.tensor(rows, device=latents.device)
            img_mask = torch.cat([torch.zeros(len(rows), length, dtype=torch.bool, device=latents.device),
                                  torch.ones(len(rows), tokens // 4, dtype=torch.bool, device=latents.device)], 1)
            with rows_adapters(denoiser, rows, latents.shape[0]):
                out[index] = denoiser(
                    hidden_states=latents[index], timestep=timesteps[index].to(latents.dtype) / 1000,
                    encoder_hidden_states=cond["encoder_hidden_states"][index, :length],
                    img_shapes=[[shape]] * len(rows), img_mask=img_mask, return_dict=False,
                )[0][:, -tokens:]
        return out

    def predict(self, denoiser, latents, timesteps, cond: Conditioning, negative: Optional[Conditioning],
                guidance_scale: float) -> torch.Tensor:
        """True CFG as `QwenImage21Pipeline`: `u + s (c - u)` (each half by text length: `forward`)."""
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        if negative is None:
            return self.forward(denoiser, latents, timesteps, cond)
        both = {k: cat_rows([cond[k], negative[k]]) for k in cond}
        text, uncond = self.forward(denoiser, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                                    both).chunk(2)
        return uncond + guidance_scale * (text - uncond)

    # ------------------------------------------------------------------- decoding
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The blocks' unpack and decode steps; RGB in [0, 1] (the VAE's alpha dropped)."""
        unpacked = self._run("unpack_latents", latents=latents, height=height, width=width)["latents"]
        images = self._run("decode", latents=unpacked, output_type="pt")["images"]
        return images[:, :3].float()

    # -------------------------------------------------------------------- loading
    @classmethod
    def loaded_components(cls, path: str) -> Dict:
        """The `Qwen3VLProcessor` as `vl_processors.image_only_processor_class` where torchvision is missing."""
        return vl_processors.image_only_components(path, "Qwen3VLProcessor")

    # --------------------------------------------------------- tiny test models
    @classmethod
    def tiny_components(cls, seed: int = 0) -> dict:
        """A tiny QwenImage 2.1: a 2-block transformer (64 latent channels, context 32), an `AutoencoderKLQwenImage21`
        (z_dim 64, 16x downsampling, RGBA), a 2-layer `Qwen3VLForConditionalGeneration` of width 32, an image-only
        `Qwen3VLProcessor` on Qwen-Image's byte-level BPE tokenizer built in code (`tiny_qwen2_tokenizer`) with a
        chat template, and a dynamically shifted flow-matching scheduler."""
        from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Transformer2DModel
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from .qwenimage import tiny_qwen2_tokenizer

        torch.manual_seed(seed)
        transformer = QwenImage21Transformer2DModel(
            patch_size=1, in_channels=64, out_channels=64, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            context_in_dim=32, axes_dims_rope=(4, 6, 6),
        )
        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=8, z_dim=64, dim_mult=[1, 1, 1, 1, 1],
                                       num_res_blocks=1, temperal_downsample=[False, True, True, True])
        tokenizer = tiny_qwen2_tokenizer()
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
        ids = tokenizer.convert_tokens_to_ids
        torch.manual_seed(seed)
        text_encoder = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
            text_config=dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=2, head_dim=16, vocab_size=len(tokenizer),
                             max_position_embeddings=2048,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [2, 3, 3]}),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                               deepstack_visual_indexes=[]),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        )).eval()
        processor = vl_processors.image_only_processor_class("Qwen3VLProcessor")(
            image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer, chat_template=TINY_CHAT_TEMPLATE)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                                    time_shift_type="exponential")
        return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "processor": processor,
                "scheduler": scheduler}
