"""The tradeoff experiment (examples/research/tradeoff/tradeoff.py, out of the package): the RLG-guided sampler's identities (w = 0 is the base model with KL 0, w = 1 the
adapter with its own KL, other w mix the guided predictions linearly) and a smoke run of the command with tiny
settings that produces every output."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from diffalign.bench.rlg import add_random_lora
from diffalign.rollout import as_family, default_kernel, sample_trajectories
from diffalign.utils.peft_utils import adapters_disabled

PROMPTS = ["a photo of a cat", "a red car", "a photo of a cat"]
SEEDS = [11, 12, 13]
ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "examples" / "research" / "tradeoff"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tradeoff = load_script("tradeoff")
RLGDenoiser, ratio_pairs, sample_guided = tradeoff.RLGDenoiser, tradeoff.ratio_pairs, tradeoff.sample_guided


def main(argv):
    """`python examples/research/tradeoff/tradeoff.py ARGS`, in-process (`argv` as the former `bench tradeoff`)."""
    assert argv[:2] == ["bench", "tradeoff"]
    return tradeoff.main(argv[2:])


def _generators(device="cpu"):
    return [torch.Generator(device).manual_seed(s) for s in SEEDS]


@pytest.fixture
def lora_family(tiny_pipe):
    add_random_lora(tiny_pipe.unet, std=0.1, seed=0)
    tiny_pipe.unet.eval()
    return as_family(tiny_pipe)


def test_w0_is_the_base_model_with_zero_kl(lora_family):
    family, kernel = lora_family, default_kernel(lora_family, eta=1.0)
    out = sample_guided(family, kernel, family.denoiser, 0.0, PROMPTS, SEEDS, num_steps=3, guidance_scale=3.0,
                        resolution=None, batch_size=3)
    with adapters_disabled(family.denoiser):
        base = sample_trajectories(family, PROMPTS, 3, 3.0, generator=_generators(), kernel=kernel)
    assert torch.equal(out["images"], base.images)
    assert torch.equal(out["kl"], torch.zeros(len(PROMPTS)))


def test_w1_reproduces_the_adapter_and_its_kl(lora_family):
    family, kernel = lora_family, default_kernel(lora_family, eta=1.0)
    out = sample_guided(family, kernel, family.denoiser, 1.0, PROMPTS, SEEDS, num_steps=3, guidance_scale=3.0,
                        resolution=None, batch_size=3)
    # the adapter's own sampling, with KL to base from the trainers' one-forward (mixed-adapter) path
    own = sample_trajectories(family, PROMPTS, 3, 3.0, generator=_generators(), kernel=kernel,
                              compute_reference=True)
    kl = own.kl_to_ref.nanmean(dim=1)
    assert kl.min() > 1e-4  # the random LoRA moves the model: the comparison is not 0 == 0
    torch.testing.assert_close(out["kl"], kl, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out["images"], own.images, rtol=0, atol=1e-5)


def test_other_w_mix_the_cfg_guided_predictions(lora_family):
    """RLG mixes the two models' CFG-guided predictions; mixing the raw outputs before CFG is the same (CFG is
    linear), and KL grows with w."""
    family = lora_family
    unet = family.denoiser
    res = family.default_resolution()
    cond, negative = family.conditioning(PROMPTS, "", True, res, res)
    x = family.prepare_latents(len(PROMPTS), res, res, torch.float32, "cpu", torch.Generator().manual_seed(0))
    family.set_timesteps(3, "cpu", res, res)
    t = family.scheduler.timesteps[1]
    with torch.no_grad():
        aligned = family.predict(unet, x, t, cond, negative, 3.0)
        with adapters_disabled(unet):
            base = family.predict(unet, x, t, cond, negative, 3.0)
        for w in (0.5, 2.0, -1.0):
            mixed = family.predict(RLGDenoiser(unet, w), x, t, cond, negative, 3.0)
            torch.testing.assert_close(mixed, base + w * (aligned - base), rtol=1e-5, atol=1e-5)
    kernel = default_kernel(family, eta=1.0)
    kls = [sample_guided(family, kernel, unet, w, PROMPTS, SEEDS, 3, 3.0, None, 3)["kl"].mean().item()
           for w in (0.5, 1.0, 2.0)]
    assert 0 < kls[0] < kls[1] < kls[2]


def test_sd3_tuple_outputs_mix_too():
    """The flow family's transformer returns a tuple: w = 0 still samples the base model with KL 0."""
    from diffalign.testing import tiny_sd3_pipeline

    torch.manual_seed(0)
    pipe = tiny_sd3_pipeline()
    add_random_lora(pipe.transformer, std=0.1, seed=0)
    pipe.transformer.eval()
    family = as_family(pipe)
    kernel = default_kernel(family, noise_level=0.7)
    zero = sample_guided(family, kernel, pipe.transformer, 0.0, PROMPTS[:2], SEEDS[:2], 2, 2.0, None, 2)
    with adapters_disabled(pipe.transformer):
        base = sample_trajectories(family, PROMPTS[:2], 2, 2.0, generator=_generators()[:2], kernel=kernel)
    assert torch.equal(zero["images"], base.images) and torch.equal(zero["kl"], torch.zeros(2))
    two = sample_guided(family, kernel, pipe.transformer, 2.0, PROMPTS[:2], SEEDS[:2], 2, 2.0, None, 2)
    assert (two["kl"] > 0).all() and not torch.equal(two["images"], base.images)


def test_ratio_pairs():
    assert ratio_pairs([0.02, 0.005, 0.01]) == [(0.005, 0.01), (0.01, 0.02)]
    assert ratio_pairs([0.0, 0.5, 1.0, 3.0]) == [(0.5, 1.0)]
    assert ratio_pairs([0.1, 0.3]) == []


def test_beta_w_table_pairs_and_distances():
    """Pairs in ratio 2 of either kind; distances are those of the paired samplers' numbers and images."""
    beta_w_table = tradeoff.beta_w_table

    def sweep(reward, judge, kl, pixel):
        return {"reward": torch.tensor([reward, reward]), "judge": torch.tensor([judge, judge]),
                "kl": torch.tensor([kl, kl]), "images": torch.full((2, 3, 4, 4), pixel)}

    specs = {"ddpo_kl0": ("ddpo", "train_kl_coef", 0.0), "ddpo_kl1": ("ddpo", "train_kl_coef", 1.0),
             "ddpo_kl2": ("ddpo", "train_kl_coef", 2.0), "prdp_beta0.1": ("prdp", "train_beta", 0.1),
             "prdp_beta0.3": ("prdp", "train_beta", 0.3)}
    sweeps = {name: {w: sweep(i + w, 0.5 + 0.1 * w, 0.01 * w * w, 0.1 * i + 0.01 * w)
                     for w in (0.5, 1.0, 2.0)} for i, name in enumerate(specs)}
    (row,) = beta_w_table(specs, sweeps)  # the betas are not in ratio 2; the KL weights 1 and 2 are (0 never pairs)
    assert (row["kind"], row["small"], row["big"]) == ("ddpo", 1.0, 2.0)
    big_w2, small_w05 = row["comparisons"]
    assert (big_w2["arm"], big_w2["w"], big_w2["vs_arm"]) == ("ddpo_kl2", 2.0, "ddpo_kl1")
    # ddpo_kl2 (i = 2) at w = 2 against ddpo_kl1 (i = 1) at w = 1
    assert big_w2["d_reward"] == pytest.approx(2.0) and big_w2["d_judge"] == pytest.approx(0.1)
    assert big_w2["d_kl"] == pytest.approx(0.03) and big_w2["pixel_distance"] == pytest.approx(0.11)
    assert row["models"]["pixel_distance"] == pytest.approx(0.1)
    assert big_w2["pixel_over_models"] == pytest.approx(1.1)
    assert (small_w05["arm"], small_w05["w"], small_w05["vs_arm"]) == ("ddpo_kl1", 0.5, "ddpo_kl2")
    assert small_w05["pixel_distance"] == pytest.approx(0.105)


SHAPES = ["--epochs", "1", "--steps", "3", "--prompts-per-epoch", "2", "--images-per-prompt", "2",
          "--set", "train_num_inner_epochs=1", "--set", "grid_num_images=2",
          "--rlg-scales", "0", "1", "--rlg-prompts", "2", "--rlg-seeds", "2"]
TINY = [*SHAPES, "--kl-coefs", "0", "0.5", "--prdp-betas", "0.01", "0.02"]


@pytest.mark.slow  # four arms: ~25 s; test_tradeoff_on_the_flow_model runs the same path by default
def test_tradeoff_smoke(capsys, tmp_path):
    out = tmp_path / "tradeoff"
    assert main(["bench", "tradeoff", *TINY, "--output-dir", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads((out / "tradeoff.json").read_text())
    assert result["benchmark"] == "tradeoff" and (out / "tradeoff.png").stat().st_size > 0
    arms = result["arms"]
    assert list(arms) == ["ddpo_kl0", "ddpo_kl0.5", "prdp_beta0.01", "prdp_beta0.02"]
    for name, arm in arms.items():
        curves = arm["curves"]
        assert len(curves["reward"]) == len(curves["judge"]) == len(curves["kl"]) == 1
        assert None not in curves["judge"] and None not in curves["kl"]  # judge and KL logged every epoch
        assert arm["config"]["reward"] == "jpeg_compressibility" and arm["config"]["eval_reward"] == "digit_judge"
        assert (out / name / "final" / "pytorch_lora_weights.safetensors").exists()
        assert (out / name / "rlg_grid.png").exists()
    assert arms["ddpo_kl0.5"]["config"]["train_kl_coef"] == 0.5
    assert arms["prdp_beta0.02"]["config"]["train_beta"] == 0.02
    assert arms["prdp_beta0.02"]["config"]["sample_num_steps"] == 3
    rlg = result["rlg"]
    assert rlg["scales"] == [0.0, 0.5, 1.0, 2.0]  # the beta/w test's 0.5 and 2 are always swept
    assert len(rlg["prompts"]) == len(rlg["seeds"]) == 4
    for name in arms:
        points = rlg["sweeps"][name]
        assert [p["w"] for p in points] == rlg["scales"]
        assert points[0]["kl"] == 0 and points[0]["reward"] == rlg["base"]["reward"]
        assert points[2]["kl"] > 0
    # one pair of betas (and one of KL weights) in ratio 2: two comparisons each, next to the models' distance
    (prdp,) = [row for row in result["beta_w"] if row["kind"] == "prdp"]
    assert (prdp["small"], prdp["big"]) == (0.01, 0.02)
    assert [(c["arm"], c["w"], c["vs_arm"]) for c in prdp["comparisons"]] == [
        ("prdp_beta0.02", 2.0, "prdp_beta0.01"), ("prdp_beta0.01", 0.5, "prdp_beta0.02")]
    for entry in [*prdp["comparisons"], prdp["models"]]:
        for key in ("d_reward", "d_judge", "d_kl", "pixel_distance"):
            assert entry[key] >= 0
    assert [row["kind"] for row in result["beta_w"]] == ["prdp"]  # KL weights 0 and 0.5: no pair in ratio 2
    assert "beta/w test" in table and "train_beta=0.02 at w=2" in table

    # a second run reuses every finished arm
    assert main(["bench", "tradeoff", *TINY, "--output-dir", str(out)]) == 0
    again = json.loads((out / "tradeoff.json").read_text())
    assert all(arm["reused"] for arm in again["arms"].values())
    assert again["arms"]["prdp_beta0.01"]["curves"] == arms["prdp_beta0.01"]["curves"]
    assert again["rlg"]["sweeps"] == rlg["sweeps"]  # fixed prompts and seeds: the same numbers

    # reproduce_results.py prints these over seeds (here two copies of one seed: zero spread)
    reproduce = load_script("reproduce_results")
    text = reproduce.tradeoff_tables({0: result, 1: again})
    w2 = next(p for p in rlg["sweeps"]["prdp_beta0.02"] if p["w"] == 2)
    assert f"| `prdp_beta0.02` | 2 | {w2['reward']:.4f} ± 0.0000" in text
    assert "| train_beta=0.02 at w=2 | train_beta=0.01 at w=1 |" in text
    assert text.count("\n| ") == 1 + 1 + 4 * 3 + 1 + 3  # header, base, arms x w in (0.5, 1, 2); header, 3 rows

    # an arm cut after its last checkpoint but before arm.json continues from the checkpoint (no epoch retrained)
    (out / "prdp_beta0.02" / "arm.json").unlink()
    assert main(["bench", "tradeoff", *TINY, "--output-dir", str(out)]) == 0
    resumed = json.loads((out / "tradeoff.json").read_text())["arms"]["prdp_beta0.02"]
    assert resumed["resumed"] and not resumed["reused"]
    assert resumed["curves"] == arms["prdp_beta0.02"]["curves"]
    # ... and an arm trained with other settings is never silently reused or mixed
    assert main(["bench", "tradeoff", *TINY, "--set", "train_learning_rate=0.01", "--output-dir", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err


def test_tradeoff_on_the_flow_model(tmp_path):
    """digits-flow: the Flow-GRPO / PRDP presets' SDE sampler, the transformer's tuple outputs in the sweeps."""
    out = tmp_path / "flow"
    argv = ["bench", "tradeoff", "--model", "digits-flow", *SHAPES, "--kl-coefs", "--prdp-betas", "1", "2",
            "--output-dir", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "tradeoff.json").read_text())
    assert list(result["arms"]) == ["prdp_beta1", "prdp_beta2"]
    config = result["arms"]["prdp_beta1"]["config"]
    assert config["model"] == "digits-flow" and config["sample_noise_level"] == 0.7
    assert config["sample_compute_kl"] is True  # the flow PRDP preset turns it off; the bench logs KL every epoch
    assert result["rlg"]["sweeps"]["prdp_beta2"][2]["kl"] > 0 and len(result["beta_w"]) == 1


@pytest.mark.slow  # ~30 s; the options are checked in the default suite (test_bad_options_are_one_line)
def test_tradeoff_arms_of_any_algorithm(tmp_path):
    """`--arm nft:train_kl_coef=...`: DiffusionNFT arms from the flow model's nft preset, with their KL weight as the
    dial; the beta/w test pairs them like the built-in kinds."""
    out = tmp_path / "nft"
    argv = ["bench", "tradeoff", "--model", "digits-flow", *SHAPES, "--kl-coefs", "--prdp-betas",
            "--arm", "nft:train_kl_coef=0.5,1", "--output-dir", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "tradeoff.json").read_text())
    assert list(result["arms"]) == ["nft_kl0.5", "nft_kl1"]
    config = result["arms"]["nft_kl1"]["config"]
    assert result["arms"]["nft_kl1"]["algorithm"] == "nft"
    assert config["train_kl_coef"] == 1.0 and config["sample_deterministic"]
    assert result["rlg"]["sweeps"]["nft_kl1"][2]["kl"] > 0  # the trained adapter moved the sampler
    (row,) = result["beta_w"]
    assert (row["kind"], row["coefficient"], row["small"], row["big"]) == ("nft", "train_kl_coef", 0.5, 1.0)


@pytest.mark.parametrize("argv, message", [
    (["--prdp-betas", "0.01", "0.03"], "ratio 2"),
    (["--prdp-betas", "0.01", "0.02", "--beta", "0.01"], "not both"),
    (["--kl-coefs", "-1"], "non-negative"),
    (["--arm", "nft"], "ALGORITHM:KEY=V1,V2"),
    (["--arm", "sgd:train_kl_coef=1"], "unknown algorithm 'sgd'"),
    (["--arm", "nft:train_clip_range=1"], "not a config key of nft"),
    (["--arm", "nft:train_kl_coef=a"], "must be numbers"),
    (["--kl-coefs", "--prdp-betas"], "no arms"),
    (["--set", "train_beta=0.1"], "--prdp-betas"),
    (["--set", "no_such_key=1"], "not a config key"),
    (["--tiny"], "bundled digits model"),
    (["--rlg-prompts", "11"], "--rlg-prompts"),
])
def test_bad_options_are_one_line(capsys, tmp_path, argv, message):
    assert main(["bench", "tradeoff", "--epochs", "1", *argv, "--output-dir", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t" / "ddpo_kl0" / "metrics.jsonl").exists()


def test_the_experiment_is_out_of_the_package_and_uses_its_rlg_mixing():
    """`bench tradeoff` is gone from the CLI; the script mixes with `diffalign.guiders.rlg_mix`, not a copy."""
    import subprocess
    import sys

    from diffalign.bench import SUBCOMMANDS
    from diffalign.guiders import rlg_mix

    assert "tradeoff" not in SUBCOMMANDS and not (ROOT / "diffalign" / "bench" / "tradeoff.py").exists()
    source = (EXPERIMENT / "tradeoff.py").read_text()
    assert "from diffalign.guiders import rlg_mix" in source and "scale * (aligned - base)" not in source
    base, aligned = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(tradeoff.mix_outputs(base, aligned, 1.5), rlg_mix(base, [(aligned, 1.5)]))
    assert torch.equal(tradeoff.mix_outputs((base, 1), (aligned, 1), 1.5)[0], base + 1.5 * (aligned - base))
    # runnable as a script from a checkout (its --help: no model is loaded)
    done = subprocess.run([sys.executable, str(EXPERIMENT / "tradeoff.py"), "--help"], capture_output=True, text=True,
                          cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0 and "--prdp-betas" in done.stdout and "--model" in done.stdout
