"""ImageReward (Xu et al., 2023, THUDM/ImageReward): a BLIP text-image model with a scalar preference head.

The published model (`image-reward` 1.5, `ImageReward/ImageReward.py`) encodes the image with BLIP's ViT-L/16,
runs the prompt through BLIP's BERT text encoder with cross-attention to the image tokens, feeds the [CLS] output
to an MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1, linear layers only: their ReLUs are commented out) and
normalises: `(mlp(cls) - 0.16717362830052426) / 1.0333394966054072` (about N(0, 1) on their test set).

The `image-reward` package cannot be installed beside this stack (it pins timm==0.6.13 and fairscale==0.4.13), so
the model is rebuilt from transformers' BLIP classes (`BlipVisionModel`, `BlipTextModel` with cross-attention) and
their checkpoint `ImageReward.pt` is mapped onto them key by key (`map_imagereward_state_dict`). The sizes come from
the checkpoint's tensors; only the head counts (16 and 12 in the published model) cannot, and are arguments.
Preprocessing is theirs (shortest side to 224 px bicubic, center crop, OpenAI CLIP normalisation), done in torch on
the images' device; the tokenizer is `bert-base-uncased` with BLIP's two added tokens, prompts padded/truncated
to 35 tokens, the tokenizer's own [CLS] first (ImageReward does not swap in BLIP's [ENC] token).

Not verified against the published scores (no real checkpoint here): see docs/rewards.md, "ImageReward".
"""

import math
import os
import re
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from diffalign.errors import first_line

from . import RewardWeightsNotFoundError, register_reward
from .clip_rewards import _batches, _check_prompts, _OnImagesDevice, from_pretrained_or_raise, resolve_dtype
from .hpsv2 import load_hps_state_dict
from .preprocessing import clip_preprocess

IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_CHECKPOINT = "ImageReward.pt"
IMAGEREWARD_TOKENIZER = "bert-base-uncased"
# `ImageReward.__init__` in image-reward 1.5: the mean and std of the raw head output they normalise with.
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_TOKENS = 35
# Their LayerNorm epsilons: BLIP's ViT `partial(nn.LayerNorm, eps=1e-6)`, BLIP's med_config.json 1e-12.
VISION_LAYER_NORM_EPS = 1e-6
TEXT_LAYER_NORM_EPS = 1e-12

# Parts of their `BLIP_Pretrain` that ImageReward does not use (the contrastive projections).
_UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
_UNUSED_KEYS = ("blip.text_encoder.embeddings.position_ids",)

# BLIP ViT (timm layout) -> transformers `BlipVisionModel`, per block and for the embeddings.
_VISION_BLOCK_RENAMES = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_VISION_RENAMES = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}


def normalize_imagereward_score(raw: torch.Tensor) -> torch.Tensor:
    """ImageReward's published normalisation of the head output: `(raw - mean) / std`."""
    return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def _vision_key(key: str) -> Optional[str]:
    """Name in `BlipVisionModel` of a key of their ViT (without `blip.visual_encoder.`), or None if unknown."""
    if key in _VISION_RENAMES:
        return _VISION_RENAMES[key]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
    if match and match.group(2) in _VISION_BLOCK_RENAMES:
        return f"encoder.layers.{match.group(1)}.{_VISION_BLOCK_RENAMES[match.group(2)]}.{match.group(3)}"
    return None


def map_imagereward_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Renames an `ImageReward.pt` state dict to the keys of `ImageRewardModel`.

    `blip.visual_encoder.*` (BLIP's timm-style ViT) -> `vision_model.*` (`BlipVisionModel`), `blip.text_encoder.*`
    (BLIP's med.py BERT, whose names transformers' `BlipTextModel` kept) -> `text_encoder.*`, `mlp.*` unchanged.
    The contrastive projections are dropped; any other key is an error (a different checkpoint).
    """
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    mapped, unknown = {}, []
    for key, value in state_dict.items():
        if key.startswith(_UNUSED_PREFIXES) or key in _UNUSED_KEYS:
            continue
        new_key = None
        if key.startswith("blip.visual_encoder."):
            vision_key = _vision_key(key[len("blip.visual_encoder.") :])
            new_key = None if vision_key is None else "vision_model." + vision_key
        elif key.startswith("blip.text_encoder."):
            new_key = "text_encoder." + key[len("blip.text_encoder.") :]
        elif key.startswith("mlp.layers."):
            new_key = key
        if new_key is None:
            unknown.append(key)
        else:
            mapped[new_key] = value
    if unknown:
        raise ValueError(
            f"{len(unknown)} key(s) not in ImageReward's layout, e.g. {unknown[0]!r}; is this an ImageReward.pt?"
        )
    return mapped


def _require(state_dict: Dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"missing {key!r}; is this an ImageReward.pt?")
    return state_dict[key]


def _count_layers(state_dict: Dict[str, torch.Tensor], pattern: str) -> int:
    indices = {int(match.group(1)) for key in state_dict if (match := re.match(pattern, key))}
    return max(indices) + 1 if indices else 0


def imagereward_configs(state_dict: Dict[str, torch.Tensor], vision_heads: int = 16, text_heads: int = 12):
    """`(BlipVisionConfig, BlipTextConfig)` sized from a state dict in the published key layout.

    Widths, depths, patch and image size, vocabulary and positions are read from the tensors (for `ImageReward.pt`:
    ViT-L/16 at 224 px, 24 layers of width 1024; BERT-base, 12 layers, 30524 tokens). Head counts are not stored
    in the weights: `vision_heads` / `text_heads` (16 and 12 in the published model).
    """
    from transformers import BlipTextConfig, BlipVisionConfig

    pos_embed = _require(state_dict, "blip.visual_encoder.pos_embed")
    patch = _require(state_dict, "blip.visual_encoder.patch_embed.proj.weight")
    vision_width, patch_size = patch.shape[0], patch.shape[-1]
    grid = math.isqrt(pos_embed.shape[1] - 1)
    vision = BlipVisionConfig(
        hidden_size=vision_width,
        intermediate_size=_require(state_dict, "blip.visual_encoder.blocks.0.mlp.fc1.weight").shape[0],
        num_hidden_layers=_count_layers(state_dict, r"blip\.visual_encoder\.blocks\.(\d+)\."),
        num_attention_heads=vision_heads,
        image_size=grid * patch_size,
        patch_size=patch_size,
        hidden_act="gelu",
        layer_norm_eps=VISION_LAYER_NORM_EPS,
    )
    words = _require(state_dict, "blip.text_encoder.embeddings.word_embeddings.weight")
    positions = _require(state_dict, "blip.text_encoder.embeddings.position_embeddings.weight")
    text = BlipTextConfig(
        vocab_size=words.shape[0],
        hidden_size=words.shape[1],
        encoder_hidden_size=vision_width,
        intermediate_size=_require(state_dict, "blip.text_encoder.encoder.layer.0.intermediate.dense.weight").shape[0],
        num_hidden_layers=_count_layers(state_dict, r"blip\.text_encoder\.encoder\.layer\.(\d+)\."),
        num_attention_heads=text_heads,
        max_position_embeddings=positions.shape[0],
        hidden_act="gelu",
        layer_norm_eps=TEXT_LAYER_NORM_EPS,
        is_decoder=True,  # transformers builds the cross-attention layers only for a "decoder"; run bidirectional
    )
    return vision, text


class ImageRewardHead(nn.Module):
    """ImageReward's MLP on the [CLS] feature: Linear layers 768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations.

    The layout (dropouts included) is theirs, so checkpoint keys `mlp.layers.{0,2,4,6,7}.*` load unchanged.
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class ImageRewardModel(nn.Module):
    """BLIP image encoder + cross-attending text encoder + `ImageRewardHead`; `forward` gives the raw head output."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = ImageRewardHead(text_config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Raw scores `[B]` (before normalisation) of normalised pixels `[B, 3, S, S]` and tokenized prompts."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        )
        return self.mlp(text.last_hidden_state[:, 0, :])[:, 0]


def build_imagereward_model(
    state_dict: Dict[str, torch.Tensor], vision_heads: int = 16, text_heads: int = 12
) -> ImageRewardModel:
    """An `ImageRewardModel` sized from and loaded (strictly) with a state dict in the published layout."""
    vision_config, text_config = imagereward_configs(state_dict, vision_heads, text_heads)
    model = ImageRewardModel(vision_config, text_config)
    mapped = map_imagereward_state_dict(state_dict)
    result = model.load_state_dict(mapped, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("position_ids")]
    if missing or result.unexpected_keys:
        problem = f"missing {missing[0]!r}" if missing else f"unexpected {result.unexpected_keys[0]!r}"
        raise ValueError(f"does not fit ImageReward's model ({problem}); is this an ImageReward.pt?")
    return model.eval().requires_grad_(False)


def add_blip_tokens(tokenizer):
    """BLIP's `init_tokenizer`: `[DEC]` as bos token and `[ENC]` as an extra special token (vocab + 2)."""
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageRewardScorer(_OnImagesDevice):
    """ImageReward: `(mlp(BLIP text [CLS] attending to the image) - mean) / std`, about N(0, 1); higher is preferred.

    Args:
        model (`ImageRewardModel`): The model with ImageReward weights.
        tokenizer: BERT tokenizer with BLIP's added tokens.
        batch_size (`int`, *optional*): Score at most this many images per forward pass.
        max_tokens (`int`, *optional*, defaults to 35): Prompt length (padded and truncated), theirs.
    """

    def __init__(self, model: ImageRewardModel, tokenizer, batch_size: Optional[int] = None,
                 max_tokens: int = IMAGEREWARD_MAX_TOKENS):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.name = "imagereward"
        self.image_size = int(model.vision_model.config.image_size)
        self.dtype = next(model.parameters()).dtype
        self.modules = [self.model]
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: List[str], metadata=None) -> torch.Tensor:
        prompts = _check_prompts(prompts, images.shape[0], self.name)
        self._follow(images.device)
        size = self.image_size
        scores = []
        for batch in _batches(images.shape[0], self.batch_size):
            pixels = clip_preprocess(images[batch].float(), size=size, crop_size=(size, size)).to(self.dtype)
            tokens = self.tokenizer(prompts[batch], padding="max_length", truncation=True,
                                    max_length=self.max_tokens, return_tensors="pt").to(self.device)
            raw = self.model(pixels, tokens["input_ids"], tokens["attention_mask"])
            scores.append(normalize_imagereward_score(raw.float()).cpu())
        return torch.cat(scores)


def resolve_imagereward_checkpoint(checkpoint: Optional[str]) -> str:
    """Local path of `ImageReward.pt`: `checkpoint` (file, or folder holding it), else the HF cache of the repo."""
    how = (
        f"download it (`hf download {IMAGEREWARD_REPO} {IMAGEREWARD_CHECKPOINT} --local-dir DIR`) "
        f"and pass checkpoint='DIR/{IMAGEREWARD_CHECKPOINT}'"
    )
    if checkpoint is not None:
        path = os.path.expanduser(str(checkpoint))
        if os.path.isdir(path):
            path = os.path.join(path, IMAGEREWARD_CHECKPOINT)
        if not os.path.isfile(path):
            raise RewardWeightsNotFoundError(f"reward 'imagereward': checkpoint '{path}' not found; {how}.")
        return path
    from huggingface_hub import hf_hub_download

    from diffalign.utils.hub_utils import hub_unreachable_reason

    try:  # without a hub, the cache only (the client would retry a dead network for ~25 s)
        return hf_hub_download(IMAGEREWARD_REPO, IMAGEREWARD_CHECKPOINT,
                               local_files_only=hub_unreachable_reason() is not None)
    except Exception as error:  # offline, not cached, no network: all mean "not available here"
        raise RewardWeightsNotFoundError(
            f"reward 'imagereward': no checkpoint given and '{IMAGEREWARD_REPO}/{IMAGEREWARD_CHECKPOINT}' is not in "
            f"the HF cache ({first_line(error, 100, with_type=False)}); {how}."
        ) from None


@register_reward("imagereward")
def imagereward(
    checkpoint: Optional[str] = None,
    tokenizer: str = IMAGEREWARD_TOKENIZER,
    vision_heads: int = 16,
    text_heads: int = 12,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Union[None, str, torch.dtype] = None,
    batch_size: Optional[int] = None,
) -> ImageRewardScorer:
    """ImageReward (THUDM), rebuilt on transformers' BLIP; scores about N(0, 1), unverified against the package.

    Args:
        checkpoint (`str`, *optional*):
            `ImageReward.pt` (or a `.safetensors` conversion with the same keys), or a folder holding it.
            Defaults to the file in the HF cache of `THUDM/ImageReward`. Read with `weights_only=True`.
        tokenizer (`str`, *optional*, defaults to `"bert-base-uncased"`): Tokenizer directory or hub id.
        vision_heads (`int`, *optional*, defaults to 16): Attention heads of the ViT (not stored in the weights).
        text_heads (`int`, *optional*, defaults to 12): Attention heads of the text encoder.
        device (`str` or `torch.device`, *optional*): Device to load the model on; by default it follows the images.
        dtype (`str` or `torch.dtype`, *optional*): Model dtype (default float32).
        batch_size (`int`, *optional*): Maximum images per forward pass.
    """
    from transformers import AutoTokenizer

    resolved_dtype = resolve_dtype(dtype)
    path = resolve_imagereward_checkpoint(checkpoint)
    try:
        model = build_imagereward_model(load_hps_state_dict(path), vision_heads, text_heads)
    except ValueError as error:
        raise RewardWeightsNotFoundError(
            f"reward 'imagereward': cannot use '{path}': {first_line(error, 200, with_type=False)}"
        ) from None
    bert_tokenizer = from_pretrained_or_raise(
        AutoTokenizer, tokenizer, reward="imagereward", argument="tokenizer", default=IMAGEREWARD_TOKENIZER
    )
    scorer = ImageRewardScorer(model.to(dtype=resolved_dtype), add_blip_tokens(bert_tokenizer), batch_size)
    if device is not None:
        scorer._follow(torch.device(device))
    return scorer
