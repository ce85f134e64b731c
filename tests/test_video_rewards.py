"""Rewards of videos (`[B, F, 3, H, W]`): an image reward scores each frame and reduces the frames' scores
(`video_reward_reduction`), a video-native reward (`video_native = True`) gets the videos whole, and
`temporal_consistency` is the mean CLIP-image cosine similarity of consecutive frames."""

import pytest
import torch

from cli_helpers import TINY_RUN, one_line
from diffalign.cli import main
from diffalign.config import DDPOConfig
from diffalign.rewards import (VIDEO_REDUCTIONS, GroupwiseReward, RewardError, call_reward, frame_scores, get_reward,
                               reduce_frames)
from diffalign.rewards.scoring import RewardScorer
from diffalign.trainers.base_config import VIDEO_REWARD_REDUCTIONS


def random_videos(batch=3, frames=4, size=16, seed=0):
    """Smooth random videos: a JPEG's size depends on the frame, so frames score differently."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, frames, 3, size // 4, size // 4, generator=generator)
    return torch.nn.functional.interpolate(low.flatten(0, 1), size=(size, size), mode="bilinear").unflatten(
        0, (batch, frames)).clamp(0, 1)


PROMPTS = ["a cat", "a cat", "a dog"]


def jpeg_of_each_frame(videos):
    """The image reward of each frame, frame by frame: `[B, F]`."""
    jpeg = get_reward("jpeg_compressibility")
    return torch.stack([torch.stack([jpeg(videos[b, f][None], ["x"])[0] for f in range(videos.shape[1])])
                        for b in range(videos.shape[0])])


def test_each_frame_scores_as_the_image_reward_of_that_frame():
    videos = random_videos()
    expected = jpeg_of_each_frame(videos)
    assert expected.std() > 0  # frames differ, so a reduction matters
    scores = frame_scores(get_reward("jpeg_compressibility"), videos, PROMPTS)
    assert scores.shape == (3, 4) and scores.dtype == torch.float32
    assert torch.equal(scores, expected)
    written_out = {"mean": expected.mean(dim=1), "min": expected.min(dim=1).values,
                   "max": expected.max(dim=1).values, "median": expected.quantile(0.5, dim=1)}
    assert sorted(VIDEO_REDUCTIONS) == sorted(VIDEO_REWARD_REDUCTIONS) == sorted(written_out)
    for reduction, value in written_out.items():
        # the trainers' scoring path (`RewardScorer`, what sampling, held-out and final evaluation call)
        scorer = RewardScorer(get_reward("jpeg_compressibility"), "jpeg", asynchronous=False,
                              video_reduction=reduction)
        scores = scorer.score(videos, PROMPTS, None, torch.tensor([0, 0, 1]))
        assert torch.equal(scores["reward"], reduce_frames(expected, reduction)), reduction
        torch.testing.assert_close(scores["reward"], value, rtol=0, atol=1e-6)


def test_images_are_scored_as_before():
    images = random_videos(frames=1)[:, 0]
    jpeg = get_reward("jpeg_compressibility")
    scorer = RewardScorer(jpeg, "jpeg", asynchronous=False, video_reduction="min")
    assert torch.equal(scorer.score(images, PROMPTS, None, torch.tensor([0, 0, 1]))["reward"],
                       jpeg(images, PROMPTS))


def brightness_range(videos, prompts, metadata=None):
    """A video-native test reward: how much each video's mean brightness changes over its frames."""
    means = videos.mean(dim=(2, 3, 4))
    return means.amax(dim=1) - means.amin(dim=1)


brightness_range.video_native = True


def test_a_mixture_gives_each_part_what_it_takes():
    videos = random_videos()
    mixture = get_reward({"jpeg_compressibility": 2.0, "test_video_rewards:brightness_range": 3.0})
    scores = call_reward(mixture, videos, PROMPTS, video_reduction="max")
    jpeg = jpeg_of_each_frame(videos).amax(dim=1)
    assert torch.equal(mixture.last_parts["jpeg_compressibility"], jpeg)
    torch.testing.assert_close(mixture.last_parts["test_video_rewards:brightness_range"],
                               brightness_range(videos, PROMPTS))
    torch.testing.assert_close(scores, 2.0 * jpeg + 3.0 * brightness_range(videos, PROMPTS))


class FrameRank(GroupwiseReward):
    """A groupwise test reward: a sample's rank by brightness among its group (0 = darkest)."""

    def score_groups(self, images, prompts, metadata, group_ids):
        assert images.ndim == 4
        brightness = images.mean(dim=(1, 2, 3))
        ranks = torch.zeros(len(images))
        for group in group_ids.unique():
            members = (group_ids == group).nonzero().flatten()
            ranks[members] = brightness[members].argsort().argsort().float()
        return ranks


def test_a_groupwise_reward_ranks_each_frame_within_its_group():
    videos = random_videos(batch=4, frames=3)
    group_ids = torch.tensor([0, 0, 1, 1])
    prompts = ["a cat", "a cat", "a dog", "a dog"]
    scores = frame_scores(FrameRank(), videos, prompts, group_ids=group_ids)
    for f in range(3):
        assert torch.equal(scores[:, f], FrameRank()(videos[:, f], prompts, None, group_ids))


def test_videos_and_images_reach_only_rewards_that_take_them():
    videos = random_videos(batch=2)
    with pytest.raises(RewardError, match="'jpeg' scores images .* without a frame reduction") as info:
        call_reward(get_reward("jpeg_compressibility"), videos, ["a", "b"], name="jpeg")
    assert "\n" not in str(info.value)
    with pytest.raises(RewardError, match="'range' is video-native: it scores videos") as info:
        call_reward(brightness_range, videos[:, 0], ["a", "b"], name="range")
    assert "\n" not in str(info.value)
    with pytest.raises(RewardError, match="video_reward_reduction must be one of mean, min, max, median; got 'mode'"):
        RewardScorer(brightness_range, "range", video_reduction="mode")


def test_video_reward_reduction_is_checked_and_hashed_only_when_set(tmp_path, capsys):
    assert main(["train", "ddpo", "--output_dir", str(tmp_path / "x"), "--video_reward_reduction", "mode"]
                + TINY_RUN) == 2
    assert "video_reward_reduction must be one of mean, min, max, median; got 'mode'" in one_line(
        capsys.readouterr().err)
    default = DDPOConfig(model="digits")
    assert DDPOConfig(model="digits", video_reward_reduction="mean").hash() == default.hash()
    assert DDPOConfig(model="digits", video_reward_reduction="min").hash() != default.hash()
    assert "video_reward_reduction" in default.to_dict()


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random `CLIPModel` and `CLIPProcessor` saved locally (as tests/test_rewards.py builds them)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffalign.testing import tiny_clip_text_kwargs
    from diffalign.tokenization import offline_clip_tokenizer

    directory = tmp_path_factory.mktemp("tiny_clip")
    vision_config = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         image_size=224, patch_size=32)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=tiny_clip_text_kwargs(), vision_config=vision_config,
                         projection_dim=16)).save_pretrained(directory)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=offline_clip_tokenizer()).save_pretrained(directory)
    return str(directory)


def test_temporal_consistency_is_the_mean_clip_similarity_of_consecutive_frames(tiny_clip_dir):
    import numpy as np
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    videos = random_videos(batch=2, frames=3, size=40, seed=7)
    videos[1, 2] = videos[1, 1]  # the last two frames of video 1 are equal: that pair's similarity is 1
    reward = get_reward("temporal_consistency", model=tiny_clip_dir, batch_size=4)
    scores = call_reward(reward, videos, ["a", "b"], name="temporal_consistency")
    # the formula, on PIL frames through the CLIP processor
    model, processor = CLIPModel.from_pretrained(tiny_clip_dir).eval(), CLIPProcessor.from_pretrained(tiny_clip_dir)
    frames = [Image.fromarray((frame.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
              for frame in videos.flatten(0, 1)]
    with torch.no_grad():
        pixels = processor(images=frames, return_tensors="pt").pixel_values
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        embeddings = model.visual_projection(pooled).unflatten(0, (2, 3))
    cos = torch.nn.functional.cosine_similarity
    expected = torch.stack([(cos(e[0], e[1], dim=0) + cos(e[1], e[2], dim=0)) / 2 for e in embeddings])
    torch.testing.assert_close(scores, expected, atol=2e-3, rtol=1e-3)
    assert scores.abs().max() <= 1 and not torch.allclose(scores, torch.ones(2), atol=1e-3)
    still = videos[:, :1].expand(-1, 3, -1, -1, -1)
    torch.testing.assert_close(reward(still, ["a", "b"]), torch.ones(2), atol=1e-5, rtol=0)
    with pytest.raises(RewardError, match="is video-native"):
        call_reward(reward, videos[:, 0], ["a", "b"], name="temporal_consistency")
    with pytest.raises(RewardError, match="compares consecutive frames; the videos have 1"):
        call_reward(reward, videos[:, :1], ["a", "b"], name="temporal_consistency")
