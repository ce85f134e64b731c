"""Rewards: registry, JPEG, mixtures, user rewards, and the CLIP/aesthetic/PickScore/HPSv2 scorers.

Every model here is a tiny random one built from a config and saved locally (no hub): the checks are
about shapes, dtypes, devices, batching, preprocessing and loading, not about score values.
"""

import importlib.util
import io
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.rewards import (
    REWARDS,
    MissingRewardDependencyError,
    RewardMixture,
    RewardWeightsNotFoundError,
    UnknownRewardError,
    available_rewards,
    get_reward,
    register_reward,
)
from diffalign.rewards.preprocessing import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    clip_preprocess,
    preprocess_kwargs_from_image_processor,
)

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "a painting of a horse riding an astronaut", "", "a dog"]

# One uint8 step after CLIP normalisation is 1 / 255 / std, at most 0.0150 (std 0.2613).
UINT8_STEP = 1 / 255 / min(OPENAI_CLIP_STD)


def smooth_test_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic uint8 RGB test image: smooth colour waves plus mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack(
        [128 + 100 * np.sin(xx / 7.0), 128 + 100 * np.cos(yy / 5.0), 128 + 90 * np.sin((xx + yy) / 11.0)], axis=-1
    )
    return np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)


def to_float_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255


def random_images(batch: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# tiny models


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random `CLIPModel` + `CLIPProcessor` (real CLIP tokenizer, default image processor) on disk."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffalign.tokenization import offline_clip_tokenizer

    directory = tmp_path_factory.mktemp("tiny_clip")
    from diffalign.testing import tiny_clip_text_kwargs

    text_config = tiny_clip_text_kwargs()
    vision_config = dict(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=224, patch_size=32
    )
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=16, logit_scale_init_value=3.0
    )
    CLIPModel(config).save_pretrained(directory)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=offline_clip_tokenizer()).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def reference_clip(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    """A tiny aesthetic head (16 -> 32 -> 16 -> 8 -> 4 -> 1, same layer structure) in safetensors."""
    from safetensors.torch import save_file

    from diffalign.rewards.clip_rewards import AestheticHead

    torch.manual_seed(1)
    head = AestheticHead(16, (32, 16, 8, 4))
    path = tmp_path_factory.mktemp("head") / "aesthetic_head.safetensors"
    save_file(head.state_dict(), str(path))
    return str(path)


def pil_images(images: torch.Tensor):
    arrays = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(array) for array in arrays]


def check_scores(scores: torch.Tensor, batch: int):
    assert scores.shape == (batch,)
    assert scores.dtype == torch.float32
    assert scores.device.type == "cpu"
    assert torch.isfinite(scores).all()


def check_batch_equals_items(reward, images, prompts, atol=1e-5):
    batched = reward(images, prompts, None)
    one_by_one = torch.cat([reward(images[i : i + 1], prompts[i : i + 1], None) for i in range(images.shape[0])])
    torch.testing.assert_close(batched, one_by_one, atol=atol, rtol=1e-5)
    return batched


# --------------------------------------------------------------------------------------------------
# registry


def test_builtins_are_registered_and_import_is_cheap():
    names = available_rewards()
    for name in [
        "jpeg_compressibility",
        "jpeg_incompressibility",
        "aesthetic",
        "pickscore",
        "clip_score",
        "hpsv2",
        "hpsv2.1",
    ]:
        assert name in names
    code = "import sys, diffalign.rewards as r; r.available_rewards(); print('transformers' in sys.modules)"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def test_unknown_reward_lists_available():
    with pytest.raises(UnknownRewardError) as info:
        get_reward("no_such_reward")
    message = str(info.value)
    assert "no_such_reward" in message and "jpeg_compressibility" in message and "pickscore" in message


def test_register_reward_decorator():
    @register_reward("test_constant")
    def constant(value: float = 1.0):
        def reward(images, prompts, metadata=None):
            return torch.full((images.shape[0],), value)

        return reward

    try:
        assert "test_constant" in available_rewards()
        scores = get_reward("test_constant", value=2.5)(random_images(3), ["a"] * 3, None)
        torch.testing.assert_close(scores, torch.full((3,), 2.5))
    finally:
        REWARDS.pop("test_constant")


def test_user_module_function_rewards(tmp_path, monkeypatch):
    (tmp_path / "my_user_rewards.py").write_text(
        "import torch\n"
        "def brightness(images, prompts, metadata=None):\n"
        "    return images.mean(dim=(1, 2, 3)).float().cpu()\n"
        "def scaled_brightness(scale=1.0):\n"
        "    return lambda images, prompts, metadata=None: scale * brightness(images, prompts)\n"
        "not_callable = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    images = random_images(2)
    torch.testing.assert_close(
        get_reward("my_user_rewards:brightness")(images, ["a", "b"]), images.mean(dim=(1, 2, 3))
    )
    factory_made = get_reward("my_user_rewards:scaled_brightness", scale=3.0)
    torch.testing.assert_close(factory_made(images, ["a", "b"]), 3 * images.mean(dim=(1, 2, 3)))
    for bad in ["my_user_rewards:missing", "my_user_rewards:not_callable", "no_such_module_xyz:fn"]:
        with pytest.raises(UnknownRewardError, match="reward '" + bad):
            get_reward(bad)


# --------------------------------------------------------------------------------------------------
# JPEG


def pil_jpeg_kb(images: torch.Tensor, quality: int = 95):
    sizes = []
    for image in pil_images(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(len(buffer.getvalue()) / 1000)
    return torch.tensor(sizes)


def test_jpeg_rewards_match_pil():
    smooth = torch.nn.functional.interpolate(random_images(2, 8), size=64, mode="bilinear")
    images = torch.cat([random_images(2, 64), smooth])
    expected = pil_jpeg_kb(images)
    incompressibility = get_reward("jpeg_incompressibility")(images, PROMPTS, None)
    compressibility = get_reward("jpeg_compressibility")(images, PROMPTS, None)
    check_scores(compressibility, 4)
    torch.testing.assert_close(incompressibility, expected)
    torch.testing.assert_close(compressibility, -expected)
    assert compressibility[2:].min() > compressibility[:2].max()  # smooth images compress better
    torch.testing.assert_close(
        get_reward("jpeg_incompressibility", quality=50)(images, PROMPTS), pil_jpeg_kb(images, 50)
    )


# --------------------------------------------------------------------------------------------------
# mixtures


def test_mixture_is_weighted_sum_of_parts(tmp_path, monkeypatch):
    (tmp_path / "my_mix_rewards.py").write_text(
        "def mean_red(images, prompts, metadata=None):\n    return images[:, 0].mean(dim=(1, 2))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    images = random_images(3, 32)
    mixture = get_reward(
        {
            "jpeg_incompressibility": 2.0,
            "jpeg_compressibility": {"weight": 0.5, "quality": 50},
            "my_mix_rewards:mean_red": -3,
        }
    )
    assert isinstance(mixture, RewardMixture)
    total = mixture(images, PROMPTS[:3], None)
    check_scores(total, 3)
    assert set(mixture.last_parts) == {"jpeg_incompressibility", "jpeg_compressibility", "my_mix_rewards:mean_red"}
    for part in mixture.last_parts.values():
        check_scores(part, 3)
    torch.testing.assert_close(mixture.last_parts["jpeg_incompressibility"], pil_jpeg_kb(images))
    torch.testing.assert_close(mixture.last_parts["jpeg_compressibility"], -pil_jpeg_kb(images, 50))
    expected = 2.0 * pil_jpeg_kb(images) - 0.5 * pil_jpeg_kb(images, 50) - 3 * images[:, 0].mean(dim=(1, 2))
    torch.testing.assert_close(total, expected)
    # per-part options can also be given as keyword arguments
    same = get_reward({"jpeg_compressibility": 1.0}, jpeg_compressibility={"quality": 50})
    torch.testing.assert_close(same(images, PROMPTS[:3]), -pil_jpeg_kb(images, 50))
    with pytest.raises(ValueError, match="weight"):
        get_reward({"jpeg_compressibility": {"quality": 50}})
    with pytest.raises(ValueError, match="not parts of the mixture"):
        get_reward({"jpeg_compressibility": 1.0}, jpeg_compresibility={"quality": 50})  # typo


# --------------------------------------------------------------------------------------------------
# preprocessing


@pytest.mark.parametrize("height,width", [(256, 320), (320, 250), (64, 64), (48, 80), (512, 512)])
def test_clip_preprocessing_matches_clip_image_processor(height, width):
    """Tolerance: at most 1.5 uint8 steps per pixel, 0.5 step on average (PIL rounds to uint8, we do not)."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor()
    image = smooth_test_image(height, width)
    expected = processor(images=Image.fromarray(image), return_tensors="pt").pixel_values
    actual = clip_preprocess(to_float_tensor(image), **preprocess_kwargs_from_image_processor(processor))
    assert actual.shape == expected.shape == (1, 3, 224, 224)
    difference = (actual - expected).abs()
    assert difference.max() < 1.5 * UINT8_STEP
    assert difference.mean() < 0.5 * UINT8_STEP


def test_clip_preprocessing_reads_processor_config():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 96}, crop_size={"height": 80, "width": 64}, resample=2)
    kwargs = preprocess_kwargs_from_image_processor(processor)
    assert kwargs["size"] == 96 and kwargs["crop_size"] == (80, 64) and kwargs["mode"] == "bilinear"
    image = smooth_test_image(120, 150)
    expected = processor(images=Image.fromarray(image), return_tensors="pt").pixel_values
    actual = clip_preprocess(to_float_tensor(image), **kwargs)
    assert actual.shape == expected.shape == (1, 3, 80, 64)
    assert (actual - expected).abs().mean() < 0.5 * UINT8_STEP


def reference_hps_transform(image: Image.Image, size: int = 224) -> torch.Tensor:
    """HPSv2's evaluation transform (open_clip `ResizeMaxSize` + ToTensor + Normalize) in PIL/numpy."""
    width, height = image.size
    scale = size / max(height, width)
    new_height, new_width = round(height * scale), round(width * scale)
    resized = image.resize((new_width, new_height), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(resized, ((size - new_width) // 2, (size - new_height) // 2))
    array = np.asarray(canvas).astype(np.float32) / 255
    array = (array - np.array(OPENAI_CLIP_MEAN, dtype=np.float32)) / np.array(OPENAI_CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None]


@pytest.mark.parametrize("height,width", [(256, 256), (64, 64), (300, 200), (150, 320)])
def test_hps_preprocessing_matches_reference_transform(height, width):
    from diffalign.rewards.hpsv2 import hps_preprocess

    image = smooth_test_image(height, width, seed=1)
    expected = reference_hps_transform(Image.fromarray(image))
    actual = hps_preprocess(to_float_tensor(image))
    assert actual.shape == expected.shape == (1, 3, 224, 224)
    difference = (actual - expected).abs()
    assert difference.max() < 1.5 * UINT8_STEP
    assert difference.mean() < 0.5 * UINT8_STEP


# --------------------------------------------------------------------------------------------------
# PickScore and CLIP score


def test_pickscore_matches_reference_computation(clip_dir, reference_clip):
    reward = get_reward("pickscore", model=clip_dir, processor=clip_dir)
    images = random_images(4, 64, seed=3)
    scores = check_batch_equals_items(reward, images, PROMPTS)
    check_scores(scores, 4)
    # the PickScore reference code, on PIL images through the processor
    model, processor = reference_clip
    with torch.no_grad():
        pixel_values = processor(images=pil_images(images), return_tensors="pt").pixel_values
        image_embeds = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)
        text = processor(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_embeds = model.text_projection(model.text_model(**text).pooler_output)
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    expected = model.logit_scale.exp() * (image_embeds * text_embeds).sum(-1)
    torch.testing.assert_close(scores, expected.detach(), atol=2e-3, rtol=1e-3)
    # DRaFT/PRDP scale (cosine, i.e. the score / logit_scale.exp())
    cosine = get_reward("pickscore", model=clip_dir, processor=clip_dir, scale=1.0)(images, PROMPTS)
    torch.testing.assert_close(cosine, scores / model.logit_scale.exp().item(), atol=1e-5, rtol=1e-4)


def test_clip_score_scale_and_prompt_checks(clip_dir):
    cosine = get_reward("clip_score", model=clip_dir)
    images = random_images(2, 48, seed=4)
    scores = check_batch_equals_items(cosine, images, PROMPTS[:2])
    check_scores(scores, 2)
    assert scores.abs().max() <= 1.0
    chunked_and_scaled = get_reward("clip_score", model=clip_dir, scale=100.0, batch_size=1)
    torch.testing.assert_close(chunked_and_scaled(images, PROMPTS[:2]), 100 * scores, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="one prompt per image"):
        cosine(images, PROMPTS[:1])


# --------------------------------------------------------------------------------------------------
# aesthetic


def test_aesthetic_matches_reference_computation(clip_dir, reference_clip, head_file):
    from safetensors.torch import load_file

    from diffalign.rewards.clip_rewards import AestheticHead

    reward = get_reward("aesthetic", model=clip_dir, head=head_file)
    images = random_images(3, 40, seed=5)
    scores = check_batch_equals_items(reward, images, PROMPTS[:3])
    check_scores(scores, 3)
    model, processor = reference_clip
    head = AestheticHead.from_state_dict(load_file(head_file)).eval()
    with torch.no_grad():
        pixel_values = processor(images=pil_images(images), return_tensors="pt").pixel_values
        embeddings = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)
        expected = head(embeddings / embeddings.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(scores, expected, atol=2e-3, rtol=1e-3)


def test_aesthetic_head_has_the_public_architecture():
    from diffalign.rewards.clip_rewards import AestheticHead

    head = AestheticHead()
    shapes = {name: tuple(p.shape) for name, p in head.state_dict().items() if name.endswith("weight")}
    assert shapes == {
        "layers.0.weight": (1024, 768),
        "layers.2.weight": (128, 1024),
        "layers.4.weight": (64, 128),
        "layers.6.weight": (16, 64),
        "layers.7.weight": (1, 16),
    }
    assert [type(m).__name__ for m in head.layers] == ["Linear", "Dropout"] * 3 + ["Linear", "Linear"]


def load_convert_script():
    spec = importlib.util.spec_from_file_location(
        "convert_aesthetic_head", REPO / "scripts" / "convert_aesthetic_head.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class NotATensor:
    """An arbitrary object: loading a checkpoint containing it must be refused."""


def test_convert_aesthetic_head_script(tmp_path, clip_dir):
    from diffalign.rewards.clip_rewards import AestheticHead, load_aesthetic_head

    convert = load_convert_script()
    torch.manual_seed(2)
    head = AestheticHead(16, (32, 16, 8, 4))
    # a Lightning-style checkpoint with a DDP prefix
    wrapped = {"state_dict": {f"module.{k}": v for k, v in head.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "head.pth")
    convert.main([str(tmp_path / "head.pth"), str(tmp_path / "head.safetensors")])
    loaded = load_aesthetic_head(str(tmp_path / "head.safetensors"))
    embeddings = torch.randn(5, 16)
    torch.testing.assert_close(loaded(embeddings), head.eval()(embeddings))
    assert get_reward("aesthetic", model=clip_dir, head=str(tmp_path / "head.safetensors"))(
        random_images(2), None
    ).shape == (2,)
    # arbitrary pickled objects are never loaded
    torch.save({"state_dict": head.state_dict(), "evil": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        convert.convert(str(tmp_path / "evil.pth"), str(tmp_path / "evil.safetensors"))
    assert not (tmp_path / "evil.safetensors").exists()
    with pytest.raises(ValueError, match="missing"):
        convert.extract_head_state_dict({"layers.0.weight": torch.zeros(2, 2)})


# --------------------------------------------------------------------------------------------------
# missing weights


def assert_one_line_error(error_info, *needles):
    message = str(error_info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    # no chained traceback: the caller sees this one line, not the loader's internals
    error = error_info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_missing_weights_give_a_clear_error(tmp_path, head_file):
    with pytest.raises(RewardWeightsNotFoundError) as info:
        get_reward("pickscore")  # offline, nothing cached
    assert_one_line_error(info, "pickscore", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "processor=")
    with pytest.raises(RewardWeightsNotFoundError) as info:
        get_reward("pickscore", processor=str(tmp_path / "nowhere"), model=str(tmp_path / "nowhere"))
    assert_one_line_error(info, "pickscore", "nowhere")
    with pytest.raises(RewardWeightsNotFoundError) as info:
        get_reward("clip_score")
    assert_one_line_error(info, "clip_score", "openai/clip-vit-large-patch14", "model=")
    with pytest.raises(RewardWeightsNotFoundError) as info:
        get_reward("aesthetic", head=head_file)
    assert_one_line_error(info, "aesthetic", "openai/clip-vit-large-patch14", "model=")
    assert isinstance(info.value, ValueError)


def test_missing_aesthetic_head_gives_a_clear_error(tmp_path):
    with pytest.raises(RewardWeightsNotFoundError) as info:
        get_reward("aesthetic")
    assert_one_line_error(info, "aesthetic", "sac+logos+ava1-l14-linearMSE.pth", "convert_aesthetic_head.py", "head=")
    (tmp_path / "head.pth").write_bytes(b"")
    with pytest.raises(RewardWeightsNotFoundError, match="not a .safetensors file"):
        get_reward("aesthetic", head=str(tmp_path / "head.pth"))
    with pytest.raises(RewardWeightsNotFoundError, match="not found"):
        get_reward("aesthetic", head=str(tmp_path / "missing.safetensors"))


# --------------------------------------------------------------------------------------------------
# HPSv2 (open_clip cannot be installed here: the missing extra, and the glue code against a fake open_clip)


def test_hpsv2_without_open_clip_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` fail
    for name in ["hpsv2", "hpsv2.1"]:
        with pytest.raises(MissingRewardDependencyError) as info:
            get_reward(name)
        assert_one_line_error(info, f"reward '{name}'", "open_clip", 'pip install "diffalign[openclip]"')
        assert isinstance(info.value, ImportError)


class FakeOpenCLIPModel(torch.nn.Module):
    """Stands in for open_clip's `CLIP`: same `visual.image_size`, `encode_image`/`encode_text(normalize=)` API."""

    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Module()
        self.visual.image_size = (224, 224)
        self.visual.proj = torch.nn.Linear(3 * 16, 8)
        self.token_embedding = torch.nn.Embedding(49408, 8)
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))

    def encode_image(self, pixels, normalize=False):
        assert pixels.shape[-2:] == (224, 224)
        features = self.visual.proj(torch.nn.functional.adaptive_avg_pool2d(pixels, 4).flatten(1))
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens, normalize=False):
        features = self.token_embedding(tokens).mean(dim=1)
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features


@pytest.fixture
def fake_open_clip(monkeypatch):
    from diffalign.tokenization import offline_clip_tokenizer

    tokenizer = offline_clip_tokenizer()
    calls = []

    def create_model(model_name, pretrained=None, precision="fp32", device="cpu", output_dict=None, **kwargs):
        calls.append(dict(model_name=model_name, pretrained=pretrained, precision=precision, output_dict=output_dict))
        torch.manual_seed(123)  # random init, overwritten by the checkpoint
        return FakeOpenCLIPModel().to(device)

    def get_tokenizer(model_name):
        def tokenize(texts):
            return tokenizer(
                texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
            ).input_ids

        return tokenize

    module = types.ModuleType("open_clip")
    module.create_model = create_model
    module.get_tokenizer = get_tokenizer
    monkeypatch.setitem(sys.modules, "open_clip", module)
    return calls


def test_hpsv2_scores_with_fake_open_clip(tmp_path, fake_open_clip):
    from safetensors.torch import save_file

    from diffalign.rewards.hpsv2 import hps_preprocess

    torch.manual_seed(7)
    trained = FakeOpenCLIPModel().eval()
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "HPS_v2_compressed.pt")
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "hps.safetensors"))

    images = random_images(3, 64, seed=8)
    prompts = PROMPTS[:3]
    reward = get_reward("hpsv2", checkpoint=str(tmp_path))  # a folder holding HPS_v2_compressed.pt
    assert fake_open_clip[-1] == dict(model_name="ViT-H-14", pretrained=None, precision="fp32", output_dict=True)
    scores = check_batch_equals_items(reward, images, prompts)
    check_scores(scores, 3)
    with torch.no_grad():
        tokens = sys.modules["open_clip"].get_tokenizer("ViT-H-14")(prompts)
        expected = (trained.encode_image(hps_preprocess(images), True) * trained.encode_text(tokens, True)).sum(-1)
    torch.testing.assert_close(scores, expected)
    from_safetensors = get_reward("hpsv2", checkpoint=str(tmp_path / "hps.safetensors"))
    torch.testing.assert_close(from_safetensors(images, prompts), scores)


def test_hpsv2_missing_checkpoint_gives_a_clear_error(tmp_path, fake_open_clip):
    with pytest.raises(RewardWeightsNotFoundError) as info:
        get_reward("hpsv2")  # offline: not in the HF cache
    assert_one_line_error(info, "hpsv2", "xswu/HPSv2", "HPS_v2_compressed.pt", "checkpoint=")
    with pytest.raises(RewardWeightsNotFoundError) as info:
        get_reward("hpsv2.1", checkpoint=str(tmp_path))
    assert_one_line_error(info, "hpsv2.1", "HPS_v2.1_compressed.pt")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": NotATensor()}, tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(ValueError, match="weights_only"):
        get_reward("hpsv2.1", checkpoint=str(tmp_path))


# --------------------------------------------------------------------------------------------------
# devices


def test_scorers_follow_the_images_device(clip_dir, head_file):
    reward = get_reward("clip_score", model=clip_dir)
    scores = reward(random_images(2), PROMPTS[:2])
    check_scores(scores, 2)
    assert reward.device.type == "cpu"
    placed = get_reward("aesthetic", model=clip_dir, head=head_file, device="cpu")
    assert placed.device.type == "cpu" and next(placed.vision_model.parameters()).device.type == "cpu"
    check_scores(placed(random_images(2), None), 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scorers_on_cuda_match_cpu(clip_dir, head_file):
    images = random_images(3, 64, seed=9)
    for name, kwargs in [
        ("pickscore", dict(model=clip_dir, processor=clip_dir)),
        ("clip_score", dict(model=clip_dir)),
        ("aesthetic", dict(model=clip_dir, head=head_file)),
        ("jpeg_compressibility", {}),
    ]:
        reward = get_reward(name, **kwargs)
        on_cpu = reward(images, PROMPTS[:3])
        on_cuda = reward(images.cuda(), PROMPTS[:3])
        check_scores(on_cuda, 3)
        torch.testing.assert_close(on_cuda, on_cpu, atol=1e-3, rtol=1e-3)
