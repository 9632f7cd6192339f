"""Healing a pruned model against its dense teacher: layer-wise hidden-state fitting, then a global logit KL.

Public API (``layerfold heal`` and ``layerfold prune --heal`` call these)::

    report = heal_pruned(student, teacher_source, layer_map, changed_layers, tokenizer, data="pydoc",
                         budget_minutes=15, tokens=None, stages=("layer", "global"), train_all=False,
                         out_dir=None, resume=True, progress=True, config=HealConfig())
    save_healed(out_dir, student, report, provenance=..., tokenizer=..., sources=[...])

``heal_pruned`` trains ``student`` in place and leaves it holding the best state seen; ``report.status``
is "done", or "interrupted" / "paused" (Ctrl-C, ``config.stop_after_steps``): the progress is then in
``out_dir/heal_state`` and a second call with the same arguments continues from it.

What is trained: the layers surgery created or altered (``changed_layers``) plus the first kept layer
after each run of removed layers (its input changed: ShortGPT changes no layer, yet has these), or
every parameter in the global stage with ``train_all``.

Stage "layer" (hierarchical distillation, ../shared/METHODS.md CoMe): one layer k at a time, in model
order, trained to reproduce the teacher's h_{max(layer_map[k]) + 1} (the output of the last original
layer it stands for; h_L for the student's last layer). Its input is the student's own hidden state at
k, not the teacher's h_{min(layer_map[k])}: the layer is fitted to the inputs it will see, so it also
absorbs the error of the layers below it (already healed) and of removed layers before it, which a
teacher input cannot show it (a layer after a ShortGPT gap would have nothing to learn).
``layer_input="teacher"`` gives the other choice. Loss: relative per-token error
||y - y*||^2 / ||y*||^2 averaged over tokens; in raw MSE SmolLM2's massive activation at position 0
(norm ~23,000 against ~200 elsewhere) would be the whole loss. Hidden states are streamed per
micro-batch: the teacher runs layer by layer with one block built at a time from its (mmap'd) state
dict; leading student layers identical to the teacher's start from the teacher's hidden state.

Stage "global": KL(teacher || student) of next-token distributions on the calibration split (plus
``hidden_weight`` times the same relative error at the changed layers' correspondences). The teacher is
held whole here (mmap'd on the CPU); the report states peak RSS, parameters trained and teacher held.

Both stages: AdamW, linear warm-up then cosine decay over the stage's budget, gradient clipping. The
budget is ``tokens`` and/or ``budget_minutes`` (clock "wall", or "cpu" = process CPU time / threads,
i.e. the wall time of an unshared machine); ``layer_frac`` of it goes to the layer stage. Validation
perplexity on the first ``val_tokens`` of the ``val`` split is measured before, after the layer stage
and every ``eval_every`` global steps; the best state is kept (selection on val: a handful of points).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from layerfold.core.checkpoint import save_checkpoint
from layerfold.core.model import Block, Model, build_model

STAGES = ("layer", "global")
STATE_DIR = "heal_state"


@dataclass
class HealConfig:
    seq_len: int = 256
    micro_batch: int = 4
    accum: int = 1  # micro-batches per optimizer step
    layer_frac: float = 0.2  # share of the budget for the layer stage (when both stages run)
    lr_layer: float = 5e-4
    lr_global: float = 3e-4  # SmolLM2 shortgpt-8, 16k tokens: 3e-4 beat 1e-4 (ppl 28.3 vs 32.1, train_all)
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    warmup_steps: int = 5
    weight_decay: float = 1e-3
    grad_clip: float = 1.0
    hidden_weight: float = 0.0  # global stage: weight of the hidden-state term at the correspondences
    layer_input: str = "student"  # "student" | "teacher": input of a layer in the layer stage
    eval_every: int = 30  # global steps between validation perplexities
    val_tokens: int = 4096  # an fp32 evaluation of 4096 tokens costs ~5% of a 15-minute CPU budget
    save_every_s: float = 120.0  # heal_state is written at least this often (and at every stop)
    clock: str = "wall"  # "wall" | "cpu": what budget_minutes measures
    seed: int = 0
    autocast: bool = False  # bf16 autocast of the training forward/backward (2x on this AVX512-BF16 CPU)
    stop_after_steps: int | None = None  # pause (state saved) after this many optimizer steps in this call

    def check(self) -> HealConfig:
        if self.layer_input not in ("student", "teacher"):
            raise ValueError(f"layer_input={self.layer_input!r}. Fix: use 'student' or 'teacher'")
        if self.clock not in ("wall", "cpu"):
            raise ValueError(f"clock={self.clock!r}. Fix: use 'wall' or 'cpu'")
        if min(self.seq_len, self.micro_batch, self.accum, self.eval_every) < 1 or not 0 <= self.layer_frac <= 1:
            raise ValueError("seq_len, micro_batch, accum, eval_every must be >= 1 and layer_frac in [0, 1]. "
                             "Fix: correct the heal configuration")
        return self


@dataclass
class HealData:
    train: Tensor  # (N,) token ids of the training text (calibration split)
    val: Tensor  # (M,) token ids of held-out text


@dataclass
class HealReport:
    status: str  # "done" | "interrupted" | "paused"
    stages: list[str]
    trained_layers: list[int]  # student layers trained by the layer stage / global stage (all with train_all)
    train_all: bool
    layer_stage: list[dict[str, Any]]  # per trained layer: correspondence, losses, tokens, time
    curve: list[tuple[int, float]]  # (training tokens so far, val perplexity)
    start_val_ppl: float
    best_val_ppl: float
    best_tokens: int
    tokens: int
    stage_tokens: dict[str, int]  # {"layer": ..., "global": ...}: a layer-stage token runs a few layers only
    steps: int
    wall_minutes: float
    cpu_minutes: float  # process CPU time, all threads
    threads: int
    budget: dict[str, Any]
    memory: dict[str, Any]
    config: dict[str, Any]
    resumed: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- small pieces ---------------------------------------------------------------------------------
def relative_mse(y: Tensor, target: Tensor) -> Tensor:
    """Mean over tokens of ||y - y*||^2 / ||y*||^2 (fp32): every token weighs the same, whatever its scale."""
    y, target = y.float(), target.float()
    return ((y - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-6)).mean()


def kl_teacher_student(s_logits: Tensor, t_logits: Tensor) -> Tensor:
    """Mean over tokens of KL(p_teacher || p_student), fp32."""
    s = F.log_softmax(s_logits.float().flatten(0, -2), -1)
    t = F.log_softmax(t_logits.float().flatten(0, -2), -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def heal_targets(layer_map: Sequence[Sequence[int]], changed: Sequence[int], n_teacher: int) -> list[int]:
    """Student layers to heal: changed ones, the first kept layer after each removed run, and the last
    layer when trailing layers were removed."""
    out, prev_end = set(changed), -1
    for k, grp in enumerate(layer_map):
        if min(grp) > prev_end + 1:
            out.add(k)
        prev_end = max(grp)
    if prev_end < n_teacher - 1:
        out.add(len(layer_map) - 1)
    return sorted(out)


class _Teacher:
    """The dense teacher, one block at a time from its (mmap'd) state dict, or whole once ``materialize``d."""

    def __init__(self, source: str | Path | Model, device: torch.device, dtype: torch.dtype):
        if isinstance(source, Model):
            self.spec, self.state = source.spec, {k: v.detach() for k, v in source.state_dict().items()}
        else:
            from layerfold.core.loading import load_spec_state

            self.spec, self.state, _ = load_spec_state(source, quiet=True)
        self.device, self.dtype = device, dtype
        self.keys = {i: [k for k in self.state if k.startswith(f"layers.{i}.")] for i in range(self.spec.n_layers)}
        with torch.device("meta"):
            self.shell = Model(self.spec)
        self.shell.embed.load_state_dict({"weight": self._t("embed.weight")}, assign=True)
        self.full: Model | None = None

    def _t(self, name: str) -> Tensor:
        return self.state[name].to(self.device, self.dtype)

    def block(self, i: int) -> Block:
        pre = f"layers.{i}."
        with torch.device("meta"):
            b = Block(self.spec.layers[i], self.spec)
        b.load_state_dict({k[len(pre):]: self._t(k) for k in self.keys[i]}, assign=True)
        return b.eval()

    def materialize(self) -> Model:
        if self.full is None:
            self.full = build_model(self.spec, self.state, device=self.device, dtype=self.dtype).eval()
            self.full.requires_grad_(False)
        return self.full

    @torch.no_grad()
    def run(self, ids: Tensor, depths: set[int], logits: bool = False) -> tuple[dict[int, Tensor], Tensor | None]:
        """Hidden states h_d for d in depths (0 = embeddings), and the logits when asked (needs the full model)."""
        m = self.full if self.full is not None else self.shell
        h, ropes, mask = m.prepare(ids)
        out = {0: h} if 0 in depths else {}
        last = self.spec.n_layers if logits else max(depths)
        for i in range(last):
            if self.full is not None:
                h = self.full.run_layer(i, h, ropes, mask)
            else:
                ls = self.spec.layers[i]
                cos, sin = ropes.get(ls.head_dim, (None, None)) if ls.has_attn else (None, None)
                h = self.block(i)(h, cos, sin, mask, None, i)
            if i + 1 in depths:
                out[i + 1] = h
        return out, (self.full.logits(h) if logits and self.full is not None else None)

    def layer_equal(self, student: Model, k: int) -> bool:
        mine = student.layers[k].state_dict()
        pre = f"layers.{k}."
        return len(mine) == len(self.keys[k]) and all(
            torch.equal(v, self.state[pre + n].to(v.device, v.dtype)) for n, v in mine.items())


def _shared_prefix(student: Model, teacher: _Teacher, layer_map: Sequence[Sequence[int]], trained: set[int]) -> int:
    """Leading student layers that are the teacher's own (same index, same weights, not trained): the
    student's h_p equals the teacher's, so the student may start there."""
    emb = student.embed.weight
    if emb.shape != teacher.state["embed.weight"].shape or not torch.equal(
            emb, teacher.state["embed.weight"].to(emb.device, emb.dtype)):
        return 0
    p = 0
    while p < len(layer_map) and list(layer_map[p]) == [p] and p not in trained and p < teacher.spec.n_layers \
            and student.spec.layers[p] == teacher.spec.layers[p] and teacher.layer_equal(student, p):
        p += 1
    return p


@torch.no_grad()
def val_perplexity(model: Model, seqs: Tensor, micro_batch: int) -> float:
    nll, n = 0.0, 0
    for b in seqs.split(micro_batch):
        logits = model(b)
        nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b[:, 1:].flatten(), reduction="sum"))
        n += b[:, 1:].numel()
    return math.exp(nll / max(n, 1))


def _chunks(tokens: Tensor, T: int, what: str) -> Tensor:
    n = tokens.numel() // T
    if n < 1:
        raise ValueError(f"heal: the {what} text has {tokens.numel()} tokens, fewer than one sequence of {T}. "
                         "Fix: give more text (--data) or a shorter --seq-len")
    return tokens[: n * T].view(n, T).long()


# ---- entry points ---------------------------------------------------------------------------------
def heal_pruned(student: Model, teacher_source: str | Path | Model, layer_map: Sequence[Sequence[int]],
                changed_layers: Sequence[int], tokenizer: Any = None, *, data: str | HealData = "pydoc",
                budget_minutes: float | None = 15.0, tokens: int | None = None,
                stages: Sequence[str] = STAGES, train_all: bool = False, out_dir: str | Path | None = None,
                resume: bool = True, progress: bool = True, config: HealConfig | None = None) -> HealReport:
    """Heal ``student`` (trained in place, left at its best state) against the dense ``teacher_source``.

    layer_map: per student layer, the teacher layers it stands for (provenance["layer_map"]).
    changed_layers: student layers surgery created or altered (provenance["changed_layers"]).
    data: a text source for layerfold.core.data ("pydoc" or a path; needs ``tokenizer``) or HealData tokens.
    budget_minutes / tokens: the whole healing budget (at least one). out_dir: heal_state/ lives there
    (None: no resumable state). resume: continue from out_dir/heal_state when it exists.
    """
    from layerfold.healing.loop import HealRun  # the training loop and its resumable state

    cfg = (config or HealConfig()).check()
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"heal: unknown stage(s) {bad or stages}. Fix: use a subset of {STAGES}, e.g. layer,global")
    if budget_minutes is None and tokens is None:
        raise ValueError("heal: no budget. Fix: give --minutes and/or --tokens")
    if len(layer_map) != student.spec.n_layers:
        raise ValueError(f"heal: layer_map has {len(layer_map)} entries, the student {student.spec.n_layers} layers. "
                         "Fix: pass the pruned checkpoint's own provenance['layer_map']")
    if isinstance(data, HealData):
        hd = data
    else:
        if tokenizer is None:
            raise ValueError("heal: a text source needs the tokenizer. Fix: pass tokenizer= or HealData tokens")
        from layerfold.core.data import token_stream

        hd = HealData(token_stream(tokenizer, data, "calib"), token_stream(tokenizer, data, "val"))
    dev, dtype = student.device, student.dtype
    teacher = _Teacher(teacher_source, dev, dtype)
    if teacher.spec.vocab_size != student.spec.vocab_size:
        raise ValueError("heal: teacher and student vocabularies differ. Fix: pass the dense model the student "
                         "was pruned from (provenance['teacher'])")
    flat = [i for g in layer_map for i in g]
    if flat and (min(flat) < 0 or max(flat) >= teacher.spec.n_layers):
        raise ValueError(f"heal: layer_map names teacher layers up to {max(flat)}, the teacher has "
                         f"{teacher.spec.n_layers}. Fix: pass the teacher the student was pruned from")
    train = _chunks(hd.train, cfg.seq_len, "training")
    val = _chunks(hd.val, cfg.seq_len, "validation")[: max(1, cfg.val_tokens // cfg.seq_len)]
    state_dir = Path(out_dir) / STATE_DIR if out_dir is not None else None
    if state_dir is not None and not resume and state_dir.exists():
        shutil.rmtree(state_dir)
    run = HealRun(student, teacher, [list(g) for g in layer_map], list(changed_layers), train.to(dev), val.to(dev),
                  cfg, list(stages), train_all, budget_minutes, tokens, state_dir, progress)
    return _with_sigint(run)


def _with_sigint(run: Any) -> HealReport:
    """Ctrl-C sets a flag the loop reads between steps: it saves its state and returns status 'interrupted'."""
    if threading.current_thread() is not threading.main_thread():
        return run.run()
    old = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if run.stop_requested:  # a second Ctrl-C: stop now, without saving
            signal.signal(signal.SIGINT, old)
            raise KeyboardInterrupt
        run.stop_requested = True
        print("\n[heal] stopping after this step (state is saved); Ctrl-C again to abort", file=sys.stderr)

    signal.signal(signal.SIGINT, handler)
    try:
        return run.run()
    finally:
        signal.signal(signal.SIGINT, old)


def save_healed(out: str | Path, student: Model, report: HealReport, *, provenance: dict[str, Any] | None = None,
                base_report: dict[str, Any] | None = None, tokenizer: Any = None,
                sources: Sequence[str | Path] = ()) -> Path:
    """Write the healed model as a layerfold checkpoint at ``out`` (atomically), keeping ``out/heal_state``
    (a healing run's directory is its checkpoint's directory) and refusing to overwrite any other checkpoint."""
    out = Path(out)
    if out.exists() and any(p.name != STATE_DIR for p in out.iterdir()) and not (out / STATE_DIR).exists():
        raise ValueError(f"{out}: exists and is not this healing run's directory. Fix: choose another --out")
    keep = out.parent / f".{out.name}.{STATE_DIR}-{os.getpid()}"
    if (out / STATE_DIR).exists():
        (out / STATE_DIR).rename(keep)
    try:
        prov = dict(provenance or {})
        prov["healed"] = {"stages": report.stages, "tokens": report.tokens, "best_val_ppl": report.best_val_ppl,
                          "trained_layers": report.trained_layers, "train_all": report.train_all}
        rep = dict(base_report or {})
        rep["heal"] = report.to_dict()
        state = {k: v.detach() for k, v in student.state_dict().items()}
        save_checkpoint(out, student.spec, state, tokenizer=tokenizer, provenance=prov, report=rep,
                        sources=list(sources), overwrite=out.exists())
    finally:
        if keep.exists():
            out.mkdir(parents=True, exist_ok=True)
            keep.rename(out / STATE_DIR)
    return out


def load_curve(path: str | Path) -> list[tuple[int, float]]:
    """The healing curve of a saved healed checkpoint (report.json) or of a report JSON file."""
    p = Path(path)
    rep = json.loads((p / "report.json" if p.is_dir() else p).read_text())
    heal = rep.get("heal", rep)
    if "curve" not in heal:
        raise ValueError(f"{p}: no healing curve in it. Fix: point to a checkpoint written by `layerfold heal`")
    return [(int(t), float(v)) for t, v in heal["curve"]]


__all__ = ["HealConfig", "HealData", "HealReport", "STAGES", "heal_pruned", "heal_targets", "kl_teacher_student",
           "load_curve", "relative_mse", "save_healed", "val_perplexity"]
