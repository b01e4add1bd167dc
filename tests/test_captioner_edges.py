"""The captioner's room for a caption: the smallest text context that fits the image prefix and a
caption, the sentence for one that does not, and a KV cache sized to the prefix and the caption."""

import pytest

from tokenformer import TokenFormerError
from tokenformer.models.captioner import Captioner, CaptionerConfig


def test_the_text_context_must_hold_the_prefix_and_two_caption_positions():
    prefix = CaptionerConfig.resolve({"name": "tiny"}).prefix_length
    fits = CaptionerConfig.resolve({"name": "tiny", "text": {"seq_length": prefix + 2}})
    assert fits.text.seq_length == prefix + 2
    with pytest.raises(TokenFormerError) as error:
        CaptionerConfig.resolve({"name": "tiny", "text": {"seq_length": prefix + 1}})
    assert str(error.value) == (f"the language model's seq_length {prefix + 1} leaves no room for a caption after "
                                f"{prefix} image tokens: raise text seq_length (or the vision patch_size)")


def test_the_cache_holds_the_image_prefix_and_the_caption():
    model = Captioner(CaptionerConfig.resolve({"name": "tiny"}))
    cache = model.allocate_cache(2, 5)
    assert cache.max_length == model.config.prefix_length + 5 < model.config.text.seq_length
