"""Offline stand-ins for the hub fixtures (`hf-internal-testing/...`) that diffusers' pipeline and LoRA tests load.

diffusers' tests build their tiny text encoders and tokenizers with `from_pretrained("hf-internal-testing/...")`;
with `HF_HUB_OFFLINE=1` and no cache these cannot load, so the copies here build equivalents locally: CLIP's real
BPE vocabulary from `diffalign.tokenization.offline_clip_tokenizer` (49408 tokens, so the tiny CLIP text encoders get
`vocab_size=49408` and CLIP's real special token ids instead of the hub fixture's 1000-token vocabulary) and a T5
tokenizer built from a vocabulary list (`diffalign.testing.tiny_t5_tokenizer`). Model sizes follow the hub fixtures.
"""

import torch

from diffalign.testing import tiny_clip_text_kwargs, tiny_t5_tokenizer
from diffalign.tokenization import offline_clip_tokenizer


class OfflineFixture:
    """Stands in for a class whose `from_pretrained(repo_id, subfolder=...)` the upstream tests call: it ignores the
    repo id and returns `build()`. Like loading weights it leaves the global RNG untouched, and like `from_pretrained`
    it returns models in eval mode."""

    def __init__(self, build, seed=0):
        self.build = build
        self.seed = seed

    def from_pretrained(self, *args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            obj = self.build()
        return obj.eval() if isinstance(obj, torch.nn.Module) else obj


def clip_text_config(**overrides):
    """The tiny CLIP text config of diffusers' SD3/SDXL tests (hidden 32, 5 layers, 4 heads, intermediate 37,
    gelu, projection 32), with CLIP's real vocabulary size and special tokens instead of the hub fixture's 1000."""
    from transformers import CLIPTextConfig

    kwargs = tiny_clip_text_kwargs(
        hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
        hidden_act="gelu", projection_dim=32,
    )
    kwargs.update(overrides)
    return CLIPTextConfig(**kwargs)


def t5_config():
    """The config of `hf-internal-testing/tiny-random-t5` (d_model 32, 5 layers, 4 heads of 8, d_ff 37, 8 buckets)."""
    from transformers import T5Config

    return T5Config(vocab_size=1103, d_model=32, d_kv=8, d_ff=37, num_layers=5, num_decoder_layers=5, num_heads=4,
                    relative_attention_num_buckets=8, dropout_rate=0.1)


def clip_tokenizer():
    return offline_clip_tokenizer()


def t5_tokenizer():
    return tiny_t5_tokenizer(model_max_length=512)


def clip_text_encoder_with_projection(seed=0):
    from transformers import CLIPTextModelWithProjection

    return OfflineFixture(lambda: CLIPTextModelWithProjection(clip_text_config()), seed=seed)


def t5_encoder(seed=0):
    from transformers import T5EncoderModel

    return OfflineFixture(lambda: T5EncoderModel(t5_config()), seed=seed)
