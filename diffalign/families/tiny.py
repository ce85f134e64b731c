"""Tiny random building blocks of the families' test components (`ModelFamily.tiny_components`).

Everything here is built locally (no hub): the tokenizers are CLIP's real BPE vocabulary shipped with diffalign and a
word-level T5 vocabulary, the models are randomly initialised at a size that runs in milliseconds on a CPU. Each
family assembles them into the components of its diffusers pipeline; `diffalign.testing` re-exports them.
"""

import torch

from ..tokenization import BOS_TOKEN_ID, EOS_TOKEN_ID, VOCAB_SIZE, offline_clip_tokenizer

__all__ = ["offline_clip_tokenizer", "tiny_clip_text_kwargs", "tiny_ddim_scheduler", "tiny_flow_scheduler",
           "tiny_t5_encoder", "tiny_t5_tokenizer", "tiny_unet", "tiny_vae"]


def tiny_clip_text_kwargs(**overrides) -> dict:
    """Keyword arguments of a tiny `CLIPTextConfig` with CLIP's real vocabulary and special tokens."""
    kwargs = dict(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=77,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID,
    )
    kwargs.update(overrides)
    return kwargs


def tiny_ddim_scheduler(**overrides):
    """A `DDIMScheduler` with Stable Diffusion 1.x's configuration (scaled-linear betas, steps_offset 1)."""
    from diffusers import DDIMScheduler

    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1)
    config.update(overrides)
    return DDIMScheduler(**config)


def tiny_unet(seed: int = 0, sample_size: int = 16, cross_attention_dim: int = 32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_vae(seed: int = 0, sample_size: int = 32, **overrides):
    """A tiny 4-channel `AutoencoderKL` (vae_scale_factor 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kwargs = dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
    )
    kwargs.update(overrides)
    return AutoencoderKL(**kwargs)


# A small word-level vocabulary: enough for the tiny T5 to tokenize test prompts offline (unknown words map to <unk>).
_T5_WORDS = (
    "a an the of in on with and photo picture drawing painting cat dog bird horse digit number handwritten zero one "
    "two three four five six seven eight nine red blue green black white small large big car tree house"
).split()


def tiny_t5_tokenizer(model_max_length: int = 32):
    """A `T5TokenizerFast` built from a vocabulary list (no sentencepiece file, no hub): pad 0, eos 1, unk 2."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [("\u2581" + word, -1.0) for word in _T5_WORDS] + [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_t5_encoder(seed: int = 0, vocab_size: int = 128):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4))
    return model.eval()  # a model built from a config is in train mode: T5's dropout would make encodings random


def tiny_flow_scheduler(shift: float = 3.0, **overrides):
    """A `FlowMatchEulerDiscreteScheduler` as in SD3 (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift, **overrides)
