"""Fast decoding: the model's weights laid out for one-token steps, a static KV cache, and an optional
`torch.compile` of the step (gpt-fast style), with bf16 or weight-only int8 weights.

Decoding one token at batch 1 reads every weight once: its speed limit is memory bandwidth. Three
things bring the step closer to it:

- Layout. A one-row product `x @ W.T` reads W as fast as the BLAS streams it, and on CPU (MKL,
  fp32) a row-major matrix whose rows are long streams about twice as fast as one whose rows are
  short (measured: the (50304, 512) head 6.5 GB/s as stored, 13 GB/s transposed). So each matrix
  is kept in whichever orientation has the longer rows, and the q, k, v key tokens (three
  (n, h) matrices read by the same input) are one (h, 3n) matrix: one product instead of three.
- A static cache: fixed (B, H, max_length, D) buffers written at the position tensor `input_pos`,
  attention over the whole buffer under a mask of the valid positions, rotary looked up from the
  position tensor. Every one-token step then has the same shapes, which is what lets
  `torch.compile` trace it once (per batch, max_length and dtype) and drop the Python overhead.
- Fewer bytes: bf16 weights (and cache), or int8 key/value tokens and head
  (`tokenformer.models.quantize`); logits are returned in float32 for sampling either way.

The Pattention normalisation is the model's own (`normalise`), in the compute dtype. The input
embedding is looked up in the model's own table; the head is a copy in the decode layout, so a
`Decoder` holds about as many bytes again as the model's head (and its layers, for bf16/int8 or
transposed matrices). `Decoder` has the model's generation interface (`config`, `word_embeddings`,
`allocate_cache`, `model(ids, cache=, last_only=)`), so `generate_tokens`/`generate_text` take it
in place of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenformer.errors import TokenFormerError
from tokenformer.models.lm import Block, TokenFormer, apply_rotary, layer_norm_nonparametric, rotary_cos_sin
from tokenformer.models.pattention import Pattention, normalise
from tokenformer.models.quantize import int8_matmul, packed_kernel_works, quantize_rows

CACHE_ROUNDING = 64  # static cache lengths are rounded up to this: fewer distinct shapes to compile


@dataclass
class StaticKVCache:
    """Fixed-size keys and values, written at given positions; `length` positions are valid.

    The buffers start at zero: the step attends over the whole buffer with the unwritten
    positions masked out, and a masked position must hold a finite number (0 x NaN is NaN).
    """

    keys: list[torch.Tensor]    # per layer (B, H, max_length, D)
    values: list[torch.Tensor]  # per layer (B, H, max_length, D)
    length: int = 0

    @classmethod
    def allocate(cls, config, batch_size: int, max_length: int, device: torch.device | str,
                 dtype: torch.dtype) -> "StaticKVCache":
        shape = (batch_size, config.num_attention_heads, max_length, config.head_dim)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)])

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]


def columns_layout(out_features: int, in_features: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `x @ W.T` (W (out, in)) reads faster from W.T stored contiguously: on CPU in fp32,
    when that makes the rows longer (out > in), as measured on MKL (see the module docstring).
    bf16 on CPU and every dtype on GPU are fastest in the plain (out, in) layout."""
    return device.type == "cpu" and dtype == torch.float32 and out_features > in_features


class Product(nn.Module):
    """`x @ W.T` for one weight W (out, in), stored in the layout its one-row product reads fastest,
    or as int8 rows with per-row scales (`quantize_rows`)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, int8: bool = False, packed: bool = False) -> None:
        super().__init__()
        self.int8, self.packed = int8, packed
        self.columns = not int8 and columns_layout(*weight.shape, weight.device, dtype)
        if int8:
            q, scales = quantize_rows(weight)
            self.register_buffer("weight", q, persistent=False)                       # (out, in) int8
            self.register_buffer("scales", scales.to(dtype), persistent=False)        # (out,)
        elif self.columns:
            self.register_buffer("weight", weight.detach().to(dtype).T.contiguous(), persistent=False)  # (in, out)
        else:
            self.register_buffer("weight", weight.detach().to(dtype).contiguous(), persistent=False)    # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8:
            return int8_matmul(x, self.weight, self.scales, self.packed)
        return x @ self.weight if self.columns else F.linear(x, self.weight)


class DecodePattentions(nn.Module):
    """One or more Pattentions that read the same input, for inference: their key tokens stacked
    into one product, each part normalised on its own (the model's `normalise`, its `scale_num`),
    then each part's value product. Returns one output per Pattention."""

    def __init__(self, layers: list[Pattention], dtype: torch.dtype, int8: bool, packed: bool) -> None:
        super().__init__()
        self.sizes = [layer.num_tokens for layer in layers]
        self.scale_nums = [layer.effective_scale_num for layer in layers]
        self.norm_types = [layer.norm_activation_type for layer in layers]
        keys = torch.cat([layer.key_param_tokens for layer in layers])  # (sum n, d_in)
        self.keys = Product(keys, dtype, int8, packed)
        # w @ V is x @ W.T with W = V.T (d_out, n)
        self.values = nn.ModuleList(Product(layer.value_param_tokens.T, dtype, int8, packed) for layer in layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        scores = self.keys(x).split(self.sizes, dim=-1)  # each (..., n)
        return [values(normalise(s, norm_type, scale_num))
                for s, values, norm_type, scale_num in zip(scores, self.values, self.norm_types, self.scale_nums)]


class DecodeBlock(nn.Module):
    """A `Block` over the static cache: the same computation, the decode layout of its weights."""

    def __init__(self, block: Block, num_heads: int, head_dim: int, dtype: torch.dtype, int8: bool,
                 packed: bool) -> None:
        super().__init__()
        attention = block.attention
        self.eps, self.num_heads, self.head_dim = block.eps, num_heads, head_dim
        self.qkv = DecodePattentions([attention.query, attention.key, attention.value], dtype, int8, packed)
        self.proj = DecodePattentions([attention.proj], dtype, int8, packed)
        self.mlp = DecodePattentions([block.mlp], dtype, int8, packed)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = (y.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
                   for y in self.qkv(layer_norm_nonparametric(x, self.eps)))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        keys.index_copy_(2, input_pos, k)      # (B, H, max_length, D)
        values.index_copy_(2, input_pos, v)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, H, T, D)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, H * D))[0]  # (B, T, h)
        return x + self.mlp(layer_norm_nonparametric(x, self.eps))[0]


class Decoder(nn.Module):
    """A `TokenFormer` prepared for generation: `Decoder(model, dtype=torch.bfloat16, int8=True,
    compile=True)`; pass it to `generate_tokens` / `generate_text` in place of the model.

    `dtype`: the compute dtype of weights, activations and cache (default: the model's). `int8`:
    the key/value parameter tokens and the head as int8 rows (use with bf16 on CPU, where the
    packed int8 kernel is fast for bf16 activations). `compile`: `torch.compile` the one-token
    step, traced once per (batch, cache length, dtype); `compile_mode` defaults to torch's own
    mode on CPU and "reduce-overhead" (CUDA graphs) on GPU.
    """

    def __init__(self, model: TokenFormer, dtype: torch.dtype | None = None, int8: bool = False,
                 compile: bool = False, compile_mode: str | None = None) -> None:
        super().__init__()
        if not isinstance(model, TokenFormer):
            raise TokenFormerError(f"Decoder takes a tokenformer.TokenFormer, got {type(model).__name__}: "
                                   "load the language model (TokenFormer.from_pretrained)")
        config = self.config = model.config
        weight = model.word_embeddings.weight
        self.dtype = dtype or weight.dtype
        self.int8 = int8
        packed = int8 and packed_kernel_works(weight.device, self.dtype)
        self.word_embeddings = model.word_embeddings  # the model's own table, for the input rows
        self.layers = nn.ModuleList(DecodeBlock(block, config.num_attention_heads, config.head_dim, self.dtype,
                                                int8, packed) for block in model.layers)
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, device=weight.device,
                                       dtype=self.dtype)
        self.final_norm.load_state_dict(model.final_norm.state_dict())
        self.head = Product(weight, self.dtype, int8, packed)
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        if compile:
            mode = compile_mode or ("reduce-overhead" if weight.device.type == "cuda" else None)
            self.step = torch.compile(self.run, mode=mode, fullgraph=True, dynamic=False)
        else:
            self.step = self.run

    @property
    def device(self) -> torch.device:
        return self.word_embeddings.weight.device

    def allocate_cache(self, batch_size: int, max_length: int | None = None) -> StaticKVCache:
        """A zeroed static cache for `max_length` positions, rounded up to a multiple of 64 (so that
        prompts of different lengths share a compiled step)."""
        length = max_length or self.config.seq_length
        length = -(-length // CACHE_ROUNDING) * CACHE_ROUNDING
        if self.rotary is None or self.rotary[0].shape[0] < length:
            # the model's tables (float32, then cast), for every position the cache can hold
            positions = torch.arange(max(length, self.config.seq_length), device=self.device)
            self.rotary = rotary_cos_sin(positions, self.config.rotary_dim, self.config.rotary_emb_base, self.dtype)
        return StaticKVCache.allocate(self.config, batch_size, length, self.device, self.dtype)

    def run(self, idx: torch.Tensor, input_pos: torch.Tensor, cache: StaticKVCache,
            last_only: bool = False) -> torch.Tensor:
        """Float32 logits (B, T, padded_vocab_size) of tokens `idx` (B, T) at positions `input_pos`
        (T,); their keys and values are written into `cache` there. Static shapes for T = 1."""
        x = self.word_embeddings(idx).to(self.dtype)  # (B, T, h)
        cos, sin = self.rotary[0][input_pos], self.rotary[1][input_pos]  # (T, rotary_dim)
        # query t reads the keys at positions <= its own: causal, and blind to unwritten positions
        mask = torch.arange(cache.max_length, device=idx.device) <= input_pos[:, None]  # (T, max_length)
        for layer, block in enumerate(self.layers):
            x = block(x, cos, sin, cache.keys[layer], cache.values[layer], input_pos, mask)
        if last_only:
            x = x[:, -1:]  # (B, 1, h)
        return self.head(self.final_norm(x)).float()

    def forward(self, idx: torch.Tensor, cache: StaticKVCache, last_only: bool = False) -> torch.Tensor:
        """The model's generation interface: logits for `idx` (B, T) after the `cache.length` cached
        positions; advances the cache. One-token steps go through the (compiled) step."""
        start, T = cache.length, idx.shape[1]
        if start + T > cache.max_length:
            raise TokenFormerError(f"the static cache holds {cache.max_length} positions but {start + T} are needed: "
                                   "allocate a longer cache (decoder.allocate_cache)")
        input_pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        logits = self.step(idx, input_pos, cache) if T == 1 else self.run(idx, input_pos, cache, last_only)
        cache.length += T
        return logits
