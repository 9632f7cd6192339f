"""Read a Hugging Face model directory: config.json (checked before the weights are touched), the generation
config's end-of-sequence ids, and the safetensors weights renamed (and fused tensors split) to layerfold names.

HF ``generate`` stops at the ``eos_token_id`` of ``generation_config.json``, which often lists ids config.json
lacks (Phi-3: [32000, 32001, 32007]; Llama-3-Instruct: [128001, 128009]); the spec takes the union of both, so
layerfold stops where transformers does, and where config.json says. A generation config that cannot be read, or
whose ids are not token ids of the model, is refused as config.json's errors are (it is optional: removing it is a
fix), not skipped: skipped, generation would run past the end of every answer without a word said.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from layerfold.core.arch import check_not_quantized, check_supported, spec_from_hf_config, state_from_hf
from layerfold.core.checkpoint import CheckpointError, open_weights
from layerfold.core.spec import ModelSpec

GENERATION_CONFIG = "generation_config.json"
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"  # transformers' names, in its order


def read_hf_dir(path: Path) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    where = path / "config.json"
    try:
        cfg = json.loads(where.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: corrupt JSON ({e}). Fix: re-download or re-create the model directory") \
            from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: holds a JSON {type(cfg).__name__}, not an object. Fix: config.json must be "
                              "one JSON object with the model's settings; re-download or re-create it")
    if not isinstance(cfg.get("model_type"), (str, type(None))):
        raise CheckpointError(f"{where}: model_type is {cfg['model_type']!r}, not a string. Fix: restore the model's "
                              "own config.json")
    flags = [k for k in ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")
             if not isinstance(cfg.get(k, False), bool)]
    if flags:  # bool("false") is True: a quoted flag would be read the wrong way round
        raise CheckpointError(f"{where}: {flags[0]} is {cfg[flags[0]]!r}, not true or false. Fix: write it as a JSON "
                              "true or false (no quotes), as in the model's own config.json")
    check_supported(cfg.get("model_type"), str(path))
    check_not_quantized(cfg, str(path))  # before the size check: quantized weights are smaller than their count
    files = weight_files(path)
    if files:
        _check_sizes(cfg, where, sum(f.stat().st_size for f in files))
    try:
        spec = spec_from_hf_config(cfg, str(path))
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # a value of the wrong type or out of range
        fix = "" if "Fix" in str(e) else ". Fix: a setting has the wrong type or value; restore the model's config.json"
        raise CheckpointError(f"{where}: {e}{fix}") from None
    if not files:
        bins = list(path.glob("*.bin"))
        hint = " (found only pytorch .bin files: convert them to safetensors first)" if bins else ""
        raise CheckpointError(f"{path}: no *.safetensors weights{hint}. Fix: save the model with safetensors "
                              "(save_pretrained(..., safe_serialization=True)); layerfold never loads pickles")
    extra = [i for i in generation_eos(path, spec.vocab_size) if i not in spec.eos_token_ids]
    spec = replace(spec, eos_token_ids=spec.eos_token_ids + tuple(extra)) if extra else spec
    hf_state: dict[str, torch.Tensor] = {}
    for f in files:
        part = open_weights(f)
        twice = next((k for k in part if k in hf_state), None)
        if twice is not None:  # two copies of the weights (a stale file beside a re-download): which one is meant?
            first = next(g for g in files if twice in open_weights(g))
            raise CheckpointError(f"{path}: tensor {twice!r} is in both {first.name} and {f.name}, and no "
                                  f"{SINGLE} or {INDEX} says which file holds the model. Fix: remove the files that "
                                  f"do not belong to this model (or restore its {INDEX})")
        hf_state.update(part)
    try:  # (headers only so far: a fused tensor of the wrong size is named before any weight is read)
        return spec, state_from_hf(hf_state, spec)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files that hold the model, chosen as transformers chooses: model.safetensors when there is
    one, else the shards model.safetensors.index.json names (each must be there), else every *.safetensors file.
    Other files beside them (Mistral's consolidated.safetensors, adapters, a stale shard set) are not read."""
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    index = path / INDEX
    if not index.is_file():
        return sorted(path.glob("*.safetensors"))
    fix = f"Fix: re-download the model's {INDEX} (and its shards)"
    try:
        wm = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (ValueError, RecursionError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a JSON object with a weight_map ({e}). {fix}") from None
    names = set(wm.values()) if isinstance(wm, dict) else None
    if not names or not all(isinstance(n, str) and n and Path(n).name == n and n.endswith(".safetensors")
                            for n in names):
        raise CheckpointError(f"{index}: its weight_map must map tensor names to .safetensors file names in this "
                              f"folder. {fix}")
    missing = sorted(n for n in names if not (path / n).is_file())
    if missing:
        raise CheckpointError(f"{path}: {INDEX} names {len(names)} shards, and {len(missing)} are not there "
                              f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}). Fix: download "
                              "the missing shards (the model is incomplete)")
    return sorted(path / n for n in names)


def _check_sizes(cfg: dict[str, Any], where: Path, weight_bytes: int) -> None:
    """Refuse a config whose sizes need more parameters than its weight files could hold (at least one byte each),
    before building a spec of, say, 10**9 layers."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
    v = [cfg.get(k) for k in keys]
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v) or "block_configs" in cfg:
        return  # spec_from_hf_config names the missing or mistyped one; DeciLM layers have their own widths
    vocab, d, ffn, n = v
    need = vocab * d + n * (3 * d * ffn + 2 * d)  # embeddings, each layer's MLP and norms (a lower bound)
    if need > weight_bytes:
        raise CheckpointError(f"{where}: {', '.join(f'{k}={x}' for k, x in zip(keys, v, strict=True))} describe at "
                              f"least {need:,} parameters, but the *.safetensors files hold {weight_bytes:,} bytes. "
                              "Fix: config.json does not belong to these weights (or a size in it was edited); "
                              "restore the model's own config.json")


def generation_eos(path: Path, vocab_size: int) -> tuple[int, ...]:
    """The ``eos_token_id`` of ``path``/generation_config.json (one id or a list), () without the file or the key."""
    f = path / GENERATION_CONFIG
    if not f.is_file():
        return ()
    fix = (f"Fix: restore the model's own {GENERATION_CONFIG}, or remove it (generation then stops at config.json's "
           "eos_token_id and the tokenizer's)")
    try:
        gen = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5000-digit number, deep nesting
        raise CheckpointError(f"{f}: corrupt JSON ({e}). {fix}") from None
    if not isinstance(gen, dict):
        raise CheckpointError(f"{f}: holds a JSON {type(gen).__name__}, not an object. {fix}")
    eos: Any = gen.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
        raise CheckpointError(f"{f}: eos_token_id={eos!r} is not a token id or a list of them (whole numbers >= 0, "
                              f"no quotes). {fix}")
    outside = [i for i in ids if i >= vocab_size]
    if outside:
        raise CheckpointError(f"{f}: eos_token_id={eos!r} names token {outside[0]}, outside the vocabulary of "
                              f"{vocab_size} tokens (ids 0..{vocab_size - 1}). {fix}")
    return tuple(dict.fromkeys(ids))


__all__ = ["GENERATION_CONFIG", "generation_eos", "read_hf_dir", "weight_files"]
