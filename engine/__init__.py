"""layerfold engine: model, import/export, checkpoints, calibration, surgery, evaluation, runtime."""

from __future__ import annotations

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .loading import DEFAULT_MODEL, load, load_spec_state, resolve
from .model import KVCache, Model, build_model
from .spec import LayerSpec, ModelSpec

__all__ = ["CheckpointError", "DEFAULT_MODEL", "KVCache", "LayerSpec", "Model", "ModelSpec", "build_model",
           "load", "load_checkpoint", "load_spec_state", "resolve", "save_checkpoint"]
