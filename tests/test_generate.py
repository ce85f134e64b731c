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
    from diffalign.families import StableDiffusionFamily

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
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=StableDiffusionFamily(None).lora_state_dict(unet))
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


def test_sd3_model_dir_with_lora_and_aligned_transformer(tmp_path, capsys):
    """An SD3 directory picks StableDiffusion3RLGPipeline; a LoRA saved with StableDiffusion3Pipeline.save_lora_weights
    is the aligned model; `--aligned-transformer` (alias of `--aligned-denoiser`) takes a full-weight transformer."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    from diffalign.testing import save_tiny_pipeline, tiny_sd3_components

    model_dir = save_tiny_pipeline("sd3", str(tmp_path / "sd3"))
    transformer = tiny_sd3_components()["transformer"]
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])
    )
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    lora = str(tmp_path / "lora")
    StableDiffusion3Pipeline.save_lora_weights(lora, transformer_lora_layers=get_peft_model_state_dict(transformer))

    out = tmp_path / "out"
    args = parse(
        ["--model", model_dir, "--lora", lora, "--prompt", "a cat", "--rlg-scale", "0", "1.6"]
        + ["--reward", "jpeg_compressibility", "--num-images", "2", "--steps", "2", "--output-dir", str(out)]
    )
    assert generate.run(args) == 0
    assert (out / "rlg_grid.png").is_file() and (out / "rlg_rewards.png").is_file()
    assert [r["rlg_scale"] for r in json.loads((out / "rlg_rewards.json").read_text())] == [0.0, 1.6]
    assert "jpeg_compressibility mean" in capsys.readouterr().out

    pipe = generate.load_rlg_pipeline(model_dir, lora=lora, device="cpu")
    assert type(pipe).__name__ == "StableDiffusion3RLGPipeline"
    images = generate.sample_scales(pipe, ["a cat"], [0.0, 1.6], 1, 0, num_inference_steps=2, eta=0.0)
    base = generate.load_rlg_pipeline(model_dir, device="cpu")
    torch.testing.assert_close(
        images[0.0], generate.sample_scales(base, ["a cat"], [1.0], 1, 0, num_inference_steps=2)[1.0]
    )
    assert not torch.allclose(images[0.0], images[1.6], atol=1e-3)

    aligned_dir = str(tmp_path / "aligned")
    perturbed_unet(tiny_sd3_components()["transformer"]).save_pretrained(aligned_dir)
    args = parse(["--model", model_dir, "--aligned-transformer", aligned_dir, "--prompt", "a cat", "--steps", "2"])
    assert args.aligned_denoiser == aligned_dir
    pipe = generate.load_rlg_pipeline(model_dir, aligned_denoiser=aligned_dir, device="cpu")
    assert pipe.aligned_transformer is not None
    assert parse(["--aligned-unet", "u"]).aligned_denoiser == "u"  # the former flag still works


def test_pipeline_choice_from_model_index(tmp_path):
    from diffalign.errors import ModelError
    from diffalign.testing import save_tiny_pipeline

    for family, expected in [("sdxl", "StableDiffusionXLRLGPipeline"), ("sd", "StableDiffusionRLGPipeline")]:
        directory = save_tiny_pipeline(family, str(tmp_path / family))
        assert generate.rlg_pipeline_for(directory)[0].__name__ == expected
    sdxl = generate.load_rlg_pipeline(str(tmp_path / "sdxl"), device="cpu")
    assert type(sdxl).__name__ == "StableDiffusionXLRLGPipeline" and sdxl.watermark is None
    assert generate.sample_scales(sdxl, ["a cat"], [1.0], 1, 0, num_inference_steps=1, eta=0.0)[1.0].shape == (
        1,
        3,
        32,
        32,
    )

    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ModelError) as error:
        generate.rlg_pipeline_for(str(other))
    message = str(error.value)
    assert "\n" not in message and "KandinskyPipeline" in message
    assert "StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline" in message


def test_cli_generate_shows_progress_and_writes_a_bounded_grid(tiny_model_dir, lora_dir, tmp_path, capsys):
    """A tqdm bar per scale counts the images; `rlg_grid.png` shows at most `GRID_PER_ROW` images per scale row
    however many are sampled, and `rlg_images/` keeps every one (snake_case flags work as kebab-case)."""
    from PIL import Image

    from diffalign.cli import main

    out = tmp_path / "out"
    assert main(["generate", "--model", tiny_model_dir, "--lora", lora_dir, "--prompt", "a cat", "--prompt", "a dog",
                 "--rlg_scale", "0", "1", "2", "--num_images", "6", "--steps", "1", "--output_dir", str(out)]) == 0
    err = capsys.readouterr().err
    for scale in ("0", "1", "2"):
        assert f"w = {scale}: 100%" in err and "12/12" in err, err
    grid = Image.open(out / "rlg_grid.png")
    tile = 128  # the tiny model's 32 px images are shown 128 px wide
    assert grid.width <= 90 + generate.GRID_PER_ROW * (tile + 8) + 8 and grid.height <= 3 * (tile + 16)
    assert grid.width >= 90 + generate.GRID_PER_ROW * tile
    index = json.loads((out / "rlg_images" / "index.json").read_text())
    assert len(index) == 3 * 12 and {e["prompt"] for e in index} == {"a cat", "a dog"}
    assert all((out / "rlg_images" / e["file"]).is_file() for e in index)
    assert index[7] == {"file": os.path.join("w0", "p01_seed1.png"), "rlg_scale": 0.0, "prompt": "a dog", "seed": 1}
    assert generate.grid_order(2, 3) == [0, 3, 1, 4, 2, 5]


def test_cli_generate_errors_are_one_line_and_the_model_comes_first(tiny_model_dir, tmp_path, capsys):
    from diffalign.cli import main

    def error(argv):
        code = main(["generate", *argv, "--output-dir", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        return err

    # no --prompt and no aligned model either: the missing model is what the user hears about
    assert "does not exist" in error(["--model", str(tmp_path / "missing"), "--rlg-scale", "0", "2"])
    assert "--rlg-scale must be a finite number; got nan" in error(["--model", tiny_model_dir, "--rlg-scale", "nan"])
    assert "--guidance-scale must be a finite" in error(["--model", tiny_model_dir, "--guidance-scale", "inf"])
    if not torch.cuda.is_available():
        assert "--device cuda" in error(["--model", tiny_model_dir, "--prompt", "a", "--rlg-scale", "1", "--device",
                                         "cuda"])
    assert "not a torch device" in error(["--model", tiny_model_dir, "--device", "gpu0"])
    assert "--lora" in error(["--model", tiny_model_dir, "--prompt", "a", "--lora", str(tmp_path / "nope")])
    assert not (tmp_path / "out").exists()


def test_grid_of_large_images_stays_bounded():
    from diffalign.plotting import rows_grid

    grid = rows_grid([torch.rand(12, 3, 300, 300)] * 3, ["w = 0", "w = 1", "w = 2"], max_per_row=8, max_tile=256)
    assert 90 + 8 * 256 <= grid.width <= 90 + 8 * (256 + 4) + 4 and grid.height <= 3 * (256 + 8)


def test_zimage_runs_the_rlg_guider_in_its_modular_pipeline(tmp_path, capsys):
    """Z-Image has no RLG pipeline: `diffalign generate` runs the RLG guider in its modular pipeline on the loaded
    ZImagePipeline's components, the LoRA as the aligned model; w = 0 is the model without the LoRA."""
    from diffusers import ZImagePipeline

    from diffalign.cli import main
    from diffalign.families import ZImageFamily, family_for_pipeline
    from diffalign.guiders import ModularRLGPipeline
    from diffalign.utils.peft_utils import add_lora

    model_dir = ZImageFamily.save_tiny(str(tmp_path / "zimage"))
    family = family_for_pipeline(ZImagePipeline.from_pretrained(model_dir))
    add_lora(family.denoiser, rank=4, alpha=4, target_modules=family.default_lora_target_modules)
    with torch.no_grad():
        for name, param in family.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    lora = str(tmp_path / "lora")
    family.save_lora(family.denoiser, lora)

    assert generate.rlg_pipeline_for(model_dir)[0] is ZImagePipeline
    out = tmp_path / "out"
    flags = ["--prompt", "a cat", "--num-images", "1", "--steps", "1", "--resolution", "16"]
    assert main(["generate", "--model", model_dir, "--lora", lora, "--rlg-scale", "0", "2", "--two-pass", *flags,
                 "--output-dir", str(out)]) == 0
    assert (out / "rlg_grid.png").is_file() and len(json.loads((out / "rlg_images" / "index.json").read_text())) == 2
    capsys.readouterr()

    pipe = generate.load_rlg_pipeline(model_dir, lora=lora, device="cpu")
    assert isinstance(pipe, ModularRLGPipeline)
    kwargs = dict(num_inference_steps=1, height=16, width=16, guidance_scale=3.0, eta=0.0, rlg_single_pass=True)
    images = generate.sample_scales(pipe, ["a cat"], [0.0, 2.0], 1, 0, **kwargs)
    plain = generate.load_rlg_pipeline(model_dir, device="cpu")  # no LoRA: w = 1 is the model itself
    torch.testing.assert_close(images[0.0], generate.sample_scales(plain, ["a cat"], [1.0], 1, 0, **kwargs)[1.0],
                               atol=0, rtol=0)
    assert (images[2.0] - images[0.0]).abs().max() > 1e-3

    # a fully fine-tuned transformer has no route here: one line naming --lora
    assert main(["generate", "--model", model_dir, "--aligned-denoiser", model_dir, *flags,
                 "--output-dir", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lora" in err[0] and "modular" in err[0], err
