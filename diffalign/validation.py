"""Checks of settings that need the loaded model (the rest is `TrainConfig.validate`)."""

from typing import List, Optional

from .config import ConfigError


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
