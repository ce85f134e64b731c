"""diffusers' SD3 `PipelineTesterMixin` and `PeftLoraLoaderMixinTests` suites, run offline twice: with diffusers'
`StableDiffusion3Pipeline` (`*Diffusers`) and with `StableDiffusion3RLGPipeline` (`*RLG`).

The test classes are diffusers' own (copied in `upstream/`); only the dummy components are built offline (see
`offline.py`). unittest classes cannot take `pytest.mark.parametrize`, so the parametrization over
`pipeline_class` is one subclass per class.
"""

import unittest
from unittest import mock

import diffusers
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from diffalign.pipelines import StableDiffusion3RLGPipeline

from . import offline
from .upstream.lora import test_lora_layers_sd3 as upstream_lora
from .upstream.pipelines.stable_diffusion_3 import test_pipeline_stable_diffusion_3 as upstream_pipe


# about 4 minutes on 2 CPU cores: deselected by the default suite
pytestmark = pytest.mark.slow


class _OfflineSD3PipelineComponents:
    def get_dummy_components(self):
        # diffalign: diffusers' `StableDiffusion3PipelineFastTests.get_dummy_components`, with the tokenizers and the
        # T5 config built offline instead of downloaded (`hf-internal-testing/tiny-random-clip`, `.../tiny-random-t5`)
        # and the CLIP text config using CLIP's real vocabulary (the offline tokenizer's) instead of 1000 tokens.
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(
            sample_size=32,
            patch_size=1,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
        )
        clip_text_encoder_config = offline.clip_text_config()  # diffalign: offline vocabulary

        torch.manual_seed(0)
        text_encoder = CLIPTextModelWithProjection(clip_text_encoder_config)

        torch.manual_seed(0)
        text_encoder_2 = CLIPTextModelWithProjection(clip_text_encoder_config)

        torch.manual_seed(0)
        config = offline.t5_config()  # diffalign: was AutoConfig.from_pretrained("hf-internal-testing/tiny-random-t5")
        text_encoder_3 = T5EncoderModel(config)

        tokenizer = offline.clip_tokenizer()  # diffalign: was CLIPTokenizer.from_pretrained(hub)
        tokenizer_2 = offline.clip_tokenizer()  # diffalign: was CLIPTokenizer.from_pretrained(hub)
        tokenizer_3 = offline.t5_tokenizer()  # diffalign: was AutoTokenizer.from_pretrained(hub)

        torch.manual_seed(0)
        vae = AutoencoderKL(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(4,),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=1,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        )

        scheduler = upstream_pipe.FlowMatchEulerDiscreteScheduler()

        return {
            "scheduler": scheduler,
            "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2,
            "text_encoder_3": text_encoder_3,
            "tokenizer": tokenizer,
            "tokenizer_2": tokenizer_2,
            "tokenizer_3": tokenizer_3,
            "transformer": transformer,
            "vae": vae,
            "image_encoder": None,
            "feature_extractor": None,
        }

    def test_inference(self):
        # diffalign: diffusers' expected slice was computed with the hub's text encoders and tokenizers, which the
        # offline components cannot reproduce; instead the image must equal diffusers' `StableDiffusion3Pipeline`'s
        # on the same components (exactly: same operations in the same order).
        inputs = self.get_dummy_inputs("cpu")
        image = self.pipeline_class(**self.get_dummy_components())(**inputs).images[0]
        inputs = self.get_dummy_inputs("cpu")
        expected = StableDiffusion3Pipeline(**self.get_dummy_components())(**inputs).images[0]
        self.assertEqual(image.shape, (32, 32, 3))
        np.testing.assert_array_equal(image, expected)


class StableDiffusion3PipelineFastTestsDiffusers(
    _OfflineSD3PipelineComponents, upstream_pipe.StableDiffusion3PipelineFastTests
):
    pipeline_class = StableDiffusion3Pipeline


class StableDiffusion3PipelineFastTestsRLG(
    _OfflineSD3PipelineComponents, upstream_pipe.StableDiffusion3PipelineFastTests
):
    pipeline_class = StableDiffusion3RLGPipeline

    def test_encode_prompt_works_in_isolation(self):
        # diffalign: the test finds the return names of `encode_prompt` in the source of
        # `getattr(diffusers.pipelines, pipeline_class.__name__)`, which only holds diffusers' own classes; expose ours
        # there for the test (the test itself runs unchanged).
        with mock.patch.object(diffusers.pipelines, self.pipeline_class.__name__, self.pipeline_class, create=True):
            super().test_encode_prompt_works_in_isolation()

    @unittest.expectedFailure
    def test_components_function(self):
        # diffalign: the one intended difference. Our pipeline has one more optional component, `aligned_transformer`
        # (a full-weight aligned model; None by default), so `pipe.components` has a key diffusers' class does not
        # take: `StableDiffusion3Pipeline(**rlg_pipe.components)` needs `aligned_transformer` dropped (`from_pipe`
        # does that). The SD, SDXL and FLUX RLG pipelines have the same extra component (`aligned_unet`/`_transformer`).
        super().test_components_function()


class _OfflineSD3LoRAComponents:
    # diffalign: the hub fixtures of `SD3LoRATests` (`hf-internal-testing/tiny-random-clip`, `.../tiny-random-t5`,
    # `.../tiny-sd3-text_encoder`, `.../tiny-sd3-text_encoder-2`) built offline; `from_pretrained` on these returns the
    # offline equivalent (the two CLIP encoders differ, as the two hub checkpoints do).
    tokenizer_cls, tokenizer_id = offline.OfflineFixture(offline.clip_tokenizer), None
    tokenizer_2_cls, tokenizer_2_id = offline.OfflineFixture(offline.clip_tokenizer), None
    tokenizer_3_cls, tokenizer_3_id = offline.OfflineFixture(offline.t5_tokenizer), None
    text_encoder_cls, text_encoder_id = offline.clip_text_encoder_with_projection(seed=0), None
    text_encoder_2_cls, text_encoder_2_id = offline.clip_text_encoder_with_projection(seed=1), None
    text_encoder_3_cls, text_encoder_3_id = offline.t5_encoder(seed=0), None

    @unittest.skip("diffalign: loads LoRA files of hf-internal-testing/tiny-sd3-loras from the hub; the suite runs offline")
    def test_sd3_lora(self):
        pass


class SD3LoRATestsDiffusers(_OfflineSD3LoRAComponents, upstream_lora.SD3LoRATests):
    pipeline_class = StableDiffusion3Pipeline


class SD3LoRATestsRLG(_OfflineSD3LoRAComponents, upstream_lora.SD3LoRATests):
    pipeline_class = StableDiffusion3RLGPipeline

