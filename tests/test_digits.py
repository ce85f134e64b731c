"""The bundled digits model (diffalign/models/digits), its classifier reward and the independent judge."""

import os
from importlib import resources

import pytest
import torch

from diffalign.rewards import get_reward
from diffalign.rewards import digits as D

MODEL_DIR = str(resources.files("diffalign") / "models" / "digits")


@pytest.fixture(scope="module")
def real_digits():
    """A few real `load_digits` images per class, upsampled like the training data, as RGB."""
    images, labels = D.load_digit_images(D.load_classifier().resolution)
    keep = torch.cat([torch.nonzero(labels == d)[:5, 0] for d in range(10)])
    return images[keep].repeat(1, 3, 1, 1), labels[keep]


def test_model_dir_is_small_and_pickle_free():
    files = [os.path.join(root, f) for root, _, names in os.walk(MODEL_DIR) for f in names]
    assert any(f.endswith("model_index.json") for f in files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert sum(os.path.getsize(f) for f in files) < 10_000_000


def test_bundled_model_loads_offline_and_samples():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert module.dtype == torch.float32  # fp16 files, fp32 modules by default: runs on CPU
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = pipe(
        ["a handwritten digit seven", "the number 3"],
        num_inference_steps=3,
        guidance_scale=2.0,
        eta=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    assert out.images.shape == (2, 3, size, size)
    assert torch.isfinite(out.images).all()
    assert 0 <= out.images.min() and out.images.max() <= 1


def test_training_prompts_fit_the_tokenizer():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(MODEL_DIR, "tokenizer"))
    lengths = [len(ids) for ids in tokenizer(D.digit_prompts()).input_ids]
    assert max(lengths) <= tokenizer.model_max_length
    assert len(D.digit_prompts()) == 10 * len(D.PROMPT_TEMPLATES)
    assert D.digit_prompts(7)[0] == "a handwritten digit seven"


def test_classifier_reward_on_real_digits(real_digits):
    images, labels = real_digits
    reward = get_reward("digit_correctness")
    right = reward(images, [D.digit_prompt(int(d), int(d) % 8) for d in labels], None)
    wrong = reward(images, [D.digit_prompt((int(d) + 3) % 10) for d in labels], None)
    assert right.dtype == torch.float32 and right.shape == (len(labels),)
    assert right.mean() > 0.9 and (right > 0.5).float().mean() > 0.9
    assert wrong.mean() < 0.05


def test_reward_resizes_and_ignores_device_dtype(real_digits):
    images, labels = real_digits
    prompts = [D.digit_prompt(int(d)) for d in labels]
    reward = D.digit_correctness()
    base = reward(images, prompts, None)
    big = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest").half()
    assert (reward(big, prompts, None) - base).abs().max() < 0.05  # area-downsampled back


def test_judge_is_independent_and_accurate(real_digits):
    images, labels = real_digits
    prompts = [D.digit_prompt(int(d), 1) for d in labels]
    assert D.judge_accuracy(images, prompts) > 0.95
    judge = get_reward("digit_judge")
    scores = judge(images, [D.digit_prompt((int(d) + 1) % 10) for d in labels], None)
    assert set(scores.tolist()) <= {0.0, 1.0} and scores.mean() < 0.1


def test_parse_digit():
    assert D.parse_digit("a handwritten digit seven") == 7
    assert D.parse_digit("the number 7") == 7
    assert D.parse_digit("Digit ZERO") == 0
    assert D.parse_digit("a drawing of someone's 4") == 4
    with pytest.raises(ValueError, match="a photo of a cat"):
        D.parse_digit("a photo of a cat")
    with pytest.raises(ValueError, match="several"):
        D.parse_digit("one plus 2")
    with pytest.raises(ValueError, match="a dog"):
        D.digit_correctness()(torch.zeros(1, 3, 16, 16), ["a dog"], None)


def test_metadata_digit_overrides_prompt():
    assert D.prompt_digits(["no digit here", "seven"], [{"digit": 3}, {}]).tolist() == [3, 7]
    prompt, meta = D.random_digit_prompt()
    assert D.parse_digit(prompt) == meta["digit"]
