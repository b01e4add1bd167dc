"""An optimizer state dict by parameter name: the one mapping that resuming under FSDP2, carrying
the optimizer into a warm start, and growing the optimizer state with the model all use.

`optimizer.state_dict()` numbers parameters; the optimizers of this package also write the names
beside the numbers (`param_names` in each group, see `tokenformer.training.optim`). Wrappers prefix
names (DDP `module.`, torch.compile `_orig_mod.`): `plain_name` strips them, so a state saved under
one wrapper matches a model under another or none.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from tokenformer.errors import TokenFormerError

NAME_PREFIXES = ("module.", "_orig_mod.")


def plain_name(name: str) -> str:
    """`name` without the prefixes wrappers add (any number of them, in any order)."""
    changed = True
    while changed:
        changed = False
        for prefix in NAME_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def names_by_index(state_dict: Mapping[str, Any], in_order: Sequence[str] | None = None,
                   source: str = "the optimizer state", fix: str = "build the optimizer with "
                   "tokenformer.training.optim.build_optimizer") -> dict[int, str]:
    """Parameter number -> plain name. Without `param_names` in the groups, `in_order` (the model's
    `named_parameters()` names, the order an optimizer built over `model.parameters()` numbers
    them) is used if given; otherwise the error says `fix`."""
    groups = state_dict["param_groups"]
    if all("param_names" in g for g in groups):
        names: dict[int, str] = {}
        for g in groups:
            names.update((index, plain_name(name)) for index, name in zip(g["params"], g["param_names"]))
        return names
    if in_order is None:
        raise TokenFormerError(f"{source} has no parameter names, so it cannot be matched to the model: {fix}")
    count = sum(len(g["params"]) for g in groups)
    if count != len(in_order):
        raise TokenFormerError(
            f"{source} holds {count} parameters but the model {len(in_order)}: build the optimizer "
            f"from model.named_parameters() so that its state can be matched by name")
    indices = sorted(index for g in groups for index in g["params"])
    return {index: plain_name(name) for index, name in zip(indices, in_order)}


def state_by_name(state_dict: Mapping[str, Any], source: str = "the optimizer state",
                  fix: str = "build the optimizer with tokenformer.training.optim.build_optimizer"
                  ) -> dict[str, dict[str, Any]]:
    """The per-parameter state (AdamW moments, step) keyed by plain parameter name."""
    names = names_by_index(state_dict, source=source, fix=fix)
    return {names[index]: value for index, value in state_dict["state"].items()}
