"""Z-Image's own facts, beyond the family tester (tests/test_family_common.py runs every shared check on it): its
variable-length prompt encoding is the pipeline's, its tokenizer built in code survives save/reload, and its CFG
scale maps onto ZImagePipeline's `guidance_scale`."""

import torch

from diffalign.families import FAMILIES, load_family
from diffalign.families.zimage import ZImageFamily, pad_rows, tiny_qwen_tokenizer, unpad_rows

PROMPTS = ["a photo of a cat", "a red car"]


def test_zimage_is_registered():
    assert FAMILIES["ZImagePipeline"] is ZImageFamily


def test_pad_rows_round_trip():
    rows = [torch.randn(3, 4), torch.randn(1, 4), torch.randn(5, 4)]
    padded, mask = pad_rows(rows, 6)
    assert padded.shape == (3, 6, 4) and mask.sum(1).tolist() == [3, 1, 5]
    assert (padded[~mask] == 0).all()
    for back, row in zip(unpad_rows(padded, mask), rows):
        assert torch.equal(back, row)


def test_tokenizer_is_a_real_bpe_and_prompts_encode_differently():
    tokenizer = tiny_qwen_tokenizer()
    assert len(tokenizer) > 256  # the byte symbols, merges and special tokens (not a 2-token fallback)
    a, b = (tokenizer(p).input_ids for p in PROMPTS)
    assert a != b and tokenizer.decode(a) == PROMPTS[0]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_encoding_is_the_pipeline_encoding_after_save_and_reload(tmp_path):
    family = load_family(ZImageFamily.save_tiny(str(tmp_path / "zimage")))  # the tokenizer reloaded from files
    assert len(family.pipe.tokenizer) == len(tiny_qwen_tokenizer())
    family.configure(max_sequence_length=64)
    cond = family.encode_prompts(PROMPTS + [""])
    assert cond["encoder_hidden_states"].shape[:2] == cond["encoder_attention_mask"].shape == (3, 64)
    stock, _ = family.pipe.encode_prompt(PROMPTS + [""], device="cpu", do_classifier_free_guidance=False,
                                         max_sequence_length=64)
    ours = unpad_rows(cond["encoder_hidden_states"], cond["encoder_attention_mask"])
    assert [row.shape[0] for row in ours] == [row.shape[0] for row in stock]  # variable lengths, kept
    assert len({row.shape[0] for row in ours}) == 3
    for mine, theirs in zip(ours, stock):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)
    assert (ours[0][-1] - ours[1][-1]).abs().max() > 1e-3  # two prompts, two conditionings


def test_cfg_scale_maps_to_the_pipeline_guidance_scale():
    assert ZImageFamily.pipeline_guidance_kwargs(1.0) == {"guidance_scale": 0.0}  # no CFG
    assert ZImageFamily.pipeline_guidance_kwargs(4.5) == {"guidance_scale": 3.5}
