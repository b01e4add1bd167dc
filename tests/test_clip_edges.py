"""The CLIP model: the presets' tower fields (open_clip's ViT-B/16 numbers), every parameter in the
dtype and on the device asked for, and a text of one token (its end-of-text token alone)."""

import torch

from tokenformer.models.clip import CLIPConfig, CLIPTokenFormer


def test_the_b16_preset_has_open_clips_tower_fields():
    c = CLIPConfig.from_name("B/16")
    v, t = c.vision, c.text
    assert (v.hidden_size, v.num_layers, v.image_size, v.patch_size) == (768, 12, 224, 16)
    assert (t.hidden_size, t.num_layers, t.num_attention_heads, t.seq_length, t.vocab_size) == (512, 12, 8, 77, 49408)
    assert (t.qkv_slot_num, t.proj_slot_num, t.ffn_slot_num) == (512, 512, 2048) and c.embed_dim == 512


def test_every_parameter_follows_the_dtype_and_device_asked_for():
    config = CLIPConfig.from_name("tiny")
    assert {p.dtype for p in CLIPTokenFormer(config, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}
    assert {p.device.type for p in CLIPTokenFormer(config, device="meta").parameters()} == {"meta"}


def test_a_text_of_one_token_is_encoded():
    model = CLIPTokenFormer(CLIPConfig.from_name("tiny")).eval()
    ids = torch.tensor([[256, 0, 0], [104, 105, 256]])  # "" and "hi", each ended by end-of-text
    features = model.text(ids, torch.tensor([1, 3]))
    alone = model.text(torch.tensor([[256]]), torch.tensor([1]))  # the same text without padding
    torch.testing.assert_close(features[:1], alone)


def test_clip_config_sentences_and_the_logit_scale_bound():
    import math

    import pytest

    from tokenformer import TokenFormerError

    cases = [(dict(embed_dim=0), "CLIP config field embed_dim must be at least 1, got 0"),
             (dict(vision=3), "a CLIP config needs `vision` (VisionConfig fields) and `text` (language model Config "
                              "fields): give both as mappings"),
             (dict(init_logit_scale=math.log(100.0) + 0.01), f"init_logit_scale {math.log(100.0) + 0.01} must lie in "
              "[0, log(max_logit_scale 100.0)]: the training clamps the scale to that range")]
    for changes, sentence in cases:
        with pytest.raises(TokenFormerError) as error:
            CLIPConfig.from_name("tiny", **changes)
        assert str(error.value) == sentence
    assert CLIPConfig.from_name("tiny", init_logit_scale=math.log(100.0)).init_logit_scale == math.log(100.0)  # the bound
