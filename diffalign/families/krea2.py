"""Krea 2: a single-stream MM-DiT flow transformer on a stack of 12 hidden states of a Qwen3-VL text encoder, latents
of Qwen-Image's VAE packed 2x2; trajectories with Flow-GRPO's SDE. A family **built on diffusers' modular blocks**
(`Krea2AutoBlocks`): text encoding, latent preparation, the timesteps and decoding are the blocks' own steps, run on
the loaded pipeline's components (`run_step`); this module holds only what the blocks do not expose as a step (the
denoiser call with its CFG, for rollouts and the trainers' recomputation) and the family's facts.

- `encode_text`: the text-encoder step (the prompt alone: `Krea2TurboAutoBlocks`' step, the same encoding without a
  negative prompt), Qwen-Image's template padded in the middle to `max_sequence_length` tokens, with its mask.
- `prepare_latents`, `set_timesteps`: the prepare-latents and set-timesteps steps (sigmas `linspace(1, 1/n, n)`
  and the dynamic shift `mu` from the packed sequence length).
- `decode`: the unpack-latents and decode steps (per-channel `latents_mean` / `latents_std`, one video frame).
- CFG is `c + g (c - u)` in `Krea2Pipeline` (g = 0: none), the usual `u + s (c - u)` with `s = g + 1`, as
  Z-Image's: `pipeline_guidance_kwargs` maps a rollout's scale `s` to `g = s - 1`.
"""

from typing import List, Optional

import torch

from ..kernels import FlowSDEKernel
from ..utils.peft_utils import lora_adapter_names_rewritten
from .base import Conditioning, ModelFamily


def run_step(step, modular, **inputs) -> dict:
    """Runs one diffusers modular block `step` on the components of the modular pipeline `modular` (of the model's
    whole blocks, so that its properties see every component: `vae_scale_factor` reads the VAE) with `inputs` (the
    step's defaults for the others), as `ModularPipeline.__call__` runs its blocks; returns its intermediate outputs
    by name."""
    from diffusers.modular_pipelines import PipelineState

    state = PipelineState()
    for param in step.inputs:
        state.set(param.name, inputs.get(param.name, param.default), param.kwargs_type)
    with torch.no_grad():
        _, state = step(modular, state)
    return {output.name: state.get(output.name) for output in step.intermediate_outputs}


def repeat_row_adapters(adapter_names: List[str], rows: int) -> List[str]:
    """Each row's adapter name repeated for the `rows` (a multiple of their number) that a layer's input flattens
    them into, row-major: `["a", "b"]` over 4 rows is `["a", "a", "b", "b"]`."""
    return [name for name in adapter_names for _ in range(rows // len(adapter_names))]


def flattened_rows_adapters(denoiser):
    """peft's mixed-adapter batches (`diffalign.utils.peft_utils.adapter_rows`, the policy and its base in one
    forward) name one adapter per input row; Krea 2's text fusion runs its layerwise blocks on `(B * L, layers, D)`,
    every token a row: inside this block each LoRA layer whose input has more rows than names gets each name
    repeated for its tokens (`repeat_row_adapters`), after `adapter_rows`' hook."""

    def rewrite(inputs, names):
        if names is None or len(names) == inputs[0].shape[0]:
            return None
        return repeat_row_adapters(names, inputs[0].shape[0])

    return lora_adapter_names_rewritten(denoiser, rewrite)


class Krea2Family(ModelFamily):
    name = "krea2"
    pipeline_class = "Krea2Pipeline"
    denoiser_name = "transformer"
    denoiser_class = "Krea2Transformer2DModel"
    kernel_class = FlowSDEKernel
    text_encoder_names = ("text_encoder",)
    pipeline_init_kwargs = {}  # no safety checker, no watermarker
    rlg_pipeline_class = None  # the RLG guider goes through the modular blocks
    modular_blocks_class = "Krea2AutoBlocks"
    # not checked against the Hub (offline); no public source states krea/Krea-2-Raw's tags (a community fine-tune,
    # colosslabs/Krea-2-Coloss-Raw, tags itself `krea2`)
    hub_tags = ("krea-2",)
    guidance_kind = "cfg"
    default_guidance_scale = 4.5  # Krea2Pipeline's default `guidance_scale`
    # the attention of every image block and of the text fusion's blocks (diffusers' Krea 2 LoRA targets' names)
    default_lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    max_sequence_length = 512  # Krea2Pipeline's fixed text length

    def _run(self, name: str, **inputs) -> dict:
        """`run_step` of the blocks' step `name` on the loaded pipeline's components (no copy of the weights)."""
        from diffusers.modular_pipelines import Krea2AutoBlocks

        modular = Krea2AutoBlocks().init_pipeline()
        modular.update_components(**{name: value for name, value in self.pipe.components.items() if value is not None})
        return run_step(self._blocks(name), modular, **inputs)

    def _blocks(self, name: str):
        from diffusers.modular_pipelines import Krea2AutoBlocks, Krea2TurboAutoBlocks

        if name == "text_encoder":  # the prompt alone (no guider: no negative prompt to encode)
            return Krea2TurboAutoBlocks().sub_blocks["text_encoder"]
        if name in ("unpack_latents", "decode"):
            decode = Krea2AutoBlocks().sub_blocks["decode"]
            return decode if name == "decode" else Krea2AutoBlocks().sub_blocks["denoise"].sub_blocks[name]
        return Krea2AutoBlocks().sub_blocks["denoise"].sub_blocks[name]

    # -------------------------------------------------------------------- prompts
    def encode_text(self, prompts: List[str], device) -> Conditioning:
        out = self._run("text_encoder", prompt=list(prompts),
                       max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": out["prompt_embeds"], "encoder_attention_mask": out["prompt_embeds_mask"]}

    @classmethod
    def pipeline_guidance_kwargs(cls, guidance_scale: float, embedded_guidance: Optional[float] = None):
        """Krea2Pipeline's `guidance_scale` g is the CFG scale minus one (`c + g (c - u)`; 0: no CFG)."""
        return {"guidance_scale": guidance_scale - 1}

    @classmethod
    def modular_cfg_guider(cls, guidance_scale: float):
        """Krea2Pipeline's CFG `c + g (c - u)` is diffusers' CFG guider in its original formulation (the blocks'
        default guider)."""
        from diffusers.guiders import ClassifierFreeGuidance

        return ClassifierFreeGuidance(guidance_scale=guidance_scale, use_original_formulation=True)

    # ----------------------------------------------------------- latents and time
    def default_resolution(self) -> int:
        from diffusers.modular_pipelines import Krea2ModularPipeline

        return Krea2ModularPipeline.default_height.fget(None)  # 1024

    @classmethod
    def resolution_limits(cls, denoiser_config, vae_scale_factor: int):
        """The VAE's downsampling, then 2x2 packing (the modular pipeline's `patch_size`)."""
        return vae_scale_factor * 2, None

    def add_resolution(self, cond: Conditioning, height: int, width: int) -> Conditioning:
        """Adds `image_size` `(B, 2)`: packed latents do not say their grid, which the rotary positions need."""
        embeds = cond["encoder_hidden_states"]
        size = torch.tensor([int(height), int(width)], device=embeds.device)
        return {**cond, "image_size": size.expand(embeds.shape[0], 2).clone()}

    def prepare_latents(self, batch_size, height, width, dtype, device, generator, latents=None, denoiser=None):
        return self._run("prepare_latents", batch_size=batch_size, height=height, width=width,
                        dtype=dtype, generator=generator, latents=latents)["latents"].to(device)

    def set_timesteps(self, num_inference_steps: int, device, height: int, width: int) -> torch.Tensor:
        rows, columns = (int(side) // (self.vae_scale_factor * 2) for side in (height, width))
        return self._run("set_timesteps", num_inference_steps=num_inference_steps,
                        image_seq_len=rows * columns)["timesteps"].to(device)

    # ------------------------------------------------------------------ denoising
    def forward(self, denoiser, latents, timesteps, cond: Conditioning):
        """One Krea 2 transformer call on packed latents (text at the rotary origin, image tokens at their grid
        positions: `Krea2Pipeline.prepare_position_ids`)."""
        height, width = cond["image_size"][0].tolist()
        embeds = cond["encoder_hidden_states"]
        grid = [int(side) // (self.vae_scale_factor * 2) for side in (height, width)]
        positions = self.pipe.prepare_position_ids(embeds.shape[1], *grid, latents.device)
        with flattened_rows_adapters(denoiser):
            return denoiser(hidden_states=latents, encoder_hidden_states=embeds,
                            timestep=timesteps.to(latents.dtype) / 1000, position_ids=positions,
                            encoder_attention_mask=cond["encoder_attention_mask"], return_dict=False)[0]

    def predict(self, denoiser, latents, timesteps, cond: Conditioning, negative: Optional[Conditioning],
                guidance_scale: float) -> torch.Tensor:
        """CFG as Krea2Pipeline writes it, `c + (s - 1)(c - u)`, both halves in one forward."""
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        if negative is None:
            return self.forward(denoiser, latents, timesteps, cond)
        both = {k: torch.cat([cond[k], negative[k]]) for k in cond}
        text, uncond = self.forward(denoiser, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                                    both).chunk(2)
        return text + (guidance_scale - 1) * (text - uncond)

    # ------------------------------------------------------------------- decoding
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        unpacked = self._run("unpack_latents", latents=latents, height=height,
                            width=width)["latents"]
        images = self._run("decode", latents=unpacked, output_type="pt")["images"]
        return images.float()

    # --------------------------------------------------------- tiny test models
    @classmethod
    def tiny_components(cls, seed: int = 0) -> dict:
        """A tiny Krea 2: a 2-block transformer (64 input channels: 16-channel latents packed 2x2; 12 text layers), a
        16-channel `AutoencoderKLQwenImage` (as Qwen-Image's tiny one), a **36-layer** `Qwen3VLModel` of width 16 (the
        modular text-encoder step taps hidden states 2, 5, ..., 35, Krea 2's fixed layers), Qwen-Image's byte-level
        BPE tokenizer built in code (`tiny_qwen2_tokenizer`: the same 34-token system prefix) and Krea 2's
        scheduler (dynamic exponential shift, `max_image_seq_len` 6400)."""
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, Krea2Transformer2DModel
        from transformers import Qwen3VLConfig, Qwen3VLModel

        from .qwenimage import tiny_qwen2_tokenizer

        torch.manual_seed(seed)
        transformer = Krea2Transformer2DModel(
            in_channels=64, num_layers=2, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=48, timestep_embed_dim=32, text_hidden_dim=16, num_text_layers=12,
            text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=24,
            num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6),
        )
        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage(base_dim=4, z_dim=16, dim_mult=[1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True])
        tokenizer = tiny_qwen2_tokenizer()
        torch.manual_seed(seed)
        text_encoder = Qwen3VLModel(Qwen3VLConfig(
            text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=36, num_attention_heads=2,
                             num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer),
                             max_position_embeddings=2048,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [1, 1, 2]}),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                               deepstack_visual_indexes=[]),
        )).eval()
        scheduler = FlowMatchEulerDiscreteScheduler(  # Krea2Pipeline's documented scheduler settings
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=6400, time_shift_type="exponential",
        )
        return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
                "scheduler": scheduler}
