"""Healing's resumable optimizer state without pickle: tensors in safetensors, the rest in JSON.

``optim.safetensors`` holds each AdamW state tensor as ``optim.NAME.KEY`` (NAME: the parameter's name, so
the state does not depend on the order an optimizer lists its parameters) and the torch RNG state as
``rng_state``; ``optim.json`` holds the param groups' hyperparameters (with parameter names) and any
non-tensor state value. Loading reads only these two files: an ``optim.pt`` (a pickle, as older
layerfold wrote) is refused with the fix, never unpickled, since unpickling a crafted file runs its code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

OPTIM_TENSORS, OPTIM_JSON, RNG_KEY = "optim.safetensors", "optim.json", "rng_state"


def optimizer_state_by_name(sd: dict[str, Any], names: list[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer ``state_dict`` (parameters by index) as safetensors tensors ``optim.NAME.KEY`` and a
    JSON-able dict: the param groups' hyperparameters with parameter names, and non-tensor state values."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{names[idx]}.{key}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(names[idx], {})[key] = v
    groups = [{**{k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"},
               "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_state_by_index(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The name-keyed state of :func:`load_optimizer` as a ``state_dict`` for an optimizer over ``names``."""
    idx = {n: i for i, n in enumerate(names)}
    missing = [n for g in state["param_groups"] for n in g["params"] if n not in idx]
    if missing:
        raise ValueError(f"the saved optimizer state names parameter {missing[0]!r}, which this phase does not "
                         "train. Fix: start over without --resume")
    groups = [{**{k: tuple(v) if k == "betas" else v for k, v in g.items() if k != "params"},
               "params": [idx[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {idx[n]: st for n, st in state["state"].items()}, "param_groups": groups}


def load_optimizer(d: Path) -> tuple[dict[str, Any] | None, Tensor]:
    """(name-keyed optimizer state or None, torch RNG state) from ``d``; never unpickles anything."""
    tf, jf = d / OPTIM_TENSORS, d / OPTIM_JSON
    if not (tf.is_file() and jf.is_file()):
        old = " It holds optim.pt, a pickle written by an older layerfold, which is never loaded (unpickling a " \
              "file can run any code)." if (d / "optim.pt").exists() else ""
        raise ValueError(f"{d}: the healing state has no {OPTIM_TENSORS} / {OPTIM_JSON}.{old} Fix: start over "
                         f"without --resume (remove {d.parent} or choose another --out)")
    try:
        meta = json.loads(jf.read_text(encoding="utf-8"))
        tensors = load_file(str(tf))
    except (ValueError, RecursionError, OSError, SafetensorError) as e:  # ValueError: bad JSON or UTF-8
        raise ValueError(f"{d}: damaged healing state ({type(e).__name__}: {e}). Fix: start over without "
                         "--resume") from None
    if not isinstance(meta, dict) or meta.get("format") != "layerfold-heal-optim" or RNG_KEY not in tensors:
        raise ValueError(f"{jf}: not a layerfold healing state. Fix: start over without --resume")
    opt = meta.get("optimizer")
    if opt is None:
        return None, tensors[RNG_KEY]
    if not _optimizer_meta_ok(opt):
        raise ValueError(f"{jf}: damaged healing state (the optimizer's param_groups / scalars are not what layerfold "
                         "writes). Fix: start over without --resume")
    state: dict[str, dict[str, Any]] = {n: dict(v) for n, v in opt.get("scalars", {}).items()}
    for key, t in tensors.items():
        if key.startswith("optim."):
            name, _, field = key[len("optim."):].rpartition(".")
            state.setdefault(name, {})[field] = t
    return {"state": state, "param_groups": opt["param_groups"]}, tensors[RNG_KEY]


def _optimizer_meta_ok(opt: Any) -> bool:
    """optim.json's "optimizer": param groups (objects naming their parameters, numeric hyperparameters) and
    per-parameter scalar state (objects)."""
    if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list):
        return False
    scalars = opt.get("scalars", {})
    if not isinstance(scalars, dict) or not all(isinstance(v, dict) for v in scalars.values()):
        return False
    for g in opt["param_groups"]:
        if not isinstance(g, dict) or not isinstance(g.get("params"), list) \
                or not all(isinstance(n, str) for n in g["params"]):
            return False
        for k in ("lr", "weight_decay", "eps"):
            if k in g and (isinstance(g[k], bool) or not isinstance(g[k], (int, float))):
                return False
        if "betas" in g and not (isinstance(g["betas"], list) and len(g["betas"]) == 2
                                 and all(isinstance(b, (int, float)) for b in g["betas"])):
            return False
    return True


__all__ = ["OPTIM_JSON", "OPTIM_TENSORS", "RNG_KEY", "load_optimizer", "optimizer_state_by_index",
           "optimizer_state_by_name"]
