"""A healing run's resumable state on disk: written whole, named in latest.json, older copies removed.

``out_dir/heal_state/`` holds ``latest.json`` naming the newest complete ``ckpt-N/`` directory:
``state.json`` (phase, steps, tokens, clocks, data position, curve, best, layer reports, and a fingerprint
of the run that must match to resume), ``current.safetensors`` and ``best.safetensors`` (every parameter
healing may train), ``optim.safetensors`` + ``optim.json`` (layerfold.healing.state: no pickle).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from layerfold.core.paths import write_json_atomic
from layerfold.healing.state import (
    OPTIM_JSON,
    OPTIM_TENSORS,
    RNG_KEY,
    load_optimizer,
    optimizer_state_by_name,
)

FINGERPRINT_CFG = ("seq_len", "micro_batch", "accum", "lr_layer", "lr_global", "min_lr_frac", "warmup_steps",
                   "weight_decay", "grad_clip", "hidden_weight", "layer_input", "eval_every", "val_tokens", "seed",
                   "autocast", "global_params", "lora_rank", "lora_alpha")


class ResumableRun:
    """The save/load half of :class:`layerfold.healing.loop.HealRun` (its attributes: s, map, changed,
    train_all, stages, Lt, cfg, dir, st, params, names, best_state, opt_state, _opt, _opt_names)."""

    def _fingerprint(self) -> dict[str, Any]:
        return {"spec": self.s.spec.to_dict(), "layer_map": self.map, "changed": self.changed,
                "train_all": self.train_all, "stages": self.stages, "teacher_layers": self.Lt,
                "cfg": {k: getattr(self.cfg, k) for k in FINGERPRINT_CFG}}

    def _save(self) -> None:
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.st["saves"] += 1
        name = f"ckpt-{self.st['saves']:06d}"
        tmp = self.dir / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        cur = {n: self.params[n].detach().cpu().contiguous() for n in self.names}
        save_file(cur, str(tmp / "current.safetensors"))
        save_file({n: v.cpu().contiguous() for n, v in self.best_state.items()}, str(tmp / "best.safetensors"))
        opt = getattr(self, "_opt", None)
        tensors, meta = optimizer_state_by_name(opt.state_dict(), self._opt_names) if opt is not None else ({}, None)
        save_file({**tensors, RNG_KEY: torch.get_rng_state()}, str(tmp / OPTIM_TENSORS))
        (tmp / OPTIM_JSON).write_text(json.dumps({"format": "layerfold-heal-optim", "optimizer": meta}))
        (tmp / "state.json").write_text(json.dumps({"fingerprint": self._fingerprint(), "state": self.st},
                                                   default=str))
        tmp.rename(self.dir / name)
        write_json_atomic(self.dir / "latest.json", {"dir": name})
        for old in self.dir.glob("ckpt-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def _load(self) -> bool:
        if self.dir is not None and self.dir.is_symlink():  # _save would write and prune ckpt-* folders elsewhere
            raise _damaged(self.dir, f"{self.dir.name} is a symbolic link, not the run's own folder")
        if self.dir is None or not (self.dir / "latest.json").is_file():
            return False
        d = self._latest()
        saved = _read_json(d / "state.json", d)
        if not isinstance(saved, dict) or not isinstance(saved.get("fingerprint"), dict):
            raise _damaged(d, "state.json holds no run fingerprint")
        mine = json.loads(json.dumps(self._fingerprint(), default=str))
        diff = sorted(k for k in mine if saved["fingerprint"].get(k) != mine[k])
        if diff:
            raise ValueError(f"{self.dir}: the saved healing state belongs to a different run (differs in {diff}). "
                             "Fix: start over without --resume, or choose another --out")
        st = _checked_state(saved.get("state"), self.st, d)
        current = _read_tensors(d / "current.safetensors", d)
        best = _read_tensors(d / "best.safetensors", d)
        for fname, ts in (("current", current), ("best", best)):  # best is empty before the first evaluation
            for n in dict.fromkeys([*self.names, *ts]) if ts or fname == "current" else ():
                p = self.params.get(n)
                if p is None or n not in ts or tuple(ts[n].shape) != tuple(p.shape) or not ts[n].is_floating_point():
                    got = "missing" if n not in ts else f"{tuple(ts[n].shape)} {ts[n].dtype}"
                    want = "a parameter this run trains" if p is None else f"{tuple(p.shape)} floating point"
                    raise _damaged(d, f"{fname}.safetensors: {n!r} is {got}, expected {want}")
        opt_state, rng = load_optimizer(d)
        if rng.dtype != torch.uint8 or tuple(rng.shape) != tuple(torch.get_rng_state().shape):
            raise _damaged(d, f"{OPTIM_TENSORS}: {RNG_KEY} is {tuple(rng.shape)} {rng.dtype}, not a torch RNG state")
        for n, fields in (opt_state or {}).get("state", {}).items():
            p = self.params.get(n)
            for key, v in fields.items():
                if p is not None and key in ("exp_avg", "exp_avg_sq") and getattr(v, "shape", None) != p.shape:
                    raise _damaged(d, f"{OPTIM_TENSORS}: optim.{n}.{key} has shape {tuple(getattr(v, 'shape', ()))}, "
                                   f"the parameter {tuple(p.shape)}")
        self.st = st
        with torch.no_grad():
            for n in self.names:
                self.params[n].copy_(current[n])
        dev = self.s.device
        self.best_state = {n: v.to(dev) for n, v in best.items()}
        self.opt_state = opt_state
        torch.set_rng_state(rng)
        self._log(f"resumed from {d} (phase {self.st['phase']}, {self.st['tokens']} tokens)")
        return True

    def _latest(self) -> Path:
        """The checkpoint folder latest.json names: a ``ckpt-N`` folder directly inside heal_state, nothing else."""
        name = _read_json(self.dir / "latest.json", self.dir)
        name = name.get("dir") if isinstance(name, dict) else None
        d = self.dir / name if isinstance(name, str) and _CKPT.fullmatch(name) else None
        if d is None or d.is_symlink() or not d.is_dir():
            raise _damaged(self.dir, f"latest.json names {name!r}, not a ckpt-N folder of {self.dir}")
        return d


_CKPT = re.compile(r"ckpt-[0-9]{1,12}")


def _damaged(d: Path, why: str) -> ValueError:
    return ValueError(f"{d}: damaged healing state ({why}). Fix: start over without --resume (remove "
                      f"{d if d.name == 'heal_state' else d.parent} yourself, or choose another --out)")


def _read_json(f: Path, d: Path) -> Any:
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged(d, f"{f.name}: {type(e).__name__}: {e}") from None


def _read_tensors(f: Path, d: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(f))
    except (OSError, SafetensorError, RuntimeError, ValueError) as e:
        raise _damaged(d, f"{f.name}: {type(e).__name__}: {e}") from None


def _checked_state(st: Any, fresh: dict[str, Any], d: Path) -> dict[str, Any]:
    """The saved loop state: at least the keys a fresh run starts with (the loop adds more as it goes), with
    their value types (numbers not negative)."""
    missing = sorted(set(fresh) - set(st)) if isinstance(st, dict) else None
    if missing is None or missing:
        raise _damaged(d, f"state.json's state lacks {missing}" if missing else "state.json's state is not an object")
    for k, v0 in fresh.items():
        v = st[k]
        if v0 is None:
            ok = v is None or isinstance(v, (list, int, float)) and not isinstance(v, bool)
        elif isinstance(v0, bool):
            ok = isinstance(v, bool)
        elif isinstance(v0, (int, float)):
            ok = isinstance(v, int if isinstance(v0, int) else (int, float)) and not isinstance(v, bool) and v >= 0
        else:
            ok = isinstance(v, type(v0))
        if not ok:
            raise _damaged(d, f"state.json: {k!r} = {v!r:.80} is not what a healing run stores there")
    return st
