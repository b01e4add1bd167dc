"""Growing (and shrinking) a trained TokenFormer by its parameter tokens.

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

Shrinking removes the tokens whose mean |weight| on calibration data is smallest and sets the
normalisation's n so that the kept tokens keep their weights on average (see `shrink`).

For training after growth: `grow_optimizer_state` carries AdamW moments into the grown shapes,
and `freeze_old_tokens` trains only the new rows (the "freeze old" variant).

Everything works on one Pattention (`grow_pattention`, `shrink_pattention`) and on any model
whose Pattentions can be assigned to the qkv / proj / ffn slot groups (`pattention_groups`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from tokenformer.errors import TokenFormerError
from tokenformer.pattention import Pattention, normalise

MODES = ("exact", "official")
# Normalisations for which zero keys + a pinned n give the new tokens weight exactly 0.
EXACT_NORMALISATIONS = ("l2_norm_gelu", "gelu_l2_norm")
SLOT_FIELDS = ("qkv_slot_num", "proj_slot_num", "ffn_slot_num")


def _scale_field(slot_field: str) -> str:
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
    """The three slot counts of a config, e.g. `{"qkv_slot_num": 768, ...}`."""
    needed = SLOT_FIELDS + tuple(map(_scale_field, SLOT_FIELDS)) + ("growth_history",)
    missing = [f for f in needed if not hasattr(config, f)]
    if missing:
        raise TokenFormerError(
            f"{type(config).__name__} has no {missing[0]} field: only models whose config has "
            f"qkv/proj/ffn slot and scale counts and a growth_history can be grown or shrunk")
    return {f: getattr(config, f) for f in SLOT_FIELDS}


def old_slot_counts(config) -> dict[str, int]:
    """The slot counts before the most recent growth, read from `config.growth_history`."""
    history = getattr(config, "growth_history", None) or []
    if not history:
        raise TokenFormerError("this model has no growth in its growth_history: pass the old slot counts explicitly")
    if history[-1].get("mode") not in MODES:
        # After a shrink the first rows are no longer the pre-growth tokens.
        raise TokenFormerError("the last change in growth_history is not a growth: pass the old slot counts explicitly")
    return dict(history[-1]["from"])


def _target_counts(config, requested: Mapping[str, int | None], factor: float | None,
                   verb: str) -> dict[str, int]:
    current = slot_counts(config)
    if factor is not None:
        if any(v is not None for v in requested.values()):
            raise TokenFormerError(f"give either factor or slot counts to {verb}, not both")
        if factor <= 0:
            raise TokenFormerError(f"factor must be positive, got {factor}")
        return {f: max(1, int(round(n * factor))) for f, n in current.items()}
    if all(v is None for v in requested.values()):
        raise TokenFormerError(f"nothing to {verb}: give a factor or at least one of "
                               f"qkv_slot_num, proj_slot_num, ffn_slot_num")
    target = {f: current[f] if requested[f] is None else requested[f] for f in SLOT_FIELDS}
    for f, n in target.items():
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise TokenFormerError(f"{f} must be a positive integer, got {n!r}")
    return target


def _history_entry(mode: str, old: dict[str, int], new: dict[str, int], **extra: Any) -> dict[str, Any]:
    entry = {"mode": mode, "from": old, "to": new,
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    entry.update({k: v for k, v in extra.items() if v is not None})
    return entry


def _random_rows(shape: tuple[int, int], std: float, like: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
    # Drawn in float32 on the CPU so that a seed gives the same rows on every device and dtype.
    rows = torch.randn(shape, generator=generator, dtype=torch.float32) * std
    return rows.to(device=like.device, dtype=like.dtype)


def _replace_rows(layer: Pattention, keys: torch.Tensor, values: torch.Tensor) -> None:
    old_k, old_v = layer.key_param_tokens, layer.value_param_tokens
    layer.key_param_tokens = nn.Parameter(keys, requires_grad=old_k.requires_grad)
    layer.value_param_tokens = nn.Parameter(values, requires_grad=old_v.requires_grad)


# ---- growing ------------------------------------------------------------------------------------

@torch.no_grad()
def grow_pattention(layer: Pattention, num_tokens: int, mode: str = "exact", *,
                    value_std: float | None = None,
                    generator: torch.Generator | None = None) -> Pattention:
    """Append parameter tokens to one Pattention in place, up to `num_tokens`; returns it.

    `exact`: zero keys, values N(0, value_std) (default: the layer's init std), `scale_num`
    pinned at the old effective n. `official`: keys N(0, key_std), values N(0, value_std),
    `scale_num = None`. See the module docstring for why.
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
    _replace_rows(layer, torch.cat([keys.detach(), new_keys]),       # (num_tokens, d_in)
                  torch.cat([values.detach(), new_values]))          # (num_tokens, d_out)
    return layer


def grow(model: nn.Module, *, qkv_slot_num: int | None = None, proj_slot_num: int | None = None,
         ffn_slot_num: int | None = None, factor: float | None = None, mode: str = "exact",
         value_std: float | None = None, seed: int | None = None,
         generator: torch.Generator | None = None) -> nn.Module:
    """A new model with more parameter tokens; `model` is left untouched.

    Give the new slot counts (`None` keeps one) or `factor` (multiplies all three). `mode` is
    `exact` (same function; l2_norm_gelu and gelu_l2_norm only) or `official` (random new rows,
    scale follows n). The config records the growth in `growth_history`.
    """
    if mode not in MODES:
        raise TokenFormerError(f"unknown growth mode {mode!r}: use one of {', '.join(MODES)}")
    config = model.config
    old = slot_counts(config)
    new = _target_counts(config, dict(qkv_slot_num=qkv_slot_num, proj_slot_num=proj_slot_num,
                                      ffn_slot_num=ffn_slot_num), factor, "grow")
    for f in SLOT_FIELDS:
        if new[f] < old[f]:
            raise TokenFormerError(
                f"cannot grow {f} from {old[f]} to the smaller {new[f]}: use shrink to remove tokens")
    norm = getattr(config, "norm_activation_type", None)
    if mode == "exact" and norm not in EXACT_NORMALISATIONS and new != old:
        raise TokenFormerError(
            f"exact growth cannot preserve a {norm!r} model (with softmax a new token always takes "
            f"weight from the old ones): use mode='official'")
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)

    grown = copy.deepcopy(model)
    if new == old:
        return grown
    changes: dict[str, Any] = dict(new)
    for f, layers in pattention_groups(grown).items():
        if new[f] == old[f]:
            continue
        for layer in layers.values():
            grow_pattention(layer, new[f], mode, value_std=value_std, generator=generator)
        # Every layer of a group had the same effective n, so the config can state it once.
        changes[_scale_field(f)] = (getattr(config, _scale_field(f)) or old[f]) if mode == "exact" else None
    changes["growth_history"] = list(config.growth_history) + [
        _history_entry(mode, old, new, value_std=value_std, seed=seed)]
    grown.config = dataclasses.replace(config, **changes)
    return grown


# ---- carrying the optimizer over ----------------------------------------------------------------

def _param_names_by_index(state_dict: Mapping[str, Any], model: nn.Module) -> list[str]:
    groups = state_dict["param_groups"]
    if all("param_names" in g for g in groups):
        names: dict[int, str] = {}
        for g in groups:
            names.update(zip(g["params"], g["param_names"]))
        return [names[i] for i in sorted(names)]
    # Without names, the optimizer must have been built over model.parameters() in their order.
    names = [n for n, _ in model.named_parameters()]
    count = sum(len(g["params"]) for g in groups)
    if count != len(names):
        raise TokenFormerError(
            f"the optimizer holds {count} parameters but the model {len(names)}: build the optimizer "
            f"from model.named_parameters() so that its state can be matched by name")
    return names


def grow_optimizer_state(optimizer_state: Mapping[str, Any], old_model: nn.Module,
                         new_model: nn.Module) -> dict[str, Any]:
    """Map an (Adam/AdamW) optimizer state dict of `old_model` to the shapes of `new_model`.

    Old rows keep their `exp_avg`, `exp_avg_sq`, ...; new rows start with zero moments; `step`
    is kept, so the new rows' first updates are smaller than a fresh optimizer's (the bias
    correction is already ~1 while their moments are still near 0), a built-in warm-up.
    Load the result into an optimizer built the same way over `new_model`. Parameters are matched
    by name when the optimizer was built from `named_parameters()`, otherwise by order.
    """
    names = _param_names_by_index(optimizer_state, old_model)
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
            if value.shape[1:] != target.shape[1:] or value.shape[0] > target.shape[0]:
                raise TokenFormerError(
                    f"optimizer state {key!r} of {name!r} has shape {tuple(value.shape)}, which cannot "
                    f"grow into {tuple(target.shape)}: is new_model a grown old_model?")
            pad = value.new_zeros((target.shape[0] - value.shape[0],) + tuple(value.shape[1:]))
            per_param[key] = torch.cat([value, pad])  # (n_new, d)
    return state


# ---- training only the new rows ------------------------------------------------------------------

class FrozenOldTokens:
    """Keeps the old parameters of a grown model fixed while its new rows train.

    Masking gradients is not enough with AdamW: decoupled weight decay (`p -= lr * wd * p`) and
    momentum from an earlier state move a row whose gradient is zero. So the old rows are
    snapshotted and copied back after every optimizer step (`restore`, registered as a step
    post-hook when an optimizer is given): bit-identical whatever the optimizer does. Their
    gradients are also zeroed (so gradient clipping measures the trainable rows only). Tensors
    with no new rows (embedding, final norm) get `requires_grad = False`; AdamW skips them.
    """

    def __init__(self, model: nn.Module, old_counts: Mapping[str, int] | None = None,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        old_counts = dict(old_slot_counts(model.config) if old_counts is None else old_counts)
        self._snapshots: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handles: list[Any] = []
        self._frozen_whole: list[nn.Parameter] = []
        partial: set[int] = set()
        for f, layers in pattention_groups(model).items():
            n_old = old_counts.get(f)
            for name, layer in layers.items():
                if n_old is None or n_old > layer.num_tokens:
                    raise TokenFormerError(
                        f"old count {f}={n_old} does not fit {name} with {layer.num_tokens} tokens")
                if n_old == layer.num_tokens:
                    continue  # nothing new here: frozen whole below
                for param in (layer.key_param_tokens, layer.value_param_tokens):
                    partial.add(id(param))
                    self._snapshots.append((param, param.detach()[:n_old].clone()))
                    self._handles.append(param.register_hook(_zero_rows_hook(n_old)))
        for param in model.parameters():
            if id(param) not in partial and param.requires_grad:
                param.requires_grad_(False)
                self._frozen_whole.append(param)
        if optimizer is not None:
            self.attach(optimizer)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Restore the old rows after every step of `optimizer` (one built after freezing, which
        then leaves out the tensors frozen whole)."""
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.restore()))

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the old rows back (call after `optimizer.step()` unless an optimizer was given)."""
        for param, old_rows in self._snapshots:
            param[:old_rows.shape[0]].copy_(old_rows)

    def remove(self) -> None:
        """Unfreeze: drop the hooks and make every frozen tensor trainable again."""
        for handle in self._handles:
            handle.remove()
        for param in self._frozen_whole:
            param.requires_grad_(True)
        self._handles, self._snapshots, self._frozen_whole = [], [], []


def _zero_rows_hook(n_old: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:n_old] = 0
        return grad
    return hook


def freeze_old_tokens(model: nn.Module, old_counts: Mapping[str, int] | None = None,
                      optimizer: torch.optim.Optimizer | None = None) -> FrozenOldTokens:
    """Train only the rows added by the last growth (`old_counts` default: from the history).

    With `optimizer`, the old rows are restored after each of its steps; without, call
    `.restore()` after each step yourself. `.remove()` undoes everything.
    """
    return FrozenOldTokens(model, old_counts, optimizer)


# ---- shrinking ----------------------------------------------------------------------------------

def _calibration_batches(calibration) -> list[torch.Tensor]:
    if calibration is None:
        raise TokenFormerError("shrink needs calibration data: token id batches (B, T) to score the tokens on")
    batches = [calibration] if torch.is_tensor(calibration) else list(calibration)
    batches = [b[None] if b.dim() == 1 else b for b in batches]  # (B, T)
    if not batches or all(b.numel() == 0 for b in batches):
        raise TokenFormerError("the calibration data is empty: give at least one batch of token ids")
    return batches


def _capture_inputs(model: nn.Module, layers: Mapping[str, Pattention], batches: list[torch.Tensor],
                    consume) -> None:
    """Run the calibration batches; `consume(name, layer, x)` sees every Pattention's input."""
    handles = [layer.register_forward_hook(lambda module, inputs, output, name=name:
                                           consume(name, module, inputs[0]))
               for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            for batch in batches:
                model(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def _all_layers(model: nn.Module) -> dict[str, Pattention]:
    return {name: layer for group in pattention_groups(model).values() for name, layer in group.items()}


def token_scores(model: nn.Module, calibration) -> dict[str, torch.Tensor]:
    """Mean |theta(s)| of every parameter token of every Pattention over the calibration batches.

    Returns module name -> (num_tokens,) float64 scores. The weights are recomputed from each
    Pattention's captured input with its own normalisation and n.
    """
    layers = _all_layers(model)
    sums = {name: torch.zeros(layer.num_tokens, dtype=torch.float64) for name, layer in layers.items()}
    counts = dict.fromkeys(layers, 0)

    def consume(name: str, layer: Pattention, x: torch.Tensor) -> None:
        scores = x @ layer.key_param_tokens.T  # (..., n)
        weights = normalise(scores, layer.norm_activation_type, layer.effective_scale_num)
        weights = weights.reshape(-1, layer.num_tokens)  # (positions, n)
        sums[name] += weights.abs().sum(0).double().cpu()
        counts[name] += weights.shape[0]

    _capture_inputs(model, layers, _calibration_batches(calibration), consume)
    return {name: sums[name] / max(counts[name], 1) for name in layers}


def _normaliser_mass(scores: torch.Tensor, norm_activation_type: str) -> torch.Tensor:
    """What each token adds to its normaliser: s^2 under ||s||, gelu(s)^2 under ||gelu(s)||, exp(s)."""
    scores = scores.double()
    if norm_activation_type == "l2_norm_gelu":
        return scores ** 2
    if norm_activation_type == "gelu_l2_norm":
        return torch.nn.functional.gelu(scores) ** 2
    # softmax: a shift by the row max changes no ratio of sums and keeps exp finite
    return torch.exp(scores - scores.amax(dim=-1, keepdim=True))


def _kept_mass_fractions(model: nn.Module, keep: Mapping[str, torch.Tensor],
                         batches: list[torch.Tensor]) -> dict[str, float]:
    """Per Pattention, the mean share of its normaliser's mass that the kept tokens carry."""
    layers = {name: layer for name, layer in _all_layers(model).items() if name in keep}
    sums, counts = dict.fromkeys(layers, 0.0), dict.fromkeys(layers, 0)

    def consume(name: str, layer: Pattention, x: torch.Tensor) -> None:
        mass = _normaliser_mass(x @ layer.key_param_tokens.T, layer.norm_activation_type)
        mass = mass.reshape(-1, layer.num_tokens)  # (positions, n)
        total = mass.sum(-1)
        kept = mass[:, keep[name].to(mass.device)].sum(-1)
        # An all-zero row has no normaliser to preserve: count it as fully kept.
        share = torch.where(total > 0, kept / total.clamp_min(1e-300), torch.ones_like(total))
        sums[name] += share.sum().item()
        counts[name] += share.numel()

    _capture_inputs(model, layers, batches, consume)
    return {name: sums[name] / max(counts[name], 1) for name in layers}


@torch.no_grad()
def shrink_pattention(layer: Pattention, keep: torch.Tensor) -> Pattention:
    """Keep only the tokens at indices `keep` (in the given order), in place; n stays pinned."""
    if len(keep) == layer.num_tokens and torch.equal(keep.cpu(), torch.arange(layer.num_tokens)):
        return layer
    layer.scale_num = layer.effective_scale_num  # read before the count changes
    keep = keep.to(layer.key_param_tokens.device)
    _replace_rows(layer, layer.key_param_tokens.detach()[keep].clone(),      # (k, d_in)
                  layer.value_param_tokens.detach()[keep].clone())           # (k, d_out)
    return layer


SHRINK_SCALES = ("calibrated", "pinned", "count")


def shrink(model: nn.Module, *, qkv_slot_num: int | None = None, proj_slot_num: int | None = None,
           ffn_slot_num: int | None = None, factor: float | None = None,
           calibration=None, scale: str = "calibrated") -> nn.Module:
    """A new model with fewer parameter tokens: those with the largest mean |weight| on `calibration`.

    `calibration` is a (B, T) tensor of token ids (any model input, e.g. images for a vision
    model) or an iterable of them. In every Pattention the tokens are scored by their mean
    absolute normalised weight `theta(s)` over all calibration positions; the top ones are kept in
    their original order.

    `scale` sets the n of the normalisation afterwards. Each kept token's normalised score is
    `s_i * sqrt(n) / ||s||` (l2 variants) or `exp(s_i) * n / sum exp(s)` (softmax); dropping tokens
    shrinks the norm or sum to a share `r` of its "mass" (s^2, gelu(s)^2 or exp(s)), so every kept
    weight stays the same when n becomes `n_old * r`:
      - `calibrated` (default): n = n_old times the mean share r measured on the calibration data,
        averaged over the Pattentions of a slot group (the config holds one n per group);
      - `pinned`: n = n_old (exact when the dropped tokens carry no mass, r = 1);
      - `count`: n = the new token count, as a model of that size built from scratch would use.
    On a trained tiny model (README, "Shrinking") `calibrated` lost clearly less than the other two.
    Tokens whose weight is always 0 (such as the zero keys of an exact growth) carry no mass and
    are removed without changing the function. Shrinking to the current counts returns a copy.
    """
    if scale not in SHRINK_SCALES:
        raise TokenFormerError(f"unknown shrink scale {scale!r}: use one of {', '.join(SHRINK_SCALES)}")
    config = model.config
    old = slot_counts(config)
    new = _target_counts(config, dict(qkv_slot_num=qkv_slot_num, proj_slot_num=proj_slot_num,
                                      ffn_slot_num=ffn_slot_num), factor, "shrink")
    for f in SLOT_FIELDS:
        if new[f] > old[f]:
            raise TokenFormerError(
                f"cannot shrink {f} from {old[f]} to the larger {new[f]}: use grow to add tokens")
    shrunk = copy.deepcopy(model)
    if new == old:
        return shrunk
    batches = _calibration_batches(calibration)
    scores = token_scores(shrunk, batches)
    groups = {f: layers for f, layers in pattention_groups(shrunk).items() if new[f] != old[f]}
    keep = {name: torch.topk(scores[name], new[f]).indices.sort().values
            for f, layers in groups.items() for name in layers}
    shares = _kept_mass_fractions(shrunk, keep, batches) if scale == "calibrated" else {}
    changes: dict[str, Any] = dict(new)
    for f, layers in groups.items():
        n_old = getattr(config, _scale_field(f)) or old[f]
        if scale == "calibrated":
            share = sum(shares[name] for name in layers) / len(layers)
            scale_num = max(1, round(n_old * share))
        else:
            scale_num = n_old if scale == "pinned" else None
        for name, layer in layers.items():
            shrink_pattention(layer, keep[name])
            layer.scale_num = scale_num
        changes[_scale_field(f)] = scale_num
    changes["growth_history"] = list(config.growth_history) + [
        _history_entry("shrink", old, new, scale=scale)]
    shrunk.config = dataclasses.replace(config, **changes)
    return shrunk


# ---- command line -------------------------------------------------------------------------------

# model_type in config.json -> how to load it. The vision model registers here when it lands.
MODEL_LOADERS = {"tokenformer": ("tokenformer.model", "TokenFormer"),
                 "vision_tokenformer": ("tokenformer.vision", "VisionTokenFormer")}


def load_checkpoint(directory: str | Path) -> nn.Module:
    """Load any checkpoint directory whose `model_type` can be grown or shrunk."""
    import importlib
    import json

    from tokenformer.model import CONFIG_FILE

    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: is {directory} a checkpoint directory?")
    model_type = json.loads(config_path.read_text()).get("model_type", "tokenformer")
    if model_type not in MODEL_LOADERS:
        raise TokenFormerError(
            f"{directory} holds a {model_type!r} model, which cannot be grown or shrunk here: "
            f"give a checkpoint of type {', '.join(map(repr, MODEL_LOADERS))}")
    module_name, class_name = MODEL_LOADERS[model_type]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        raise TokenFormerError(f"{directory} holds a {model_type!r} model, which this installation "
                               f"cannot load ({module_name} is missing)") from None
    return getattr(module, class_name).from_pretrained(directory)


def _save_with_tokenizer(model: nn.Module, source: Path, out: Path) -> None:
    import shutil

    from tokenformer.checkpoint import atomic_path
    from tokenformer.model import TOKENIZER_FILE

    model.save_pretrained(out)
    if (source / TOKENIZER_FILE).is_file():
        with atomic_path(out / TOKENIZER_FILE) as tmp:
            shutil.copyfile(source / TOKENIZER_FILE, tmp)


def _describe(model: nn.Module) -> str:
    counts = slot_counts(model.config)
    return (f"{model.num_parameters():,} parameters (qkv {counts['qkv_slot_num']}, "
            f"proj {counts['proj_slot_num']}, ffn {counts['ffn_slot_num']} tokens)")


def _slot_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory to read")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    for group in ("qkv", "proj", "ffn"):
        parser.add_argument(f"--{group}-slot-num", type=int, default=None,
                            help=f"new {group} token count (default: unchanged)")
    parser.add_argument("--factor", type=float, default=None,
                        help=f"multiply all three token counts by this factor instead (e.g. {example})")


def _slot_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(qkv_slot_num=args.qkv_slot_num, proj_slot_num=args.proj_slot_num,
                ffn_slot_num=args.ffn_slot_num, factor=args.factor)


def grow_cli_arguments(parser: argparse.ArgumentParser) -> None:
    _slot_arguments(parser, "2")
    parser.add_argument("--mode", choices=MODES, default="exact",
                        help="exact: zero new keys and a pinned n, the same function (default); "
                             "official: random new rows as the official code, not function-preserving")
    parser.add_argument("--value-std", type=float, default=None,
                        help="std of the new value tokens (default: the model's init std, 2/num_layers/sqrt(hidden))")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new random rows (default 0)")
    parser.add_argument("--data", type=Path, default=None,
                        help="also print the loss before and after growing on these documents: a `tokenformer "
                             "prepare` directory (its valid split), an indexed dataset prefix or a .jsonl(.gz)")
    parser.add_argument("--data-tokens", type=int, default=32768,
                        help="score the first N tokens of --data (whole documents, the last one cut; default 32768)")


def _first_tokens(data: Path, tokenizer, budget: int) -> list[tuple[list[int], int]]:
    from tokenformer.evaluate import load_documents

    if budget < 1:
        raise TokenFormerError(f"--data-tokens must be a positive integer, got {budget}")
    documents, total = [], 0
    for ids, size in load_documents(data, tokenizer):
        ids = list(ids)[:budget - total]
        documents.append((ids, size))
        total += len(ids)
        if total >= budget:
            break
    return documents


def _loss_on(model: nn.Module, documents: list[tuple[list[int], int]], eos_id: int) -> float:
    """Mean next-token loss of a language model on `documents` (each scored on its own)."""
    from tokenformer.evaluate import perplexity

    return perplexity(model.eval(), documents, eos_id, progress=False).loss


def grow_checkpoint(checkpoint: str | Path, out: str | Path, **grow_kwargs: Any) -> tuple[nn.Module, nn.Module]:
    """Grow the model of checkpoint directory `checkpoint` into `out` (weights, config, tokenizer);
    returns (old model, grown model). `grow_kwargs` go to `grow`.

    When `checkpoint` is a training checkpoint (`SAVE/step_N` with a `trainer.pt`), `out` gets a
    `trainer.pt` too: the optimizer state mapped to the grown shapes (`grow_optimizer_state`: old
    rows keep their moments, new rows start at zero), the step and the data position, so that
    `train --init-from OUT` can carry the optimizer (`init_from_optimizer`) and continue the
    schedule (`init_from_schedule continue`).
    """
    from tokenformer.checkpoint import atomic_path
    from tokenformer.train import TRAINER_STATE_FILE
    from tokenformer.warm_start import read_source_state

    checkpoint, out = Path(checkpoint), Path(out)
    model = load_checkpoint(checkpoint)
    grown = grow(model, **grow_kwargs)
    _save_with_tokenizer(grown, checkpoint, out)
    state = read_source_state(checkpoint)
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


def grow_cli_main(args: argparse.Namespace) -> None:
    """Grow a checkpoint by appending parameter tokens to every Pattention.

    `--mode exact` (default) keeps the model's function: new keys are zero and the normalisation's n
    stays at the old count. `--mode official` initialises the new rows randomly as the official
    code does. The tokenizer is copied; the growth is recorded in config.json (growth_history).
    A training checkpoint's optimizer state is mapped to the grown shapes (trainer.pt), for
    `tokenformer train --init-from OUT --init-from-optimizer --init-from-schedule continue`."""
    model, grown = grow_checkpoint(args.checkpoint, args.out, mode=args.mode, value_std=args.value_std,
                                   seed=args.seed, **_slot_kwargs(args))
    print(f"old: {_describe(model)}")
    print(f"new: {_describe(grown)}  ({args.mode} growth, written to {args.out})")
    if (Path(args.out) / "trainer.pt").is_file():
        print("optimizer state and training step carried over (trainer.pt)")
    if args.data is not None:
        if getattr(model, "model_type", "tokenformer") != "tokenformer":
            raise TokenFormerError(f"grow --data scores a language model on text, not a {model.model_type!r} model")
        from tokenformer.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.checkpoint)
        documents = _first_tokens(args.data, tokenizer, args.data_tokens)
        before, after = _loss_on(model, documents, tokenizer.eos_id), _loss_on(grown, documents, tokenizer.eos_id)
        tokens = sum(len(ids) for ids, _ in documents)
        print(f"validation loss on {args.data} ({tokens:,} tokens): before growing {before:.6f}, "
              f"after {after:.6f} (difference {after - before:+.2e})")


def shrink_cli_arguments(parser: argparse.ArgumentParser) -> None:
    _slot_arguments(parser, "0.5")
    parser.add_argument("--data", required=True, type=Path,
                        help="calibration and validation text: a .txt file, or .jsonl / .jsonl.gz with a 'text' field per line")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="tokens per window (default: the model's seq_length, at most 512)")
    parser.add_argument("--calibration-windows", type=int, default=8,
                        help="windows from the start of the data used to score the tokens (default 8)")
    parser.add_argument("--validation-windows", type=int, default=8,
                        help="windows from the end of the data, held out, for the loss before/after (default 8)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument("--scale", choices=SHRINK_SCALES, default="calibrated",
                        help="n of the normalisation afterwards: calibrated (default) keeps the kept tokens' "
                             "weights on average, pinned keeps the old n, count uses the new token count")


def read_documents(path: Path) -> list[str]:
    """The documents of a text file (one document) or a JSONL(.gz) file (field `text`)."""
    import gzip
    import json

    path = Path(path)
    if not path.exists() and (Path(f"{path}.idx").is_file() or Path(f"{path}.bin").is_file()):
        raise TokenFormerError(
            f"{path} is a GPT-NeoX indexed dataset prefix, which shrink cannot read yet: give a .txt or .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        if ".jsonl" not in path.suffixes:
            return [f.read()]
        documents = []
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                documents.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise TokenFormerError(f"{path} line {number} is not a JSON object with a 'text' field") from None
    return documents


def token_windows(documents: list[str], tokenizer, length: int) -> torch.Tensor:
    """Non-overlapping windows (N, length + 1) over the documents joined by end-of-text tokens."""
    stream: list[int] = []
    for ids in tokenizer.encode_batch(documents):
        stream.extend(ids)
        stream.append(tokenizer.eos_id)
    n = len(stream) // (length + 1)
    return torch.tensor(stream[:n * (length + 1)], dtype=torch.long).view(n, length + 1)  # (N, length+1)


@torch.no_grad()
def mean_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy over windows (N, T + 1)."""
    import torch.nn.functional as F

    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(batch[:, :-1]).float()  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    return total / count


def shrink_cli_main(args: argparse.Namespace) -> None:
    """Shrink a checkpoint by removing the parameter tokens that matter least.

    Every Pattention's tokens are scored by their mean |normalised weight| on the first
    `--calibration-windows` windows of `--data`; the top ones are kept and the normalisation's n is
    set so that their weights stay the same on average (`--scale`). The validation loss on the last `--validation-windows` windows (held out) is
    printed before and after. The tokenizer is copied."""
    from tokenformer.tokenizer import load_tokenizer

    model = load_checkpoint(args.checkpoint)
    if getattr(model, "model_type", "tokenformer") != "tokenformer":
        raise TokenFormerError(f"shrink --data scores a language model on text; for a {model.model_type!r} "
                               f"model call tokenformer.shrink with batches of its own inputs")
    tokenizer = load_tokenizer(args.checkpoint)
    if tokenizer.vocab_size > model.config.padded_vocab_size:
        raise TokenFormerError(f"the checkpoint's tokenizer has {tokenizer.vocab_size} tokens, more than "
                               f"the model's {model.config.padded_vocab_size}")
    length = args.seq_length or min(model.config.seq_length, 512)
    windows = token_windows(read_documents(args.data), tokenizer, length)
    needed = args.calibration_windows + args.validation_windows
    if len(windows) < needed:
        raise TokenFormerError(f"{args.data} gives {len(windows)} windows of {length + 1} tokens but "
                               f"{needed} are needed: give more data or fewer/shorter windows")
    calibration = windows[:args.calibration_windows, :-1].split(args.batch_size)
    validation = windows[len(windows) - args.validation_windows:]
    shrunk = shrink(model, calibration=calibration, scale=args.scale, **_slot_kwargs(args))
    before, after = mean_loss(model, validation, args.batch_size), mean_loss(shrunk, validation, args.batch_size)
    _save_with_tokenizer(shrunk, args.checkpoint, args.out)
    print(f"old: {_describe(model)}")
    print(f"new: {_describe(shrunk)}  (written to {args.out})")
    print(f"validation loss ({args.validation_windows} windows of {length} tokens): "
          f"before {before:.4f} (ppl {math.exp(before):.2f}), after {after:.4f} (ppl {math.exp(after):.2f})")


# A module serving several subcommands: name -> (cli_arguments, cli_main); see tokenformer.__main__.
CLI = {"grow": (grow_cli_arguments, grow_cli_main), "shrink": (shrink_cli_arguments, shrink_cli_main)}
