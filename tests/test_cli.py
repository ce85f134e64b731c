import json
import os

import pytest
import torch

from diffalign.cli import main

TINY_ARGS = [
    "--prompts", "[a cat, a dog]", "--num_epochs", "2", "--sample_num_steps", "3", "--sample_num_prompts_per_epoch",
    "2", "--sample_images_per_prompt", "2", "--grid_num_images", "4", "--reward", "jpeg_compressibility",
]


@pytest.fixture(scope="module")
def ddpo_run(tiny_model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "ddpo")
    code = main(["train", "ddpo", "--model", tiny_model_dir, "--output_dir", out, "--train_batch_size", "2",
                 "--sample_compute_kl", "true"] + TINY_ARGS)
    assert code == 0
    return out


def test_two_epoch_ddpo_run_writes_every_output(ddpo_run):
    for name in ("final/pytorch_lora_weights.safetensors", "metrics.jsonl", "reward_curve.png", "grid_before.png",
                 "grid_after.png", "grid_before_after.png", "config.json"):
        assert os.path.isfile(os.path.join(ddpo_run, name)), name
    with open(os.path.join(ddpo_run, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [0, 1]
    for key in ("reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "kl_to_base", "time_epoch"):
        assert key in records[-1]


def test_trained_lora_loads_into_a_plain_pipeline(ddpo_run, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images

    base = run()
    pipe.load_lora_weights(os.path.join(ddpo_run, "final"))
    assert not torch.allclose(base, run())


def test_prdp_cli_run(tiny_model_dir, tmp_path):
    out = str(tmp_path / "prdp")
    code = main(["train", "prdp", "--model", tiny_model_dir, "--output_dir", out, "--train_num_inner_epochs", "2",
                 "--train_beta", "0.1", "--train_clip_eps", "1e-3", "--final_eval_num_images", "4",
                 "--eval_reward", "jpeg_incompressibility"] + TINY_ARGS)
    assert code == 0
    with open(os.path.join(out, "final_eval.json")) as f:
        final = json.load(f)
    assert final["base"].keys() == {"reward_mean", "reward_std", "eval_mean"}
    assert final["trained"]["kl_to_base"] > 0 and final["num_images"] == 4
    with open(os.path.join(out, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    assert "implicit_reward_error" in last and "kl_to_base" in last
    for name in ("final/pytorch_lora_weights.safetensors", "reward_curve.png", "grid_before_after.png"):
        assert os.path.isfile(os.path.join(out, name))


@pytest.mark.parametrize("command", [["--help"], ["train", "ddpo", "--help"], ["train", "prdp", "--help"],
                                     ["generate", "--help"], ["env"]])
def test_help_exits_zero(command, capsys):
    try:
        code = main(command)
    except SystemExit as e:
        code = e.code
    assert code == 0


def run_error(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_gives_one_line_and_exit_code_2(tiny_model_dir, tmp_path, capsys):
    # tiny settings, so that an error case that fails to fail costs seconds, not a full default run
    base = ["train", "ddpo", "--model", tiny_model_dir, "--output_dir", str(tmp_path / "x"), "--num_epochs", "1",
            "--sample_num_steps", "2", "--grid_num_images", "1"]
    assert "unknown option '--not_a_key'" in run_error(base + ["--not_a_key", "1"], capsys)
    assert "expected an integer" in run_error(base + ["--num_epochs", "many"], capsys)
    assert "divisible by train_batch_size" in run_error(
        base + ["--sample_num_prompts_per_epoch", "3", "--sample_images_per_prompt", "1", "--train_batch_size", "2"],
        capsys)
    assert "does not exist" in run_error(
        ["train", "ddpo", "--model", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "x")], capsys)
    assert "hub is offline" in run_error(
        ["train", "ddpo", "--model", "runwayml/stable-diffusion-v1-5", "--output_dir", str(tmp_path / "x")], capsys)
    assert "not a multiple of" in run_error(base + ["--sample_resolution", "30"], capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    assert "has no prompts" in run_error(base + ["--prompt_file", str(empty)], capsys)
    assert "does not exist" in run_error(base + ["--prompt_file", str(tmp_path / "missing.txt")], capsys)
    assert "unknown reward 'nope'" in run_error(base + ["--prompts", "[a]", "--reward", "nope"], capsys)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("sample_num_steps: 3\ntypo_key: 1\n")
    assert "unknown config key 'typo_key'" in run_error(["train", "ddpo", "--config", str(bad_yaml)], capsys)
    assert "neither a file nor a preset" in run_error(["train", "ddpo", "--config", "no-such-preset"], capsys)


def test_yaml_then_cli_precedence(tmp_path):
    from diffalign.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("train_learning_rate: 1e-5\nsample_num_steps: 7\nreward: {jpeg_compressibility: 2.0}\n")
    config = load_config("prdp", str(path), cli_overrides=["--sample_num_steps", "9"])
    assert config.train_learning_rate == 1e-5 and config.sample_num_steps == 9
    assert config.reward == {"jpeg_compressibility": 2.0}
    assert config.train_beta == 3e-5  # default from the paper's Table 4


def shipped_presets():
    from importlib import resources

    return sorted(p.name[:-5] for p in resources.files("diffalign.configs").iterdir() if p.name.endswith(".yaml"))


@pytest.mark.parametrize("preset", shipped_presets())
def test_every_shipped_preset_loads_and_validates(preset):
    import yaml

    from diffalign.config import load_config, preset_path

    with open(preset_path(preset)) as f:
        algorithm = yaml.safe_load(f)["algorithm"]
    config = load_config(algorithm, preset)
    config.validate(num_processes=1)


def test_lora_that_does_not_match_the_model_is_one_line(tiny_model_dir, tmp_path, capsys):
    from diffalign.families import StableDiffusionFamily
    from diffalign.testing import tiny_unet
    from diffalign.utils.peft_utils import add_lora

    other = add_lora(tiny_unet(cross_attention_dim=16))  # different attention shapes
    StableDiffusionFamily(None).save_lora(other, str(tmp_path / "other"))
    args = ["generate", "--model", tiny_model_dir, "--lora", str(tmp_path / "other"), "--prompt", "a cat",
            "--rlg-scale", "0", "1", "--steps", "2", "--output-dir", str(tmp_path / "out")]
    assert "does not match the model" in run_error(args, capsys)
    missing = ["generate", "--model", tiny_model_dir, "--lora", str(tmp_path), "--prompt", "a cat", "--rlg-scale",
               "1", "--output-dir", str(tmp_path / "out")]
    assert "has no pytorch_lora_weights.safetensors" in run_error(missing, capsys)


# ------------------------------------------------------------------------------ fast parsing, flag spellings (issue 21)
LIGHT_CLI_SCRIPT = r"""
import sys
from diffalign.cli import main

for argv in (["--help"], ["train", "ddpo", "--help"], ["generate", "--help"], ["bench", "rollout", "--help"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
codes = [
    main(["train", "ddpo", "--no_such_key", "1"]),
    main(["train", "ddpo", "--sample_num_step", "3"]),
    main(["train", "prdp", "--config", "digit-prdp"]),
    main(["train", "ddpo", "--num_epochs", "0"]),
]
print("codes", codes)
print("heavy", sorted(m for m in ("torch", "diffusers", "transformers", "accelerate", "peft") if m in sys.modules))
"""


def test_cli_parses_and_rejects_bad_keys_without_heavy_imports(tmp_path):
    """`--help` of every command and config errors (unknown key, preset typo, bad value) need neither torch nor
    diffusers: a fresh interpreter shows none in `sys.modules` afterwards. Misspellings get a suggestion."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", LIGHT_CLI_SCRIPT], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "codes [2, 2, 2, 2]" in done.stdout and "heavy []" in done.stdout, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("diffalign: error:")]
    assert len(errors) == 4, done.stderr
    assert "unknown option '--no_such_key'" in errors[0]
    assert "did you mean '--sample_num_steps'?" in errors[1]
    assert "did you mean 'digits-prdp'?" in errors[2]
    assert "num_epochs must be >= 1" in errors[3]


def test_yaml_key_typo_suggests_the_key(tmp_path):
    from diffalign.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("lora_rnak: 8\n")
    with pytest.raises(ConfigError, match="did you mean 'lora_rank'"):
        load_config("prdp", str(path))


def test_both_flag_spellings_in_every_command():
    from diffalign.cli import build_parser, normalize_flags
    from diffalign.config import load_config

    for keys in (["--sample_num_steps", "--train-batch-size"], ["--sample-num-steps", "--train_batch_size"]):
        config = load_config("ddpo", cli_overrides=[keys[0], "3", keys[1], "4"])
        assert config.sample_num_steps == 3 and config.train_batch_size == 4
    parser = build_parser()
    for spelling in (["--num_images", "3", "--rlg_scale", "0", "2", "--output_dir=o"],
                     ["--num-images", "3", "--rlg-scale", "0", "2", "--output-dir=o"]):
        args, extra = parser.parse_known_args(normalize_flags(["generate", *spelling, "--prompt=--a_b"]))
        assert not extra and (args.num_images, args.rlg_scale, args.output_dir) == (3, [0.0, 2.0], "o")
        assert args.prompt == ["--a_b"]  # values are left alone
    for spelling in (["--batch_size", "2", "--images_per_prompt", "3"], ["--batch-size", "2", "--images-per-prompt", "3"]):
        args, extra = parser.parse_known_args(normalize_flags(["bench", "train", *spelling]))
        assert not extra and (args.batch_size, args.images_per_prompt) == (2, 3)


def test_unknown_generate_option_suggests_one(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--num_imgs", "2"])
    assert exit_info.value.code == 2
    assert "did you mean '--num-images'?" in capsys.readouterr().err


def test_bench_writes_under_runs_bench_by_default(tmp_path, monkeypatch, capsys):
    """`diffalign bench <sub>` without `--output` writes `runs/bench/bench_<sub>.json`, not into the working
    directory; snake_case options work there too."""
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "rollout", "--tiny", "--steps", "1", "--batch_size", "1", "--repeats", "1",
                 "--threads", "1"]) == 0
    assert (tmp_path / "runs" / "bench" / "bench_rollout.json").is_file()
    assert not list(tmp_path.glob("*.json"))
    assert "runs/bench/bench_rollout.json" in capsys.readouterr().out
