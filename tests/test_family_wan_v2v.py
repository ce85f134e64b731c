"""Wan video-to-video's own checks, beyond the family tester (tests/test_family_common.py runs the shared checks on
the tiny model with a condition GIF, its rollout check from given latents): the rollout drawn from a generator starts
from the condition video's noised latents and equals `WanVideoToVideoPipeline` at two strengths, the start is
recorded so recomputed log-probs give ratio 1, the condition is encoded once per (video, size, frames), a video of
too few frames, a prompt without a video, a bad video path and a bad `sample_strength` are one line (exit 2), and
`train ddpo` from a JSONL prompt file with videos (a GIF and an MP4) writes a LoRA that `WanVideoToVideoPipeline`
loads and grids that show the condition video beside the result (kill + resume: the family tester's, -m slow)."""

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.errors import ModelError, PromptError
from diffalign.families import FAMILIES, WanVideoToVideoFamily, family_for_pipeline
from diffalign.families.wan_v2v import schedule_length
from diffalign.kernels import sde_window_mask
from diffalign.prompts import ConditionedPrompt
from diffalign.rollout import default_kernel, sample_trajectories, step_log_probs
from diffalign.utils.peft_utils import add_lora

from cli_helpers import one_line

SIZE = 16


def _video(directory, seed=0, frames=5, name=None) -> str:
    """A random RGB GIF of `frames` frames, 20 x 28 (not the sampled size: the resize is exercised)."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)) for _ in range(frames)]
    path = os.path.join(str(directory), name or f"condition{seed}.gif")
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    return path


@pytest.fixture(scope="module")
def pipe():
    return WanVideoToVideoFamily.tiny_pipeline()


def _family(pipe, strength=None):
    family = family_for_pipeline(pipe)
    family.set_kernel_scheduler(pipe)
    family.configure(num_frames=5, strength=strength)
    return family


def test_wan_v2v_is_registered_for_the_video_to_video_pipeline(pipe):
    assert FAMILIES["WanVideoToVideoPipeline"] is WanVideoToVideoFamily
    assert WanVideoToVideoFamily.output_kind == "video" and WanVideoToVideoFamily.requires_condition_video
    assert WanVideoToVideoFamily.max_condition_videos == 1 and WanVideoToVideoFamily.max_condition_images == 0
    assert WanVideoToVideoFamily.rlg_route() == WanVideoToVideoFamily.rlg_route_for(pipe) == "pipeline"
    assert type(WanVideoToVideoFamily.rlg_pipeline(pipe)).__name__ == "WanVideoToVideoRLGPipeline"


@pytest.mark.parametrize("strength", [0.8, 0.3, 1.0, 1e-3])
def test_schedule_length_keeps_the_rollout_steps_as_get_timesteps_does(strength, pipe):
    for steps in range(1, 60):
        total = schedule_length(steps, strength)
        kept = pipe.get_timesteps(total, torch.arange(total), strength, "cpu")[1]
        assert kept == steps  # the pipeline's own truncation keeps the rollout's steps ...
        if total > steps:  # ... and no shorter schedule does
            assert pipe.get_timesteps(total - 1, torch.arange(total - 1), strength, "cpu")[1] < steps


@pytest.mark.parametrize("strength, guidance", [(0.8, 3.0), (0.5, 1.0)])
def test_rollout_starts_from_the_noised_video_and_equals_the_pipeline(pipe, tmp_path, strength, guidance):
    family = _family(pipe, strength)
    prompts = [ConditionedPrompt("a cat", (), (_video(tmp_path, 0),)),
               ConditionedPrompt("a red car", (), (_video(tmp_path, 1),))]
    generators = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    ours = sample_trajectories(family, prompts, num_inference_steps=3, guidance_scale=guidance, height=SIZE,
                               width=2 * SIZE, generator=generators(), stochastic_steps=sde_window_mask(3, 0))
    total = schedule_length(3, strength)
    assert torch.equal(ours.timesteps, family.scheduler.timesteps[total - 3:]) and ours.latents.shape[1] == 4
    # the start: the video's latents noised to the first kept timestep with the generator's noise
    video = ours.conditioning["video_latents"]
    assert video.shape == (2, 16, 2, 2, 4) and not torch.equal(video[0], video[1])
    noise = family.prepare_latents(2, SIZE, 2 * SIZE, torch.float32, "cpu", generators())
    sigma = family.scheduler.sigmas[total - 3]
    assert 0 < sigma < 1
    torch.testing.assert_close(ours.latents[:, 0], sigma * noise + (1 - sigma) * video, atol=1e-6, rtol=0)
    stock = torch.cat([pipe(prompt=str(prompt), generator=torch.Generator().manual_seed(i), output_type="pt",
                            num_inference_steps=family.pipeline_num_inference_steps(3), height=SIZE, width=2 * SIZE,
                            guidance_scale=guidance, **family.pipeline_call_kwargs(),
                            **family.pipeline_condition_kwargs(prompt)).frames for i, prompt in enumerate(prompts)])
    torch.testing.assert_close(ours.images, stock, atol=1e-5, rtol=1e-4)
    # another video, same prompt and noise: another start and another video
    swapped = [ConditionedPrompt("a cat", (), (_video(tmp_path, 1),))] * 2
    other = sample_trajectories(family, swapped, num_inference_steps=3, guidance_scale=guidance, height=SIZE,
                                width=2 * SIZE, generator=generators(), stochastic_steps=sde_window_mask(3, 0))
    assert (other.images[0] - ours.images[0]).abs().max() > 1e-4


def test_recorded_start_gives_ratio_one_and_the_condition_is_encoded_once(tmp_path, monkeypatch):
    family = _family(WanVideoToVideoFamily.tiny_pipeline())  # its own: a LoRA goes on its transformer
    calls = []
    encode = family.encode_condition_video
    monkeypatch.setattr(family, "encode_condition_video", lambda *key: calls.append(key) or encode(*key))
    path = _video(tmp_path)
    prompts = [ConditionedPrompt("a cat", (), (path,)), ConditionedPrompt("a car", (), (path,))]
    denoiser = family.denoiser
    add_lora(denoiser, target_modules=family.default_lora_target_modules)
    generator = torch.Generator().manual_seed(0)
    for param in denoiser.parameters():
        if param.requires_grad:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    denoiser.eval()
    kernel = default_kernel(family, eta=1.0, noise_level=0.7)
    for _ in range(2):
        traj = sample_trajectories(family, prompts, num_inference_steps=3, guidance_scale=3.0, kernel=kernel,
                                   height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(1),
                                   compute_reference=True, stochastic_steps=sde_window_mask(3, 2))
    assert calls == [(path, SIZE, SIZE)]  # one video, one size, 5 frames: encoded once over both rollouts
    rows, steps = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        log_probs, _, _ = step_log_probs(family, denoiser, kernel, traj, rows, steps, 3.0)
    ratio = torch.exp(log_probs - traj.log_probs[rows, steps])
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    assert (traj.kl_to_ref[:, :2] > 0).all()


def test_a_video_shorter_than_num_frames_and_a_bad_strength_are_one_line(pipe, tmp_path):
    family = _family(pipe)
    short = ConditionedPrompt("a cat", (), (_video(tmp_path, frames=3),))
    with pytest.raises(PromptError, match="has 3 frames; wan_v2v samples 5"):
        family.conditioning([short], "", False, SIZE, SIZE)
    for strength in (0, 1.5, True):
        with pytest.raises(ModelError, match=r"strength must be in \(0, 1\]"):
            family.configure(strength=strength)
    family.configure(strength=0.01)  # 50 steps would be the last of a 5000-step schedule
    with pytest.raises(ModelError, match="5000-step schedule, longer than the scheduler's 1000 timesteps"):
        family.set_timesteps(50, "cpu", SIZE, SIZE)
    with pytest.raises(ModelError, match="strength is a setting of video-to-video models"):
        family_for_pipeline(WanVideoToVideoFamily.__mro__[1].tiny_pipeline()).configure(strength=0.5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return WanVideoToVideoFamily.save_tiny(str(tmp_path_factory.mktemp("wan_v2v") / "model"))


def _run_args(model, out, prompt_file, *extra):
    return ["train", "ddpo", "--model", model, "--output_dir", out, "--num_epochs", "2", "--sample_num_steps", "3",
            "--sample_num_prompts_per_epoch", "2", "--sample_images_per_prompt", "2", "--sample_batch_size", "4",
            "--train_batch_size", "4", "--grid_num_images", "2", "--checkpoint_every", "2", "--reward",
            "jpeg_compressibility", "--prompt_file", prompt_file, "--train_learning_rate", "0.05",
            "--sample_guidance_scale", "3.0", "--sample_resolution", str(SIZE), "--num_frames", "5",
            "--sample_sde_window_size", "2", "--final_eval_num_images", "0", *extra]


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "a cat"}, "has no condition video, but a wan_v2v model starts from one"),
    ({"prompt": "a cat", "video": "missing.gif"}, "condition video '.*missing.gif' does not exist"),
    ({"prompt": "a cat", "video": "bad.gif"}, "condition video '.*bad.gif' is not a readable video"),
    ({"prompt": "a cat", "video": "condition0.gif"}, r"sample_strength must be in \(0, 1\]"),
], ids=["no-video", "missing", "unreadable", "strength"])
def test_bad_video_rows_and_strength_are_one_line(model_dir, tmp_path, capsys, row, expected):
    from diffalign.cli import main

    _video(tmp_path)
    (tmp_path / "bad.gif").write_text("not a video")
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text(json.dumps(row) + "\n")
    extra = ["--sample_strength", "1.5"] if row.get("video") == "condition0.gif" else []
    capsys.readouterr()
    assert main(_run_args(model_dir, str(tmp_path / "run"), str(prompt_file), *extra)) == 2
    assert re.search(expected, one_line(capsys.readouterr().err))


def test_sample_strength_on_another_model_is_one_line_and_hashed_only_when_set(tmp_path, capsys, tiny_model_dir):
    from diffalign.cli import main
    from diffalign.trainers import NFTConfig
    from diffalign.trainers.base_config import HASHED_WHEN_SET

    assert "sample_strength" in HASHED_WHEN_SET  # unset, earlier runs keep their hash
    assert NFTConfig(sample_strength=0.5).hash() != NFTConfig().hash()

    argv = ["train", "ddpo", "--model", tiny_model_dir, "--output_dir", str(tmp_path / "run"), "--prompts", "[a cat]",
            "--sample_strength", "0.5"]
    assert main(argv) == 2
    assert "strength is a setting of video-to-video models" in one_line(capsys.readouterr().err)


def test_grids_show_the_condition_video_beside_the_result(tmp_path):
    from diffalign.prompts import load_condition_video
    from diffalign.trainers.evaluation import with_condition_images

    results = torch.rand(2, 5, 3, SIZE, SIZE)
    path = _video(tmp_path, frames=7)
    tiles, per_sample = with_condition_images(results, [ConditionedPrompt("a cat", (), (path,))] * 2)
    assert per_sample == 2 and tiles.shape == (4, 5, 3, SIZE, SIZE)
    condition = torch.nn.functional.interpolate(load_condition_video(path)[:5], size=(SIZE, SIZE), mode="bilinear",
                                                antialias=True, align_corners=False).clamp(0, 1)
    torch.testing.assert_close(tiles[0], condition)  # the video's first 5 frames, playing beside the result
    assert torch.equal(tiles[1], results[0]) and torch.equal(tiles[3], results[1])


def test_cli_trains_from_a_prompt_file_with_videos_and_the_lora_loads(model_dir, tmp_path):
    import diffusers

    from diffalign.cli import main
    from diffalign.families.wan_v2v import read_condition_frames
    from diffalign.plotting import find_video, read_video, save_video

    mp4 = save_video(read_condition_frames(_video(tmp_path, 1)), str(tmp_path / "clip.mp4"))  # GIF without ffmpeg
    videos = [_video(tmp_path, 0), mp4]
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p, "video": os.path.basename(v)}) + "\n"
                                   for p, v in (("a cat", videos[0]), ("a red car", videos[1]))))
    out = str(tmp_path / "run")
    assert main(_run_args(model_dir, out, str(prompt_file), "--sample_strength", "0.7")) == 0
    assert [json.loads(line)["epoch"] for line in open(os.path.join(out, "metrics.jsonl"))] == [0, 1]
    frames = read_video(find_video(os.path.join(out, "grid_after.png")))
    assert len(frames) == 5
    # two tiles a sample, the condition video first: it plays (random frames), unlike a still condition image
    first, last = np.asarray(frames[0], dtype=np.float32), np.asarray(frames[-1], dtype=np.float32)
    tile = first.shape[1] // 4
    assert np.abs(first[:, 2 : tile - 2] - last[:, 2 : tile - 2]).mean() > 20

    pipe = diffusers.WanVideoToVideoPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(video=read_condition_frames(videos[1]), prompt="a red car", strength=0.7,
                  num_inference_steps=schedule_length(3, 0.7), height=SIZE, width=SIZE, output_type="pt",
                  guidance_scale=3.0)
    before = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    pipe.load_lora_weights(os.path.join(out, "final"))
    after = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert (after - before).abs().max() > 1e-4


@pytest.mark.parametrize("model", ["sd", "wan_v2v"])
def test_generate_video_flag_is_one_line(model, model_dir, tiny_model_dir, tmp_path, capsys):
    """`diffalign generate --video`: a text-to-image model refuses it; a video-to-video model refuses a video of
    fewer frames than it samples (81 without --num-frames) in one line (the rest:
    tests/test_pipeline_rlg_wan_v2v.py)."""
    from diffalign.cli import main

    path = {"sd": tiny_model_dir, "wan_v2v": model_dir}[model]
    argv = ["generate", "--model", path, "--prompt", "a cat", "--rlg-scale", "1", "--video", _video(tmp_path),
            "--output-dir", str(tmp_path / "out")]
    capsys.readouterr()
    assert main(argv) == 2
    expected = {"sd": "--video: sd models take no condition video",
                "wan_v2v": "has 5 frames; wan_v2v samples 81 (--num-frames)"}[model]
    assert expected in one_line(capsys.readouterr().err)


def test_the_model_card_samples_as_the_rollouts_on_the_video_to_video_task(tmp_path):
    """The card's snippet samples as the rollouts: the video's first `num_frames` frames, the strength, and the
    pipeline's longer schedule whose last `sample_num_steps` steps it keeps (no `num_frames`: the pipeline takes the
    video's)."""
    from diffalign.config import PRDPConfig
    from diffalign.modelcard import usage_snippets

    model = tmp_path / "wan-v2v"  # a local directory: the card names it, nothing loads from it
    model.mkdir()
    config = PRDPConfig(model=str(model), output_dir=str(tmp_path / "run"), sample_num_steps=20,
                        sample_guidance_scale=5.0, sample_strength=0.7, num_frames=33)
    prompt = ConditionedPrompt("a cat", (), (str(tmp_path / "clip.mp4"),))
    plain = usage_snippets(config, WanVideoToVideoFamily, prompt, "final", 480)[0]
    assert "WanVideoToVideoPipeline.from_pretrained" in plain and "load_video" in plain
    assert 'condition = load_video("clip.mp4")[:33]' in plain and "video=condition" in plain
    assert f"num_inference_steps={schedule_length(20, 0.7)}," in plain and "strength=0.7" in plain
    assert "num_frames" not in plain
    from diffalign.modelcard import model_card

    card = model_card(config, family=WanVideoToVideoFamily, reward_label="r", prompt=prompt, resolution=480)
    assert card.data.pipeline_tag == "video-to-video" and "video-to-video" in card.data.tags
