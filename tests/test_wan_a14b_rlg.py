"""RLG on both experts of Wan 2.2 A14B (`train_experts` low_noise / both): `diffalign generate --lora DIR` loads the
high-noise LoRA into `transformer` and the low-noise one into `transformer_2` (either alone will do), and the modular
route (`Wan22Blocks`) puts the RLG guider on each expert that carries the adapter. On the tiny A14B with WanPipeline's
boundary 0.875 (three steps: two on `transformer`, one on `transformer_2`, with `guidance_scale_2`): w = 0 is
WanPipeline without the LoRAs, w = 1 WanPipeline after `load_lora_weights` of each file, and bit for bit the modular
pipeline with the model's CFG guiders, adapters off / on on both experts; bad directories are one line (exit 2)."""

import os

import pytest
import torch

from diffalign import generate
from diffalign.errors import ModelError
from diffalign.families import WanFamily, family_for_pipeline
from diffalign.guiders import ReinforcementLearningGuidance
from diffalign.utils.peft_utils import LORA_WEIGHT_NAME, LOW_NOISE_LORA_WEIGHT_NAME, add_lora

PROMPT = "a photo of a cat"
BOUNDARY = 0.875  # Wan 2.2 T2V-A14B's boundary_ratio (the tiny model's own 0.03 sends every step to `transformer`)
CALL = dict(num_inference_steps=3, height=16, width=16, num_frames=5, guidance_scale=3.0, guidance_scale_2=2.0,
            output_type="pt")


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    """The tiny A14B on disk (boundary 0.875) and a directory with a random LoRA of each expert, saved as a
    `train_experts: both` run saves them."""
    root = tmp_path_factory.mktemp("a14b")
    model = WanFamily.save_tiny(str(root / "wan"), version="2.2-a14b", boundary_ratio=BOUNDARY)
    family = family_for_pipeline(WanFamily.tiny_pipeline(version="2.2-a14b"))
    family.configure(train_experts="both")
    add_lora(family.denoiser, target_modules=family.default_lora_target_modules)
    generator = _generator(1)
    for param in family.denoiser.parameters():
        if param.requires_grad:  # both experts' adapters
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    lora = str(root / "lora")
    family.save_lora(family.denoiser, lora)
    assert sorted(os.listdir(lora)) == [LORA_WEIGHT_NAME, LOW_NOISE_LORA_WEIGHT_NAME]
    return model, lora


def _wan_pipeline(model):
    """WanPipeline of `model`, as a user loads it."""
    import diffusers

    pipe = diffusers.WanPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _video(pipe):
    return pipe(prompt=PROMPT, generator=_generator(), **CALL).frames


def _rlg(pipe, w):
    return pipe(prompt=PROMPT, generator=_generator(), rlg_scale=w, **CALL).images


def _lora_only(lora, weight_name, directory):
    """A run directory holding only `weight_name` of `lora`."""
    os.makedirs(directory)
    os.symlink(os.path.join(lora, weight_name), os.path.join(directory, weight_name))
    return str(directory)


def _plain_modular(rlg):
    """The modular pipeline with the model's own CFG guiders on both experts: WanPipeline's sampling in the blocks."""
    modular = rlg.modular_pipeline
    modular.update_components(guider=WanFamily.modular_cfg_guider(CALL["guidance_scale"]),
                              guider_2=WanFamily.modular_cfg_guider(CALL["guidance_scale_2"]))
    kwargs = {k: v for k, v in CALL.items() if k not in ("guidance_scale", "guidance_scale_2")}
    return modular(prompt=PROMPT, generator=_generator(), output="videos", **kwargs)


def test_rlg_guides_both_experts_base_at_0_and_both_loras_at_1(a14b):
    model, lora = a14b
    pipe = generate.load_rlg_pipeline(model, lora=lora, device="cpu", dtype="float32")
    transformer, transformer_2 = pipe.components["transformer"], pipe.components["transformer_2"]
    assert list(transformer.peft_config) == list(transformer_2.peft_config) == ["aligned"]
    at_0, at_1 = _rlg(pipe, 0.0), _rlg(pipe, 1.0)
    guiders = pipe.modular_pipeline.components
    assert isinstance(guiders["guider"], ReinforcementLearningGuidance)
    assert isinstance(guiders["guider_2"], ReinforcementLearningGuidance)
    assert guiders["guider_2"].guidance_scale == CALL["guidance_scale_2"]

    stock = _wan_pipeline(model)
    base = _video(stock)
    torch.testing.assert_close(at_0, base, atol=1e-4, rtol=1e-4)
    stock.load_lora_weights(lora)
    high_only = _video(stock)
    stock.load_lora_weights(lora, weight_name=LOW_NOISE_LORA_WEIGHT_NAME, load_into_transformer_2=True)
    aligned = _video(stock)
    torch.testing.assert_close(at_1, aligned, atol=1e-4, rtol=1e-4)
    # each expert's LoRA shows: the high-noise one alone is neither the base nor both
    assert (high_only - base).abs().max() > 1e-3 and (aligned - high_only).abs().max() > 1e-3

    # bit for bit: the blocks with the model's CFG guiders, adapters off on both experts (w = 0) and on (w = 1)
    for expert in (transformer, transformer_2):
        expert.disable_adapters()
    assert torch.equal(at_0, _plain_modular(pipe))
    for expert in (transformer, transformer_2):
        expert.enable_adapters()
    assert torch.equal(at_1, _plain_modular(pipe))
    assert (_rlg(pipe, 1.5) - at_1).abs().max() > 1e-4  # w > 1 extrapolates


def test_a_low_noise_lora_alone_guides_transformer_2_only(a14b, tmp_path):
    model, lora = a14b
    low = _lora_only(lora, LOW_NOISE_LORA_WEIGHT_NAME, tmp_path / "low")
    pipe = generate.load_rlg_pipeline(model, lora=low, device="cpu", dtype="float32")
    assert not getattr(pipe.components["transformer"], "peft_config", None)
    assert list(pipe.components["transformer_2"].peft_config) == ["aligned"]
    at_0, at_1 = _rlg(pipe, 0.0), _rlg(pipe, 1.0)
    guiders = pipe.modular_pipeline.components
    assert not isinstance(guiders["guider"], ReinforcementLearningGuidance)  # the untrained expert: its CFG alone
    assert isinstance(guiders["guider_2"], ReinforcementLearningGuidance)

    stock = _wan_pipeline(model)
    base = _video(stock)
    torch.testing.assert_close(at_0, base, atol=1e-4, rtol=1e-4)
    stock.load_lora_weights(low, weight_name=LOW_NOISE_LORA_WEIGHT_NAME, load_into_transformer_2=True)
    aligned = _video(stock)
    torch.testing.assert_close(at_1, aligned, atol=1e-4, rtol=1e-4)
    assert (aligned - base).abs().max() > 1e-3


def test_bad_expert_lora_directories_are_one_line(a14b, tmp_path, capsys):
    from cli_helpers import one_line

    from diffalign.cli import main

    model, lora = a14b
    wan21 = WanFamily.save_tiny(str(tmp_path / "wan21"))
    low = _lora_only(lora, LOW_NOISE_LORA_WEIGHT_NAME, tmp_path / "low")
    empty = tmp_path / "empty"
    empty.mkdir()
    for model_dir, lora_dir, message in (
            (wan21, low, f"has {LOW_NOISE_LORA_WEIGHT_NAME}, a second (low-noise) expert's LoRA, but this model has "
                         "one expert"),
            (wan21, lora, "but this model has one expert"),
            (model, str(empty), f"has neither {LORA_WEIGHT_NAME} nor {LOW_NOISE_LORA_WEIGHT_NAME}")):
        args = ["generate", "--model", model_dir, "--lora", lora_dir, "--prompt", PROMPT, "--steps", "1",
                "--resolution", "16", "--num-frames", "5", "--output-dir", str(tmp_path / "out")]
        assert main(args) == 2
        assert message in one_line(capsys.readouterr().err)
    with pytest.raises(ModelError, match="does not match the model's transformer_2"):
        # a LoRA of other modules than the expert has: peft finds no target
        bad = tmp_path / "bad"
        bad.mkdir()
        from safetensors.torch import save_file

        save_file({"transformer.nowhere.lora_A.weight": torch.zeros(4, 8),
                   "transformer.nowhere.lora_B.weight": torch.zeros(8, 4)},
                  str(bad / LOW_NOISE_LORA_WEIGHT_NAME))
        generate.load_rlg_pipeline(model, lora=str(bad), device="cpu", dtype="float32")


@pytest.mark.parametrize("train_experts", ["both", "low_noise"])
def test_card_rlg_snippet_loads_every_trained_expert(a14b, tmp_path, monkeypatch, train_experts):
    """The model card's RLG snippet (the guider route) loads the run's LoRA files as its plain snippet does, and runs:
    each trained expert carries the adapter the guider switches."""
    from diffalign.config import DDPOConfig
    from diffalign.guiders import ModularRLGPipeline
    from diffalign.modelcard import usage_snippets

    model, lora = a14b
    final = tmp_path / "run" / "final"
    final.parent.mkdir()
    os.symlink(lora, final)
    config = DDPOConfig(model=model, num_frames=5, sample_num_steps=2, train_experts=train_experts,
                         output_dir=str(final.parent))
    plain, rlg = usage_snippets(config, WanFamily, PROMPT, "final", 16)
    loads = [line for line in plain.splitlines() if "load_lora_weights" in line]
    assert len(loads) == (2 if train_experts == "both" else 1)
    assert [line for line in rlg.splitlines() if "load_lora_weights" in line] == \
        loads[:-1] + [loads[-1] + "  # adapter on = this fine-tune, off = the base model"]
    monkeypatch.chdir(final.parent)  # the card's local paths are relative to the run directory
    scope = {}
    exec(rlg, scope)
    assert isinstance(scope["rlg"], ModularRLGPipeline)
    adapters = scope["pipe"].get_list_adapters()
    assert sorted(adapters) == (["transformer", "transformer_2"] if train_experts == "both" else ["transformer_2"])
    assert scope["video"].shape[0] == 5
