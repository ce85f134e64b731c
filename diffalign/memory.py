"""The memory levers' automatic defaults: `offload_text_encoders`, `vae_slicing`, `vae_tiling` and
`gradient_checkpointing` default to `auto`, resolved to on or off once the model is loaded (`resolve_memory_levers`,
a pure function of `MemoryFacts`). An explicit true/false is always kept.

The rule:

- A device whose memory this does not know (a CPU, Apple's MPS): every `auto` lever is off, so runs on a CPU (the
  bundled digits presets, the tests) are what they were before `auto` existed.
- A CUDA GPU: the budget is `BUDGET_FRACTION` of its total memory (the rest: the CUDA context, the allocator's
  fragmentation, a reward model). While the estimated peak (`estimate_peak`) exceeds the budget, the `auto` levers
  are turned on one at a time in `LEVER_ORDER`, the cheapest first; then any of them the estimate no longer needs is
  turned off again (most expensive first). A lever the run cannot use stays off: offloading bitsandbytes-quantized
  text encoders (they cannot move), checkpointing a denoiser diffusers cannot checkpoint. When even every lever on
  does not fit, they all stay on and `fits` is False (the trainer says so: a quantized base is the next lever).

The estimate is arithmetic from parameter counts, not a measurement (the same model as `scripts/gpu_check.py`'s
plan): weights at their stored bytes, the trained parameters at 16 bytes each (fp32 value, gradient, two AdamW
moments), training activations of one micro-batch (every block's intermediates, ~`BLOCK_INTERMEDIATES` hidden-size
tensors per token, or under gradient checkpointing each block's input plus one block's intermediates), and the VAE
decode of a sampling batch (~8 live 128-channel feature maps per image at full resolution, or one image with
slicing, one 512-px tile with tiling); sampling and training are not live at once.

Why not the other levers: diffusers' default attention is already PyTorch's SDPA (flash or memory-efficient
kernels on CUDA), and `compile_denoiser` trades minutes of compilation for speed, not memory.

Imports torch only in the functions that read a loaded model (`model_facts`, `accelerator_memory`).
"""

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

GIB = 2**30
AUTO = "auto"
# the levers resolved here, cheapest first: offloading frees the most (T5-XXL: 9 GiB) for one move of the text
# encoders per batch of new prompts; slicing decodes the same images one at a time; checkpointing recomputes the
# forward in the backward (~30% more training time); tiling changes the decoded images slightly at the tile seams,
# the last resort
LEVER_ORDER: Tuple[str, ...] = ("offload_text_encoders", "vae_slicing", "gradient_checkpointing", "vae_tiling")
BUDGET_FRACTION = 0.9
BLOCK_INTERMEDIATES = 24  # hidden-size tensors a transformer block keeps per token for its backward (estimate)
DECODE_MAPS = 8 * 128  # live feature maps x channels per pixel of the VAE decoder's full-resolution stage
VAE_TILE = 512  # diffusers' AutoencoderKL tile (tile_sample_min_size)
# stored bytes per weight of the quantized bases (`diffalign.quantization`): NF4 is 4 bits plus an fp32 scale per
# 64 weights; the 8-bit methods one byte (their per-row scales are negligible)
QUANTIZED_BYTES = {"nf4": 0.5 + 4 / 64, "int8": 1.0, "fp8": 1.0, "bnb_int8": 1.0}


def check_lever(name: str, value) -> None:
    """A one-line `ConfigError` unless `value` is true, false or `auto`."""
    from .errors import ConfigError

    if value is not True and value is not False and value != AUTO:
        raise ConfigError(f"{name} must be true, false or auto; got {value!r}")


@dataclass(frozen=True)
class MemoryFacts:
    """What the resolution reads: the device and, on a GPU, the model's and the run's sizes.

    Attributes:
        device_type: `cuda`, `cpu`, `mps`, ...
        total_memory: the accelerator's memory in bytes; None where unknown (every `auto` lever is then off).
        denoiser_params, denoiser_bytes: the denoiser's parameters and stored bytes per parameter.
        text_encoder_params, text_encoder_bytes: all text encoders together, likewise.
        vae_params, vae_bytes: the VAE, likewise.
        trained_params: the parameters the optimizer updates (the LoRA's, or the whole denoiser's).
        full_finetune: the denoiser itself is trained (a frozen reference copy is kept beside it).
        activation_bytes: bytes of an activation (2 under fp16/bf16 mixed precision, else 4).
        tokens: tokens per image through the denoiser (latent tokens, plus text tokens for joint attention).
        hidden_size: the denoiser's width (a UNet: its first level's channels).
        num_blocks: the denoiser's blocks whose inputs checkpointing keeps.
        resolution: the image side in pixels.
        sample_batch_size: images per sampling forward (decoded together).
        sample_rows: denoiser rows per sampling forward (twice the images with CFG).
        train_rows: denoiser rows per training forward (the micro-batch, twice with CFG).
        text_encoders_movable: the text encoders can move between the CPU and the GPU (not bitsandbytes weights).
        supports_gradient_checkpointing: diffusers can checkpoint this denoiser.
    """

    device_type: str
    total_memory: Optional[int] = None
    denoiser_params: int = 0
    denoiser_bytes: float = 4.0
    text_encoder_params: int = 0
    text_encoder_bytes: float = 4.0
    vae_params: int = 0
    vae_bytes: float = 4.0
    trained_params: int = 0
    full_finetune: bool = False
    activation_bytes: int = 4
    tokens: int = 0
    hidden_size: int = 0
    num_blocks: int = 0
    resolution: int = 0
    sample_batch_size: int = 1
    sample_rows: int = 1
    train_rows: int = 1
    text_encoders_movable: bool = True
    supports_gradient_checkpointing: bool = True


def estimate_peak(facts: MemoryFacts, levers: Dict[str, bool]) -> Dict[str, float]:
    """The estimated peak memory (bytes) of a run with these levers on or off, by part, and its `total`:
    weights (denoiser, resident text encoders, VAE, the reference copy of a full fine-tune), the trained parameters'
    fp32 value, gradient and AdamW moments, then the larger of the training activations and sampling (one block's
    intermediates of a sampling forward plus the VAE decode of the batch)."""
    plane = facts.tokens * facts.hidden_size * facts.activation_bytes  # one hidden-size tensor of one row
    if levers.get("gradient_checkpointing"):
        kept = facts.num_blocks + BLOCK_INTERMEDIATES
    else:
        kept = facts.num_blocks * BLOCK_INTERMEDIATES
    if levers.get("vae_tiling"):
        decode_side, decoded_images = min(facts.resolution, VAE_TILE), 1
    else:
        decode_side, decoded_images = facts.resolution, 1 if levers.get("vae_slicing") else facts.sample_batch_size
    parts = {
        # a full fine-tune's trained fp32 copy is in `trained`; this is then its frozen reference
        "denoiser": facts.denoiser_params * facts.denoiser_bytes,
        "text_encoders": 0.0 if levers.get("offload_text_encoders") else
        facts.text_encoder_params * facts.text_encoder_bytes,
        "vae": facts.vae_params * facts.vae_bytes,
        "trained": facts.trained_params * 16.0,
        "training_activations": float(facts.train_rows * plane * kept),
        "sampling": float(facts.sample_rows * plane * BLOCK_INTERMEDIATES
                          + decoded_images * decode_side ** 2 * DECODE_MAPS * facts.activation_bytes),
    }
    parts["total"] = (parts["denoiser"] + parts["text_encoders"] + parts["vae"] + parts["trained"]
                      + max(parts["training_activations"], parts["sampling"]))
    return parts


def _usable(name: str, facts: MemoryFacts) -> bool:
    if name == "offload_text_encoders":
        return facts.text_encoders_movable and facts.text_encoder_params > 0
    if name == "gradient_checkpointing":
        return facts.supports_gradient_checkpointing
    return True


def resolve_memory_levers(requested: Dict[str, object], facts: MemoryFacts) -> dict:
    """Each lever of `LEVER_ORDER` as True/False: an explicit value as given, `auto` by the module's rule.

    Returns the levers plus `auto` (the names that were `auto`), and on a GPU `budget_gib`, `estimated_peak_gib`
    (with the resolved levers) and `fits` (the estimate is within the budget)."""
    levers = {name: requested.get(name, AUTO) for name in LEVER_ORDER}
    automatic = [name for name in LEVER_ORDER if levers[name] == AUTO]
    resolved = {name: (False if value == AUTO else bool(value)) for name, value in levers.items()}
    result = {**resolved, "auto": automatic}
    if facts.device_type != "cuda" or not facts.total_memory:
        return result
    budget = BUDGET_FRACTION * facts.total_memory

    def peak(state):
        return estimate_peak(facts, state)["total"]

    turned_on = []
    for name in automatic:
        if peak(resolved) <= budget:
            break
        if _usable(name, facts):
            resolved[name] = True
            turned_on.append(name)
    for name in reversed(turned_on[:-1]):  # the last one was needed; an earlier one may no longer be
        trial = {**resolved, name: False}
        if peak(trial) <= budget:
            resolved = trial
    total = peak(resolved)
    return {**resolved, "auto": automatic, "budget_gib": round(budget / GIB, 2),
            "estimated_peak_gib": round(total / GIB, 2), "fits": total <= budget}


def describe_levers(resolved: dict) -> str:
    """The one log line of the resolved levers, e.g. `memory levers: offload_text_encoders=on (auto), ...;
    estimated peak 12.3 GiB of a 21.6 GiB budget`."""
    automatic = set(resolved.get("auto", ()))
    words = [f"{name}={'on' if resolved[name] else 'off'}{' (auto)' if name in automatic else ''}"
             for name in LEVER_ORDER]
    line = "memory levers: " + ", ".join(words)
    if "estimated_peak_gib" in resolved:
        line += (f"; estimated peak {resolved['estimated_peak_gib']:.1f} GiB of a {resolved['budget_gib']:.1f} GiB "
                 f"budget")
        if not resolved["fits"]:
            line += " (over it even with every lever: consider quantize_denoiser, a smaller batch or resolution)"
    elif automatic:
        line += "; auto is off on a device of unknown memory"
    return line


# ------------------------------------------------------------------------------------------ facts of a loaded model
def accelerator_memory(device) -> Optional[int]:
    """The total memory of a CUDA device in bytes; None for any other device."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device).total_memory


def parameter_count(module) -> int:
    """Parameters of `module` as the model defines them (a bitsandbytes 4-bit weight packs two per stored byte: its
    `quant_state` keeps the logical shape)."""
    total = 0
    for p in module.parameters():
        state = getattr(p, "quant_state", None)
        total += math.prod(state.shape) if getattr(state, "shape", None) is not None else p.numel()
    return total


def lora_parameter_count(module, targets, rank: int) -> int:
    """Parameters of a rank-`rank` LoRA on the linear layers peft matches with `targets` (a module named as a target
    or ending with `.target`)."""
    import torch

    total = 0
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (sub.in_features + sub.out_features)
    return total


def denoiser_shape(config: dict, resolution: int, vae_scale_factor: int, text_tokens: int) -> Tuple[int, int, int]:
    """`(tokens per image, hidden size, blocks)` of a denoiser from its diffusers config: a UNet (`block_out_channels`)
    at its full-resolution level; a DiT (every one here sees 2x2 latent patches: SD3's patch_size 2, FLUX and
    Qwen-Image pack 2x2 into channels) with its text tokens in joint attention. An unknown layout counts as a DiT of
    width 3072 (the estimate stays conservative)."""
    latent_side = max(1, resolution // max(1, vae_scale_factor))
    if "block_out_channels" in config:
        levels = len(config["block_out_channels"])
        blocks = 2 * levels * config.get("layers_per_block", 2) + 1
        return latent_side ** 2, int(config["block_out_channels"][0]), blocks
    heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    width = config.get("hidden_size") or config.get("dim") or (
        heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else 3072)
    blocks = (config.get("num_layers") or config.get("n_layers") or 0) + (config.get("num_single_layers") or 0)
    return (latent_side // 2) ** 2 + text_tokens, int(width), int(blocks) or 24


def model_facts(family, config, device, weight_dtype, resolution: int) -> MemoryFacts:
    """The `MemoryFacts` of a loaded family under a run's settings (`TrainConfig`), before the trainer places its
    modules: stored bytes from the run's dtype (`weight_dtype`) or the quantization method; counting is skipped on a
    device of unknown memory (nothing is resolved there)."""
    import torch

    total = accelerator_memory(device)
    device_type = getattr(device, "type", str(device))
    if total is None:
        return MemoryFacts(device_type=device_type)
    from .utils.peft_utils import unwrap

    dtype_bytes = torch.tensor([], dtype=weight_dtype).element_size()
    denoiser = unwrap(family.denoiser)
    encoders = [getattr(family.pipe, n, None) for n in family.text_encoder_names]
    encoders = [e for e in encoders if e is not None]
    vae = getattr(family.pipe, "vae", None)
    denoiser_params = parameter_count(denoiser)
    if config.use_lora:
        targets = config.lora_target_modules or family.default_lora_target_modules
        trained = lora_parameter_count(denoiser, targets, config.lora_rank)
    else:
        trained = denoiser_params
    text_tokens = getattr(family, "max_sequence_length", None) or 0
    tokens, width, blocks = denoiser_shape(dict(denoiser.config), resolution, getattr(family, "vae_scale_factor", 8),
                                           text_tokens)
    cfg = 2 if family.samples_with_cfg(config.sample_guidance_scale) else 1
    return MemoryFacts(
        device_type=device_type, total_memory=total,
        denoiser_params=denoiser_params,
        denoiser_bytes=QUANTIZED_BYTES.get(config.quantize_denoiser, dtype_bytes),
        text_encoder_params=sum(parameter_count(e) for e in encoders),
        text_encoder_bytes=QUANTIZED_BYTES.get(config.quantize_text_encoders, dtype_bytes),
        vae_params=parameter_count(vae) if vae is not None else 0, vae_bytes=dtype_bytes,
        trained_params=trained, full_finetune=not config.use_lora, activation_bytes=dtype_bytes,
        tokens=tokens, hidden_size=width, num_blocks=blocks, resolution=resolution,
        sample_batch_size=config.sample_batch_size, sample_rows=config.sample_batch_size * cfg,
        train_rows=config.train_micro_batch_size * cfg,
        text_encoders_movable=config.quantize_text_encoders not in ("nf4", "bnb_int8"),
        supports_gradient_checkpointing=bool(getattr(denoiser, "_supports_gradient_checkpointing", False)),
    )


def resolve_run_levers(config, family, device, weight_dtype, resolution: int) -> dict:
    """The run's levers (`resolve_memory_levers` of the loaded model's `model_facts`)."""
    requested = {name: getattr(config, name) for name in LEVER_ORDER}
    return resolve_memory_levers(requested, model_facts(family, config, device, weight_dtype, resolution))
