"""A quantized frozen base under a trained LoRA (QLoRA-style), through diffusers' and transformers' own quantization
configs: the denoiser's (and optionally the text encoders') linear layers hold int8, fp8 or NF4 weights; the LoRA
adapter on top trains in float32 (`diffalign.utils.peft_utils.add_lora`), the reference branch is the same base with
the adapters off, and the saved LoRA (its keys do not depend on the base's storage) loads on an unquantized base.

Methods (`TrainConfig.quantize_denoiser`, `TrainConfig.quantize_text_encoders`):

- `none`: full-precision weights (the default);
- `int8`: torchao int8 weight-only (`TorchAoConfig(Int8WeightOnlyConfig())`), on CUDA or on a CPU;
- `fp8`: torchao float8 weight-only (`TorchAoConfig(Float8WeightOnlyConfig())`), CUDA with compute capability 8.9+;
- `nf4`: bitsandbytes 4-bit NormalFloat (`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`), CUDA;
- `bnb_int8`: bitsandbytes LLM.int8 (`BitsAndBytesConfig(load_in_8bit=True)`), CUDA.

A model loaded from a directory is quantized as it loads (`pipeline_quantization_config`, diffusers'
`PipelineQuantizationConfig`); a pipeline built in memory (the Python API, `scripts/gpu_check.py`) is quantized in
place (`quantize_in_place`). Nothing here is imported before a run asks for quantization.
"""

import importlib.util
from typing import Dict, Iterable, Optional

from .errors import ConfigError

# method: (what it is, the package it needs, whether it needs CUDA)
QUANTIZATION_METHODS: Dict[str, tuple] = {
    "none": ("full-precision weights", None, False),
    "int8": ("torchao int8 weight-only", "torchao", False),
    "fp8": ("torchao float8 weight-only", "torchao", True),
    "nf4": ("bitsandbytes 4-bit NF4", "bitsandbytes", True),
    "bnb_int8": ("bitsandbytes LLM.int8", "bitsandbytes", True),
}
# the pip extra that installs each backend
BACKEND_EXTRAS = {"torchao": "diffalign[quant]", "bitsandbytes": "bitsandbytes (CUDA)"}


def check_quantization_method(key: str, method: str, cuda_available: Optional[bool] = None):
    """A one-line `ConfigError` unless `method` is a known method whose package is installed and whose device is
    there (`cuda_available`: None asks torch, only for a method that needs CUDA)."""
    if method not in QUANTIZATION_METHODS:
        raise ConfigError(f"{key} must be one of {', '.join(QUANTIZATION_METHODS)}; got '{method}'")
    what, package, needs_cuda = QUANTIZATION_METHODS[method]
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"{key}: {method} ({what}) needs the '{package}' package: pip install "
                          f"{BACKEND_EXTRAS[package]}")
    if needs_cuda:
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        if not cuda_available:
            raise ConfigError(f"{key}: {method} ({what}) needs a CUDA GPU; on a CPU use int8 (torchao) or none")


def _torchao_config(method: str):
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return Int8WeightOnlyConfig() if method == "int8" else Float8WeightOnlyConfig()


def library_quantization_config(method: str, library: str, compute_dtype=None):
    """The quantization config object of `library` (`diffusers` for a denoiser, `transformers` for a text encoder)
    for `method`; None for `none`. `compute_dtype`: bitsandbytes' compute dtype (default bfloat16)."""
    if method == "none":
        return None
    import torch

    module = importlib.import_module(library)
    if method in ("int8", "fp8"):
        return module.TorchAoConfig(_torchao_config(method))
    if method == "nf4":
        return module.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16)
    return module.BitsAndBytesConfig(load_in_8bit=True)


def pipeline_quantization_config(denoiser_name: str, text_encoder_names: Iterable[str], quantize_denoiser: str,
                                 quantize_text_encoders: str, compute_dtype=None):
    """diffusers' `PipelineQuantizationConfig` that quantizes the denoiser with `quantize_denoiser` and every text
    encoder with `quantize_text_encoders` as `from_pretrained` loads them; None when both are `none`."""
    mapping = {}
    if quantize_denoiser != "none":
        mapping[denoiser_name] = library_quantization_config(quantize_denoiser, "diffusers", compute_dtype)
    if quantize_text_encoders != "none":
        for name in text_encoder_names:
            mapping[name] = library_quantization_config(quantize_text_encoders, "transformers", compute_dtype)
    if not mapping:
        return None
    from diffusers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_mapping=mapping)


def is_quantized(module) -> bool:
    """Whether `module` holds quantized weights (loaded with a quantization config, or `quantize_in_place`)."""
    return bool(getattr(module, "hf_quantizer", None) or getattr(module, "is_quantized", False)
                or getattr(module, "_diffalign_quantization", None))


def _replace_linears(module, make):
    """Replaces every `torch.nn.Linear` below `module` (exact type: LoRA layers and quantized ones stay) by
    `make(linear)`."""
    import torch

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, make(child))


def quantize_in_place(module, method: str, compute_dtype=None):
    """Quantizes the linear layers of an in-memory `module` with `method` (as `pipeline_quantization_config` would
    have at load time) and returns it; the other layers keep their dtype. bitsandbytes quantizes as the weights move
    to CUDA, so the module must be on the GPU (or is moved there)."""
    if method == "none":
        return module
    import torch

    if method in ("int8", "fp8"):
        from torchao.quantization import quantize_

        quantize_(module, _torchao_config(method))
    else:
        import bitsandbytes as bnb

        device = torch.device("cuda", torch.cuda.current_device())
        compute_dtype = compute_dtype or torch.bfloat16

        def make(linear):
            bias = linear.bias is not None
            if method == "nf4":
                layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias,
                                          compute_dtype=compute_dtype, quant_type="nf4", device="meta")
                layer.weight = bnb.nn.Params4bit(linear.weight.data.to(compute_dtype), requires_grad=False,
                                                 quant_type="nf4")
            else:
                layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias,
                                            has_fp16_weights=False, device="meta")
                layer.weight = bnb.nn.Int8Params(linear.weight.data.to(torch.float16), requires_grad=False,
                                                 has_fp16_weights=False)
            if bias:
                layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
            return layer.to(device)  # bitsandbytes quantizes on this move

        _replace_linears(module, make)
    module._diffalign_quantization = method
    return module


def quantize_pipeline_in_place(family, quantize_denoiser: str, quantize_text_encoders: str, compute_dtype=None):
    """`quantize_in_place` on a loaded family's denoiser and text encoders (those present)."""
    quantize_in_place(family.denoiser, quantize_denoiser, compute_dtype)
    for name in family.text_encoder_names:
        encoder = getattr(family.pipe, name, None)
        if encoder is not None:
            quantize_in_place(encoder, quantize_text_encoders, compute_dtype)
    return family
