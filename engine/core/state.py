"""Checks of a state dict (tensor names to tensors) against the shapes a spec expects: what loading a checkpoint,
building a model and streaming its layers share. ``layerfold.core.checkpoint`` re-exports them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

# the dtypes weights are held and stored in (what layerfold's safetensors reader reads as floating point)
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match its spec."""


def check_state_dict(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Any], *,
                     strict: bool = True, where: str = "checkpoint") -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped tensor."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{where}: tensor {missing[0]!r} is missing ({len(missing)} missing in all). "
                              "Fix: the weights do not match config.json; re-run the conversion or surgery")
    if strict:
        extra = [k for k in state if k not in expected]
        if extra:
            raise CheckpointError(f"{where}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all). "
                                  "Fix: the weights belong to a different model than config.json describes")
    for k, shape in expected.items():
        got = tuple(state[k].shape)
        if got != tuple(shape):
            raise CheckpointError(f"{where}: tensor {k!r} has shape {got}, the spec says {tuple(shape)}. "
                                  "Fix: config.json and model.safetensors come from different models")
        dt = getattr(state[k], "dtype", None)
        if dt is not None and dt not in WEIGHT_DTYPES:  # float8 is floating point, but no layerfold file holds it
            raise CheckpointError(f"{where}: tensor {k!r} is stored as {str(dt).removeprefix('torch.')}; model "
                                  "weights are float32, float16, bfloat16 or float64. Fix: re-create the checkpoint "
                                  "(convert or prune again); a quantised or hand-edited file is not a layerfold "
                                  "checkpoint")


def check_state(state: Any, what: str = "state") -> None:
    """A TypeError unless ``state`` is None or a mapping of tensor names to tensors (a state dict)."""
    if state is None:
        return
    if not isinstance(state, Mapping):
        got = f"a {type(state).__name__}"
    else:
        bad = next(((k, v) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)), None)
        got = None if bad is None else f"{bad[0]!r}: a {type(bad[1]).__name__}"
    if got is not None:
        raise TypeError(f"{what} must map tensor names to tensors (a state dict), got {got}. Fix: pass "
                        "model.state_dict() or the dict layerfold.load_spec_state returns")


def check_writable(state: Mapping[str, Tensor], where: str) -> None:
    """A CheckpointError naming the first tensor that holds no data a file could take (a meta tensor: built but
    never loaded; a sparse or quantised layout)."""
    for k, t in state.items():
        if t.is_meta or t.layout != torch.strided or t.is_quantized:
            how = "on the meta device (shapes, no data)" if t.is_meta else f"in the {t.layout} layout"
            raise CheckpointError(f"{where}: tensor {k!r} is {how}. Fix: save the weights themselves: load or build "
                                  "the model with its state (a dense tensor, t.to_dense())")


__all__ = ["WEIGHT_DTYPES", "CheckpointError", "check_state", "check_state_dict", "check_writable"]
