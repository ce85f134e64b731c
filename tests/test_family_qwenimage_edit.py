"""Qwen-Image-Edit's own checks, beyond the family tester (tests/test_family_common.py runs the shared checks on both
families with a condition image per prompt): the processor builds without torchvision (image-only) and a directory laid
out as the Hub's loads; the VL encoder sees the condition image and its latents are appended; Edit-Plus takes several
images per prompt and samples as its pipeline; bad inputs are one line; a JSONL edit prompt file trains end to end;
the RLG route (modular blocks) is the pipeline bit for bit, and `generate` without `--image` is one line.

Every test sizes condition images 256 times smaller than the pipelines' 1024^2 pixels, in the pipelines and the family
alike (`diffalign.testing.shrink_qwenimage_edit_conditions`): a tiny VAE encodes 1024^2 pixels in minutes on a CPU."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.errors import PromptError
from diffalign.families import QwenImageEditFamily, QwenImageEditPlusFamily, family_for_pipeline, load_family
from diffalign.families.qwenimage_edit import ImageOnlyQwen2VLProcessor, torchvision_available
from diffalign.kernels import sde_window_mask
from diffalign.prompts import ConditionedPrompt
from diffalign.rollout import sample_trajectories
from diffalign.testing import shrink_qwenimage_edit_conditions

SIZE = 16
INSTRUCTIONS = ["make it red", "add a cat"]


@pytest.fixture(autouse=True)
def _small_condition_images(monkeypatch):
    shrink_qwenimage_edit_conditions(monkeypatch)


def _write_image(path, seed, size=(20, 28)):
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture
def images(tmp_path):
    return [_write_image(tmp_path / f"input{i}.png", i) for i in range(3)]


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _family(cls):
    pipe = cls.tiny_pipeline()
    family = family_for_pipeline(pipe)
    family.set_kernel_scheduler(pipe)
    return family


@pytest.mark.skipif(torchvision_available(), reason="the obstacle exists only without torchvision")
def test_the_stock_processor_needs_torchvision_and_the_image_only_one_does_not():
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from diffalign.families.qwenimage import tiny_qwen2_tokenizer

    tokenizer = tiny_qwen2_tokenizer()
    # transformers 5.25: ProcessorMixin resolves `VideoProcessorMixin`, absent without torchvision
    with pytest.raises(AttributeError, match="VIDEO_PROCESSOR_MAPPING"):
        Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer, video_processor=None)
    processor = ImageOnlyQwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer)
    image = Image.new("RGB", (56, 84))
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>make it red"], images=[image],
                       return_tensors="pt")
    merged = int(inputs["image_grid_thw"].prod()) // 4  # 2x2 merged patches of 14 pixels
    assert merged == (56 // 28) * (84 // 28)
    assert int((inputs["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == merged


def test_a_hub_layout_directory_loads_and_the_vl_encoder_sees_the_image(tmp_path, images):
    model = QwenImageEditFamily.save_tiny(str(tmp_path / "edit"))
    with open(os.path.join(model, "model_index.json")) as f:
        assert json.load(f)["processor"] == ["transformers", "Qwen2VLProcessor"]  # as Qwen/Qwen-Image-Edit's
    family = load_family(model)
    assert type(family) is QwenImageEditFamily and type(family.pipe.processor) is ImageOnlyQwen2VLProcessor
    same_text = [ConditionedPrompt("make it red", (path,)) for path in images[:2]]
    cond, negative = family.conditioning(same_text, "", True, SIZE, SIZE)
    # the instruction's states differ with the image (the VL encoder reads it), and so do the appended latents
    text = cond["encoder_hidden_states"]
    assert (text[0] - text[1]).abs().max() > 1e-4
    assert (cond["image_latents"][0] - cond["image_latents"][1]).abs().max() > 1e-3
    # 64^2 pixels (1024^2 / 256), VAE factor 4, 2x2 packing: 8 x 8 tokens of 64 channels
    assert cond["image_latents"].shape == (2, 64, 64) and cond["condition_grids"][0].tolist() == [[8, 8]]
    # the negative prompt is encoded with each prompt's image, as the pipeline encodes it
    torch.testing.assert_close(negative["image_latents"], cond["image_latents"])
    assert (negative["encoder_hidden_states"][0] - negative["encoder_hidden_states"][1]).abs().max() > 1e-4


def test_edit_plus_takes_several_images_and_samples_as_its_pipeline(images):
    family = _family(QwenImageEditPlusFamily)
    prompt = ConditionedPrompt("put the cat on the car", tuple(images[:2]))
    latents = family.prepare_latents(1, SIZE, SIZE, torch.float32, "cpu", _generator(3))
    ours = sample_trajectories(family, [prompt], num_inference_steps=3, guidance_scale=3.0, latents=latents,
                               height=SIZE, width=SIZE, stochastic_steps=sde_window_mask(3, 0))
    assert ours.conditioning["condition_grids"][0].tolist() == [[8, 8], [8, 8]]  # one grid per image
    assert ours.conditioning["image_latents"].shape == (1, 128, 64)
    stock = family.pipe(prompt=str(prompt), latents=latents, num_inference_steps=3, height=SIZE, width=SIZE,
                        output_type="pt", **family.pipeline_guidance_kwargs(3.0), **family.pipeline_call_kwargs(),
                        **family.pipeline_condition_kwargs(prompt)).images
    torch.testing.assert_close(ours.images, stock, atol=1e-5, rtol=1e-4)
    # the images' order is an input ("Picture 1", "Picture 2")
    swapped = ConditionedPrompt(str(prompt), tuple(images[1::-1]))
    other = sample_trajectories(family, [swapped], num_inference_steps=3, guidance_scale=3.0, latents=latents,
                                height=SIZE, width=SIZE, stochastic_steps=sde_window_mask(3, 0))
    assert (other.images - ours.images).abs().max() > 1e-4


def test_bad_condition_inputs_are_one_line(tmp_path, images):
    family = _family(QwenImageEditFamily)
    with pytest.raises(PromptError, match="qwenimage_edit prompt needs a condition image \\('make it red' has none"):
        family.conditioning(["make it red"], "", False, SIZE, SIZE)
    with pytest.raises(PromptError, match="takes at most 1"):
        family.conditioning([ConditionedPrompt("make it red", tuple(images[:2]))], "", False, SIZE, SIZE)
    wide = _write_image(tmp_path / "wide.png", 5, size=(20, 80))  # another aspect ratio, another grid
    with pytest.raises(PromptError, match="differ in aspect ratio or count"):
        family.conditioning([ConditionedPrompt(t, (p,)) for t, p in zip(INSTRUCTIONS, [images[0], wide])], "",
                            False, SIZE, SIZE)
    plus = _family(QwenImageEditPlusFamily)
    with pytest.raises(PromptError, match="takes at most 3"):
        plus.conditioning([ConditionedPrompt("make it red", tuple(images) + (wide,))], "", False, SIZE, SIZE)


def test_text_prompts_for_an_edit_model_are_one_line_at_the_start(tmp_path, capsys):
    from diffalign.cli import main

    model = QwenImageEditFamily.save_tiny(str(tmp_path / "edit"))
    out = tmp_path / "run"
    capsys.readouterr()  # the save's progress bars
    assert main(["train", "ddpo", "--model", model, "--output_dir", str(out), "--prompts", "[make it red]",
                 "--sample_resolution", str(SIZE), "--reward", "jpeg_compressibility"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'make it red' has no condition image, but a qwenimage_edit model edits one" in err[0]
    assert not (out / "metrics.jsonl").exists()


# a trajectory trainer, and a forward-process one (~7 s each; nft with -m slow)
@pytest.mark.parametrize("algorithm", ["ddpo", pytest.param("nft", marks=pytest.mark.slow)])
def test_a_jsonl_edit_prompt_file_trains_end_to_end(tmp_path, algorithm):
    """`diffalign train ddpo|nft` on a JSONL edit prompt file (images relative to it), 2 epochs; the LoRA loads in
    `QwenImageEditPipeline` and changes its edit of the file's image."""
    import diffusers

    from diffalign.cli import main

    model = QwenImageEditFamily.save_tiny(str(tmp_path / "edit"))
    folder = tmp_path / "edits"
    folder.mkdir()
    for i in range(2):
        _write_image(folder / f"{i}.png", i)
    prompt_file = folder / "train.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": text, "image": f"{i}.png"}) + "\n"
                                   for i, text in enumerate(INSTRUCTIONS)))
    out = str(tmp_path / "run")
    argv = ["train", algorithm, "--model", model, "--output_dir", out, "--prompt_file", str(prompt_file),
            "--num_epochs", "2", "--sample_num_steps", "3", "--sample_num_prompts_per_epoch", "2",
            "--sample_images_per_prompt", "2", "--sample_batch_size", "4", "--grid_num_images", "2",
            "--reward", "jpeg_compressibility", "--train_learning_rate", "0.05", "--sample_guidance_scale", "3.0",
            "--sample_resolution", str(SIZE), "--lora_rank", "4"]
    argv += {"ddpo": ["--train_batch_size", "4", "--sample_sde_window_size", "2", "--train_num_inner_epochs", "1"],
             "nft": ["--train_batch_size", "2", "--train_micro_batch_size", "4"]}[algorithm]
    assert main(argv) == 0
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [line["epoch"] for line in lines] == [0, 1]

    pipe = diffusers.QwenImageEditPipeline.from_pretrained(model, **QwenImageEditFamily.loaded_components(model))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=INSTRUCTIONS[0], image=Image.open(folder / "0.png").convert("RGB"), num_inference_steps=2,
                  height=SIZE, width=SIZE, output_type="pt", true_cfg_scale=3.0, negative_prompt="")
    before = pipe(generator=_generator(), **kwargs).images
    pipe.load_lora_weights(os.path.join(out, "final"))
    after = pipe(generator=_generator(), **kwargs).images
    assert (after - before).abs().max() > 1e-4


@pytest.mark.parametrize("family_class, count", [(QwenImageEditFamily, 1), (QwenImageEditPlusFamily, 2)])
def test_the_rlg_route_samples_as_the_pipeline_and_a_string_empty_negative_would_not(images, family_class, count):
    """The RLG route (diffusers' modular Edit / Edit-Plus blocks, `ModularRLGPipeline`) samples bit for bit as the
    pipeline with negative prompt "" (Edit-Plus: two images). It hands the blocks the negative prompt as a list: given
    the string "", the blocks encode " " instead (diffusers 0.42.1, modular_pipelines/qwenimage/encoders.py:909 and
    :1040, `negative_prompt or " "`) and sample away from the pipeline."""
    from diffalign.guiders import NormRescaledCFGGuidance

    family = _family(family_class)
    call = dict(num_inference_steps=3, height=SIZE, width=SIZE, output_type="pt",
                **family.pipeline_condition_kwargs(ConditionedPrompt("", tuple(images[:count]))))
    stock = family.pipe(prompt="make it red", generator=_generator(), **call,
                        **family.rlg_guidance_pipeline_kwargs(3.0)).images
    rlg = family_class.rlg_pipeline(family.pipe)
    route = rlg(prompt="make it red", generator=_generator(), rlg_scale=1.0, guidance_scale=3.0, **call).images
    torch.testing.assert_close(route, stock, atol=0, rtol=0)
    # the diffusers quirk the route works around: a string "" reaches the blocks as " "
    rlg.modular_pipeline.update_components(guider=NormRescaledCFGGuidance(guidance_scale=3.0))
    quirk = rlg.modular_pipeline(prompt="make it red", negative_prompt="", generator=_generator(),
                                 output=rlg.output, **call)
    assert (quirk - stock).abs().max() > 1e-4


@pytest.mark.parametrize("family_class", [QwenImageEditFamily, QwenImageEditPlusFamily])
def test_generate_without_image_is_one_line_before_loading(tmp_path, capsys, family_class):
    """`diffalign generate` on an edit model needs `--image`: one line, exit code 2, before any weights load (the
    directory holds only its `model_index.json`)."""
    from cli_helpers import one_line
    from diffalign.cli import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": family_class.pipeline_class}))
    argv = ["generate", "--model", str(model), "--lora", str(tmp_path), "--prompt", "make it red", "--output-dir",
            str(tmp_path / "out")]
    assert main(argv) == 2
    assert one_line(capsys.readouterr().err) == (f"diffalign: error: {family_class.name} models edit an image: give "
                                                 "the condition image with --image PATH")
    assert not (tmp_path / "out").exists()


def test_the_card_edits_the_image_as_the_pipeline_takes_it(tmp_path):
    """The model card's snippets for an edit run: the image as loaded (the pipeline resizes it, as the rollouts do), no
    Kontext arguments (`max_area`, `_auto_resize`: `QwenImageEditPipeline` takes neither), the RLG route's snippet
    through `rlg_pipeline`; each call's arguments are the pipeline's."""
    import inspect

    import diffusers

    from diffalign.config import PRDPConfig
    from diffalign.modelcard import usage_snippets

    config = PRDPConfig(model=str(tmp_path), output_dir=str(tmp_path / "run"), sample_num_steps=2,
                        sample_guidance_scale=3.0)
    prompt = ConditionedPrompt("make it red", (str(tmp_path / "input0.png"),))
    for family_class in (QwenImageEditFamily, QwenImageEditPlusFamily):
        plain, rlg = usage_snippets(config, family_class, prompt, "final", 16)
        assert 'condition = load_image("input0.png")' in plain and "max_area" not in plain + rlg
        assert f"{family_class.__name__}.rlg_pipeline(pipe)" in rlg and "rlg_scale=1.5" in rlg
        assert all("from diffusers.utils import load_image" in snippet for snippet in (plain, rlg))
        call = plain.split("image = pipe(", 1)[1].rsplit(").images", 1)[0]
        names = {part.split("=")[0].strip() for part in call.split(", ") if "=" in part}
        accepted = inspect.signature(getattr(diffusers, family_class.pipeline_class).__call__).parameters
        assert names <= set(accepted), names - set(accepted)

