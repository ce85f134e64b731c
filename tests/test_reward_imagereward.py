"""ImageReward rebuilt on transformers' BLIP: key mapping, vision numerics against BLIP's ViT, the scorer.

No real checkpoint here: a tiny state dict is written with the published key names of `ImageReward.pt`
(image-reward 1.5: `ImageReward.blip = BLIP_Pretrain(vit="large")`, `ImageReward.mlp = MLP(768)`), random values.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from diffalign.rewards import RewardWeightsNotFoundError, get_reward
from diffalign.rewards.imagereward import (IMAGEREWARD_MEAN, IMAGEREWARD_STD, build_imagereward_model,
                                           map_imagereward_state_dict, normalize_imagereward_score)

VISION_WIDTH, VISION_DEPTH, VISION_HEADS, PATCH, IMAGE = 32, 2, 4, 8, 32
TEXT_WIDTH, TEXT_DEPTH, TEXT_HEADS, POSITIONS = 16, 2, 2, 40
WORDS = ["a", "red", "blue", "cat", "dog", "photo", "of", "the", "on", "grass"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS  # + BLIP's [DEC], [ENC]


def _published_state_dict(seed: int = 0, vision=(VISION_WIDTH, VISION_DEPTH, PATCH, IMAGE),
                          text=(TEXT_WIDTH, TEXT_DEPTH, POSITIONS, len(VOCAB) + 2), device="cpu"):
    """Random tensors under the key names and shapes of ImageReward.pt (tiny sizes by default).

    `vision = (width, depth, patch, image size)`, `text = (width, depth, positions, vocabulary)`; on
    `device="meta"` only the shapes exist.
    """
    generator = torch.Generator().manual_seed(seed)
    vision_width, vision_depth, patch, image = vision
    text_width, text_depth, positions, vocabulary = text

    def rand(*shape, scale=0.2):
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=generator) * scale

    def norm(prefix, width):
        return {f"{prefix}.weight": 1 + rand(width, scale=0.1), f"{prefix}.bias": rand(width, scale=0.1)}

    def linear(prefix, out_features, in_features):
        return {f"{prefix}.weight": rand(out_features, in_features), f"{prefix}.bias": rand(out_features, scale=0.05)}

    V, T = vision_width, text_width
    sd = {
        "blip.visual_encoder.cls_token": rand(1, 1, V),
        "blip.visual_encoder.pos_embed": rand(1, (image // patch) ** 2 + 1, V),
        "blip.visual_encoder.patch_embed.proj.weight": rand(V, 3, patch, patch, scale=0.05),
        "blip.visual_encoder.patch_embed.proj.bias": rand(V, scale=0.05),
        **norm("blip.visual_encoder.norm", V),
        "blip.text_encoder.embeddings.word_embeddings.weight": rand(vocabulary, T),
        "blip.text_encoder.embeddings.position_embeddings.weight": rand(positions, T),
        "blip.text_encoder.embeddings.position_ids": torch.arange(positions)[None],
        **norm("blip.text_encoder.embeddings.LayerNorm", T),
        **linear("blip.vision_proj", 256, V),
        **linear("blip.text_proj", 256, T),
    }
    for i in range(vision_depth):
        block = f"blip.visual_encoder.blocks.{i}"
        sd.update(norm(f"{block}.norm1", V))
        sd.update(linear(f"{block}.attn.qkv", 3 * V, V))
        sd.update(linear(f"{block}.attn.proj", V, V))
        sd.update(norm(f"{block}.norm2", V))
        sd.update(linear(f"{block}.mlp.fc1", 4 * V, V))
        sd.update(linear(f"{block}.mlp.fc2", V, 4 * V))
    for i in range(text_depth):
        layer = f"blip.text_encoder.encoder.layer.{i}"
        for attention, source_width in (("attention", T), ("crossattention", V)):
            sd.update(linear(f"{layer}.{attention}.self.query", T, T))
            sd.update(linear(f"{layer}.{attention}.self.key", T, source_width))
            sd.update(linear(f"{layer}.{attention}.self.value", T, source_width))
            sd.update(linear(f"{layer}.{attention}.output.dense", T, T))
            sd.update(norm(f"{layer}.{attention}.output.LayerNorm", T))
        sd.update(linear(f"{layer}.intermediate.dense", 4 * T, T))
        sd.update(linear(f"{layer}.output.dense", T, 4 * T))
        sd.update(norm(f"{layer}.output.LayerNorm", T))
    head_shapes = ((1024, T), (128, 1024), (64, 128), (16, 64), (1, 16))
    for index, (out_features, in_features) in zip((0, 2, 4, 6, 7), head_shapes):
        sd.update(linear(f"mlp.layers.{index}", out_features, in_features))
    return sd


def _blip_vit_reference(sd, pixels):
    """BLIP's ViT forward (ImageReward/models/BLIP/vit.py, timm layout) written out on the published tensors."""
    p = lambda key: sd[f"blip.visual_encoder.{key}"]  # noqa: E731
    x = F.conv2d(pixels, p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([p("cls_token").expand(x.shape[0], -1, -1), x], dim=1) + p("pos_embed")
    batch, tokens, width = x.shape
    head_dim = width // VISION_HEADS
    for i in range(VISION_DEPTH):
        b = lambda key: p(f"blocks.{i}.{key}")  # noqa: E731
        h = F.layer_norm(x, (width,), b("norm1.weight"), b("norm1.bias"), eps=1e-6)
        qkv = F.linear(h, b("attn.qkv.weight"), b("attn.qkv.bias"))
        q, k, v = qkv.reshape(batch, tokens, 3, VISION_HEADS, head_dim).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * head_dim**-0.5).softmax(dim=-1)
        h = (attention @ v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + F.linear(h, b("attn.proj.weight"), b("attn.proj.bias"))
        h = F.layer_norm(x, (width,), b("norm2.weight"), b("norm2.bias"), eps=1e-6)
        h = F.gelu(F.linear(h, b("mlp.fc1.weight"), b("mlp.fc1.bias")))
        h = F.linear(h, b("mlp.fc2.weight"), b("mlp.fc2.bias"))
        x = x + h
    return F.layer_norm(x, (width,), p("norm.weight"), p("norm.bias"), eps=1e-6)


def _med_bert_reference(sd, input_ids, attention_mask, image_embeds):
    """BLIP's med.py BERT (bidirectional self-attention, cross-attention to the image) on the published tensors."""
    p = lambda key: sd[f"blip.text_encoder.{key}"]  # noqa: E731
    width = TEXT_WIDTH
    head_dim = width // TEXT_HEADS

    def layer_norm(x, prefix):
        return F.layer_norm(x, (width,), p(f"{prefix}.weight"), p(f"{prefix}.bias"), eps=1e-12)

    def attend(x, source, mask, prefix):
        def heads(t):
            return t.reshape(t.shape[0], t.shape[1], TEXT_HEADS, head_dim).transpose(1, 2)

        q = heads(F.linear(x, p(f"{prefix}.self.query.weight"), p(f"{prefix}.self.query.bias")))
        k = heads(F.linear(source, p(f"{prefix}.self.key.weight"), p(f"{prefix}.self.key.bias")))
        v = heads(F.linear(source, p(f"{prefix}.self.value.weight"), p(f"{prefix}.self.value.bias")))
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + (1.0 - mask[:, None, None, :].float()) * -10000.0
        context = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(x.shape)
        dense = F.linear(context, p(f"{prefix}.output.dense.weight"), p(f"{prefix}.output.dense.bias"))
        return layer_norm(dense + x, f"{prefix}.output.LayerNorm")

    positions = torch.arange(input_ids.shape[1])
    x = F.embedding(input_ids, p("embeddings.word_embeddings.weight"))
    x = layer_norm(x + F.embedding(positions, p("embeddings.position_embeddings.weight")), "embeddings.LayerNorm")
    image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long)
    for i in range(TEXT_DEPTH):
        layer = f"encoder.layer.{i}"
        x = attend(x, x, attention_mask, f"{layer}.attention")
        x = attend(x, image_embeds, image_mask, f"{layer}.crossattention")
        hidden = F.gelu(F.linear(x, p(f"{layer}.intermediate.dense.weight"), p(f"{layer}.intermediate.dense.bias")))
        x = layer_norm(F.linear(hidden, p(f"{layer}.output.dense.weight"), p(f"{layer}.output.dense.bias")) + x,
                       f"{layer}.output.LayerNorm")
    return x


def _imagereward_reference(sd, pixels, input_ids, attention_mask):
    """`ImageReward.score_gard` written out: ViT, BERT with cross-attention, [CLS], linear MLP, normalisation."""
    features = _med_bert_reference(sd, input_ids, attention_mask, _blip_vit_reference(sd, pixels))[:, 0]
    for index in (0, 2, 4, 6, 7):
        features = F.linear(features, sd[f"mlp.layers.{index}.weight"], sd[f"mlp.layers.{index}.bias"])
    return (features[:, 0] - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(state dict, checkpoint path, tokenizer folder)."""
    from transformers import BertTokenizer

    folder = tmp_path_factory.mktemp("imagereward")
    state_dict = _published_state_dict()
    checkpoint = folder / "ImageReward.pt"
    torch.save(state_dict, checkpoint)
    vocab = {word: index for index, word in enumerate(VOCAB)}
    BertTokenizer(vocab=vocab, do_lower_case=True).save_pretrained(str(folder / "tokenizer"))
    return state_dict, str(checkpoint), str(folder / "tokenizer")


def _reward(published, **kwargs):
    _, checkpoint, tokenizer = published
    return get_reward("imagereward", checkpoint=checkpoint, tokenizer=tokenizer, vision_heads=VISION_HEADS,
                      text_heads=TEXT_HEADS, **kwargs)


def test_every_published_tensor_lands_in_the_model(published):
    state_dict = published[0]
    model = build_imagereward_model(state_dict, VISION_HEADS, TEXT_HEADS)
    loaded = model.state_dict()
    mapped = map_imagereward_state_dict(state_dict)
    assert "vision_model.encoder.layers.1.self_attn.projection.weight" in mapped
    assert "text_encoder.encoder.layer.1.crossattention.self.key.weight" in mapped
    for key, value in mapped.items():
        assert torch.equal(loaded[key], value), key
    dropped = {"blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias",
               "blip.text_encoder.embeddings.position_ids"}
    assert len(mapped) == len(state_dict) - len(dropped)
    config = model.vision_model.config
    assert (config.hidden_size, config.num_hidden_layers, config.image_size, config.patch_size) == (32, 2, 32, 8)
    assert model.text_encoder.config.encoder_hidden_size == VISION_WIDTH


def test_published_sizes_build_the_published_architecture():
    """ViT-L/16 at 224 px and BERT-base (vocab 30524, 512 positions) shapes give that model, heads 16 and 12."""
    from diffalign.rewards.imagereward import ImageRewardModel, imagereward_configs

    state_dict = _published_state_dict(vision=(1024, 24, 16, 224), text=(768, 12, 512, 30524), device="meta")
    vision, text = imagereward_configs(state_dict)
    vision_sizes = (vision.hidden_size, vision.num_hidden_layers, vision.intermediate_size, vision.image_size,
                    vision.patch_size, vision.num_attention_heads, vision.layer_norm_eps)
    assert vision_sizes == (1024, 24, 4096, 224, 16, 16, 1e-6)
    text_sizes = (text.hidden_size, text.num_hidden_layers, text.vocab_size, text.max_position_embeddings,
                  text.encoder_hidden_size, text.num_attention_heads, text.layer_norm_eps)
    assert text_sizes == (768, 12, 30524, 512, 1024, 12, 1e-12)
    with torch.device("meta"):
        model = ImageRewardModel(vision, text)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    mapped = map_imagereward_state_dict(state_dict)
    assert set(mapped) == set(shapes)
    assert all(tuple(value.shape) == shapes[key] for key, value in mapped.items())


def test_vision_encoder_matches_blip_vit_on_the_published_tensors(published):
    state_dict = published[0]
    model = build_imagereward_model(state_dict, VISION_HEADS, TEXT_HEADS)
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    ours = model.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(ours, _blip_vit_reference(state_dict, pixels), atol=1e-5, rtol=1e-4)


def test_scores_shape_dtype_and_prompt_dependence(published):
    reward = _reward(published)
    images = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(2))
    scores = reward(images, ["a red cat", "a blue dog on the grass", "a red cat"], None)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert torch.isfinite(scores).all()
    # [CLS] comes first: different prompts only change it if the text self-attention is bidirectional, as in BLIP
    same_image = reward(images[:1].expand(2, -1, -1, -1), ["a red cat", "a photo of the blue dog"], None)
    assert not torch.isclose(same_image[0], same_image[1], atol=1e-4)
    torch.testing.assert_close(same_image[0], scores[0])
    one_at_a_time = _reward(published, batch_size=1)(images, ["a red cat", "a blue dog on the grass", "a red cat"])
    torch.testing.assert_close(one_at_a_time, scores, atol=1e-5, rtol=1e-5)


def test_score_matches_imagereward_written_out_on_the_published_tensors(published):
    """The scorer's number is their `score_gard` (BLIP ViT, med.py BERT, MLP, normalisation) on the same tensors."""
    reward = _reward(published)
    assert normalize_imagereward_score(torch.tensor([IMAGEREWARD_MEAN])).item() == 0.0
    assert math.isclose(normalize_imagereward_score(torch.tensor([IMAGEREWARD_MEAN + IMAGEREWARD_STD])).item(), 1.0,
                        rel_tol=1e-6)
    image = torch.rand(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    tokens = reward.tokenizer(["a red cat"], padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].shape == (1, 35) and tokens["input_ids"][0, 0].item() == VOCAB.index("[CLS]")
    assert len(reward.tokenizer) == len(VOCAB) + 2  # BLIP's [DEC] and [ENC]
    assert reward.tokenizer("a red cat")["input_ids"][:5] == [2] + [VOCAB.index(w) for w in ("a", "red", "cat")] + [3]
    from diffalign.rewards.preprocessing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize

    pixels = normalize(image, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    expected = _imagereward_reference(published[0], pixels, tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(reward(image, ["a red cat"]), expected, atol=1e-5, rtol=1e-4)


def test_bad_or_missing_checkpoints_are_one_line(published, tmp_path, monkeypatch):
    state_dict, _, tokenizer = published
    with pytest.raises(RewardWeightsNotFoundError, match="checkpoint '.*nothing.pt' not found; download it"):
        get_reward("imagereward", checkpoint=str(tmp_path / "nothing.pt"), tokenizer=tokenizer)
    foreign = dict(state_dict, **{"blip.itm_head.weight": torch.zeros(2, TEXT_WIDTH)})
    torch.save(foreign, tmp_path / "foreign.pt")
    with pytest.raises(RewardWeightsNotFoundError, match="not in ImageReward's layout, e.g. 'blip.itm_head.weight'"):
        get_reward("imagereward", checkpoint=str(tmp_path / "foreign.pt"), tokenizer=tokenizer,
                   vision_heads=VISION_HEADS, text_heads=TEXT_HEADS)
    incomplete = {k: v for k, v in state_dict.items() if k != "blip.text_encoder.encoder.layer.0.output.dense.bias"}
    torch.save(incomplete, tmp_path / "incomplete.pt")
    with pytest.raises(RewardWeightsNotFoundError, match="missing 'text_encoder.encoder.layer.0.output.dense.bias'"):
        get_reward("imagereward", checkpoint=str(tmp_path / "incomplete.pt"), tokenizer=tokenizer,
                   vision_heads=VISION_HEADS, text_heads=TEXT_HEADS)
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def not_cached(repo_id, filename, **kwargs):  # the cache-only lookup of an offline machine; no hub is reached
        raise LocalEntryNotFoundError(f"{repo_id}/{filename} is not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_cached)
    with pytest.raises(RewardWeightsNotFoundError) as error:
        get_reward("imagereward", tokenizer=tokenizer, vision_heads=VISION_HEADS, text_heads=TEXT_HEADS)
    message = str(error.value)
    assert "\n" not in message and "THUDM/ImageReward/ImageReward.pt" in message and "hf download" in message
