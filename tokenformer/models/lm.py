"""The TokenFormer language model, GPT-NeoX shaped, computing what the official code computes.

    a   = x + proj(MHA(rope(q(n(x))), rope(k(n(x))), v(n(x))))
    out = a + ffn(n(a))

`n` is a LayerNorm without weight or bias; q, k, v, proj and ffn are Pattentions; the output
head is the tied embedding. Module names mirror the official ones so that the checkpoint weight
map (see `tokenformer.models.official`) is a renaming of prefixes only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from tokenformer.errors import TokenFormerError
from tokenformer.models.config import Config
from tokenformer.models.pattention import Pattention
from tokenformer.models.pretrained import PretrainedModel


# ---- rotary position embedding (GPT-NeoX style: rotate_half, first rotary_dim dims) ----------

def rotary_cos_sin(positions: torch.Tensor, rotary_dim: int, base: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T, rotary_dim) for integer `positions` (T,), computed in float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=positions.device,
                                            dtype=torch.float32) / rotary_dim))
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, rotary_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, rotary_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` dims of every head of x (B, H, T, D); the rest passes."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1)


# ---- KV cache and attention masks -------------------------------------------------------------

@dataclass
class KVCache:
    """Keys and values of the positions seen so far, preallocated for `max_length` positions.

    `update` has the signature of transformers' `Cache.update`, so `Attention` takes either.
    """

    keys: list[torch.Tensor]    # per layer (B, H, max_length, D)
    values: list[torch.Tensor]  # per layer (B, H, max_length, D)
    length: int = 0

    @classmethod
    def allocate(cls, config: Config, batch_size: int, max_length: int,
                 device: torch.device | str, dtype: torch.dtype, head_shards: int = 1) -> "KVCache":
        """`head_shards`: token parallelism's ranks, each of which caches its own heads only."""
        shape = (batch_size, config.num_attention_heads // head_shards, max_length, config.head_dim)
        return cls([torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_layers)],
                   [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_layers)])

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values (B, H, T, D) of `layer` after the `length` cached ones; returns
        all of them, (B, H, length + T, D). `length` itself advances once every layer has been stored."""
        start, T = self.length, k.shape[2]
        self.keys[layer][:, :, start:start + T] = k
        self.values[layer][:, :, start:start + T] = v
        return self.keys[layer][:, :, :start + T], self.values[layer][:, :, :start + T]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions (B, S) for a padding mask (B, S), 1 = token, 0 = padding: every row counts its
    own tokens from 0, so a left-padded prompt is rotated as it would be alone (padding gets 0)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def attention_pattern(attention_mask: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Which keys each new query may read, (B, 1, T, S) bool, for a padding mask (B, S) over the `start`
    cached positions and the `length` new ones: the causal keys that are not padding.

    A padding query also reads itself: under left padding all its earlier keys are padding, and a
    softmax over no key at all is NaN. No real query reads a padding key, so nothing else changes.
    """
    if attention_mask.dim() != 2 or attention_mask.shape[1] != start + length:
        raise TokenFormerError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the model sees {start} cached and {length} "
            f"new positions: give a (batch, {start + length}) mask of 1 for tokens and 0 for padding")
    device = attention_mask.device
    query = torch.arange(start, start + length, device=device)[:, None]  # (T, 1)
    key = torch.arange(start + length, device=device)[None, :]           # (1, S)
    real = attention_mask.bool()[:, None, None, :]                       # (B, 1, 1, S)
    return (key <= query) & (real | (key == query))                      # (B, 1, T, S)


# ---- blocks -----------------------------------------------------------------------------------

def layer_norm_nonparametric(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], None, None, eps)


class Attention(nn.Module):
    """Multi-head self-attention whose four projections are Pattentions.

    Causal for the language model; `causal=False` lets every position see every other (the vision
    model). `config` needs only the shape fields (`hidden_size`, slot and scale counts, ...), so the
    vision model's config serves as well.
    """

    def __init__(self, config: Config, device=None, dtype=None, causal: bool = True) -> None:
        super().__init__()
        self.causal = causal
        h = config.hidden_size
        key_std = config.init_method_std
        value_std = 2.0 / config.num_layers / math.sqrt(h)  # "wang_init"
        common = dict(norm_activation_type=config.norm_activation_type, key_std=key_std,
                      value_std=value_std, memory_lean=config.pattention_memory_lean,
                      device=device, dtype=dtype)
        self.query = Pattention(h, h, config.qkv_slot_num, scale_num=config.qkv_scale_num, **common)
        self.key = Pattention(h, h, config.qkv_slot_num, scale_num=config.qkv_scale_num, **common)
        self.value = Pattention(h, h, config.qkv_slot_num, scale_num=config.qkv_scale_num, **common)
        self.proj = Pattention(h, h, config.proj_slot_num, scale_num=config.proj_scale_num, **common)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                cache=None, layer: int = 0, pattern: torch.Tensor | None = None) -> torch.Tensor:
        """`cos`/`sin` None: no rotary (the vision model has learned position embeddings).

        `cache`: a `KVCache` or a transformers `Cache` (both `update(k, v, layer)`). `pattern`: the
        (B, 1, T, S) boolean keys each query may read (`attention_pattern`); without it, attention is
        causal over everything (or bidirectional, for `causal=False`).
        """
        B, T, _ = x.shape
        D = self.head_dim  # H below: this rank's heads (all of them, or H/P under token parallelism)
        q = self.query(x).view(B, T, -1, D).transpose(1, 2)  # (B, H, T, D)
        k = self.key(x).view(B, T, -1, D).transpose(1, 2)    # (B, H, T, D)
        v = self.value(x).view(B, T, -1, D).transpose(1, 2)  # (B, H, T, D)
        if cos is not None:
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)

        if cache is not None and not self.causal:
            raise TokenFormerError("a KV cache is for causal decoding; bidirectional attention takes no cache")
        if cache is not None:
            k, v = cache.update(k, v, layer)  # (B, H, start+T, D) each
        start = k.shape[2] - T
        if pattern is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=pattern)
        elif cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        elif T == 1:  # one new position attends to everything cached: no mask needed
            y = F.scaled_dot_product_attention(q, k, v)
        elif start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # a chunk after a prefix: query i sees keys 0..start+i
            q_pos = torch.arange(start, start + T, device=x.device)[:, None]
            k_pos = torch.arange(start + T, device=x.device)[None, :]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos <= q_pos)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H * D)
        return self.proj(y)


class Block(nn.Module):
    """Pre-LN sequential residual block: attention, then a single-Pattention feed-forward."""

    def __init__(self, config: Config, device=None, dtype=None, causal: bool = True) -> None:
        super().__init__()
        self.eps = config.layernorm_epsilon
        self.attention = Attention(config, device=device, dtype=dtype, causal=causal)
        self.mlp = Pattention(
            config.hidden_size, config.hidden_size, config.ffn_slot_num,
            norm_activation_type=config.norm_activation_type, scale_num=config.ffn_scale_num,
            key_std=config.init_method_std,
            value_std=2.0 / config.num_layers / math.sqrt(config.hidden_size),
            memory_lean=config.pattention_memory_lean, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                cache=None, layer: int = 0, pattern: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(layer_norm_nonparametric(x, self.eps), cos, sin, cache, layer, pattern)
        return x + self.mlp(layer_norm_nonparametric(x, self.eps))


class LanguageModelCore:
    """The modules of the language model and its forward pass up to the final norm, shared by
    `TokenFormer` and `tokenformer.hf.TokenFormerForCausalLM`: one code path over the same module
    names, so that one `model.safetensors` loads into either and both compute the same numbers.

    A mixin for an `nn.Module` whose `config` has the fields of `Config` and its derived
    properties (`padded_vocab_size`, `head_dim`, `rotary_dim`): a `Config`, or the transformers one.
    """

    config: Config
    block_class: type[nn.Module] = Block  # transformers' model uses a subclass its checkpointing reaches

    def build_modules(self, config: Config, device=None, dtype=None) -> None:
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size,
                                            device=device, dtype=dtype)
        if self.word_embeddings.weight.device.type != "meta":
            nn.init.normal_(self.word_embeddings.weight, mean=0.0, std=config.init_method_std)
        self.layers = nn.ModuleList(self.block_class(config, device=device, dtype=dtype)
                                    for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon,
                                       device=device, dtype=dtype)
        self.gradient_checkpointing = False
        self._rotary: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (device, dtype) -> cos, sin

    def run_layers(self, x: torch.Tensor, start: int = 0, cache=None,
                   attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                   hidden_states: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The blocks over input embeddings `x` (B, T, h) of the positions after the `start` cached ones;
        returns (B, T, h) before the final norm.

        `attention_mask` (B, start + T), 1 = token, 0 = padding, masks padding keys and gives the rotary
        positions (each row counted from its first token) unless `position_ids` (B, T) are given.
        Without either, positions are start..start+T-1 and attention is plainly causal: the numbers
        of the official model. `hidden_states` collects the input of every block.
        """
        T = x.shape[1]
        if position_ids is None and attention_mask is not None:
            position_ids = positions_from_mask(attention_mask)[:, start:start + T]  # (B, T)
        cos, sin = self.rotary_tables(start, T, x.device, x.dtype, position_ids)
        pattern = None if attention_mask is None else attention_pattern(attention_mask, start, T)
        checkpointing = self.gradient_checkpointing and self.training and cache is None
        for i, block in enumerate(self.layers):
            if hidden_states is not None:
                hidden_states.append(x)
            if checkpointing:
                x = self.checkpointed(block, x, cos, sin, None, i, pattern)
            else:
                x = block(x, cos, sin, cache, i, pattern)
        return x

    def checkpointed(self, block: nn.Module, *args) -> torch.Tensor:
        """`block(*args)` with activation checkpointing: transformers' function when it has set one
        (`gradient_checkpointing_enable`), else torch's non-reentrant checkpoint."""
        function = getattr(self, "_gradient_checkpointing_func", None)
        if function is None:
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return function(block.__call__, *args)

    def rotary_tables(self, start: int, length: int, device: torch.device, dtype: torch.dtype,
                      position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (length, rotary_dim) of positions start..start+length-1; with `position_ids` (B, T),
        cos, sin (B, 1, T, rotary_dim) of those positions.

        Kept per device and dtype (the values `rotary_cos_sin` gives), so that a decoding step
        does not recompute its tables: a dozen small ops per generated token.
        """
        table = self._rotary.get((device, dtype))
        if table is None or table[0].shape[0] < start + length:
            positions = torch.arange(max(start + length, self.config.seq_length), device=device)
            table = rotary_cos_sin(positions, self.config.rotary_dim, self.config.rotary_emb_base, dtype)
            self._rotary[(device, dtype)] = table
        if position_ids is not None:
            return table[0][position_ids][:, None], table[1][position_ids][:, None]  # (B, 1, T, rotary_dim)
        return table[0][start:start + length], table[1][start:start + length]


class TokenFormer(LanguageModelCore, PretrainedModel):
    """The TokenFormer language model: `model(idx)` returns logits (B, T, padded_vocab_size)."""

    model_type = "tokenformer"
    config_class = Config
    written_by = "save_pretrained or `tokenformer convert`"

    def __init__(self, config: Config, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.build_modules(config, device=device, dtype=dtype)

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, padded_vocab_size) for token ids `idx` (B, T).

        With a `cache`, `idx` holds the positions after `cache.length`; the cache is advanced.
        `last_only=True` returns the logits of the last position only, (B, 1, padded_vocab_size):
        what generation needs after a prompt, without paying the vocabulary head for every position.
        `attention_mask` (B, cache.length + T) marks padding with 0 (left padding for batched
        generation); `position_ids` (B, T) override the rotary positions (see `run_layers`).
        """
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if cache is not None and start + T > cache.max_length:
            raise TokenFormerError(
                f"KV cache holds {cache.max_length} positions but {start + T} are needed: "
                f"allocate a longer cache")
        x = self.run_layers(self.word_embeddings(idx), start, cache, attention_mask, position_ids)  # (B, T, h)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]  # (B, 1, h)
        x = self.final_norm(x)
        logits = x @ self.word_embeddings.weight.T  # (B, T, padded_vocab_size)
        if cache is not None and isinstance(logits, DTensor):
            # token-parallel decoding: every rank samples the same token from the whole vocabulary
            logits = logits.full_tensor()
        return logits

    def allocate_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        weight = self.word_embeddings.weight
        shards = weight.device_mesh.size() if isinstance(weight, DTensor) else 1  # token parallelism
        return KVCache.allocate(self.config, batch_size, max_length or self.config.seq_length,
                                weight.device, weight.dtype, head_shards=shards)
