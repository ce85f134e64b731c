"""Converts LAION's aesthetic predictor head (`.pth`) to `.safetensors`, once, without unpickling objects.

The `aesthetic` reward reads its MLP head only from safetensors. Download the public checkpoint

    https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth

and run

    python scripts/convert_aesthetic_head.py sac+logos+ava1-l14-linearMSE.pth aesthetic_head.safetensors

then use `get_reward("aesthetic", head="aesthetic_head.safetensors")`. The `.pth` is read with
`torch.load(weights_only=True)`, which only accepts tensors and plain containers, and the keys and
shapes are checked against the head's architecture before anything is written.
"""

import argparse
from typing import Dict

import torch

# Linear layers of the head: Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64),
# Dropout, Linear(64, 16), Linear(16, 1); their indices in the `nn.Sequential` named `layers`.
LINEAR_INDICES = (0, 2, 4, 6, 7)


def extract_head_state_dict(checkpoint) -> Dict[str, torch.Tensor]:
    """The head's `layers.{0,2,4,6,7}.{weight,bias}` tensors from a loaded checkpoint, validated.

    Accepts a bare state dict, `{"state_dict": ...}` (PyTorch Lightning) and a DDP `module.` prefix.
    """
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(f"expected a state dict, got {type(checkpoint).__name__}")
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    expected = [f"layers.{i}.{kind}" for i in LINEAR_INDICES for kind in ("weight", "bias")]
    missing = [key for key in expected if key not in state_dict]
    if missing:
        raise ValueError(f"not an aesthetic predictor head: missing {missing} (found {sorted(state_dict)[:10]})")
    head = {key: state_dict[key].detach().float().contiguous() for key in expected}
    # consecutive linear layers must chain, and the last one must output a single score
    for previous, current in zip(LINEAR_INDICES, LINEAR_INDICES[1:]):
        if head[f"layers.{current}.weight"].shape[1] != head[f"layers.{previous}.weight"].shape[0]:
            raise ValueError(f"layers.{previous} and layers.{current} do not chain")
    if head["layers.7.weight"].shape[0] != 1:
        raise ValueError("the last layer must output one value")
    return head


def convert(source: str, destination: str) -> Dict[str, torch.Tensor]:
    """Reads `source` (`.pth`) with `torch.load(weights_only=True)` and writes the head to `destination`."""
    from safetensors.torch import save_file

    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    head = extract_head_state_dict(checkpoint)
    save_file(head, destination, metadata={"format": "pt", "model": "laion-aesthetic-predictor-mlp"})
    return head


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="sac+logos+ava1-l14-linearMSE.pth (or another head of the same architecture)")
    parser.add_argument("destination", help="output .safetensors file")
    args = parser.parse_args(argv)
    head = convert(args.source, args.destination)
    dims = [head["layers.0.weight"].shape[1]] + [head[f"layers.{i}.weight"].shape[0] for i in LINEAR_INDICES]
    print(f"wrote {args.destination}: MLP {' -> '.join(map(str, dims))}")


if __name__ == "__main__":
    main()
