"""SANA (600M/1.6B, 512-4096 px): a linear-attention flow DiT on a Gemma2 text encoder, latents from a 32x deep
compression autoencoder (DC-AE); trajectories with Flow-GRPO's SDE.

What differs from SD3, and where it lives here (checked against diffusers' `SanaPipeline`):

- prompts are lower-cased and prefixed with the pipeline's **complex human instruction** (its `__call__` default),
  tokenised to the instruction's length plus `max_sequence_length`, and cut to the first token and the last
  `max_sequence_length - 1` (`SanaPipeline.encode_prompt`); the negative prompt is encoded **without** the
  instruction, as the pipeline does it (`negative_conditioning`). The conditioning keeps the attention mask
  (`encoder_attention_mask`), which the transformer takes.
- the scheduler is `DPMSolverMultistepScheduler` with flow sigmas (`use_flow_sigmas`, `flow_shift`,
  `prediction_type="flow_prediction"`). The flow SDE kernel reads only a scheduler's sigmas and timesteps, so
  `set_kernel_scheduler` keeps the model's DPM-Solver configuration (its `flow_shift`, its sigmas, its integer
  timesteps, exactly what SanaPipeline uses) and sets `solver_order=1`: DPM-Solver++ of order 1 on flow sigmas is
  the Euler step `x + (sigma' - sigma) v` (tests/test_sana_family.py checks it), the kernel's deterministic step, so a
  rollout with no SDE step is the pipeline's sampling with that scheduler. (SANA samples with order 2 by default.)
  A model saved with a `FlowMatchEulerDiscreteScheduler` keeps it.
- `SanaPipeline` bins the image size to its aspect-ratio table (`use_resolution_binning`) and resizes the image back;
  given latents it samples at their size, and for the table's sizes binning changes nothing.
"""

import inspect
from typing import List

import torch

from ..errors import ModelError
from ..kernels import FlowSDEKernel
from ..utils.peft_utils import unwrap
from .base import Conditioning, ModelFamily

# letters and frequent pairs of a tiny Gemma-style BPE (word starts are "▁"); any other character falls back to its
# UTF-8 bytes (`<0x..>` tokens), as in Gemma's real vocabulary
_LETTERS = list("abcdefghijklmnopqrstuvwxyz") + ["\u2581"]
_GEMMA_MERGES = [("\u2581", "a"), ("\u2581", "c"), ("a", "t"), ("\u2581c", "at"), ("\u2581", "r"), ("e", "d"),
                 ("\u2581r", "ed"), ("o", "t"), ("\u2581", "p"), ("h", "ot"), ("\u2581p", "hot"), ("o", "f")]


def tiny_gemma_tokenizer(model_max_length: int = 4096):
    """A `GemmaTokenizer` built in code from a vocabulary and merges objects (no files, no hub): Gemma's special
    tokens (`<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3, `<mask>` 4; `<bos>` starts every text, as Gemma's), the 256
    byte-fallback tokens, letters and a few merges."""
    from transformers import GemmaTokenizer

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for symbol in _LETTERS + [first + second for first, second in _GEMMA_MERGES]:
        vocab.setdefault(symbol, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=list(_GEMMA_MERGES), model_max_length=model_max_length,
                          add_bos_token=True)


class SanaFamily(ModelFamily):
    name = "sana"
    pipeline_class = "SanaPipeline"
    denoiser_name = "transformer"
    denoiser_class = "SanaTransformer2DModel"
    kernel_class = FlowSDEKernel
    text_encoder_names = ("text_encoder",)
    pipeline_init_kwargs = {}  # no safety checker, no watermarker
    rlg_pipeline_class = "SanaRLGPipeline"  # diffusers has no modular SANA: a classic RLG pipeline (pipelines/)
    modular_blocks_class = None  # diffusers has no modular SANA
    hub_tags = ("sana",)
    guidance_kind = "cfg"
    default_guidance_scale = 4.5  # SanaPipeline's default
    # diffusers' examples/dreambooth/train_dreambooth_lora_sana.py (the default without `--lora_layers`): the query,
    # key and value projections of the self- and cross-attention of every block
    default_lora_target_modules = ["to_k", "to_q", "to_v"]
    max_sequence_length = 300  # Gemma tokens per prompt (after the instruction), SanaPipeline's default
    # the instruction put before every prompt: None is SanaPipeline's own (its `__call__` default)
    complex_human_instruction = None
    tiny_variants = {"flow_match_euler": {"scheduler": "flow_match_euler"}}

    def __init__(self, pipe, max_cache: int = 4096):
        super().__init__(pipe, max_cache)
        self._negative_cache = {}

    # -------------------------------------------------------------------- loading
    @classmethod
    def set_kernel_scheduler(cls, pipe):
        """SANA's DPM-Solver with flow sigmas stays (its `flow_shift`, sigmas and timesteps are the pipeline's), at
        order 1, which is the kernel's Euler step; a flow-matching Euler scheduler stays as it is."""
        import diffusers

        scheduler = pipe.scheduler
        if isinstance(scheduler, diffusers.FlowMatchEulerDiscreteScheduler):
            return
        config = scheduler.config
        if not (isinstance(scheduler, diffusers.DPMSolverMultistepScheduler) and config.get("use_flow_sigmas")
                and config.get("prediction_type") == "flow_prediction"):
            raise ModelError(f"this SANA model's scheduler ({type(scheduler).__name__}) is not a flow-matching one: "
                             "diffalign samples SANA with a DPMSolverMultistepScheduler with use_flow_sigmas or a "
                             "FlowMatchEulerDiscreteScheduler")
        if config.solver_order != 1:
            pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(config, solver_order=1)

    # -------------------------------------------------------------------- prompts
    def instruction(self) -> List[str]:
        """The complex human instruction: the family's, else the default of `SanaPipeline.__call__`."""
        if self.complex_human_instruction is not None:
            return list(self.complex_human_instruction)
        return list(inspect.signature(type(self.pipe).__call__).parameters["complex_human_instruction"].default)

    def encode_text(self, prompts: List[str], device) -> Conditioning:
        """The pipeline's encoding of prompts, with the complex human instruction."""
        embeds, mask, _, _ = self.pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=device,
            max_sequence_length=self.max_sequence_length, complex_human_instruction=self.instruction(),
        )
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    def negative_conditioning(self, negative_prompt: str, batch_size: int) -> Conditioning:
        """The negative prompt encoded without the instruction, as SanaPipeline encodes it (cached)."""
        if negative_prompt not in self._negative_cache:
            embeds, mask, _, _ = self.pipe.encode_prompt(
                [negative_prompt], do_classifier_free_guidance=False, device=self.device,
                max_sequence_length=self.max_sequence_length, complex_human_instruction=None,
            )
            self._negative_cache = {negative_prompt: {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}}
        cached = self._negative_cache[negative_prompt]
        return {k: v.expand(batch_size, *v.shape[1:]).clone() for k, v in cached.items()}

    def configure(self, *, max_sequence_length=None, embedded_guidance=None, **settings):
        super().configure(max_sequence_length=max_sequence_length, embedded_guidance=embedded_guidance, **settings)
        if max_sequence_length is not None:
            self._negative_cache = {}

    # ----------------------------------------------------------- latents and time
    def default_resolution(self) -> int:
        return 1024  # SanaPipeline's default height and width (binned to the model's table)

    @classmethod
    def resolution_limits(cls, denoiser_config, vae_scale_factor: int):
        """The DC-AE's downsampling times the transformer's patch; no largest side (the pipeline bins the size)."""
        return vae_scale_factor * denoiser_config.get("patch_size", 1), None

    # ------------------------------------------------------------------ denoising
    def forward(self, denoiser, latents, timesteps, cond: Conditioning):
        """One SANA transformer call (timestep times `timestep_scale`, float32 output as the pipeline; a learned-sigma
        output keeps its first half)."""
        model = unwrap(denoiser)
        out = denoiser(
            latents.to(model.dtype), encoder_hidden_states=cond["encoder_hidden_states"].to(model.dtype),
            encoder_attention_mask=cond["encoder_attention_mask"],
            timestep=timesteps * model.config.timestep_scale, return_dict=False,
        )[0].float()
        if model.config.out_channels // 2 == latents.shape[1]:
            out = out.chunk(2, dim=1)[0]
        return out

    # ----------------------------------------------------------------------- LoRA
    def lora_state_dict(self, denoiser) -> dict:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(denoiser)  # as diffusers' train_dreambooth_lora_sana.py saves it

    # ------------------------------------------------------------ tiny test model
    @classmethod
    def tiny_components(cls, seed: int = 0, scheduler: str = "dpm_solver") -> dict:
        """Components of a tiny random `SanaPipeline`: a one-block SANA transformer (patch 2, sample size 16: the
        512 px aspect-ratio table), a 3-stage DC-AE (vae_scale_factor 4), a 2-layer Gemma2 with a byte-fallback BPE
        tokenizer, and SANA's DPM-Solver with flow sigmas and `flow_shift` 3 (the scheduler diffusers'
        scripts/convert_sana_to_diffusers.py writes for SANA below 4K px: `DPMSolverMultistepScheduler(flow_shift=3,
        use_flow_sigmas=True, prediction_type="flow_prediction")`, the rest its defaults; 4K px: flow_shift 6);
        `scheduler="flow_match_euler"` a flow-matching Euler scheduler
        (shift 3), which SanaPipeline takes too."""
        from diffusers import (AutoencoderDC, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                               SanaTransformer2DModel)
        from transformers import Gemma2Config, Gemma2Model

        hidden = 16
        torch.manual_seed(seed)
        transformer = SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4, num_layers=1,
            num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=hidden,
            sample_size=16, patch_size=2,
        )
        torch.manual_seed(seed)
        vae = AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=2,
            encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
            encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
            encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
            downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
            decoder_act_fns="silu", scaling_factor=0.41407,
        )
        tokenizer = tiny_gemma_tokenizer()
        torch.manual_seed(seed)
        text_encoder = Gemma2Model(Gemma2Config(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
            pad_token_id=0, bos_token_id=2, eos_token_id=1,
        )).eval()
        if scheduler == "flow_match_euler":
            noise_scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        else:
            noise_scheduler = DPMSolverMultistepScheduler(
                num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", prediction_type="flow_prediction",
                use_flow_sigmas=True, flow_shift=3.0, final_sigmas_type="zero", lower_order_final=True,
                timestep_spacing="linspace",
            )
        return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
                "scheduler": noise_scheduler}
