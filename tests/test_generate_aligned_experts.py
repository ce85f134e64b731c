"""`diffalign generate --aligned-denoiser DIR` with a Wan 2.2 A14B full fine-tune (`use_lora: false`,
`train_experts: low_noise | both`: `DIR/transformer` and/or `DIR/transformer_2`): every expert the fine-tune wrote is
the RLG pipeline's `aligned_<expert>`. I2V-A14B takes `WanImageToVideoRLGPipeline`; T2V-A14B, whose LoRA route is the
guider in `Wan22Blocks` (which switches adapters, not models), takes `WanRLGPipeline`. On the tiny models (T2V boundary
0.875: 2 steps on `transformer`, 1 on `transformer_2`; I2V boundary 0.9: 1 and 2) w = 0 is the stock pipeline on the
base and w = 1 the stock pipeline on the fine-tuned experts, bit for bit; the same for Wan 2.1 and TI2V-5B
text-to-video with one expert in `WanRLGPipeline`; bad directories are one line (exit 2)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign import generate
from diffalign.families import WanFamily, WanImageToVideoFamily

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8))
CALL = dict(prompt="a cat", num_inference_steps=3, height=16, width=16, num_frames=5, output_type="pt",
            guidance_scale=3.0, guidance_scale_2=2.0)
MODELS = {  # family, tiny version, A14B's boundary_ratio (the tiny models' 0.03 sends every step to `transformer`),
    # stock pipeline, RLG pipeline, extra call arguments
    "t2v-a14b": (WanFamily, "2.2-a14b", 0.875, "WanPipeline", "WanRLGPipeline", {}),
    "i2v-a14b": (WanImageToVideoFamily, "2.2-i2v-a14b", 0.9, "WanImageToVideoPipeline", "WanImageToVideoRLGPipeline",
                 {"image": IMAGE}),
}


def _save_model(kind, directory) -> str:
    """The tiny A14B of `kind` on disk, with the published model's boundary."""
    family, version, boundary = MODELS[kind][:3]
    return family.save_tiny(str(directory), version=version, boundary_ratio=boundary)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each tiny A14B on disk and a full fine-tune of it as a run's `final/` holds one: `transformer_2/` and
    `transformer/`, each a perturbed copy of the model's expert (safetensors)."""
    from diffusers import WanTransformer3DModel

    root = tmp_path_factory.mktemp("aligned_experts")
    out = {}
    for seed, kind in enumerate(MODELS):
        model = _save_model(kind, root / kind)
        final = root / f"{kind}-final"
        for expert in ("transformer", "transformer_2"):
            tuned = WanTransformer3DModel.from_pretrained(model, subfolder=expert)
            generator = torch.Generator().manual_seed(seed * 2 + len(expert))
            with torch.no_grad():
                for param in tuned.parameters():
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))
            tuned.save_pretrained(str(final / expert))  # safetensors
        out[kind] = model, str(final)
    return out


def _only(final, experts, directory) -> str:
    """A fine-tune directory with only `experts`' folders of `final` (a `low_noise` run writes `transformer_2/`)."""
    os.makedirs(directory)
    for expert in experts:
        os.symlink(os.path.join(final, expert), os.path.join(directory, expert))
    return str(directory)


def _stock(kind, model, **experts):
    """The stock diffusers pipeline's video of `model`, with `experts` (fine-tuned transformers) in place of its own."""
    import diffusers

    pipe = getattr(diffusers, MODELS[kind][3]).from_pretrained(model, **experts)
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=torch.Generator().manual_seed(0), **CALL, **MODELS[kind][5]).frames


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("trained", [("transformer_2",), ("transformer", "transformer_2")],
                         ids=["low_noise", "both"])
def test_every_fine_tuned_expert_is_aligned_base_at_0_fine_tune_at_1(models, kind, trained, tmp_path):
    from diffusers import WanTransformer3DModel

    model, final = models[kind]
    aligned_dir = _only(final, trained, tmp_path / "final")
    pipe = generate.load_rlg_pipeline(model, aligned_denoiser=aligned_dir, device="cpu", dtype="float32")
    assert type(pipe).__name__ == MODELS[kind][4]
    assert [getattr(pipe, f"aligned_{expert}") is not None for expert in ("transformer", "transformer_2")] == \
        [expert in trained for expert in ("transformer", "transformer_2")]

    def rlg(w):
        return pipe(generator=torch.Generator().manual_seed(0), rlg_scale=w, **CALL, **MODELS[kind][5]).frames

    tuned = {expert: WanTransformer3DModel.from_pretrained(final, subfolder=expert) for expert in trained}
    base, aligned = _stock(kind, model), _stock(kind, model, **tuned)
    assert (aligned - base).abs().max() > 1e-3
    assert torch.equal(rlg(0.0), base)
    assert torch.equal(rlg(1.0), aligned)
    if trained == ("transformer", "transformer_2"):
        # each expert's fine-tune shows: the low-noise one alone is neither the base nor both
        low_only = _stock(kind, model, transformer_2=tuned["transformer_2"])
        assert (low_only - base).abs().max() > 1e-3 and (aligned - low_only).abs().max() > 1e-3
        assert (rlg(1.5) - aligned).abs().max() > 1e-4  # w > 1 extrapolates


@pytest.mark.parametrize("version,side", [("2.1", 16), ("2.2-ti2v", 32)], ids=["wan21", "ti2v_5b"])
def test_a_one_expert_text_to_video_fine_tune_takes_wan_rlg_pipeline(tmp_path, version, side):
    """Wan 2.1 and TI2V-5B (`expand_timesteps`) text-to-video, whose LoRA routes are the guider and `WanRLGPipeline`:
    a fine-tuned `transformer/` takes `WanRLGPipeline`, w = 0 / 1 = WanPipeline on the base / the fine-tune."""
    import diffusers

    model = WanFamily.save_tiny(str(tmp_path / "model"), version=version)
    tuned = diffusers.WanTransformer3DModel.from_pretrained(model, subfolder="transformer")
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    tuned.save_pretrained(str(tmp_path / "final" / "transformer"))
    pipe = generate.load_rlg_pipeline(model, aligned_denoiser=str(tmp_path / "final"), device="cpu", dtype="float32")
    assert type(pipe).__name__ == "WanRLGPipeline" and pipe.aligned_transformer_2 is None
    call = dict(prompt="a cat", num_inference_steps=2, height=side, width=side, num_frames=5, output_type="pt",
                guidance_scale=3.0)

    def video(pipe, **kwargs):
        pipe.set_progress_bar_config(disable=True)
        return pipe(generator=torch.Generator().manual_seed(0), **call, **kwargs).frames

    base = video(diffusers.WanPipeline.from_pretrained(model))
    aligned = video(diffusers.WanPipeline.from_pretrained(model, transformer=tuned))
    assert (aligned - base).abs().max() > 1e-3
    assert torch.equal(video(pipe, rlg_scale=0.0), base) and torch.equal(video(pipe, rlg_scale=1.0), aligned)


def test_bad_aligned_directories_are_one_line(models, tmp_path, capsys):
    """A `transformer_2/` for a one-expert model (Wan 2.1 T2V through `WanRLGPipeline`, Wan 2.1 I2V), and a
    directory with no expert's folder, are one line with exit code 2."""
    from cli_helpers import one_line

    from diffalign.cli import main

    model, final = models["t2v-a14b"]
    low = _only(final, ["transformer_2"], tmp_path / "low")
    empty = tmp_path / "empty"
    empty.mkdir()
    wan21 = WanFamily.save_tiny(str(tmp_path / "wan21"))
    wan21_i2v = WanImageToVideoFamily.save_tiny(str(tmp_path / "wan21_i2v"))
    IMAGE.save(str(tmp_path / "first.png"))
    one_expert = "has transformer_2/, a second (low-noise) expert's fine-tune, but this model has one expert"
    for model_dir, aligned_dir, extra, message in (
            (wan21, low, [], one_expert),
            (wan21_i2v, low, ["--image", str(tmp_path / "first.png")], one_expert),
            (model, str(empty), [], "is neither a WanTransformer3DModel directory nor a model directory with "
                                    "transformer/ or transformer_2/")):
        args = ["generate", "--model", model_dir, "--aligned-denoiser", aligned_dir, "--prompt", "a cat", "--steps",
                "1", "--resolution", "16", "--num-frames", "5", "--output-dir", str(tmp_path / "out"), *extra]
        assert main(args) == 2
        assert message in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_full_fine_tune_card_rlg_snippet_is_generates_route(models, tmp_path, monkeypatch):
    """A T2V-A14B full fine-tune's card (`train_experts: both`) has the RLG snippet generate runs: `WanRLGPipeline`
    with both experts as `aligned_transformer` / `aligned_transformer_2`; it runs on the run's `final/`."""
    from diffalign.config import DDPOConfig
    from diffalign.modelcard import usage_snippets

    model, final = models["t2v-a14b"]
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(final, run / "final")
    config = DDPOConfig(model=model, output_dir=str(run), num_frames=5, sample_num_steps=2, train_experts="both",
                        use_lora=False)
    plain, rlg = usage_snippets(config, WanFamily, "a cat", "final", 16)
    assert "WanRLGPipeline.from_pretrained(" in rlg
    assert "aligned_transformer=transformer, aligned_transformer_2=transformer_2)" in rlg
    monkeypatch.chdir(run)  # the card's local paths are relative to the run directory
    monkeypatch.setattr("diffusers.utils.export_to_video", lambda frames, path, fps: path)  # no video written
    scope = {}
    exec(rlg, scope)
    pipe = generate.load_rlg_pipeline(model, aligned_denoiser=final, device="cpu", dtype="float32")
    assert type(scope["pipe"]) is type(pipe)
    for expert in ("aligned_transformer", "aligned_transformer_2"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(scope["pipe"], expert).state_dict().values(),
                                                      getattr(pipe, expert).state_dict().values()))
    assert len(scope["video"]) == 5
