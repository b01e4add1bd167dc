"""`TokenFormerForCausalLM`: a TokenFormer language model as a transformers `PreTrainedModel`.

It is built from the very modules of the native `TokenFormer` and runs the same forward pass
(`LanguageModelCore`), so its parameter names are the native ones (`word_embeddings.weight`,
`layers.0.attention.query.key_param_tokens`, ...): one `model.safetensors` loads into either, nothing
converted, and both give the same logits. What it adds is transformers' interface: `generate`,
the Cache API (`DynamicCache`), `labels`, `logits_to_keep`, gradient checkpointing, `pipeline`,
`Trainer`, PEFT.

Attention always runs in `torch.nn.functional.scaled_dot_product_attention` ("sdpa"), which
returns no attention weights: `output_attentions=True` is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from tokenformer.errors import TokenFormerError
from tokenformer.evaluation.scoring import next_token_loss
from tokenformer.hf.config import TokenFormerConfig
from tokenformer.models.lm import LanguageModelCore
from tokenformer.models.pattention import Pattention


class TokenFormerForCausalLM(LanguageModelCore, PreTrainedModel, GenerationMixin):
    """A TokenFormer language model for transformers; logits over the padded vocabulary, as the
    native model's (the padding rows are never generated: `generation_config.suppress_tokens`)."""

    config_class = TokenFormerConfig
    config: TokenFormerConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["Block"]
    _skip_keys_device_placement = ["past_key_values"]

    def __init__(self, config: TokenFormerConfig) -> None:
        super().__init__(config)
        self.build_modules(config)
        self.post_init()
        padding_rows = list(range(config.vocab_size, config.padded_vocab_size))
        if padding_rows and self.generation_config.suppress_tokens is None:
            self.generation_config.suppress_tokens = padding_rows

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The official initialisation (the native model's): transformers calls this for weights that
        # no checkpoint provides; its guarded `torch.nn.init` leaves loaded tensors alone.
        if isinstance(module, Pattention):
            module.reset_parameters()
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_method_std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def get_output_embeddings(self) -> None:
        return None  # the logits are `hidden @ word_embeddings.weight.T`: there is no separate head

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoModel") -> None:
        """Nothing to do (see `TokenFormerConfig.register_for_auto_class`)."""

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                return_dict: bool | None = None, **kwargs: Any) -> CausalLMOutputWithPast | tuple:
        """Logits (B, T, padded_vocab_size) of `input_ids` (B, T) (or `inputs_embeds` (B, T, h)).

        `attention_mask` (B, past + T): 1 for tokens, 0 for padding (left or right); the rotary
        positions then count from each row's first token unless `position_ids` (B, T) are given.
        `past_key_values`: a transformers `Cache` (a `DynamicCache` is made when `use_cache`).
        `labels` (B, T): the loss is the mean next-token cross-entropy over the real vocabulary (the
        padding rows of the embedding are no tokens), -100 not scored. `logits_to_keep`: an int keeps
        the last n positions (0: all), a 1-D tensor the positions it lists.
        """
        if output_attentions:
            raise TokenFormerError("output_attentions is not supported: TokenFormer attention runs in "
                                   "scaled_dot_product_attention, which returns no attention weights")
        if (input_ids is None) == (inputs_embeds is None):
            raise TokenFormerError("give exactly one of input_ids and inputs_embeds")
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, h)
        cache = self._cache(past_key_values, use_cache)
        start = 0 if cache is None else cache.get_seq_length()
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        hidden = [] if output_hidden_states else None
        x = self.run_layers(x, start, cache, attention_mask, position_ids, hidden)
        if hidden is not None or labels is not None:
            x = self.final_norm(x)  # every position: the hidden states and the loss need them
            if hidden is not None:
                hidden.append(x)
            kept = x if labels is not None else keep_positions(x, logits_to_keep)
        else:
            kept = self.final_norm(keep_positions(x, logits_to_keep))  # the norm is per position
        logits = kept @ self.word_embeddings.weight.T  # (B, T_kept, padded_vocab_size)
        loss = None
        if labels is not None:
            loss = next_token_loss(logits[:, :-1], labels[:, 1:].to(logits.device), self.config.vocab_size,
                                   kwargs.get("num_items_in_batch"))
        output = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache,
                                        hidden_states=None if hidden is None else tuple(hidden))
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    def _cache(self, past_key_values: Cache | None, use_cache: bool | None) -> Cache | None:
        """The cache this forward pass reads and extends: the one given, else a new `DynamicCache`
        when caching (never while training with activation checkpointing)."""
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise TokenFormerError(
                f"past_key_values must be a transformers Cache (such as DynamicCache), got "
                f"{type(past_key_values).__name__}: the legacy tuple format is not supported")
        if past_key_values is not None and past_key_values.is_compileable:
            raise TokenFormerError(
                f"{type(past_key_values).__name__} is not supported: TokenFormer decodes with a cache that "
                f"grows (DynamicCache, the default of generate)")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if past_key_values is None and use_cache:
            past_key_values = DynamicCache(config=self.config)
        return past_key_values


def keep_positions(x: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions of x (B, T, h) whose logits are wanted (transformers' `logits_to_keep`)."""
    if isinstance(logits_to_keep, int):
        return x if logits_to_keep == 0 else x[:, -logits_to_keep:]
    return x[:, logits_to_keep]
