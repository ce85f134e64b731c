"""An offline CLIP tokenizer built from the BPE vocabulary that ships with diffalign.

The vocabulary file `assets/bpe_simple_vocab_16e6.txt.gz` is OpenAI CLIP's (MIT, redistributed by
open_clip). Converting it with open_clip's own recipe gives token ids identical to the tokenizer of
`openai/clip-vit-large-patch14` that Stable Diffusion 1.x uses, without any hub access.
"""

import gzip
import json
import os
import tempfile
from functools import lru_cache
from importlib import resources

BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict:
    # GPT-2/CLIP byte-level mapping: printable bytes map to themselves, the rest to unused code points.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple:
    raw = resources.files("diffalign").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    merges = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(merge.split()) for merge in merges)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    return {token: i for i, token in enumerate(vocab)}, merges


def write_clip_vocab(directory: str) -> tuple:
    """Writes `vocab.json` and `merges.txt` of the CLIP BPE vocabulary into `directory`; returns their paths."""
    vocab, merges = _vocab_and_merges()
    os.makedirs(directory, exist_ok=True)
    vocab_path = os.path.join(directory, "vocab.json")
    merges_path = os.path.join(directory, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


@lru_cache(maxsize=4)
def _cached_tokenizer(model_max_length: int):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = write_clip_vocab(tmp)
        # transformers 5 ignores `vocab_file=`/`merges_file=` here; `vocab=`/`merges=` take paths.
        tokenizer = CLIPTokenizer(vocab=vocab_path, merges=merges_path)
    tokenizer.model_max_length = model_max_length
    return tokenizer


def offline_clip_tokenizer(model_max_length: int = 77):
    """Returns a `transformers.CLIPTokenizer` with CLIP's real vocabulary, built without network access.

    Args:
        model_max_length (`int`, *optional*, defaults to 77):
            Prompts are padded and truncated to this many tokens (77 for Stable Diffusion).
    """
    import copy

    return copy.deepcopy(_cached_tokenizer(model_max_length))
