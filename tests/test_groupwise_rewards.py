"""Groupwise rewards: Pref-GRPO's win rates, the protocol (group ids through `call_reward`, mixtures, the metadata),
`pickscore_rank` on a tiny random CLIP, and every trainer handing them whole groups of one prompt."""

import itertools
import json

import pytest
import torch

from diffalign.rewards import (GroupwiseReward, RewardError, call_reward, get_reward, group_ids_for, is_groupwise)
from diffalign.rewards.groupwise import group_win_rates, pairwise_wins
from diffalign.rewards.scoring import RewardScorer, contiguous_groups_end


# ------------------------------------------------------------------------------------------------ the win rate
def test_win_rates_equal_a_hand_computation():
    # group 0: 3 beats everyone (3/3); 1 loses to everyone (0/3); each 2 beats 1, ties the other 2, loses to 3:
    # (1 + 0.5) / 3. Group 1 is one image (no comparison: 0.5). Group 2 (not contiguous): 7 < 9.
    scores = torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, 9.0, 7.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    rates = group_win_rates(scores, groups)
    assert rates.dtype == torch.float32
    assert rates.tolist() == [1.0, 0.0, 0.5, 0.5, 0.5, 1.0, 0.0]
    rates = group_win_rates(torch.tensor([0.3, 0.1, 0.2, 0.9, 0.9, 0.8]), torch.tensor([4, 4, 4, 8, 8, 8]))
    assert rates.tolist() == pytest.approx([1.0, 0.0, 0.5, 0.75, 0.75, 0.0])


def pref_grpo_win_rates(scores, groups):
    """Pref-GRPO's `cal_win_rate` counting (CodeGoat24/Pref-GRPO, fastvideo/train_flux_pref_grpo.py): every pair of a
    group compared once, the winner gets 1, an undecided comparison 0.5 each; win rate = wins / comparisons (their
    3-decimal rounding left out). Here a judge prefers the higher score and finds equal scores undecided."""
    rates = {}
    for group in sorted(set(groups)):
        members = [i for i, g in enumerate(groups) if g == group]
        wins = {i: 0.0 for i in members}
        compared = {i: 0 for i in members}
        for i, j in itertools.combinations(members, 2):
            compared[i] += 1
            compared[j] += 1
            if scores[i] > scores[j]:
                wins[i] += 1
            elif scores[j] > scores[i]:
                wins[j] += 1
            else:
                wins[i] += 0.5
                wins[j] += 0.5
        for i in members:
            rates[i] = wins[i] / compared[i] if compared[i] else 0.5
    return [rates[i] for i in range(len(scores))]


def test_win_rates_follow_pref_grpos_pairwise_counting_on_random_groups():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (60,), generator=generator).float()  # many ties
    groups = torch.randint(0, 9, (60,), generator=generator)
    rates = group_win_rates(scores, groups)
    assert rates.tolist() == pytest.approx(pref_grpo_win_rates(scores.tolist(), groups.tolist()), abs=1e-6)
    for group in groups.unique():  # wins and losses balance: a group's rates average 1/2
        assert rates[groups == group].mean().item() == pytest.approx(0.5)


def test_a_nan_score_gives_a_nan_win_rate_and_half_a_win_to_the_others():
    wins = pairwise_wins(torch.tensor([1.0, float("nan"), 0.0]))
    assert wins.tolist() == [[0.0, 0.5, 1.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.0]]
    rates = group_win_rates(torch.tensor([1.0, float("nan"), 0.0]), torch.tensor([0, 0, 0]))
    assert rates[0].item() == 0.75 and rates[1].isnan() and rates[2].item() == 0.25


# ------------------------------------------------------------------------------------------------ the protocol
class Recording(GroupwiseReward):
    """A groupwise reward that records each call's prompts and group ids and scores each image by its brightness
    rank in its group."""

    def __init__(self):
        self.calls = []

    def score_groups(self, images, prompts, metadata, group_ids):
        self.calls.append((list(prompts), group_ids.tolist(), [row.get("group_id") for row in metadata or []]))
        return group_win_rates(images.mean(dim=(1, 2, 3)).cpu(), group_ids)


def test_group_ids_come_from_the_argument_else_the_metadata_else_equal_prompts():
    prompts = ["a", "a", "b", "a"]
    assert group_ids_for(prompts).tolist() == [0, 0, 1, 0]
    assert group_ids_for(prompts, [{"group_id": 5}, {"group_id": 5}, {"group_id": 6}, {"group_id": 7}]).tolist() == [
        5, 5, 6, 7]
    assert group_ids_for(prompts, None, [1, 1, 2, 3]).tolist() == [1, 1, 2, 3]
    with pytest.raises(RewardError, match="group 1 mixes the prompts 'a' and 'b'"):
        group_ids_for(prompts, None, [1, 1, 1, 2])
    with pytest.raises(RewardError, match="4 integers"):
        group_ids_for(prompts, None, [1.0, 1.0, 2.0, 3.0])
    with pytest.raises(RewardError, match="4 integers"):
        group_ids_for(prompts, None, [1, 1])


def test_call_reward_hands_the_group_ids_to_groupwise_rewards_and_mixtures():
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts = ["a", "a", "b", "b"]
    reward = Recording()
    assert is_groupwise(reward) and not is_groupwise(lambda i, p, m: i)
    rates = call_reward(reward, images, prompts, None, group_ids=torch.tensor([3, 3, 4, 4]))
    assert reward.calls[-1][1] == [3, 3, 4, 4]
    assert sorted(rates[:2].tolist()) == [0.0, 1.0] and sorted(rates[2:].tolist()) == [0.0, 1.0]

    from diffalign.rewards import REWARDS, RewardMixture, register_reward

    register_reward("recording_test")(lambda: reward)
    try:
        mixture = RewardMixture({"recording_test": 2.0, "jpeg_compressibility": 0.0})
    finally:
        REWARDS.pop("recording_test")
    assert is_groupwise(mixture)
    total = call_reward(mixture, images, prompts, None, group_ids=torch.tensor([8, 8, 9, 9]))
    assert reward.calls[-1][1] == [8, 8, 9, 9]
    assert torch.equal(total, 2.0 * mixture.last_parts["recording_test"])
    assert not is_groupwise(RewardMixture({"jpeg_compressibility": 1.0}))


def test_scoring_in_chunks_hands_whole_groups_and_gives_the_one_call_scores():
    """Chunks of 3 over groups of 2: the last group of a chunk waits for the next chunk (it may go on there), unless
    it is known whole (`group_size`); the scores are those of one call on the whole batch, synchronously and in the
    background thread alike."""
    from types import SimpleNamespace

    images = torch.rand(9, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    prompts = ["p0", "p0", "p1", "p1", "p2", "p2", "p0", "p0", "p3"]
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4])  # the same prompt in two slots is two groups
    whole = Recording()
    expected = RewardScorer(whole, "recording").score(images, prompts, None, groups)["reward"]
    for asynchronous in (False, True):
        reward = Recording()
        scoring = RewardScorer(reward, "recording", asynchronous=asynchronous).epoch(None)
        for start in range(0, 9, 3):
            scoring.add(SimpleNamespace(images=images[start:start + 3], prompts=prompts[start:start + 3],
                                        group_ids=groups[start:start + 3]))
        scores = scoring.finish(_Batch(images, prompts, groups))
        assert torch.equal(scores["reward"], expected)
        assert [call[1] for call in reward.calls] == [[0, 0], [1, 1], [2, 2, 3, 3], [4]]
        assert [call[2] for call in reward.calls] == [call[1] for call in reward.calls]  # metadata group_id too
    assert contiguous_groups_end([0, 0, 1]) == 2 and contiguous_groups_end([0, 0]) == 0
    assert contiguous_groups_end([0, 0, 1, 1], group_size=2) == 4 and contiguous_groups_end([0, 0, 1], 2) == 2


class _Batch:
    def __init__(self, images, prompts, group_ids):
        self.images, self.prompts, self.group_ids = images, prompts, group_ids

    def __len__(self):
        return len(self.prompts)


def test_a_group_split_across_processes_is_one_line():
    reward = Recording()
    images = torch.rand(3, 3, 8, 8)
    scoring = RewardScorer(reward, "recording", asynchronous=False).epoch(None, group_size=2)
    with pytest.raises(RewardError, match="group 1 has 1 samples on this process, not 2"):
        scoring.finish(_Batch(images, ["a", "a", "b"], torch.tensor([0, 0, 1])))


# ------------------------------------------------------------------------------------------- pickscore_rank
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random `CLIPModel` + `CLIPProcessor`, as tests/test_rewards.py builds it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffalign.testing import tiny_clip_text_kwargs
    from diffalign.tokenization import offline_clip_tokenizer

    directory = tmp_path_factory.mktemp("tiny_clip")
    vision_config = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         image_size=224, patch_size=32)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=tiny_clip_text_kwargs(), vision_config=vision_config, projection_dim=16,
                        logit_scale_init_value=3.0)
    CLIPModel(config).save_pretrained(directory)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=offline_clip_tokenizer()).save_pretrained(directory)
    return str(directory)


def test_pickscore_rank_is_the_win_rate_of_pickscore(clip_dir):
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    prompts = ["a cat"] * 3 + ["a dog"] * 3
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    pickscore = get_reward("pickscore", model=clip_dir, processor=clip_dir)(images, prompts)
    reward = get_reward("pickscore_rank", model=clip_dir, processor=clip_dir)
    assert is_groupwise(reward)
    rates = call_reward(reward, images, prompts, None, group_ids=groups)
    assert torch.equal(rates, group_win_rates(pickscore, groups))
    assert sorted(rates[:3].tolist()) == [0.0, 0.5, 1.0]
    assert torch.equal(reward.last_parts["pickscore"], pickscore)
    generic = get_reward("win_rate", reward="pickscore", reward_kwargs={"model": clip_dir, "processor": clip_dir})
    assert torch.equal(call_reward(generic, images, prompts, None, group_ids=groups), rates)
    with pytest.raises(RewardError, match="already groupwise"):
        get_reward("win_rate", reward="pickscore_rank", reward_kwargs={"model": clip_dir, "processor": clip_dir})


# ------------------------------------------------------------------------------------------------ the trainers
@pytest.mark.parametrize("algorithm", ["ddpo", "prdp", "nft"])
def test_every_trainer_hands_whole_groups_of_one_prompt(algorithm, tmp_path, tiny_pipe):
    """3 prompts x 2 images in chunks of 3: every call of the groupwise reward holds whole groups (a group cut by a
    chunk waits for its second image), each of one prompt, and the epoch's rewards are their win rates."""
    from diffalign.trainers import CONFIG_CLASSES, trainer_class

    per_step = {"prdp": {"train_prompts_per_step": 1}}.get(algorithm, {"train_batch_size": 3})
    per_step["train_num_inner_epochs"] = 1
    config = CONFIG_CLASSES[algorithm](
        model="unused", output_dir=str(tmp_path / "run"), prompts=["a cat", "a dog", "a red car"], num_epochs=1,
        sample_num_steps=2, sample_num_prompts_per_epoch=3, sample_images_per_prompt=2, sample_batch_size=3,
        grid_num_images=1, **per_step)
    reward = Recording()
    trainer = trainer_class(algorithm)(config, pipeline=tiny_pipe, reward_fn=reward)
    metrics = trainer.step(0)
    assert [call[1] for call in reward.calls] == [[0, 0], [1, 1, 2, 2]]
    for prompts, group_ids, _ in reward.calls:
        assert len(group_ids) % 2 == 0
        for group in set(group_ids):
            members = [p for p, g in zip(prompts, group_ids) if g == group]
            assert len(members) == 2 and len(set(members)) == 1
    assert metrics["reward_mean"] == pytest.approx(0.5)  # win rates of pairs: one 1 and one 0 (or two ties)


def test_a_tiny_run_trains_with_pickscore_rank(clip_dir, tiny_model_dir, tmp_path):
    from cli_helpers import TINY_RUN
    from diffalign.cli import main

    run = tmp_path / "run"
    args = list(TINY_RUN)
    args[args.index("--reward") + 1] = "pickscore_rank"
    code = main(["train", "ddpo", "--model", tiny_model_dir, "--output_dir", str(run), "--num_epochs", "2",
                 "--sample_batch_size", "1", "--reward_kwargs", json.dumps({"model": clip_dir, "processor": clip_dir}),
                 *args])
    assert code == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        assert record["reward_mean"] == pytest.approx(0.5) and record["reward_max"] == 1.0  # 2 images per prompt
        assert "reward_pickscore_mean" in record and record["grad_norm"] > 0
    assert (run / "final" / "pytorch_lora_weights.safetensors").exists()


# ------------------------------------------------------------------------------------------- two processes
class FileRecording(GroupwiseReward):
    """Brightness win rates; each call's prompts, group ids and rewards appended to a file of this process."""

    def score_groups(self, images, prompts, metadata, group_ids):
        import os

        rates = group_win_rates(images.float().mean(dim=(1, 2, 3)).cpu(), group_ids)
        path = os.path.join(os.environ["GROUPWISE_RECORD_DIR"], f"rank-{os.environ.get('RANK', '0')}.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps({"prompts": list(prompts), "group_ids": group_ids.tolist(),
                                "rewards": rates.tolist()}) + "\n")
        return rates


def recording_factory(tag: str = "x"):
    """`test_groupwise_rewards:recording_factory` with `reward_kwargs` (a factory then), for the launched runs."""
    return FileRecording()


@pytest.mark.slow  # two accelerate launches: a minute or more on a shared 2-core machine
def test_two_processes_rank_the_groups_as_one_process(tiny_model_dir, tmp_path):
    """Epoch 0 on 2 processes (4 prompts x 2 images, chunks of 3: a group cut by a chunk on each) and on 1: every
    group is whole on one process, of one prompt, and gets the same win rates."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    records = {}
    for processes in (2, 1):
        out = tmp_path / f"p{processes}"
        out.mkdir()
        env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   GROUPWISE_RECORD_DIR=str(out), PYTHONPATH=os.pathsep.join(
                       [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if processes > 1:
            launch.insert(3, "--multi_gpu")
        args = ["ddpo", "--model", tiny_model_dir, "--output_dir", str(out / "run"), "--num_epochs", "1",
                "--prompts", "[a cat, a dog, a bird, a fish]", "--sample_num_steps", "2",
                "--sample_num_prompts_per_epoch", "4", "--sample_images_per_prompt", "2", "--sample_batch_size", "3",
                "--grid_num_images", "1", "--reward", "test_groupwise_rewards:recording_factory",
                "--reward_kwargs", "{tag: x}", "--seed", "3", "--train_batch_size", "2", "--advantage_mode", "group",
                "--final_eval_num_images", "0"]
        result = subprocess.run(launch + [os.path.join(here, "distributed_run.py")] + args, env=env,
                                capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stderr[-4000:]
        groups = {}
        for rank in range(processes):
            for line in (out / f"rank-{rank}.jsonl").read_text().splitlines()[: {2: 2, 1: 3}[processes]]:
                call = json.loads(line)  # the epoch's calls (the grid's come after)
                for prompt, group, reward in zip(call["prompts"], call["group_ids"], call["rewards"]):
                    assert groups.setdefault(group, {"rank": rank, "prompt": prompt, "rewards": []})["rank"] == rank
                    assert groups[group]["prompt"] == prompt
                    groups[group]["rewards"].append(reward)
        records[processes] = groups
    assert sorted(records[2]) == sorted(records[1]) == [0, 1, 2, 3]
    assert {g["rank"] for g in records[2].values()} == {0, 1}
    for group in range(4):
        assert len(records[2][group]["rewards"]) == 2
        assert records[2][group]["prompt"] == records[1][group]["prompt"]
        assert records[2][group]["rewards"] == records[1][group]["rewards"]
