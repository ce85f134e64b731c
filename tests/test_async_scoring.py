"""Asynchronous scoring (`reward_async`): the reward of a sampled chunk runs while the next chunk samples, gives the
synchronous scores bit for bit, fails with the same one line, and hides a remote reward's latency."""

import copy
import json
import threading
import time
from contextlib import contextmanager

import pytest
import torch

from cli_helpers import TINY_RUN, one_line
from diffalign.cli import main
from diffalign.config import DDPOConfig
from diffalign.rewards import RewardError
from diffalign.rewards.scoring import RewardScorer
from diffalign.rewards.serve import make_server
from diffalign.trainers import DDPOTrainer


class ConvReward:
    """A small random conv net: real torch work in the reward thread while the sampler runs its own."""

    def __init__(self):
        torch.manual_seed(5)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 1))
        self.threads = []

    def __call__(self, images, prompts, metadata=None):
        self.threads.append(threading.current_thread().name)
        return self.net(images.float()).squeeze(1)


def failing_reward(images, prompts, metadata=None):
    raise ValueError("boom\nsecond line")


def tiny_config(tmp_path, name, **overrides):
    settings = dict(model="unused", output_dir=str(tmp_path / name), prompts=["a cat", "a dog"], num_epochs=2,
                    sample_num_steps=2, sample_num_prompts_per_epoch=2, sample_images_per_prompt=3,
                    sample_batch_size=2, grid_num_images=1, train_batch_size=3, advantage_mode="group",
                    final_eval_num_images=0)
    settings.update(overrides)
    return DDPOConfig(**settings)


def test_async_scoring_gives_the_synchronous_run_bit_for_bit(tmp_path, tiny_pipe):
    """Two epochs of 6 samples in chunks of 2 (groups of 3 cut by the chunks): rewards, losses and weights equal."""
    runs = {}
    for asynchronous in (True, False):
        reward = ConvReward()
        trainer = DDPOTrainer(tiny_config(tmp_path, f"run-{asynchronous}", reward_async=asynchronous),
                              pipeline=copy.deepcopy(tiny_pipe), reward_fn=reward)
        metrics = [trainer.step(epoch) for epoch in range(2)]
        weights = [p.detach().clone() for p in trainer.trainable_params]
        runs[asynchronous] = (metrics, weights, reward.threads)
    (metrics_a, weights_a, threads_a), (metrics_s, weights_s, threads_s) = runs[True], runs[False]
    for a, s in zip(metrics_a, metrics_s):
        for key in ("reward_mean", "reward_std", "reward_min", "reward_max", "loss", "grad_norm"):
            assert a[key] == s[key], key
    assert all(torch.equal(a, s) for a, s in zip(weights_a, weights_s))
    assert len(threads_a) == len(threads_s) == 6  # 3 chunks x 2 epochs, one call each
    assert all(name.startswith("diffalign-reward") for name in threads_a)
    assert set(threads_s) == {threading.main_thread().name}


def test_the_reward_of_a_chunk_runs_while_the_next_chunk_samples(tmp_path, tiny_pipe, monkeypatch):
    """The first chunk's reward waits until the second chunk has started sampling: it can only return if the two
    run at the same time."""
    import diffalign.trainers.evaluation as evaluation

    started = []
    second_chunk_started = threading.Event()
    sample = evaluation.sample_trajectories

    def recording_sample(*args, **kwargs):
        started.append(time.perf_counter())
        if len(started) == 2:
            second_chunk_started.set()
        return sample(*args, **kwargs)

    monkeypatch.setattr(evaluation, "sample_trajectories", recording_sample)
    waited = []

    def patient_reward(images, prompts, metadata=None):
        if not waited:
            waited.append(second_chunk_started.wait(timeout=20))
        return images.mean(dim=(1, 2, 3))

    trainer = DDPOTrainer(tiny_config(tmp_path, "run", num_epochs=1), pipeline=tiny_pipe, reward_fn=patient_reward)
    metrics = trainer.step(0)
    assert waited == [True]
    assert metrics["time_reward_calls"] > 0 and metrics["time_reward"] >= 0


@pytest.mark.parametrize("asynchronous", [True, False])
def test_a_failing_reward_is_the_same_one_line(asynchronous, tiny_model_dir, tmp_path, capsys):
    code = main(["train", "ddpo", "--model", tiny_model_dir, "--output_dir", str(tmp_path / "run"),
                 "--num_epochs", "1", "--sample_batch_size", "1", "--reward_async", str(asynchronous).lower(),
                 *TINY_RUN, "--reward", "test_async_scoring:failing_reward"])
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert line == "diffalign: error: reward 'test_async_scoring:failing_reward' failed: ValueError: boom"


def test_an_error_stops_the_sampling_at_the_next_chunk(tmp_path, tiny_pipe):
    calls = []

    def wrong_count(images, prompts, metadata=None):
        calls.append(len(images))
        return torch.zeros(len(images) + 1)

    trainer = DDPOTrainer(tiny_config(tmp_path, "run", sample_batch_size=1), pipeline=tiny_pipe, reward_fn=wrong_count)
    with pytest.raises(RewardError, match=r"returned shape \[2\] for 1 images"):
        trainer.step(0)
    assert len(calls) < 6  # raised while the epoch was still sampling, not after its 6 samples


# ------------------------------------------------------------------------------------------ remote, latency
@contextmanager
def serving(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/score"
    finally:
        server.shutdown()
        server.server_close()


class _Chunk:
    def __init__(self, images, prompts, group_ids):
        self.images, self.prompts, self.group_ids = images, prompts, group_ids

    def __len__(self):
        return len(self.prompts)


def test_remote_calls_overlap_and_keep_their_order_and_parts():
    """8 images in 4 chunks to a server that answers after 0.4 s: the asynchronous scoring has the calls in flight
    together (about one latency in all, not four) and returns the synchronous scores and parts, in order."""
    from diffalign.rewards import get_reward

    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    images[::2] *= torch.linspace(0, 1, 16)  # distinct JPEG sizes
    prompts, groups = [f"p{i}" for i in range(8)], torch.arange(8)
    mixture = {"jpeg_compressibility": 2.0, "jpeg_incompressibility": 1.0}
    with serving(make_server(mixture, port=0, device="cpu", latency=0.4)) as url:
        reward = get_reward("remote", url=url, retries=0)
        results, walls = {}, {}
        for asynchronous in (True, False):
            scorer = RewardScorer(reward, "remote", asynchronous=asynchronous)
            assert scorer.workers == 4
            start = time.perf_counter()
            scoring = scorer.epoch(None)
            for first in range(0, 8, 2):
                scoring.add(_Chunk(images[first:first + 2], prompts[first:first + 2], groups[first:first + 2]))
            results[asynchronous] = scoring.finish(_Chunk(images, prompts, groups))
            walls[asynchronous] = time.perf_counter() - start
    assert set(results[True]) == {"reward", "reward_jpeg_compressibility", "reward_jpeg_incompressibility"}
    for key, value in results[False].items():
        assert torch.equal(results[True][key], value), key
    assert torch.equal(results[True]["reward"], get_reward(mixture)(images, prompts))
    assert walls[False] >= 4 * 0.4 and walls[True] < walls[False] * 0.75, walls


def test_a_bad_latency_is_one_line():
    from diffalign.rewards.serve import ServeError

    with pytest.raises(ServeError, match="--latency must be a finite number of seconds >= 0"):
        make_server("jpeg_compressibility", port=0, device="cpu", latency=-1)


def test_bench_train_with_a_reward_latency(capsys, tmp_path):
    output = tmp_path / "bench.json"
    assert main(["bench", "train", "--tiny", "--steps", "2", "--batch-size", "2", "--repeats", "1", "--threads", "1",
                 "--algorithms", "ddpo", "--prompts-per-epoch", "2", "--images-per-prompt", "2",
                 "--reward-latency", "0.3", "--output", str(output)]) == 0
    table = capsys.readouterr().out
    result = json.loads(output.read_text())
    figures = result["figures"]
    for name in ("ddpo_epoch_s", "ddpo_async_epoch_s", "ddpo_sync_epoch_s", "ddpo_async_over_no_latency",
                 "ddpo_sync_over_no_latency", "ddpo_async_reward_wait_s"):
        assert figures[name]["value"] > 0 and name in table
    times = result["details"]["ddpo"]["times"]
    assert result["details"]["ddpo"]["chunks_per_epoch"] == 2
    # synchronously the epoch waits for both calls (2 x 0.3 s); the calls themselves take the latency each
    assert times["sync"]["time_reward"][0] >= 0.6
    assert min(times["async"]["time_reward_calls"][0], times["sync"]["time_reward_calls"][0]) >= 0.6
    assert result["settings"]["reward_latency"] == 0.3
