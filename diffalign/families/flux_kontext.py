"""FLUX.1 Kontext (dev): FLUX.1 that edits an image. The prompt is an instruction, the condition image (a prompt's
`image`, see `diffalign.prompts.ConditionedPrompt`) is VAE-encoded, packed like the latents and appended to the image
tokens; trajectories with Flow-GRPO's SDE, as FLUX.1.

What differs from FLUX.1 (`diffalign.families.flux`), as in diffusers' `FluxKontextPipeline`:

- **the condition tokens**: the condition image is resized to the sampled size (`image_processor.resize`, then
  `preprocess`: Flow-GRPO's Kontext recipe resizes it to its training resolution too), encoded with the VAE's
  posterior mode (`sample_mode="argmax"`), shifted, scaled and packed 2x2 (`condition_latents`). They travel in the
  conditioning mapping (`image_latents`), so a recorded trajectory is re-evaluated with the image it was sampled
  with; they are encoded once per (images, size) and cached, like text. The transformer sees
  `cat([latents, image_latents], dim=1)` with the condition's position ids (`(1, row, column)`: the first axis is 1
  where the latents have 0) after the latents', and its output is cut back to the latents' tokens (`forward`).
- **guidance**: guidance-distilled, the embedded guidance defaults to 2.5 (Kontext's model card and Flow-GRPO's
  recipe; the pipeline's own default is 3.5); true CFG (`sample_guidance_scale != 1`) gives the negative half the
  same condition tokens, as the pipeline does.
- **sizes**: `FluxKontextPipeline` rescales its output to `max_area` pixels (1024^2 by default) and the condition
  to one of Kontext's preferred resolutions (`_auto_resize`); a rollout samples the size it is given, and
  `pipeline_call_kwargs(height, width)` gives the pipeline call that matches it (`max_area = height x width`,
  `_auto_resize=False`, the condition image resized to the size beforehand: `pipeline_image`).
- **text-only prompts**: a batch whose prompts have no condition image samples text-to-image, exactly as
  `FluxKontextPipeline` without `image` does; prompts with and without images are a one-line `PromptError`
  (`diffalign.prompts.check_condition_prompts`, when a run starts and per batch): their token counts differ.
"""

from typing import Dict, List, Optional, Tuple

import torch

from ..errors import PromptError
from ..prompts import condition_images_of, load_condition_image
from .base import Conditioning
from .flux import FluxFamily
from .packed_latents import latent_image_ids, pack_latents

CONDITION_AXIS = 1  # the first position-id axis of the condition tokens (0 for the noisy latents, text all zeros)


def condition_image_ids(rows: int, columns: int, device, dtype: torch.dtype) -> torch.Tensor:
    """`(rows * columns, 3)` position ids of a packed condition image: the latents' ids with first axis 1, as
    `FluxKontextPipeline.prepare_latents` sets `image_ids[..., 0] = 1`."""
    ids = latent_image_ids(rows, columns, device, dtype)
    ids[:, 0] = CONDITION_AXIS
    return ids


class FluxKontextFamily(FluxFamily):
    name = "flux_kontext"
    pipeline_class = "FluxKontextPipeline"
    denoiser_name = "transformer"
    denoiser_class = "FluxTransformer2DModel"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    pipeline_init_kwargs = {}  # no safety checker, no watermarker
    rlg_pipeline_class = "FluxKontextRLGPipeline"  # its modular blocks take no guider (FLUX.1's embedded guidance)
    modular_blocks_class = "FluxKontextAutoBlocks"
    hub_tags = ("flux", "flux-kontext", "image-editing")
    guidance_kind = "embedded"
    default_guidance_scale = 2.5  # FLUX.1 Kontext [dev]'s model card and Flow-GRPO's Kontext recipe
    embedded_guidance = default_guidance_scale
    tiny_variants = {}  # Kontext is a dev (guidance-distilled) model only
    max_condition_images = 1  # FluxKontextPipeline takes one `image`

    def __init__(self, pipe, max_cache: int = 4096):
        super().__init__(pipe, max_cache)
        self._condition_cache: Dict[Tuple[Tuple[str, ...], int, int], torch.Tensor] = {}

    # -------------------------------------------------------------------- prompts
    def encode_text(self, prompts: List[str], device) -> Conditioning:
        return super().encode_text([str(p) for p in prompts], device)  # the text alone reaches the text encoders

    def conditioning(self, prompts: List[str], negative_prompt: str, do_cfg: bool, height: int, width: int):
        """As FLUX.1's, plus the packed condition latents (`image_latents`, `(B, tokens, 4C)`) of prompts with a
        condition image, the same for the negative half (true CFG)."""
        cond, negative = super().conditioning(prompts, negative_prompt, do_cfg, height, width)
        image_latents = self.condition_latents(prompts, height, width)
        if image_latents is not None:
            image_latents = image_latents.to(cond["encoder_hidden_states"].device)
            cond = {**cond, "image_latents": image_latents}
            if negative is not None:
                negative = {**negative, "image_latents": image_latents.clone()}
        return cond, negative

    @torch.no_grad()
    def condition_latents(self, prompts: List[str], height: int, width: int) -> Optional[torch.Tensor]:
        """`(B, rows * columns, 4C)` packed VAE latents of the prompts' condition images at `height x width`, each
        image encoded once per size (cached); None when no prompt has one."""
        images = [condition_images_of(p) for p in prompts]
        if not any(images):
            return None
        if not all(images):
            bare = next(str(p) for p, paths in zip(prompts, images) if not paths)
            raise PromptError(f"a {self.name} batch mixes prompts with and without a condition image ('{bare}' has "
                              f"none): give every prompt an 'image', or none")
        keys = [(paths, int(height), int(width)) for paths in images]
        for key in dict.fromkeys(keys):
            if key not in self._condition_cache:
                if len(self._condition_cache) >= self.max_cache:
                    self._condition_cache.clear()
                self._condition_cache[key] = self.encode_condition_image(key[0][0], height, width)
        return torch.stack([self._condition_cache[key] for key in keys])

    def pipeline_image(self, path: str, height: int, width: int):
        """The condition image at `path` resized to `height x width` (PIL), as the rollout encodes it: what to pass
        to `FluxKontextPipeline` (with `pipeline_call_kwargs(height, width)`) for the same sampling."""
        return self.pipe.image_processor.resize(load_condition_image(path), int(height), int(width))

    def encode_condition_image(self, path: str, height: int, width: int) -> torch.Tensor:
        """`(rows * columns, 4C)`: the image resized and preprocessed as `FluxKontextPipeline` does (to [-1, 1]),
        the VAE posterior's mode, `(z - shift_factor) * scaling_factor`, packed 2x2."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import retrieve_latents

        vae = self.pipe.vae
        pixels = self.pipe.image_processor.preprocess(self.pipeline_image(path, height, width), int(height),
                                                      int(width))
        latents = retrieve_latents(vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)), sample_mode="argmax")
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        return pack_latents(latents)[0]

    def pipeline_call_kwargs(self, height: Optional[int] = None, width: Optional[int] = None) -> Dict:
        """FLUX.1's (the T5 length), plus `max_area` (the pipeline would rescale its output to 1024^2 pixels) and
        `_auto_resize=False` (it would resize the condition to a preferred Kontext resolution)."""
        default = self.default_resolution()
        area = int(height or default) * int(width or default)
        return {**super().pipeline_call_kwargs(height, width), "max_area": area, "_auto_resize": False}

    # ------------------------------------------------------------------ denoising
    def forward(self, denoiser, latents, timesteps, cond: Conditioning):
        """One transformer call on the packed latents followed by the condition tokens (when the prompts have a
        condition image), the output cut back to the latents' tokens, as `FluxKontextPipeline`'s loop."""
        height, width = cond["image_size"][0].tolist()
        rows, columns = self._grid(height, width)
        embeds = cond["encoder_hidden_states"]
        img_ids = latent_image_ids(rows, columns, latents.device, embeds.dtype)
        hidden_states = latents
        condition = cond.get("image_latents")
        if condition is not None:
            hidden_states = torch.cat([latents, condition.to(latents.dtype)], dim=1)
            # the condition is encoded at the sampled size (`condition_latents`), so it has the latents' grid
            img_ids = torch.cat([img_ids, condition_image_ids(rows, columns, latents.device, embeds.dtype)])
        txt_ids = torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=embeds.dtype)
        guidance = cond.get("guidance")
        output = denoiser(
            hidden_states=hidden_states, timestep=timesteps.to(latents.dtype) / 1000,
            guidance=guidance.float() if guidance is not None else None,
            pooled_projections=cond["pooled_projections"], encoder_hidden_states=embeds, txt_ids=txt_ids,
            img_ids=img_ids, return_dict=False,
        )[0]
        return output[:, : latents.shape[1]]

    # ------------------------------------------------------------ tiny test model
    @classmethod
    def tiny_components(cls, seed: int = 0) -> dict:
        """Components of a tiny random `FluxKontextPipeline`: FLUX.1's tiny components with the embedded guidance
        and FLUX.1-dev's dynamically shifted scheduler (Kontext's `scheduler_config.json` is FLUX.1-dev's); no image
        encoder (IP-Adapter) or feature extractor."""
        return FluxFamily.tiny_components(seed, guidance_embeds=True, use_dynamic_shifting=True)
