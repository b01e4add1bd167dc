"""TokenFormer as transformers `PreTrainedModel`s: `TokenFormerModel` (the base model: hidden states),
`TokenFormerForCausalLM` (logits, loss, `generate`) and `TokenFormerForSequenceClassification` (a
`score` head on the last real token).

All three are built from the very modules of the native `TokenFormer` and run its forward pass
(`LanguageModelCore`), so their parameter names are the native ones (`word_embeddings.weight`,
`layers.0.attention.query.key_param_tokens`, ...): one `model.safetensors` loads into any of them
and into the native model, nothing converted (the classifier adds `score.weight`).

`config.vocab_size` is the number of tokens and the width of the logits, as transformers' generic
code expects (`resize_token_embeddings`, `compute_transition_scores`, watermarking). The embedding
keeps `padded_vocab_size` rows, the official layout; the rows past `vocab_size` are no tokens, so
they are never scored nor generated.

The cache reaches the model under the name the installed transformers uses (`cache` in newer
releases, `past_key_values` before); anything else transformers may hand over that the model
cannot use is refused by name, never ignored. Attention always runs in
`torch.nn.functional.scaled_dot_product_attention` ("sdpa"): another `attn_implementation` and
`output_attentions=True` are refused.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (BaseModelOutputWithPast, CausalLMOutputWithPast,
                                           SequenceClassifierOutputWithPast)

from tokenformer.errors import TokenFormerError
from tokenformer.evaluation.scoring import next_token_loss
from tokenformer.hf.config import TokenFormerConfig
from tokenformer.models.lm import Block, LanguageModelCore
from tokenformer.models.pattention import Pattention

# The name of the cache in the model outputs (and in what `generate` hands the forward pass): `cache`
# in newer transformers releases, `past_key_values` before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class TokenFormerBlock(GradientCheckpointingLayer, Block):
    """A `Block` that transformers' activation checkpointing reaches: `gradient_checkpointing_enable`
    (or `activation_checkpointing_enable`) with `every_n_layers=n` checkpoints blocks 0, n, 2n, ..."""


class TokenFormerPreTrainedModel(LanguageModelCore, PreTrainedModel):
    """What the three models share: the modules, the initialisation, the embedding, the cache, and
    the forward pass up to the final norm (`hidden_states`)."""

    config_class = TokenFormerConfig
    config: TokenFormerConfig
    # No module is named so: the models share one flat set of parameter names, so that a checkpoint
    # of any of them loads into every other with nothing to add or strip.
    base_model_prefix = "tokenformer"
    block_class = TokenFormerBlock
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["TokenFormerBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]

    def __init__(self, config: TokenFormerConfig) -> None:
        super().__init__(config)
        self.build_modules(config)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The official initialisation (the native model's): transformers calls this for weights that
        # no checkpoint provides; its guarded `torch.nn.init` leaves loaded tensors alone.
        if isinstance(module, Pattention):
            module.reset_parameters()
        elif isinstance(module, (nn.Embedding, nn.Linear)):
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

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """transformers asks this for every `attn_implementation` (at loading, in `set_attn_implementation`)."""
        if requested_attention not in (None, "sdpa"):
            raise TokenFormerError(
                f'attn_implementation="{requested_attention}" is not supported: TokenFormer attention always runs '
                f'in scaled_dot_product_attention, so leave attn_implementation out or give "sdpa"')
        return "sdpa"

    def checkpointed(self, block: nn.Module, *args) -> torch.Tensor:
        # Each `TokenFormerBlock` checkpoints itself when transformers has marked it (`every_n_layers`).
        return block(*args)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """`new_num_tokens` tokens (default: as many as now) in an embedding of that many rows, or of the
        next multiple of `pad_to_multiple_of`. `config.vocab_size` becomes `new_num_tokens` (the tokens,
        the logits' width) and `make_vocab_size_divisible_by` the multiple (1 without one), so that the
        saved config.json states the embedding's rows to transformers and to this package's loader
        alike. Every token can be generated: the token ids the generation config suppressed because
        they were padding rows are suppressed no longer."""
        if new_num_tokens is None and pad_to_multiple_of is None:
            return self.get_input_embeddings()
        tokens = self.config.vocab_size if new_num_tokens is None else new_num_tokens
        multiple = pad_to_multiple_of or 1
        rows = -(-tokens // multiple) * multiple
        old_tokens = self.config.vocab_size
        # transformers checks pad_to_multiple_of (an int), then sets vocab_size to the rows
        embeddings = super().resize_token_embeddings(rows, pad_to_multiple_of, mean_resizing)
        self.config.vocab_size, self.config.make_vocab_size_divisible_by = tokens, multiple
        self.vocab_size = tokens
        suppressed = self.generation_config.suppress_tokens if hasattr(self, "generation_config") else None
        if suppressed:
            self.generation_config.suppress_tokens = [t for t in suppressed if t < old_tokens] or None
        return embeddings

    # ---- the forward pass up to the final norm ---------------------------------------------------

    def final_hidden(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                     attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                     past_key_values: Cache | None, cache: Cache | None, use_cache: bool | None,
                     output_hidden_states: bool | None, output_attentions: bool | None, extra: dict[str, Any]
                     ) -> tuple[torch.Tensor, Cache | None, tuple[torch.Tensor, ...] | None]:
        """The final-normed hidden states (B, T, h), the cache (read and extended), and with
        `output_hidden_states` the input of every block and the final-normed output.

        `attention_mask` (B, past + T): 1 for tokens, 0 for padding (left or right); the rotary
        positions then count from each row's first token unless `position_ids` (B, T) are given.
        The cache comes as `cache` (newer transformers) or `past_key_values` (earlier). `extra`: the
        forward's other keyword arguments: `cache_position` is checked against the cache; any other is
        refused by name.
        """
        if output_attentions:
            raise TokenFormerError("output_attentions is not supported: TokenFormer attention runs in "
                                   "scaled_dot_product_attention, which returns no attention weights")
        if (input_ids is None) == (inputs_embeds is None):
            raise TokenFormerError("give exactly one of input_ids and inputs_embeds")
        cache = self.resolve_cache(past_key_values, cache, use_cache)
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, h)
        start = 0 if cache is None else cache.get_seq_length()
        check_cache_position(extra.pop("cache_position", None), start, x.shape[1])
        unused = sorted(name for name, value in extra.items() if value is not None)
        if unused:
            raise TokenFormerError(f"TokenFormer's forward pass does not use {', '.join(unused)}: leave "
                                   f"{'it' if len(unused) == 1 else 'them'} out")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden = [] if output_hidden_states else None
        x = self.final_norm(self.run_layers(x, start, cache, attention_mask, position_ids, hidden))
        if hidden is not None:
            hidden.append(x)
        return x, cache, None if hidden is None else tuple(hidden)

    def resolve_cache(self, past_key_values: Cache | None, cache: Cache | None, use_cache: bool | None) -> Cache | None:
        """The cache this forward pass reads and extends: the one given (under either name), else a new
        `DynamicCache` when caching, never while training with activation checkpointing."""
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise TokenFormerError("two caches were given, as cache and as past_key_values: give one")
        if past_key_values is not None and CACHE_FIELD == "cache":  # transformers' own deprecation, as its models
            warnings.warn("`past_key_values` is deprecated in this transformers release: pass the cache as `cache`",
                          FutureWarning, stacklevel=4)
        cache = past_key_values if cache is None else cache
        if cache is not None and not isinstance(cache, Cache):
            raise TokenFormerError(
                f"the cache must be a transformers Cache (such as DynamicCache), got {type(cache).__name__}: "
                f"the legacy tuple format is not supported")
        if cache is not None and (cache.is_compileable or any(getattr(cache, "is_sliding", ()))):
            raise TokenFormerError(
                f"{type(cache).__name__} is not supported: TokenFormer decodes with a cache that keeps every "
                f"position and grows (DynamicCache, the default of generate)")
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and cache is not None:
            raise TokenFormerError("a cache cannot be used while training with activation checkpointing (the "
                                   "recomputation would extend it twice): call model.eval() or leave the cache out")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache and not checkpointing:
            cache = DynamicCache(config=self.config)
        return cache


def check_cache_position(cache_position: torch.Tensor | None, start: int, length: int) -> None:
    """TokenFormer places the new positions right after the cached ones: a `cache_position` that says
    otherwise cannot be honoured."""
    if cache_position is None:
        return
    ends = (start, start + length - 1)
    if cache_position.shape != (length,) or (int(cache_position[0]), int(cache_position[-1])) != ends:
        raise TokenFormerError(
            f"cache_position {cache_position.tolist()} does not follow the {start} cached positions: TokenFormer "
            f"writes the {length} new positions right after them")


def model_output(output_class: type, return_dict: bool | None, config: TokenFormerConfig,
                 cache: Cache | None, **fields: Any):
    """`output_class` holding `fields` and the cache (under the installed transformers' name), or its
    tuple when `return_dict` (default: the config's) is false."""
    output = output_class(**fields, **{CACHE_FIELD: cache})
    return output if (config.return_dict if return_dict is None else return_dict) else output.to_tuple()


class TokenFormerModel(TokenFormerPreTrainedModel):
    """The base model: final-normed hidden states (B, T, hidden_size), what `AutoModel` and the
    feature-extraction pipeline give."""

    def __init__(self, config: TokenFormerConfig) -> None:
        super().__init__(config)
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                return_dict: bool | None = None, cache: Cache | None = None,
                **kwargs: Any) -> BaseModelOutputWithPast | tuple:
        """`last_hidden_state` (B, T, hidden_size) of `input_ids` (B, T) (or `inputs_embeds` (B, T, h));
        the arguments as in `TokenFormerForCausalLM.forward`."""
        x, cache, hidden = self.final_hidden(input_ids, inputs_embeds, attention_mask, position_ids, past_key_values,
                                             cache, use_cache, output_hidden_states, output_attentions, kwargs)
        return model_output(BaseModelOutputWithPast, return_dict, self.config, cache, last_hidden_state=x,
                            hidden_states=hidden)


class TokenFormerForCausalLM(TokenFormerPreTrainedModel, GenerationMixin):
    """A TokenFormer language model for transformers: logits over the `vocab_size` tokens."""

    def __init__(self, config: TokenFormerConfig) -> None:
        super().__init__(config)
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                return_dict: bool | None = None, cache: Cache | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast | tuple:
        """Logits (B, T, vocab_size) of `input_ids` (B, T) (or `inputs_embeds` (B, T, h)).

        `attention_mask` (B, past + T): 1 for tokens, 0 for padding (left or right); the rotary
        positions then count from each row's first token unless `position_ids` (B, T) are given.
        The cache (`cache`, or `past_key_values`): a transformers `Cache` (a `DynamicCache` is made when
        `use_cache`). `labels` (B, T): the loss is the mean next-token cross-entropy, -100 not scored
        (`num_items_in_batch`, from `Trainer`, divides the sum instead). `shift_labels` (B, T), the
        targets already shifted (position t predicts shift_labels[t]: what transformers' Trainer gives
        under context parallelism), take the place of `labels`. `logits_to_keep`: an int keeps the last
        n positions (0: all), a 1-D tensor the positions it lists.
        """
        num_items = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        x, cache, hidden = self.final_hidden(input_ids, inputs_embeds, attention_mask, position_ids, past_key_values,
                                             cache, use_cache, output_hidden_states, output_attentions, kwargs)
        scored = labels is not None or shift_labels is not None
        kept = x if scored else keep_positions(x, logits_to_keep)
        logits = kept @ self.word_embeddings.weight[:self.config.vocab_size].T  # (B, T_kept, vocab_size)
        loss = None
        if shift_labels is not None:
            loss = next_token_loss(logits, shift_labels.to(logits.device), num_items=num_items)
        elif labels is not None:
            loss = next_token_loss(logits[:, :-1], labels[:, 1:].to(logits.device), num_items=num_items)
        return model_output(CausalLMOutputWithPast, return_dict, self.config, cache, loss=loss, logits=logits,
                            hidden_states=hidden)


class TokenFormerForSequenceClassification(TokenFormerPreTrainedModel):
    """`config.num_labels` scores from the final hidden state of each row's last token (the last
    position the attention mask marks 1; the last position without a mask), through `score`, a
    linear map without bias. The loss follows `config.problem_type`, as transformers' classifiers."""

    accepts_loss_kwargs = False  # the loss is a mean over rows: Trainer averages accumulated batches

    def __init__(self, config: TokenFormerConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None,
                cache: Cache | None = None, **kwargs: Any) -> SequenceClassifierOutputWithPast | tuple:
        """Scores (B, num_labels); `labels` (B,) class ids, or (B, num_labels) for regression and
        multi-label problems. No cache unless `use_cache=True`."""
        x, cache, hidden = self.final_hidden(input_ids, inputs_embeds, attention_mask, position_ids, past_key_values,
                                             cache, bool(use_cache), output_hidden_states, output_attentions, kwargs)
        T = x.shape[1]
        if attention_mask is None:
            last = torch.full((x.shape[0],), T - 1, device=x.device)
        else:  # the largest index whose mask is 1 (left or right padding alike)
            last = (torch.arange(T, device=x.device) * attention_mask[:, -T:].to(x.device)).argmax(dim=-1)
        logits = self.score(x[torch.arange(x.shape[0], device=x.device), last])  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels.to(logits.device), pooled_logits=logits, config=self.config)
        return model_output(SequenceClassifierOutputWithPast, return_dict, self.config, cache, loss=loss,
                            logits=logits, hidden_states=hidden)


def keep_positions(x: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions of x (B, T, h) whose logits are wanted (transformers' `logits_to_keep`)."""
    if isinstance(logits_to_keep, int):
        return x if logits_to_keep == 0 else x[:, -logits_to_keep:]
    return x[:, logits_to_keep]
