"""Condition videos in prompt files (`video` / `videos`, Flow-Factory's convention): paths relative to the file,
checked when the file is read (a missing or unreadable video is one line, exit 2), carried by the prompt
(`ConditionedPrompt.condition_videos`) and to the reward as `metadata["video"]`; no diffalign family takes videos yet,
so a run refuses such a file in one line when it starts."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.checkpoint import join_state, split_state
from diffalign.errors import PromptError, UserError
from diffalign.prompts import (ConditionedPrompt, check_condition_prompts, condition_images_of, condition_videos_of,
                               load_condition_video, prompt_key, prompt_source, read_prompt_records)


def _frames(seed: int, count: int = 3):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(count)]


def _write_gif(path, seed=0):
    frames = [Image.fromarray(frame) for frame in _frames(seed)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return str(path)


def _write_mp4(path, seed=0):
    import imageio

    with imageio.get_writer(str(path), fps=8, macro_block_size=16) as writer:
        for frame in _frames(seed):
            writer.append_data(frame)
    return str(path)


def _prompt_file(tmp_path, rows, name="train.jsonl"):
    path = tmp_path / "clips" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_prompt_file_carries_condition_videos_relative_to_it_to_the_reward(tmp_path):
    (tmp_path / "clips" / "in").mkdir(parents=True)
    gif = _write_gif(tmp_path / "clips" / "in" / "a.gif")
    mp4 = _write_mp4(tmp_path / "clips" / "in" / "b.mp4", seed=1)
    path = _prompt_file(tmp_path, [
        {"prompt": "make it snow", "video": "in/a.gif", "tag": "weather"},
        {"prompt": "slow it down", "videos": ["in/b.mp4", "in/a.gif"]},
    ])
    prompts, metadata = read_prompt_records(path)
    assert [condition_videos_of(p) for p in prompts] == [(gif,), (mp4, gif)]
    assert [condition_images_of(p) for p in prompts] == [(), ()]
    assert metadata == [{"video": gif, "tag": "weather"}, {"videos": [mp4, gif]}]
    # a run's prompt source hands the reward each prompt's metadata: the video's absolute path
    source = prompt_source(prompt_file=path)
    prompt, meta = source.grid_items(1, seed=0)[0]
    assert condition_videos_of(prompt) == (gif,) and meta["video"] == gif
    frames = load_condition_video(meta["video"])  # what a video-to-video reward compares with the output
    assert frames.shape == (3, 3, 16, 16) and frames.dtype == torch.float32
    expected = torch.from_numpy(np.stack(_frames(0)).astype(np.float32) / 255).permute(0, 3, 1, 2)
    torch.testing.assert_close(frames, expected, atol=0.1, rtol=0)  # a GIF's palette rounds the colours
    assert load_condition_video(mp4).shape[:2] == (3, 3)

    csv_path = tmp_path / "clips" / "train.csv"
    csv_path.write_text("prompt,video\nmake it snow,in/a.gif\na plain prompt,\n")
    prompts, metadata = read_prompt_records(str(csv_path))
    assert [condition_videos_of(p) for p in prompts] == [(gif,), ()] and metadata[1] == {}


def test_video_prompts_differ_by_their_videos_and_survive_a_checkpoint(tmp_path):
    a, b = ConditionedPrompt("x", (), ("/a.mp4",)), ConditionedPrompt("x", (), ("/b.mp4",))
    image = ConditionedPrompt("x", ("/a.png",))
    assert a != b and a != "x" and len({a, b, image, "x"}) == 4
    assert prompt_key(a) == ("x", (), ("/a.mp4",)) and prompt_key(image) == ("x", ("/a.png",))
    assert hash(image) == hash(("x", ("/a.png",)))  # an image prompt hashes as before videos existed
    assert pickle.loads(pickle.dumps(a)) == a
    tensors = {}
    back = join_state(split_state({a: [1.0], image: [2.0]}, tensors), tensors)
    assert list(back) == [a, image] and condition_videos_of(list(back)[0]) == ("/a.mp4",)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "x", "video": "missing.mp4"}, "condition video '.*missing.mp4' does not exist"),
    ({"prompt": "x", "video": "bad.mp4"}, "condition video '.*bad.mp4' is not a readable video"),
    ({"prompt": "x", "video": "in"}, "condition video '.*in' is a directory"),
    ({"prompt": "x", "video": ""}, "'video' must be a non-empty path"),
    ({"prompt": "x", "videos": "a.mp4"}, "'videos' must be a non-empty list of paths"),
    ({"prompt": "x", "video": "a.mp4", "videos": ["a.mp4"]}, "has both 'video' and 'videos'"),
], ids=["missing", "unreadable", "directory", "empty", "videos-not-a-list", "both"])
def test_bad_condition_videos_are_one_line(tmp_path, row, message):
    path = _prompt_file(tmp_path, [row])
    (tmp_path / "clips" / "bad.mp4").write_bytes(b"not a video")
    (tmp_path / "clips" / "in").mkdir()
    with pytest.raises(PromptError, match=message) as error:
        read_prompt_records(path)
    assert "row 1" in str(error.value) and "\n" not in str(error.value) and isinstance(error.value, UserError)


def test_a_family_without_videos_refuses_them():
    prompt = ConditionedPrompt("make it snow", (), ("/a.mp4",))
    with pytest.raises(PromptError, match="has 1 condition video.*takes no condition videos"):
        check_condition_prompts([prompt], "wan_i2v", 1)
    check_condition_prompts([prompt], "a video-to-video model", 0, max_videos=1)


def test_a_run_refuses_a_video_prompt_file_in_one_line(tiny_model_dir, tmp_path, capsys):
    from diffalign.cli import main

    model = tiny_model_dir
    (tmp_path / "clips").mkdir()
    _write_gif(tmp_path / "clips" / "a.gif")
    path = _prompt_file(tmp_path, [{"prompt": "make it snow", "video": "a.gif"}])
    capsys.readouterr()
    assert main(["train", "ddpo", "--model", model, "--output_dir", str(tmp_path / "run"), "--prompt_file", path,
                 "--sample_resolution", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes no condition videos" in err[0], err
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
