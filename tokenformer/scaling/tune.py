"""Token tuning: parameter-efficient fine-tuning by parameter tokens, which only TokenFormer has.

A trained model (the base) is frozen and every Pattention gets `k` new key/value tokens by an
exact growth (`grow(..., mode="exact")`: zero keys, `n` pinned at the base's value), so the tuned
model starts at exactly the base's logits; then only the new rows train (`freeze_old_tokens`).
What training produced is just those rows, which an adapter file holds:

    adapter.safetensors   tensors  `{pattention}.key_param_tokens`   (k, d_in)   the new rows only
                                   `{pattention}.value_param_tokens` (k, d_out)
                          metadata `format`       "tokenformer-adapter/1"
                                   `base_sha256`  `content_hash` of the base the rows were trained on
                                   `tokens`       JSON {pattention: k}
                                   `base_tokens`  JSON {pattention: the base's token count}
                                   `scale_num`    JSON {pattention: the base's effective n, pinned}

A tuned model remembers its base in its config: the growth that added the tokens is the last
entry of `growth_history`, marked `"token_tuning": {"base_sha256": ...}`, so an adapter can be cut
from any tuned checkpoint (`save_adapter(load_model(DIR), PATH)`), and the base rows are checked
to be bit-identical to that base when it is.

Stacking adapters A and B on one base (`load_adapters(base, [A, B])`) means: every Pattention
attends over the base's rows, then A's, then B's, with `n` pinned at the base's value. It is
well-defined because each adapter's rows enter the same way its own training saw them (appended
after the base, with the base's `n`): an adapter whose keys are still zero adds exactly nothing,
and the order of A and B does not matter (a Pattention sums over its tokens, and the L2 norm of
the scores is symmetric in them), up to float rounding. It is not "A's change plus B's change":
with `l2_norm_gelu` the norm `||s||` runs over all tokens, so trained adapters interact through
it, as they would inside one adapter of `k_A + k_B` tokens. That is exactly what the format
expresses: `save_adapter` of a stacked model writes one adapter holding A's rows then B's, which
loads to the same model. `merge_adapters` writes the stacked model as an ordinary model directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from tokenformer.checkpoint import copy_tokenizer, load_model
from tokenformer.errors import TokenFormerError
from tokenformer.files import atomic_path
from tokenformer.models.pretrained import save_model
from tokenformer.scaling.grow import EXACT_NORMALISATIONS, grow, pattention_groups, slot_counts

ADAPTER_FORMAT = "tokenformer-adapter/1"
TUNING_KEY = "token_tuning"  # marks the growth_history entry of a token tuning
TOKEN_TENSORS = ("key_param_tokens", "value_param_tokens")


def content_hash(model: nn.Module, state: Mapping[str, torch.Tensor] | None = None,
                 rows: Mapping[str, int] | None = None) -> str:
    """sha256 of a model's tensors: each name, dtype, shape and bytes, in name order.

    `state` replaces `model.state_dict()` (FSDP2's gathered one); `rows` cuts tensors to their first
    rows (`{tensor name: rows}`): the base inside a tuned model hashes like the base itself.
    """
    state = model.state_dict() if state is None else state
    rows = rows or {}
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach()
        if name in rows:
            tensor = tensor[:rows[name]]
        tensor = tensor.to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def add_tuning_tokens(model: nn.Module, tokens: int, *, seed: int | None = None,
                      value_std: float | None = None) -> nn.Module:
    """A new model: `model` with `tokens` new parameter tokens per Pattention, by exact growth
    (same logits), its history entry marked with the base's `content_hash`; `model` is untouched.

    Train only the new tokens with `freeze_old_tokens(tuned, optimizer=...)`, then `save_adapter`.
    The new values are drawn with `seed` (N(0, value_std), default the layer's init std).
    """
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
        raise TokenFormerError(f"token tuning needs a positive number of tokens per Pattention, got {tokens!r}")
    norm = getattr(model.config, "norm_activation_type", None)
    if norm not in EXACT_NORMALISATIONS:
        raise TokenFormerError(f"token tuning needs an exact growth, which a {norm!r} model cannot have (a new "
                               f"token always takes weight from the old ones): tune an l2_norm_gelu model")
    base = content_hash(model)
    counts = slot_counts(model.config)
    tuned = grow(model, mode="exact", seed=seed, value_std=value_std,
                 **{field: n + tokens for field, n in counts.items()})
    return _mark_tuning(tuned, base)


def _mark_tuning(tuned: nn.Module, base_sha256: str) -> nn.Module:
    history = list(tuned.config.growth_history)
    history[-1] = {**history[-1], TUNING_KEY: {"base_sha256": base_sha256}}
    tuned.config = dataclasses.replace(tuned.config, growth_history=history)
    return tuned


def tuning_entry(model: nn.Module) -> dict[str, Any]:
    """The `growth_history` entry of the token tuning that made `model` (its last entry)."""
    history = getattr(model.config, "growth_history", None) or []
    if not history or TUNING_KEY not in history[-1]:
        raise TokenFormerError(f"this {type(model).__name__} was not token-tuned (its last growth_history entry "
                               f"is no token tuning): make it with add_tuning_tokens or `train --tune-tokens`")
    return history[-1]


def _base_counts(model: nn.Module, entry: Mapping[str, Any]) -> dict[str, int]:
    """Pattention name -> the base's token count, from the tuning entry's `from` counts."""
    return {name: entry["from"][field] for field, layers in pattention_groups(model).items() for name in layers}


# ---- the adapter file ---------------------------------------------------------------------------

def save_adapter(model: nn.Module, path: str | Path, state: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write the tokens a token tuning added to `model` (and their metadata) to `path` atomically.

    Refuses a model whose base rows are no longer those of its base (they trained too).
    `state` replaces `model.state_dict()` (FSDP2's gathered one).
    """
    from safetensors.torch import save_file

    entry = tuning_entry(model)
    state = model.state_dict() if state is None else state
    base_counts = _base_counts(model, entry)
    base_rows = {f"{name}.{t}": n for name, n in base_counts.items() for t in TOKEN_TENSORS}
    found = content_hash(model, state, base_rows)
    expected = entry[TUNING_KEY]["base_sha256"]
    if found != expected:
        raise TokenFormerError(f"the base tensors of this model (sha256 {found[:12]}) are no longer those of the "
                               f"base it was tuned from ({expected[:12]}): train only the new tokens "
                               f"(freeze_old_tokens, `train --tune-tokens`) to make an adapter")
    tensors = {key: state[key][n:].detach().to("cpu").contiguous() for key, n in base_rows.items()}
    layers = {name: layer for group in pattention_groups(model).values() for name, layer in group.items()}
    metadata = {"format": ADAPTER_FORMAT, "base_sha256": expected,
                "tokens": json.dumps({name: layer.num_tokens - base_counts[name] for name, layer in layers.items()}),
                "base_tokens": json.dumps(base_counts),
                "scale_num": json.dumps({name: layer.effective_scale_num for name, layer in layers.items()})}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


@dataclass
class Adapter:
    """An adapter file's rows and metadata (see the module docstring)."""

    path: Path
    tensors: dict[str, torch.Tensor]
    base_sha256: str
    tokens: dict[str, int]
    base_tokens: dict[str, int]
    scale_num: dict[str, int]


def read_adapter(path: str | Path) -> Adapter:
    """Read an adapter file written by `save_adapter` (safetensors only: no code runs)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise TokenFormerError(f"{path} is not a safetensors file ({e}): give an adapter written by save_adapter") \
            from None
    if metadata.get("format") != ADAPTER_FORMAT:
        raise TokenFormerError(f"{path} is not a TokenFormer adapter (format {metadata.get('format')!r}, expected "
                               f"{ADAPTER_FORMAT!r}): give a file written by save_adapter or `train --tune-tokens`")
    return Adapter(path, tensors, metadata["base_sha256"], json.loads(metadata["tokens"]),
                   json.loads(metadata["base_tokens"]), json.loads(metadata["scale_num"]))


def _check_adapter(adapter: Adapter, layers: Mapping[str, nn.Module], base_sha256: str) -> None:
    """One sentence if `adapter` was not made for this base or does not fit its Pattentions."""
    if adapter.base_sha256 != base_sha256:
        raise TokenFormerError(f"{adapter.path} was tuned on another base model (sha256 {adapter.base_sha256[:12]}, "
                               f"this one is {base_sha256[:12]}): load it onto the model it was tuned from")
    for name, k in adapter.tokens.items():
        layer = layers.get(name)
        if layer is None or adapter.base_tokens.get(name) != layer.num_tokens:
            raise TokenFormerError(f"{adapter.path} holds tokens for {name}, which this base lacks or has with "
                                   f"another token count: load it onto the model it was tuned from")
        if adapter.scale_num.get(name) != layer.effective_scale_num:
            raise TokenFormerError(f"{adapter.path} was tuned with n = {adapter.scale_num.get(name)} in {name} but "
                                   f"this base uses {layer.effective_scale_num}: load it onto the model it was "
                                   f"tuned from, with its config")
        keys, values = (adapter.tensors.get(f"{name}.{t}") for t in TOKEN_TENSORS)
        if keys is None or values is None or keys.shape != (k, layer.in_features) \
                or values.shape != (k, layer.out_features):
            raise TokenFormerError(f"{adapter.path} lacks the {k} rows of {name} or holds them in another shape: "
                                   f"the file is damaged, write it again with save_adapter")


def load_adapters(base: nn.Module, paths: Sequence[str | Path]) -> nn.Module:
    """A new model: `base` with the tokens of every adapter in `paths` stacked after its own rows,
    in that order (see the module docstring for what stacking means). `base` is untouched.

    Each adapter must have been tuned on `base` itself: its `content_hash` is checked.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise TokenFormerError("no adapter to load: give at least one adapter file")
    base_sha256 = content_hash(base)
    groups = pattention_groups(base)
    layers = {name: layer for group in groups.values() for name, layer in group.items()}
    adapters = [read_adapter(p) for p in paths]
    for adapter in adapters:
        _check_adapter(adapter, layers, base_sha256)
    added = {}
    for field, group in groups.items():
        counts = {sum(a.tokens.get(name, 0) for a in adapters) for name in group}
        if len(counts) > 1:
            raise TokenFormerError(f"the adapters add different token counts to the {field} Pattentions "
                                   f"({sorted(counts)}), which one config cannot hold: give adapters that add "
                                   f"the same count to every Pattention of a group")
        added[field] = counts.pop()
    if not any(added.values()):
        raise TokenFormerError(f"the adapters {', '.join(map(str, paths))} hold no tokens")
    # The grown rows are overwritten below; a private generator leaves the global RNG alone.
    tuned = grow(base, mode="exact", generator=torch.Generator().manual_seed(0),
                 **{field: n + added[field] for field, n in slot_counts(base.config).items()})
    with torch.no_grad():
        for field, group in pattention_groups(tuned).items():
            for name, layer in group.items():
                start = layers[name].num_tokens
                for t in TOKEN_TENSORS:
                    rows = [a.tensors[f"{name}.{t}"] for a in adapters if a.tokens.get(name, 0)]
                    if rows:
                        param = getattr(layer, t)
                        param[start:] = torch.cat(rows).to(device=param.device, dtype=param.dtype)  # (k, d)
    return _mark_tuning(tuned, base_sha256)


def load_adapter(base: nn.Module, path: str | Path) -> nn.Module:
    """A new model: `base` with the tokens of the adapter at `path` (tuned on `base` itself)."""
    return load_adapters(base, [path])


def merge_adapters(base: nn.Module | str | Path, adapters: Sequence[str | Path], out: str | Path,
          tokenizer=None) -> Path:
    """Write `base` with `adapters` stacked onto it as an ordinary model directory `out`
    (`TokenFormer.from_pretrained(out)` gives the logits of `load_adapters(base, adapters)`).

    `base` is a model or a checkpoint directory (whose tokenizer is then copied).
    """
    model = load_model(base) if isinstance(base, (str, Path)) else base
    merged = load_adapters(model, adapters)
    out = save_model(merged, out, tokenizer)
    if isinstance(base, (str, Path)) and tokenizer is None:
        copy_tokenizer(base, out)
    return out
