"""Prompt files as JSONL/CSV with per-prompt metadata, `datasets` prompt datasets, and the metadata's way to the
reward."""

import copy
import json
import sys
import types

import pytest
import torch

from diffalign.config import ConfigError, DDPOConfig
from diffalign.prompts import PromptError, PromptSource, prompt_source, read_prompt_dataset, read_prompt_records
from diffalign.trainers import DDPOTrainer

# Flow-GRPO's GenEval metadata format (dataset/geneval/train_metadata.jsonl)
GENEVAL = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "two_object", "include": [{"class": "cow", "count": 1}, {"class": "bird", "count": 1}],
     "prompt": "a photo of a cow and a bird"},
    {"tag": "counting", "include": [{"class": "cat", "count": 3}], "exclude": [{"class": "cat", "count": 4}],
     "prompt": "a photo of three cats"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_geneval_jsonl_rows_become_prompts_and_metadata(tmp_path):
    prompts, metadata = read_prompt_records(write_jsonl(tmp_path / "geneval.jsonl", GENEVAL))
    assert prompts == [row["prompt"] for row in GENEVAL]
    assert metadata == [{k: v for k, v in row.items() if k != "prompt"} for row in GENEVAL]


def test_csv_rows_and_a_named_prompt_column(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text('text,digit,note\n"a handwritten digit, seven",7,x\n\nthe number two,2,"y, z"\n')
    prompts, metadata = read_prompt_records(str(path), column="text")
    assert prompts == ["a handwritten digit, seven", "the number two"]
    assert metadata == [{"digit": "7", "note": "x"}, {"digit": "2", "note": "y, z"}]


def test_text_files_keep_their_format(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# animals\na cat\n\na dog\n")
    assert read_prompt_records(str(path)) == (["a cat", "a dog"], [{}, {}])


@pytest.mark.parametrize("name, content, match", [
    ("a.jsonl", '{"prompt": "a cat"}\n{"prompt": "a dog"\n', "line 2 is not valid JSON"),
    ("a.jsonl", '["a cat"]\n', "line 1 is not a JSON object"),
    ("a.jsonl", '{"text": "a cat", "tag": "x"}\n', r"line 1 has no 'prompt' field \(fields: text, tag\)"),
    ("a.jsonl", '{"prompt": ""}\n', "'prompt' must be a non-empty string"),
    ("a.jsonl", '{"prompt": 3}\n', "'prompt' must be a non-empty string"),
    ("a.jsonl", '{"prompt": "a cat", "group_id": 1}\n', "'group_id' field, which is reserved"),
    ("a.jsonl", "\n\n", "has no prompts"),
    ("a.csv", "text,tag\na cat,x\n", r"no 'prompt' column \(columns: text, tag\)"),
    ("a.csv", "prompt,tag\na cat,x,extra\n", "line 2 has more cells than the header"),
    ("a.csv", "prompt,tag\n,x\n", "'prompt' must be a non-empty string"),
    ("a.csv", "", "has no prompts"),
])
def test_bad_prompt_files_are_one_line(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PromptError, match=match) as info:
        read_prompt_records(str(path))
    assert "\n" not in str(info.value)


def test_prompt_function_may_return_metadata_as_ddpo_pytorch():
    source = PromptSource(fn=lambda: ("a cat", {"animal": "cat"}))
    assert source.epoch_items(0, 2, seed=0) == [("a cat", {"animal": "cat"})] * 2
    assert source.epoch_prompts(0, 1, seed=0) == ["a cat"]


def test_list_draws_are_unchanged_by_metadata():
    # the draws of a plain list are those of earlier versions (seeded runs reproduce)
    plain = PromptSource(prompts=["a", "b", "c", "d"])
    tagged = PromptSource(prompts=["a", "b", "c", "d"], metadata=[{"i": i} for i in range(4)])
    for epoch in range(3):
        items = tagged.epoch_items(epoch, 3, seed=7)
        assert [p for p, _ in items] == plain.epoch_prompts(epoch, 3, seed=7)
        assert all(meta["i"] == "abcd".index(p) for p, meta in items)


# ----------------------------------------------------------------------------------------------- datasets
datasets = pytest.importorskip("datasets")


@pytest.fixture
def geneval_dataset(tmp_path):
    path = tmp_path / "geneval_ds"
    test_rows = [{"tag": "single_object", "include": [{"class": "zebra", "count": 1}], "exclude": None,
                  "prompt": "a photo of a zebra"}]
    train_rows = [{**row, "exclude": row.get("exclude")} for row in GENEVAL]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train_rows),
                          "test": datasets.Dataset.from_list(test_rows)}).save_to_disk(str(path))
    return str(path)


def test_dataset_saved_to_disk_gives_prompts_and_metadata(geneval_dataset):
    prompts, metadata = read_prompt_dataset(geneval_dataset, "train")
    assert prompts == [row["prompt"] for row in GENEVAL]
    assert metadata[1]["include"] == GENEVAL[1]["include"] and metadata[0]["tag"] == "single_object"
    assert read_prompt_dataset(geneval_dataset, "test")[0] == ["a photo of a zebra"]


def test_dataset_from_data_files(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", GENEVAL)
    assert read_prompt_dataset(str(folder), "train")[0] == [row["prompt"] for row in GENEVAL]
    single = write_jsonl(tmp_path / "one.jsonl", GENEVAL[:2])
    source = prompt_source(prompt_dataset=single)
    assert source.prompts == [GENEVAL[0]["prompt"], GENEVAL[1]["prompt"]]
    assert source.metadata[1]["tag"] == "two_object"


def test_bad_datasets_are_one_line(tmp_path, geneval_dataset, monkeypatch):
    with pytest.raises(PromptError, match="does not exist .*the hub is not used"):
        read_prompt_dataset(str(tmp_path / "missing"))
    with pytest.raises(PromptError, match=r"has no split 'validation' \(splits: train, test\)"):
        read_prompt_dataset(geneval_dataset, "validation")
    with pytest.raises(PromptError, match=r"has no 'caption' column \(columns: tag, include, (prompt, exclude|exclude, prompt)\)"):
        read_prompt_dataset(geneval_dataset, "train", column="caption")
    # datasets itself cannot load an empty dataset from disk (a one-line error then); one in memory is refused too
    empty = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": []})})
    monkeypatch.setattr(datasets, "load_from_disk", lambda path: empty)
    with pytest.raises(PromptError, match="split 'train' is empty"):
        read_prompt_dataset(geneval_dataset)
    monkeypatch.undo()
    unsplit = tmp_path / "unsplit"
    datasets.Dataset.from_list(GENEVAL).save_to_disk(str(unsplit))
    assert len(read_prompt_dataset(str(unsplit))[0]) == 3  # a dataset without splits trains whole
    with pytest.raises(PromptError, match="has no splits"):
        read_prompt_dataset(str(unsplit), "test", whole=False)
    (tmp_path / "x.txt").write_text("a cat\n")
    with pytest.raises(PromptError, match="not a dataset directory"):
        read_prompt_dataset(str(tmp_path / "x.txt"))


def test_missing_datasets_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(PromptError, match=r"pip install 'diffalign\[datasets\]'"):
        read_prompt_dataset(str(tmp_path))


def test_config_checks_the_prompt_sources():
    with pytest.raises(ConfigError, match="only one of prompts, prompt_file, prompt_fn, prompt_dataset"):
        DDPOConfig(prompt_file="a.jsonl", prompt_dataset="ds").validate()
    with pytest.raises(ConfigError, match="eval_dataset_split is a split of prompt_dataset"):
        DDPOConfig(eval_dataset_split="test").validate()
    with pytest.raises(ConfigError, match="prompt_column must be a non-empty name"):
        DDPOConfig(prompt_column=" ").validate()


# ------------------------------------------------------------------------------------------- to the reward
class RecordingReward:
    """Brightness, recording the (prompt, metadata) pairs it is handed."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, prompts, metadata=None):
        self.calls.append(list(zip(prompts, metadata)))
        return images.mean(dim=(1, 2, 3)).float().cpu()


def tiny_config(tmp_path, **overrides):
    settings = dict(
        model="unused", output_dir=str(tmp_path / "run"), num_epochs=1, sample_num_steps=2,
        sample_guidance_scale=3.0, sample_num_prompts_per_epoch=2, sample_images_per_prompt=2, sample_batch_size=4,
        grid_num_images=1, train_batch_size=2, advantage_mode="batch",
    )
    settings.update(overrides)
    return DDPOConfig(**settings)


def check_metadata(pairs):
    assert pairs
    for prompt, metadata in pairs:  # every image's metadata is its own prompt's row, with its group id
        row = next(r for r in GENEVAL + [{"prompt": "a photo of a zebra", "tag": "single_object"}]
                   if r["prompt"] == prompt)
        assert metadata["tag"] == row["tag"] and isinstance(metadata["group_id"], int)
        assert all(item["class"] in prompt.replace("cats", "cat") for item in metadata["include"])


def test_reward_receives_each_images_metadata(tmp_path, tiny_pipe):
    reward = RecordingReward()
    config = tiny_config(tmp_path, prompt_file=write_jsonl(tmp_path / "geneval.jsonl", GENEVAL),
                         eval_prompt_file=write_jsonl(tmp_path / "heldout.jsonl", GENEVAL[:1]), eval_every=1,
                         final_eval_num_images=2)
    trainer = DDPOTrainer(config, pipeline=tiny_pipe, reward_fn=reward)
    metrics = trainer.step(0)
    assert "heldout_reward_mean" in metrics
    training, heldout = reward.calls
    assert len(training) == 4 and [m["group_id"] for _, m in training] == [0, 0, 1, 1]
    check_metadata(training)
    assert [p for p, _ in heldout] == [GENEVAL[0]["prompt"]]
    check_metadata(heldout)
    reward.calls.clear()
    trainer.final_evaluation()  # base and trained, on the held-out prompts
    assert [p for call in reward.calls for p, _ in call] == [GENEVAL[0]["prompt"]] * 4
    check_metadata([pair for call in reward.calls for pair in call])


def test_each_process_gets_its_prompts_metadata(tmp_path, tiny_pipe):
    config = tiny_config(tmp_path, prompt_file=write_jsonl(tmp_path / "geneval.jsonl", GENEVAL),
                         sample_num_prompts_per_epoch=4)
    trainer = DDPOTrainer(config, pipeline=tiny_pipe, reward_fn=RecordingReward())
    single = trainer.local_items(3)
    per_process = []
    for rank in range(2):  # what each of two processes takes of the same epoch
        trainer.accelerator = types.SimpleNamespace(num_processes=2, process_index=rank)
        per_process.append(trainer.local_items(3))
    assert per_process[0][0] + per_process[1][0] == single[0]
    assert per_process[0][1] + per_process[1][1] == single[1]
    check_metadata([(p, {**m, "group_id": 0}) for p, m in zip(*single)])


def test_dataset_training_and_heldout_split(tmp_path, tiny_pipe, geneval_dataset):
    reward = RecordingReward()
    config = tiny_config(tmp_path, prompt_dataset=geneval_dataset, eval_dataset_split="test", eval_every=1,
                         eval_num_images=2)
    trainer = DDPOTrainer(config, pipeline=copy.deepcopy(tiny_pipe), reward_fn=reward)
    assert trainer.prompts.prompts == [row["prompt"] for row in GENEVAL]
    metrics = trainer.step(0)
    assert torch.isfinite(torch.tensor(metrics["heldout_reward_mean"]))
    training, heldout = reward.calls
    check_metadata(training)
    assert [p for p, _ in heldout] == ["a photo of a zebra"] * 2
    check_metadata(heldout)


def test_bad_prompt_file_through_the_cli_is_one_line(tiny_model_dir, tmp_path, capsys):
    from diffalign.cli import main

    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a cat"}\n{"text": "a dog"}\n')
    code = main(["train", "ddpo", "--model", tiny_model_dir, "--output_dir", str(tmp_path / "run"),
                 "--prompt_file", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "line 2 has no 'prompt' field" in err[0], err
