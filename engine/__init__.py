"""layerfold: depth and width surgery for Llama-family LLMs, guided by streamed calibration statistics.

The public API, importable from the top (each name is loaded on first use, so ``import layerfold``
and the command line start fast)::

    import layerfold
    model, tok = layerfold.load("smollm2-135m")                # checkpoint dir, HF dir, .gguf or alias
    stats = layerfold.calibrate(model, ids)                      # one streamed pass, every statistic
    report = layerfold.prune("smollm2-135m", "shortgpt", "8", "out/")   # the whole pipeline
    print(layerfold.generate(model, tok, "Hello")[0].text)

Sub-packages follow the pipeline: ``core`` (spec, model, checkpoints, loading, data), ``calibration``,
``surgery`` (plans, depth and width surgery), ``methods`` (one module per pruning method),
``healing``, ``inference`` (runtime, generation), ``serving``, ``evaluation`` (quality and speed),
``interop`` (other formats), ``cli``; ``kernels`` holds the Triton kernels and their torch references.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# public name -> module that defines it
_API = {
    "LayerSpec": "layerfold.core.spec", "ModelSpec": "layerfold.core.spec",
    "Model": "layerfold.core.model", "KVCache": "layerfold.core.model", "build_model": "layerfold.core.model",
    "CheckpointError": "layerfold.core.checkpoint", "load_checkpoint": "layerfold.core.checkpoint",
    "save_checkpoint": "layerfold.core.checkpoint",
    "DEFAULT_MODEL": "layerfold.core.loading", "load": "layerfold.core.loading",
    "load_spec_state": "layerfold.core.loading", "resolve": "layerfold.core.loading",
    "calibrate": "layerfold.calibration.calibrate", "Stats": "layerfold.calibration.stats",
    "DepthPlan": "layerfold.surgery.plan", "apply_depth_plan": "layerfold.surgery.depth",
    "SlicePlan": "layerfold.surgery.slicing", "slice_model": "layerfold.surgery.slicing",
    "Target": "layerfold.methods.base", "get_method": "layerfold.methods", "all_methods": "layerfold.methods",
    "prune": "layerfold.pipeline",
    "HealConfig": "layerfold.healing.common", "heal_pruned": "layerfold.healing.heal",
    "Runtime": "layerfold.inference.runtime", "generate": "layerfold.inference.generate",
    "stream_generate": "layerfold.inference.generate",
    "evaluate": "layerfold.evaluation.evaluate", "perplexity": "layerfold.evaluation.evaluate",
    "bench_models": "layerfold.evaluation.benchmark",
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    mod = _API.get(name)
    if mod is None:
        raise AttributeError(f"module 'layerfold' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
