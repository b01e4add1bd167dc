"""Mixed precision: which numerics a `precision` setting (fp32, bf16, fp16) means on a device."""

from __future__ import annotations

import contextlib

import torch

from tokenformer.errors import TokenFormerError


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise TokenFormerError("precision fp16 needs a CUDA GPU (its loss scaling is a GPU feature): "
                               "use bf16 or fp32 on the CPU")


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward pass's context: nothing for fp32, autocast to bf16/fp16 otherwise."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def sharded_param_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """FSDP2's compute dtype on a GPU (gradients still reduce in float32); None: the weights' own."""
    if device.type != "cuda":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def grad_scaler(precision: str) -> torch.amp.GradScaler | None:
    """fp16's dynamic loss scaling (the released models' recipe); None for fp32 and bf16."""
    return torch.amp.GradScaler("cuda") if precision == "fp16" else None
