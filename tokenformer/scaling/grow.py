"""Growing a trained TokenFormer by its parameter tokens.

Growing appends rows to every `key_param_tokens` / `value_param_tokens` (the old rows are copied
into `[:n_old]`; every other tensor is copied). Two modes:

`exact` (the default): the grown model computes the same function as the old one.
    New keys are zero and each Pattention keeps the `n` of its normalisation at the old value
    (`config.*_scale_num`). For `l2_norm_gelu` a zero key gives score 0, which adds nothing to
    `||s||_2`, and weight `gelu(0) = 0`; for `gelu_l2_norm` it gives `gelu(0) = 0`, which adds
    nothing to `||gelu(s)||_2` and keeps weight 0. So old weights are unchanged and the new tokens
    contribute `0 * value`, whatever their values.
    It cannot hold for `softmax`: `exp(0) = 1`, so a new token takes weight from the old ones, and
    no finite key can fix that (its score `x . k` depends on x and cannot be `-inf` for every x).
    Exact growth of a softmax model therefore raises `TokenFormerError`; use `official`.

    Gradients at the grown point: the new values get exactly zero gradient (their weight is
    gelu(0) = 0); the new keys get `dL/dy . v_j * gelu'(0) * sqrt(n)/||s|| * x` (`||gelu(s)||`
    for gelu_l2_norm) with gelu'(0) = 0.5, non-zero only because the new values are non-zero. After the first
    optimizer step the keys are non-zero, the weights leave 0 and the values receive gradient too.
    The new values are drawn from N(0, value_std) with value_std defaulting to the layer's own
    init std (the official "wang_init" 2 / num_layers / sqrt(hidden)): exactness comes from the
    zero keys alone, so the values can be what training from scratch starts from; that keeps the
    key gradients well above AdamW's eps and makes the new tokens' first contributions (weight
    ~ lr-sized key steps times these values) as small as a fresh model's.

`official`: what the official code does. New rows get the ordinary random init (keys
    N(0, init_method_std), values N(0, 2 / num_layers / sqrt(hidden))) and the normalisation
    follows the new n (`*_scale_num = None`). Not function-preserving: both the random keys and
    the changed `sqrt(n)` alter every output; training has to recover.

For training after growth: `grow_optimizer_state` carries AdamW moments into the grown shapes
(and `tokenformer.scaling.freeze` trains only the new rows, the "freeze old" variant).

Everything works on one Pattention (`grow_pattention`) and on any model whose Pattentions can be
assigned to the qkv / proj / ffn slot groups (`pattention_groups`), which `shrink` and `freeze`
use too.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from tokenformer.checkpoint import copy_tokenizer, load_model, read_trainer_state, resolve_checkpoint
from tokenformer.errors import TokenFormerError
from tokenformer.files import TRAINER_STATE_FILE, atomic_path
from tokenformer.models.pattention import Pattention
from tokenformer.optimizer_state import names_by_index

MODES = ("exact", "official")
# Normalisations for which zero keys + a pinned n give the new tokens weight exactly 0.
EXACT_NORMALISATIONS = ("l2_norm_gelu", "gelu_l2_norm")
SLOT_FIELDS = ("qkv_slot_num", "proj_slot_num", "ffn_slot_num")


def scale_field(slot_field: str) -> str:
    return slot_field.replace("_slot_num", "_scale_num")


# ---- which Pattention belongs to which slot count ------------------------------------------------

def pattention_groups(model: nn.Module) -> dict[str, dict[str, Pattention]]:
    """The Pattentions of `model` that follow a slot count, by slot field, then by module name.

    A model may define `pattention_groups()` itself; otherwise the official names decide:
    `*.attention.query`, `.key`, `.value` -> `qkv_slot_num`, `*.attention.proj` ->
    `proj_slot_num`, `*.mlp` -> `ffn_slot_num`. Other Pattentions (the vision model's patch
    embedding and head, with counts of their own) are left as they are.
    """
    if hasattr(model, "pattention_groups"):
        return model.pattention_groups()
    groups: dict[str, dict[str, Pattention]] = {field: {} for field in SLOT_FIELDS}
    for name, module in model.named_modules():
        if not isinstance(module, Pattention):
            continue
        parts = name.split(".")
        if parts[-2:-1] == ["attention"] and parts[-1] in ("query", "key", "value"):
            groups["qkv_slot_num"][name] = module
        elif parts[-2:] == ["attention", "proj"]:
            groups["proj_slot_num"][name] = module
        elif parts[-1] == "mlp":
            groups["ffn_slot_num"][name] = module
    for field, layers in groups.items():
        if not layers:
            raise TokenFormerError(
                f"{type(model).__name__} has no Pattention for {field}: name its modules like the "
                f"official ones (attention.query/key/value/proj, mlp) or define pattention_groups()")
    return groups


def slot_counts(config) -> dict[str, int]:
    """The slot counts of a config, e.g. `{"qkv_slot_num": 768, ...}`: the three of `SLOT_FIELDS`, or
    those a config of several parts lists in its `slot_fields` (a captioner's image tower and
    language model grow separately)."""
    fields = tuple(getattr(config, "slot_fields", SLOT_FIELDS))
    needed = fields + tuple(map(scale_field, fields)) + ("growth_history",)
    missing = [f for f in needed if not hasattr(config, f)]
    if missing:
        raise TokenFormerError(
            f"{type(config).__name__} has no {missing[0]} field: only models whose config has "
            f"qkv/proj/ffn slot and scale counts and a growth_history can be grown or shrunk")
    return {f: getattr(config, f) for f in fields}


def replace_config(config, changes: Mapping[str, Any]):
    """`config` with `changes`: through its own `replace` when it has one (a config of nested
    parts routes each count to its part), else as a dataclass copy."""
    if hasattr(config, "replace"):
        return config.replace(**changes)
    return dataclasses.replace(config, **changes)


def old_slot_counts(config) -> dict[str, int]:
    """The slot counts before the most recent growth, read from `config.growth_history`."""
    history = getattr(config, "growth_history", None) or []
    if not history:
        raise TokenFormerError("this model has no growth in its growth_history: pass the old slot counts explicitly")
    if history[-1].get("mode") not in MODES:
        # After a shrink the first rows are no longer the pre-growth tokens.
        raise TokenFormerError("the last change in growth_history is not a growth: pass the old slot counts explicitly")
    return dict(history[-1]["from"])


def target_counts(config, requested: Mapping[str, int | None], factor: float | None,
                  verb: str) -> tuple[dict[str, int], dict[str, int]]:
    """The current slot counts and those to `verb` ("grow" or "shrink") to: the requested ones
    (None keeps a count) or the current ones times `factor`, checked to go in `verb`'s direction."""
    current = slot_counts(config)
    unknown = [f for f, n in requested.items() if n is not None and f not in current]
    if unknown:
        raise TokenFormerError(f"{type(config).__name__} has no {unknown[0]}: give one of {', '.join(current)}")
    if factor is not None:
        if any(v is not None for v in requested.values()):
            raise TokenFormerError(f"give either factor or slot counts to {verb}, not both")
        if factor <= 0:
            raise TokenFormerError(f"factor must be positive, got {factor}")
        target = {f: max(1, int(round(n * factor))) for f, n in current.items()}
    else:
        if all(v is None for v in requested.values()):
            raise TokenFormerError(f"nothing to {verb}: give a factor or at least one of "
                                   f"qkv_slot_num, proj_slot_num, ffn_slot_num")
        target = {f: current[f] if requested.get(f) is None else requested[f] for f in current}
        for f, n in target.items():
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                raise TokenFormerError(f"{f} must be a positive integer, got {n!r}")
    for f in current:
        if verb == "grow" and target[f] < current[f]:
            raise TokenFormerError(f"cannot grow {f} from {current[f]} to the smaller {target[f]}: "
                                   f"use shrink to remove tokens")
        if verb == "shrink" and target[f] > current[f]:
            raise TokenFormerError(f"cannot shrink {f} from {current[f]} to the larger {target[f]}: "
                                   f"use grow to add tokens")
    return current, target


def history_entry(mode: str, old: dict[str, int], new: dict[str, int], **extra: Any) -> dict[str, Any]:
    entry = {"mode": mode, "from": old, "to": new,
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    entry.update({k: v for k, v in extra.items() if v is not None})
    return entry


def _random_rows(shape: tuple[int, int], std: float, like: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
    # Drawn in float32 on the CPU so that a seed gives the same rows on every device and dtype.
    rows = torch.randn(shape, generator=generator, dtype=torch.float32) * std
    return rows.to(device=like.device, dtype=like.dtype)


def replace_rows(layer: Pattention, keys: torch.Tensor, values: torch.Tensor) -> None:
    old_k, old_v = layer.key_param_tokens, layer.value_param_tokens
    layer.key_param_tokens = nn.Parameter(keys, requires_grad=old_k.requires_grad)
    layer.value_param_tokens = nn.Parameter(values, requires_grad=old_v.requires_grad)


# ---- growing ------------------------------------------------------------------------------------

@torch.no_grad()
def grow_pattention(layer: Pattention, num_tokens: int, mode: str = "exact", *,
                    value_std: float | None = None, noise: float = 0.0,
                    generator: torch.Generator | None = None) -> Pattention:
    """Append parameter tokens to one Pattention in place, up to `num_tokens`; returns it.

    `exact`: zero keys, values N(0, value_std) (default: the layer's init std), `scale_num`
    pinned at the old effective n. `official`: keys N(0, key_std), values N(0, value_std),
    `scale_num = None`. See the module docstring for why. `noise`: the old keys and values each
    get N(0, noise x that tensor's own standard deviation) added (drawn after the new rows).
    """
    if mode not in MODES:
        raise TokenFormerError(f"unknown growth mode {mode!r}: use one of {', '.join(MODES)}")
    old = layer.num_tokens
    if num_tokens < old:
        raise TokenFormerError(
            f"cannot grow a Pattention of {old} tokens to {num_tokens}: use shrink to remove tokens")
    if mode == "exact" and layer.norm_activation_type not in EXACT_NORMALISATIONS:
        raise TokenFormerError(
            f"exact growth cannot preserve a {layer.norm_activation_type!r} Pattention (a new token "
            f"always takes weight from the old ones): use mode='official'")
    if num_tokens == old:
        return layer
    keys, values = layer.key_param_tokens, layer.value_param_tokens
    extra = num_tokens - old
    std = layer.value_std if value_std is None else value_std
    new_values = _random_rows((extra, values.shape[1]), std, values, generator)
    if mode == "exact":
        new_keys = torch.zeros(extra, keys.shape[1], device=keys.device, dtype=keys.dtype)
        layer.scale_num = layer.effective_scale_num  # read before the count changes
    else:
        new_keys = _random_rows((extra, keys.shape[1]), layer.key_std, keys, generator)
        layer.scale_num = None
    if isinstance(keys, DTensor):
        if noise:
            raise TokenFormerError("noise on the old tokens is not supported for a token-parallel model (each rank "
                                   "holds a shard): grow it with noise 0, or in one process")
        _grow_shards(layer, new_keys, new_values)
        return layer
    old_keys, old_values = keys.detach(), values.detach()
    if noise:
        old_keys = old_keys + _random_rows(tuple(keys.shape), noise * old_keys.std().item(), keys, generator)
        old_values = old_values + _random_rows(tuple(values.shape), noise * old_values.std().item(), values, generator)
    replace_rows(layer, torch.cat([old_keys, new_keys]),       # (num_tokens, d_in)
                  torch.cat([old_values, new_values]))          # (num_tokens, d_out)
    return layer


def _grow_shards(layer: Pattention, new_keys: torch.Tensor, new_values: torch.Tensor) -> None:
    """Token parallelism: rank r of P appends the r-th P-th of the new rows (drawn whole, as one
    process draws them) to its own shard, so the new tokens spread evenly over the ranks and no
    rank gathers the layer. The global token order becomes rank by rank (old, new): the function
    does not depend on the order of the tokens."""
    keys, values = layer.key_param_tokens, layer.value_param_tokens
    mesh, size = keys.device_mesh, keys.device_mesh.size()
    if new_keys.shape[0] % size:
        raise TokenFormerError(f"{new_keys.shape[0]} new tokens do not split evenly over tp_size {size}: grow by a "
                               f"multiple of {size} tokens")
    rank = mesh.get_local_rank()
    mine = slice(rank * (new_keys.shape[0] // size), (rank + 1) * (new_keys.shape[0] // size))

    def grown(old: DTensor, rows: torch.Tensor) -> DTensor:
        local = torch.cat([old.to_local().detach(), rows[mine].to(old.to_local())])  # (n/P + new/P, d)
        return DTensor.from_local(local, mesh, [Shard(0)])

    replace_rows(layer, grown(keys, new_keys), grown(values, new_values))


def grow(model: nn.Module, *, qkv_slot_num: int | None = None, proj_slot_num: int | None = None,
         ffn_slot_num: int | None = None, factor: float | None = None, mode: str = "exact",
         value_std: float | None = None, noise: float = 0.0, seed: int | None = None,
         generator: torch.Generator | None = None, **other_slot_nums: int | None) -> nn.Module:
    """A new model with more parameter tokens; `model` is left untouched.

    Give the new slot counts (`None` keeps one; `other_slot_nums` for a config with more than the
    three, e.g. a captioner's `vision_ffn_slot_num`) or `factor` (multiplies them all). `mode` is
    `exact` (same function; l2_norm_gelu and gelu_l2_norm only) or `official` (random new rows,
    scale follows n). `noise` > 0 perturbs the old tokens too (`grow_pattention`; as the official
    author suggests for a model whose schedule had ended; no longer the same function then).
    The config records the growth in `growth_history`.
    """
    if noise < 0:
        raise TokenFormerError(f"noise must be 0 or more (a share of each tensor's std), got {noise!r}")
    if mode not in MODES:
        raise TokenFormerError(f"unknown growth mode {mode!r}: use one of {', '.join(MODES)}")
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    if hasattr(model, "towers"):
        # A model of several towers (CLIP): each grows by the slot counts of its own config, one
        # generator for all, and the model states the towers' new configs.
        return model.with_towers({name: grow(tower, qkv_slot_num=qkv_slot_num, proj_slot_num=proj_slot_num,
                                             ffn_slot_num=ffn_slot_num, factor=factor, mode=mode,
                                             value_std=value_std, noise=noise, seed=seed, generator=generator,
                                             **other_slot_nums)
                                  for name, tower in model.towers().items()})
    config = model.config
    old, new = target_counts(config, dict(qkv_slot_num=qkv_slot_num, proj_slot_num=proj_slot_num,
                                          ffn_slot_num=ffn_slot_num, **other_slot_nums), factor, "grow")
    norm = getattr(config, "norm_activation_type", None)
    if mode == "exact" and norm not in EXACT_NORMALISATIONS and new != old:
        raise TokenFormerError(
            f"exact growth cannot preserve a {norm!r} model (with softmax a new token always takes "
            f"weight from the old ones): use mode='official'")

    if new == old:
        return copy.deepcopy(model)
    changes: dict[str, Any] = dict(new)
    for f in new:
        if new[f] != old[f]:  # every layer of a group had the same effective n: the config states it once
            changes[scale_field(f)] = (getattr(config, scale_field(f)) or old[f]) if mode == "exact" else None
    changes["growth_history"] = list(config.growth_history) + [
        history_entry(mode, old, new, value_std=value_std, seed=seed, noise=noise or None)]
    grown_config = replace_config(config, changes)  # checked (sizes included) before anything is allocated
    grown = copy.deepcopy(model)
    for f, layers in pattention_groups(grown).items():
        if new[f] != old[f]:
            for layer in layers.values():
                grow_pattention(layer, new[f], mode, value_std=value_std, noise=noise, generator=generator)
    grown.config = grown_config
    return grown


# ---- carrying the optimizer over ----------------------------------------------------------------

def grow_optimizer_state(optimizer_state: Mapping[str, Any], old_model: nn.Module,
                         new_model: nn.Module) -> dict[str, Any]:
    """Map an (Adam/AdamW) optimizer state dict of `old_model` to the shapes of `new_model`.

    Old rows keep their `exp_avg`, `exp_avg_sq`, ...; new rows start with zero moments (any
    dimension may grow: a widened linear layer's new columns start at zero too); `step`
    is kept, so the new rows' first updates are smaller than a fresh optimizer's (the bias
    correction is already ~1 while their moments are still near 0), a built-in warm-up.
    Load the result into an optimizer built the same way over `new_model`. Parameters are matched
    by name when the optimizer was built from `named_parameters()`, otherwise by order.
    """
    names = names_by_index(optimizer_state, in_order=[n for n, _ in old_model.named_parameters()])
    new_params = dict(new_model.named_parameters())
    state = copy.deepcopy(dict(optimizer_state))
    for index, per_param in state["state"].items():
        name = names[index]
        target = new_params.get(name)
        if target is None:
            raise TokenFormerError(f"parameter {name!r} of the old model is missing in the new one")
        for key, value in list(per_param.items()):
            if not torch.is_tensor(value) or value.shape == target.shape or value.dim() == 0:
                continue
            if value.dim() != target.dim() or any(o > n for o, n in zip(value.shape, target.shape)):
                raise TokenFormerError(
                    f"optimizer state {key!r} of {name!r} has shape {tuple(value.shape)}, which cannot "
                    f"grow into {tuple(target.shape)}: is new_model a grown old_model?")
            grown = value.new_zeros(target.shape)  # new rows (or columns, for a widened layer) start at 0
            grown[tuple(slice(0, o) for o in value.shape)] = value
            per_param[key] = grown
    return state


def grow_checkpoint(checkpoint: str | Path, out: str | Path, model: nn.Module | None = None,
                    **grow_kwargs: Any) -> tuple[nn.Module, nn.Module]:
    """Grow the model of `checkpoint` (anything `resolve_checkpoint` reads) into `out` (weights, config, tokenizer);
    returns (old model, grown model). `model`: the checkpoint's, if already loaded. `grow_kwargs` go to `grow`.

    When `checkpoint` is a training checkpoint (`SAVE/step_N` with a `trainer.pt`), `out` gets a
    `trainer.pt` too: the optimizer state mapped to the grown shapes (`grow_optimizer_state`: old
    rows keep their moments, new rows start at zero), the step and the data position, so that
    `train --init-from OUT` can carry the optimizer (`init_from_optimizer`) and continue the
    schedule (`init_from_schedule continue`).
    """
    checkpoint, out = resolve_checkpoint(checkpoint), Path(out)
    model = load_model(checkpoint) if model is None else model
    grown = grow(model, **grow_kwargs)
    grown.save_pretrained(out)
    copy_tokenizer(checkpoint, out)
    state = read_trainer_state(checkpoint)
    if state is not None:
        carried = {key: state[key] for key in ("step", "consumed_samples", "scheduler", "train_config")
                   if key in state}
        optimizer = state.get("optimizer")  # None when written sharded under FSDP2
        carried["optimizer"] = grow_optimizer_state(optimizer, model, grown) if optimizer is not None else None
        carried["grown_from"] = str(checkpoint)
        with atomic_path(out / TRAINER_STATE_FILE) as tmp:
            torch.save(carried, tmp)
    elif (out / TRAINER_STATE_FILE).is_file():  # a stale one from an earlier growth into the same folder
        (out / TRAINER_STATE_FILE).unlink()
    return model, grown
