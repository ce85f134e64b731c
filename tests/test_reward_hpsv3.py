"""HPSv3 rebuilt on transformers' Qwen2-VL: checkpoint key mapping, image patch layout, the scorer on a tiny model.

No real checkpoint here: a tiny Qwen2-VL is saved with the key names of transformers 4.45's
`Qwen2VLForConditionalGeneration` plus `rm_head.*` (the layout of `HPSv3.safetensors`), random values.
"""

import pytest
import torch

from diffalign.rewards import RewardWeightsNotFoundError, get_reward
from diffalign.rewards.hpsv3 import (REWARD_TOKEN, HPSv3Model, hpsv3_chat_text, map_hpsv3_state_dict,
                                     qwen2vl_patches, smart_resize)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
WORDS = ["a", "red", "cat", "blue", "dog", "system", "user", "assistant", "image", "prompt", "the", "of"]
PIXELS = 4 * 28 * 28  # 56 x 56: 16 patches of 14, 4 visual tokens


def _tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(["[UNK]"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    tokenizer.save_pretrained(folder)
    return tokenizer


def _config(tokenizer):
    from transformers import Qwen2VLConfig

    ids = tokenizer.convert_tokens_to_ids
    return Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer) + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]},
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids("<|image_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def _to_published_layout(model_state):
    """transformers-5 `HPSv3Model` keys -> the transformers-4.45 keys of HPSv3.safetensors."""
    published = {}
    for key, value in model_state.items():
        if key.startswith("backbone.language_model."):
            published["model." + key[len("backbone.language_model.") :]] = value
        elif key.startswith("backbone.visual."):
            published[key[len("backbone.") :]] = value
        elif key.startswith("head.layers."):
            published["rm_head." + key[len("head.layers.") :]] = value
    return published


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("hpsv3")
    base = folder / "base"
    tokenizer = _tokenizer(str(base))
    config = _config(tokenizer)
    config.save_pretrained(str(base))
    torch.manual_seed(0)
    model = HPSv3Model(config)
    for parameter in model.head.parameters():  # a head with some spread, so that scores differ visibly
        torch.nn.init.normal_(parameter, std=0.5)
    state = _to_published_layout({k: v.contiguous() for k, v in model.state_dict().items()})
    for key in ("model.embed_tokens.weight", "visual.merger.mlp.0.weight", "rm_head.5.weight"):
        assert key in state
    state["lm_head.weight"] = torch.zeros(len(tokenizer) + 1, 32)
    save_file(state, str(folder / "HPSv3.safetensors"))
    return state, str(folder / "HPSv3.safetensors"), str(base)


def _reward(published, **kwargs):
    _, checkpoint, base = published
    return get_reward("hpsv3", checkpoint=checkpoint, base=base, dtype="float32", image_pixels=PIXELS, **kwargs)


def test_published_keys_land_and_lm_head_is_dropped(published):
    state = published[0]
    reward = _reward(published)
    loaded = reward.model.state_dict()
    mapped = map_hpsv3_state_dict(state)
    assert len(mapped) == len(state) - 1 and not any(key.startswith("lm_head") for key in mapped)
    for key, value in mapped.items():
        assert torch.equal(loaded[key], value), key
    assert reward.model.head.layers[0].weight.dtype == torch.float32
    assert reward.reward_token_id == len(reward.tokenizer) - 1
    with pytest.raises(ValueError, match="not in HPSv3's layout, e.g. 'value_head.weight'"):
        map_hpsv3_state_dict(dict(state, **{"value_head.weight": torch.zeros(1)}))


def test_patch_layout_matches_transformers_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = torch.rand(1, 3, 56, 84, generator=torch.Generator().manual_seed(0))
    processor = Qwen2VLImageProcessorPil(do_resize=False, do_rescale=False, do_normalize=False)
    expected = processor(images=[image[0].numpy()], return_tensors="pt", input_data_format="channels_first")
    ours = qwen2vl_patches(image)
    assert expected["image_grid_thw"].tolist() == [[1, 4, 6]]
    torch.testing.assert_close(ours, expected["pixel_values"].float())


def test_smart_resize_keeps_their_pixel_budget():
    assert smart_resize(448, 448) == (448, 448)
    height, width = smart_resize(512, 768)
    assert height % 28 == 0 and width % 28 == 0 and abs(height * width - 256 * 28 * 28) < 0.1 * 256 * 28 * 28
    assert abs(width / height - 1.5) < 0.1
    assert smart_resize(64, 64, min_pixels=PIXELS, max_pixels=PIXELS) == (56, 56)


def test_chat_text_holds_one_reward_token_and_the_prompt():
    text = hpsv3_chat_text("a red cat", 4)
    assert text.count(REWARD_TOKEN) == 1 and text.count("<|image_pad|>") == 4
    assert "Textual prompt - a red cat" in text and text.endswith("<|im_start|>assistant\n")


def test_scores_shape_dtype_and_prompt_dependence(published):
    reward = _reward(published)
    images = torch.rand(3, 3, 60, 50, generator=torch.Generator().manual_seed(1))
    prompts = ["a red cat", "the blue dog of the image", "a red cat"]
    scores = reward(images, prompts, None)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert torch.isfinite(scores).all()
    same_image = reward(images[:1].expand(2, -1, -1, -1), ["a red cat", "the blue dog of the image"])
    assert not torch.isclose(same_image[0], same_image[1], atol=1e-5)
    other_images = reward(images[1:3].flip(-1), ["a red cat", "a red cat"])
    assert not torch.isclose(other_images[0], scores[0], atol=1e-5)
    one_at_a_time = _reward(published, batch_size=1)(images, prompts)
    torch.testing.assert_close(one_at_a_time, scores, atol=1e-4, rtol=1e-4)


def test_missing_checkpoint_is_one_line(published, tmp_path, monkeypatch):
    with pytest.raises(RewardWeightsNotFoundError, match="checkpoint '.*nothing' not found; download it"):
        get_reward("hpsv3", checkpoint=str(tmp_path / "nothing"), base=published[2])
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def not_cached(repo_id, filename, **kwargs):  # the cache-only lookup of an offline machine; no hub is reached
        raise LocalEntryNotFoundError(f"{repo_id}/{filename} is not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_cached)
    with pytest.raises(RewardWeightsNotFoundError) as error:
        get_reward("hpsv3", base=published[2])
    assert "\n" not in str(error.value) and "MizzenAI/HPSv3/HPSv3.safetensors" in str(error.value)


def test_language_model_gets_sequential_positions_as_in_their_forward(published):
    """Their `forward` passed no position ids to transformers 4.45's text model: 0..L-1 in all three M-RoPE sections.

    transformers 5 would compute Qwen2-VL's 2-D image positions instead; the two differ, and the score uses the first.
    """
    reward = _reward(published)
    image = torch.rand(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    patches, grid, image_tokens = reward._pixels(image)
    tokens = reward.tokenizer([hpsv3_chat_text("a red cat", image_tokens)], return_tensors="pt")
    at_reward = tokens["input_ids"] == reward.reward_token_id
    length = tokens["input_ids"].shape[1]

    image_token_types = (tokens["input_ids"] == reward.model.backbone.config.image_token_id).int()  # 1: image

    def head_output(position_ids):
        hidden = reward.model.backbone(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                       pixel_values=patches, image_grid_thw=grid, position_ids=position_ids,
                                       mm_token_type_ids=image_token_types).last_hidden_state
        return reward.model.head(hidden[at_reward])[:, 0]

    sequential = head_output(torch.arange(length).view(1, 1, -1).expand(3, 1, -1))
    torch.testing.assert_close(reward(image, ["a red cat"]), sequential)
    assert not torch.isclose(head_output(None), sequential, atol=1e-5).all()
