"""Wan image-to-video's own checks, beyond the family tester (tests/test_family_common.py runs the shared checks on
the tiny Wan 2.1 I2V, and the rollout check on the TI2V-5B variant): TI2V-5B keeps the condition image's latent frame
fixed (timestep 0 on its tokens, the decoded video starts from it, its entries add nothing policy-dependent to the
log-probs: ratio 1 with a LoRA), Wan 2.1 I2V feeds the CLIP image embedding, a prompt without an image is refused in
one line, the forward-process losses count TI2V-5B's sampled frames alone, and (-m slow) `train ddpo` trains TI2V-5B
from the CLI with an animated grid showing the condition image, `train nft`, `awm` and `dgpo` with a LoRA that
loads."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.families import FAMILIES, WanImageToVideoFamily, family_for_pipeline
from diffalign.kernels import sde_window_mask
from diffalign.prompts import ConditionedPrompt
from diffalign.rollout import default_kernel, sample_trajectories, step_log_probs
from diffalign.utils.peft_utils import add_lora

TI2V_SIZE = 32  # TI2V-5B's 16x VAE and 2x2 patches: 32 pixels a side at the least


def _image(directory, seed=0) -> str:
    path = os.path.join(str(directory), f"condition{seed}.png")
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(path)
    return path


def _family(**variant):
    pipe = WanImageToVideoFamily.tiny_pipeline(**variant)
    family = family_for_pipeline(pipe)
    family.set_kernel_scheduler(pipe)
    family.configure(num_frames=5)
    return family


def test_wan_i2v_is_registered_for_the_image_to_video_pipeline():
    assert FAMILIES["WanImageToVideoPipeline"] is WanImageToVideoFamily
    assert WanImageToVideoFamily.output_kind == "video" and WanImageToVideoFamily.requires_condition_image
    assert WanImageToVideoFamily.rlg_route() == "pipeline"


def test_ti2v_keeps_the_condition_frame_fixed_and_gives_ratio_one(tmp_path, monkeypatch):
    family = _family(version="2.2-ti2v")
    prompts = [ConditionedPrompt("a cat", (_image(tmp_path, 0),)), ConditionedPrompt("a car", (_image(tmp_path, 1),))]
    add_lora(family.denoiser, target_modules=family.default_lora_target_modules)
    generator = torch.Generator().manual_seed(0)
    for param in family.denoiser.parameters():
        if param.requires_grad:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    family.denoiser.eval()
    seen = []
    forward = family.denoiser.forward
    monkeypatch.setattr(family.denoiser, "forward", lambda **kw: seen.append(kw) or forward(**kw))
    kernel = default_kernel(family, eta=1.0, noise_level=0.7)
    traj = sample_trajectories(family, prompts, num_inference_steps=3, guidance_scale=3.0, kernel=kernel,
                               height=TI2V_SIZE, width=TI2V_SIZE, generator=torch.Generator().manual_seed(1),
                               compute_reference=True, stochastic_steps=sde_window_mask(3, 2))
    condition = traj.conditioning["image_latents"]
    assert condition.shape == (2, 48, 1, 2, 2) and not torch.equal(condition[0], condition[1])
    # the transformer sees the condition as the first latent frame, at timestep 0 (one 2x2 patch a frame)
    first = seen[0]
    for row in first["hidden_states"][:, :, :1]:  # every row of the batch (CFG halves, policy and reference)
        assert torch.equal(row, condition[0]) or torch.equal(row, condition[1])
    assert first["timestep"].shape == (8, 2)  # CFG halves of the policy and the reference rows
    assert (first["timestep"][:, 0] == 0).all() and (first["timestep"][:, 1] == traj.timesteps[0]).all()
    # the decoded video is the final latents with the condition frame
    final = torch.cat([condition, traj.latents[:, -1, :, 1:]], dim=2)
    torch.testing.assert_close(traj.images, family.decode(final), atol=1e-6, rtol=0)
    rows, steps = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        log_probs, _, _ = step_log_probs(family, family.denoiser, kernel, traj, rows, steps, 3.0)
    ratio = torch.exp(log_probs - traj.log_probs[rows, steps])
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    assert (traj.kl_to_ref[:, :2] > 0).all()


def test_wan21_i2v_conditions_on_the_clip_image_embedding(tmp_path):
    """Two images give other videos for the same prompt and noise (the condition channels and the CLIP embedding)."""
    family = _family()
    prompts = [ConditionedPrompt("a cat", (_image(tmp_path, 0),)), ConditionedPrompt("a cat", (_image(tmp_path, 1),))]
    latents = family.prepare_latents(1, 16, 16, torch.float32, "cpu", torch.Generator().manual_seed(0)).repeat(
        2, 1, 1, 1, 1)
    traj = sample_trajectories(family, prompts, num_inference_steps=2, guidance_scale=3.0, latents=latents,
                               height=16, width=16, stochastic_steps=sde_window_mask(2, 0))
    assert traj.conditioning["image_latents"].shape == (2, 20, 2, 2, 2)  # 4 mask channels, 16 latent channels
    assert traj.conditioning["image_embeds"].shape[0] == 2
    assert torch.equal(traj.negative_conditioning["image_embeds"], traj.conditioning["image_embeds"])
    assert (traj.images[0] - traj.images[1]).abs().max() > 1e-4


def test_a_prompt_without_an_image_is_one_line(tmp_path, capsys):
    from diffalign.cli import main

    model = WanImageToVideoFamily.save_tiny(str(tmp_path / "wan_i2v"))
    argv = ["train", "ddpo", "--model", model, "--output_dir", str(tmp_path / "run"), "--prompts", "[a cat]",
            "--num_frames", "5", "--sample_resolution", "16"]
    capsys.readouterr()  # saving's progress bars
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image" in err[0], err


@pytest.mark.slow  # ~15 s: a CLI run on TI2V-5B at 32 pixels
def test_cli_trains_ti2v_with_a_condition_grid_and_the_lora_loads(tmp_path):
    from diffalign.cli import main
    from diffalign.plotting import find_video, read_video

    model = WanImageToVideoFamily.save_tiny(str(tmp_path / "ti2v"), version="2.2-ti2v")
    prompt_file = tmp_path / "prompts.jsonl"
    image = _image(tmp_path)
    prompt_file.write_text("".join(json.dumps({"prompt": p, "image": os.path.basename(image)}) + "\n"
                                   for p in ("a cat", "a red car")))
    out = str(tmp_path / "run")
    args = ["train", "ddpo", "--model", model, "--output_dir", out, "--num_epochs", "2", "--sample_num_steps", "3",
            "--sample_num_prompts_per_epoch", "2", "--sample_images_per_prompt", "2", "--sample_batch_size", "4",
            "--train_batch_size", "4", "--grid_num_images", "2", "--checkpoint_every", "2", "--reward",
            "jpeg_compressibility", "--prompt_file", str(prompt_file), "--train_learning_rate", "0.05",
            "--sample_guidance_scale", "3.0", "--sample_resolution", str(TI2V_SIZE), "--num_frames", "5",
            "--sample_sde_window_size", "2", "--final_eval_num_images", "0"]
    assert main(args) == 0
    frames = read_video(find_video(os.path.join(out, "grid_after.png")))
    assert len(frames) == 5
    # the condition tile stands still beside the video: equal in the first and the last frame
    first, last = np.asarray(frames[0], dtype=np.float32), np.asarray(frames[-1], dtype=np.float32)
    tile = first.shape[1] // 4  # 2 samples, each after its condition image
    assert np.abs(first[:, :tile - 2] - last[:, :tile - 2]).mean() < 8

    assert_lora_changes_the_video(model, image, os.path.join(out, "final"))


def test_the_model_card_passes_the_image_to_the_image_to_video_pipeline(tmp_path):
    """The card's snippet gives `WanImageToVideoPipeline` the image as it is (the pipeline resizes it), not Kontext's
    resize and `max_area`; the Hub task is image-to-video."""
    from diffalign.modelcard import usage_snippets
    from diffalign.config import PRDPConfig

    config = PRDPConfig(model="/models/wan-i2v", output_dir=str(tmp_path / "run"), sample_num_steps=20,
                        sample_guidance_scale=5.0)
    prompt = ConditionedPrompt("a cat", (str(tmp_path / "cat.png"),))
    plain = usage_snippets(config, WanImageToVideoFamily, prompt, "final", 480)[0]
    assert "WanImageToVideoPipeline.from_pretrained" in plain
    assert 'condition = load_image("cat.png")' in plain and "image=condition" in plain and "max_area" not in plain


def test_the_clip_image_encoder_is_frozen_with_the_vae():
    family = _family()
    assert any(module is family.pipe.image_encoder for module in family.frozen_modules())
    assert not any(module is None for module in _family(version="2.2-ti2v").frozen_modules())


# ------------------------------------------------------------------------------- first-last-frame (FLF2V)
def _flf2v_prompts(tmp_path):
    return [ConditionedPrompt("a cat", (_image(tmp_path, 0),), last_image=_image(tmp_path, 1)),
            ConditionedPrompt("a car", (_image(tmp_path, 2),), last_image=_image(tmp_path, 3))]


def test_zero_window_rollout_with_a_last_image_equals_the_pipeline_with_last_image(tmp_path):
    """Wan 2.1 FLF2V: a prompt's `last_image` reaches the conditioning as `WanImageToVideoPipeline(last_image=...)`
    builds it (both ends in the condition latents, both CLIP embeddings), and another last frame changes the video."""
    family = _family(version="2.1-flf2v")
    prompts = _flf2v_prompts(tmp_path)
    latents = family.prepare_latents(2, 16, 16, torch.float32, "cpu", torch.Generator().manual_seed(3))
    traj = sample_trajectories(family, prompts, num_inference_steps=3, guidance_scale=3.0, latents=latents,
                               height=16, width=16, stochastic_steps=sde_window_mask(3, 0))
    assert traj.conditioning["image_embeds"].shape[:2] == (2, 2)  # each prompt: its first and its last image
    pipe = family.pipe
    stock = torch.cat([pipe(prompt=str(prompt), latents=latents[i:i + 1], num_inference_steps=3, height=16, width=16,
                            output_type="pt", guidance_scale=3.0, **family.pipeline_call_kwargs(16, 16),
                            **family.pipeline_condition_kwargs(prompt)).frames for i, prompt in enumerate(prompts)])
    assert "last_image" in family.pipeline_condition_kwargs(prompts[0])
    torch.testing.assert_close(traj.images, stock, atol=1e-5, rtol=1e-4)
    other = [ConditionedPrompt(str(p), p.condition_images, last_image=_image(tmp_path, 4)) for p in prompts]
    moved = sample_trajectories(family, other, num_inference_steps=3, guidance_scale=3.0, latents=latents,
                                height=16, width=16, stochastic_steps=sde_window_mask(3, 0))
    assert (moved.images - traj.images).abs().max() > 1e-4


def test_a_last_image_is_one_line_where_the_model_takes_none_and_required_by_flf2v(tmp_path):
    from diffalign.errors import PromptError
    from diffalign.prompts import check_condition_prompts

    prompts = _flf2v_prompts(tmp_path)
    for family, message in ((_family(), "takes no last frame"), (_family(version="2.2-ti2v"), "takes no last frame"),
                            (_family(version="2.1-flf2v"), "has no 'last_image'")):
        batch = prompts if "no last frame" in message else [ConditionedPrompt("a cat", (_image(tmp_path, 0),))]
        with pytest.raises(PromptError, match=message) as error:
            family.conditioning(batch, "", True, 32, 32)
        assert "\n" not in str(error.value)
    # a family that takes no last frame at all refuses it when a run checks its prompts (`trainers/base.py`)
    kontext = FAMILIES["FluxKontextPipeline"]
    with pytest.raises(PromptError, match="flux_kontext model takes no last frame"):
        check_condition_prompts(prompts, kontext.name, kontext.max_condition_images,
                                takes_last_image=kontext.takes_last_image)
    check_condition_prompts(prompts, WanImageToVideoFamily.name, 1, takes_last_image=True)


def test_a_prompt_row_carries_its_last_image_through_the_prompt_file_and_a_checkpoint(tmp_path):
    """A JSONL row's `last_image` is relative to the file, checked (one line: missing, or without an `image`), kept in
    the metadata as an absolute path, part of the prompt's identity, and survives a checkpoint's prompt skeleton."""
    from diffalign.checkpoint import join_state, split_state
    from diffalign.errors import PromptError
    from diffalign.prompts import last_image_of, prompt_key, read_prompt_records

    first, last = os.path.basename(_image(tmp_path, 0)), os.path.basename(_image(tmp_path, 1))
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text(json.dumps({"prompt": "a cat", "image": first, "last_image": last}) + "\n")
    prompts, metadata = read_prompt_records(str(prompt_file))
    assert last_image_of(prompts[0]) == str(tmp_path / last) == metadata[0]["last_image"]
    alone = ConditionedPrompt("a cat", prompts[0].condition_images)
    assert prompts[0] != alone and prompt_key(prompts[0]) != prompt_key(alone)
    restored = join_state(split_state({prompts[0]: 1.0}, {}), {})
    assert list(restored) == [prompts[0]] and last_image_of(next(iter(restored))) == str(tmp_path / last)
    for row, message in (({"prompt": "a", "image": first, "last_image": "missing.png"}, "missing.png' does not exist"),
                         ({"prompt": "a", "last_image": last}, "'last_image' but no 'image'")):
        prompt_file.write_text(json.dumps(row) + "\n")
        with pytest.raises(PromptError, match=message) as error:
            read_prompt_records(str(prompt_file))
        assert "\n" not in str(error.value)


def test_a_last_image_for_a_model_without_last_frames_stops_the_run_in_one_line(tmp_path, capsys):
    from diffalign.cli import main

    model = WanImageToVideoFamily.save_tiny(str(tmp_path / "wan_i2v"))  # Wan 2.1 I2V: no pos_embed_seq_len
    prompt_file = tmp_path / "prompts.jsonl"
    first, last = os.path.basename(_image(tmp_path, 0)), os.path.basename(_image(tmp_path, 1))
    prompt_file.write_text(json.dumps({"prompt": "a cat", "image": first, "last_image": last}) + "\n")
    argv = ["train", "ddpo", "--model", model, "--output_dir", str(tmp_path / "run"), "--prompt_file",
            str(prompt_file), "--num_frames", "5", "--sample_resolution", "16", "--sample_num_steps", "2"]
    capsys.readouterr()  # saving's progress bars
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes no last frame" in err[0], err


# ------------------------------------------------------------------ the losses count the sampled frames alone
@pytest.fixture(scope="module")
def _ti2v_template():
    return WanImageToVideoFamily.tiny_pipeline(version="2.2-ti2v")


def test_the_sampled_latents_leave_out_ti2v_image_to_videos_first_frame_alone(_ti2v_template, tiny_pipe):
    """TI2V-5B image-to-video: the frames after the condition's first one (a view); every other model: all of it."""
    from diffalign.families import WanFamily

    latents = torch.randn(2, 48, 3, 2, 2)
    sampled = family_for_pipeline(_ti2v_template).sampled_latents(latents)
    assert torch.equal(sampled, latents[:, :, 1:]) and sampled.data_ptr() == latents[:, :, 1].data_ptr()
    text_to_video = family_for_pipeline(WanFamily.tiny_pipeline(version="2.2-ti2v"))  # expand_timesteps, no image
    assert text_to_video.pipe.config.get("expand_timesteps")
    for family in (_family(), text_to_video, family_for_pipeline(tiny_pipe)):  # Wan 2.1 I2V, TI2V-5B T2V, SD
        assert family.sampled_latents(latents) is latents


def _brightness(images, prompts, metadata=None):
    return images.flatten(1).mean(1).float().cpu()


def _forward_trainer(algorithm, tmp_path, pipe):
    """A `train <algorithm>` trainer on tiny TI2V-5B image-to-video (5 frames: 2 latent frames, the first fixed), its
    three policies apart (trained, old, base), with a KL term and (AWM) the off-policy ratio."""
    from diffalign.config import AWMConfig, DGPOConfig, NFTConfig
    from diffalign.trainers import AWMTrainer, DGPOTrainer, NFTTrainer

    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p, "image": _image(tmp_path, seed)}) + "\n"
                                   for seed, p in enumerate(("a cat", "a car"))))
    config_class, trainer_class, own = {
        "nft": (NFTConfig, NFTTrainer, {"train_kl_coef": 0.1}),
        "awm": (AWMConfig, AWMTrainer, {"train_kl_coef": 0.1, "train_off_policy": True, "train_timesteps": 2,
                                        "train_timestep_fraction": 1.0}),
        "dgpo": (DGPOConfig, DGPOTrainer, {"train_kl_coef": 0.1, "train_trunc_steps": 1, "train_num_timesteps": 2}),
    }[algorithm]
    config = config_class(model=str(tmp_path / "tiny-ti2v"), output_dir=str(tmp_path / "run"),
                          prompt_file=str(prompt_file),
                          num_epochs=1, sample_num_steps=2, sample_num_prompts_per_epoch=2, sample_images_per_prompt=2,
                          sample_batch_size=4, grid_num_images=1, train_learning_rate=1e-2, train_micro_batch_size=4,
                          sample_resolution=TI2V_SIZE, num_frames=5, sample_guidance_scale=3.0, **own)
    trainer = trainer_class(config, pipeline=pipe, reward_fn=_brightness)
    with torch.no_grad():
        for old, new in zip(trainer.old_params, trainer.policy_params):
            old.add_(0.3 * torch.randn_like(old))
            new.add_(0.3 * torch.randn_like(new))
    return trainer


@pytest.mark.parametrize("algorithm", ["nft", "awm", "dgpo"])
def test_forward_process_losses_count_the_sampled_frames_alone(algorithm, tmp_path, _ti2v_template):
    """TI2V-5B image-to-video: the loss of `train nft/awm/dgpo` (its value, statistics and gradient) does not see the
    fixed first latent frame: every latent it gets has the sampled frame alone, and another first frame in the final
    samples changes nothing (the losses once averaged it in: a constant, and the sampled frames weighed 1/2)."""
    import copy

    from diffalign.trainers.update_plan import Rows

    torch.manual_seed(0)
    trainer = _forward_trainer(algorithm, tmp_path, copy.deepcopy(_ti2v_template))
    prompts = trainer.local_prompts(0)
    trajectories = trainer.sample(0, prompts, False)
    rewards = trainer.score(trajectories)["reward"]
    batch = trainer.training_batch(trajectories, rewards, rewards, prompts, epoch=0)
    # DGPO's rows: whole prompt groups at one noise level (its group weights need every image of a group)
    steps = torch.zeros(4, dtype=torch.long) if algorithm == "dgpo" else torch.tensor([1, 0, 1, 0])
    rows = Rows(torch.arange(4), steps)
    trainer.denoiser.train()

    def loss_stats_gradient():
        outputs = trainer.model_outputs(trainer.denoiser, batch, rows)
        noised = outputs[-1]
        full = trajectories.final_latents[rows.samples]
        assert noised.denoiser_input.shape == full.shape == (4, 48, 2, 2, 2)
        for tensor in (noised.x0, noised.noise, noised.x_t):
            assert tensor.shape == (4, 48, 1, 2, 2)
        torch.testing.assert_close(noised.x0, full[:, :, 1:], rtol=0, atol=0)
        predictions = [value for output in outputs[:-1] if output is not None
                       for value in (output.values() if isinstance(output, dict) else [output])]
        assert len(predictions) == 3  # the policy's, the old policy's and the base model's
        assert all(prediction.shape == (4, 48, 1, 2, 2) for prediction in predictions)
        loss, stats = trainer.compute_loss(outputs, batch, rows)
        gradient = torch.autograd.grad(loss, trainer.policy_params)
        return loss.detach(), stats, torch.cat([g.flatten() for g in gradient])

    loss, stats, gradient = loss_stats_gradient()
    assert gradient.abs().sum() > 0
    with torch.no_grad():  # another first latent frame in every final sample
        trajectories.latents[:, -1, :, 0] += 3 * torch.randn_like(trajectories.latents[:, -1, :, 0])
    other_loss, other_stats, other_gradient = loss_stats_gradient()
    assert torch.equal(other_loss, loss) and torch.equal(other_gradient, gradient)
    for key, value in stats.items():
        assert torch.equal(other_stats[key], value), key


@pytest.mark.slow  # ~10 s each: a CLI run on TI2V-5B at 32 pixels and two pipeline calls
@pytest.mark.parametrize("algorithm", ["nft", "awm", "dgpo"])
def test_forward_trainers_train_ti2v_image_to_video_from_the_cli(algorithm, tmp_path):
    """A 2-epoch `train nft/awm/dgpo` run on TI2V-5B image-to-video (its losses on the sampled frames alone) writes a
    LoRA that loads in `WanImageToVideoPipeline` and changes its video."""
    from diffalign.cli import main

    model = WanImageToVideoFamily.save_tiny(str(tmp_path / "ti2v"), version="2.2-ti2v")
    image = _image(tmp_path)
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p, "image": os.path.basename(image)}) + "\n"
                                   for p in ("a cat", "a red car")))
    out = str(tmp_path / "run")
    own = {"nft": [], "awm": ["--train_timesteps", "2", "--train_timestep_fraction", "1.0"],
           "dgpo": ["--train_trunc_steps", "2", "--train_num_timesteps", "2"]}[algorithm]
    assert main(["train", algorithm, "--model", model, "--output_dir", out, "--num_epochs", "2", "--sample_num_steps",
                 "3", "--sample_num_prompts_per_epoch", "2", "--sample_images_per_prompt", "2", "--sample_batch_size",
                 "4", "--train_micro_batch_size", "4", "--grid_num_images", "1", "--reward", "jpeg_compressibility",
                 "--prompt_file", str(prompt_file), "--train_learning_rate", "0.05", "--sample_guidance_scale", "3.0",
                 "--sample_resolution", str(TI2V_SIZE), "--num_frames", "5", "--final_eval_num_images", "0",
                 "--train_kl_coef", "0.01"] + own) == 0
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in records] == [0, 1] and all(r["grad_norm"] > 0 for r in records)

    assert_lora_changes_the_video(model, image, os.path.join(out, "final"))


def assert_lora_changes_the_video(model, image, lora_dir):
    """The run's LoRA loads in `WanImageToVideoPipeline` (TI2V-5B at the test size) and changes its video."""
    import diffusers

    pipe = diffusers.WanImageToVideoPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(image=Image.open(image).convert("RGB"), prompt="a cat", num_inference_steps=3, height=TI2V_SIZE,
                  width=TI2V_SIZE, num_frames=5, output_type="pt", guidance_scale=3.0)
    before = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    pipe.load_lora_weights(lora_dir)
    after = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert (after - before).abs().max() > 1e-4
