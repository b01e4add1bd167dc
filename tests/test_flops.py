"""The analytic FLOP counts against a hand count and against PyTorch's FlopCounterMode."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tokenformer import Config, TokenFormer
from tokenformer.flops import gpt_neox_flops, pattention_flops, tokenformer_flops

# A tiny shape small enough to count by hand: h 8, 2 heads, slots 4/6/16, vocab 128, 1 layer, T 5.
TINY = dict(num_layers=1, hidden_size=8, num_attention_heads=2, qkv_slot_num=4, proj_slot_num=6,
            ffn_slot_num=16, vocab_size=128, seq_length=5, rotary_pct=0.5)


def counted(fn):
    """Total FLOPs PyTorch counts for `fn()`. The math attention kernel is forced: the fused CPU
    kernel has no FLOP formula registered and would count as 0."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_hand_count_tiny_tokenformer():
    f = tokenformer_flops(Config(**TINY))
    # q, k, v: 3 x (2*4*8 + 2*4*8) = 384; proj: 2*6*8*2 = 192; ffn: 2*16*8*2 = 512
    assert f.projections == 384 + 192 + 512
    # scores and weighted sum over all 5 keys: 2 * (2*5*8) = 160
    assert f.attention == 160
    assert f.head == 2 * 8 * 128
    assert f.total == 1088 + 160 + 2048
    assert f.body == 1088 + 160
    assert f.training().total == 3 * f.total
    # causal: on average (5+1)/2 = 3 keys per query
    assert tokenformer_flops(Config(**TINY), causal=True).attention == 2 * 2 * 3 * 8
    assert tokenformer_flops(Config(**TINY), head=False).head == 0


def test_hand_count_gpt_neox():
    f = gpt_neox_flops(hidden_size=8, num_layers=2, intermediate_size=32, vocab_size=100, seq_length=5)
    assert f.projections == 2 * (2 * 8 * 24 + 2 * 8 * 8 + 2 * 2 * 8 * 32)
    assert f.attention == 2 * 160
    assert f.head == 2 * 8 * 100


def test_pattention_flops_is_two_matmuls():
    assert pattention_flops(3, 5, 7) == 2 * 7 * 3 + 2 * 7 * 5


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_forward_matches_flop_counter(preset):
    config = Config.from_name(preset)
    model = TokenFormer(config)
    B, T = 2, config.seq_length // 2
    idx = torch.randint(0, config.vocab_size, (B, T))
    with torch.no_grad():
        flops = counted(lambda: model(idx))
    assert flops == tokenformer_flops(config, seq_length=T).total * B * T


def test_training_matches_flop_counter():
    config = Config.from_name("tiny")
    model = TokenFormer(config)
    B, T = 2, 16
    idx = torch.randint(0, config.vocab_size, (B, T))
    flops = counted(lambda: model(idx).sum().backward())
    # The embedding lookup's backward is a scatter, not a matmul; the tied head's is two matmuls.
    assert flops == tokenformer_flops(config, seq_length=T).training().total * B * T


def test_gpt_neox_matches_flop_counter_on_a_plain_transformer():
    """An independent GPT-NeoX-shaped block built from nn.Linear, counted by PyTorch."""
    h, L, ffn, V, T, heads = 16, 2, 64, 96, 6, 2

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.dense = torch.nn.Linear(h, 3 * h), torch.nn.Linear(h, h)
            self.up, self.down = torch.nn.Linear(h, ffn), torch.nn.Linear(ffn, h)

        def forward(self, x):
            q, k, v = self.qkv(x).view(1, T, 3, heads, h // heads).permute(2, 0, 3, 1, 4)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.dense(y.transpose(1, 2).reshape(1, T, h))
            return x + self.down(torch.nn.functional.gelu(self.up(x)))

    blocks, head = torch.nn.Sequential(*[Block() for _ in range(L)]), torch.nn.Linear(h, V, bias=False)
    with torch.no_grad():
        flops = counted(lambda: head(blocks(torch.randn(1, T, h))))
    assert flops == gpt_neox_flops(h, L, ffn, V, T).total * T
