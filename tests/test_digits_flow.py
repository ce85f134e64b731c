"""The bundled flow-matching digits model (diffalign/models/digits-flow): an SD3-architecture pipeline."""

import os
from importlib import resources

import pytest
import torch

from diffalign.rewards import digits as D

MODEL_DIR = str(resources.files("diffalign") / "models" / "digits-flow")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline

    torch.set_num_threads(1)
    pipe = StableDiffusion3Pipeline.from_pretrained(MODEL_DIR)  # plain: no components passed
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_model_dir_is_small_and_pickle_free():
    files = [os.path.join(root, f) for root, _, names in os.walk(MODEL_DIR) for f in names]
    assert any(f.endswith("model_index.json") for f in files)
    assert any(f.endswith("training_info.json") for f in files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    weights = [f for f in files if f.endswith(".safetensors")]
    assert len(weights) == 5  # transformer, vae, three text encoders
    assert sum(os.path.getsize(f) for f in files) < 10_000_000


def test_loads_plainly_as_an_fp32_sd3_pipeline(pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name)
        assert all(p.dtype == torch.float32 for p in module.parameters()), name  # fp16 files, fp32 modules
    assert pipe.vae.config.shift_factor is not None and pipe.vae.config.scaling_factor > 0
    assert pipe.transformer.config.pooled_projection_dim == (
        pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim)


def test_t5_stub_gives_what_no_t5_gives(pipe):
    # text_encoder_3 is a zero-output stub: prompt embeddings equal those of text_encoder_3=None (zeros for T5).
    kwargs = {"prompt": ["the number 3", "seven"], "prompt_2": None, "prompt_3": None,
              "do_classifier_free_guidance": True, "max_sequence_length": 32}
    with_stub = pipe.encode_prompt(**kwargs)
    t5, tok3 = pipe.text_encoder_3, pipe.tokenizer_3
    try:
        pipe.text_encoder_3, pipe.tokenizer_3 = None, None
        without = pipe.encode_prompt(**kwargs)
    finally:
        pipe.text_encoder_3, pipe.tokenizer_3 = t5, tok3
    assert with_stub[0].shape == (2, 16 + 32, pipe.transformer.config.joint_attention_dim)
    for a, b in zip(with_stub, without):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sevens_are_judged_sevens(pipe):
    prompts = ["a handwritten digit seven"] * 10
    # max_sequence_length 64 (zero T5 positions; trained for 64 to 512) samples 3-4x faster than the default 256.
    out = pipe(prompts, num_inference_steps=20, guidance_scale=4.5, max_sequence_length=64,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (10, 3, 16, 16)
    assert torch.isfinite(out.images).all()
    accuracy = D.judge_accuracy(out.images, prompts)
    assert accuracy >= 0.5, accuracy  # chance is 0.1
