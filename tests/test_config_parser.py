"""Config parsing on transformers' HfArgumentParser, vendored as `diffalign._hf_argparser` (the TrlParser pattern): YAML
or preset, then flags. The existing one-line errors are checked in tests/test_cli.py and tests/test_bad_inputs.py; these
cover what the swap adds."""

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Union

import pytest

from diffalign.config import CONFIG_CLASSES, ConfigError, DDPOConfig, TrainConfig, config_help, load_config


def test_parser_is_the_vendored_hf_argument_parser_without_importing_transformers():
    script = (
        "import sys, os\n"
        "from diffalign.cli.parser import _config_parser, config_help, load_config\n"
        "from diffalign.config import DDPOConfig\n"
        "parser = _config_parser(DDPOConfig)\n"
        "base = [c for c in type(parser).__mro__ if c.__name__ == 'HfArgumentParser'][0]\n"
        "config_help('prdp'); load_config('ddpo', 'digits-ddpo', None, ['--num_epochs', '3'])\n"
        "print(sys.modules[base.__module__].__name__, sorted(m for m in ('torch', 'transformers', "
        "'diffusers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["diffalign._hf_argparser", "[]"], done.stdout


def test_vendored_hf_argparser_is_transformers_file_of_the_version_its_header_names():
    import importlib.metadata
    import importlib.util
    import re

    import diffalign._hf_argparser

    with open(diffalign._hf_argparser.__file__, encoding="utf-8") as f:
        header, _, body = f.read().partition("\n\n")
    version = re.search(r"^# Copied from: transformers (\S+),", header, re.MULTILINE).group(1)
    assert "Apache License 2.0" in header and body.startswith("# Copyright 2020 The HuggingFace Team.")
    if importlib.metadata.version("transformers") != version:
        pytest.skip(f"transformers {importlib.metadata.version('transformers')} is installed, the copy is {version}'s")
    location = importlib.util.find_spec("transformers").submodule_search_locations[0]
    with open(os.path.join(location, "hf_argparser.py"), encoding="utf-8") as f:
        assert body == f.read()


def test_flags_the_parser_adds():
    config = load_config("prdp", cli_overrides=["--use_lora", "--no_allow_tf32", "--train_two_pass",
                                                "--train_learning_rate", "-1e-4", "--resume_from", "null",
                                                "--mixed_precision", "no", "--reward", "hpsv2.1"])
    assert config.use_lora is True and config.allow_tf32 is False and config.train_two_pass is True
    assert config.train_learning_rate == -1e-4 and config.resume_from is None
    assert config.mixed_precision == "no" and config.reward == "hpsv2.1"  # strings are never re-read as YAML
    config = load_config("ddpo", cli_overrides=["--reward={pickscore: 10, hpsv2: 2}", "--eval-reward", "aesthetic",
                                                "--sample-sde-window-range", "[0, 4]",
                                                "--gradient_checkpointing", "on"])
    assert config.reward == {"pickscore": 10, "hpsv2": 2} and config.eval_reward == "aesthetic"
    assert config.sample_sde_window_range == [0, 4] and config.gradient_checkpointing is True


@pytest.mark.parametrize("yaml_text, message", [
    ("num_epochs: 2.5\n", "num_epochs: expected an integer, got 2.5"),
    ("prompts: [1, 2]\n", "prompts: expected a string, got 1"),
    ("reward: 5\n", "reward: expected a string or a mapping, got 5"),
    ("use_lora: maybe\n", "use_lora: expected true or false, got 'maybe'"),
    ("reward_kwargs: [a]\n", "reward_kwargs: expected a mapping"),
])
def test_yaml_values_are_type_checked(tmp_path, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as error:
        load_config("ddpo", str(path))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_yaml_numbers_and_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_beta: 1\ntrain_clip_eps: 1e-6\nnum_epochs: 4\nseed: 5\n")  # YAML 1.1 reads 1e-6 as text
    config = load_config("prdp", str(path), {"num_epochs": 6}, ["--seed", "7"])
    assert config.train_beta == 1.0 and isinstance(config.train_beta, float) and config.train_clip_eps == 1e-6
    assert (config.num_epochs, config.seed) == (6, 7)  # defaults < file < Python overrides < flags


def test_config_classes_are_left_as_they_are():
    """HfArgumentParser narrows `field.type` in place (Optional[X] -> X); the parser works on copies."""
    before = {f.name: f.type for f in dataclasses.fields(DDPOConfig)}
    load_config("ddpo", cli_overrides=["--prompts", "[a]"])
    config_help("ddpo")
    assert {f.name: f.type for f in dataclasses.fields(DDPOConfig)} == before
    assert before["reward"] == Union[str, dict] and before["prompts"] == Optional[List[str]]


@dataclass
class ToyConfig(TrainConfig):
    """A config class as another algorithm would add one, with field types HfArgumentParser handles differently."""

    toy_mode: Literal["fast", "slow"] = field(default="fast", metadata={"help": "A choice (Literal)."})
    toy_steps: Union[int, List[int]] = field(default=1, metadata={"help": "A Union without str or None."})

    algorithm = "toy"


def test_new_fields_need_nothing_in_the_parser(monkeypatch):
    monkeypatch.setitem(CONFIG_CLASSES, "toy", ToyConfig)
    config = load_config("toy", cli_overrides=["--toy-mode", "slow", "--toy_steps", "[1, 2]", "--num_epochs", "2"])
    assert (config.toy_mode, config.toy_steps, config.num_epochs) == ("slow", [1, 2], 2)
    assert load_config("toy", cli_overrides=["--toy_steps", "3"]).toy_steps == 3
    with pytest.raises(ConfigError, match="toy_mode.*invalid choice: 'medium'"):
        load_config("toy", cli_overrides=["--toy_mode", "medium"])
    with pytest.raises(ConfigError, match="toy_steps: expected an integer or a list"):
        load_config("toy", cli_overrides=["--toy_steps", "many"])
    assert "--toy_steps" in config_help("toy")


def test_help_lists_every_key_with_its_default():
    text = config_help("prdp")
    lines = text.splitlines()
    for f in dataclasses.fields(CONFIG_CLASSES["prdp"]):
        start = next(i for i, line in enumerate(lines) if line.strip().startswith(f"--{f.name} "))
        entry = " ".join(line.strip() for line in lines[start:start + 12]).split(" --")[0]
        assert "(default: " in entry, entry
    assert "--no_allow_tf32" not in text and "--train_beta FLOAT" in text and "(default: 3e-05)" in text
