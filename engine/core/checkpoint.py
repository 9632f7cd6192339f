"""The layerfold checkpoint directory: config.json + model.safetensors + tokenizer + report.json.

Writes go to a temporary sibling directory that is renamed into place, so a crash never leaves a
half-written checkpoint, and a checkpoint is never written over the model it was loaded from.
Weights load by mmap (safetensors); every tensor is checked for presence and shape against the spec.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from layerfold.core.model import expected_shapes
from layerfold.core.paths import OutputError, atomic_dir, check_output, json_text
from layerfold.core.spec import ModelSpec
from layerfold.core.state import CheckpointError, check_state, check_state_dict, check_writable

FORMAT = "layerfold"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
REPORT = "report.json"


def check_finite(state: Mapping[str, Tensor], where: str, *, allow: bool = False) -> list[str]:
    """Names of the tensors holding NaN or Inf; raise CheckpointError naming the first unless ``allow``
    (then warn). A model with such a weight computes NaN everywhere: generation gives empty text and
    evaluation a meaningless score, so it is refused at load rather than found in the results."""
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad and not allow:
        raise CheckpointError(f"{where}: tensor {bad[0]!r} holds NaN or Inf values ({len(bad)} such tensors). "
                              "Fix: re-create the checkpoint from its source (an overflow in training or a damaged "
                              "file), or pass --allow-nonfinite to load it anyway")
    if bad:
        warnings.warn(f"{where}: {len(bad)} tensors hold NaN or Inf values (first {bad[0]!r}); loaded because of "
                      "--allow-nonfinite: outputs will be meaningless", stacklevel=2)
    return bad


def is_checkpoint(path: str | Path) -> bool:
    p = Path(path) / CONFIG
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (ValueError, AttributeError, RecursionError):  # bad JSON or UTF-8, a 5000-digit number, not an object
        return False


def read_config(path: str | Path) -> dict[str, Any]:
    p = Path(path) / CONFIG
    if not p.is_file():
        raise CheckpointError(f"{p}: not found. Fix: point to a directory written by `layerfold convert` or "
                              "`layerfold prune`")
    try:
        cfg = json.loads(p.read_text())
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{p}: corrupt JSON ({e}). Fix: re-create the checkpoint; the file was truncated "
                              "or edited by hand") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a layerfold config (no \"format\": \"{FORMAT}\"). Fix: for an HF model "
                              "directory use it directly or run `layerfold convert` first")
    version = cfg.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise CheckpointError(f"{p}: \"version\" is {version!r}, not a whole number. Fix: this file was edited by "
                              f"hand; set \"version\": {FORMAT_VERSION} (a number) or re-create the checkpoint")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{p}: format version {version} is newer than this layerfold "
                              f"({FORMAT_VERSION}). Fix: upgrade layerfold")
    if not isinstance(cfg.get("provenance", {}), dict):
        raise CheckpointError(f"{p}: \"provenance\" is a JSON {type(cfg['provenance']).__name__}, not an object. Fix: "
                              "this file was edited by hand; restore the object (or {}) or re-create the checkpoint")
    dt = cfg.get("dtype", "float32")
    if dt not in WEIGHT_DTYPE_NAMES:  # informational, but transformers reads it too (a tokenizer load would fail)
        raise CheckpointError(f"{p}: \"dtype\" is {str(dt)[:40]!r}, not one of {', '.join(WEIGHT_DTYPE_NAMES)}. "
                              "Fix: this file was edited by hand; set it to the weights' dtype or re-create the "
                              "checkpoint")
    try:
        cfg["spec"] = ModelSpec.from_dict(cfg.get("spec"))
    except (ValueError, TypeError) as e:
        fix = "" if "Fix:" in str(e) else " Fix: re-create the checkpoint (convert or prune again)"
        raise CheckpointError(f"{p}: invalid model spec (config.json was edited or damaged): {e}.{fix}") from None
    return cfg


WEIGHT_DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")  # what save_checkpoint writes as "dtype"


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
MAX_HEADER = 100_000_000  # bytes of a safetensors header (the safetensors library's own limit)


def _corrupt(p: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{p}: corrupt or truncated safetensors file ({why}). "
                           "Fix: re-create the checkpoint (convert or prune again)")


def _entry(p: Path, name: str, info: Any) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, start, end) of one header entry: whole numbers only, no negative sizes."""
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        raise _corrupt(p, f"bad header entry for {name!r}")
    if info["dtype"] not in _ST_DTYPES:
        raise CheckpointError(f"{p}: tensor {name!r} is stored as {info['dtype'][:20]!r}, which layerfold does not "
                              f"read (it reads {', '.join(_ST_DTYPES)}). Fix: save the weights as float32, float16 or "
                              "bfloat16 safetensors (dequantise FP8 or packed formats first)")
    shape, offs = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and isinstance(offs, list) and len(offs) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (*shape, *offs))):
        raise _corrupt(p, f"bad header entry for {name!r}: shape {str(shape)[:60]} and data_offsets "
                       f"{str(offs)[:60]} must be lists of whole numbers >= 0")
    return _ST_DTYPES[info["dtype"]], shape, offs[0], offs[1]


def open_weights(path: str | Path, device: str = "cpu") -> dict[str, Tensor]:
    """All tensors of a safetensors file, memory-mapped: pages are read when a tensor is first touched.

    The header is validated here (offsets inside the file, known dtypes, sizes matching shapes) so a
    truncated or corrupt file fails with a message, not deep inside a library.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: weights file not found. Fix: the checkpoint is incomplete; re-create it")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(p, f"only {size} bytes")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size or n > MAX_HEADER:
            raise _corrupt(p, f"header length {n} does not fit in {size} bytes or is over {MAX_HEADER}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise _corrupt(p, f"header is not JSON: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.pop("__metadata__", None) or {}, dict):
        raise _corrupt(p, "header (or its __metadata__) is not a JSON object")
    data_len = size - 8 - n
    entries = [(name, *_entry(p, name, info)) for name, info in header.items()]
    end = 0
    for name, dtype, shape, a, b in sorted(entries, key=lambda e: (e[3], e[4])):
        numel = 1
        for s in shape:
            numel *= s
        if not (a <= b <= data_len) or b - a != numel * torch.empty((), dtype=dtype).element_size():
            raise _corrupt(p, f"tensor {name!r} lies outside the file or has the wrong byte size")
        if a < end:
            raise _corrupt(p, f"tensor {name!r} overlaps the bytes of another tensor")
        end = b
    blob = torch.from_file(str(p), shared=False, size=size, dtype=torch.uint8) if size else None
    out: dict[str, Tensor] = {}
    for name, dtype, shape, a, b in entries:
        raw = blob[8 + n + a: 8 + n + b]
        try:
            t = raw.view(dtype)
        except RuntimeError:  # misaligned offset: copy this one tensor
            t = raw.clone().view(dtype)
        t = t.reshape(shape)
        out[name] = t if device == "cpu" else t.to(device)
    return out


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[dict[str, Any], dict[str, Tensor]]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a checkpoint directory (str or Path), not {type(path).__name__}. Fix: pass the "
                        "directory save_checkpoint wrote")
    cfg = read_config(path)
    state = open_weights(Path(path) / WEIGHTS, device)
    return cfg, state


def save_checkpoint(out: str | Path, spec: ModelSpec, state: Mapping[str, Tensor], *, tokenizer: Any = None,
                    provenance: dict[str, Any] | None = None, report: dict[str, Any] | None = None,
                    sources: list[str | Path] = (), overwrite: bool = False,
                    extra_files: Mapping[str, str] | None = None, check: bool = True,
                    weights_file: str | Path | None = None) -> Path:
    """Write a checkpoint atomically. ``sources`` are paths the model came from: never written over. The arguments'
    types, and (``check``) every tensor's name and shape against ``spec``, are checked before anything is written:
    a state that does not fit its spec would only fail when the checkpoint is loaded. ``weights_file``: a
    safetensors file already holding ``state`` (``state = open_weights(weights_file)``, written a tensor at a
    time by a converter), moved in as the weights on the same filesystem instead of written again."""
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a directory path (str or Path), not {type(out).__name__}. Fix: pass where to "
                        "write the checkpoint, e.g. 'out/model'")
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, not {type(spec).__name__}. Fix: pass model.spec")
    check_state(state)
    if state is None:
        raise TypeError("state is None. Fix: pass the weights, model.state_dict()")
    check_writable(state, "save_checkpoint: state")
    if check:
        try:
            check_state_dict(expected_shapes(spec), state, where="save_checkpoint: state")
        except CheckpointError as e:
            raise CheckpointError(f"{str(e).split(' Fix:')[0]} Fix: save the state of a model of this spec "
                                  "(model.state_dict() with model.spec); check=False writes it anyway") from None
    if provenance is not None and not isinstance(provenance, Mapping):
        raise TypeError(f"provenance must be a dict (config.json's \"provenance\" object), not "
                        f"{type(provenance).__name__}. Fix: pass a dict, or None")
    _check_extra_files(extra_files)
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(f"tokenizer must be a transformers tokenizer, not {type(tokenizer).__name__}. Fix: pass the "
                        "tokenizer layerfold.load returns, or None")
    try:
        out = check_output(out, sources=sources, overwrite=overwrite)
    except OutputError as e:
        raise CheckpointError(str(e)) from None
    with atomic_dir(out) as tmp:
        if weights_file is not None:
            tensors = dict(state)
            os.replace(weights_file, tmp / WEIGHTS)
        else:
            tensors = _own_copies(state)
            save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        cfg = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": _dtype_name(tensors),
               "spec": spec.to_dict(), "provenance": provenance or {}}
        (tmp / CONFIG).write_text(json_text(cfg))
        if report is not None:
            (tmp / REPORT).write_text(json_text(report))
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        for name, text in (extra_files or {}).items():
            if (tmp / name).exists():  # the tokenizer wrote it: refused, and nothing is left behind
                raise CheckpointError(f"extra_files: {name!r} is a file the checkpoint itself holds. Fix: give the "
                                      "extra file another name")
            (tmp / name).write_text(text)
    return out


def _own_copies(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state on the CPU, contiguous; a tensor whose bytes overlap an earlier one's (a tied head) gets its own
    copy, while views of one buffer side by side (an mmapped file) need none."""
    tensors: dict[str, Tensor] = {}
    spans: list[tuple[int, int]] = []
    for k, v in state.items():
        t = v.detach().to("cpu").contiguous()
        a = t.data_ptr()
        b = a + t.numel() * t.element_size()
        overlaps = t.numel() > 0 and any(a < e and s < b for s, e in spans)
        tensors[k] = t.clone() if overlaps else t
        spans.append((a, b))
    return tensors


def _check_extra_files(extra_files: Mapping[str, str] | None) -> None:
    """extra_files: plain file names (they land in the checkpoint folder, nowhere else) to text."""
    if extra_files is None:
        return
    if not isinstance(extra_files, Mapping):
        raise TypeError(f"extra_files must map file names to text, not {type(extra_files).__name__}. Fix: pass a dict")
    for name, text in extra_files.items():
        plain = isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
        if not plain or name in (WEIGHTS, CONFIG, REPORT) or not isinstance(text, str):
            raise ValueError(f"extra_files: {name!r} -> a {type(text).__name__}: each entry must be a plain file name "
                             f"(no folders; not {WEIGHTS}, {CONFIG} or {REPORT}) mapped to text. Fix: pass "
                             "{\"notes.txt\": \"...\"}")


# tokenizer classes that only transformers >= 5 knows, and the class every supported version (>= 4.56) loads
# the same tokenizer.json with
_V5_ONLY_TOKENIZER_CLASSES = ("TokenizersBackend",)
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def save_tokenizer(tokenizer: Any, out: str | Path) -> None:
    """``tokenizer.save_pretrained(out)``, with a tokenizer_config.json that every supported transformers loads.

    transformers 5 names its tokenizers.json-backed class ``TokenizersBackend``, which transformers 4.x does
    not have; ``PreTrainedTokenizerFast`` reads the same tokenizer.json in both (load-time keys such as
    ``local_files_only`` are dropped: they would override the loader's own)."""
    out = Path(out)
    tokenizer.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    if not cfg_path.is_file() or not (out / "tokenizer.json").is_file():
        return
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("tokenizer_class") in _V5_ONLY_TOKENIZER_CLASSES:
        cfg["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    for key in ("local_files_only", "is_local"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _dtype_name(tensors: Mapping[str, Tensor]) -> str:
    for t in tensors.values():
        if t.is_floating_point():
            return str(t.dtype).removeprefix("torch.")
    return str(torch.float32).removeprefix("torch.")
