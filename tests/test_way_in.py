"""The way in, once (issue 28): a config is checked once per process count and its model resolved once on the CLI
path, a trainer built in Python still checks its config, one output-directory default serves the CLI and the Python
API, and families and kernels take explicit settings instead of the run config."""

import os

import pytest

from diffalign.errors import ConfigError
from diffalign.trainers import CONFIG_CLASSES, trainer_class
from diffalign.trainers.ddpo_config import DDPOConfig
from diffalign.trainers.prdp_config import PRDPConfig


@pytest.fixture
def count_validations(monkeypatch):
    calls = []
    for cls in CONFIG_CLASSES.values():
        validate = cls.validate

        def counted(self, num_processes=1, validate=validate):
            calls.append(num_processes)
            return validate(self, num_processes)

        monkeypatch.setattr(cls, "validate", counted)
    return calls


# ---------------------------------------------------------------------------------------------- checked once
def test_check_validates_once_per_process_count_and_values(count_validations):
    config = DDPOConfig(num_epochs=2)
    config.check(1)
    config.check(1)
    assert count_validations == [1]
    config.check(2)  # another process count: the batch arithmetic depends on it
    assert count_validations == [1, 2]
    config.num_epochs = 0  # changed after its check: checked again, and refused
    with pytest.raises(ConfigError, match="num_epochs must be >= 1"):
        config.check(2)
    assert "_validated_for" not in config.to_dict()  # the marker is no field: not saved, not hashed


def test_cli_checks_the_config_once_and_resolves_the_model_once(tmp_path, monkeypatch, count_validations):
    import diffalign.families
    import diffalign.utils.hub_utils
    from diffalign.cli import main

    resolved = []
    resolve = diffalign.utils.hub_utils.resolve_model_path

    def counted_resolve(name_or_path):
        resolved.append(name_or_path)
        return resolve(name_or_path)

    monkeypatch.setattr(diffalign.utils.hub_utils, "resolve_model_path", counted_resolve)
    monkeypatch.setattr(diffalign.families, "resolve_model_path", counted_resolve)
    trainers = []
    monkeypatch.setattr(trainer_class("ddpo"), "train", lambda self: trainers.append(self) or [])
    code = main(["train", "ddpo", "--config", "digits-ddpo", "--num_epochs", "1",
                 "--output_dir", str(tmp_path / "run")])
    assert code == 0 and len(trainers) == 1  # the trainer was built (family loaded, kernel made)
    assert count_validations == [1]
    assert resolved == ["digits"]
    assert trainers[0].kernel.eta == trainers[0].config.sample_eta


def test_a_trainer_built_in_python_checks_its_config(tmp_path, count_validations):
    config = PRDPConfig(sample_images_per_prompt=1, output_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="PRDP needs pairs"):
        trainer_class("prdp")(config)
    assert count_validations == [1]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------- one output-dir default
def test_one_output_dir_default_for_the_cli_and_the_python_api(tmp_path):
    from diffalign.cli.parser import load_config

    assert PRDPConfig().output_dir == os.path.join("runs", "prdp")
    assert load_config("prdp").output_dir == os.path.join("runs", "prdp")
    assert load_config("prdp", "digits-prdp").output_dir == os.path.join("runs", "digits-prdp")
    path = tmp_path / "mine.yaml"
    path.write_text("num_epochs: 3\n")
    assert load_config("ddpo", str(path)).output_dir == os.path.join("runs", "mine")
    path.write_text(f"output_dir: {tmp_path / 'there'}\n")
    assert load_config("ddpo", str(path)).output_dir == str(tmp_path / "there")
    checkpoint = str(tmp_path / "run" / "checkpoints" / "checkpoint-3")
    assert load_config("ddpo", "digits-ddpo", {"resume_from": checkpoint}).output_dir == str(tmp_path / "run")
    given = {"resume_from": checkpoint, "output_dir": str(tmp_path / "elsewhere")}
    assert load_config("ddpo", "digits-ddpo", given).output_dir == str(tmp_path / "elsewhere")
    assert load_config("ddpo", "digits-ddpo", None, ["--output-dir", "x"]).output_dir == "x"


def test_the_cli_announces_the_python_api_default(tmp_path, monkeypatch, capsys):
    from diffalign.cli import main
    from diffalign.cli.parser import load_config

    class Stop(Exception):
        pass

    def stop(self, config):
        raise Stop

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer_class("prdp"), "__init__", stop)  # the announcement is made before the trainer
    with pytest.raises(Stop):
        main(["train", "prdp", "--num_epochs", "1"])
    assert f"output_dir '{load_config('prdp').output_dir}'" in capsys.readouterr().out


# ------------------------------------------------------------------------------- explicit family/kernel settings
def test_kernels_take_their_settings_not_the_run_config():
    from diffalign.families import FAMILIES
    from diffalign.kernels import DDIMKernel, FlowSDEKernel

    config = DDPOConfig(sample_eta=0.5, sample_noise_level=0.3)
    assert DDIMKernel.settings() == ("eta",) and FlowSDEKernel.settings() == ("noise_level",)
    for family in FAMILIES.values():
        kernel = family.kernel_class.from_settings(**config.kernel_kwargs())
        (name,) = kernel.settings()
        assert getattr(kernel, name) == {"eta": 0.5, "noise_level": 0.3}[name], family.name
    assert not hasattr(DDIMKernel, "from_config")


def test_registry_pairs_each_config_class_with_the_trainer_beside_it():
    for name, config_class in CONFIG_CLASSES.items():
        trainer = trainer_class(name)
        assert trainer.config_class is config_class and trainer.algorithm == name
        assert config_class.__module__ == trainer.__module__ + "_config"
