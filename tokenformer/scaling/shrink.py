"""Shrinking a trained TokenFormer by its parameter tokens: keep those with the largest mean
|weight| on calibration data, and set the normalisation's n so that the kept tokens keep their
weights on average."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

import torch
from torch import nn

from tokenformer.errors import TokenFormerError
from tokenformer.models.pattention import Pattention, normalise
from tokenformer.scaling.grow import history_entry, pattention_groups, replace_rows, scale_field, target_counts


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
    replace_rows(layer, layer.key_param_tokens.detach()[keep].clone(),      # (k, d_in)
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
    old, new = target_counts(config, dict(qkv_slot_num=qkv_slot_num, proj_slot_num=proj_slot_num,
                                          ffn_slot_num=ffn_slot_num), factor, "shrink")
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
        n_old = getattr(config, scale_field(f)) or old[f]
        if scale == "calibrated":
            share = sum(shares[name] for name in layers) / len(layers)
            scale_num = max(1, round(n_old * share))
        else:
            scale_num = n_old if scale == "pinned" else None
        for name, layer in layers.items():
            shrink_pattention(layer, keep[name])
            layer.scale_num = scale_num
        changes[scale_field(f)] = scale_num
    changes["growth_history"] = list(config.growth_history) + [
        history_entry("shrink", old, new, scale=scale)]
    shrunk.config = dataclasses.replace(config, **changes)
    return shrunk
