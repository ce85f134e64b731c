"""CLIP-based rewards on transformers models: LAION aesthetic predictor, PickScore, CLIP score, and the video-native
`temporal_consistency` (mean CLIP-image cosine similarity of consecutive frames).

Weights are given by local path or hub id (`model=`, `processor=`, `head=`); the defaults are the
standard hub ids, which work offline once they are in the Hugging Face cache. Weights are only read
from safetensors (`use_safetensors=True`); nothing is unpickled. Models load on the CPU and move to
the device of the images they score; preprocessing runs there too (`preprocessing.clip_preprocess`,
checked against each model's `CLIPImageProcessor`).
"""

import os
from typing import Dict, List, Optional, Union

import torch

from diffalign.errors import first_line

from . import RewardError, RewardWeightsNotFoundError, register_reward
from .preprocessing import clip_preprocess, preprocess_kwargs_from_image_processor

CLIP_VIT_L14 = "openai/clip-vit-large-patch14"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
AESTHETIC_HEAD_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"
)


def resolve_dtype(dtype: Union[None, str, torch.dtype]) -> torch.dtype:
    """`None` -> float32, `"float16"`/`"fp16"`/`"bfloat16"`/... or a `torch.dtype` -> that dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    resolved = getattr(torch, aliases.get(dtype, dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


def weights_not_found(
    reward: str, argument: str, name_or_path: str, default: str, reason: str = ""
) -> RewardWeightsNotFoundError:
    """Builds the one-line error telling the user what to download and which argument to point at it."""
    reason = f" ({reason})" if reason else ""
    return RewardWeightsNotFoundError(
        f"reward '{reward}': cannot load {argument}='{name_or_path}'{reason}. "
        f"Download '{default}' (e.g. `hf download {default} --local-dir DIR`) and pass {argument}=DIR "
        f"(in a config: `{reward}: {{weight: ..., {argument}: DIR}}`)."
    )


def from_pretrained_or_raise(cls, name_or_path: str, *, reward: str, argument: str, default: str, **kwargs):
    """`cls.from_pretrained(name_or_path, **kwargs)`, a missing model becoming a `RewardWeightsNotFoundError`.

    Args:
        cls: A transformers class with `from_pretrained` (model, processor, config).
        name_or_path (`str`): Local directory or hub id.
        reward (`str`): Name of the reward, for the message.
        argument (`str`): The factory argument that points at these weights (`"model"`, `"processor"`).
        default (`str`): The standard hub id to download.
    """
    from huggingface_hub.utils import HFValidationError

    from diffalign.utils.hub_utils import hub_unreachable_reason

    unreachable = None
    if not os.path.isdir(name_or_path):  # a hub id without a hub: the cache or one line at once, not minutes of retries
        unreachable = hub_unreachable_reason()
        if unreachable and unreachable != "HF_HUB_OFFLINE=1":
            kwargs["local_files_only"] = True
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, HFValidationError) as error:
        reason = f"not in the cache and the Hugging Face Hub {unreachable}" if unreachable and (
            unreachable != "HF_HUB_OFFLINE=1") else first_line(error, 160, with_type=False)
        raise weights_not_found(reward, argument, name_or_path, default, reason) from None


def _load_clip_model(name_or_path: str, reward: str, default: str, dtype: torch.dtype):
    from transformers import CLIPModel

    model = from_pretrained_or_raise(
        CLIPModel, name_or_path, reward=reward, argument="model", default=default, use_safetensors=True
    )
    return model.to(dtype=dtype).eval().requires_grad_(False)


def _load_clip_vision_model(name_or_path: str, reward: str, default: str, dtype: torch.dtype):
    """Loads only the vision tower and projection of a CLIP checkpoint (`CLIPVisionModelWithProjection`)."""
    from transformers import AutoConfig, CLIPVisionModelWithProjection

    config = from_pretrained_or_raise(AutoConfig, name_or_path, reward=reward, argument="model", default=default)
    if config.model_type == "clip":
        # The projection size of a full CLIP checkpoint is stored on the top-level config.
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
        config = vision_config
    model = from_pretrained_or_raise(
        CLIPVisionModelWithProjection,
        name_or_path,
        reward=reward,
        argument="model",
        default=default,
        config=config,
        use_safetensors=True,
    )
    return model.to(dtype=dtype).eval().requires_grad_(False)


def _batches(n: int, batch_size: Optional[int]):
    step = n if not batch_size else batch_size
    for start in range(0, n, max(step, 1)):
        yield slice(start, min(start + step, n))


def _check_prompts(prompts, batch: int, reward: str) -> List[str]:
    if isinstance(prompts, str):
        prompts = [prompts] * batch
    if prompts is None or len(prompts) != batch:
        raise ValueError(f"reward '{reward}' needs one prompt per image: {batch} images, prompts={prompts!r}")
    return list(prompts)


class AestheticHead(torch.nn.Module):
    """MLP head of LAION's improved aesthetic predictor ("sac+logos+ava1-l14-linearMSE").

    `Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1),
    Linear(64, 16), Linear(16, 1)` on L2-normalised CLIP ViT-L/14 image embeddings. The parameter names
    (`layers.0.weight`, ..., `layers.7.bias`) are those of the public checkpoint.

    Args:
        input_dim (`int`, *optional*, defaults to 768):
            Size of the CLIP image embedding.
        hidden_dims (`tuple`, *optional*, defaults to `(1024, 128, 64, 16)`):
            Widths of the four hidden layers (smaller values give tiny test heads).
    """

    def __init__(self, input_dim: int = 768, hidden_dims=(1024, 128, 64, 16)):
        super().__init__()
        d1, d2, d3, d4 = hidden_dims
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_dim, d1),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(d1, d2),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(d2, d3),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(d3, d4),
            torch.nn.Linear(d4, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)

    @classmethod
    def from_state_dict(cls, state_dict: Dict[str, torch.Tensor]) -> "AestheticHead":
        """Builds a head whose sizes are read from the weights, then loads them (strictly)."""
        input_dim = state_dict["layers.0.weight"].shape[1]
        hidden_dims = tuple(state_dict[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6))
        head = cls(input_dim, hidden_dims)
        head.load_state_dict(state_dict)
        return head


def load_aesthetic_head(path: Optional[str], reward: str = "aesthetic") -> AestheticHead:
    """Loads the aesthetic MLP from a local `.safetensors` file (see `scripts/convert_aesthetic_head.py`)."""
    from safetensors.torch import load_file

    how = (
        f"download {AESTHETIC_HEAD_URL}, convert it once with "
        f"`python scripts/convert_aesthetic_head.py sac+logos+ava1-l14-linearMSE.pth aesthetic_head.safetensors` "
        f"and pass head='/path/to/aesthetic_head.safetensors'"
    )
    if path is None:
        raise RewardWeightsNotFoundError(f"reward '{reward}': no aesthetic head given; {how}.")
    path = os.path.expanduser(str(path))
    if not path.endswith(".safetensors"):
        raise RewardWeightsNotFoundError(f"reward '{reward}': head='{path}' is not a .safetensors file; {how}.")
    if not os.path.isfile(path):
        raise RewardWeightsNotFoundError(f"reward '{reward}': head file '{path}' not found; {how}.")
    return AestheticHead.from_state_dict(load_file(path)).eval().requires_grad_(False)


class _OnImagesDevice:
    """Moves `self.modules` to the device of the images being scored (once per device change)."""

    modules: List[torch.nn.Module]
    device: torch.device

    def _follow(self, device: torch.device):
        if device != self.device:
            for module in self.modules:
                module.to(device)
            self.device = device


class AestheticScorer(_OnImagesDevice):
    """LAION aesthetic score: `head(normalize(clip_image_embedding(image)))`, about 1-10, higher is prettier.

    Args:
        vision_model (`CLIPVisionModelWithProjection`): CLIP ViT-L/14 image tower with projection.
        head (`AestheticHead`): The aesthetic MLP.
        preprocess_kwargs (`dict`): `clip_preprocess` arguments of the model's image processor.
        batch_size (`int`, *optional*): Score at most this many images per forward pass.
    """

    def __init__(self, vision_model, head: AestheticHead, preprocess_kwargs: dict, batch_size: Optional[int] = None):
        self.vision_model = vision_model
        self.head = head.to(dtype=vision_model.dtype)
        self.preprocess_kwargs = preprocess_kwargs
        self.batch_size = batch_size
        self.modules = [self.vision_model, self.head]
        self.device = torch.device("cpu")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Optional[List[str]] = None, metadata=None) -> torch.Tensor:
        self._follow(images.device)
        scores = []
        for batch in _batches(images.shape[0], self.batch_size):
            pixels = clip_preprocess(images[batch], **self.preprocess_kwargs).to(self.vision_model.dtype)
            embeddings = self.vision_model(pixel_values=pixels).image_embeds
            embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
            scores.append(self.head(embeddings).float().cpu())
        return torch.cat(scores)


class CLIPSimilarityScorer(_OnImagesDevice):
    """`scale * cos(image_embedding, text_embedding)` of a transformers `CLIPModel`.

    Args:
        model (`CLIPModel`): The CLIP model.
        tokenizer: Its tokenizer (prompts are padded and truncated to `max_length` tokens).
        preprocess_kwargs (`dict`): `clip_preprocess` arguments of the model's image processor.
        scale (`float`, *optional*):
            Multiplier of the cosine; `None` uses the model's learned temperature `logit_scale.exp()`
            (PickScore's definition).
        batch_size (`int`, *optional*): Score at most this many images per forward pass.
        max_length (`int`, *optional*, defaults to 77): Token limit of the text encoder.
        name (`str`, *optional*): Reward name, for error messages.
    """

    def __init__(
        self,
        model,
        tokenizer,
        preprocess_kwargs: dict,
        scale: Optional[float] = None,
        batch_size: Optional[int] = None,
        max_length: int = 77,
        name: str = "clip_score",
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess_kwargs = preprocess_kwargs
        self.scale = scale
        self.batch_size = batch_size
        self.max_length = max_length
        self.name = name
        self.modules = [self.model]
        self.device = torch.device("cpu")

    def _image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        pixels = clip_preprocess(images, **self.preprocess_kwargs).to(self.model.dtype)
        # vision tower + projection, like `CLIPModel.get_image_features` (whose return type changed in transformers 5)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        embeddings = self.model.visual_projection(pooled)
        return embeddings / embeddings.norm(dim=-1, keepdim=True)

    def _text_embeddings(self, prompts: List[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        pooled = self.model.text_model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).pooler_output
        embeddings = self.model.text_projection(pooled)
        return embeddings / embeddings.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: List[str], metadata=None) -> torch.Tensor:
        prompts = _check_prompts(prompts, images.shape[0], self.name)
        self._follow(images.device)
        scale = self.model.logit_scale.exp() if self.scale is None else self.scale
        scores = []
        for batch in _batches(images.shape[0], self.batch_size):
            image_embeddings = self._image_embeddings(images[batch])
            text_embeddings = self._text_embeddings(prompts[batch])
            scores.append((scale * (image_embeddings * text_embeddings).sum(dim=-1)).float().cpu())
        return torch.cat(scores)


def consecutive_frame_similarity(embeddings: torch.Tensor) -> torch.Tensor:
    """`[B, F, D]` frame embeddings -> `[B]`: the mean over `f < F - 1` of `cos(e_f, e_{f+1})`, in [-1, 1]."""
    unit = embeddings / embeddings.norm(dim=-1, keepdim=True)
    return (unit[:, :-1] * unit[:, 1:]).sum(dim=-1).mean(dim=1)


class TemporalConsistencyScorer(_OnImagesDevice):
    """Video-native: the mean cosine similarity of the CLIP image embeddings of consecutive frames
    (`consecutive_frame_similarity`), 1 for a still video; Tune-A-Video's "frame consistency".

    Args:
        vision_model (`CLIPVisionModelWithProjection`): a CLIP image tower with its projection.
        preprocess_kwargs (`dict`): `clip_preprocess` arguments of the model's image processor.
        batch_size (`int`, *optional*): Embed at most this many frames per forward pass.
    """

    video_native = True  # called with videos `[B, F, 3, H, W]` (diffalign.rewards.is_video_native)

    def __init__(self, vision_model, preprocess_kwargs: dict, batch_size: Optional[int] = None):
        self.vision_model = vision_model
        self.preprocess_kwargs = preprocess_kwargs
        self.batch_size = batch_size
        self.modules = [self.vision_model]
        self.device = torch.device("cpu")

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, prompts: Optional[List[str]] = None, metadata=None) -> torch.Tensor:
        count, frames = videos.shape[:2]
        if frames < 2:
            raise RewardError(f"reward 'temporal_consistency' compares consecutive frames; the videos have {frames}")
        self._follow(videos.device)
        flat = videos.flatten(0, 1)
        embeddings = []
        for batch in _batches(flat.shape[0], self.batch_size):
            pixels = clip_preprocess(flat[batch], **self.preprocess_kwargs).to(self.vision_model.dtype)
            embeddings.append(self.vision_model(pixel_values=pixels).image_embeds.float())
        return consecutive_frame_similarity(torch.cat(embeddings).unflatten(0, (count, frames))).cpu()


def _load_processor(name_or_path: str, reward: str, default: str, argument: str = "processor"):
    from transformers import CLIPProcessor

    return from_pretrained_or_raise(CLIPProcessor, name_or_path, reward=reward, argument=argument, default=default)


@register_reward("aesthetic")
def aesthetic(
    head: Optional[str] = None,
    model: str = CLIP_VIT_L14,
    processor: Optional[str] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Union[None, str, torch.dtype] = None,
    batch_size: Optional[int] = None,
) -> AestheticScorer:
    """LAION aesthetic predictor (improved-aesthetic-predictor, "sac+logos+ava1-l14-linearMSE"), as used by DDPO.

    Args:
        head (`str`):
            Local `.safetensors` file of the MLP head, converted once from the public `.pth` with
            `scripts/convert_aesthetic_head.py`.
        model (`str`, *optional*, defaults to `"openai/clip-vit-large-patch14"`):
            CLIP ViT-L/14 checkpoint (directory or hub id); only its vision tower is loaded.
        processor (`str`, *optional*):
            Where to read the image preprocessing config; defaults to `model`.
        device (`str` or `torch.device`, *optional*):
            Device to load the models on; by default they follow the images' device.
        dtype (`str` or `torch.dtype`, *optional*): Model dtype (default float32).
        batch_size (`int`, *optional*): Maximum images per forward pass.
    """
    from transformers import CLIPImageProcessor

    head_module = load_aesthetic_head(head, "aesthetic")
    image_processor = from_pretrained_or_raise(
        CLIPImageProcessor,
        processor or model,
        reward="aesthetic",
        argument="processor" if processor else "model",
        default=CLIP_VIT_L14,
    )
    vision_model = _load_clip_vision_model(model, "aesthetic", CLIP_VIT_L14, resolve_dtype(dtype))
    scorer = AestheticScorer(
        vision_model, head_module, preprocess_kwargs_from_image_processor(image_processor), batch_size
    )
    if device is not None:
        scorer._follow(torch.device(device))
    return scorer


@register_reward("pickscore")
def pickscore(
    model: str = PICKSCORE_MODEL,
    processor: str = PICKSCORE_PROCESSOR,
    scale: Optional[float] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Union[None, str, torch.dtype] = None,
    batch_size: Optional[int] = None,
) -> CLIPSimilarityScorer:
    """PickScore (Kirstain et al., 2023): `logit_scale.exp() * cos(image, text)`, about 18-24 for SD images.

    Same computation as the reference code of `yuvalkirstain/PickScore_v1` (CLIP ViT-H/14 fine-tuned on
    Pick-a-Pic) with the processor of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`. PickScore_v1's
    `logit_scale.exp()` is about 100; DRaFT and PRDP report (and weight their reward mixtures with) the score
    divided by 100, about 0.22: pass `scale=1.0` for that.

    Args:
        model (`str`, *optional*, defaults to `"yuvalkirstain/PickScore_v1"`): Model directory or hub id.
        processor (`str`, *optional*, defaults to `"laion/CLIP-ViT-H-14-laion2B-s32B-b79K"`):
            Processor (tokenizer + image processor) directory or hub id.
        scale (`float`, *optional*):
            Multiplier of the cosine; by default the model's `logit_scale.exp()` (the reference score).
        device (`str` or `torch.device`, *optional*): Device to load the model on; by default it follows the images.
        dtype (`str` or `torch.dtype`, *optional*): Model dtype (default float32).
        batch_size (`int`, *optional*): Maximum images per forward pass.
    """
    clip_processor = _load_processor(processor, "pickscore", PICKSCORE_PROCESSOR)
    clip_model = _load_clip_model(model, "pickscore", PICKSCORE_MODEL, resolve_dtype(dtype))
    scorer = CLIPSimilarityScorer(
        clip_model,
        clip_processor.tokenizer,
        preprocess_kwargs_from_image_processor(clip_processor.image_processor),
        scale=None if scale is None else float(scale),
        batch_size=batch_size,
        name="pickscore",
    )
    if device is not None:
        scorer._follow(torch.device(device))
    return scorer


@register_reward("clip_score")
def clip_score(
    model: str = CLIP_VIT_L14,
    processor: Optional[str] = None,
    scale: float = 1.0,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Union[None, str, torch.dtype] = None,
    batch_size: Optional[int] = None,
) -> CLIPSimilarityScorer:
    """CLIP text-image similarity `scale * cos(image, text)`, in [-scale, scale] (about 0.2-0.35 for matches).

    Pass `scale=100` for the scale of torchmetrics' `CLIPScore` (which also clamps at 0; this does not,
    so that poor images keep their ordering).

    Args:
        model (`str`, *optional*, defaults to `"openai/clip-vit-large-patch14"`): CLIP directory or hub id.
        processor (`str`, *optional*): Processor directory or hub id; defaults to `model`.
        scale (`float`, *optional*, defaults to 1.0): Multiplier of the cosine similarity.
        device (`str` or `torch.device`, *optional*): Device to load the model on; by default it follows the images.
        dtype (`str` or `torch.dtype`, *optional*): Model dtype (default float32).
        batch_size (`int`, *optional*): Maximum images per forward pass.
    """
    clip_processor = _load_processor(
        processor or model, "clip_score", CLIP_VIT_L14, "processor" if processor else "model"
    )
    clip_model = _load_clip_model(model, "clip_score", CLIP_VIT_L14, resolve_dtype(dtype))
    scorer = CLIPSimilarityScorer(
        clip_model,
        clip_processor.tokenizer,
        preprocess_kwargs_from_image_processor(clip_processor.image_processor),
        scale=float(scale),
        batch_size=batch_size,
        name="clip_score",
    )
    if device is not None:
        scorer._follow(torch.device(device))
    return scorer


@register_reward("temporal_consistency")
def temporal_consistency(
    model: str = CLIP_VIT_L14,
    processor: Optional[str] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Union[None, str, torch.dtype] = None,
    batch_size: Optional[int] = None,
) -> TemporalConsistencyScorer:
    """Video-native: mean CLIP-image cosine similarity of consecutive frames, in [-1, 1] (1: a still video).

    Args:
        model (`str`, *optional*, defaults to `"openai/clip-vit-large-patch14"`):
            CLIP checkpoint (directory or hub id); only its vision tower and projection are loaded.
        processor (`str`, *optional*): Where to read the image preprocessing config; defaults to `model`.
        device (`str` or `torch.device`, *optional*): Device to load the model on; by default it follows the videos.
        dtype (`str` or `torch.dtype`, *optional*): Model dtype (default float32).
        batch_size (`int`, *optional*): Maximum frames per forward pass.
    """
    from transformers import CLIPImageProcessor

    image_processor = from_pretrained_or_raise(
        CLIPImageProcessor,
        processor or model,
        reward="temporal_consistency",
        argument="processor" if processor else "model",
        default=CLIP_VIT_L14,
    )
    vision_model = _load_clip_vision_model(model, "temporal_consistency", CLIP_VIT_L14, resolve_dtype(dtype))
    scorer = TemporalConsistencyScorer(vision_model, preprocess_kwargs_from_image_processor(image_processor),
                                       batch_size)
    if device is not None:
        scorer._follow(torch.device(device))
    return scorer
