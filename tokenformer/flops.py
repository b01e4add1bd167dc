"""Analytic matmul FLOPs per token of a TokenFormer and of a standard GPT-NeoX Transformer.

Only matrix multiplications are counted (2 FLOPs per multiply-add), the convention of model FLOPs
utilisation: norms, GELU, rotary, softmax and the embedding lookup are left out. Counts are per
token of a sequence of `seq_length` tokens, for the forward pass; a training step (forward and
backward) costs 3x the forward, since the backward of every matmul is two matmuls of the same
size (gradient of the input and of the other operand).

Attention scores (`q @ k.T`) and the weighted sum (`p @ v`) depend on the sequence length. By
default the full T x T products are counted (`causal=False`), as PyTorch's FlopCounterMode and
the usual MFU formulas do, since the kernels compute them whole; `causal=True` counts only the
pairs a causal mask keeps, on average (T + 1) / 2 keys per query.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenformer.models.config import Config

TRAINING_MULTIPLIER = 3  # forward + backward (2x forward) for matmuls


@dataclass(frozen=True)
class Flops:
    """Matmul FLOPs per token, split into the parts whose cost scales differently."""

    projections: float  # q, k, v, output projection and feed-forward of every layer
    attention: float    # scores and weighted sum of every layer (depends on seq_length)
    head: float         # the vocabulary projection

    @property
    def body(self) -> float:
        """Everything but the vocabulary head."""
        return self.projections + self.attention

    @property
    def total(self) -> float:
        return self.body + self.head

    def training(self) -> "Flops":
        """FLOPs of forward + backward per token."""
        m = TRAINING_MULTIPLIER
        return Flops(self.projections * m, self.attention * m, self.head * m)

    def __mul__(self, tokens: float) -> "Flops":
        return Flops(self.projections * tokens, self.attention * tokens, self.head * tokens)

    __rmul__ = __mul__


def pattention_flops(in_features: int, out_features: int, num_tokens: int) -> int:
    """Per token: scores `x @ K.T` (2 n d_in) and output `w @ V` (2 n d_out)."""
    return 2 * num_tokens * (in_features + out_features)


def attention_flops(hidden_size: int, seq_length: int, causal: bool = False) -> float:
    """Per token of one layer: `q @ k.T` and `p @ v`, each 2 x keys x hidden_size."""
    keys = (seq_length + 1) / 2 if causal else seq_length
    return 2 * 2 * keys * hidden_size


def tokenformer_flops(config: Config, seq_length: int | None = None, causal: bool = False,
                      head: bool = True) -> Flops:
    """Forward matmul FLOPs per token of a TokenFormer (`head=False`: without the vocabulary head,
    as when only some positions' logits are computed)."""
    h = config.hidden_size
    T = config.seq_length if seq_length is None else seq_length
    per_layer = (3 * pattention_flops(h, h, config.qkv_slot_num)
                 + pattention_flops(h, h, config.proj_slot_num)
                 + pattention_flops(h, h, config.ffn_slot_num))
    return Flops(projections=config.num_layers * per_layer,
                 attention=config.num_layers * attention_flops(h, T, causal),
                 head=2 * h * config.padded_vocab_size if head else 0)


def gpt_neox_flops(hidden_size: int, num_layers: int, intermediate_size: int, vocab_size: int,
                   seq_length: int, causal: bool = False) -> Flops:
    """Forward matmul FLOPs per token of a standard GPT-NeoX Transformer (fused qkv, output dense,
    two-matrix MLP, untied output head); biases are additions and are not counted."""
    h = hidden_size
    per_layer = 2 * h * 3 * h + 2 * h * h + 2 * 2 * h * intermediate_size
    return Flops(projections=num_layers * per_layer,
                 attention=num_layers * attention_flops(h, seq_length, causal),
                 head=2 * h * vocab_size)
