"""The healing loop behind :func:`layerfold.healing.heal.heal_pruned`: phases, budgets, schedule, and resumable state.

Phases run in order: ("layer", k) for each healed layer k, then ("global", -1). The layer stage's share is
split evenly in steps, decided up front: one timed step per healed layer gives each one's cost, and every
layer gets the same number of steps that fit the stage's time (with a token budget, the same tokens); a
deeper layer costs more per step (more of the teacher and the student run before it), so an even split of
time would starve it. The global phase gets all that is left. The learning rate follows warm-up then
cosine over the phase's progress p = max(tokens / token budget, clock / time budget), so a token budget
gives a deterministic run.

``out_dir/heal_state/`` holds ``latest.json`` naming the newest complete ``ckpt-N/`` directory:
``state.json`` (phase, steps, tokens, clocks, data position, curve, best, layer reports),
``current.safetensors`` and ``best.safetensors`` (every parameter healing may train),
``optim.safetensors`` + ``optim.json`` (the phase's AdamW state and the torch RNG; no pickle:
layerfold.healing.state). A directory is written whole, then named in latest.json, then older ones are
removed: a crash leaves the previous state. Resuming restores all of it, so a run stopped and resumed
ends bit-identical to an uninterrupted one on a deterministic device.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from layerfold.core.memstat import peak_rss_mib, reset_rss_peak
from layerfold.core.model import Model
from layerfold.core.streaming import LayerStream
from layerfold.evaluation.evaluate import perplexity
from layerfold.healing.common import (
    HealConfig,
    HealReport,
    auto_autocast,
    auto_clock,
    auto_global_params,
    heal_targets,
    kl_teacher_student,
    layer_of,
    relative_mse,
    restore_dtypes,
    shared_prefix,
    upcast_masters,
)
from layerfold.healing.lora import add_lora, merge_lora
from layerfold.healing.resume import ResumableRun
from layerfold.healing.state import optimizer_state_by_index
from layerfold.healing.teacher import FeedsTeacher, TeacherFeed, teacher_place


class HealRun(ResumableRun, FeedsTeacher):
    def __init__(self, student: Model, teacher: LayerStream, layer_map: list[list[int]], changed: list[int],
                 train: Tensor, val: Tensor, cfg: HealConfig, stages: list[str], minutes: float | None,
                 tokens: int | None, state_dir: Path | None, progress: bool):
        dev = student.device
        amp = auto_autocast(dev) if cfg.autocast is None else cfg.autocast
        mode = cfg.global_params
        if mode == "auto":
            mode = auto_global_params(student, sum(v.numel() for v in teacher.state.values()), dev, masters=amp)
        cfg = replace(cfg, clock=auto_clock(dev) if cfg.clock == "auto" else cfg.clock, global_params=mode,
                      autocast=amp, teacher=teacher_place(cfg.teacher, teacher, student, dev, mode))
        self.feed = TeacherFeed(teacher, self._upcoming) if cfg.teacher == "host" else None
        self.s, self.t, self.map, self.changed, self.cfg = student, teacher, layer_map, changed, cfg
        train_all = mode == "all"
        self.train, self.val, self.stages, self.train_all = train, val, stages, train_all
        self.budget_s = None if minutes is None else minutes * 60.0
        self.budget_tok = tokens
        self.dir, self.progress = state_dir, progress
        self.Ls, self.Lt = student.spec.n_layers, teacher.spec.n_layers
        targets = heal_targets(layer_map, changed, self.Lt)
        lt = [k for k in targets if k in changed] if cfg.layer_input == "teacher" else targets
        self.layer_targets = lt if "layer" in stages else []
        self.global_layers = list(range(self.Ls)) if train_all else targets
        self.phases: list[tuple[str, int]] = [("layer", k) for k in self.layer_targets]
        if "global" in stages:
            self.phases.append(("global", -1))
        self.prefix_layer = shared_prefix(student, teacher, layer_map, set(targets))  # before any adapter
        self.lora = mode == "lora" and "global" in stages
        if self.lora:  # adapters on the unchanged layers: neutral until trained, merged back when the run ends
            add_lora(student, [i for i in range(self.Ls) if i not in set(targets)], rank=cfg.lora_rank,
                     alpha=cfg.lora_alpha)
        self.names = [n for n, _ in student.named_parameters()
                      if train_all and "global" in stages or layer_of(n) in set(targets) or ".lora_" in n]
        self.params = dict(student.named_parameters())
        # fp32 masters of narrower trained weights under autocast (restored when the run ends); the model then
        # mixes dtypes, so its no-grad passes (validation, probes) run under autocast too
        self.masters = upcast_masters(self.params, self.names) if cfg.autocast else {}
        self.threads = torch.get_num_threads()
        self.stop_requested = False
        self.prefix_global = 0 if train_all or self.lora else self.prefix_layer
        self.probe = val[: cfg.micro_batch]
        self._perm: tuple[int, Tensor] | None = None
        self.opt_state: dict[str, Any] | None = None
        self.st: dict[str, Any] = {
            "phase": 0, "pstep": 0, "ptok": 0, "pwall": 0.0, "pcpu": 0.0, "pbudget": None, "pstarted": False,
            "steps": 0, "tokens": 0, "wall": 0.0, "cpu": 0.0, "epoch": 0, "pos": 0, "curve": [], "best": None,
            "layers": [], "memory": {}, "saves": 0, "last_loss": None, "first_loss": None}
        self.best_state: dict[str, Tensor] = {}
        self.resumed = False
        self.notes: list[str] = []

    # ---- clocks and budgets --------------------------------------------------------------------
    def _tick(self) -> None:
        w, c = time.monotonic(), time.process_time()
        dw, dc = w - self._w, c - self._c
        self._w, self._c = w, c
        for k, d in (("wall", dw), ("cpu", dc), ("pwall", dw), ("pcpu", dc)):
            self.st[k] += d

    def _secs(self, phase: bool) -> float:
        pre = "p" if phase else ""
        return self.st[pre + "wall"] if self.cfg.clock == "wall" else self.st[pre + "cpu"] / self.threads

    def _phase_budget(self) -> list[float | None]:
        kind, _ = self.phases[self.st["phase"]]
        used_t, used_s = self.st["tokens"], self._secs(False)
        if kind == "layer":
            if self.st.get("layer_steps") is not None:  # an even split in steps, decided up front
                return [float(self.st["layer_steps"] * self._tokens_per_step()), None]
            frac = self.cfg.layer_frac if "global" in self.stages else 1.0
            left = len(self.layer_targets) - self.st["phase"]  # layer phases come first
            share = lambda total, used: None if total is None else max(0.0, (frac * total - used) / left)
        else:
            share = lambda total, used: None if total is None else max(0.0, total - used)
        return [share(self.budget_tok, used_t), share(self.budget_s, used_s)]

    def _tokens_per_step(self) -> int:
        return min(self.cfg.micro_batch, self.train.shape[0]) * self.train.shape[1] * self.cfg.accum

    def _plan_layer_stage(self) -> None:
        """With a time budget: time one forward and backward per healed layer, then give every layer the same
        number of steps, as many as fit the stage's share of the budget (at least one each)."""
        if self.budget_s is None or self.budget_tok is not None or not self.layer_targets:
            return
        costs = []
        for k in self.layer_targets:
            self._tick()
            t0 = self._secs(False)
            names = set(self._phase_params("layer", k))
            for n, p in self.params.items():
                p.requires_grad_(n in names)
            with self._amp(self.cfg.autocast):
                loss = self.layer_loss(k, self.probe)
            loss.backward()
            for n in names:
                self.params[n].grad = None
            self._tick()  # a host teacher (the feed) shares one transfer per chunk in training, not per step
            cost = self._secs(False) - t0 - self._chunked_teacher_saving(self.probe, set(self._layer_depths(k)))
            costs.append(max(cost, 1e-6))
        frac = self.cfg.layer_frac if "global" in self.stages else 1.0
        stage_s = frac * self.budget_s - self._secs(False)
        per_probe = self.probe.numel() / self._tokens_per_step()  # the probe is one micro-batch
        steps = max(1, int(stage_s / (sum(costs) / per_probe)))
        self.st["layer_steps"] = steps
        self.st["layer_step_cost_s"] = [round(c / per_probe, 4) for c in costs]
        self._log(f"layer stage: {steps} steps for each of {len(costs)} layers (step cost "
                  f"{min(costs) / per_probe:.2f}-{max(costs) / per_probe:.2f} s)")

    def _progress(self) -> float:
        self._tick()
        bt, bs = self.st["pbudget"]
        p = [self.st["ptok"] / bt if bt else 1.0 if bt is not None else 0.0,
             self._secs(True) / bs if bs else 1.0 if bs is not None else 0.0]
        return max(p)

    def _lr(self, base: float) -> float:
        c = self.cfg
        warm = min(1.0, (self.st["pstep"] + 1) / max(c.warmup_steps, 1))
        p = min(self._progress(), 1.0)
        return base * warm * (c.min_lr_frac + (1 - c.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))

    # ---- data and losses -----------------------------------------------------------------------
    def _batch(self) -> Tensor:
        n = self.train.shape[0]
        mb = min(self.cfg.micro_batch, n)
        if self.st["pos"] + mb > n:
            self.st["epoch"] += 1
            self.st["pos"] = 0
        if self._perm is None or self._perm[0] != self.st["epoch"]:
            g = torch.Generator().manual_seed(self.cfg.seed * 100003 + self.st["epoch"])
            self._perm = (self.st["epoch"], torch.randperm(n, generator=g).to(self.train.device))
        idx = self._perm[1][self.st["pos"]: self.st["pos"] + mb]
        self._key = (self.st["epoch"], self.st["pos"])
        self.st["pos"] += mb
        self._drawn = self.train[idx]
        return self._drawn

    def _target_depth(self, k: int) -> int:
        return self.Lt if k == self.Ls - 1 else max(self.map[k]) + 1

    def _layer_depths(self, k: int) -> tuple[int, int]:
        """(the teacher depth a step of layer k starts from, its target depth)."""
        src = min(self.map[k]) if self.cfg.layer_input == "teacher" else min(self.prefix_layer, k)
        return src, self._target_depth(k)

    def layer_loss(self, k: int, ids: Tensor) -> Tensor:
        s = self.s
        src, tgt = self._layer_depths(k)
        with torch.no_grad():
            _, ropes, mask = s.prepare(ids)
            hs, _ = self._teacher(ids, {src, tgt})
            x = hs[src]
            if self.cfg.layer_input == "student":  # the student's own layers from the shared prefix up to k
                for j in range(src, k):
                    x = s.run_layer(j, x, ropes, mask)
        return relative_mse(s.run_layer(k, x, ropes, mask), hs[tgt])

    def global_loss(self, ids: Tensor) -> Tensor:
        s, p, hw = self.s, self.prefix_global, self.cfg.hidden_weight
        corr = {k: self._target_depth(k) for k in self.global_layers if k in self.changed} if hw > 0 else {}
        hs, t_logits = self._teacher(ids, {p, *corr.values()}, logits=True)
        if p == 0:
            h, ropes, mask = s.prepare(ids)
        else:
            with torch.no_grad():
                _, ropes, mask = s.prepare(ids)
            h = hs[p]
        hid = []
        for j in range(p, self.Ls):
            h = s.run_layer(j, h, ropes, mask)
            if j in corr:
                hid.append(relative_mse(h, hs[corr[j]]))
        loss = kl_teacher_student(s.logits(h), t_logits)
        return loss + hw * torch.stack(hid).mean() if hid else loss

    # ---- one phase -----------------------------------------------------------------------------
    def _phase_params(self, kind: str, k: int) -> list[str]:
        layers = {k} if kind == "layer" else set(self.global_layers)
        if kind == "layer":
            return [n for n in self.names if layer_of(n) in layers and ".lora_" not in n]
        return [n for n in self.names if self.train_all or layer_of(n) in layers or ".lora_" in n]

    def _start_phase(self, kind: str, k: int) -> None:
        st = self.st
        self._tick()
        st.update(pstep=0, ptok=0, pwall=0.0, pcpu=0.0, pstarted=True, first_loss=None, last_loss=None)
        if st["phase"] == 0 or self.phases[st["phase"] - 1][0] != kind:  # each stage reports its own peak
            reset_rss_peak()
        if kind == "layer" and st["phase"] == 0 and "layer_steps" not in st:
            st["layer_steps"] = None
            self._plan_layer_stage()
        st["pbudget"] = self._phase_budget()
        if kind == "global":
            if not st["curve"] or st["curve"][-1][0] != st["tokens"]:
                self._evaluate()
        else:
            with torch.no_grad(), self._amp(bool(self.masters)):
                st["probe_before"] = float(self.layer_loss(k, self.probe))

    def _end_phase(self, kind: str, k: int, names: list[str]) -> None:
        st, mem = self.st, self.st["memory"]
        n_params = sum(self.params[n].numel() for n in names)
        sw = st.setdefault("stage_wall", {})
        sw[kind] = sw.get(kind, 0.0) + st["pwall"]
        if kind == "layer":
            with torch.no_grad(), self._amp(bool(self.masters)):
                after = float(self.layer_loss(k, self.probe))
            st["layers"].append({
                "layer": k, "stands_for": [min(self.map[k]), max(self.map[k])],
                "input": f"student h_{k}" if self.cfg.layer_input == "student" else f"teacher h_{min(self.map[k])}",
                "target": f"teacher h_{self._target_depth(k)}", "probe_loss_before": st["probe_before"],
                "probe_loss_after": after, "train_loss_first": st["first_loss"], "train_loss_last": st["last_loss"],
                "steps": st["pstep"], "tokens": st["ptok"], "wall_s": round(st["pwall"], 2)})
            m = mem.setdefault("layer", {"params_trained": 0})
            m["params_trained"] = max(m["params_trained"], n_params)
            blk = max(sum(self.t.state[n].numel() for n in self.t.keys[i]) for i in range(self.Lt))
            m["teacher_held"] = self.feed.describe() if self.feed else (
                f"whole model on {self.t.device}" if self.t.materialized else
                f"embeddings + one block at a time (<= {blk:,} block parameters)")
            m["peak_rss_mib"] = round(peak_rss_mib(), 1)
            if self.st["phase"] + 1 >= len(self.phases) or self.phases[self.st["phase"] + 1][0] != "layer":
                self._evaluate()
        else:
            if st["curve"][-1][0] != st["tokens"]:
                self._evaluate()
            mem["global"] = {"params_trained": n_params, "peak_rss_mib": round(peak_rss_mib(), 1),
                             "teacher_held": self.feed.describe() if self.feed else "whole model ("
                             f"{sum(v.numel() for v in self.t.state.values()):,} parameters, {self.t.dtype}, on "
                             f"{self.t.device})"}
        if torch.cuda.is_available() and self.s.device.type == "cuda":
            mem.setdefault(kind, {})["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        st["phase"] += 1
        st["pstarted"] = False
        self.opt_state = None

    def _phase_done(self) -> bool:
        return self._progress() >= 1.0

    def _evaluate(self) -> None:
        with self._amp(bool(self.masters)):
            ppl = perplexity(self.s, self.val, seq_len=self.val.shape[1], batch_size=self.cfg.micro_batch)["ppl"]
        self.st["curve"].append((self.st["tokens"], ppl))
        if self.st["best"] is None or ppl < self.st["best"][1]:
            self.st["best"] = (self.st["tokens"], ppl)
            self.best_state = {n: self.params[n].detach().to(self.masters.get(n, self.params[n].dtype), copy=True)
                               for n in self.names}  # in the model's own dtype: it is what gets saved
        self._tick()
        self._log(f"val ppl {ppl:.3f} at {self.st['tokens']} tokens (best {self.st['best'][1]:.3f})")

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> HealReport:
        self.resumed = self._load()
        self._w, self._c = time.monotonic(), time.process_time()
        if not self.st["curve"]:
            self._evaluate()
        steps_here, last_save = 0, time.monotonic()
        flags = {n: p.requires_grad for n, p in self.params.items()}
        try:
            while self.st["phase"] < len(self.phases):
                kind, k = self.phases[self.st["phase"]]
                if self.feed is None and (kind == "global" or self.s.device.type == "cuda" and "global" in self.stages):
                    self.t.model()  # on a GPU the global stage's whole teacher serves the layer stage too
                if not self.st["pstarted"]:
                    self._start_phase(kind, k)
                names = self._phase_params(kind, k)
                for n, p in self.params.items():
                    p.requires_grad_(n in names)
                ps = [self.params[n] for n in names]
                lr = self.cfg.lr_layer if kind == "layer" else self.cfg.lr_global
                opt = torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.95), weight_decay=self.cfg.weight_decay)
                if self.opt_state is not None:
                    opt.load_state_dict(optimizer_state_by_index(self.opt_state, names))
                self._opt, self._opt_names = opt, names
                while ps and not self._phase_done():
                    if self.stop_requested or (self.cfg.stop_after_steps is not None
                                               and steps_here >= self.cfg.stop_after_steps):
                        self._save()
                        return self._report("interrupted" if self.stop_requested else "paused")
                    self._step(kind, k, ps, opt, self._lr(lr))
                    steps_here += 1
                    if kind == "global" and self.st["pstep"] % self.cfg.eval_every == 0:
                        self._evaluate()
                    if self.dir is not None and time.monotonic() - last_save > self.cfg.save_every_s:
                        self._save()
                        last_save = time.monotonic()
                self._end_phase(kind, k, names)
                self._opt = None
                self._save()
            self._restore_best()
            self._save()
            return self._report("done")
        finally:
            for n, p in self.params.items():
                p.requires_grad_(flags[n])
            restore_dtypes(self.params, self.masters)
            if self.lora:  # a plain model again (a resumed run adds fresh adapters and loads their state)
                merge_lora(self.s)

    def _step(self, kind: str, k: int, ps: list[Tensor], opt: torch.optim.Optimizer, lr: float) -> None:
        for g in opt.param_groups:
            g["lr"] = lr
        total = 0.0
        for _ in range(self.cfg.accum):
            ids = self._batch()
            with self._amp(self.cfg.autocast):
                loss = self.layer_loss(k, ids) if kind == "layer" else self.global_loss(ids)
            (loss / self.cfg.accum).backward()
            total += float(loss.detach()) / self.cfg.accum
            self.st["ptok"] += ids.numel()
            self.st["tokens"] += ids.numel()
        torch.nn.utils.clip_grad_norm_(ps, self.cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        st = self.st
        st["pstep"] += 1
        st["steps"] += 1
        st["first_loss"] = total if st["first_loss"] is None else st["first_loss"]
        st["last_loss"] = total if st["last_loss"] is None else 0.9 * st["last_loss"] + 0.1 * total
        self._tick()
        if st["pstep"] % 10 == 0 or st["pstep"] == 1:
            what = f"layer {k}" if kind == "layer" else "global"
            self._log(f"{what} step {st['pstep']} loss {total:.4f} lr {lr:.2e} tokens {st['tokens']} "
                      f"({st['wall'] / 60:.1f} min)")

    def _amp(self, on: bool) -> torch.autocast:
        return torch.autocast(self.s.device.type, dtype=torch.bfloat16, enabled=on)

    def _restore_best(self) -> None:
        if self.best_state:
            with torch.no_grad():
                for n, v in self.best_state.items():
                    self.params[n].copy_(v)

    def _log(self, msg: str) -> None:
        if self.progress:
            print(f"[heal] {msg}", file=sys.stderr, flush=True)

    def _report(self, status: str) -> HealReport:
        st, c = self.st, self.cfg
        best = st["best"] or (0, math.nan)
        lt = sum(x["tokens"] for x in st["layers"])
        if st["phase"] < len(self.phases) and self.phases[st["phase"]][0] == "layer":
            lt += st["ptok"]
        return HealReport(
            status=status, stages=list(self.stages),
            trained_layers=sorted(set(self.layer_targets) | set(self.global_layers if "global" in self.stages else [])),
            train_all=self.train_all, layer_stage=list(st["layers"]), curve=[tuple(x) for x in st["curve"]],
            start_val_ppl=st["curve"][0][1] if st["curve"] else math.nan, best_val_ppl=best[1], best_tokens=best[0],
            tokens=st["tokens"], stage_tokens={"layer": lt, "global": st["tokens"] - lt}, steps=st["steps"],
            stage_seconds={k: round(v, 2) for k, v in st.get("stage_wall", {}).items()},
            wall_minutes=round(st["wall"] / 60, 3),
            cpu_minutes=round(st["cpu"] / 60, 3), threads=self.threads,
            budget={"minutes": None if self.budget_s is None else self.budget_s / 60, "tokens": self.budget_tok,
                    "clock": c.clock, "layer_frac": c.layer_frac, "val_tokens": self.val.numel(),
                    "train_tokens_available": self.train.numel()},
            memory=dict(st["memory"]), config={k: getattr(c, k) for k in c.__dataclass_fields__},
            global_params=c.global_params, resumed=self.resumed, notes=self.notes + [
                f"student layers 0..{self.prefix_layer - 1} are the teacher's: they start from its hidden state"
                if self.prefix_layer else "no student layer is shared with the teacher"])
