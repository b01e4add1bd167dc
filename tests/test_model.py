"""The language model against a straightforward float64 computation written from the spec."""

import math

import pytest
import torch

from tokenformer import Config, TokenFormer, export_official, load_official


def official_random_state(config: Config, dtype=torch.float32) -> dict:
    """Random weights under the official key names and shapes (spec section 3)."""
    h, L = config.hidden_size, config.num_layers
    sd = {"sequential.0.word_embeddings.weight": torch.randn(config.padded_vocab_size, h) * 0.5}
    for i in range(L):
        for name, n in (("attention.query", config.qkv_slot_num), ("attention.key", config.qkv_slot_num),
                        ("attention.value", config.qkv_slot_num), ("attention.proj", config.proj_slot_num),
                        ("mlp", config.ffn_slot_num)):
            sd[f"sequential.{i + 2}.{name}.key_param_tokens"] = torch.randn(n, h) * 0.3
            sd[f"sequential.{i + 2}.{name}.value_param_tokens"] = torch.randn(n, h) * 0.1
    sd[f"sequential.{L + 3}.norm.weight"] = 1 + 0.1 * torch.randn(h)
    sd[f"sequential.{L + 3}.norm.bias"] = 0.1 * torch.randn(h)
    return {k: v.to(dtype) for k, v in sd.items()}


def reference_logits(sd: dict, c: Config, idx: torch.Tensor) -> torch.Tensor:
    """Spec section 2, written out step by step in float64 with explicit loops where it helps."""
    sd = {k: v.double() for k, v in sd.items()}
    L, h, H = c.num_layers, c.hidden_size, c.num_attention_heads
    D = h // H
    rd = int(D * c.rotary_pct)
    B, T = idx.shape

    def pattention(x, prefix, n):
        s = x @ sd[prefix + ".key_param_tokens"].T
        z = s / s.norm(dim=-1, keepdim=True) * math.sqrt(n)
        w = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
        return w @ sd[prefix + ".value_param_tokens"]

    def layernorm(x):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5)

    def rotary(x):  # x (B, T, H, D): dim i < rd/2 pairs with i + rd/2, angle t / base^(2i/rd)
        out = x.clone()
        for t in range(T):
            for i in range(rd // 2):
                angle = t / (c.rotary_emb_base ** (2 * i / rd))
                a, b = x[:, t, :, i], x[:, t, :, i + rd // 2]
                out[:, t, :, i] = a * math.cos(angle) - b * math.sin(angle)
                out[:, t, :, i + rd // 2] = b * math.cos(angle) + a * math.sin(angle)
        return out

    x = sd["sequential.0.word_embeddings.weight"][idx]
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    for i in range(L):
        p = f"sequential.{i + 2}"
        n_x = layernorm(x)
        q = rotary(pattention(n_x, p + ".attention.query", c.qkv_slot_num).view(B, T, H, D))
        k = rotary(pattention(n_x, p + ".attention.key", c.qkv_slot_num).view(B, T, H, D))
        v = pattention(n_x, p + ".attention.value", c.qkv_slot_num).view(B, T, H, D)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
        att = scores.masked_fill(mask, float("-inf")).softmax(-1)
        y = torch.einsum("bhts,bshd->bthd", att, v).reshape(B, T, h)
        a = x + pattention(y, p + ".attention.proj", c.proj_slot_num)
        x = a + pattention(layernorm(a), p + ".mlp", c.ffn_slot_num)
    x = layernorm(x) * sd[f"sequential.{L + 3}.norm.weight"] + sd[f"sequential.{L + 3}.norm.bias"]
    return x @ sd["sequential.0.word_embeddings.weight"].T


# The rotary tables are computed in float32, as in the official code, so float64 logits agree with
# the exact-math reference to ~1e-7, not to machine precision.
ROPE_TOL = dict(rtol=1e-6, atol=1e-6)

CFG = dict(num_layers=2, hidden_size=48, num_attention_heads=3, qkv_slot_num=20, proj_slot_num=12,
           ffn_slot_num=36, vocab_size=100, make_vocab_size_divisible_by=16, seq_length=32, rotary_pct=0.5)


def test_logits_match_independent_reference():
    config = Config(**CFG)
    sd = official_random_state(config)
    model = load_official(sd, config, dtype=torch.float64)
    idx = torch.randint(0, config.vocab_size, (2, 11))
    torch.testing.assert_close(model(idx), reference_logits(sd, config, idx), **ROPE_TOL)


def test_official_rotary_pct_quarter_matches_reference():
    config = Config(**{**CFG, "hidden_size": 64, "num_attention_heads": 2, "rotary_pct": 0.25})
    sd = official_random_state(config)
    model = load_official(sd, config, dtype=torch.float64)
    idx = torch.randint(0, config.vocab_size, (1, 9))
    torch.testing.assert_close(model(idx), reference_logits(sd, config, idx), **ROPE_TOL)


def test_fp16_official_file_loads_then_casts():
    config = Config(**CFG)
    sd16 = official_random_state(config, dtype=torch.float16)
    model = load_official(sd16, config, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    idx = torch.randint(0, config.vocab_size, (1, 7))
    ref = reference_logits({k: v.float() for k, v in sd16.items()}, config, idx)
    torch.testing.assert_close(model(idx).double(), ref, rtol=1e-4, atol=1e-4)


def test_export_gives_back_the_same_tensors():
    config = Config(**CFG)
    sd = official_random_state(config)
    exported = export_official(load_official(sd, config))
    assert exported.keys() == sd.keys()
    for k in sd:
        assert torch.equal(exported[k], sd[k]), k


def test_causality():
    model = TokenFormer(Config(**CFG)).eval()
    idx = torch.randint(0, 100, (1, 12))
    changed = idx.clone()
    changed[0, 8] = (idx[0, 8] + 1) % 100
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_kv_cache_equals_full_forward():
    model = TokenFormer(Config(**CFG)).eval().double()
    idx = torch.randint(0, 100, (2, 15))
    full = model(idx)
    cache = model.allocate_cache(2, 15)
    pieces = [model(idx[:, :6], cache=cache)]                # prefill
    pieces.append(model(idx[:, 6:10], cache=cache))          # a chunk after a prefix
    pieces += [model(idx[:, t:t + 1], cache=cache) for t in range(10, 15)]  # one by one
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)
    assert cache.length == 15


def test_a_mask_of_ones_and_the_default_positions_change_nothing():
    model = TokenFormer(Config(**CFG)).eval().double()
    idx = torch.randint(0, 100, (2, 9))
    plain = model(idx)
    torch.testing.assert_close(model(idx, position_ids=torch.arange(9).expand(2, -1)), plain, rtol=0, atol=0)
    torch.testing.assert_close(model(idx, attention_mask=torch.ones(2, 9)), plain, rtol=1e-12, atol=1e-12)


def test_left_padded_rows_equal_their_unpadded_forward_with_and_without_cache():
    model = TokenFormer(Config(**CFG)).eval().double()
    short, long = torch.randint(0, 100, (1, 7)), torch.randint(0, 100, (1, 11))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1), long])  # (2, 11)
    mask = torch.tensor([[0] * 4 + [1] * 7, [1] * 11])
    full = model(batch, attention_mask=mask)
    torch.testing.assert_close(full[0, 4:], model(short)[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(full[1], model(long)[0], rtol=1e-10, atol=1e-10)
    cache = model.allocate_cache(2, 11)
    pieces = [model(batch[:, :6], cache=cache, attention_mask=mask[:, :6])]                     # prefill
    pieces += [model(batch[:, t:t + 1], cache=cache, attention_mask=mask[:, :t + 1]) for t in range(6, 11)]
    torch.testing.assert_close(torch.cat(pieces, dim=1)[:, 4:], full[:, 4:], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\) but the model sees 0 cached and 11"):
        model(batch, attention_mask=mask[:, :5])


def test_cache_overflow_is_a_clear_error():
    model = TokenFormer(Config(**CFG)).eval()
    cache = model.allocate_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache holds 4 positions"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_gradient_checkpointing_gives_same_gradients():
    model = TokenFormer(Config(**CFG)).double()
    idx = torch.randint(0, 100, (2, 10))
    model(idx).logsumexp(-1).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing = True
    model(idx).logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_close_to_fp32(dtype):
    model = TokenFormer(Config(**CFG)).eval()
    idx = torch.randint(0, 100, (1, 8))
    ref = model(idx)
    low = model.to(dtype)(idx)
    assert low.dtype == dtype
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_state_dict_holds_only_official_tensors():
    model = TokenFormer(Config(**CFG))
    n_official = 1 + 2 + CFG["num_layers"] * 10
    assert len(model.state_dict()) == n_official
    assert not any("rotary" in k or "bias" in k and "final_norm" not in k for k in model.state_dict())


def test_init_follows_official_recipe():
    config = Config.from_name("small")
    model = TokenFormer(config)
    q = model.layers[0].attention.query
    assert abs(q.key_param_tokens.std().item() - 0.02) < 0.002
    wang = 2 / config.num_layers / math.sqrt(config.hidden_size)
    assert abs(q.value_param_tokens.std().item() - wang) < 0.1 * wang
    assert torch.equal(model.final_norm.weight, torch.ones(config.hidden_size))


def test_save_and_load_pretrained(tmp_path):
    model = TokenFormer(Config(**CFG)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"config.json", "model.safetensors"}
    loaded = TokenFormer.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    idx = torch.randint(0, 100, (1, 6))
    assert torch.equal(loaded(idx), model(idx))


# ---- speed options: they must not change a single number ----------------------------------------

def test_last_only_equals_last_position_of_full_forward():
    model = TokenFormer(Config(**CFG)).eval().double()
    idx = torch.randint(0, 100, (2, 9))
    full = model(idx)
    last = model(idx, last_only=True)
    assert last.shape == (2, 1, model.config.padded_vocab_size)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-12, atol=1e-12)
    cache = model.allocate_cache(2, 9)
    torch.testing.assert_close(model(idx, cache=cache, last_only=True), full[:, -1:], rtol=1e-10, atol=1e-10)


def test_memory_lean_model_equals_default_in_logits_and_gradients():
    default = TokenFormer(Config(**CFG))
    lean = TokenFormer(Config(**CFG, pattention_memory_lean=True))
    lean.load_state_dict(default.state_dict())
    assert all(p.memory_lean for p in lean.pattentions().values())
    assert not any(p.memory_lean for p in default.pattentions().values())
    idx = torch.randint(0, 100, (2, 10))
    for model in (default, lean):
        model(idx).logsumexp(-1).sum().backward()
    torch.testing.assert_close(lean(idx), default(idx), rtol=0, atol=0)
    grads = dict(default.named_parameters())
    for name, p in lean.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=0, atol=0)


def test_compiled_model_equals_eager():
    """torch.compile traces the custom Pattention function; the aot_eager backend keeps the test
    fast (no code generation) while exercising the same graph capture and autograd split."""
    model = TokenFormer(Config(**CFG))
    idx = torch.randint(0, 100, (2, 10))
    model(idx).logsumexp(-1).sum().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    logits = compiled(idx)
    logits.logsumexp(-1).sum().backward()
    torch.testing.assert_close(logits, model(idx))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[n])
