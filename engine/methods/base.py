"""What every pruning method receives and returns, and the registry ``layerfold prune`` dispatches on.

A method is a function ``fn(ctx: PruneContext) -> PruneResult``. Inside, a method keeps three things apart:
a score is a function of statistics, a plan is a JSON-serialisable dataclass, surgery is a pure
``apply(model, plan) -> new model`` (layerfold.surgery.depth).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from layerfold.core.model import Model


@dataclass(frozen=True)
class Target:
    """How much to prune: ``layers`` removed (int), ``fraction`` (of layers for depth methods, mean sliced
    width for width methods), or ``params`` (fraction of parameters removed)."""

    kind: str  # "layers" | "fraction" | "params"
    value: float

    @classmethod
    def parse(cls, s: str | int | float) -> Target:
        txt = str(s).strip().lower()
        m = re.fullmatch(r"(layers|fraction|params):([0-9.]+)%?", txt)
        if m:
            kind, v = m.group(1), float(m.group(2))
            if txt.endswith("%"):
                v /= 100
        elif re.fullmatch(r"[0-9]+", txt):
            kind, v = "layers", float(txt)
        elif re.fullmatch(r"[0-9.]+%", txt):
            kind, v = "fraction", float(txt[:-1]) / 100
        elif re.fullmatch(r"[0-9.]+p", txt):
            kind, v = "params", float(txt[:-1])
        elif re.fullmatch(r"0?\.[0-9]+", txt):
            kind, v = "fraction", float(txt)
        else:
            raise ValueError(f"target {s!r} is not understood. Fix: use a layer count (8), a fraction (0.25 or 25%), "
                             "or a parameter fraction (params:0.2 or 0.2p)")
        t = cls(kind, v)
        if kind in ("fraction", "params") and not 0 < v < 1:
            raise ValueError(f"target {s!r}: a fraction must lie strictly between 0 and 1. Fix: e.g. 0.25, 25% or "
                             "params:0.2")
        if kind == "layers" and (v < 1 or v != int(v)):
            raise ValueError(f"target {s!r}: a layer count must be a positive whole number. Fix: e.g. --target 8")
        return t

    def layers_to_remove(self, model: Model, param_fn: Callable[[int], int] | None = None) -> int:
        """Resolve to a number of layers removed for a depth method on ``model``.

        For ``params``: the smallest count whose removal reaches the fraction, using ``param_fn(k)`` =
        parameters removed when k layers go (default: k times the mean layer size).
        """
        L = model.spec.n_layers
        if self.kind == "layers":
            k = int(self.value)
        elif self.kind == "fraction":
            k = int(round(self.value * L))
        else:
            total = model.num_params()
            per_layer = sum(p.numel() for b in model.layers for p in b.parameters()) / L
            fn = param_fn or (lambda k: k * per_layer)
            k = next((k for k in range(L) if fn(k) >= self.value * total), L)
        if not 1 <= k <= L - 1:
            raise ValueError(f"target {self.kind}={self.value} means removing {k} of {L} layers: impossible. "
                             f"Fix: remove between 1 and {L - 1} layers")
        return k

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}


@dataclass
class PruneContext:
    model: Model  # the dense model (do not modify it in place: surgery makes copies)
    tokenizer: Any
    source: str  # where the dense model came from (teacher for healing)
    target: Target
    stats: Any | None  # layerfold.calibration.stats.Stats from the calibration pass (None when the method needs none)
    calib: torch.Tensor  # (n, T) calibration token ids used for the stats, reusable for training
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)  # method-specific options from the CLI
    progress: bool = True
    seed: int = 0
    weights: str = "device"  # "host": the model stays in host memory and computes on ``device`` layer by layer


@dataclass
class PruneResult:
    model: Model
    plan: dict[str, Any]  # JSON-serialisable, readable by a person
    layer_map: list[list[int]]  # per new layer: the original layers it stands for
    changed_layers: list[int]  # new-layer indices created or altered by surgery (what healing trains)
    info: dict[str, Any] = field(default_factory=dict)  # method notes for report.json (times, losses...)


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[PruneContext], PruneResult]
    kind: str  # "depth" | "width"
    needs_stats: bool = True
    stats_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"grams": True}
    add_args: Callable[[argparse.ArgumentParser], None] | None = None
    help: str = ""
    streams: bool = True  # runs with the weights in host memory, a layer at a time on the device (--weights host)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method
