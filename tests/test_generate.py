"""`diffalign generate`: grid, reward table and plot from a tiny model and a LoRA, offline."""

import argparse
import json
import os

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig

from diffalign import generate
from diffalign.testing import perturbed_unet, tiny_sd_pipeline


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A LoRA for the tiny model, saved the way the trainers save theirs."""
    from diffalign.modeling import lora_state_dict

    unet = tiny_sd_pipeline().unet
    unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
        )
    )
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    directory = str(tmp_path_factory.mktemp("lora"))
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=lora_state_dict(unet))
    return directory


def parse(argv):
    return generate.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_generate_grid_rewards_and_plot(tiny_model_dir, lora_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = parse(
        ["--model", tiny_model_dir, "--lora", lora_dir, "--prompt", "a cat", "--prompt", "a dog"]
        + ["--rlg-scale", "0", "1", "2", "--reward", "jpeg_compressibility", "--num-images", "2", "--steps", "2"]
        + ["--seed", "3", "--output-dir", str(out)]
    )
    assert generate.run(args) == 0

    assert (out / "rlg_grid.png").is_file() and (out / "rlg_rewards.png").is_file()
    results = json.loads((out / "rlg_rewards.json").read_text())
    assert [r["rlg_scale"] for r in results] == [0.0, 1.0, 2.0]
    assert all(len(r["rewards"]) == 4 and r["reward"] == "jpeg_compressibility" for r in results)
    assert "reward_mean" in results[0] and "jpeg_compressibility mean" in capsys.readouterr().out


def test_same_seeds_across_scales_and_aligned_unet(tiny_model_dir, tmp_path):
    """Rows differ only by the scale: w=0 with any aligned model is the base model, image for image."""
    aligned_dir = str(tmp_path / "aligned")
    perturbed_unet(tiny_sd_pipeline().unet).save_pretrained(aligned_dir)
    pipe = generate.load_rlg_pipeline(tiny_model_dir, aligned_unet=aligned_dir, device="cpu")
    images = generate.sample_scales(pipe, ["a cat"], [0.0, 1.0], num_images=2, seed=0, num_inference_steps=2)
    base = generate.sample_scales(
        generate.load_rlg_pipeline(tiny_model_dir, device="cpu"), ["a cat"], [1.0], 2, 0, num_inference_steps=2
    )
    torch.testing.assert_close(images[0.0], base[1.0], atol=1e-4, rtol=0)
    assert images[0.0].shape == (2, 3, 32, 32) and not torch.allclose(images[0.0], images[1.0], atol=1e-3)


def test_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        generate._resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no --prompt"):
        generate.run(parse(["--model", tiny_model_dir, "--lora", "x", "--output-dir", str(tmp_path)]))
    with pytest.raises(ValueError, match="needs an aligned model"):
        generate.run(parse(["--model", tiny_model_dir, "--prompt", "a", "--output-dir", str(tmp_path)]))
    assert generate._default_prompts("digits")[9] == "a handwritten digit nine"
    assert not os.listdir(tmp_path)
