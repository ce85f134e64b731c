"""Wan's own checks, beyond the family tester (tests/test_family_common.py runs the shared checks on Wan 2.1 and the
UniPC, TI2V-5B and A14B variants): Wan 2.2 A14B's expert switch at the boundary (with its own CFG scale) is
`WanPipeline`'s, for rollouts and for training batches that mix both sides; TI2V-5B gives the transformer one timestep
per latent token; `num_frames` sets the latent frames, is validated (one line, exit 2) and hashed only when set; the
flow SDE's log-probs and the forward-process losses average over every non-batch dimension of video latents; a UniPC
scheduler becomes flow-match Euler with its shift; and `train nft` (and, with -m slow, `awm`, `dgpo`, and `ddpo` on
A14B) trains the tiny Wan from the CLI, writing animated grids and a LoRA that `WanPipeline.load_lora_weights` loads
and that changes its videos (the family tester trains `ddpo` and `prdp`)."""

import json
import os

import pytest
import torch

from diffalign.errors import ModelError
from diffalign.families import FAMILIES, StableDiffusionFamily, WanFamily, family_for_pipeline
from diffalign.kernels import FlowSDEKernel, sde_window_mask
from diffalign.rollout import sample_trajectories
from diffalign.utils.peft_utils import add_lora

PROMPTS = ["a photo of a cat", "a red car"]


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _family(boundary_ratio=None, **variant):
    pipe = WanFamily.tiny_pipeline(**variant)
    if boundary_ratio is not None:
        pipe.register_to_config(boundary_ratio=boundary_ratio)
    family = family_for_pipeline(pipe)
    family.set_kernel_scheduler(pipe)
    family.configure(num_frames=5)
    return family


def test_wan_is_registered_as_a_video_family():
    assert FAMILIES["WanPipeline"] is WanFamily and WanFamily.output_kind == "video"
    assert StableDiffusionFamily.output_kind == "image"
    assert WanFamily.rlg_route() == "guider (modular)"


def test_a14b_switches_experts_at_the_boundary_as_wan_pipeline():
    """A14B's boundary 0.875 and five steps, t = 1000, 955, 877, 705, 47: the last two go to `transformer_2`, with
    `guidance_scale_2`; a zero-window rollout is WanPipeline's sampling, and the second expert is really used."""
    family = _family(boundary_ratio=0.875, version="2.2-a14b")
    pipe = family.pipe
    family.configure(guidance_scale_2=2.0)
    latents = family.prepare_latents(2, 16, 16, torch.float32, "cpu", _generator(3))

    def rollout():
        return sample_trajectories(family, PROMPTS, num_inference_steps=5, guidance_scale=4.0, latents=latents,
                                   height=16, width=16, stochastic_steps=sde_window_mask(5, 0)).images

    ours = rollout()
    timesteps = pipe.scheduler.timesteps
    assert (timesteps >= family.boundary_timestep()).tolist() == [True, True, True, False, False]
    stock = pipe(prompt=PROMPTS, num_inference_steps=5, latents=latents, height=16, width=16, output_type="pt",
                 guidance_scale=4.0, **family.pipeline_call_kwargs(16, 16)).frames
    assert family.pipeline_call_kwargs()["guidance_scale_2"] == 2.0
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-4)
    family.guidance_scale_2 = None  # the run's scale for both experts, as WanPipeline without guidance_scale_2
    assert (rollout() - ours).abs().max() > 1e-4
    family.guidance_scale_2 = 2.0
    with torch.no_grad():
        for parameter in pipe.transformer_2.parameters():
            parameter.mul_(1.5)
    assert (rollout() - ours).abs().max() > 1e-4


def test_a14b_prediction_of_a_mixed_batch_is_each_row_own_expert():
    """Training batches mix steps on both sides of the boundary: each row gets its own expert and CFG scale."""
    family = _family(boundary_ratio=0.875, version="2.2-a14b")
    family.configure(guidance_scale_2=2.0)
    cond, negative = family.conditioning(PROMPTS, "", True, 16, 16)
    latents = family.prepare_latents(2, 16, 16, torch.float32, "cpu", _generator(1))
    timesteps = torch.tensor([955.0, 7.0])
    with torch.no_grad():
        mixed = family.predict(family.denoiser, latents, timesteps, cond, negative, 4.0)
        for row in range(2):
            pick = lambda mapping: {k: v[row:row + 1] for k, v in mapping.items()}  # noqa: E731
            alone = family.predict(family.denoiser, latents[row:row + 1], timesteps[row:row + 1], pick(cond),
                                   pick(negative), 4.0)
            torch.testing.assert_close(mixed[row:row + 1], alone, atol=1e-5, rtol=1e-4)
        high = family.predict(family.denoiser, latents[1:], torch.tensor([955.0]), pick(cond), pick(negative), 4.0)
    assert (high - mixed[1:]).abs().max() > 1e-4  # row 1 (t = 7) was the low-noise expert's

    # per-row adapters (the forward-process trainers' frozen predictions): the policy on row 0, the base on row 1
    from diffalign.utils.peft_utils import BASE_ADAPTER, adapter_rows

    add_lora(family.denoiser, target_modules=family.default_lora_target_modules)
    generator = _generator(2)
    for parameter in family.denoiser.parameters():
        if parameter.requires_grad:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1
    family.denoiser.eval()
    both = torch.tensor([955.0, 955.0])
    with torch.no_grad(), adapter_rows(family.denoiser, ["default", BASE_ADAPTER] * 2):  # [negative, cond] rows
        routed = family.predict(family.denoiser, latents, torch.tensor([955.0, 7.0]), cond, negative, 4.0)
        routed_high = family.predict(family.denoiser, latents, both, cond, negative, 4.0)
    with torch.no_grad():
        policy = family.predict(family.denoiser, latents, both, cond, negative, 4.0)
        family.denoiser.disable_adapters()
        base = family.predict(family.denoiser, latents, both, cond, negative, 4.0)
        family.denoiser.enable_adapters()
    torch.testing.assert_close(routed_high[0], policy[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(routed_high[1], base[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(routed[0], policy[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(routed[1], mixed[1], atol=1e-5, rtol=1e-4)  # the low-noise expert, no LoRA


def test_a14b_lora_trains_and_loads_into_the_high_noise_expert(tmp_path):
    family = _family(version="2.2-a14b")
    assert family.pipe.transformer_2 in family.frozen_modules()
    add_lora(family.denoiser, target_modules=family.default_lora_target_modules)
    family.save_lora(family.denoiser, str(tmp_path))
    fresh = WanFamily.tiny_pipeline(version="2.2-a14b")
    fresh.load_lora_weights(str(tmp_path))  # WanPipeline's default: into `transformer`
    assert getattr(fresh.transformer, "peft_config", None) and not getattr(fresh.transformer_2, "peft_config", None)


def test_ti2v_gives_one_timestep_per_latent_token():
    family = _family(version="2.2-ti2v")
    seen = []
    family.denoiser.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["timestep"]),
                                              with_kwargs=True)
    latents = family.prepare_latents(1, 32, 64, torch.float32, "cpu", _generator())
    assert latents.shape == (1, 48, 2, 2, 4)  # 48 channels, 16x VAE, two latent frames
    cond, _ = family.conditioning(PROMPTS[:1], "", False, 32, 64)
    with torch.no_grad():
        family.forward(family.denoiser, latents, torch.tensor([500.0]), cond)
    assert seen[0].shape == (1, 2 * 1 * 2) and (seen[0] == 500.0).all()  # frames x rows x columns of 2x2 patches
    # RLG: diffalign's WanRLGPipeline on the same components (diffusers' modular Wan has no per-token timesteps)
    assert family.resolution_multiple() == 32 and WanFamily.rlg_route_for(family.pipe) == "pipeline"
    rlg = WanFamily.rlg_pipeline(family.pipe)
    assert type(rlg).__name__ == "WanRLGPipeline" and rlg.config.expand_timesteps and rlg.transformer is family.denoiser


def test_num_frames_sets_the_latent_frames_and_the_decoded_video():
    family = _family()
    family.configure(num_frames=9)
    traj = sample_trajectories(family, PROMPTS[:1], num_inference_steps=2, guidance_scale=1.0, height=16, width=32,
                               generator=_generator())
    assert traj.latents.shape == (1, 3, 16, 3, 2, 4)  # (B, T + 1, C, F, h, w): (9 - 1) / 4 + 1 latent frames
    assert traj.images.shape == (1, 9, 3, 16, 32) and traj.images.dtype == torch.float32
    assert 0 <= traj.images.min() and traj.images.max() <= 1
    assert family.default_size() == (480, 832) and family.pipeline_call_kwargs()["num_frames"] == 9
    for bad in (8, 0):
        with pytest.raises(ModelError, match="num_frames must be 4k \\+ 1"):
            family.configure(num_frames=bad)
    with pytest.raises(ModelError, match="guidance_scale_2 .* one expert"):
        family.configure(guidance_scale_2=2.0)
    image_family = family_for_pipeline(StableDiffusionFamily.tiny_pipeline())
    with pytest.raises(ModelError, match="num_frames is a setting of video models"):
        image_family.configure(num_frames=5)


def test_num_frames_is_validated_and_hashed_only_when_set(tmp_path, capsys):
    from diffalign.cli import main
    from diffalign.trainers import NFTConfig

    from diffalign.trainers.base_config import HASHED_WHEN_SET

    assert NFTConfig(num_frames=9).hash() != NFTConfig().hash() != NFTConfig(num_frames=5).hash()
    assert NFTConfig(sample_guidance_scale_2=2.0).hash() != NFTConfig().hash()
    assert {"num_frames", "sample_guidance_scale_2"} <= HASHED_WHEN_SET  # unset, earlier runs keep their hash
    for flag, value, message in (("--num_frames", "8", "num_frames must be 4k + 1"),
                                 ("--num_frames", "-3", "num_frames must be 4k + 1"),
                                 ("--sample_guidance_scale_2", "0", "sample_guidance_scale_2 must be > 0")):
        assert main(["train", "nft", "--output_dir", str(tmp_path / "run"), flag, value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_video_latents_average_over_every_non_batch_dimension():
    """The flow SDE's log-prob and the NFT loss of `(B, C, F, h, w)` latents equal those of the same numbers folded
    into `(B, C * F, h, w)`: means over every non-batch dimension, frames included."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffalign.losses import nft_loss

    generator = _generator(5)
    video = [torch.randn(2, 4, 3, 2, 2, generator=generator) for _ in range(4)]
    folded = [tensor.flatten(1, 2) for tensor in video]
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    kernel = FlowSDEKernel(noise_level=0.7)
    t = scheduler.timesteps[1]
    _, video_log_prob = kernel.step(scheduler, video[0], t, video[1], prev_sample=video[2])
    _, folded_log_prob = kernel.step(scheduler, folded[0], t, folded[1], prev_sample=folded[2])
    assert video_log_prob.shape == (2,)
    torch.testing.assert_close(video_log_prob, folded_log_prob)
    alpha, sigma = torch.tensor([0.6, 0.3]), torch.tensor([0.4, 0.7])
    arguments = dict(optimality=torch.tensor([0.2, 0.9]), beta=1.0, adv_clip_max=5.0, kl_weight=0.1)
    for_video = nft_loss(video[0], video[1], video[2], video[3], video[1] * 0.5, alpha.view(-1, 1, 1, 1, 1),
                         sigma.view(-1, 1, 1, 1, 1), **arguments)
    for_folded = nft_loss(folded[0], folded[1], folded[2], folded[3], folded[1] * 0.5, alpha.view(-1, 1, 1, 1),
                          sigma.view(-1, 1, 1, 1), **arguments)
    for key in for_video:
        torch.testing.assert_close(for_video[key], for_folded[key])


def test_a_unipc_scheduler_becomes_flow_match_euler_with_its_shift():
    pipe = WanFamily.tiny_pipeline(unipc_scheduler=True)
    flow_shift = pipe.scheduler.config.flow_shift
    WanFamily.set_kernel_scheduler(pipe)
    assert type(pipe.scheduler).__name__ == FlowSDEKernel.scheduler_class
    assert pipe.scheduler.config.shift == flow_shift and not pipe.scheduler.config.use_dynamic_shifting


def test_two_prompts_give_different_conditioning():
    family = _family()
    cond = family.encode_prompts(PROMPTS)["encoder_hidden_states"]
    assert cond.shape == (2, family.max_sequence_length, 32)
    assert (cond[0] - cond[1]).abs().max() > 1e-3


# each algorithm's own settings for 3 steps (AWM's and DGPO's timestep counts fit in them)
ALGORITHM_ARGS = {
    "nft": [],
    "awm": ["--train_timesteps", "2", "--train_timestep_fraction", "1.0", "--train_micro_batch_size", "4"],
    "dgpo": ["--train_trunc_steps", "2", "--train_num_timesteps", "2", "--train_micro_batch_size", "4"],
    "ddpo": ["--sample_sde_window_size", "2"],
}


@pytest.mark.parametrize("algorithm, variant", [
    pytest.param("nft", {}, id="nft"),
    pytest.param("awm", {}, marks=pytest.mark.slow, id="awm"),
    pytest.param("dgpo", {}, marks=pytest.mark.slow, id="dgpo"),
    pytest.param("ddpo", {"version": "2.2-a14b"}, marks=pytest.mark.slow, id="ddpo-a14b"),
    # A14B's boundary: NFT's rows at random times mix both experts in one batch
    pytest.param("nft", {"version": "2.2-a14b", "boundary_ratio": 0.875}, marks=pytest.mark.slow, id="nft-a14b"),
])
def test_cli_trains_wan_and_the_lora_loads_in_wan_pipeline(algorithm, variant, tmp_path):
    """Two epochs from the CLI on the tiny Wan (5 frames): metrics per epoch, an animated before/after grid, the
    run's `num_frames` saved, and a LoRA that `WanPipeline.load_lora_weights` loads and that changes its videos."""
    import diffusers

    from diffalign.cli import main
    from diffalign.plotting import find_video, read_video

    model = WanFamily.save_tiny(str(tmp_path / "wan"), **variant)
    out = str(tmp_path / "run")
    args = ["train", algorithm, "--model", model, "--output_dir", out, "--num_epochs", "2", "--sample_num_steps", "3",
            "--sample_num_prompts_per_epoch", "2", "--sample_images_per_prompt", "2", "--sample_batch_size", "4",
            "--train_batch_size", "4", "--grid_num_images", "2", "--checkpoint_every", "2", "--reward",
            "jpeg_compressibility", "--prompts", "[a photo of a cat, a red car]", "--train_learning_rate", "0.05",
            "--sample_guidance_scale", "3.0", "--sample_resolution", "16", "--num_frames", "5",
            "--final_eval_num_images", "0", "--sample_compute_kl", "false"] + ALGORITHM_ARGS[algorithm]
    assert main(args) == 0
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [line["epoch"] for line in lines] == [0, 1]
    grid = find_video(os.path.join(out, "grid_before_after.png"))
    assert grid is not None and len(read_video(grid)) == 5  # an animated grid, one frame per video frame
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["num_frames"] == 5

    pipe = diffusers.WanPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPTS[0], num_inference_steps=3, height=16, width=16, num_frames=5, output_type="pt",
                  guidance_scale=3.0)
    before = pipe(generator=_generator(), **kwargs).frames
    pipe.load_lora_weights(os.path.join(out, "final"))  # into `transformer` (A14B: the high-noise expert)
    after = pipe(generator=_generator(), **kwargs).frames
    assert (after - before).abs().max() > 1e-4
