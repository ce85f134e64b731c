"""peft LoRA adapters on diffusers denoisers, and the accelerate/compile wrappers around them: adding an adapter,
running the base model or mixed adapters per row, checking target modules, and loading a LoRA into a pipeline."""

import os
from contextlib import contextmanager, nullcontext
from typing import List, Optional

from ..errors import ConfigError, ModelError, first_line

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# a two-expert model's second LoRA (Wan 2.2 A14B's low-noise expert, `train_experts`), beside LORA_WEIGHT_NAME: keys
# as the first's, loaded with `load_lora_weights(dir, weight_name=..., load_into_transformer_2=True)`
LOW_NOISE_LORA_WEIGHT_NAME = "pytorch_lora_weights_transformer_2.safetensors"
BASE_ADAPTER = "__base__"  # peft's name for "no adapter" rows in a mixed-adapter batch


def unwrap(model):
    """The module inside accelerate/DDP/compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def has_lora(model) -> bool:
    return bool(getattr(unwrap(model), "peft_config", None))


@contextmanager
def adapters_disabled(denoiser):
    """Runs the base model of a peft-LoRA denoiser: the reference policy without a second copy of the weights."""
    model = unwrap(denoiser)
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


def reference_model(denoiser, ref_denoiser=None):
    """`(module, context_factory)` computing the reference model: a frozen `ref_denoiser`, or `denoiser` with its LoRA
    disabled. Run the module inside `with context_factory():`."""
    if ref_denoiser is not None:
        return ref_denoiser, nullcontext
    if has_lora(denoiser):
        return denoiser, lambda: adapters_disabled(denoiser)
    raise ValueError("a reference model needs either a LoRA adapter on the denoiser or a frozen reference copy")


@contextmanager
def adapter_rows(denoiser, adapter_names: List[str]):
    """Runs each row of the next denoiser forwards through its own LoRA adapter (`"__base__"`: none).

    peft's mixed-batch inference, injected with forward pre-hooks on every `LoraLayer` because diffusers' models do
    not pass `adapter_names` down. Exact, and needs no second copy of the weights (the model must be in eval mode).
    """
    with lora_adapter_names_rewritten(denoiser, lambda inputs, names: adapter_names):
        yield


@contextmanager
def lora_adapter_names_rewritten(denoiser, rewrite):
    """Inside this block every `LoraLayer` of `denoiser` calls `rewrite(inputs, adapter_names)` before its forward
    (`inputs`: the layer's positional arguments; `adapter_names`: the names it was given, or None) and runs with the
    names it returns (None: unchanged). Forward pre-hooks, because diffusers' models do not pass `adapter_names`
    down; a later block's hook runs after an earlier one's (e.g. a family's row selection after `adapter_rows`)."""
    from peft.tuners.lora import LoraLayer

    def hook(module, args, kwargs):
        names = rewrite(args, kwargs.get("adapter_names"))
        return None if names is None else (args, {**kwargs, "adapter_names": names})

    layers = [m for m in unwrap(denoiser).modules() if isinstance(m, LoraLayer)]
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def add_lora(denoiser, rank: int = 4, alpha: float = 4.0, target_modules: Optional[List[str]] = None,
             adapter_name: str = "default", lora_config=None):
    """Freezes the denoiser (UNet or transformer) and adds a trainable peft LoRA adapter.

    By default the adapter has rank `rank`, scale `alpha / rank`, Gaussian A and zero B (it starts at the base model)
    on `target_modules` (default: the attention projections of SD's UNet). A peft `LoraConfig` given as `lora_config`
    is used as it is instead (`rank` and `alpha` are then unused; `target_modules` fills in its targets if it has
    none). Trainable LoRA weights stay float32 under mixed precision.
    """
    from peft import LoraConfig

    default_targets = target_modules or ["to_q", "to_k", "to_v", "to_out.0"]
    if lora_config is None:
        lora_config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                 target_modules=default_targets)
    elif lora_config.target_modules is None:  # peft cannot guess them for diffusers' models
        import copy

        lora_config = copy.deepcopy(lora_config)
        lora_config.target_modules = set(default_targets)
    denoiser.requires_grad_(False)
    denoiser.add_adapter(lora_config, adapter_name=adapter_name)
    for param in denoiser.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # trainable LoRA weights stay fp32 under mixed precision
    return denoiser


def record_lora_config(config, lora_config):
    """Writes a user's peft `LoraConfig` into a training config's `lora_rank`, `lora_alpha` and `lora_target_modules`
    (a list of names; a regular-expression string cannot be written there and leaves it as it is), so that the
    config, its checkpoint hash and the model card describe the adapter that is trained. Raises a `ConfigError` when
    `lora_config` is no `LoraConfig` or `config.use_lora` is false."""
    from peft import LoraConfig

    if not isinstance(lora_config, LoraConfig):
        raise ConfigError(f"lora_config must be a peft LoraConfig; got {type(lora_config).__name__}")
    if not config.use_lora:
        raise ConfigError("lora_config is given but use_lora is false: set use_lora to train the adapter")
    config.lora_rank = lora_config.r
    config.lora_alpha = float(lora_config.lora_alpha)
    if lora_config.target_modules is not None and not isinstance(lora_config.target_modules, str):
        config.lora_target_modules = sorted(lora_config.target_modules)


def check_lora_target_modules(denoiser, target_modules: Optional[List[str]]):
    """Raises a one-line `ConfigError` for each `lora_target_modules` entry that names no module of `denoiser`.

    peft matches an entry against a module's full name or its dotted suffix (`to_q` matches
    `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`); a name matching nothing would otherwise end in
    peft's multi-line error, or be ignored when another entry matches.
    """
    if target_modules is None:
        return
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    names = [name for name, _ in denoiser.named_modules() if name]
    unknown = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        leaves = sorted({_leaf(n) for n, m in denoiser.named_modules()
                         if n and type(m).__name__ in ("Linear", "Conv2d", "LoRACompatibleLinear")})
        raise ConfigError(
            f"lora_target_modules: {', '.join(repr(t) for t in unknown)} match no module of the "
            f"{type(denoiser).__name__}; its linear layers include: {', '.join(leaves[:20])}"
        )


def _leaf(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def check_lora_file(weight_file: str):
    """A one-line `ModelError` unless `weight_file` is a readable safetensors file holding LoRA weights: garbage or
    a cut file is "not a LoRA", told apart from a LoRA that does not fit the model."""
    from safetensors import safe_open

    try:
        with safe_open(weight_file, framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors' own error type, or an OSError: a header that is not safetensors
        raise ModelError(f"'{weight_file}' is not a LoRA: not a readable safetensors file "
                         f"({first_line(e, with_type=False)[:200]})") from None
    if not any("lora" in key.lower() for key in keys):
        raise ModelError(f"'{weight_file}' is not a LoRA: none of its {len(keys)} tensors is a LoRA weight")


def load_lora_into_pipeline(pipe, directory: str, adapter_name: str = "default", denoiser_name: str = "unet"):
    """`pipe.load_lora_weights` with one clear error when the directory or its weights are missing, unreadable or do
    not fit the model (`denoiser_name`: the pipeline attribute the LoRA must target, `unet` or `transformer`)."""
    from safetensors import SafetensorError

    weight_file = os.path.join(directory, LORA_WEIGHT_NAME)
    if not os.path.isfile(weight_file):
        raise ModelError(f"LoRA directory '{directory}' has no {LORA_WEIGHT_NAME}")
    check_lora_file(weight_file)
    try:
        pipe.load_lora_weights(directory, weight_name=LORA_WEIGHT_NAME, adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError, OSError, SafetensorError) as e:  # garbage or cut files too
        raise ModelError(f"LoRA in '{directory}' does not match the model: {first_line(e, with_type=False)}") from None
    if adapter_name not in (getattr(getattr(pipe, denoiser_name), "peft_config", None) or {}):
        raise ModelError(
            f"LoRA in '{directory}' does not match the model: none of its weights target this {denoiser_name}"
        )
    return pipe


def load_expert_loras_into_pipeline(pipe, directory: str, adapter_name: str = "default",
                                    denoiser_name: str = "unet"):
    """Every expert's LoRA of a training run's directory, each as `adapter_name`: `LORA_WEIGHT_NAME` into the
    denoiser (`load_lora_into_pipeline`), and `LOW_NOISE_LORA_WEIGHT_NAME` (Wan 2.2 A14B's `train_experts`
    low_noise/both) into `transformer_2` with `load_lora_weights(..., load_into_transformer_2=True)`; either file
    alone will do. One-line `ModelError`s: neither file, a low-noise LoRA for a model with one expert, or weights
    that are unreadable or do not fit."""
    from safetensors import SafetensorError

    low_noise_file = os.path.join(directory, LOW_NOISE_LORA_WEIGHT_NAME)
    two_experts = getattr(pipe, "transformer_2", None) is not None
    if two_experts and not os.path.isfile(low_noise_file) \
            and not os.path.isfile(os.path.join(directory, LORA_WEIGHT_NAME)):
        raise ModelError(f"LoRA directory '{directory}' has neither {LORA_WEIGHT_NAME} nor "
                         f"{LOW_NOISE_LORA_WEIGHT_NAME}")
    if not os.path.isfile(low_noise_file):
        return load_lora_into_pipeline(pipe, directory, adapter_name, denoiser_name)
    if not two_experts:
        raise ModelError(f"LoRA directory '{directory}' has {LOW_NOISE_LORA_WEIGHT_NAME}, a second (low-noise) "
                         f"expert's LoRA, but this model has one expert")
    if os.path.isfile(os.path.join(directory, LORA_WEIGHT_NAME)):
        load_lora_into_pipeline(pipe, directory, adapter_name, denoiser_name)
    check_lora_file(low_noise_file)
    try:
        pipe.load_lora_weights(directory, weight_name=LOW_NOISE_LORA_WEIGHT_NAME, adapter_name=adapter_name,
                               load_into_transformer_2=True)
    except (RuntimeError, ValueError, KeyError, OSError, SafetensorError) as e:
        raise ModelError(f"{LOW_NOISE_LORA_WEIGHT_NAME} in '{directory}' does not match the model's transformer_2: "
                         f"{first_line(e, with_type=False)}") from None
    if adapter_name not in (getattr(pipe.transformer_2, "peft_config", None) or {}):
        raise ModelError(f"{LOW_NOISE_LORA_WEIGHT_NAME} in '{directory}' does not match the model: none of its "
                         f"weights target this transformer_2")
    return pipe


def active_adapter(denoiser) -> str:
    """The name of the one LoRA adapter that the denoiser's forward runs (the trained one, unless another was made
    active with `adapter_active`); a model may hold more (DiffusionNFT's frozen "old" policy)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in unwrap(denoiser).modules():
        if isinstance(module, BaseTunerLayer):
            (name,) = module.active_adapters
            return name
    raise ValueError("the denoiser has no LoRA adapter")


@contextmanager
def adapter_active(denoiser, name: str):
    """Runs the denoiser's forwards through its LoRA adapter `name` (frozen meanwhile), then makes the adapter that
    was active before active (and trainable) again, and every other adapter frozen: peft's `set_adapter` sets
    `requires_grad` by the active adapter, so the trained adapter's flags come back as they were."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unwrap(denoiser).modules() if isinstance(m, BaseTunerLayer)]
    before = active_adapter(denoiser)
    trainable = any(p.requires_grad for n, p in unwrap(denoiser).named_parameters() if f".{before}." in n)
    for layer in layers:
        layer.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_adapter(before, inference_mode=not trainable)
