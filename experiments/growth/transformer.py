"""The control of the growth experiment: a standard Transformer with the same body as TokenFormer
except its projections.

Same non-parametric pre-LN, sequential residual, rotary (GPT-NeoX style, 25% of each head), causal
attention, tied embedding and final LayerNorm as `tokenformer.models.lm`; q, k, v and the output
projection are bias-free linear layers h -> h, and the feed-forward is `fc2(gelu(fc1(x)))` of width
`ffn_width`, also bias-free. A Pattention of n tokens costs what a linear layer of width n costs
(2 n (d_in + d_out) FLOPs and n (d_in + d_out) weights per token), so `matched_ffn_width` gives the
FFN width at which this model has the parameters and the FLOPs of a given TokenFormer.

Growth of this model is FFN widening (`widen_ffn`): new hidden units, with zero output weights
(`exact`: the same function, the usual "function-preserving" widening) or random ones (`random`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenformer.errors import TokenFormerError
from tokenformer.models.config import LanguageModelShape
from tokenformer.models.lm import apply_rotary, layer_norm_nonparametric, rotary_cos_sin
from tokenformer.models.pretrained import PretrainedModel

WIDEN_MODES = ("exact", "random")


@dataclass
class TransformerConfig(LanguageModelShape):
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_width: int = 384
    seq_length: int = 64
    vocab_size: int = 257
    make_vocab_size_divisible_by: int = 128
    rotary_pct: float = 0.25
    rotary_emb_base: int = 10000
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    name: str = "transformer"
    growth_history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_parameters(self) -> int:
        h = self.hidden_size
        return self.padded_vocab_size * h + self.num_layers * (4 * h * h + 2 * h * self.ffn_width) + 2 * h

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TransformerConfig":
        return cls(**values)


def matched_ffn_width(hidden_size: int, qkv_slot_num: int, proj_slot_num: int, ffn_slot_num: int) -> int:
    """The FFN width of the Transformer layer with the weights (and FLOPs) of a TokenFormer layer:
    `2h (3 qkv + proj + ffn) = 4h^2 + 2h f`."""
    width = 3 * qkv_slot_num + proj_slot_num + ffn_slot_num - 2 * hidden_size
    if width <= 0:
        raise TokenFormerError("those slot counts are below the attention projections of a Transformer layer")
    return width


class TransformerBlock(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        h, f = config.hidden_size, config.ffn_width
        self.eps, self.heads = config.layernorm_epsilon, config.num_attention_heads
        self.query, self.key, self.value, self.proj = (nn.Linear(h, h, bias=False) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(h, f, bias=False), nn.Linear(f, h, bias=False)
        out_std = 2.0 / config.num_layers / math.sqrt(h)  # GPT-NeoX's "wang_init" for output layers
        for layer in (self.query, self.key, self.value, self.fc1):
            nn.init.normal_(layer.weight, std=config.init_method_std)
        for layer in (self.proj, self.fc2):
            nn.init.normal_(layer.weight, std=out_std)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        n = layer_norm_nonparametric(x, self.eps)
        # H: this rank's heads (all, or H/P under tensor parallelism, docs/distributed.md)
        q, k, v = (layer(n).view(B, T, -1, h // self.heads).transpose(1, 2)  # (B, H, T, D)
                   for layer in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H * D)
        return x + self.fc2(F.gelu(self.fc1(layer_norm_nonparametric(x, self.eps))))


class Transformer(PretrainedModel):
    """`model(idx)` (B, T) token ids -> logits (B, T, padded_vocab_size)."""

    model_type = "growth_control_transformer"
    config_class = TransformerConfig

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        nn.init.normal_(self.word_embeddings.weight, std=config.init_method_std)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(idx)  # (B, T, h)
        positions = torch.arange(idx.shape[1], device=idx.device)
        cos, sin = rotary_cos_sin(positions, self.config.rotary_dim, self.config.rotary_emb_base, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin)
        return self.final_norm(x) @ self.word_embeddings.weight.T  # (B, T, padded_vocab_size)


    def grow(self, *, mode: str = "exact", seed: int | None = None, ffn_width: int | None = None,
             factor: float | None = None) -> "Transformer":
        """Growth inside a training run (`grow_at`): the FFNs widened to `ffn_width` units (or
        `factor` x the current width); mode `exact` keeps the function, `official` (the trainer's
        other mode) widens with random output weights."""
        width = ffn_width if ffn_width is not None else round(self.config.ffn_width * (factor or 1))
        return widen_ffn(self, width, "random" if mode == "official" else mode, seed=seed or 0)


@torch.no_grad()
def widen_ffn(model: Transformer, ffn_width: int, mode: str = "exact", seed: int = 0) -> Transformer:
    """A copy of `model` whose FFNs have `ffn_width` hidden units; the first ones are the old ones.

    New input weights (rows of fc1) are drawn like a fresh model's; new output weights (columns of
    fc2) are zero (`exact`: a new unit adds gelu(w.x) * 0, so the function is unchanged, while its
    output weights get gradient at once) or drawn like a fresh model's (`random`)."""
    if mode not in WIDEN_MODES:
        raise TokenFormerError(f"unknown widening mode {mode!r}: use one of {', '.join(WIDEN_MODES)}")
    old = model.config.ffn_width
    if ffn_width < old:
        raise TokenFormerError(f"cannot widen an FFN of {old} units to {ffn_width}")
    generator = torch.Generator().manual_seed(seed)
    config = dataclasses.replace(model.config, ffn_width=ffn_width, growth_history=[
        *model.config.growth_history, {"mode": f"widen-{mode}", "from": old, "to": ffn_width}])
    grown = Transformer(config)
    grown.load_state_dict({k: v for k, v in model.state_dict().items() if ".fc" not in k}, strict=False)
    extra = ffn_width - old
    out_std = 2.0 / config.num_layers / math.sqrt(config.hidden_size)
    for new, before in zip(grown.layers, model.layers):
        rows = torch.randn(extra, config.hidden_size, generator=generator) * config.init_method_std
        new.fc1.weight.copy_(torch.cat([before.fc1.weight, rows]))                     # (f', h)
        columns = torch.zeros(config.hidden_size, extra) if mode == "exact" else \
            torch.randn(config.hidden_size, extra, generator=generator) * out_std
        new.fc2.weight.copy_(torch.cat([before.fc2.weight, columns], dim=1))           # (h, f')
    return grown.train(model.training)
