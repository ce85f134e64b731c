"""Image-only Qwen-VL processors: diffusers' Qwen pipelines take a `Qwen2VLProcessor` (Qwen-Image-Edit) or a
`Qwen3VLProcessor` (QwenImage 2.1, FLUX.3), whose video processor needs torchvision in transformers 5.25
(`ProcessorMixin.__init__` type-checks every attribute; `VideoProcessorMixin` resolves to a placeholder without
torchvision, and even `video_processor=None` fails with "VIDEO_PROCESSOR_MAPPING has no attribute
'_extra_content'"). The pipelines never pass videos: a subclass whose `__init__` has no `video_processor` has the
image processor and the tokenizer as its only attributes (`ProcessorMixin.get_attributes` reads the signature), so it
builds, saves and loads without torchvision, and runs the stock processor's own `__call__`, image-token expansion,
tokenizer and image processor (the PIL backend without torchvision)."""

import functools
import importlib.util
import json
import os
from typing import Dict


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


@functools.lru_cache(maxsize=None)
def image_only_processor_class(stock_name: str):
    """`ImageOnly<stock_name>`: transformers' processor `stock_name` (`"Qwen2VLProcessor"`, `"Qwen3VLProcessor"`)
    without a video processor. Made on first use: importing transformers takes seconds, which a CLI that never loads
    such a model should not pay."""
    import transformers

    stock = getattr(transformers, stock_name)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        stock.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    image_only = type(f"ImageOnly{stock_name}", (stock,), {"__init__": __init__})
    # it saves as the processor it stands in for: `save_pretrained` (diffusers' `model_index.json`, the processor's
    # own configs) names the class by its module and name, and diffusers cannot load a class from diffalign; so a
    # saved pipeline has the Hub's layout (`["transformers", stock_name]`), which `image_only_components` reads
    image_only.__module__ = stock.__module__
    image_only.__name__ = image_only.__qualname__ = stock.__name__
    return image_only


def image_only_components(path: str, stock_name: str) -> Dict:
    """Where torchvision is missing, every component of the pipeline directory `path` that is a `stock_name`
    processor (by its `model_index.json` entry), loaded from its folder as `image_only_processor_class(stock_name)`;
    nothing otherwise."""
    index = os.path.join(path, "model_index.json")
    if torchvision_available() or not os.path.isfile(index):
        return {}
    with open(index) as f:
        entries = json.load(f)
    return {name: image_only_processor_class(stock_name).from_pretrained(os.path.join(path, name))
            for name, entry in entries.items() if isinstance(entry, list) and entry[-1] == stock_name}
