"""Krea 2's own facts, beyond the family tester (tests/test_family_common.py runs every shared check on it): the
family's text encoding, latents, timesteps and decoding are `Krea2AutoBlocks`' steps and equal `Krea2Pipeline`'s own
after save and reload (two prompts encode differently), and a mixed-adapter batch (the policy and its base in one
forward) reaches the text fusion's per-token LoRA layers."""

import pytest
import torch

from diffalign.families import FAMILIES, load_family
from diffalign.families.krea2 import Krea2Family, repeat_row_adapters
from diffalign.rollout import policy_and_reference_pred
from diffalign.utils.peft_utils import add_lora

PROMPTS = ["a photo of a cat", "a red car"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    family = load_family(Krea2Family.save_tiny(str(tmp_path_factory.mktemp("krea2") / "model")))
    family.configure(max_sequence_length=32)
    return family


def test_krea2_is_registered():
    assert FAMILIES["Krea2Pipeline"] is Krea2Family


def test_repeat_row_adapters():
    assert repeat_row_adapters(["a", "b"], 4) == ["a", "a", "b", "b"]
    assert repeat_row_adapters(["a", "b", "c"], 3) == ["a", "b", "c"]


def test_the_blocks_steps_are_the_pipeline_after_save_and_reload(family):
    pipe = family.pipe
    cond = family.encode_prompts(PROMPTS)
    embeds, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=32)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, atol=0, rtol=0)
    assert torch.equal(cond["encoder_attention_mask"], mask) and mask.shape == (2, 32)
    assert (embeds[0] - embeds[1]).abs().max() > 1e-3  # the tokenizer built in code tells prompts apart
    latents = family.prepare_latents(2, 16, 24, torch.float32, "cpu", torch.Generator().manual_seed(0))
    stock = pipe.prepare_latents(2, 16, 16, 24, torch.float32, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(latents, stock) and latents.shape == (2, 6, 64)
    timesteps = family.set_timesteps(3, "cpu", 16, 24)
    images = pipe(prompt=PROMPTS, num_inference_steps=3, height=16, width=24, latents=latents, output_type="pt",
                  max_sequence_length=32, guidance_scale=0.0, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(timesteps, pipe.scheduler.timesteps)
    final = pipe(prompt=PROMPTS, num_inference_steps=3, height=16, width=24, latents=latents, output_type="latent",
                 max_sequence_length=32, guidance_scale=0.0).images
    torch.testing.assert_close(family.decode(final, 16, 24), images, atol=1e-6, rtol=0)


def test_policy_and_base_in_one_forward_equal_two_forwards(family):
    """Krea 2's text fusion runs LoRA layers on `(B * L, layers, D)`: each token row takes its prompt's adapter."""
    denoiser = family.denoiser
    add_lora(denoiser, target_modules=family.default_lora_target_modules)
    for param in denoiser.parameters():
        if param.requires_grad:
            param.data = torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.1
    denoiser.eval()
    cond, negative = family.conditioning(PROMPTS, "", True, 16, 16)
    latents = family.prepare_latents(2, 16, 16, torch.float32, "cpu", torch.Generator().manual_seed(1))
    t = torch.tensor(700.0)  # one timestep for the batch, as a rollout step passes it
    with torch.no_grad():
        policy, base = policy_and_reference_pred(family, denoiser, latents, t, cond, negative, 3.0)
        alone = family.predict(denoiser, latents, t, cond, negative, 3.0)
        denoiser.disable_adapters()
        base_alone = family.predict(denoiser, latents, t, cond, negative, 3.0)
        denoiser.enable_adapters()
    torch.testing.assert_close(policy, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base, base_alone, atol=1e-5, rtol=1e-5)
    assert (policy - base).abs().max() > 1e-3
