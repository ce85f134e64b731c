"""diffalign's Wan RLG pipelines (`WanImageToVideoRLGPipeline`, `WanRLGPipeline`) on tiny models built offline: at
w = 0 the stock diffusers pipeline without the LoRA and at w = 1 with it, bit for bit (a model alone runs its CFG
halves in two passes, as the stock pipelines), for Wan 2.1 I2V, Wan 2.2 TI2V-5B (image- and text-to-video, per-token
timesteps) and A14B (two experts); w > 1 extrapolates; `diffalign generate` samples TI2V-5B image-to-video into an
animated grid. (tests/test_family_common.py checks the routes through the families, at a tolerance.)"""

import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.families import WanFamily, WanImageToVideoFamily, family_for_pipeline
from diffalign.utils.peft_utils import add_lora

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8))  # not 16 x 16
LAST = Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8))


def _randomise_lora(model, std=0.1):
    generator = torch.Generator().manual_seed(0)
    for param in model.parameters():
        if param.requires_grad:
            param.data = torch.randn(param.shape, generator=generator) * std


CASES = {  # (family, tiny version, side, stock pipeline, RLG pipeline, call arguments)
    "i2v-ti2v-5b": (WanImageToVideoFamily, "2.2-ti2v", 32, "WanImageToVideoPipeline", "WanImageToVideoRLGPipeline",
                    {"image": IMAGE}),
    "t2v-ti2v-5b": (WanFamily, "2.2-ti2v", 32, "WanPipeline", "WanRLGPipeline", {}),
    "t2v-a14b": (WanFamily, "2.2-a14b", 16, "WanPipeline", "WanRLGPipeline", {"guidance_scale_2": 2.0}),
    "i2v-2.1": (WanImageToVideoFamily, "2.1-i2v", 16, "WanImageToVideoPipeline", "WanImageToVideoRLGPipeline",
                {"image": IMAGE}),
    "flf2v-2.1": (WanImageToVideoFamily, "2.1-flf2v", 16, "WanImageToVideoPipeline", "WanImageToVideoRLGPipeline",
                  {"image": IMAGE, "last_image": LAST}),
    # Wan 2.2 I2V-A14B (and T2V-A14B) with the aligned LoRA on both experts, or on the low-noise one alone
    "i2v-a14b-both": (WanImageToVideoFamily, "2.2-i2v-a14b", 16, "WanImageToVideoPipeline",
                      "WanImageToVideoRLGPipeline", {"image": IMAGE, "guidance_scale_2": 2.0}),
    "i2v-a14b-low-noise": (WanImageToVideoFamily, "2.2-i2v-a14b", 16, "WanImageToVideoPipeline",
                           "WanImageToVideoRLGPipeline", {"image": IMAGE, "guidance_scale_2": 2.0}),
    "t2v-a14b-both": (WanFamily, "2.2-a14b", 16, "WanPipeline", "WanRLGPipeline", {"guidance_scale_2": 2.0}),
}
# the experts that carry the aligned LoRA (the others sample as configured at every scale)
LORA_EXPERTS = {"i2v-a14b-both": ("transformer", "transformer_2"), "i2v-a14b-low-noise": ("transformer_2",),
                "t2v-a14b-both": ("transformer", "transformer_2")}


@pytest.mark.parametrize("case", list(CASES))
def test_rlg_is_the_stock_pipeline_at_0_and_1_bit_for_bit(case):
    import diffusers

    import diffalign.pipelines

    family, version, side, stock_name, rlg_name, extra = CASES[case]
    experts = LORA_EXPERTS.get(case, ("transformer",))
    components = family.tiny_components(version=version)
    if version == "2.2-a14b":
        components["boundary_ratio"] = 0.5  # of 3 steps at shift 7, the last goes to the low-noise expert
    if version == "2.2-i2v-a14b":
        components["boundary_ratio"] = 0.9  # I2V-A14B's: of 3 steps at shift 7, the last two go to the low-noise one
    for expert in experts:
        components[expert].requires_grad_(False)  # as inference (peft then freezes the base weights anyway)
    stock = getattr(diffusers, stock_name)(**components)
    rlg = getattr(diffalign.pipelines, rlg_name)(**components)
    for pipe in (stock, rlg):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a cat", num_inference_steps=3, height=side, width=side, num_frames=5, output_type="pt",
                  guidance_scale=3.0, **extra)

    def sample(pipe, **rlg_kwargs):
        return pipe(generator=torch.Generator().manual_seed(0), **kwargs, **rlg_kwargs).frames

    base = sample(stock)
    for expert in experts:
        add_lora(components[expert], target_modules=family.default_lora_target_modules)
        _randomise_lora(components[expert])
    aligned = sample(stock)
    assert (aligned - base).abs().max() > 1e-3
    for single_pass in (False, True):
        assert torch.equal(sample(rlg, rlg_scale=0.0, rlg_single_pass=single_pass), base)
        assert torch.equal(sample(rlg, rlg_scale=1.0, rlg_single_pass=single_pass), aligned)
    # w = 1.5 extrapolates; one batched pass and one pass per model agree to float rounding
    beyond = sample(rlg, rlg_scale=1.5)
    assert (beyond - aligned).abs().max() > 1e-4
    torch.testing.assert_close(sample(rlg, rlg_scale=1.5, rlg_single_pass=False), beyond, atol=1e-4, rtol=1e-4)


def test_a_step_schedule_and_the_window_are_checked_and_used():
    import diffalign.pipelines

    components = WanImageToVideoFamily.tiny_components(version="2.2-ti2v")
    add_lora(components["transformer"], target_modules=WanFamily.default_lora_target_modules)
    _randomise_lora(components["transformer"])
    pipe = diffalign.pipelines.WanImageToVideoRLGPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(image=IMAGE, prompt="a cat", num_inference_steps=3, height=32, width=32, num_frames=5,
                  output_type="pt", guidance_scale=3.0)

    def sample(**rlg_kwargs):
        return pipe(generator=torch.Generator().manual_seed(0), **kwargs, **rlg_kwargs).frames

    with pytest.raises(ValueError, match="2 values, but the sampler runs 3 steps"):
        sample(rlg_scale=[0.0, 1.0])
    # a schedule of 0 at every step is the base model; a window that holds no step is the aligned model alone
    assert torch.equal(sample(rlg_scale=[0.0, 0.0, 0.0]), sample(rlg_scale=0.0))
    assert torch.equal(sample(rlg_scale=0.0, rlg_start=1.0, rlg_stop=1.0), sample(rlg_scale=1.0))


def test_a_fully_fine_tuned_aligned_transformer_is_the_stock_pipeline_on_it_at_1():
    """`aligned_transformer` (a full fine-tune, no LoRA): w = 0 samples `transformer`, w = 1 the fine-tune, bit for
    bit (TI2V-5B image-to-video)."""
    import copy

    import diffusers

    import diffalign.pipelines

    components = WanImageToVideoFamily.tiny_components(version="2.2-ti2v")
    aligned = copy.deepcopy(components["transformer"])
    with torch.no_grad():
        for param in aligned.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    kwargs = dict(image=IMAGE, prompt="a cat", num_inference_steps=3, height=32, width=32, num_frames=5,
                  output_type="pt", guidance_scale=3.0)

    def sample(pipe, **rlg_kwargs):
        pipe.set_progress_bar_config(disable=True)
        return pipe(generator=torch.Generator().manual_seed(0), **kwargs, **rlg_kwargs).frames

    rlg = diffalign.pipelines.WanImageToVideoRLGPipeline(**components, aligned_transformer=aligned)
    assert torch.equal(sample(rlg, rlg_scale=0.0), sample(diffusers.WanImageToVideoPipeline(**components)))
    assert torch.equal(sample(rlg, rlg_scale=1.0),
                       sample(diffusers.WanImageToVideoPipeline(**{**components, "transformer": aligned})))


@pytest.mark.slow  # ~5 s each (the family tester runs generate on Wan 2.1 I2V by default)
@pytest.mark.parametrize("family, version, side, expected", [
    (WanImageToVideoFamily, "2.2-ti2v", 32, "WanImageToVideoRLGPipeline"),
    (WanImageToVideoFamily, "2.1-flf2v", 16, "WanImageToVideoRLGPipeline"),
    (WanFamily, "2.2-ti2v", 32, "WanRLGPipeline")], ids=["i2v-ti2v-5b", "flf2v", "t2v-ti2v-5b"])
def test_generate_samples_wan_rlg_pipelines_into_an_animated_grid(tmp_path, family, version, side, expected):
    """`diffalign generate` on TI2V-5B image-to-video (`--image`), Wan 2.1 FLF2V (`--image --last-image`) and TI2V-5B
    text-to-video: the RLG pipeline, a grid row per scale whose frames are the videos' (5 at `--num-frames 5`),
    every video written."""
    from diffalign import generate
    from diffalign.plotting import find_video, read_video

    model = family.save_tiny(str(tmp_path / "model"), version=version)
    trained = family_for_pipeline(family.load(model))
    add_lora(trained.denoiser, target_modules=trained.default_lora_target_modules)
    _randomise_lora(trained.denoiser)
    trained.save_lora(trained.denoiser, str(tmp_path / "lora"))
    out = tmp_path / "out"
    argv = ["--model", model, "--lora", str(tmp_path / "lora"), "--prompt", "a cat", "--rlg-scale", "0", "1.5",
            "--num-images", "2", "--steps", "2", "--resolution", str(side), "--num-frames", "5",
            "--output-dir", str(out)]
    if family.requires_condition_image:
        IMAGE.save(str(tmp_path / "first.png"))
        argv += ["--image", str(tmp_path / "first.png")]
    if version == "2.1-flf2v":
        LAST.save(str(tmp_path / "last.png"))
        argv += ["--last-image", str(tmp_path / "last.png")]
    assert generate.run(generate.add_arguments(argparse.ArgumentParser()).parse_args(argv)) == 0
    frames = read_video(find_video(str(out / "rlg_grid.png")))
    assert len(frames) == 5
    written = sorted(os.listdir(out / "rlg_images" / "w1.5"))
    assert len(written) == 2 and all(name.startswith("p00_seed") for name in written)
    pipe = generate.load_rlg_pipeline(model, lora=str(tmp_path / "lora"), device="cpu")
    assert type(pipe).__name__ == expected
    assert pipe.config.expand_timesteps == (version == "2.2-ti2v")


def test_generate_refuses_a_last_image_in_one_line(tmp_path, tiny_model_dir, capsys):
    """`--last-image`: a family that takes no last frame (through the CLI: one line, exit code 2), one without
    `--image`, a missing file; and (the family's check) a Wan image-to-video model that is not FLF2V."""
    from diffalign import generate
    from diffalign.cli import main
    from diffalign.errors import ConfigError, PromptError
    from diffalign.families import FAMILIES

    IMAGE.save(str(tmp_path / "first.png"))
    first = str(tmp_path / "first.png")
    assert main(["generate", "--model", tiny_model_dir, "--prompt", "a cat", "--rlg-scale", "1", "--last-image", first,
                 "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sd models take no last frame" in err[0], err
    cases = [(FAMILIES["FluxKontextPipeline"], first, first, ConfigError, "flux_kontext models take no last frame"),
             (WanImageToVideoFamily, None, first, ConfigError, "give --image too"),
             (WanImageToVideoFamily, first, str(tmp_path / "gone.png"), PromptError, "gone.png' does not exist")]
    for family, image, last, error_class, message in cases:
        with pytest.raises(error_class, match=message) as error:
            generate.check_image_flag(family, image, last)
        assert "\n" not in str(error.value)
    generate.check_image_flag(WanImageToVideoFamily, first, first)
    pipe = WanImageToVideoFamily.tiny_pipeline()  # Wan 2.1 I2V, not FLF2V
    with pytest.raises(PromptError, match="takes no last frame"):
        generate.edit_call_kwargs(WanImageToVideoFamily, pipe, first, 16, last_image=first)


I2V_A14B_BOUNDARY = 0.9  # Wan 2.2 I2V-A14B's boundary_ratio: of 3 steps at shift 7, the last two are low-noise


def _i2v_a14b_model(directory) -> str:
    """The tiny Wan 2.2 I2V-A14B on disk, with I2V-A14B's boundary (the tiny model's own 0.03 sends every step to
    `transformer`)."""
    return WanImageToVideoFamily.save_tiny(str(directory), version="2.2-i2v-a14b", boundary_ratio=I2V_A14B_BOUNDARY)


def _stock_i2v(model, *loads):
    """WanImageToVideoPipeline's video of `model` after `pipe.load_lora_weights(*args, **kwargs)` of each
    `(args, kwargs)` in `loads`, as a user loads a run's files."""
    import diffusers

    pipe = diffusers.WanImageToVideoPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    for args, kwargs in loads:
        pipe.load_lora_weights(*args, **kwargs)
    return pipe(generator=torch.Generator().manual_seed(0), **I2V_A14B_CALL).frames


I2V_A14B_CALL = dict(image=IMAGE, prompt="a cat", num_inference_steps=3, height=16, width=16, num_frames=5,
                     output_type="pt", guidance_scale=3.0, guidance_scale_2=2.0)


def _check_generate_guides_each_expert(model, lora):
    """`generate.load_rlg_pipeline` on the I2V-A14B `model` with the run directory `lora`: w = 0 is
    WanImageToVideoPipeline without a LoRA, w = 1 the same after `load_lora_weights` of each expert's file the
    directory holds (the low-noise one with `load_into_transformer_2=True`), at 1e-4; each LoRA changes the video."""
    from diffalign import generate
    from diffalign.utils.peft_utils import LORA_WEIGHT_NAME, LOW_NOISE_LORA_WEIGHT_NAME

    files = set(os.listdir(lora))
    loads = ([((lora,), {})] if LORA_WEIGHT_NAME in files else []) + (
        [((lora,), {"weight_name": LOW_NOISE_LORA_WEIGHT_NAME, "load_into_transformer_2": True})]
        if LOW_NOISE_LORA_WEIGHT_NAME in files else [])
    pipe = generate.load_rlg_pipeline(model, lora=lora, device="cpu")
    assert type(pipe).__name__ == "WanImageToVideoRLGPipeline"
    assert [bool(getattr(getattr(pipe, expert), "peft_config", None)) for expert in ("transformer", "transformer_2")] \
        == [LORA_WEIGHT_NAME in files, LOW_NOISE_LORA_WEIGHT_NAME in files]

    def rlg(w):
        return pipe(generator=torch.Generator().manual_seed(0), rlg_scale=w, **I2V_A14B_CALL).frames

    base = _stock_i2v(model)
    torch.testing.assert_close(rlg(0.0), base, atol=1e-4, rtol=1e-4)
    aligned = _stock_i2v(model, *loads)
    torch.testing.assert_close(rlg(1.0), aligned, atol=1e-4, rtol=1e-4)
    for load in loads:  # each expert's LoRA changes its own part of the trajectory
        assert (_stock_i2v(model, load) - base).abs().max() > 1e-4
    assert (rlg(1.5) - aligned).abs().max() > 1e-4


@pytest.fixture(scope="module")
def i2v_a14b_run(tmp_path_factory):
    """The tiny I2V-A14B on disk and a run directory with a random LoRA of each expert, saved as a `train_experts:
    both` run saves them."""
    root = tmp_path_factory.mktemp("i2v_a14b")
    model = _i2v_a14b_model(root / "model")
    family = family_for_pipeline(WanImageToVideoFamily.load(model))
    family.configure(train_experts="both")
    add_lora(family.denoiser, target_modules=family.default_lora_target_modules)
    _randomise_lora(family.denoiser)  # both experts' adapters
    lora = str(root / "lora")
    family.save_lora(family.denoiser, lora)
    return model, lora


def test_generate_guides_both_experts_of_i2v_a14b(i2v_a14b_run):
    """A `train_experts: both` directory: `generate` loads the low-noise LoRA into `transformer_2` and the RLG
    pipeline mixes on both experts (it used to refuse the directory)."""
    from diffalign.utils.peft_utils import LORA_WEIGHT_NAME, LOW_NOISE_LORA_WEIGHT_NAME

    model, lora = i2v_a14b_run
    assert sorted(os.listdir(lora)) == [LORA_WEIGHT_NAME, LOW_NOISE_LORA_WEIGHT_NAME]
    _check_generate_guides_each_expert(model, lora)


def test_generate_guides_the_low_noise_expert_alone_of_i2v_a14b(i2v_a14b_run, tmp_path):
    """A `train_experts: low_noise` directory: `transformer` has no adapter and samples as configured at every scale;
    RLG mixes on `transformer_2`."""
    from diffalign.utils.peft_utils import LOW_NOISE_LORA_WEIGHT_NAME

    model, lora = i2v_a14b_run
    (tmp_path / "low").mkdir()
    os.symlink(os.path.join(lora, LOW_NOISE_LORA_WEIGHT_NAME), tmp_path / "low" / LOW_NOISE_LORA_WEIGHT_NAME)
    _check_generate_guides_each_expert(model, str(tmp_path / "low"))


def test_a_low_noise_lora_for_a_one_expert_model_is_one_line(tmp_path):
    """Where no second expert exists (Wan 2.1 I2V), a low-noise file is still refused in one line."""
    from diffalign import generate
    from diffalign.errors import ModelError
    from diffalign.utils.peft_utils import LOW_NOISE_LORA_WEIGHT_NAME

    model = WanImageToVideoFamily.save_tiny(str(tmp_path / "model"))
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / LOW_NOISE_LORA_WEIGHT_NAME).write_bytes(b"")
    with pytest.raises(ModelError, match="this model has one expert") as error:
        generate.load_rlg_pipeline(model, lora=str(lora), device="cpu")
    assert "\n" not in str(error.value)


def test_a_fully_fine_tuned_low_noise_expert_is_the_stock_pipeline_on_it_at_1():
    """`aligned_transformer_2` (a full fine-tune of I2V-A14B's low-noise expert): w = 0 samples the base experts,
    w = 1 the stock pipeline with the fine-tune as `transformer_2`, bit for bit; `transformer` has no aligned model
    and samples as configured."""
    import copy

    import diffusers

    import diffalign.pipelines

    components = WanImageToVideoFamily.tiny_components(version="2.2-i2v-a14b")
    components["boundary_ratio"] = I2V_A14B_BOUNDARY
    aligned = copy.deepcopy(components["transformer_2"])
    with torch.no_grad():
        for param in aligned.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))

    def sample(pipe, **rlg_kwargs):
        pipe.set_progress_bar_config(disable=True)
        return pipe(generator=torch.Generator().manual_seed(0), **I2V_A14B_CALL, **rlg_kwargs).frames

    rlg = diffalign.pipelines.WanImageToVideoRLGPipeline(**components, aligned_transformer_2=aligned)
    base = sample(diffusers.WanImageToVideoPipeline(**components))
    tuned = sample(diffusers.WanImageToVideoPipeline(**{**components, "transformer_2": aligned}))
    assert (tuned - base).abs().max() > 1e-3
    assert torch.equal(sample(rlg, rlg_scale=0.0), base)
    assert torch.equal(sample(rlg, rlg_scale=1.0), tuned)


def test_the_low_noise_experts_lora_is_checked_like_the_first():
    """`check_rlg_inputs` on a LoRA of `transformer_2`: disabled or fused adapters, and a dict naming an adapter that
    expert lacks, are each a `ValueError` naming the expert; no aligned model on either expert names both."""
    import diffalign.pipelines

    components = WanImageToVideoFamily.tiny_components(version="2.2-i2v-a14b")
    components["boundary_ratio"] = I2V_A14B_BOUNDARY
    pipe = diffalign.pipelines.WanImageToVideoRLGPipeline(**components)
    with pytest.raises(ValueError, match="no `aligned_transformer` or `aligned_transformer_2` and no LoRA adapter on"
                                         " `transformer` or `transformer_2`"):
        pipe.check_rlg_inputs(0.0, 0.0, 1.0)
    pipe.check_rlg_inputs(1.0, 0.0, 1.0)  # w = 1: the experts as configured
    add_lora(components["transformer"], target_modules=WanFamily.default_lora_target_modules, adapter_name="a")
    add_lora(components["transformer_2"], target_modules=WanFamily.default_lora_target_modules, adapter_name="b")
    with pytest.raises(ValueError, match=r"Unknown LoRA adapter\(s\) \['b'\] of `transformer`"):
        pipe.check_rlg_inputs({"a": 1.0, "b": 1.0}, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"Unknown LoRA adapter\(s\) \['a'\] of `transformer_2`"):
        pipe.check_rlg_inputs({"a": 1.0}, 0.0, 1.0)
    components["transformer_2"].disable_adapters()
    with pytest.raises(ValueError, match="The LoRA adapters of `transformer_2` are disabled"):
        pipe.check_rlg_inputs(0.0, 0.0, 1.0)
    components["transformer_2"].enable_adapters()
    pipe.check_rlg_inputs(0.0, 0.0, 1.0)
    from peft.tuners.lora import LoraLayer

    for layer in components["transformer_2"].modules():
        if isinstance(layer, LoraLayer):
            layer.merge()
    with pytest.raises(ValueError, match="The LoRA adapters are fused into `transformer_2`"):
        pipe.check_rlg_inputs(0.0, 0.0, 1.0)


@pytest.mark.slow  # ~20 s: a 2-epoch ddpo run on the tiny I2V-A14B
def test_cli_trains_both_experts_of_i2v_a14b_and_generate_guides_them(tmp_path):
    """`train ddpo --train_experts both` on the tiny I2V-A14B (wan_i2v inherits Wan's two-expert training): a LoRA file
    per expert, each changing WanImageToVideoPipeline's video, and `generate`'s RLG pipeline on the run directory is
    the stock pipeline without them at w = 0 and with both at w = 1."""
    import json

    from diffalign.cli import main
    from diffalign.utils.peft_utils import LORA_WEIGHT_NAME, LOW_NOISE_LORA_WEIGHT_NAME

    model = _i2v_a14b_model(tmp_path / "model")
    IMAGE.save(str(tmp_path / "first.png"))
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p, "image": "first.png"}) + "\n" for p in ("a cat", "a car")))
    out = tmp_path / "run"
    assert main(["train", "ddpo", "--model", model, "--output_dir", str(out), "--num_epochs", "2",
                 "--sample_num_steps", "3", "--sample_num_prompts_per_epoch", "2", "--sample_images_per_prompt", "2",
                 "--sample_batch_size", "4", "--train_batch_size", "4", "--grid_num_images", "2",
                 "--checkpoint_every", "2", "--seed", "3", "--reward", "jpeg_compressibility", "--prompt_file",
                 str(prompt_file), "--train_learning_rate", "0.05", "--sample_guidance_scale", "3.0",
                 "--sample_resolution", "16", "--num_frames", "5", "--final_eval_num_images", "0",
                 "--sample_compute_kl", "false", "--train_experts", "both"]) == 0
    final = str(out / "final")
    assert {LORA_WEIGHT_NAME, LOW_NOISE_LORA_WEIGHT_NAME} <= set(os.listdir(final))
    _check_generate_guides_each_expert(model, final)


def test_i2v_a14b_card_loads_every_trained_expert_into_the_rlg_pipeline(i2v_a14b_run, tmp_path, monkeypatch):
    """The card of a `train_experts: both` I2V-A14B run: its RLG snippet loads both files into
    `WanImageToVideoRLGPipeline` (the plain snippet's load lines) and runs; a full fine-tune's passes both experts as
    `aligned_transformer` and `aligned_transformer_2`."""
    from diffalign.config import DDPOConfig
    from diffalign.modelcard import usage_snippets
    from diffalign.prompts import ConditionedPrompt

    model, lora = i2v_a14b_run
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(lora, run / "final")
    IMAGE.save(str(run / "first.png"))
    family = family_for_pipeline(WanImageToVideoFamily.load(model))
    config = DDPOConfig(model=model, output_dir=str(run), num_frames=5, sample_num_steps=2, train_experts="both")
    prompt = ConditionedPrompt("a cat", (str(run / "first.png"),))
    plain, rlg = usage_snippets(config, family, prompt, "final", 16)
    loads = [line for line in plain.splitlines() if "load_lora_weights" in line]
    assert len(loads) == 2 and [line for line in rlg.splitlines() if "load_lora_weights" in line] == loads
    monkeypatch.chdir(run)  # the card's local paths are relative to the run directory
    monkeypatch.setattr("diffusers.utils.export_to_video", lambda frames, path, fps: path)  # no video written
    scope = {}
    exec(rlg, scope)
    assert type(scope["pipe"]).__name__ == "WanImageToVideoRLGPipeline"
    assert sorted(scope["pipe"].get_list_adapters()) == ["transformer", "transformer_2"]
    assert len(scope["video"]) == 5
    config.use_lora = False
    rlg = usage_snippets(config, family, prompt, "final", 16)[1]
    assert "aligned_transformer=transformer, aligned_transformer_2=transformer_2)" in rlg


def test_generate_video_grid_shows_the_condition_images_before_each_video(tmp_path, monkeypatch):
    """`generate`'s animated grid (Wan 2.1 FLF2V, `--image --last-image`): each video after its first and last frame,
    standing still (resized to the video's size) through every frame of the grid, as the image grids show an edit
    after its inputs."""
    from diffalign import generate, plotting
    from diffalign.plotting import find_video, read_video
    from diffalign.prompts import load_condition_tensor

    model = WanImageToVideoFamily.save_tiny(str(tmp_path / "model"), version="2.1-flf2v")
    IMAGE.save(str(tmp_path / "first.png"))
    LAST.save(str(tmp_path / "last.png"))
    sampled, grid_rows = [], []
    sample_scales, rows_grid = generate.sample_scales, plotting.rows_grid
    monkeypatch.setattr(generate, "sample_scales",
                        lambda *a, **k: sampled.append(sample_scales(*a, **k)) or sampled[0])
    monkeypatch.setattr(plotting, "rows_grid",
                        lambda rows, *a, **k: grid_rows.append((rows, k)) or rows_grid(rows, *a, **k))
    out = tmp_path / "out"
    argv = ["--model", model, "--prompt", "a cat", "--rlg-scale", "1", "--num-images", "1", "--steps", "2",
            "--resolution", "16", "--num-frames", "5", "--image", str(tmp_path / "first.png"), "--last-image",
            str(tmp_path / "last.png"), "--output-dir", str(out)]
    assert generate.run(generate.add_arguments(argparse.ArgumentParser()).parse_args(argv)) == 0
    video = sampled[0][1.0][0]  # (F, 3, H, W)
    assert len(grid_rows) == video.shape[0] == len(read_video(find_video(str(out / "rlg_grid.png")))) == 5
    conditions = [torch.nn.functional.interpolate(load_condition_tensor(str(tmp_path / name))[None], size=(16, 16),
                                                  mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)[0]
                  for name in ("first.png", "last.png")]
    for frame, (rows, kwargs) in enumerate(grid_rows):
        (tiles,) = rows  # one scale
        assert kwargs["max_per_row"] == generate.GRID_PER_ROW * 3  # per video: the first frame, the last, the video
        torch.testing.assert_close(tiles[0], conditions[0])
        torch.testing.assert_close(tiles[1], conditions[1])
        assert torch.equal(tiles[2], video[frame])
