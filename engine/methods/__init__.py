"""Pruning methods. Each module registers itself in ``METHODS`` (see base.py) when imported."""

from __future__ import annotations

import importlib

from layerfold.methods.base import METHODS, Method, PruneContext, PruneResult, Target, register

# module name -> the methods it registers; imported lazily so a broken optional method cannot break the rest
MODULES = ("shortgpt", "laco", "slm", "streamline", "slicing", "come")


def all_methods() -> dict[str, Method]:
    for mod in MODULES:
        try:
            importlib.import_module(f"layerfold.methods.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"layerfold.methods.{mod}":
                raise
    return METHODS


def get_method(name: str) -> Method:
    methods = all_methods()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}. Fix: use one of {', '.join(sorted(methods))}")
    return methods[name]


__all__ = ["METHODS", "Method", "PruneContext", "PruneResult", "Target", "all_methods", "get_method", "register"]
