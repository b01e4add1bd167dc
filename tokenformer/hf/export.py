"""A native `TokenFormer` as a transformers model (`to_hf`, sharing its tensors) and as a transformers
model directory (`save_hf_directory`, what `tokenformer convert SRC OUT --format hf` writes):

    config.json              every model field, the token ids, `architectures`, `auto_map`
    modeling_tokenformer.py  what `auto_map` names: it imports tokenformer.hf (trust_remote_code)
    model.safetensors        the native tensors under the native names
    generation_config.json   the token ids; the padding rows of the vocabulary suppressed
    tokenizer.json, tokenizer_config.json   the model's tokenizer, `<|endoftext|>` its special tokens

This package's own loader reads the same directory (`TokenFormer.from_pretrained`, `load_model`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from tokenformer.data.tokenizer import END_OF_TEXT, Tokenizer, check_vocab_fits
from tokenformer.hf.config import TokenFormerConfig
from tokenformer.hf.modeling import TokenFormerForCausalLM
from tokenformer.models.lm import TokenFormer


def to_hf(model: TokenFormer, eos_token_id: int = 0) -> TokenFormerForCausalLM:
    """`model` as a `TokenFormerForCausalLM` holding the same tensors (no copy: training one trains
    the other). `eos_token_id` is also the begin and padding token, as `<|endoftext|>` is in
    GPT-NeoX-20B (0) and the byte tokenizer (256)."""
    config = TokenFormerConfig.from_native(model.config, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
                                           pad_token_id=eos_token_id)
    config.dtype = model.word_embeddings.weight.dtype
    with torch.device("meta"):
        hf_model = TokenFormerForCausalLM(config)
    hf_model.load_state_dict(model.state_dict(), assign=True)
    return hf_model.train(model.training)


def hf_tokenizer(tokenizer: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    """`tokenizer` for transformers: `<|endoftext|>` begins, ends and pads (left, for generation)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT, padding_side="left", model_max_length=max_length,
        clean_up_tokenization_spaces=False)


def save_hf_directory(model: TokenFormer, directory: str | Path, tokenizer: Tokenizer,
                      dtype: torch.dtype | None = None) -> Path:
    """Write the transformers model directory of `model` with its `tokenizer` (see the module doc);
    `dtype` casts the written tensors (default: as they are)."""
    check_vocab_fits(tokenizer.vocab_size, model.config.padded_vocab_size, fix="is it the model's tokenizer?")
    hf_model = to_hf(model, eos_token_id=tokenizer.eos_id)
    if dtype is not None:
        hf_model = hf_model.to(dtype)
    directory = Path(directory)
    hf_model.save_pretrained(directory)
    hf_tokenizer(tokenizer, model.config.seq_length).save_pretrained(directory)
    return directory
