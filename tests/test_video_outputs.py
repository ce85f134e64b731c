"""Outputs of video runs: animated grids (MP4 through imageio-ffmpeg, GIF through PIL without it), the before/after
grids, the animated TensorBoard summary, and a short run of a video model (the tiny SD pipeline whose decoded image
moves over 3 frames) whose held-out and final evaluations score every frame."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign import plotting
from diffalign.config import DDPOConfig
from diffalign.plotting import find_video, read_video, save_video, video_grid
from diffalign.rewards import get_reward
from diffalign.rollout import as_family
from diffalign.trainers import DDPOTrainer

FRAMES = 3


def moving_videos(count=3, frames=FRAMES, size=32):
    """Videos whose frames differ: a smooth random image shifted 2 pixels right per frame."""
    low = torch.rand(count, 3, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    image = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear").clamp(0, 1)
    return torch.stack([image.roll(2 * f, dims=-1) for f in range(frames)], dim=1)


@pytest.mark.parametrize("mp4", [True, False], ids=["mp4", "gif-fallback"])
def test_a_video_grid_written_to_disk_reads_back_frame_by_frame(tmp_path, monkeypatch, mp4):
    if mp4:
        pytest.importorskip("imageio_ffmpeg")
    else:  # as without imageio-ffmpeg
        monkeypatch.setattr(plotting, "mp4_available", lambda: False)
    videos = moving_videos()
    frames = video_grid(videos, nrow=2)
    assert len(frames) == FRAMES and frames[0].size == plotting.image_grid(videos[:, 0], nrow=2).size
    path = save_video(frames, str(tmp_path / "grid.png"))
    assert path == str(tmp_path / ("grid.mp4" if mp4 else "grid.gif")) and find_video(str(tmp_path / "grid")) == path
    read = read_video(path)
    assert len(read) == FRAMES
    for frame, written in zip(read, frames):
        crop = np.asarray(frame.crop((0, 0, *written.size)), dtype=np.float32)
        # a GIF keeps these colours nearly, an MP4 approximately (lossy)
        error = np.abs(crop - np.asarray(written, dtype=np.float32)).mean()
        assert error < (8 if mp4 else 4), error
    if mp4:
        assert read[0].width % 16 == 0 and read[0].height % 16 == 0  # padded, not rescaled, to macro blocks


def test_an_image_to_video_grid_shows_the_condition_image_still_beside_each_video(tmp_path):
    from diffalign.prompts import ConditionedPrompt, load_condition_tensor
    from diffalign.trainers.evaluation import with_condition_images

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    videos = moving_videos(count=2)
    prompts = [ConditionedPrompt("a cat walks", (str(tmp_path / "in.png"),)), "a dog"]
    tiles, per_sample = with_condition_images(videos, prompts)
    assert per_sample == 2 and tiles.shape == (4, FRAMES, 3, 32, 32)
    assert torch.equal(tiles[1], videos[0]) and torch.equal(tiles[3], videos[1])
    expected = torch.nn.functional.interpolate(load_condition_tensor(str(tmp_path / "in.png"))[None], size=(32, 32),
                                               mode="bilinear", antialias=True)[0].clamp(0, 1)
    for f in range(FRAMES):
        torch.testing.assert_close(tiles[0, f], expected)
        assert torch.equal(tiles[2, f], torch.ones(3, 32, 32))  # no condition image: blank


class MovingPictureFamily:
    """A video model made of the tiny SD pipeline: its decoded image shifted 4 pixels right per frame,
    `[B, F, 3, H, W]`, as the video families' `decode` returns."""

    def __new__(cls, pipe):
        base = type(as_family(pipe))

        class MovingPicture(base):
            output_kind = "video"

            def decode(self, latents, height=None, width=None):
                image = super().decode(latents, height, width)
                return torch.stack([image.roll(4 * f, dims=-1) for f in range(FRAMES)], dim=1)

        return MovingPicture(pipe)


def jpeg_of_each_frame(videos):
    jpeg = get_reward("jpeg_compressibility")
    return torch.stack([jpeg(videos[:, f], None) for f in range(videos.shape[1])], dim=1)


@pytest.fixture(scope="module")
def video_run(tmp_path_factory, _tiny_pipe_template):
    pytest.importorskip("tensorboard")
    import copy

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("video_run")
    config = DDPOConfig(model="unused", output_dir=str(out), prompts=["a cat", "a dog"], eval_prompts=["a bird"],
                        eval_every=1, num_epochs=1, sample_num_steps=2, sample_num_prompts_per_epoch=2,
                        sample_images_per_prompt=2, sample_batch_size=2, train_batch_size=2, grid_num_images=2,
                        final_eval_num_images=2, report_to="tensorboard", log_images_every=1,
                        reward="jpeg_compressibility", video_reward_reduction="min")
    trainer = DDPOTrainer(config, pipeline=MovingPictureFamily(copy.deepcopy(_tiny_pipe_template)))
    history = trainer.train(progress=False)
    return trainer, history, str(out)


def test_a_video_run_scores_each_frame_and_writes_animated_grids(video_run):
    trainer, history, out = video_run
    grid = trainer.grid_trajectories()
    assert grid.images.shape[:3] == (2, FRAMES, 3)
    # the trainer's scoring (sampling, held-out and final evaluation): the `min` over frames of each frame's reward
    frame_rewards = jpeg_of_each_frame(grid.images)
    assert frame_rewards.std() > 0
    assert torch.equal(trainer.score(grid)["reward"], frame_rewards.amin(dim=1))
    assert all(torch.isfinite(torch.tensor(r["reward_mean"])) for r in history)
    assert "heldout_reward_mean" in history[-1]
    with open(os.path.join(out, "final_eval.json")) as f:
        final = json.load(f)
    assert final["num_images"] == 2 and final["base"]["reward_mean"] < 0 and final["trained"]["reward_mean"] < 0
    for name in ("grid_before", "grid_after", "grid_before_after"):
        path = find_video(os.path.join(out, name))
        assert path is not None and not os.path.exists(os.path.join(out, f"{name}.png")), name
        assert len(read_video(path)) == FRAMES, name
    # the model card shows the animated before/after grid
    before_after = os.path.basename(find_video(os.path.join(out, "grid_before_after")))
    assert os.path.isfile(os.path.join(out, "final", before_after))
    with open(os.path.join(out, "final", "README.md")) as f:
        assert before_after in f.read()
    assert read_video(find_video(os.path.join(out, "grid_before_after")))[0].height > read_video(
        find_video(os.path.join(out, "grid_after")))[0].height  # before over after


def test_tensorboard_gets_the_animated_grid(video_run):
    import io

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, out = video_run
    events = EventAccumulator(os.path.join(out, "logs", "diffalign"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    (summary,) = events.Images("samples")
    assert summary.step == 0
    gif = Image.open(io.BytesIO(summary.encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == FRAMES and gif.is_animated
    assert (gif.width, gif.height) == (summary.width, summary.height)
    captions = events.Tensors("samples/captions/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "a cat" in captions and "reward" in captions
