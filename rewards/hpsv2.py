"""HPSv2 / HPSv2.1 (Wu et al., 2023): human preference score of an open_clip ViT-H/14.

The score is the cosine similarity of the normalised image and text embeddings, as in the reference
`hpsv2/img_score.py` (`image_features @ text_features.T`, diagonal), about 0.25-0.35 for SD images.
It needs open_clip (`pip install "diffalign[openclip]"`); the model is built from open_clip's
`ViT-H-14` config with random weights and the HPS checkpoint is loaded over it, so the LAION base
weights are never downloaded. Checkpoints are read with `torch.load(weights_only=True)` (tensors
only, no arbitrary objects) or from `.safetensors`.

Preprocessing is the reference evaluation transform (open_clip's `ResizeMaxSize`: longest side to
224, bicubic, zero-padded to a square, OpenAI CLIP normalisation), done on the images' device.
"""

import os
from typing import Dict, List, Optional, Union

import torch

from diffalign.errors import first_line

from . import MissingRewardDependencyError, RewardWeightsNotFoundError, register_reward
from .clip_rewards import _batches, _check_prompts, _OnImagesDevice, resolve_dtype
from .preprocessing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize, resize_longest_side_and_pad

HPS_REPO = "xswu/HPSv2"
HPS_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_ARCHITECTURE = "ViT-H-14"


def import_open_clip(reward: str = "hpsv2"):
    """Imports open_clip, or raises a one-line `MissingRewardDependencyError` saying how to install it."""
    try:
        import open_clip
    except ImportError as error:
        raise MissingRewardDependencyError(
            f"reward '{reward}' needs open_clip, which is not installed or does not import "
            f"({first_line(error, 160, with_type=False)}); "
            f'install it with `pip install "diffalign[openclip]"` (open-clip-torch, which also needs torchvision).'
        ) from None
    return open_clip


def hps_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """HPSv2's evaluation transform on float images `[B, 3, H, W]` in [0, 1]; float32 pixel values.

    Longest side resized to `size` (bicubic), zero-padded (black, before normalisation) to
    `size x size`, normalised with OpenAI CLIP's mean and std.
    """
    images = resize_longest_side_and_pad(images.float(), size, fill=0.0)
    return normalize(images, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def resolve_checkpoint(checkpoint: Optional[str], version: str, reward: str = "hpsv2") -> str:
    """Local path of the HPS checkpoint: `checkpoint` (file, or folder holding the file), else the HF cache."""
    if version not in HPS_CHECKPOINTS:
        raise ValueError(f"reward '{reward}': unknown version {version!r}; choose one of {sorted(HPS_CHECKPOINTS)}")
    filename = HPS_CHECKPOINTS[version]
    how = (
        f"download '{filename}' from the hub repo '{HPS_REPO}' "
        f"(e.g. `hf download {HPS_REPO} {filename} --local-dir DIR`) and pass checkpoint='DIR/{filename}'"
    )
    if checkpoint is not None:
        path = os.path.expanduser(str(checkpoint))
        if os.path.isdir(path):
            path = os.path.join(path, filename)
        if not os.path.isfile(path):
            raise RewardWeightsNotFoundError(f"reward '{reward}': checkpoint '{path}' not found; {how}.")
        return path
    from huggingface_hub import hf_hub_download

    from diffalign.utils.hub_utils import hub_unreachable_reason

    try:  # without a hub, the cache only (the client would retry a dead network for ~25 s)
        return hf_hub_download(HPS_REPO, filename, local_files_only=hub_unreachable_reason() is not None)
    except Exception as error:  # offline, not cached, no network: all mean "not available here"
        raise RewardWeightsNotFoundError(
            f"reward '{reward}': no checkpoint given and '{HPS_REPO}/{filename}' is not in the HF cache "
            f"({first_line(error, 100, with_type=False)}); {how}."
        ) from None


def load_hps_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Reads an HPS checkpoint without unpickling objects: `.safetensors`, or a torch file via `weights_only=True`.

    Accepts a bare state dict or `{"state_dict": ...}` (the released files), and strips a DDP `module.` prefix.
    """
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state_dict = load_file(path)
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"cannot read '{path}' as plain tensors (weights_only=True): "
                f"{first_line(error, 160, with_type=False)}. "
                "diffalign never unpickles arbitrary objects; "
                "convert the checkpoint to .safetensors in a trusted environment."
            ) from None
        state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"'{path}' does not contain a state dict")
    if all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    return state_dict


def _image_size(model) -> int:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class HPSv2Scorer(_OnImagesDevice):
    """`cos(image_embedding, text_embedding)` of an open_clip model carrying HPS weights.

    Args:
        model: open_clip `CLIP` model with `encode_image(x, normalize=True)` and `encode_text(t, normalize=True)`.
        tokenizer: open_clip tokenizer, `tokenizer(list_of_str) -> LongTensor[B, 77]`.
        batch_size (`int`, *optional*): Score at most this many images per forward pass.
        name (`str`, *optional*): Reward name, for messages.
    """

    def __init__(self, model, tokenizer, batch_size: Optional[int] = None, name: str = "hpsv2"):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.name = name
        self.image_size = _image_size(model)
        self.dtype = next(model.parameters()).dtype
        self.modules = [self.model]
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: List[str], metadata=None) -> torch.Tensor:
        prompts = _check_prompts(prompts, images.shape[0], self.name)
        self._follow(images.device)
        scores = []
        for batch in _batches(images.shape[0], self.batch_size):
            pixels = hps_preprocess(images[batch], self.image_size).to(self.dtype)
            tokens = self.tokenizer(prompts[batch]).to(self.device)
            image_features = self.model.encode_image(pixels, normalize=True)
            text_features = self.model.encode_text(tokens, normalize=True)
            scores.append((image_features * text_features).sum(dim=-1).float().cpu())
        return torch.cat(scores)


@register_reward("hpsv2")
def hpsv2(
    checkpoint: Optional[str] = None,
    version: str = "v2.0",
    architecture: str = HPS_ARCHITECTURE,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Union[None, str, torch.dtype] = None,
    batch_size: Optional[int] = None,
) -> HPSv2Scorer:
    """HPSv2 human preference score (needs `diffalign[openclip]`).

    Args:
        checkpoint (`str`, *optional*):
            Local HPS checkpoint (`HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt` or a `.safetensors`
            conversion), or a folder holding it. Defaults to the file of `version` in the HF cache of `xswu/HPSv2`.
        version (`str`, *optional*, defaults to `"v2.0"`):
            `"v2.0"` (the score PRDP reports) or `"v2.1"`.
        architecture (`str`, *optional*, defaults to `"ViT-H-14"`): open_clip model config name.
        device (`str` or `torch.device`, *optional*): Device to load the model on; by default it follows the images.
        dtype (`str` or `torch.dtype`, *optional*): Model dtype (default float32).
        batch_size (`int`, *optional*): Maximum images per forward pass.
    """
    reward = "hpsv2.1" if version == "v2.1" else "hpsv2"
    open_clip = import_open_clip(reward)
    path = resolve_checkpoint(checkpoint, version, reward)
    state_dict = load_hps_state_dict(path)
    model = open_clip.create_model(architecture, pretrained=None, precision="fp32", device="cpu", output_dict=True)
    model.load_state_dict(state_dict, strict=True)
    model = model.to(dtype=resolve_dtype(dtype)).eval().requires_grad_(False)
    scorer = HPSv2Scorer(model, open_clip.get_tokenizer(architecture), batch_size, name=reward)
    if device is not None:
        scorer._follow(torch.device(device))
    return scorer


@register_reward("hpsv2.1")
def hpsv2_1(checkpoint: Optional[str] = None, **kwargs) -> HPSv2Scorer:
    """HPSv2.1: `hpsv2(version="v2.1")`, same arguments."""
    return hpsv2(checkpoint, version="v2.1", **kwargs)
