"""The model card in `final/` (front matter, results table, grid, usage snippets that run) and the push to the Hub."""

import json
import os
import re

import pytest
import yaml

from diffalign.cli import main
from diffalign.config import PRDPConfig
from diffalign.modelcard import base_license, base_model_id

DIGITS_ARGS = [
    "--model", "digits", "--prompt_fn", "digits", "--reward", "digit_correctness", "--num_epochs", "2",
    "--sample_num_steps", "3", "--sample_num_prompts_per_epoch", "2", "--sample_images_per_prompt", "2",
    "--train_num_inner_epochs", "1", "--grid_num_images", "2", "--final_eval_num_images", "2",
]


def front_matter_and_body(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text.startswith("---\n")
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def python_blocks(body):
    return re.findall(r"```python\n(.*?)```", body, re.S)


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory):
    """A digits LoRA run with push_to_hub while the Hub is offline (conftest sets HF_HUB_OFFLINE=1)."""
    out = str(tmp_path_factory.mktemp("card") / "digits-prdp")
    capture = pytest.MonkeyPatch()
    import io
    import sys

    err = io.StringIO()
    capture.setattr(sys, "stderr", err)
    try:
        code = main(["train", "prdp", "--output_dir", out, "--push_to_hub", "--hub_model_id", "someone/digits-prdp"]
                    + DIGITS_ARGS)
    finally:
        capture.undo()
    return out, code, err.getvalue()


def test_offline_push_is_one_line_and_loses_nothing(pushed_run):
    out, code, err = pushed_run
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("diffalign: error:")]
    assert len(lines) == 1, err
    assert "could not push" in lines[0] and "someone/digits-prdp" in lines[0] and out in lines[0]
    for name in ("final/pytorch_lora_weights.safetensors", "final/README.md", "final/grid_before_after.png",
                 "final/diffalign_config.json", "final_eval.json", "metrics.jsonl", "reward_curve.png"):
        assert os.path.isfile(os.path.join(out, name)), name


def test_card_front_matter_and_body(pushed_run):
    out, _, _ = pushed_run
    meta, body = front_matter_and_body(os.path.join(out, "final", "README.md"))
    assert meta["base_model"] == "digits" and meta["library_name"] == "diffusers"
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-to-image"
    for tag in ("diffalign", "prdp", "lora", "stable-diffusion", "text-to-image", "reward-fine-tuning"):
        assert tag in meta["tags"], tag
    assert "**PRDP**" in body and "digit_correctness" in body and "| `train_beta` |" in body
    assert "](grid_before_after.png)" in body
    with open(os.path.join(out, "final_eval.json")) as f:
        final = json.load(f)
    trained_row = next(line for line in body.splitlines() if line.startswith("| trained |"))
    assert f"{final['trained']['reward_mean']:.4g}" in trained_row
    assert f"{final['trained']['kl_to_base']:.4g}" in trained_row


def test_usage_snippets_run_against_the_runs_own_lora(pushed_run):
    out, _, _ = pushed_run
    _, body = front_matter_and_body(os.path.join(out, "final", "README.md"))
    blocks = python_blocks(body)
    assert len(blocks) == 2 and "load_lora_weights" in blocks[0] and "rlg_scale=1.5" in blocks[1]
    for code in blocks:
        assert '"someone/digits-prdp"' in code  # the card names the Hub repo: run it on the local copy
        scope = {}
        exec(code.replace('"someone/digits-prdp"', json.dumps(os.path.join(out, "final"))), scope)
        assert scope["pipe"].get_list_adapters()["unet"], "no LoRA loaded"
        size = int(re.search(r"height=(\d+)", code).group(1))  # sampled at the trained size
        assert scope["image"].size == (size, size)


def test_full_fine_tune_card_loads_the_trained_unet(tiny_model_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "full")
    assert main(["train", "ddpo", "--model", tiny_model_dir, "--output_dir", out, "--use_lora", "false",
                 "--prompts", "[a cat, a dog]", "--num_epochs", "1", "--sample_num_steps", "2",
                 "--sample_num_prompts_per_epoch", "2", "--sample_images_per_prompt", "2", "--train_batch_size", "2",
                 "--grid_num_images", "2", "--advantage_mode", "group"]) == 0
    meta, body = front_matter_and_body(os.path.join(out, "final", "README.md"))
    assert "base_model" not in meta  # a local directory is no Hub id
    assert meta["license"] == "other" and "lora" not in meta["tags"] and "grpo" in meta["tags"]
    assert "final_eval" not in body  # no final evaluation in this run: no table
    plain, rlg = python_blocks(body)
    assert 'subfolder="unet"' in plain and "aligned_unet=unet" in rlg
    import torch
    from diffusers import UNet2DConditionModel

    trained = UNet2DConditionModel.from_pretrained(os.path.join(out, "final"), subfolder="unet")
    assert tiny_model_dir not in body and out not in body  # no local absolute path in a shared card
    monkeypatch.chdir(out)  # the card's local paths are relative to the run directory
    for code in (plain, rlg):
        scope = {}
        exec(code, scope)
        loaded = scope["pipe"].aligned_unet if "aligned_unet" in code else scope["pipe"].unet
        name, param = next(iter(trained.named_parameters()))
        assert torch.equal(dict(loaded.named_parameters())[name], param)
        assert scope["image"] is not None


def test_base_model_and_license_resolution(tmp_path):
    snapshot = tmp_path / "hub" / "models--stabilityai--sd-turbo" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: openrail++\ntags: [x]\n---\n# SD-Turbo\n")
    assert base_model_id(PRDPConfig(model=str(snapshot))) == "stabilityai/sd-turbo"
    assert base_license(PRDPConfig(model=str(snapshot))) == "openrail++"
    assert base_license(PRDPConfig(model=str(snapshot), hub_license="mit")) == "mit"
    assert base_model_id(PRDPConfig(model="stabilityai/stable-diffusion-2-1")) == "stabilityai/stable-diffusion-2-1"
    assert base_model_id(PRDPConfig(model=str(tmp_path))) is None
    assert base_model_id(PRDPConfig(model=str(tmp_path), hub_base_model="me/base")) == "me/base"
    assert base_license(PRDPConfig(model=str(tmp_path))) == "other"


@pytest.mark.parametrize("args, message", [
    (["--push_to_hub"], "push_to_hub needs hub_model_id"),
    (["--hub_model_id", "a/b/c"], "hub_model_id must be a Hub repo id"),
])
def test_hub_settings_are_checked_before_training(args, message, tmp_path, capsys):
    assert main(["train", "prdp", "--output_dir", str(tmp_path / "x")] + DIGITS_ARGS + args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_guider_route_card_samples_rlg_in_the_modular_pipeline(tmp_path, monkeypatch):
    """A family whose RLG route is the guider in its modular pipeline (Qwen-Image: true CFG with its rescale): the
    card's RLG snippet loads the family's pipeline and the LoRA, wraps it with `rlg_pipeline` and samples; a full
    fine-tune (no LoRA for the guider to switch) gets no RLG snippet."""
    import torch

    from diffalign.families import QwenImageFamily, load_family
    from diffalign.guiders import ModularRLGPipeline
    from diffalign.modelcard import usage_snippets
    from diffalign.utils.peft_utils import add_lora

    model = QwenImageFamily.save_tiny(str(tmp_path / "qwen"))
    family = load_family(model)
    add_lora(family.denoiser, rank=4, alpha=8, target_modules=family.default_lora_target_modules)
    with torch.no_grad():
        for name, param in family.denoiser.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    lora = str(tmp_path / "run" / "final")
    family.save_lora(family.denoiser, lora)
    config = PRDPConfig(model=model, output_dir=str(tmp_path / "run"), sample_num_steps=2, sample_guidance_scale=3.0)
    plain, rlg = usage_snippets(config, family, "a cat", "final", 16)
    assert "QwenImageFamily.rlg_pipeline(pipe)" in rlg and "rlg_scale=1.5" in rlg
    assert 'true_cfg_scale=3, negative_prompt=""' in rlg  # the run's CFG, as QwenImagePipeline takes it
    monkeypatch.chdir(tmp_path / "run")  # the card's local paths are relative to the run directory
    scope = {}
    exec(rlg, scope)
    assert isinstance(scope["rlg"], ModularRLGPipeline) and scope["pipe"].get_list_adapters()["transformer"]
    assert scope["image"].size == (16, 16)

    config.use_lora = False
    assert len(usage_snippets(config, family, "a cat", "final", 16)) == 1


def test_video_card_snippets_write_the_frames_with_export_to_video(tmp_path):
    """A video family's snippets (Wan) take the pipeline's `.frames` (the guider route's `.images`), with the run's
    `num_frames`, and write them with diffusers' `export_to_video`; image families keep `.images[0]`."""
    from diffalign.config import DDPOConfig
    from diffalign.families import StableDiffusionFamily, WanFamily
    from diffalign.modelcard import usage_snippets

    config = DDPOConfig(model=str(tmp_path / "wan"), num_frames=33)  # a local model: no hub id anywhere
    plain, rlg = usage_snippets(config, WanFamily, "a cat", "runs/wan/final", 320)
    assert "from diffusers.utils import export_to_video" in plain and "num_frames=33" in plain
    assert ".frames[0]" in plain and 'export_to_video(video, "video.mp4", fps=16)' in plain
    assert "video = rlg(" in rlg and ".images[0]" in rlg and "export_to_video(video" in rlg
    image_plain = usage_snippets(DDPOConfig(model=str(tmp_path / "sd")), StableDiffusionFamily,
                                 "a cat", "runs/sd/final", 64)[0]
    assert "image = pipe(" in image_plain and ".images[0]" in image_plain and "export_to_video" not in image_plain


def test_ti2v_text_to_video_card_samples_rlg_with_its_pipelines_frames(tmp_path, monkeypatch):
    """A Wan 2.2 TI2V-5B text-to-video run (`wan` family, `expand_timesteps`): `WanFamily.rlg_pipeline` returns
    `WanRLGPipeline`, whose output holds `.frames`; the card's RLG snippet runs on the run's LoRA and gives a
    5-frame video."""
    from diffalign.config import DDPOConfig
    from diffalign.families import WanFamily, family_for_pipeline
    from diffalign.modelcard import usage_snippets
    from diffalign.pipelines import WanRLGPipeline
    from diffalign.utils.peft_utils import add_lora

    model = WanFamily.save_tiny(str(tmp_path / "ti2v"), version="2.2-ti2v")
    family = family_for_pipeline(WanFamily.load(model))
    add_lora(family.denoiser, target_modules=family.default_lora_target_modules)
    family.save_lora(family.denoiser, str(tmp_path / "run" / "final"))
    config = DDPOConfig(model=model, output_dir=str(tmp_path / "run"), num_frames=5, sample_num_steps=2,
                        sample_guidance_scale=3.0)
    plain, rlg = usage_snippets(config, family, "a cat", "final", 32)
    assert "video = rlg(" in rlg and ".frames[0]" in rlg and ".images[0]" not in rlg
    monkeypatch.chdir(tmp_path / "run")  # the card's local paths are relative to the run directory
    monkeypatch.setattr("diffusers.utils.export_to_video", lambda frames, path, fps: path)  # no video written
    scope = {}
    exec(rlg, scope)
    assert isinstance(scope["rlg"], WanRLGPipeline) and len(scope["video"]) == 5
