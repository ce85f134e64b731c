"""Qwen-Image-Edit (`QwenImageEditPipeline`) and Qwen-Image-Edit-2509 / 2511 (`QwenImageEditPlusPipeline`, several
condition images): Qwen-Image (`diffalign.families.qwenimage`) that edits images. The prompt is an instruction; each
condition image (a prompt's `image` / `images`, `diffalign.prompts.ConditionedPrompt`) is seen twice, as each
pipeline's `__call__` does:

- **by the Qwen2.5-VL encoder**: the instruction is wrapped in the Edit template with a vision placeholder per image
  (`<|vision_start|><|image_pad|><|vision_end|>`; Edit-Plus numbers them "Picture 1: ..."), the image resized to
  `calculate_dimensions(area, ratio)` (Edit: 1024^2 pixels; Edit-Plus: `CONDITION_IMAGE_SIZE`, 384^2) and given to
  the processor; the template's first 64 tokens are dropped. `encode_text` is the pipeline's own `encode_prompt`,
  one prompt at a time (each prompt has its own images: Edit-Plus's `encode_prompt` gives every prompt of a call
  all of the call's images).
- **as VAE latents appended to the image tokens** (as FLUX.1 Kontext's, `diffalign.families.flux_kontext`): each
  image resized to 1024^2 pixels at its aspect ratio (Edit-Plus: `VAE_IMAGE_SIZE`), the VAE posterior's mode,
  `(z - latents_mean) / latents_std`, packed 2x2. The transformer sees `cat([latents, image_latents])` with
  `img_shapes` `[(1, rows, columns), (1, rows_i, columns_i)...]` and its output is cut back to the latents' tokens.
  Unlike Kontext, the condition's size follows the image, not the sampled size: the images of one batch must give
  the same condition grid (same aspect ratio), else a one-line `PromptError`.

Both travel in the conditioning mapping, cached per (instruction, images) like text: a recorded trajectory is
re-evaluated with the images it was sampled with. True CFG (with its norm rescale) as Qwen-Image; the negative prompt
is encoded with the prompt's images, as the pipelines do. An editing prompt needs a condition image (the pipelines
cannot sample without one).

The processor: diffusers' pipelines take a `Qwen2VLProcessor`, whose video processor needs torchvision in
transformers 5.25 (`ProcessorMixin.__init__` resolves `VideoProcessorMixin`, a dummy without torchvision).
`ImageOnlyQwen2VLProcessor` is `Qwen2VLProcessor` without the video processor (the pipelines never pass videos):
the same `__call__`, image processor (`Qwen2VLImageProcessor`'s PIL backend without torchvision) and tokenizer. It
saves as a `Qwen2VLProcessor` (the Hub's layout), and a model whose `processor` is a `Qwen2VLProcessor` loads it as
`ImageOnlyQwen2VLProcessor` where torchvision is missing (`loaded_components`).
"""

from typing import Dict, List

import torch

from ..errors import PromptError
from ..prompts import ConditionedPrompt, condition_images_of, load_condition_image
from . import vl_processors
from .base import Conditioning
from .vl_processors import torchvision_available  # noqa: F401 (re-exported)
from .packed_latents import pack_latents
from .qwenimage import QwenImageFamily


def image_only_processor_class():
    """`ImageOnlyQwen2VLProcessor`: `Qwen2VLProcessor` without a video processor
    (`diffalign.families.vl_processors.image_only_processor_class`)."""
    return vl_processors.image_only_processor_class("Qwen2VLProcessor")


def __getattr__(name: str):
    if name == "ImageOnlyQwen2VLProcessor":  # `from ...qwenimage_edit import ImageOnlyQwen2VLProcessor` too
        return image_only_processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class QwenImageEditFamily(QwenImageFamily):
    name = "qwenimage_edit"
    pipeline_class = "QwenImageEditPipeline"
    denoiser_name = "transformer"
    denoiser_class = "QwenImageTransformer2DModel"
    text_encoder_names = ("text_encoder",)
    pipeline_init_kwargs = {}
    rlg_pipeline_class = None  # no classic RLG pipeline: the RLG guider goes through the modular blocks
    # diffusers' modular Qwen-Image-Edit (its blocks take a `guider`) with Qwen-Image's `modular_cfg_guider`: bit for
    # bit `QwenImageEditPipeline` given the negative prompt as a list (`ModularRLGPipeline` does): the blocks replace
    # a falsy string negative prompt by " " (diffusers 0.42.1, modular_pipelines/qwenimage/encoders.py:909), where the
    # pipeline encodes "" as given
    modular_blocks_class = "QwenImageEditAutoBlocks"
    hub_tags = ("qwen-image", "qwen-image-edit", "image-editing")
    guidance_kind = "true_cfg"
    default_guidance_scale = 4.0  # the pipelines' documented `true_cfg_scale` and Flow-GRPO's Qwen-Image-Edit recipes
    tiny_variants = {}
    max_condition_images = 1  # QwenImageEditPipeline takes one `image` per prompt
    requires_condition_image = True  # the pipeline reads the image's size before anything else
    max_sequence_length = None  # the Edit pipelines' `encode_prompt` does not truncate (their limit is 1024)

    # the condition's pixel areas: the pipeline's VAE image and the VL encoder's image (Edit: one image for both)
    def vae_image_area(self) -> int:
        return 1024 * 1024  # QwenImageEditPipeline.__call__'s `calculate_dimensions(1024 * 1024, ...)`

    def encoder_image_area(self) -> int:
        return self.vae_image_area()

    def calculate_dimensions(self, area: int, ratio: float):
        """`(width, height)` of `area` pixels at `ratio` (multiples of 32), the pipeline module's own function."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        return calculate_dimensions(area, ratio)[:2]

    def default_resolution(self) -> int:
        """The pipelines' output size without `height` / `width`: 1024^2 pixels at the condition image's ratio
        (`calculate_dimensions(1024 * 1024, ratio)`), a side of 1024 for a square image."""
        return self.calculate_dimensions(1024 * 1024, 1.0)[0]

    # -------------------------------------------------------------------- prompts
    def encoder_images(self, paths) -> list:
        """The PIL images the VL encoder sees: each image resized to `encoder_image_area` at its aspect ratio."""
        images = []
        for path in paths:
            image = load_condition_image(path)
            width, height = self.calculate_dimensions(self.encoder_image_area(), image.size[0] / image.size[1])
            images.append(self.pipe.image_processor.resize(image, height, width))
        return images

    def encode_text(self, prompts: List[str], device) -> Conditioning:
        """Per prompt: the pipeline's `encode_prompt` of the instruction with its images (`encoder_images`), and the
        packed VAE latents of its images (`condition_latents`) with their grids `(rows, columns)`."""
        rows = []
        for prompt in prompts:
            paths = condition_images_of(prompt)
            if not paths:
                raise PromptError(f"a {self.name} prompt needs a condition image ('{prompt}' has none): give it an "
                                  "'image' in the prompt file")
            embeds, mask = self.pipe.encode_prompt(prompt=[str(prompt)], image=self.encoder_images(paths),
                                                   device=device)
            latents, grids = self.condition_latents(paths, device)
            rows.append({"encoder_hidden_states": embeds[0], "image_latents": latents, "condition_grids": grids})
        length = max(row["encoder_hidden_states"].shape[0] for row in rows)
        mask = torch.zeros(len(rows), length, dtype=torch.bool, device=device)
        for i, row in enumerate(rows):
            mask[i, : row["encoder_hidden_states"].shape[0]] = True
        return {
            "encoder_hidden_states": torch.nn.utils.rnn.pad_sequence([r["encoder_hidden_states"] for r in rows],
                                                                     batch_first=True),
            "encoder_hidden_states_mask": mask,
            "image_latents": [r["image_latents"] for r in rows],
            "condition_grids": [r["condition_grids"] for r in rows],
        }

    def cache_row(self, encoded: Conditioning, index: int) -> Conditioning:
        length = int(encoded["encoder_hidden_states_mask"][index].sum())
        return {
            "encoder_hidden_states": encoded["encoder_hidden_states"][index, :length],
            "encoder_hidden_states_mask": encoded["encoder_hidden_states_mask"][index, :length],
            "image_latents": encoded["image_latents"][index],
            "condition_grids": encoded["condition_grids"][index],
        }

    @torch.no_grad()
    def condition_latents(self, paths, device):
        """`(tokens, 4C)` packed VAE latents of a prompt's images, one after the other, and their grids `(n, 2)`:
        each image resized to `vae_image_area` at its ratio and preprocessed to [-1, 1] as the pipeline does, the
        posterior's mode, normalised by the VAE's `latents_mean` / `latents_std`, packed 2x2."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import retrieve_latents

        vae = self.pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        tokens, grids = [], []
        for path in paths:
            image = load_condition_image(path)
            width, height = self.calculate_dimensions(self.vae_image_area(), image.size[0] / image.size[1])
            pixels = self.pipe.image_processor.preprocess(image, height, width).unsqueeze(2)
            latents = retrieve_latents(vae.encode(pixels.to(device=device, dtype=vae.dtype)), sample_mode="argmax")
            mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
            std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
            latents = ((latents - mean) / std)[:, :, 0]
            tokens.append(pack_latents(latents)[0])
            grids.append([latents.shape[2] // 2, latents.shape[3] // 2])
        return torch.cat(tokens), torch.tensor(grids, device=device)

    def conditioning(self, prompts: List[str], negative_prompt: str, do_cfg: bool, height: int, width: int):
        """As Qwen-Image's, the condition latents riding along; the negative half is the negative prompt with each
        prompt's own images (the pipelines encode it with the call's images)."""
        cond = self.add_resolution(self.encode_prompts(prompts), height, width)
        negative = None
        if do_cfg:
            negatives = [ConditionedPrompt(negative_prompt, condition_images_of(p)) for p in prompts]
            negative = self.add_resolution(self.encode_prompts(negatives), height, width)
        return cond, negative

    def encode_prompts(self, prompts: List[str]) -> Conditioning:
        """The cached rows stacked (`ModelFamily.encode_prompts`); a one-line `PromptError` when the batch's condition
        images give different condition grids (their tokens cannot share one transformer call)."""
        encoded = super().encode_prompts(prompts)
        grids = encoded["condition_grids"]
        if not bool((grids == grids[:1]).all()):
            first = next(i for i in range(len(prompts)) if not bool((grids[i] == grids[0]).all()))
            raise PromptError(f"the condition images of '{prompts[0]}' and '{prompts[first]}' differ in aspect ratio "
                              f"or count ({grids[0].tolist()} vs {grids[first].tolist()} latent grids): a "
                              f"{self.name} batch needs images of one shape")
        return encoded

    # ------------------------------------------------------------------ denoising
    def forward(self, denoiser, latents, timesteps, cond: Conditioning):
        """One transformer call on the packed latents followed by the condition tokens, `img_shapes` listing the
        latents' grid then each condition image's, the output cut back to the latents' tokens, as the pipelines'
        loop."""
        mask = cond["encoder_hidden_states_mask"]
        length = int(mask.sum(1).max())
        embeds, mask = cond["encoder_hidden_states"][:, :length], mask[:, :length]
        height, width = cond["image_size"][0].tolist()
        rows, columns = self._grid(height, width)
        shapes = [(1, rows, columns)] + [(1, r, c) for r, c in cond["condition_grids"][0].tolist()]
        hidden_states = torch.cat([latents, cond["image_latents"].to(latents.dtype)], dim=1)
        output = denoiser(
            hidden_states=hidden_states, timestep=timesteps.to(latents.dtype) / 1000, encoder_hidden_states=embeds,
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[shapes] * latents.shape[0], return_dict=False,
        )[0]
        return output[:, : latents.shape[1]]

    # ------------------------------------------------------------ pipeline calls
    def pipeline_condition_kwargs(self, prompt) -> Dict:
        """The pipeline's `image` argument for one prompt (its condition images, PIL): with
        `pipeline_call_kwargs`, the call that samples as a rollout of that prompt does."""
        images = [load_condition_image(path) for path in condition_images_of(prompt)]
        return {"image": images[0] if len(images) == 1 else images}

    # -------------------------------------------------------------------- loading
    @classmethod
    def loaded_components(cls, path: str) -> Dict:
        """Where torchvision is missing and the model's `processor` is a `Qwen2VLProcessor` (the Hub's Qwen-Image-Edit
        models, and every pipeline saved here: `image_only_processor_class`), the processor loaded from its folder as
        `ImageOnlyQwen2VLProcessor` (the stock one's video processor needs torchvision; the pipelines pass no
        video); nothing otherwise."""
        return vl_processors.image_only_components(path, "Qwen2VLProcessor")

    # --------------------------------------------------------- tiny test models
    @classmethod
    def tiny_components(cls, seed: int = 0) -> dict:
        """Qwen-Image's tiny components (`QwenImageFamily.tiny_components`) and an `ImageOnlyQwen2VLProcessor` on the
        same tokenizer with Qwen2-VL's image processor (its PIL backend without torchvision: patch 14, merge 2, as
        Qwen2.5-VL's) limited to 4 x 4 merged patches per image, so that the tiny VL encoder sees few tokens."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        components = QwenImageFamily.tiny_components(seed)
        patch = 14 * 2  # a merged patch's side
        image_processor = Qwen2VLImageProcessorPil(min_pixels=patch * patch, max_pixels=16 * patch * patch)
        components["processor"] = image_only_processor_class()(image_processor=image_processor,
                                                               tokenizer=components["tokenizer"])
        return components


class QwenImageEditPlusFamily(QwenImageEditFamily):
    name = "qwenimage_edit_plus"
    pipeline_class = "QwenImageEditPlusPipeline"
    denoiser_name = "transformer"
    denoiser_class = "QwenImageTransformer2DModel"
    text_encoder_names = ("text_encoder",)
    pipeline_init_kwargs = {}
    rlg_pipeline_class = None
    modular_blocks_class = "QwenImageEditPlusAutoBlocks"  # as QwenImageEditFamily's (encoders.py:1040 for " ")
    hub_tags = ("qwen-image", "qwen-image-edit", "image-editing")
    guidance_kind = "true_cfg"
    default_guidance_scale = 4.0
    tiny_variants = {}
    # Qwen-Image-Edit-2509's model card: "the optimal performance is currently achieved with 1 to 3 input images"
    max_condition_images = 3

    def vae_image_area(self) -> int:
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

        return pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE

    def encoder_image_area(self) -> int:
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

        return pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE

    def calculate_dimensions(self, area: int, ratio: float):
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

        return calculate_dimensions(area, ratio)

    def pipeline_condition_kwargs(self, prompt) -> Dict:
        """Edit-Plus takes its images as a list (one prompt per call)."""
        return {"image": [load_condition_image(path) for path in condition_images_of(prompt)]}
