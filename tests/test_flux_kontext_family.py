"""FLUX.1 Kontext's own checks, beyond the family tester (tests/test_family_common.py runs the shared checks on it
with text prompts, which Kontext samples text-to-image as its pipeline does): with condition images, a zero-width
rollout is `FluxKontextPipeline`'s sampling and recorded log-probs are recomputed exactly; different images give
different conditionings, each encoded once; prompt files carry condition images to the family and to the reward; a
bad image path is one line with exit code 2; the CLI trains Kontext on an edit prompt file and its LoRA loads in
`FluxKontextPipeline` and changes its edits."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.advantages import PerPromptStatTracker
from diffalign.errors import PromptError, UserError
from diffalign.families import FAMILIES, FluxKontextFamily, family_for_pipeline
from diffalign.families.flux_kontext import condition_image_ids
from diffalign.kernels import sde_window_mask
from diffalign.prompts import (ConditionedPrompt, condition_images_of, load_condition_tensor, prompt_key,
                               read_prompt_records)
from diffalign.rollout import default_kernel, sample_trajectories, step_log_probs
from diffalign.utils.peft_utils import add_lora

SIZE = 16
INSTRUCTIONS = ["make it red", "add a cat"]


def _write_image(path, seed, size=(20, 28)):
    """A random RGB PNG (`size`: height, width; not the sampled size, so the resize is exercised)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture
def images(tmp_path):
    return [_write_image(tmp_path / f"input{i}.png", i) for i in range(2)]


@pytest.fixture
def family():
    pipe = FluxKontextFamily.tiny_pipeline()
    family = family_for_pipeline(pipe)
    family.set_kernel_scheduler(pipe)
    return family


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_kontext_is_registered_and_takes_one_condition_image():
    import diffusers.modular_pipelines

    assert FAMILIES["FluxKontextPipeline"] is FluxKontextFamily
    assert FluxKontextFamily.max_condition_images == 1 and FAMILIES["FluxPipeline"].max_condition_images == 0
    assert hasattr(diffusers.modular_pipelines, FluxKontextFamily.modular_blocks_class)
    ids = condition_image_ids(2, 3, "cpu", torch.float32)
    assert ids[:, 0].eq(1).all() and ids[:, 1:].tolist() == [[r, c] for r in range(2) for c in range(3)]


@pytest.mark.parametrize("guidance, size", [(1.0, (SIZE, SIZE)), (3.0, (SIZE, SIZE + 8))],
                         ids=["no-cfg-square", "true-cfg-wide"])
def test_zero_width_rollout_equals_the_kontext_pipeline_with_its_condition_image(family, images, guidance, size):
    height, width = size
    prompts = [ConditionedPrompt(text, (path,)) for text, path in zip(INSTRUCTIONS, images)]
    latents = family.prepare_latents(2, height, width, torch.float32, "cpu", _generator(3))
    ours = sample_trajectories(family, prompts, num_inference_steps=3, guidance_scale=guidance, latents=latents,
                               height=height, width=width, stochastic_steps=sde_window_mask(3, 0))
    stock = family.pipe(
        prompt=INSTRUCTIONS, image=[family.pipeline_image(path, height, width) for path in images],
        num_inference_steps=3, latents=latents, height=height, width=width, output_type="pt",
        **family.pipeline_guidance_kwargs(guidance, family.embedded_guidance),
        **family.pipeline_call_kwargs(height, width)).images
    torch.testing.assert_close(ours.images, stock, atol=1e-5, rtol=1e-4)
    tokens = (height // 4) * (width // 4)  # vae_scale_factor 2, 2x2 packing
    assert ours.conditioning["image_latents"].shape == (2, tokens, 16)
    assert (ours.negative_conditioning is not None) == (guidance != 1)
    # the condition is an input: the same instructions on the images swapped give other edits
    swapped = [ConditionedPrompt(text, (path,)) for text, path in zip(INSTRUCTIONS, images[::-1])]
    other = sample_trajectories(family, swapped, num_inference_steps=3, guidance_scale=guidance, latents=latents,
                                height=height, width=width, stochastic_steps=sde_window_mask(3, 0))
    assert (other.images - ours.images).abs().max() > 1e-4


def test_recomputed_log_probs_with_condition_images_give_ratio_one(family, images):
    add_lora(family.denoiser, target_modules=family.default_lora_target_modules)
    generator = _generator(0)
    for param in family.denoiser.parameters():
        if param.requires_grad:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    family.denoiser.eval()
    prompts = [ConditionedPrompt(text, (path,)) for text, path in zip(INSTRUCTIONS, images)]
    kernel = default_kernel(family, eta=1.0, noise_level=0.7)
    traj = sample_trajectories(family, prompts, num_inference_steps=4, guidance_scale=1.0, kernel=kernel,
                               height=SIZE, width=SIZE, generator=_generator(1), compute_reference=True,
                               stochastic_steps=sde_window_mask(4, 2, start=1))
    rows, steps = torch.tensor([0, 0, 1, 1]), torch.tensor([1, 2, 1, 2])
    with torch.no_grad():
        log_probs, _, _ = step_log_probs(family, family.denoiser, kernel, traj, rows, steps, 1.0)
    ratio = torch.exp(log_probs - traj.log_probs[rows, steps])
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    assert (traj.kl_to_ref[:, 1:3] > 0).all()


def test_two_condition_images_give_two_conditionings_each_encoded_once(family, images, monkeypatch):
    calls = []
    encode = family.encode_condition_image
    monkeypatch.setattr(family, "encode_condition_image", lambda *a: calls.append(a[0]) or encode(*a))
    text_calls = []
    encode_text = family.encode_text
    monkeypatch.setattr(family, "encode_text", lambda prompts, device: text_calls.append(list(prompts)) or
                        encode_text(prompts, device))
    same_text = [ConditionedPrompt("make it red", (path,)) for path in images]
    cond, _ = family.conditioning(same_text * 2, "", False, SIZE, SIZE)
    latents = cond["image_latents"]
    assert (latents[0] - latents[1]).abs().max() > 1e-3  # two images, two conditionings
    torch.testing.assert_close(latents[0], latents[2])
    assert sorted(calls) == sorted(images)  # each image encoded once, cached for the next batches
    family.conditioning(same_text, "", False, SIZE, SIZE)
    assert len(calls) == 2
    # the text cache keys a prompt by its text and its images (an image-reading text encoder would see both)
    assert len(text_calls) == 1 and len(text_calls[0]) == 2
    assert prompt_key(same_text[0]) != prompt_key(same_text[1]) and prompt_key("make it red") == "make it red"
    # another size is another encoding of the same image
    family.conditioning(same_text[:1], "", False, SIZE, SIZE + 8)
    assert len(calls) == 3


def test_text_prompts_sample_text_to_image_and_a_mixed_batch_is_one_line(family, images):
    cond, _ = family.conditioning(INSTRUCTIONS, "", False, SIZE, SIZE)
    assert "image_latents" not in cond  # FluxKontextPipeline without `image`
    with pytest.raises(PromptError, match="mix prompts with and without a condition image"):
        family.conditioning([ConditionedPrompt("make it red", (images[0],)), "add a cat"], "", False, SIZE, SIZE)


def test_a_prompt_file_mixing_edits_and_text_prompts_is_refused_at_the_start(kontext_dir, tmp_path, capsys):
    from diffalign.cli import main

    (tmp_path / "edits").mkdir()
    _write_image(tmp_path / "edits" / "in.png", 0)
    path = _edit_prompt_file(tmp_path, [{"prompt": "make it red", "image": "in.png"}, {"prompt": "a red car"}])
    assert main(_cli_args("ddpo", kontext_dir, path, str(tmp_path / "run"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mix prompts with and without a condition image ('a red car' has none" in err[0]
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_a_text_to_image_family_refuses_condition_images(images):
    from diffalign.families import FluxFamily

    flux = family_for_pipeline(FluxFamily.tiny_pipeline())
    with pytest.raises(PromptError, match="takes no condition images"):
        flux.encode_prompts([ConditionedPrompt("make it red", (images[0],))])


def test_conditioned_prompts_are_the_text_with_their_images(images):
    a, b = (ConditionedPrompt("make it red", (path,)) for path in images)
    assert str(a) == "make it red" and a.upper() == "MAKE IT RED" and json.dumps(a) == '"make it red"'
    assert a != b and a != "make it red" and len({a, b, "make it red"}) == 3
    back = pickle.loads(pickle.dumps([a, b]))  # gather_object pickles the prompts of every process
    assert back == [a, b] and condition_images_of(back[1]) == (images[1],)
    # DDPO's per-prompt statistics: one buffer per (instruction, image)
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2)
    advantages = tracker.update([a, a, b, b], torch.tensor([0.0, 1.0, 10.0, 12.0]))
    torch.testing.assert_close(advantages, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-4, rtol=0)
    assert len(tracker.stats) == 2


# ------------------------------------------------------------------------------------------------ prompt files
def _edit_prompt_file(tmp_path, rows):
    path = tmp_path / "edits" / "train.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_jsonl_prompt_file_carries_condition_images_relative_to_it(tmp_path):
    folder = tmp_path / "edits" / "inputs"
    folder.mkdir(parents=True)
    first, second = (_write_image(folder / f"{i}.png", i) for i in range(2))
    path = _edit_prompt_file(tmp_path, [
        {"prompt": "make it red", "image": "inputs/0.png", "tag": "color"},
        {"prompt": "add a cat", "images": ["inputs/1.png"]},
        {"prompt": "a plain text prompt"},
    ])
    prompts, metadata = read_prompt_records(path)
    assert [condition_images_of(p) for p in prompts] == [(first,), (second,), ()]
    assert metadata[0] == {"image": first, "tag": "color"} and metadata[1] == {"images": [second]}
    assert os.path.isabs(metadata[0]["image"])
    pixels = load_condition_tensor(metadata[0]["image"])  # what an edit reward compares with the output
    assert pixels.shape == (3, 20, 28) and 0 <= pixels.min() and pixels.max() <= 1

    csv_path = tmp_path / "edits" / "train.csv"
    csv_path.write_text("prompt,image\nmake it red,inputs/0.png\na plain text prompt,\n")
    prompts, metadata = read_prompt_records(str(csv_path))
    assert [condition_images_of(p) for p in prompts] == [(first,), ()] and metadata[1] == {}


@pytest.mark.parametrize("row, message", [
    ({"prompt": "x", "image": "missing.png"}, "condition image '.*missing.png' does not exist"),
    ({"prompt": "x", "image": "bad.png"}, "condition image '.*bad.png' is not a readable image"),
    ({"prompt": "x", "image": ""}, "'image' must be a non-empty path"),
    ({"prompt": "x", "images": "a.png"}, "'images' must be a non-empty list of paths"),
    ({"prompt": "x", "image": "a.png", "images": ["a.png"]}, "has both 'image' and 'images'"),
], ids=["missing", "unreadable", "empty", "images-not-a-list", "both"])
def test_bad_condition_images_are_one_line(tmp_path, row, message):
    path = _edit_prompt_file(tmp_path, [row])
    (tmp_path / "edits" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(PromptError, match=message) as error:
        read_prompt_records(path)
    assert "row 1" in str(error.value) and "\n" not in str(error.value) and isinstance(error.value, UserError)


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory):
    return FluxKontextFamily.save_tiny(str(tmp_path_factory.mktemp("kontext") / "model"))


def _cli_args(algorithm, model, prompt_file, output_dir):
    args = ["train", algorithm, "--model", model, "--output_dir", output_dir, "--prompt_file", prompt_file,
            "--num_epochs", "2", "--sample_num_steps", "3", "--sample_num_prompts_per_epoch", "2",
            "--sample_images_per_prompt", "2", "--sample_batch_size", "4", "--grid_num_images", "2",
            "--reward", "jpeg_compressibility", "--train_learning_rate", "0.05", "--sample_resolution", str(SIZE),
            "--lora_rank", "4", "--lora_alpha", "8", "--final_eval_num_images", "0"]
    args += {"ddpo": ["--train_batch_size", "4", "--sample_sde_window_size", "2", "--train_clip_range", "1.0"],
             "prdp": ["--train_clip_eps", "1.0", "--train_beta", "0.01"],
             "nft": ["--train_batch_size", "2", "--train_micro_batch_size", "4"]}[algorithm]
    return args


def test_a_bad_image_path_is_one_line_and_exit_code_2(kontext_dir, tmp_path, capsys):
    from diffalign.cli import main

    path = _edit_prompt_file(tmp_path, [{"prompt": "make it red", "image": "nowhere/input.png"}])
    assert main(_cli_args("ddpo", kontext_dir, path, str(tmp_path / "run"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "condition image" in err[0] and "input.png' does not exist" in err[0]


def test_a_text_to_image_model_refuses_an_edit_prompt_file(tmp_path, capsys):
    from diffalign.cli import main
    from diffalign.testing import save_tiny_pipeline

    model = save_tiny_pipeline("sd", str(tmp_path / "sd"))
    (tmp_path / "edits").mkdir()
    _write_image(tmp_path / "edits" / "in.png", 0)
    path = _edit_prompt_file(tmp_path, [{"prompt": "make it red", "image": "in.png"}])
    assert main(_cli_args("ddpo", model, path, str(tmp_path / "run"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes no condition images" in err[0]


@pytest.mark.parametrize("algorithm", ["ddpo", pytest.param("prdp", marks=pytest.mark.slow), "nft"])  # prdp: ~30 s
def test_cli_trains_kontext_on_an_edit_prompt_file_and_the_lora_loads(kontext_dir, tmp_path, algorithm):
    import diffusers

    from diffalign.cli import main

    (tmp_path / "edits" / "inputs").mkdir(parents=True)
    paths = [_write_image(tmp_path / "edits" / "inputs" / f"{i}.png", i) for i in range(2)]
    prompt_file = _edit_prompt_file(tmp_path, [
        {"prompt": "make it red", "image": "inputs/0.png"},
        {"prompt": "make it red", "image": "inputs/1.png"},  # the same instruction on another image
    ])
    out = str(tmp_path / "run")
    assert main(_cli_args(algorithm, kontext_dir, prompt_file, out)) == 0
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in records] == [0, 1]
    lora_dir = os.path.join(out, "final")

    pipe = diffusers.FluxKontextPipeline.from_pretrained(kontext_dir)
    pipe.set_progress_bar_config(disable=True)
    family = family_for_pipeline(pipe)

    def edit():
        return pipe(prompt="make it red", image=family.pipeline_image(paths[0], SIZE, SIZE), num_inference_steps=2,
                    height=SIZE, width=SIZE, generator=_generator(), output_type="pt",
                    **family.pipeline_guidance_kwargs(1.0, family.default_guidance_scale),
                    **family.pipeline_call_kwargs(SIZE, SIZE)).images

    before = edit()
    pipe.load_lora_weights(lora_dir)
    assert (edit() - before).abs().max() > 1e-4  # the trained LoRA is loaded and changes the edits
    # the grids show each input before its edit: 2 samples x (input, edit) in one row
    with Image.open(os.path.join(out, "grid_after.png")) as grid:
        assert grid.width > 3 * grid.height


def test_grids_show_the_condition_image_before_each_edit(images):
    from diffalign.trainers.evaluation import with_condition_images

    results = torch.rand(2, 3, SIZE, SIZE)
    tiles, per_sample = with_condition_images(results, [ConditionedPrompt(t, (p,)) for t, p in zip(INSTRUCTIONS,
                                                                                                   images)])
    assert per_sample == 2 and tiles.shape == (4, 3, SIZE, SIZE)
    assert torch.equal(tiles[1], results[0]) and torch.equal(tiles[3], results[1])
    expected = torch.nn.functional.interpolate(load_condition_tensor(images[1])[None], size=(SIZE, SIZE),
                                               mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(tiles[2], expected.clamp(0, 1))
    same, one = with_condition_images(results, INSTRUCTIONS)  # text prompts: the results alone, as before
    assert one == 1 and same is results


def test_the_reward_gets_the_condition_image_path(kontext_dir, tmp_path):
    from diffalign.config import load_config
    from diffalign.trainers import DDPOTrainer

    (tmp_path / "edits").mkdir()
    path = _write_image(tmp_path / "edits" / "in.png", 0)
    prompt_file = _edit_prompt_file(tmp_path, [{"prompt": "make it red", "image": "in.png", "tag": "color"}])
    seen = []

    def edit_reward(images, prompts, metadata):
        seen.extend(metadata)
        inputs = torch.stack([load_condition_tensor(row["image"]) for row in metadata])
        inputs = torch.nn.functional.interpolate(inputs, size=images.shape[-2:], mode="bilinear")
        return -(images.float().cpu() - inputs).abs().mean(dim=(1, 2, 3))  # stay close to the input

    config = load_config("ddpo", overrides=dict(
        model=kontext_dir, output_dir=str(tmp_path / "run"), prompt_file=prompt_file, num_epochs=1,
        sample_num_steps=2, sample_num_prompts_per_epoch=1, sample_images_per_prompt=2, sample_batch_size=2,
        train_batch_size=2, grid_num_images=1, sample_resolution=SIZE, final_eval_num_images=0))
    trainer = DDPOTrainer(config, reward_fn=edit_reward)
    metrics = trainer.step(0)
    assert np.isfinite(metrics["reward_mean"])
    assert [row["image"] for row in seen] == [path, path] and all(row["tag"] == "color" for row in seen)


@pytest.mark.parametrize("run_snippets", [False, pytest.param(True, marks=pytest.mark.slow)],  # running them: ~10 s
                         ids=["text", "run"])
def test_the_model_card_edits_an_image_as_the_run_sampled(kontext_dir, tmp_path, monkeypatch, run_snippets):
    """The card's snippets load the LoRA with `FluxKontextPipeline` (and `FluxKontextRLGPipeline`), edit the grid
    prompt's image resized to the trained size, with the run's `max_area` and guidance (`-m slow` runs them)."""
    import re

    from diffalign.config import load_config
    from diffalign.modelcard import model_card, usage_snippets

    (tmp_path / "edits").mkdir()
    path = _write_image(tmp_path / "edits" / "in.png", 0)
    prompt_file = _edit_prompt_file(tmp_path, [{"prompt": "make it red", "image": "in.png"}])
    run = tmp_path / "run"
    config = load_config("ddpo", overrides=dict(model=kontext_dir, output_dir=str(run), prompt_file=prompt_file,
                                                sample_resolution=SIZE, sample_num_steps=2,
                                                sample_embedded_guidance=3.0))
    prompt = ConditionedPrompt("make it red", (path,))
    plain, rlg = usage_snippets(config, FluxKontextFamily, prompt, "final", SIZE)
    assert "FluxKontextPipeline.from_pretrained" in plain and "FluxKontextRLGPipeline.from_pretrained" in rlg
    for code in (plain, rlg):
        assert str(tmp_path) not in code and 'load_image("in.png")' in code  # a shared card: the file by name
        assert f"max_area={SIZE * SIZE}, _auto_resize=False" in code and "guidance_scale=3" in code
        assert re.search(r"pipe\(prompt=\"make it red\", image=condition, ", code)
    card = model_card(config, family=FluxKontextFamily, reward_label="r", prompt=prompt, resolution=SIZE)
    assert card.data.pipeline_tag == "image-to-image" and "image-to-image" in card.data.tags
    if not run_snippets:
        return
    family = family_for_pipeline(FluxKontextFamily.tiny_pipeline())
    add_lora(family.denoiser, rank=4, alpha=8.0, target_modules=family.default_lora_target_modules)
    family.save_lora(family.denoiser, str(run / "final"))
    monkeypatch.chdir(tmp_path / "edits")  # where the image is; the model and LoRA paths are the run's
    for code in (plain, rlg):
        code = code.replace(f'"{os.path.relpath(kontext_dir, run)}"', json.dumps(kontext_dir)).replace(
            '"final"', json.dumps(str(run / "final")))
        scope = {}
        exec(code, scope)
        assert scope["pipe"].get_list_adapters()["transformer"], "no LoRA loaded"
        assert np.array_equal(np.asarray(scope["condition"]), np.asarray(family.pipeline_image(path, SIZE, SIZE)))
        assert scope["image"].size == (SIZE, SIZE)
