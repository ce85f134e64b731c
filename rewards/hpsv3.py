"""HPSv3 (Ma et al., 2025, MizzenAI/HPSv3): Qwen2-VL-7B-Instruct with a preference head on a `<|Reward|>` token.

The published model (`hpsv3` 1.0.0, `hpsv3/model/qwen2vl_trainer.py`, `Qwen2VLRewardModelBT`, config
`HPSv3_7B.yaml`: `rm_head_type: ranknet`, `output_dim: 2`, `use_special_tokens: true`) reads a chat whose user turn is
the image then their instruction with the prompt and `<|Reward|>`; the last hidden state at `<|Reward|>` goes through
`Linear(3584, 1024) -> ReLU -> Dropout -> Linear(1024, 16) -> ReLU -> Linear(16, 2)` in float32, giving `(mu, sigma)`;
the score is `mu` (`hpsv3/inference.py`: "we select miu as the final output"). Images are resized to 256 * 28 * 28
pixels (their `min_pixels = max_pixels`), so every image becomes 256 visual tokens.

The package cannot be installed here (it pins transformers==4.45.2 and needs torchvision, deepspeed, trl), so the
model is transformers' `Qwen2VLModel` plus the head, and their checkpoint (`HPSv3.safetensors`, keys of transformers
4.45's `Qwen2VLForConditionalGeneration`: `model.*`, `visual.*`, `lm_head.*`, `rm_head.*`) is mapped onto it. Their
forward calls the language model **without position ids**, so transformers 4.45 used plain sequential positions for
all three M-RoPE sections, not Qwen2-VL's 3-D image positions; this module passes the same positions.

Not verified against the published scores (no checkpoint, no 7B model here): see docs/rewards.md, "HPSv3".
"""

import math
import os
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from diffalign.errors import first_line

from . import RewardWeightsNotFoundError, register_reward
from .clip_rewards import _batches, _check_prompts, _OnImagesDevice, from_pretrained_or_raise, resolve_dtype
from .hpsv2 import load_hps_state_dict
from .preprocessing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize, resize

HPSV3_REPO = "MizzenAI/HPSv3"
HPSV3_CHECKPOINT = "HPSv3.safetensors"
HPSV3_BASE = "Qwen/Qwen2-VL-7B-Instruct"
REWARD_TOKEN = "<|Reward|>"
# their `prepare_batch`: min_pixels = max_pixels = 256 * 28 * 28
HPSV3_IMAGE_PIXELS = 256 * 28 * 28

# `hpsv3/dataset/data_collator_qwen.py`: INSTRUCTION (with the prompt) + prompt_with_special_token, verbatim.
HPSV3_INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""  # noqa: E501, W291
HPSV3_REWARD_PROMPT = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


def hpsv3_chat_text(prompt: str, image_tokens: int) -> str:
    """The chat text of one image and prompt, as Qwen2-VL-7B-Instruct's chat template renders their message.

    Default system turn, the user turn (image placeholder expanded to `image_tokens` pads, as Qwen2VLProcessor
    does, then their instruction), and the generation prompt.
    """
    user = HPSV3_INSTRUCTION.format(text_prompt=prompt) + HPSV3_REWARD_PROMPT
    image = "<|vision_start|>" + "<|image_pad|>" * image_tokens + "<|vision_end|>"
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{image}{user}<|im_end|>\n<|im_start|>assistant\n"
    )


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = HPSV3_IMAGE_PIXELS,
                 max_pixels: int = HPSV3_IMAGE_PIXELS) -> Tuple[int, int]:
    """Qwen2-VL's `smart_resize`: sides multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    new_height = max(factor, round(height / factor) * factor)
    new_width = max(factor, round(width / factor) * factor)
    if new_height * new_width > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        new_height = max(factor, math.floor(height / beta / factor) * factor)
        new_width = max(factor, math.floor(width / beta / factor) * factor)
    elif new_height * new_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * beta / factor) * factor
        new_width = math.ceil(width * beta / factor) * factor
    return new_height, new_width


def qwen2vl_patches(pixels: torch.Tensor, patch_size: int = 14, temporal_patch_size: int = 2,
                    merge_size: int = 2) -> torch.Tensor:
    """Qwen2VLImageProcessor's patch layout of normalised images `[B, C, H, W]` -> `[B * grid_h * grid_w, C*T*P*P]`.

    The image is repeated `temporal_patch_size` times (one frame), patches are ordered by merge window, as in
    `Qwen2VLImageProcessor._preprocess`.
    """
    batch, channels, height, width = pixels.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    frames = pixels[:, None].expand(batch, temporal_patch_size, channels, height, width)
    patches = frames.reshape(batch, temporal_patch_size, channels, grid_h // merge_size, merge_size, patch_size,
                             grid_w // merge_size, merge_size, patch_size)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(batch * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)


class HPSv3Head(nn.Module):
    """HPSv3's `ranknet` head without `rm_head_kwargs`: hidden -> 1024 -> 16 -> 2 with ReLUs, float32."""

    def __init__(self, hidden_size: int, output_dim: int = 2):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(hidden_size, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
            nn.Linear(16, output_dim),
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden.float())


def map_hpsv3_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Renames an `HPSv3.safetensors` state dict (transformers 4.45 layout) to `HPSv3Model`'s keys.

    `model.*` -> `backbone.language_model.*`, `visual.*` -> `backbone.visual.*`, `rm_head.*` -> `head.layers.*`;
    `lm_head.*` (unused by the reward) is dropped. A checkpoint saved by transformers 5 (`model.language_model.*`,
    `model.visual.*`) maps too; any other key is an error.
    """
    if "model" in state_dict and not isinstance(state_dict["model"], torch.Tensor):
        state_dict = state_dict["model"]
    mapped, unknown = {}, []
    for key, value in state_dict.items():
        if key.startswith("lm_head."):
            continue
        if key.startswith(("model.language_model.", "model.visual.")):
            mapped["backbone." + key[len("model.") :]] = value
        elif key.startswith("model."):
            mapped["backbone.language_model." + key[len("model.") :]] = value
        elif key.startswith("visual."):
            mapped["backbone." + key] = value
        elif key.startswith("rm_head."):
            mapped["head.layers." + key[len("rm_head.") :]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} key(s) not in HPSv3's layout, e.g. {unknown[0]!r}; is this HPSv3.safetensors?"
        )
    return mapped


class HPSv3Model(nn.Module):
    """`Qwen2VLModel` + `HPSv3Head` read at the reward token; `forward` gives `[B, 2]` = (mu, sigma)."""

    def __init__(self, config):
        super().__init__()
        from transformers import Qwen2VLModel

        self.backbone = Qwen2VLModel(config)
        self.head = HPSv3Head(config.text_config.hidden_size)

    def forward(self, input_ids, attention_mask, pixel_values, image_grid_thw, reward_token_id: int):
        batch, length = input_ids.shape
        # their forward passed no position ids: sequential positions in all three M-RoPE sections
        positions = torch.arange(length, device=input_ids.device).view(1, 1, -1).expand(3, batch, -1)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                               pixel_values=pixel_values, image_grid_thw=image_grid_thw).last_hidden_state
        at_reward = input_ids == reward_token_id
        if not bool((at_reward.sum(dim=1) == 1).all()):
            raise ValueError(f"every sequence must hold exactly one {REWARD_TOKEN} token")
        return self.head(hidden[at_reward])


def build_hpsv3_model(config, state_dict: Dict[str, torch.Tensor], dtype: torch.dtype) -> HPSv3Model:
    """An `HPSv3Model` of `config` (vocabulary sized from the checkpoint), weights assigned from `state_dict`.

    Built on the meta device and assigned, so the 8B parameters are not first initialised at random.
    """
    mapped = map_hpsv3_state_dict(state_dict)
    embeddings = mapped.get("backbone.language_model.embed_tokens.weight")
    if embeddings is None:
        raise ValueError("missing 'model.embed_tokens.weight'; is this HPSv3.safetensors?")
    config.text_config.vocab_size = embeddings.shape[0]
    with torch.device("meta"):
        model = HPSv3Model(config)
    mapped = {key: value.to(torch.float32 if key.startswith("head.") else dtype) for key, value in mapped.items()}
    result = model.load_state_dict(mapped, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        problem = (f"missing {result.missing_keys[0]!r}" if result.missing_keys
                   else f"unexpected {result.unexpected_keys[0]!r}")
        raise ValueError(f"does not fit HPSv3's model ({problem}); is this HPSv3.safetensors?")
    # buffers (rotary frequencies) are not in the checkpoint: recompute them off the meta device
    for module in model.modules():
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            _reinit_rotary(module)
    return model.eval().requires_grad_(False)


def _reinit_rotary(module):
    """Recomputes a rotary embedding's buffers (`inv_freq`), left on the meta device by the meta construction."""
    fresh = type(module)(module.config)
    for name, buffer in fresh.named_buffers(recurse=False):
        module.register_buffer(name, buffer, persistent=False)


class HPSv3Scorer(_OnImagesDevice):
    """HPSv3: `mu` of the head at `<|Reward|>` of Qwen2-VL reading the image and their instruction; higher is better.

    Args:
        model (`HPSv3Model`): The model with HPSv3 weights.
        tokenizer: Qwen2-VL's tokenizer with `<|Reward|>` added.
        batch_size (`int`, *optional*): Score at most this many images per forward pass.
        image_pixels (`int`, *optional*): Pixel budget of the resized image (theirs: 256 * 28 * 28).
    """

    def __init__(self, model: HPSv3Model, tokenizer, batch_size: Optional[int] = None,
                 image_pixels: int = HPSV3_IMAGE_PIXELS):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.image_pixels = image_pixels
        self.name = "hpsv3"
        self.reward_token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        vision = model.backbone.config.vision_config
        self.patch_size, self.merge_size = vision.patch_size, vision.spatial_merge_size
        self.temporal_patch_size = vision.temporal_patch_size
        self.dtype = model.backbone.dtype
        self.modules = [self.model]
        self.device = next(model.parameters()).device

    def _pixels(self, images: torch.Tensor):
        factor = self.patch_size * self.merge_size
        height, width = smart_resize(images.shape[-2], images.shape[-1], factor, self.image_pixels, self.image_pixels)
        pixels = normalize(resize(images.float(), (height, width)), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        patches = qwen2vl_patches(pixels, self.patch_size, self.temporal_patch_size, self.merge_size)
        grid = torch.tensor([[1, height // self.patch_size, width // self.patch_size]] * images.shape[0],
                            device=images.device)
        return patches.to(self.dtype), grid, (height // factor) * (width // factor)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: List[str], metadata=None) -> torch.Tensor:
        prompts = _check_prompts(prompts, images.shape[0], self.name)
        self._follow(images.device)
        scores = []
        for batch in _batches(images.shape[0], self.batch_size):
            patches, grid, image_tokens = self._pixels(images[batch])
            texts = [hpsv3_chat_text(prompt, image_tokens) for prompt in prompts[batch]]
            tokens = self.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt").to(self.device)
            outputs = self.model(tokens["input_ids"], tokens["attention_mask"], patches, grid, self.reward_token_id)
            scores.append(outputs[:, 0].float().cpu())
        return torch.cat(scores)


def resolve_hpsv3_checkpoint(checkpoint: Optional[str]) -> str:
    """Local path of `HPSv3.safetensors`: `checkpoint` (file, or folder holding it), else the HF cache."""
    how = (f"download it (`hf download {HPSV3_REPO} {HPSV3_CHECKPOINT} --local-dir DIR`) "
           f"and pass checkpoint='DIR/{HPSV3_CHECKPOINT}'")
    if checkpoint is not None:
        path = os.path.expanduser(str(checkpoint))
        if os.path.isdir(path):
            path = os.path.join(path, HPSV3_CHECKPOINT)
        if not os.path.isfile(path):
            raise RewardWeightsNotFoundError(f"reward 'hpsv3': checkpoint '{path}' not found; {how}.")
        return path
    from huggingface_hub import hf_hub_download

    from diffalign.utils.hub_utils import hub_unreachable_reason

    try:
        return hf_hub_download(HPSV3_REPO, HPSV3_CHECKPOINT, local_files_only=hub_unreachable_reason() is not None)
    except Exception as error:  # offline, not cached, no network: all mean "not available here"
        raise RewardWeightsNotFoundError(
            f"reward 'hpsv3': no checkpoint given and '{HPSV3_REPO}/{HPSV3_CHECKPOINT}' is not in the HF cache "
            f"({first_line(error, 100, with_type=False)}); {how}."
        ) from None


@register_reward("hpsv3")
def hpsv3(
    checkpoint: Optional[str] = None,
    base: str = HPSV3_BASE,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Union[None, str, torch.dtype] = "bfloat16",
    batch_size: Optional[int] = None,
    image_pixels: int = HPSV3_IMAGE_PIXELS,
) -> HPSv3Scorer:
    """HPSv3 (MizzenAI), rebuilt on transformers' Qwen2-VL; unverified against the package.

    Args:
        checkpoint (`str`, *optional*): `HPSv3.safetensors` or a folder holding it; default: the HF cache of
            `MizzenAI/HPSv3`.
        base (`str`, *optional*, defaults to `"Qwen/Qwen2-VL-7B-Instruct"`): Folder or hub id of the base model's
            `config.json` and tokenizer (its weights are not read: the checkpoint holds all of them).
        device (`str` or `torch.device`, *optional*): Device to load the model on; by default it follows the images.
        dtype (`str` or `torch.dtype`, *optional*, defaults to bfloat16): Backbone dtype (theirs); the head is float32.
        batch_size (`int`, *optional*): Maximum images per forward pass.
        image_pixels (`int`, *optional*): Pixel budget of the resized images (theirs: 200704 = 256 * 28 * 28).
    """
    from transformers import AutoConfig, AutoTokenizer

    resolved_dtype = resolve_dtype(dtype)
    path = resolve_hpsv3_checkpoint(checkpoint)
    config = from_pretrained_or_raise(AutoConfig, base, reward="hpsv3", argument="base", default=HPSV3_BASE)
    tokenizer = from_pretrained_or_raise(AutoTokenizer, base, reward="hpsv3", argument="base", default=HPSV3_BASE)
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    if not str(path).endswith(".safetensors"):
        state_dict = load_hps_state_dict(path)
    else:
        from safetensors.torch import load_file

        state_dict = load_file(path)
    try:
        model = build_hpsv3_model(config, state_dict, resolved_dtype)
    except ValueError as error:
        raise RewardWeightsNotFoundError(
            f"reward 'hpsv3': cannot use '{path}': {first_line(error, 200, with_type=False)}"
        ) from None
    scorer = HPSv3Scorer(model, tokenizer, batch_size, image_pixels)
    if device is not None:
        scorer._follow(torch.device(device))
    return scorer
