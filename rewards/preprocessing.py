"""Tensor image preprocessing for reward models, on the images' own device.

The reward models were trained with PIL-based preprocessing (transformers' `CLIPImageProcessor`,
open_clip's `image_transform`). Converting every generated batch to PIL images would leave the GPU,
quantise to uint8 and run one image at a time, so these functions redo the same geometry with
`torch.nn.functional.interpolate(..., antialias=True)`, which implements PIL's resampling filters.
Output sizes and crop offsets follow the reference code exactly; pixel values agree with the PIL
path up to PIL's uint8 rounding (mean absolute difference about 1e-3 in [0, 1] units, see
`tests/test_rewards.py`).
"""

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

# Mean and standard deviation of OpenAI's CLIP training images, used by CLIP, PickScore and HPSv2.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL resampling codes (`PIL.Image.Resampling`) -> `torch.nn.functional.interpolate` modes.
_PIL_RESAMPLE_TO_MODE = {2: "bilinear", 3: "bicubic"}


def shortest_side_size(height: int, width: int, size: int) -> Tuple[int, int]:
    """Output `(height, width)` when the shortest side is resized to `size`, as in transformers.

    The long side is truncated (`int(size * long / short)`), like
    `transformers.image_transforms.get_resize_output_image_size(..., default_to_square=False)`.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def resize(images: torch.Tensor, size: Tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resizes `[B, C, H, W]` images to `size` like PIL does (antialiased, clamped to [0, 1])."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    resized = F.interpolate(images, size=size, mode=mode, antialias=True, align_corners=False)
    return resized.clamp(0, 1)


def center_crop(images: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Crops the center `size = (height, width)`, with transformers' offsets `(H - h) // 2`.

    Images smaller than the crop are zero-padded first, centred with `ceil` offsets, as in
    `transformers.image_transforms.center_crop`.
    """
    crop_height, crop_width = size
    height, width = images.shape[-2:]
    if height < crop_height or width < crop_width:
        pad_height, pad_width = max(crop_height - height, 0), max(crop_width - width, 0)
        top_pad, left_pad = (pad_height + 1) // 2, (pad_width + 1) // 2
        images = F.pad(images, (left_pad, pad_width - left_pad, top_pad, pad_height - top_pad))
        height, width = images.shape[-2:]
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return images[..., top : top + crop_height, left : left + crop_width]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """`(images - mean) / std` per channel."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    crop_size: Tuple[int, int] = (224, 224),
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    mode: str = "bicubic",
) -> torch.Tensor:
    """CLIP preprocessing of float images: resize shortest side, center crop, normalise.

    Matches `CLIPImageProcessor` (and OpenAI CLIP's `Resize` + `CenterCrop` transform) applied to the
    same images as uint8 PIL images, without leaving the images' device.

    Args:
        images (`torch.Tensor`):
            Float images `[B, 3, H, W]` in [0, 1], on any device.
        size (`int`, *optional*, defaults to 224):
            Length of the shortest side after resizing.
        crop_size (`Tuple[int, int]`, *optional*, defaults to `(224, 224)`):
            `(height, width)` of the center crop.
        mean, std (`Sequence[float]`, *optional*, default to OpenAI CLIP's statistics):
            Per-channel normalisation.
        mode (`str`, *optional*, defaults to `"bicubic"`):
            Interpolation mode (`"bicubic"` or `"bilinear"`).

    Returns:
        `torch.Tensor`: float32 `[B, 3, crop_height, crop_width]` pixel values on the images' device.
    """
    images = images.float()
    height, width = images.shape[-2:]
    images = resize(images, shortest_side_size(height, width, size), mode)
    images = center_crop(images, crop_size)
    return normalize(images, mean, std)


def resize_longest_side_and_pad(images: torch.Tensor, size: int = 224, fill: float = 0.0) -> torch.Tensor:
    """Resizes the longest side to `size` (bicubic) and pads to a centred `size x size` square.

    Same geometry as open_clip's `ResizeMaxSize` (used by HPSv2's evaluation transform): new sides
    are `round(side * size / longest)`, padding `pad // 2` before and the rest after.
    """
    height, width = images.shape[-2:]
    scale = size / float(max(height, width))
    if scale == 1.0:
        return images
    new_height, new_width = round(height * scale), round(width * scale)
    images = resize(images, (new_height, new_width), "bicubic")
    pad_height, pad_width = size - new_height, size - new_width
    padding = (pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2)
    return F.pad(images, padding, value=fill)


def _size_field(size, key: str):
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def preprocess_kwargs_from_image_processor(image_processor) -> Dict:
    """Reads the `clip_preprocess` arguments from a transformers `CLIPImageProcessor`.

    Args:
        image_processor (`CLIPImageProcessor`):
            The model's reference image processor (e.g. `CLIPProcessor.from_pretrained(...).image_processor`).

    Returns:
        `dict`: keyword arguments `size`, `crop_size`, `mean`, `std` and `mode` for `clip_preprocess`.
    """
    size = _size_field(image_processor.size, "shortest_edge")
    if size is None:
        raise ValueError(f"only `shortest_edge` resizing is supported, got size={image_processor.size}")
    crop = image_processor.crop_size
    crop_size = (_size_field(crop, "height"), _size_field(crop, "width"))
    if not getattr(image_processor, "do_center_crop", True) or None in crop_size:
        raise ValueError(f"a center crop to a fixed size is required, got crop_size={crop}")
    resample = int(getattr(image_processor, "resample", 3))
    if resample not in _PIL_RESAMPLE_TO_MODE:
        raise ValueError(f"unsupported resampling filter {resample} (only bilinear=2 and bicubic=3)")
    return {
        "size": int(size),
        "crop_size": (int(crop_size[0]), int(crop_size[1])),
        "mean": tuple(float(m) for m in image_processor.image_mean),
        "std": tuple(float(s) for s in image_processor.image_std),
        "mode": _PIL_RESAMPLE_TO_MODE[resample],
    }
