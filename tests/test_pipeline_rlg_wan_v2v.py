"""`WanVideoToVideoRLGPipeline` (RLG for Wan video-to-video) on the tiny model: w = 0 is `WanVideoToVideoPipeline` on
the base model and w = 1 the pipeline with the LoRA, or with a fully fine-tuned `aligned_transformer`, bit for bit
(`torch.equal`) at strength 0.8 and 0.5; several videos per prompt are each the video of its own generator; `diffalign
generate --video clip.mp4 --strength S --steps N` samples the video's first `--num-frames` frames as the family's
rollouts (the schedule whose last N steps S keeps) and writes the animated grid; bad `--video`/`--strength` input is
one line, exit 2; the model card's snippets for a wan_v2v run sample (LoRA and full fine-tune)."""

import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.families import WanVideoToVideoFamily, family_for_pipeline
from diffalign.families.wan_v2v import schedule_length
from diffalign.utils.peft_utils import add_lora

from cli_helpers import one_line

SIZE = 16
PROMPTS = ["a cat", "a red car"]


def _frames(seed=0, count=5):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)) for _ in range(count)]


def _mp4(directory, count=5) -> str:
    """A random MP4 clip of `count` frames, 32 x 32 (written as diffalign writes videos)."""
    from diffalign.plotting import save_video

    rng = np.random.default_rng(1)
    frames = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]
    path = save_video(frames, os.path.join(str(directory), "clip.mp4"))
    assert path.endswith(".mp4")
    return path


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _randomise_lora(model, std=0.1):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(std * torch.randn(param.shape, generator=_generator(1)))


def _call(strength, **extra):
    return dict(video=_frames(), prompt=list(PROMPTS), num_inference_steps=4, strength=strength, height=SIZE,
                width=2 * SIZE, guidance_scale=3.0, output_type="pt", max_sequence_length=16, **extra)


def _pipelines(variant=None):
    import diffusers

    from diffalign.pipelines import WanVideoToVideoRLGPipeline

    components = WanVideoToVideoFamily.tiny_components(**(variant or {}))
    components["transformer"].requires_grad_(False)  # as inference runs it (see the family tester)
    stock = diffusers.WanVideoToVideoPipeline(**components)
    rlg = WanVideoToVideoFamily.rlg_pipeline(stock)
    assert type(rlg) is WanVideoToVideoRLGPipeline and rlg.transformer is stock.transformer  # shared, not copied
    for pipe in (stock, rlg):
        pipe.set_progress_bar_config(disable=True)
    return stock, rlg


@pytest.mark.parametrize("strength, variant", [(0.8, None), (0.5, None), pytest.param(
    0.5, {"unipc_scheduler": True}, marks=pytest.mark.slow)])  # UniPC: also the family tester's (1e-4)
def test_rlg_is_the_stock_pipeline_on_the_base_at_0_and_with_the_lora_at_1(strength, variant):
    stock, rlg = _pipelines(variant)
    kwargs = _call(strength)
    base = stock(generator=_generator(), **kwargs).frames
    add_lora(stock.transformer, rank=4, alpha=8, target_modules=WanVideoToVideoFamily.default_lora_target_modules)
    _randomise_lora(stock.transformer)
    aligned = stock(generator=_generator(), **kwargs).frames
    assert (aligned - base).abs().max() > 1e-3 and base.shape == (2, 5, 3, SIZE, 2 * SIZE)
    for single_pass in (True, False):
        assert torch.equal(rlg(generator=_generator(), rlg_scale=0.0, rlg_single_pass=single_pass, **kwargs).frames,
                           base)
        assert torch.equal(rlg(generator=_generator(), rlg_scale=1.0, rlg_single_pass=single_pass, **kwargs).frames,
                           aligned)
    # w = 1.5 extrapolates; the per-row adapter pass and one forward per model agree up to rounding
    beyond = rlg(generator=_generator(), rlg_scale=1.5, **kwargs).frames
    assert (beyond - aligned).abs().max() > 1e-4
    torch.testing.assert_close(rlg(generator=_generator(), rlg_scale=1.5, rlg_single_pass=False, **kwargs).frames,
                               beyond, atol=1e-5, rtol=1e-5)
    # an RLG schedule has one value per sampled step: the `strength` share of the schedule
    kept = int(4 * strength)
    with pytest.raises(ValueError, match=f"the sampler runs {kept} steps"):
        rlg(generator=_generator(), rlg_scale=[1.5] * 4, **kwargs)


@pytest.mark.parametrize("strength", [0.8, 0.5])
def test_a_fully_fine_tuned_aligned_transformer(strength):
    import diffusers

    stock, rlg = _pipelines()
    kwargs = _call(strength)
    base = stock(generator=_generator(), **kwargs).frames
    tuned = WanVideoToVideoFamily.tiny_components(seed=1)["transformer"].requires_grad_(False)
    rlg.register_modules(aligned_transformer=tuned)
    aligned = diffusers.WanVideoToVideoPipeline(**{**stock.components, "transformer": tuned})
    aligned.set_progress_bar_config(disable=True)
    expected = aligned(generator=_generator(), **kwargs).frames
    assert torch.equal(rlg(generator=_generator(), rlg_scale=0.0, **kwargs).frames, base)
    assert torch.equal(rlg(generator=_generator(), rlg_scale=1.0, **kwargs).frames, expected)
    assert (expected - base).abs().max() > 1e-3


def test_each_video_per_prompt_is_the_video_of_its_generator():
    """`num_videos_per_prompt` (which `diffalign generate --num-images` uses; WanVideoToVideoPipeline samples one
    whatever it is): video j of a call with generators [g0, g1] is the single video of g_j."""
    stock, rlg = _pipelines()
    add_lora(stock.transformer, rank=4, alpha=8, target_modules=WanVideoToVideoFamily.default_lora_target_modules)
    _randomise_lora(stock.transformer)
    kwargs = {**_call(0.8), "prompt": PROMPTS[0]}
    both = rlg(generator=[_generator(0), _generator(1)], num_videos_per_prompt=2, rlg_scale=1.5, **kwargs).frames
    assert both.shape[0] == 2
    for j in range(2):
        alone = rlg(generator=_generator(j), rlg_scale=1.5, **kwargs).frames[0]
        torch.testing.assert_close(both[j], alone, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- generate
@pytest.fixture(scope="module")
def model_and_lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_v2v_rlg")
    model = WanVideoToVideoFamily.save_tiny(str(root / "model"))
    family = family_for_pipeline(WanVideoToVideoFamily.tiny_pipeline())
    add_lora(family.denoiser, rank=4, alpha=8, target_modules=family.default_lora_target_modules)
    _randomise_lora(family.denoiser)
    lora = str(root / "lora")
    family.save_lora(family.denoiser, lora)
    return model, lora


def _generate_args(model, lora, video, out, *extra):
    return ["generate", "--model", model, "--lora", lora, "--video", video, "--prompt", "a cat", "--rlg-scale", "0",
            "1", "1.5", "--num-frames", "5", "--steps", "2", "--resolution", str(SIZE), "--num-images", "1",
            "--output-dir", str(out), *extra]


def test_generate_samples_the_video_as_the_rollouts_and_writes_the_animated_grid(model_and_lora, tmp_path,
                                                                               monkeypatch):
    import diffusers

    from diffalign import generate
    from diffalign.cli import main
    from diffalign.plotting import find_video, read_video

    model, lora = model_and_lora
    clip = _mp4(tmp_path, count=7)  # more frames than sampled: the first 5
    sampled = {}
    sample_scales = generate.sample_scales

    def spy(*args, **kwargs):
        sampled.update(kwargs=kwargs, images=sample_scales(*args, **kwargs))
        return sampled["images"]

    monkeypatch.setattr(generate, "sample_scales", spy)
    out = tmp_path / "out"
    assert main(_generate_args(model, lora, clip, out, "--strength", "0.5")) == 0
    grid = find_video(str(out / "rlg_grid.png"))
    assert grid.endswith(".mp4") and len(read_video(grid)) == 5  # animated: a frame per video frame
    kwargs = sampled["kwargs"]
    # --steps 2 at strength 0.5: the last 2 steps of a 4-step schedule, as the family's rollouts sample
    assert kwargs["num_inference_steps"] == schedule_length(2, 0.5) == 4 and kwargs["strength"] == 0.5
    assert len(kwargs["video"]) == 5 and "num_frames" not in kwargs
    stock = diffusers.WanVideoToVideoPipeline.from_pretrained(model)
    stock.set_progress_bar_config(disable=True)
    call = dict(prompt="a cat", video=kwargs["video"], num_inference_steps=4, strength=0.5, height=SIZE, width=SIZE,
                guidance_scale=WanVideoToVideoFamily.default_guidance_scale, max_sequence_length=512,
                output_type="pt")
    images = sampled["images"]
    torch.testing.assert_close(images[0.0], stock(generator=_generator(), **call).frames, atol=1e-4, rtol=1e-4)
    stock.load_lora_weights(lora)
    torch.testing.assert_close(images[1.0], stock(generator=_generator(), **call).frames, atol=1e-4, rtol=1e-4)
    assert (images[1.5] - images[1.0]).abs().max() > 1e-4
    # the video's frames as the family's rollouts take them: the first 5, read as the family reads them
    family = WanVideoToVideoFamily(stock)
    family.configure(num_frames=5)
    expected = family.condition_frames(clip)
    assert [np.asarray(f).tolist() for f in kwargs["video"]] == [np.asarray(f).tolist() for f in expected]


def test_generate_defaults_to_the_pipeline_strength(model_and_lora, tmp_path, monkeypatch):
    from diffalign import generate

    model, lora = model_and_lora
    calls = []
    monkeypatch.setattr(generate, "sample_scales", lambda *args, **kwargs: calls.append(kwargs) or {
        s: torch.zeros(1, 5, 3, SIZE, SIZE) for s in args[2]})
    args = generate.add_arguments(argparse.ArgumentParser()).parse_args(
        _generate_args(model, lora, _mp4(tmp_path), tmp_path / "out")[1:])
    assert generate.run(args) == 0
    assert calls[0]["strength"] == 0.8 and calls[0]["num_inference_steps"] == schedule_length(2, 0.8) == 3


def _bad_video(directory) -> str:
    path = os.path.join(str(directory), "broken.mp4")
    with open(path, "w") as f:
        f.write("not a video")
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing", "--video: condition video '{dir}/nope.mp4' does not exist"),
    ("unreadable", "--video: condition video '{dir}/broken.mp4' is not a readable video"),
    ("no video", "wan_v2v models turn a video into a video: give the condition video with --video PATH"),
    ("strength 0", "--strength must be in (0, 1]"),
    ("strength 1.5", "--strength must be in (0, 1]"),
    ("strength nan", "--strength must be in (0, 1]"),
    ("short", "has 5 frames; wan_v2v samples 9 (--num-frames)"),
    ("default frames", "has 5 frames; wan_v2v samples 81 (--num-frames)"),
    ("schedule", "longer than the scheduler's 1000 timesteps"),
])
def test_bad_video_and_strength_are_one_line(model_and_lora, tmp_path, capsys, case, expected):
    from diffalign.cli import main

    model, lora = model_and_lora
    video = _mp4(tmp_path)
    argv = _generate_args(model, lora, video, tmp_path / "out")
    flags = {"missing": ["--video", str(tmp_path / "nope.mp4")], "unreadable": ["--video", _bad_video(tmp_path)],
             "strength 0": ["--strength", "0"], "strength 1.5": ["--strength", "1.5"],
             "strength nan": ["--strength", "nan"], "short": ["--num-frames", "9"],
             "schedule": ["--strength", "0.001", "--steps", "2"]}
    if case == "no video":
        i = argv.index("--video")
        del argv[i:i + 2]
    if case == "default frames":
        i = argv.index("--num-frames")
        del argv[i:i + 2]
    argv += flags.get(case, [])
    capsys.readouterr()
    assert main(argv) == 2
    assert expected.format(dir=tmp_path) in one_line(capsys.readouterr().err)


def test_strength_on_a_model_without_videos_is_one_line(tiny_model_dir, tmp_path, capsys):
    from diffalign.cli import main

    capsys.readouterr()
    assert main(["generate", "--model", tiny_model_dir, "--prompt", "a cat", "--rlg-scale", "1", "--strength", "0.5",
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert "--strength: sd models take no condition video" in one_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------------- model card
@pytest.mark.parametrize("use_lora", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_the_model_card_snippets_sample_a_wan_v2v_run(model_and_lora, tmp_path, monkeypatch, use_lora):
    """The card's plain and RLG snippets for a wan_v2v run (LoRA, or a full fine-tune as `aligned_transformer`) run:
    the video's first `num_frames` frames, the run's strength and the longer schedule, `WanVideoToVideoRLGPipeline`
    with the trained weights."""
    from diffalign.config import DDPOConfig
    from diffalign.modelcard import usage_snippets
    from diffalign.prompts import ConditionedPrompt

    model, lora = model_and_lora
    run = tmp_path / "run"
    final = run / "final"
    if use_lora:
        import shutil

        shutil.copytree(lora, final)
    else:  # a full fine-tune: the run's transformer
        WanVideoToVideoFamily.tiny_components(seed=1)["transformer"].save_pretrained(str(final / "transformer"))
    clip = _mp4(tmp_path, count=6)
    config = DDPOConfig(model=model, output_dir=str(run), sample_num_steps=2, sample_guidance_scale=3.0,
                        sample_strength=0.5, num_frames=5, use_lora=use_lora)
    plain, rlg = usage_snippets(config, WanVideoToVideoFamily, ConditionedPrompt("a cat", (), (clip,)), "final",
                                SIZE)
    assert "WanVideoToVideoRLGPipeline.from_pretrained" in rlg and "rlg_scale=1.5" in rlg
    assert 'load_video("clip.mp4")[:5]' in rlg and "strength=0.5" in rlg and "num_inference_steps=4," in rlg
    assert ("aligned_transformer=transformer" in rlg) != use_lora
    WanVideoToVideoFamily.clean_prompts()  # the snippets' pipelines clean prompts with ftfy, not installed here
    monkeypatch.chdir(tmp_path)  # where the clip is; the model and weights by absolute path
    trained = WanVideoToVideoFamily.tiny_components(seed=1)["transformer"].state_dict()
    for snippet in (plain, rlg):
        code = snippet.replace(json.dumps(os.path.relpath(model, run)), json.dumps(model)).replace(
            '"final"', json.dumps(str(final))).replace('"video.mp4"', json.dumps(str(tmp_path / "out.mp4")))
        scope = {}
        exec(code, scope)
        assert len(scope["video"]) == 5 and len(scope["condition"]) == 5
        if use_lora:
            assert scope["pipe"].get_list_adapters()["transformer"], "no LoRA loaded"
        else:  # the run's transformer: the plain snippet's `transformer`, the RLG snippet's aligned one
            loaded = scope["pipe"].aligned_transformer if snippet is rlg else scope["pipe"].transformer
            assert all(torch.equal(param, trained[name]) for name, param in loaded.state_dict().items())
