"""QwenImage 2.1's own checks, beyond the family tester (tests/test_family_common.py runs the shared checks): its
`Qwen3VLProcessor` builds without torchvision (image-only) and a directory laid out as the Hub's loads; the blocks'
encoding is the pipeline's and two prompts differ; a row's prediction does not depend on its batch's text padding
(which moves the image in the pipeline's own batches); `diffalign train nft` runs end to end."""

import json
import os

import pytest
import torch

from diffalign.families import QwenImage21Family, family_for_pipeline, load_family
from diffalign.families.qwenimage21 import rows_by_length
from diffalign.families.vl_processors import image_only_processor_class, torchvision_available
from diffalign.utils.peft_utils import add_lora, adapter_rows

SIDE = QwenImage21Family.tiny_resolution
PROMPTS = ["a photo of a cat", "a red car"]


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_rows_by_length_groups_rows_in_order():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    assert rows_by_length(mask) == {2: [0, 2], 3: [1]}


@pytest.mark.skipif(torchvision_available(), reason="the obstacle exists only without torchvision")
def test_the_stock_qwen3vl_processor_needs_torchvision_and_the_image_only_one_does_not():
    from PIL import Image
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from diffalign.families.qwenimage import tiny_qwen2_tokenizer

    tokenizer = tiny_qwen2_tokenizer()
    with pytest.raises(AttributeError, match="VIDEO_PROCESSOR_MAPPING"):  # transformers 5.25 without torchvision
        Qwen3VLProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer, video_processor=None)
    processor = image_only_processor_class("Qwen3VLProcessor")(image_processor=Qwen2VLImageProcessorPil(),
                                                               tokenizer=tokenizer)
    assert isinstance(processor, Qwen3VLProcessor)
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>a cat"], images=[Image.new("RGB", (56, 84))],
                       return_tensors="pt")
    merged = int(inputs["image_grid_thw"].prod()) // 4  # the stock code's expansion: one pad per 2x2 merged patch
    assert int((inputs["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == merged


def test_a_hub_layout_directory_loads_and_encodes_as_the_pipeline(tmp_path):
    import diffusers

    model = QwenImage21Family.save_tiny(str(tmp_path / "qi21"))
    with open(os.path.join(model, "model_index.json")) as f:
        assert json.load(f)["processor"] == ["transformers", "Qwen3VLProcessor"]
    family = load_family(model)
    assert type(family) is QwenImage21Family
    assert type(family.pipe.processor) is image_only_processor_class("Qwen3VLProcessor")
    cond = family.encode_text(PROMPTS, "cpu")
    embeds, mask = cond["encoder_hidden_states"], cond["encoder_hidden_states_mask"]
    for row, prompt in enumerate(PROMPTS):  # each prompt as the pipeline encodes it alone
        expected, expected_mask, pads = family.pipe.encode_prompt(prompt)
        length = int(mask[row].sum())
        assert expected_mask is None and not pads.any() and length == expected.shape[1]
        torch.testing.assert_close(embeds[row, :length], expected[0], atol=0, rtol=0)
    assert mask.sum(1).tolist()[0] != mask.sum(1).tolist()[1]  # different token counts: the tokenizer is real
    # the encoder is causal: the template's tail after the prompt (the same tokens) has other states per prompt
    lengths = mask.sum(1).tolist()
    assert (embeds[0, lengths[0] - 1] - embeds[1, lengths[1] - 1]).abs().max() > 1e-3
    assert isinstance(family.pipe, diffusers.QwenImage21Pipeline)


def test_a_rows_prediction_does_not_depend_on_its_batch():
    """Alone, in a batch with a longer prompt (padded) and in a mixed-adapter batch (the policy and its base in one
    forward): the same prediction per row."""
    family = family_for_pipeline(QwenImage21Family.tiny_pipeline())
    add_lora(family.denoiser, target_modules=family.default_lora_target_modules)
    for param in family.denoiser.parameters():
        if param.requires_grad:
            param.data = torch.randn(param.shape, generator=_generator()) * 0.1
    family.denoiser.eval()
    cond = family.add_resolution(family.encode_prompts(PROMPTS), SIDE, SIDE)
    latents = family.prepare_latents(2, SIDE, SIDE, torch.float32, "cpu", _generator(1))
    t = torch.tensor([700.0, 700.0])
    with torch.no_grad():
        both = family.forward(family.denoiser, latents, t, cond)
        alone = [family.forward(family.denoiser, latents[i : i + 1], t[:1],
                                family.add_resolution(family.encode_prompts([p]), SIDE, SIDE))
                 for i, p in enumerate(PROMPTS)]
        torch.testing.assert_close(both, torch.cat(alone), atol=1e-6, rtol=1e-5)
        doubled = {k: torch.cat([v, v]) for k, v in cond.items()}
        with adapter_rows(family.denoiser, ["default", "__base__", "__base__", "default"]):
            mixed = family.forward(family.denoiser, torch.cat([latents, latents]), torch.cat([t, t]), doubled)
        family.denoiser.disable_adapters()
        base = family.forward(family.denoiser, latents, t, cond)
        family.denoiser.enable_adapters()
    torch.testing.assert_close(mixed[[0, 3]], both[[0, 1]], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mixed[[1, 2]], base[[1, 0]], atol=1e-6, rtol=1e-5)
    assert (base - both).abs().max() > 1e-4


def test_nft_trains_end_to_end(tmp_path):
    """`diffalign train nft`, 2 epochs on the tiny model; the LoRA loads in `QwenImage21Pipeline` and changes it."""
    import diffusers

    from diffalign.cli import main

    model = QwenImage21Family.save_tiny(str(tmp_path / "qi21"))
    out = str(tmp_path / "run")
    argv = ["train", "nft", "--model", model, "--output_dir", out, "--prompts", "[a photo of a cat, a red car]",
            "--num_epochs", "2", "--sample_num_steps", "2", "--sample_num_prompts_per_epoch", "2",
            "--sample_images_per_prompt", "2", "--sample_batch_size", "4", "--grid_num_images", "2",
            "--reward", "jpeg_compressibility", "--train_learning_rate", "0.05", "--sample_guidance_scale", "3.0",
            "--sample_resolution", str(SIDE), "--lora_rank", "4", "--train_batch_size", "2",
            "--train_micro_batch_size", "4"]
    assert main(argv) == 0
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [line["epoch"] for line in lines] == [0, 1]
    pipe = diffusers.QwenImage21Pipeline.from_pretrained(model, **QwenImage21Family.loaded_components(model))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPTS[0], num_inference_steps=2, height=SIDE, width=SIDE, output_type="pt",
                  true_cfg_scale=3.0, negative_prompt="")
    before = pipe(generator=_generator(), **kwargs).images
    pipe.load_lora_weights(os.path.join(out, "final"))
    assert (pipe(generator=_generator(), **kwargs).images - before).abs().max() > 1e-4


@pytest.mark.slow  # why the family samples each prompt alone (`samples_prompts_alone`): ~2 s
def test_the_pipelines_batch_padding_moves_the_shorter_prompts_image():
    """`QwenImage21Pipeline` on a batch of prompts of different lengths: the longest prompt samples as alone, the
    padded one does not (its image sits after the padding on the rotary frame axis)."""
    pipe = QwenImage21Family.tiny_pipeline()
    latents = torch.randn(2, 4, 64, generator=_generator(3))
    kwargs = dict(num_inference_steps=3, height=SIDE, width=SIDE, output_type="pt")
    both = pipe(prompt=PROMPTS, latents=latents, **kwargs).images
    alone = torch.cat([pipe(prompt=p, latents=latents[i : i + 1], **kwargs).images for i, p in enumerate(PROMPTS)])
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-4)  # "a photo of a cat": the longest
    assert (both[1] - alone[1]).abs().max() > 1e-4  # "a red car", padded: 6.5e-4 on the tiny model
