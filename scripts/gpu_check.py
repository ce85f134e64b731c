"""The prepared GPU check: every model family at its real size (random weights, no hub), trained with LoRA through
diffalign's own trainers, on one CUDA GPU within a time budget.

    python scripts/gpu_check.py --output gpu_check.json            # CUDA: measure (about 8 minutes on one H100)
    python scripts/gpu_check.py --dry-run --output plan.json       # any machine: the plan (meta device, no weights)
    python scripts/gpu_check.py --tiny --output tiny.json          # CPU: the same code path on tiny components

Each model (`MODELS`: SD1.5, SDXL, SD3.5-M, FLUX.1-dev, Qwen-Image; a model whose family this diffalign lacks is
skipped) is built from its published configuration written out below, its weights random: parameters created on the
meta device and materialised on the GPU in the check's dtype (buffers such as position tables are computed as the
classes compute them). Tokenizers, schedulers and the other small components come from the family's
`tiny_components` (CLIP's real vocabulary; a small in-code T5 vocabulary whose ids the real T5 embeds): real-size
text encoders on a small vocabulary time as the real ones do.

Measurements (ids `<model>/<kind>/...`, filtered by `--only`):

- `train/<algorithm>/<quantization>`: one epoch (`trainer.step`) of GRPO (DDPO with group advantages and a 2-step SDE
  window), DiffusionNFT and PRDP (`--algorithms`: also AWM and DGPO) on a LoRA, with and without the quantized
  frozen base (`--quantize`: the first method whose package and GPU are there), the memory levers `auto`
  (`diffalign.memory`; each result records what they resolved to), the prompts encoded before the measured epoch;
  peak GPU memory of the epoch, seconds per sampled image and per trained denoiser row (the rows run with gradients
  in the epoch; a CFG pair counts twice).
  `train/levers-off/grpo`: GRPO with every memory lever off, where the plan's estimate for it fits the card.
- `rlg`: the family's RLG pipeline, single pass and two passes, against its diffusers pipeline with plain CFG, at
  batch 1 (images per second).
- `drift`: log-probabilities of one fp32 trajectory recomputed under bf16 and fp16 autocast against fp32.

`--dry-run` writes the plan instead: per model the denoiser's parameter count (asserted against the published size
in tests/test_gpu_check.py), the other components' counts, a memory **estimate** (weights, LoRA, optimizer,
activations: arithmetic, not a measurement) and the levers `auto` would choose per card size (`CARD_GIB`) and base.
Results go to `--output` (JSON) and a markdown table beside it (`.md`), rewritten after every measurement, so a run
stopped by the time guard (`--budget-s`) keeps what it measured.
"""

import argparse
import contextlib
import fnmatch
import gc
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GIB = 2**30

# ------------------------------------------------------------------------------------------------ real configurations
# Each model: its diffalign family (by short name), the image side of the check, the published size of its denoiser
# (the values its safetensors file stores: the model cards' "860M", "2.6B", "2.5B", "12B", "20B"), and its large
# components as (library, class, config class or None, config) from the model's config.json files.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
              is_gated_act=True, tie_word_embeddings=False)
SD_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              norm_num_groups=32, act_fn="silu")
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
FLUX1DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
QWENIMAGE_TRANSFORMER = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)
QWEN25VL_7B = dict(
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, tie_word_embeddings=False),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31]),
    tie_word_embeddings=False,
)
FLOW_VAE = dict(SD_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)

MODELS: Dict[str, dict] = {
    "sd15": dict(
        family="sd", resolution=512, published_denoiser_params=859.5e6,
        components={
            "unet": ("diffusers", "UNet2DConditionModel", None, SD15_UNET),
            "vae": ("diffusers", "AutoencoderKL", None, dict(SD_VAE, latent_channels=4, scaling_factor=0.18215)),
            "text_encoder": ("transformers", "CLIPTextModel", "CLIPTextConfig", CLIP_L),
        }),
    "sdxl": dict(
        family="sdxl", resolution=512, published_denoiser_params=2.567e9,
        components={
            "unet": ("diffusers", "UNet2DConditionModel", None, SDXL_UNET),
            "vae": ("diffusers", "AutoencoderKL", None, dict(SD_VAE, latent_channels=4, scaling_factor=0.13025)),
            "text_encoder": ("transformers", "CLIPTextModel", "CLIPTextConfig", CLIP_L),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", "CLIPTextConfig", CLIP_BIGG),
        }),
    "sd35m": dict(
        family="sd3", resolution=512, published_denoiser_params=2.47e9, max_sequence_length=128,  # "2.5B"
        components={
            "transformer": ("diffusers", "SD3Transformer2DModel", None, SD35M_TRANSFORMER),
            "vae": ("diffusers", "AutoencoderKL", None, dict(FLOW_VAE, scaling_factor=1.5305, shift_factor=0.0609)),
            "text_encoder": ("transformers", "CLIPTextModelWithProjection", "CLIPTextConfig", CLIP_L),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", "CLIPTextConfig", CLIP_BIGG),
            "text_encoder_3": ("transformers", "T5EncoderModel", "T5Config", T5_XXL),
        }),
    "flux1dev": dict(
        family="flux", resolution=1024, published_denoiser_params=11.9e9, max_sequence_length=512,
        components={
            "transformer": ("diffusers", "FluxTransformer2DModel", None, FLUX1DEV_TRANSFORMER),
            "vae": ("diffusers", "AutoencoderKL", None, dict(FLOW_VAE, scaling_factor=0.3611, shift_factor=0.1159)),
            "text_encoder": ("transformers", "CLIPTextModel", "CLIPTextConfig", CLIP_L),
            "text_encoder_2": ("transformers", "T5EncoderModel", "T5Config", T5_XXL),
        }),
    "qwenimage": dict(
        family="qwenimage", resolution=1024, published_denoiser_params=20.4e9,
        components={
            "transformer": ("diffusers", "QwenImageTransformer2DModel", None, QWENIMAGE_TRANSFORMER),
            "vae": ("diffusers", "AutoencoderKLQwenImage", None,
                    dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                         temperal_downsample=[False, True, True])),
            "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", QWEN25VL_7B),
        }),
}

# The check's training run (small, so that every family fits the time budget; the shapes are the real ones).
CHECK_SETTINGS = dict(
    prompts=["a photo of a cat", "a red car"], sample_num_prompts_per_epoch=1, sample_images_per_prompt=2,
    sample_batch_size=2, sample_num_steps=6, sample_sde_window_size=2, sample_sde_window_range=[0, 3],
    sample_guidance_scale=4.5, sample_compute_kl=False, mixed_precision="bf16",  # the memory levers: auto
    lora_rank=32, lora_alpha=64.0, train_micro_batch_size=2, train_learning_rate=1e-4, num_epochs=10**6,
    checkpoint_every=10**6, grid_num_images=1, final_eval_num_images=0, seed=0,
)
# algorithm name in the results: (diffalign algorithm, its settings)
ALGORITHMS = {
    "grpo": ("ddpo", dict(advantage_mode="group", train_batch_size=2, train_clip_range=1e-4)),
    "nft": ("nft", dict(train_batch_size=2)),
    "prdp": ("prdp", dict(train_num_inner_epochs=1)),  # one pass over the pairs (the preset's K is 10)
    # the other forward-process trainers, at their authors' defaults fitted to the check's 6 steps; they share NFT's
    # sampler and forward-process machinery, so by default the budget goes to the three above (`--algorithms`)
    "awm": ("awm", dict(train_batch_size=2)),
    "dgpo": ("dgpo", dict(train_batch_size=2)),  # one group: the prompt's 2 images
}
DEFAULT_ALGORITHMS = ("grpo", "nft", "prdp")
QUANTIZE_CANDIDATES = ("nf4", "fp8", "int8")  # the first one available is measured against no quantization
# the cards the plan resolves the `auto` memory levers for (GiB of total memory: consumer 16 and 24 GB, 48 GB, H100)
CARD_GIB = (16, 24, 48, 80)
# the settings of the row with every memory lever off (measured where the plan's estimate fits the card)
LEVERS_OFF = dict(offload_text_encoders=False, vae_slicing=False, vae_tiling=False, gradient_checkpointing=False)
RLG_SCALE = 1.5
DRIFT_DTYPES = ("bf16", "fp16")

# seconds each measurement is expected to take at most on one H100 (build included): a measurement whose estimate
# exceeds the time left is skipped, so the run ends in budget with whole results
ESTIMATED_SECONDS = {
    ("sd15", "train"): 15, ("sdxl", "train"): 20, ("sd35m", "train"): 20, ("flux1dev", "train"): 35,
    ("qwenimage", "train"): 60, ("sd15", "rlg"): 10, ("sdxl", "rlg"): 15, ("sd35m", "rlg"): 15,
    ("flux1dev", "rlg"): 30, ("qwenimage", "rlg"): 45, ("sd15", "drift"): 10, ("sdxl", "drift"): 15,
    ("sd35m", "drift"): 15, ("flux1dev", "drift"): 35, ("qwenimage", "drift"): 60,
}


class TimeGuard(Exception):
    """The run's time budget ran out inside a measurement."""


# ------------------------------------------------------------------------------------------------------ building
def registered_family(spec: dict):
    """The diffalign family class of a model spec, or None when this diffalign has no such family."""
    from diffalign.errors import ModelError
    from diffalign.families import family_named

    try:
        return family_named(spec["family"])
    except ModelError:
        return None


def component_class(library: str, name: str):
    import importlib

    return getattr(importlib.import_module(library), name)


def build_module(library: str, class_name: str, config_class: Optional[str], config: dict):
    """An instance of a component class from its configuration (under whatever device context the caller sets)."""
    cls = component_class(library, class_name)
    if config_class is None:
        return cls(**config)
    config = dict(config)
    if library == "transformers" and class_name.startswith("CLIP"):
        from diffalign.tokenization import BOS_TOKEN_ID, EOS_TOKEN_ID, VOCAB_SIZE

        config.update(vocab_size=VOCAB_SIZE, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
                      pad_token_id=EOS_TOKEN_ID)
    return cls(component_class(library, config_class)(**config))


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def linear_parameters(module) -> int:
    """Parameters of the `torch.nn.Linear` weights (what a weight-only quantization stores in fewer bits)."""
    import torch

    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def lora_parameters(module, targets: List[str], rank: int) -> int:
    """Parameters of a rank-`rank` LoRA on the linear layers peft matches with `targets` (`diffalign.memory`)."""
    from diffalign.memory import lora_parameter_count

    return lora_parameter_count(module, targets, rank)


def materialize(module, device, dtype, seed: int = 0):
    """Gives a module built with meta parameters real random ones on `device` in `dtype`: matrices N(0, 1/fan_in),
    norm scales 1, biases and other vectors 0 (a tied parameter stays tied); buffers move along, floats cast."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    made = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                data = torch.empty(param.shape, device=device, dtype=dtype)
                if param.ndim >= 2:
                    fan_in = math.prod(param.shape[1:])
                    data.normal_(0.0, fan_in ** -0.5, generator=generator)
                elif "norm" in type(sub).__name__.lower() and name == "weight":
                    data.fill_(1.0)
                else:
                    data.zero_()
                made[id(param)] = torch.nn.Parameter(data, requires_grad=param.requires_grad)
            sub._parameters[name] = made[id(param)]
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[name] = buffer.to(device=device, dtype=dtype if buffer.is_floating_point() else None)
    return module


def build_components(spec: dict, device, dtype, tiny: bool, names: Optional[List[str]] = None) -> dict:
    """The pipeline components of a model: with `tiny`, the family's `tiny_components`; otherwise its large components
    at their real configuration with random weights (`device="meta"`: parameters only, for the plan), the rest
    (tokenizers, scheduler) from the family's tiny set. `names`: only these large components (real mode)."""
    import torch

    family = registered_family(spec)
    if str(device) == "meta":  # the plan: the large components alone
        small = {}
    else:
        small = family.tiny_components(seed=0)
    if tiny:
        for value in small.values():
            if isinstance(value, torch.nn.Module):
                value.to(device)
        return small
    from accelerate import init_empty_weights

    components = {k: v for k, v in small.items() if not isinstance(v, torch.nn.Module)}
    if "tokenizer_3" in components or "tokenizer_2" in components:  # the T5 tokenizer pads to the run's length
        for key in ("tokenizer_2", "tokenizer_3"):
            tokenizer = components.get(key)
            if tokenizer is not None and "T5" in type(tokenizer).__name__:
                tokenizer.model_max_length = spec.get("max_sequence_length", 512)
    for index, (name, (library, cls, config_cls, config)) in enumerate(spec["components"].items()):
        if names is not None and name not in names:
            continue
        if str(device) == "meta":
            with torch.device("meta"):
                components[name] = build_module(library, cls, config_cls, config)
            continue
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers computed as usual
            module = build_module(library, cls, config_cls, config)
        components[name] = materialize(module, device, dtype, seed=index).eval().requires_grad_(False)
    return components


# --------------------------------------------------------------------------------------------------------- the plan
def memory_estimate(spec: dict, counts: dict, denoiser, denoiser_name: str, targets: List[str], dtype_bytes: int,
                    rank: int, rows: int) -> dict:
    """An arithmetic memory estimate of LoRA training (GiB): the weights in the check's dtype, NF4 for the
    quantized base (half a byte per linear weight plus one fp32 scale per 64), the LoRA with its gradient and AdamW
    state (fp32: 16 bytes per parameter), and activations under gradient checkpointing (each block's input kept
    per row, one block's intermediates, ~24 hidden-size tensors, recomputed at a time)."""
    denoiser_params = counts[denoiser_name]
    linear = linear_parameters(denoiser)
    nf4_bytes = linear * (0.5 + 4 / 64) + (denoiser_params - linear) * dtype_bytes
    lora = lora_parameters(denoiser, targets, rank)
    config = dict(spec["components"][denoiser_name][3])
    side = spec["resolution"] // 8
    if "block_out_channels" in config:  # a UNet: the full-resolution level dominates
        tokens, width = side * side, config["block_out_channels"][0]
        blocks = 2 * len(config["block_out_channels"]) * config["layers_per_block"] + 1
    else:
        # every DiT here sees 2x2 latent patches (SD3's patch_size 2; FLUX and Qwen-Image pack 2x2 into channels)
        tokens = (side // 2) ** 2 + spec.get("max_sequence_length", 256)
        width = config["num_attention_heads"] * config["attention_head_dim"]
        blocks = config["num_layers"] + config.get("num_single_layers", 0)
    activations = rows * tokens * width * dtype_bytes * (blocks + 24)
    # the VAE decode of a sampling batch at full resolution: ~8 live 128-channel feature maps per image
    decode = rows * spec["resolution"] ** 2 * 128 * dtype_bytes * 8
    text = sum(v for k, v in counts.items() if k.startswith("text_encoder")) * dtype_bytes
    vae = counts.get("vae", 0) * dtype_bytes
    training = lora * 16
    estimate = {
        "denoiser_weights": denoiser_params * dtype_bytes / GIB,
        "denoiser_weights_nf4": nf4_bytes / GIB,
        "text_encoders": text / GIB,
        "vae": vae / GIB,
        "lora_params": lora,
        "lora_and_adamw": training / GIB,
        "activations": activations / GIB,
        "vae_decode": decode / GIB,
    }
    base = training + max(activations, decode) + vae  # decoding and training are not live at once
    estimate["total"] = (denoiser_params * dtype_bytes + text + base) / GIB
    estimate["total_text_encoders_offloaded"] = (denoiser_params * dtype_bytes + base) / GIB
    estimate["total_nf4_text_encoders_offloaded"] = (nf4_bytes + base) / GIB
    estimate = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in estimate.items()}
    estimate["note"] = ("estimate (arithmetic from parameter counts; not measured): weights in the check's dtype, "
                        f"LoRA rank {rank} with fp32 gradient and AdamW state, activations of {rows} rows under "
                        "gradient checkpointing or the VAE decode of as many images, whichever is larger")
    return estimate


def plan_facts(spec: dict, family, counts: dict, denoiser, card_gib: float, quantize: str = "none",
               dtype_bytes: int = 2, settings: Optional[dict] = None):
    """The `diffalign.memory.MemoryFacts` of the check's LoRA run (`settings`: `CHECK_SETTINGS`) of a model on a
    CUDA card of `card_gib` GiB, the denoiser's base stored as `quantize`: what a trainer would resolve there."""
    from diffalign.memory import QUANTIZED_BYTES, MemoryFacts, denoiser_shape

    settings = settings or CHECK_SETTINGS
    name = family.denoiser_name
    resolution = spec["resolution"]
    tokens, width, blocks = denoiser_shape(dict(spec["components"][name][3]), resolution, 8,
                                           spec.get("max_sequence_length", 0))
    cfg = 1 if family.guidance_kind == "embedded" else 2  # FLUX.1-dev: embedded guidance, no CFG pair
    return MemoryFacts(
        device_type="cuda", total_memory=int(card_gib * GIB),
        denoiser_params=counts[name], denoiser_bytes=QUANTIZED_BYTES.get(quantize, dtype_bytes),
        text_encoder_params=sum(v for k, v in counts.items() if k.startswith("text_encoder")),
        text_encoder_bytes=dtype_bytes, vae_params=counts.get("vae", 0), vae_bytes=dtype_bytes,
        trained_params=lora_parameters(denoiser, list(family.default_lora_target_modules), settings["lora_rank"]),
        activation_bytes=dtype_bytes, tokens=tokens, hidden_size=width, num_blocks=blocks, resolution=resolution,
        sample_batch_size=settings["sample_batch_size"], sample_rows=settings["sample_batch_size"] * cfg,
        train_rows=settings["train_micro_batch_size"] * cfg)


def planned_levers(spec: dict, family, counts: dict, denoiser, dtype_bytes: int = 2) -> dict:
    """What `auto` resolves to for the check's run of a model, per card size (`CARD_GIB`) and base (bf16, NF4),
    and the estimate with every lever off: `{"<card>GiB": {"none" | "nf4": {lever: bool, ..., estimated_peak_gib,
    fits}}, "levers_off_peak_gib": {"none" | "nf4": GiB}}` (estimates, not measurements)."""
    from diffalign.memory import LEVER_ORDER, estimate_peak, resolve_memory_levers

    levers = {}
    for card in CARD_GIB:
        levers[f"{card}GiB"] = {}
        for quantize in ("none", "nf4"):
            resolved = resolve_memory_levers({}, plan_facts(spec, family, counts, denoiser, card, quantize,
                                                            dtype_bytes))
            resolved.pop("auto")
            levers[f"{card}GiB"][quantize] = resolved
    levers["levers_off_peak_gib"] = {
        quantize: round(estimate_peak(plan_facts(spec, family, counts, denoiser, CARD_GIB[0], quantize, dtype_bytes),
                                      dict.fromkeys(LEVER_ORDER, False))["total"] / GIB, 2)
        for quantize in ("none", "nf4")}
    return levers


def plan_entry(name: str, spec: dict, dtype_bytes: int = 2) -> dict:
    """One model of the plan: the denoiser's parameters against the published size, the other components' counts
    and the memory estimate; built on the meta device (no weights)."""
    family = registered_family(spec)
    if family is None:
        return {"model": name, "family": spec["family"], "skipped": f"family '{spec['family']}' is not in this diffalign"}
    components = build_components(spec, "meta", None, tiny=False)
    counts = {k: count_parameters(components[k]) for k in spec["components"]}
    denoiser = components[family.denoiser_name]
    # what a checkpoint stores: parameters and persistent buffers (SD3's learned-size position table is a buffer of
    # 226M values in its safetensors file, counted in its published size)
    stored = sum(t.numel() for t in denoiser.state_dict().values())
    entry = {
        "model": name, "family": family.name, "pipeline_class": family.pipeline_class,
        "resolution": spec["resolution"], "denoiser": family.denoiser_name,
        "denoiser_class": spec["components"][family.denoiser_name][1],
        "denoiser_params": counts[family.denoiser_name],
        "denoiser_stored_values": stored,
        "published_denoiser_params": int(spec["published_denoiser_params"]),
        "components": {k: v for k, v in counts.items() if k != family.denoiser_name},
        "total_params": sum(counts.values()),
        "dtype": "bfloat16" if dtype_bytes == 2 else "float32",
        "memory_estimate_gib": memory_estimate(
            spec, counts, denoiser, family.denoiser_name, list(family.default_lora_target_modules), dtype_bytes,
            CHECK_SETTINGS["lora_rank"], CHECK_SETTINGS["train_micro_batch_size"]),
        "auto_memory_levers": planned_levers(spec, family, counts, denoiser, dtype_bytes),
    }
    return entry


# ---------------------------------------------------------------------------------------------------- measuring
class Run:
    """The measured run: the device, dtype, model specs, deadline, filters and the results so far (written after every
    measurement)."""

    def __init__(self, args):
        import torch

        self.args = args
        self.tiny = args.tiny
        self.device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
        self.dtype = torch.float32 if args.tiny else torch.bfloat16
        self.mixed_precision = "no" if args.tiny else "bf16"
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.results = {"machine": machine(self.device), "settings": settings_of(args), "measurements": [],
                        "skipped": []}
        self.patterns = [p.strip() for p in (args.only or "").split(",") if p.strip()]

    def selected(self, measurement_id: str) -> bool:
        return not self.patterns or any(fnmatch.fnmatch(measurement_id, f"*{p}*") for p in self.patterns)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def measure(self, measurement_id: str, estimate_s: float, fn: Callable[[], dict]):
        """Runs one measurement unless filtered out or its estimate exceeds the time left; records its figures, or
        its error in one line (the run goes on), then writes the results."""
        if not self.selected(measurement_id):
            return
        if self.time_left() < estimate_s:
            self.results["skipped"].append({"id": measurement_id, "why": f"time budget ({self.time_left():.0f} s "
                                                                         f"left, needs ~{estimate_s} s)"})
            return write_results(self.args.output, self.results)
        record = {"id": measurement_id}
        t0 = time.monotonic()
        try:
            with deadline_alarm(self.deadline):
                record.update(fn())
        except TimeGuard:
            record["error"] = "stopped by the time guard"
        except Exception as e:  # one measurement's failure is a result, not the end of the check
            record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            if self.args.verbose:
                traceback.print_exc()
        record["wall_s"] = round(time.monotonic() - t0, 2)
        self.results["measurements"].append(record)
        print(f"[{time.monotonic() - self.start:6.1f} s] {measurement_id}: "
              f"{record.get('error') or {k: v for k, v in record.items() if k not in ('id',)}}", flush=True)
        free_memory()
        write_results(self.args.output, self.results)


@contextlib.contextmanager
def deadline_alarm(deadline: Optional[float]):
    """Raises `TimeGuard` inside the block when the monotonic clock passes `deadline` (whole seconds, SIGALRM)."""
    if deadline is None or not hasattr(signal, "SIGALRM"):
        yield
        return

    def stop(signum, frame):
        raise TimeGuard()

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(max(1, int(deadline - time.monotonic())))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def free_memory():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device) -> dict:
    import platform

    import diffusers
    import torch

    info = {"device": str(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / GIB, 1)
    return info


def settings_of(args) -> dict:
    return {"tiny": args.tiny, "device": args.device, "only": args.only, "budget_s": args.budget_s, "epochs": args.epochs,
            "check": CHECK_SETTINGS, "algorithms": {k: ALGORITHMS[k][0] for k in args.algorithms}}


class ModelUnderTest:
    """One model of the check: its frozen components (built once, shared by the measurements) and a fresh denoiser
    per measurement (a trainer adds its LoRA to it, a quantized base replaces its layers)."""

    def __init__(self, run: Run, name: str, spec: dict):
        self.run, self.name, self.spec = run, name, spec
        self.family = registered_family(spec)
        self.denoiser_name = self.family.denoiser_name
        if run.tiny:
            self.frozen = None
            self.resolution = None
        else:
            names = [k for k in spec["components"] if k != self.denoiser_name]
            self.frozen = build_components(spec, run.device, run.dtype, tiny=False, names=names)
            self.resolution = spec["resolution"]

    def pipeline(self, dtype=None):
        """A pipeline of the model with a fresh denoiser (random weights, `dtype`: the run's by default)."""
        import diffusers

        run = self.run
        if run.tiny:
            components = build_components(self.spec, run.device, None, tiny=True)
            if dtype is not None:
                components[self.denoiser_name].to(dtype)
        else:
            denoiser = build_components(self.spec, run.device, dtype or run.dtype, tiny=False,
                                        names=[self.denoiser_name])[self.denoiser_name]
            components = {**self.frozen, self.denoiser_name: denoiser}
        pipe = getattr(diffusers, self.family.pipeline_class)(**{**self.family.pipeline_init_kwargs, **components})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def side(self, pipe) -> int:
        """The image side: the model's check resolution; tiny: the smallest multiple of the model's patch at or above
        32 pixels (the tiny models' defaults reach 256 px, slow on a CPU)."""
        if self.resolution:
            return self.resolution
        multiple = self.family(pipe).resolution_multiple()
        return multiple * math.ceil(32 / multiple)

    # ------------------------------------------------------------------------------------------- training
    def train(self, algorithm: str, quantize: str, levers: Optional[dict] = None) -> dict:
        """One measured epoch (after `--epochs - 1` more) of `algorithm` on a LoRA, the base quantized with
        `quantize` (`none`: the run's dtype), the memory levers `auto` unless `levers` sets them."""
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        from diffalign.bench.common import PeakMemory
        from diffalign.config import load_config
        from diffalign.trainers import CONFIG_CLASSES, trainer_class

        run = self.run
        name, overrides = ALGORITHMS[algorithm]
        pipe = self.pipeline()
        values = {**CHECK_SETTINGS, **overrides, "model": "unused", "mixed_precision": run.mixed_precision,
                  "quantize_denoiser": quantize, "sample_resolution": self.side(pipe), **(levers or {})}
        if self.spec.get("max_sequence_length"):
            values["sample_max_sequence_length"] = self.spec["max_sequence_length"]
        if self.family.guidance_kind == "embedded":
            values["sample_guidance_scale"] = 1.0  # FLUX.1-dev: its embedded guidance, no true CFG
        if run.tiny:
            values.update(sample_num_steps=3, sample_sde_window_range=[0, 2])
        meter = PeakMemory(run.device)
        with tempfile.TemporaryDirectory() as output_dir:
            # the algorithm's own counts fitted to the check's steps (AWM's noise levels, DGPO's truncation), as bench
            config = load_config(name, None, CONFIG_CLASSES[name].fit_to_shapes({**values, "output_dir": output_dir}))
            # accelerate keeps one mixed-precision state per process: each measurement sets its own and leaves none
            AcceleratorState._reset_state()
            accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=run.device.type == "cpu")
            trainer = trainer_class(name)(config, pipeline=pipe, reward_fn=brightness, accelerator=accelerator)
            rows = RowCounter(trainer.family.denoiser)
            try:
                # the prompts are encoded before the measured epoch (a run encodes each prompt once; offloaded text
                # encoders visit the GPU for it): the peak is an epoch's
                trainer.family.encode_prompts(list(config.prompts) + [""])
                meter.reset()
                epochs = []
                for epoch in range(run.args.epochs):
                    rows.count = 0
                    synchronize(run.device)
                    metrics = trainer.step(epoch)
                    synchronize(run.device)
                    epochs.append(metrics)
                last = epochs[-1]
                images = last["images"]
                result = {
                    "algorithm": name, "quantize_denoiser": quantize, "resolution": config.sample_resolution,
                    "images": images, "trained_rows": rows.count,
                    "s_per_image_sampled": round(last["time_sample"] / images, 4),
                    "s_per_trained_row": round(last["time_train"] / max(rows.count, 1), 4),
                    "s_epoch": round(last["time_epoch"], 3),
                    "memory_levers": {k: v for k, v in trainer.memory_levers.items() if k != "auto"},
                    "peak_gib": round(meter.peak() / GIB, 3), "peak_kind": meter.kind,
                    "loss_finite": bool(math.isfinite(last.get("loss", float("nan")))),
                    "lora_params": sum(p.numel() for p in trainer.trainable_params),
                }
            finally:
                rows.remove()
                accelerator.free_memory()
                del trainer, accelerator
                AcceleratorState._reset_state()
                for encoder in (self.frozen or {}).values():  # the next measurements find them where they were
                    if hasattr(encoder, "parameters"):
                        encoder.to(run.device)
        return result

    # ------------------------------------------------------------------------------------------------ RLG
    def rlg(self) -> dict:
        """Images per second at batch 1 of the family's RLG pipeline (one pass, two passes) and of its diffusers
        pipeline with plain CFG, on a random LoRA; each timed after a warm-up call."""
        import diffusers
        import torch

        import diffalign.pipelines
        from diffalign.bench.rlg import add_random_lora

        run = self.run
        if not self.family.rlg_pipeline_class:
            return {"skipped": f"{self.family.name} has no RLG pipeline"}
        pipe = self.pipeline()
        denoiser = getattr(pipe, self.denoiser_name)
        add_random_lora(denoiser, seed=0)
        denoiser.to(run.device, run.dtype)
        components = {k: v for k, v in pipe.components.items()}
        init = {**self.family.pipeline_init_kwargs, **components}
        rlg = getattr(diffalign.pipelines, self.family.rlg_pipeline_class)(**init)
        plain = getattr(diffusers, self.family.pipeline_class)(**init)
        for p in (rlg, plain):
            p.set_progress_bar_config(disable=True)
        side = self.side(pipe)
        steps = 4 if not run.tiny else 2
        guidance = self.family.default_guidance_scale if self.family.guidance_kind == "embedded" else 4.5
        common = dict(num_inference_steps=steps, guidance_scale=guidance, height=side, width=side, output_type="pt")
        if self.spec.get("max_sequence_length") and not run.tiny:
            common["max_sequence_length"] = self.spec["max_sequence_length"]
        prompt = ["a photo of a cat"]

        def call(fn):
            fn()  # warm-up
            synchronize(run.device)
            t0 = time.perf_counter()
            fn()
            synchronize(run.device)
            return time.perf_counter() - t0

        def generator():
            return torch.Generator(run.device).manual_seed(0)

        with torch.no_grad():
            plain_s = call(lambda: plain(prompt, generator=generator(), **common))
            single_s = call(lambda: rlg(prompt, generator=generator(), rlg_scale=RLG_SCALE, rlg_single_pass=True,
                                        **common))
            two_s = call(lambda: rlg(prompt, generator=generator(), rlg_scale=RLG_SCALE, rlg_single_pass=False,
                                     **common))
        return {"resolution": side, "steps": steps, "batch": 1,
                "plain_cfg_images_per_s": round(1 / plain_s, 4), "rlg_one_pass_images_per_s": round(1 / single_s, 4),
                "rlg_two_pass_images_per_s": round(1 / two_s, 4),
                "rlg_one_pass_over_plain": round(single_s / plain_s, 3),
                "rlg_two_pass_over_plain": round(two_s / plain_s, 3)}

    # ---------------------------------------------------------------------------------------------- drift
    def drift(self) -> dict:
        """Log-probabilities of one trajectory sampled in fp32 (one image, an SDE window of 2 steps), recomputed in
        fp32 and under bf16 / fp16 autocast of the same fp32 weights: the largest and mean absolute differences. The
        prompt is encoded once by the run's (bf16) text encoders and its conditioning cast to fp32, so the only
        difference between the passes is the denoiser's precision."""
        import torch

        from diffalign.kernels import sde_window_mask
        from diffalign.rollout import sample_trajectories, step_log_probs

        run = self.run
        pipe = self.pipeline(dtype=torch.float32)
        family = self.family(pipe)
        if self.spec.get("max_sequence_length") and not run.tiny:
            family.configure(max_sequence_length=self.spec["max_sequence_length"])
        kernel = family.make_kernel(eta=1.0, noise_level=0.7)
        side = self.side(pipe)
        steps, guidance = 4, (1.0 if self.family.guidance_kind == "embedded" else 4.5)
        prompt = "a photo of a cat"
        family.encode_prompts([prompt, ""])  # the family's prompt cache, read by the rollout
        for cached in family._cache.values():
            for key, value in cached.items():
                cached[key] = value.float() if value.is_floating_point() else value
        with torch.no_grad():
            trajectories = sample_trajectories(
                family, [prompt], num_inference_steps=steps, guidance_scale=guidance, height=side, width=side,
                generator=torch.Generator(run.device).manual_seed(0), decode=False, kernel=kernel,
                stochastic_steps=sde_window_mask(steps, 2, 0))
            rows, window = torch.zeros(2, dtype=torch.long), torch.tensor([0, 1])
            denoiser = family.denoiser
            reference, _, _ = step_log_probs(family, denoiser, kernel, trajectories, rows, window, guidance)
            results = {"resolution": side, "steps": steps, "compared_steps": 2,
                       "fp32_recompute_max_abs": float((reference - trajectories.log_probs[0, :2].to(
                           reference.device)).abs().max())}
            for name in DRIFT_DTYPES:
                dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
                with torch.autocast(run.device.type, dtype=dtype):
                    log_prob, _, _ = step_log_probs(family, denoiser, kernel, trajectories, rows, window, guidance)
                diff = (log_prob.float() - reference).abs()
                results[f"{name}_max_abs"] = float(diff.max())
                results[f"{name}_mean_abs"] = float(diff.mean())
        return results


class RowCounter:
    """Counts the rows (batch entries) of the denoiser's forward calls made with gradients."""

    def __init__(self, denoiser):
        import torch

        self.count = 0

        def hook(module, args, kwargs):
            if torch.is_grad_enabled():
                first = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
                self.count += int(first.shape[0])

        from diffalign.utils.peft_utils import unwrap

        self.handle = unwrap(denoiser).register_forward_pre_hook(hook, with_kwargs=True)

    def remove(self):
        self.handle.remove()


def brightness(images, prompts, metadata=None):
    """The check's reward: mean brightness (no model to load; the reward's cost is not what is measured)."""
    return images.float().mean(dim=(1, 2, 3)).cpu()


def levers_off_fits(run: Run, spec: dict):
    """`(whether the row with every memory lever off is measured, why not)`: on a GPU, where the plan's estimate
    with every lever off is within 90% of the card (it would run out of memory otherwise); always on a CPU."""
    if run.device.type != "cuda":
        return True, ""
    import torch

    from diffalign.memory import BUDGET_FRACTION

    entry = plan_entry("levers-off", spec)
    card = torch.cuda.get_device_properties(run.device).total_memory
    needed = entry["auto_memory_levers"]["levers_off_peak_gib"]["none"]
    if needed * GIB > BUDGET_FRACTION * card:
        return False, f"estimated {needed:.1f} GiB with every memory lever off > {BUDGET_FRACTION:.0%} of the card"
    return True, ""


def quantize_method(run: Run, requested: List[str]) -> Optional[str]:
    """The first of `requested` whose package and device are there (None: none is)."""
    from diffalign.errors import ConfigError
    from diffalign.quantization import check_quantization_method

    for method in requested:
        try:
            check_quantization_method("quantize_denoiser", method, cuda_available=run.device.type == "cuda")
            return method
        except ConfigError as e:
            run.results.setdefault("quantize_unavailable", {})[method] = str(e)
    return None


def measure(args) -> dict:
    """Every selected measurement of every model whose family is registered, within the budget."""
    import warnings

    import torch

    # peft warns that an adapter on a base quantized in place cannot be merged; the check never merges
    warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")

    run = Run(args)
    torch.manual_seed(0)
    if not args.tiny:
        torch.backends.cuda.matmul.allow_tf32 = True
    requested = [m.strip() for m in args.quantize.split(",") if m.strip()]
    quantize = quantize_method(run, requested)
    run.results["quantize_denoiser"] = quantize
    models = [m.strip() for m in args.models.split(",")] if args.models else list(MODELS)
    for name in models:
        spec = MODELS[name]
        if registered_family(spec) is None:
            run.results["skipped"].append({"id": name, "why": f"family '{spec['family']}' is not in this diffalign"})
            continue
        methods = ["none"] + ([quantize] if quantize else [])
        ids = [f"{name}/train/{a}/{m}" for a in args.algorithms for m in methods] + [f"{name}/rlg", f"{name}/drift"]
        if not any(run.selected(i) for i in ids):
            continue
        if run.time_left() < ESTIMATED_SECONDS.get((name, "train"), 30):
            run.results["skipped"].append({"id": name, "why": "time budget"})
            continue
        try:
            with deadline_alarm(run.deadline):
                model = ModelUnderTest(run, name, spec)
        except Exception as e:
            run.results["measurements"].append({"id": f"{name}/build", "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        estimate = ESTIMATED_SECONDS.get
        for algorithm in args.algorithms:
            for method in methods:
                run.measure(f"{name}/train/{algorithm}/{method}", estimate((name, "train"), 30),
                            lambda a=algorithm, m=method, under_test=model: under_test.train(a, m))
        levers_off = f"{name}/train/levers-off/grpo"
        fits, why = levers_off_fits(run, spec)
        if not fits and run.selected(levers_off):
            run.results["skipped"].append({"id": levers_off, "why": why})
        elif fits:
            run.measure(levers_off, estimate((name, "train"), 30),
                        lambda under_test=model: under_test.train("grpo", "none", LEVERS_OFF))
        run.measure(f"{name}/rlg", estimate((name, "rlg"), 20), model.rlg)
        run.measure(f"{name}/drift", estimate((name, "drift"), 20), model.drift)
        del model
        free_memory()
    run.results["elapsed_s"] = round(time.monotonic() - run.start, 1)
    write_results(args.output, run.results)
    return run.results


# ------------------------------------------------------------------------------------------------------- output
def markdown(results: dict) -> str:
    """The results as markdown tables (the plan, or the measurements)."""
    lines = []
    if "plan" in results:
        lines += ["| model | denoiser | params / stored (published) | other components | est. GiB bf16 / text enc. off / "
                  "NF4 + off |", "|---|---|---|---|---|"]
        for e in results["plan"]:
            if "skipped" in e:
                lines.append(f"| {e['model']} | - | - | {e['skipped']} | - |")
                continue
            m = e["memory_estimate_gib"]
            others = ", ".join(f"{k} {v / 1e6:.0f}M" for k, v in e["components"].items())
            lines.append(f"| {e['model']} | {e['denoiser_class']} | {e['denoiser_params'] / 1e9:.3f}B / "
                         f"{e['denoiser_stored_values'] / 1e9:.3f}B ({e['published_denoiser_params'] / 1e9:.2f}B) | {others} | {m['total']:.1f} / "
                         f"{m['total_text_encoders_offloaded']:.1f} / {m['total_nf4_text_encoders_offloaded']:.1f} |")
        lines += ["", "What `auto` turns on for the check's LoRA run (diffalign.memory; S vae_slicing, O "
                  "offload_text_encoders, C gradient_checkpointing, T vae_tiling; - none) and the estimated peak GiB:",
                  "", "| model | base | every lever off | " + " | ".join(f"{c} GiB card" for c in CARD_GIB) + " |",
                  "|---|---|---|" + "---|" * len(CARD_GIB)]
        for e in results["plan"]:
            if "skipped" in e:
                continue
            levers = e["auto_memory_levers"]
            for quantize in ("none", "nf4"):
                cells = [lever_cell(levers[f"{c}GiB"][quantize]) for c in CARD_GIB]
                lines.append(f"| {e['model']} | {'bf16' if quantize == 'none' else 'NF4'} | "
                             f"{levers['levers_off_peak_gib'][quantize]:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Memory figures are estimates (arithmetic from parameter counts), not measurements; \"over\": "
                     "above 90% of the card even with every lever on.")
        return "\n".join(lines) + "\n"
    gpu = results.get("machine", {}).get("gpu", results.get("machine", {}).get("device"))
    lines.append(f"Device: {gpu}; torch {results.get('machine', {}).get('torch')}")
    lines += ["", "| measurement | peak GiB | s / sampled image | s / trained row | notes |", "|---|---|---|---|---|"]
    for r in results["measurements"]:
        if "/train/" in r["id"]:
            note = r.get("error", "") or ("" if r.get("loss_finite") else "loss not finite")
            lines.append(f"| {r['id']} | {r.get('peak_gib', '-')} | {r.get('s_per_image_sampled', '-')} | "
                         f"{r.get('s_per_trained_row', '-')} | {note} |")
    lines += ["", "| measurement | plain CFG img/s | RLG one pass img/s | RLG two pass img/s | one pass / plain |",
              "|---|---|---|---|---|"]
    for r in results["measurements"]:
        if r["id"].endswith("/rlg"):
            lines.append(f"| {r['id']} | {r.get('plain_cfg_images_per_s', '-')} | "
                         f"{r.get('rlg_one_pass_images_per_s', '-')} | {r.get('rlg_two_pass_images_per_s', '-')} | "
                         f"{r.get('rlg_one_pass_over_plain', r.get('error', r.get('skipped', '-')))} |")
    lines += ["", "| measurement | bf16 max / mean abs log-prob drift | fp16 max / mean abs |", "|---|---|---|"]
    for r in results["measurements"]:
        if r["id"].endswith("/drift"):
            if "error" in r:
                lines.append(f"| {r['id']} | {r['error']} | |")
            else:
                lines.append(f"| {r['id']} | {r['bf16_max_abs']:.3g} / {r['bf16_mean_abs']:.3g} | "
                             f"{r['fp16_max_abs']:.3g} / {r['fp16_mean_abs']:.3g} |")
    if results.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{s['id']} ({s['why']})" for s in results["skipped"])]
    return "\n".join(lines) + "\n"


LEVER_LETTERS = {"vae_slicing": "S", "offload_text_encoders": "O", "gradient_checkpointing": "C", "vae_tiling": "T"}


def lever_cell(resolved: dict) -> str:
    """A plan table cell: the letters of the levers `auto` turned on and the estimated peak (GiB), `over` when it
    does not fit."""
    letters = "".join(letter for name, letter in LEVER_LETTERS.items() if resolved[name]) or "-"
    return f"{letters} {resolved['estimated_peak_gib']:.1f}{'' if resolved['fits'] else ' over'}"


def write_results(path: str, results: dict):
    """`path` (JSON) and the markdown tables beside it (`<path without .json>.md`), written atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    for target, text in ((path, json.dumps(results, indent=2, default=str)),
                         (os.path.splitext(path)[0] + ".md", markdown(results))):
        temporary = target + ".tmp"
        with open(temporary, "w") as f:
            f.write(text)
        os.replace(temporary, target)


def dry_run(args) -> dict:
    """The plan: every model built on the meta device (no weights, any machine)."""
    models = [m.strip() for m in args.models.split(",")] if args.models else list(MODELS)
    plan = [plan_entry(name, MODELS[name]) for name in models]
    results = {"plan": plan, "check": CHECK_SETTINGS}
    write_results(args.output, results)
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="gpu_check.json", help="JSON results (a .md table is written beside)")
    parser.add_argument("--dry-run", action="store_true", help="write the plan (meta device, no weights, no GPU)")
    parser.add_argument("--tiny", action="store_true", help="the measuring code path on tiny components on a CPU")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--only", default=None,
                        help="comma-separated patterns; a measurement runs if its id (e.g. sd35m/train/grpo/nf4, "
                             "flux1dev/rlg, sdxl/drift) contains one (shell wildcards allowed)")
    parser.add_argument("--algorithms", default=",".join(DEFAULT_ALGORITHMS),
                        help=f"comma-separated trainers of the training measurements, among {', '.join(ALGORITHMS)} "
                             f"(default {','.join(DEFAULT_ALGORITHMS)})")
    parser.add_argument("--quantize", default=",".join(QUANTIZE_CANDIDATES),
                        help="quantized-base methods to try, the first available is measured (default nf4,fp8,int8)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="time budget in seconds: a measurement whose H100 estimate exceeds the time left is "
                             "skipped, one still running at the end is stopped; what was measured is written "
                             "(default 450: 7.5 minutes)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per training measurement, the last reported")
    parser.add_argument("--device", default=None,
                        help="where to measure (default cuda; --tiny: cpu); `cpu` without --tiny builds the real "
                             "configurations on the CPU (hours: for checking the code path with small MODELS)")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failed measurements")
    args = parser.parse_args(argv)
    if args.models:
        unknown = [m for m in args.models.split(",") if m.strip() not in MODELS]
        if unknown:
            parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    args.algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in args.algorithms if a not in ALGORITHMS]
    if unknown or not args.algorithms:
        parser.error(f"--algorithms: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(ALGORITHMS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.dry_run:
        results = dry_run(args)
        print(markdown(results))
        return 0
    if args.tiny:
        torch.set_num_threads(1)
        if args.quantize == ",".join(QUANTIZE_CANDIDATES):
            args.quantize = "int8"  # the CPU backend (torchao)
    elif not torch.cuda.is_available() and args.device != "cpu":
        print("gpu_check: no CUDA device; use --dry-run (the plan) or --tiny (the code path on a CPU)",
              file=sys.stderr)
        return 2
    results = measure(args)
    print(markdown(results))
    failed = [r["id"] for r in results["measurements"] if "error" in r]
    return 1 if failed and run_on_cpu(args) else 0


def run_on_cpu(args) -> bool:
    """A CPU run checks the code path: a failed measurement fails it (on the GPU it is a result in the table)."""
    return args.tiny or args.device == "cpu"


if __name__ == "__main__":
    sys.exit(main())
