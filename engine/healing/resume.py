"""A healing run's resumable state on disk: written whole, named in latest.json, older copies removed.

``out_dir/heal_state/`` holds ``latest.json`` naming the newest complete ``ckpt-N/`` directory:
``state.json`` (phase, steps, tokens, clocks, data position, curve, best, layer reports, and a fingerprint
of the run that must match to resume), ``current.safetensors`` and ``best.safetensors`` (every parameter
healing may train), ``optim.safetensors`` + ``optim.json`` (layerfold.healing.state: no pickle).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
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
        if self.dir is None or not (self.dir / "latest.json").is_file():
            return False
        d = self.dir / json.loads((self.dir / "latest.json").read_text())["dir"]
        saved = json.loads((d / "state.json").read_text())
        mine = json.loads(json.dumps(self._fingerprint(), default=str))
        diff = sorted(k for k in mine if saved["fingerprint"].get(k) != mine[k])
        if diff:
            raise ValueError(f"{self.dir}: the saved healing state belongs to a different run (differs in {diff}). "
                             "Fix: start over without --resume, or choose another --out")
        self.st = saved["state"]
        with torch.no_grad():
            for n, v in load_file(str(d / "current.safetensors")).items():
                self.params[n].copy_(v)
        dev = self.s.device
        self.best_state = {n: v.to(dev) for n, v in load_file(str(d / "best.safetensors")).items()}
        self.opt_state, rng = load_optimizer(d)
        torch.set_rng_state(rng)
        self._log(f"resumed from {d} (phase {self.st['phase']}, {self.st['tokens']} tokens)")
        return True
