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

Stage "layer" (hierarchical distillation, as CoMe describes it): one layer k at a time, in model
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
held whole here, on the student's device (its mmap'd weights on a CPU); the report states peak RSS (and the
device peak on a GPU), parameters trained, teacher held, and each stage's tokens and seconds.

Both stages: AdamW, linear warm-up then cosine decay over the stage's budget, gradient clipping; under
bf16 autocast, trained weights narrower than fp32 (a bf16 checkpoint on a GPU) are held as fp32 masters
while training and cast back at the end (healing.common.upcast_masters). The
budget is ``tokens`` and/or ``budget_minutes`` (clock "wall", or "cpu" = process CPU time / threads,
i.e. the wall time of an unshared machine); ``layer_frac`` of it goes to the layer stage. Validation
perplexity on the last ``val_tokens`` of the ``val`` split is measured before, after the layer stage
and every ``eval_every`` global steps; the best state is kept (selection on val: a handful of points). The
last tokens, because evaluations (``layerfold eval``, ``prune``'s report) read the split's first ones: with
pydoc's 18K val tokens (embedded tokenizer), the selection's 4,096 and the evaluation's 8,192 are disjoint.
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
from dataclasses import replace
from pathlib import Path
from typing import Any

from layerfold.calibration.calibrate import check_context
from layerfold.core.checkpoint import save_checkpoint
from layerfold.core.model import Model, require_model
from layerfold.core.paths import check_output, check_source
from layerfold.core.streaming import LayerStream
from layerfold.healing.common import STAGES, STATE_DIR, HealConfig, HealData, HealReport, chunks
from layerfold.healing.loop import HealRun


# ---- entry points ---------------------------------------------------------------------------------
def heal_pruned(student: Model, teacher_source: str | Path | Model, layer_map: Sequence[Sequence[int]],
                changed_layers: Sequence[int], tokenizer: Any = None, *, data: str | HealData = "pydoc",
                budget_minutes: float | None = 15.0, tokens: int | None = None,
                stages: Sequence[str] = STAGES, train_all: bool | None = None, out_dir: str | Path | None = None,
                resume: bool = True, progress: bool = True, config: HealConfig | None = None) -> HealReport:
    """Heal ``student`` (trained in place, left at its best state) against the dense ``teacher_source``.

    layer_map: per student layer, the teacher layers it stands for (provenance["layer_map"]).
    changed_layers: student layers surgery created or altered (provenance["changed_layers"]).
    data: a text source for layerfold.core.data ("pydoc" or a path; needs ``tokenizer``) or HealData tokens.
    budget_minutes / tokens: the whole healing budget (at least one). out_dir: heal_state/ lives there
    (None: no resumable state). resume: continue from out_dir/heal_state when it exists. train_all: True or
    False sets ``config.global_params`` to "all" or "changed" (None: the config's, "auto" by default).
    """
    stages = _check_args(student, teacher_source, layer_map, changed_layers, stages, data)
    cfg = (config or HealConfig()).check()
    if train_all is not None:
        cfg = replace(cfg, global_params="all" if train_all else "changed")
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"heal: unknown stage(s) {bad or stages}. Fix: use a subset of {STAGES}, e.g. layer,global")
    check_budget(budget_minutes, tokens)
    check_context(cfg.seq_len, student.spec.max_position)
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
    teacher = LayerStream(teacher_source, dev, dtype)
    if teacher.spec.vocab_size != student.spec.vocab_size:
        raise ValueError("heal: teacher and student vocabularies differ. Fix: pass the dense model the student "
                         "was pruned from (provenance['teacher'])")
    flat = [i for g in layer_map for i in g]
    if flat and (min(flat) < 0 or max(flat) >= teacher.spec.n_layers):
        raise ValueError(f"heal: layer_map names teacher layers up to {max(flat)}, the teacher has "
                         f"{teacher.spec.n_layers}. Fix: pass the teacher the student was pruned from")
    train = chunks(hd.train, cfg.seq_len, "training")
    # the last windows of the split: evaluations read its first tokens, so the selection stays off them
    val = chunks(hd.val, cfg.seq_len, "validation")[-max(1, cfg.val_tokens // cfg.seq_len):]
    state_dir = Path(out_dir) / STATE_DIR if out_dir is not None else None
    if state_dir is not None and not resume and state_dir.exists():
        shutil.rmtree(state_dir)
    run = HealRun(student, teacher, [list(g) for g in layer_map], list(changed_layers), train.to(dev), val.to(dev),
                  cfg, list(stages), budget_minutes, tokens, state_dir, progress)
    return _with_sigint(run)


def _check_args(student: Any, teacher_source: Any, layer_map: Any, changed_layers: Any, stages: Any,
                data: Any) -> list[str]:
    """heal_pruned's arguments by type, before anything is read: a TypeError / ValueError naming the fix. Returns
    the stages as a list ("layer,global" as one string is accepted)."""
    require_model(student, "student")
    if not isinstance(teacher_source, Model):
        check_source(teacher_source)
    ints = lambda xs: isinstance(xs, Sequence) and not isinstance(xs, str) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in xs)
    if not (isinstance(layer_map, Sequence) and all(ints(g) for g in layer_map)):
        raise TypeError("layer_map must list, per student layer, the teacher layers (ints) it stands for. Fix: pass "
                        "the pruned checkpoint's provenance['layer_map']")
    if not ints(changed_layers) or any(not 0 <= i < student.spec.n_layers for i in changed_layers):
        raise ValueError(f"changed_layers={changed_layers!r} must list student layers 0..{student.spec.n_layers - 1}. "
                         "Fix: pass the pruned checkpoint's provenance['changed_layers']")
    if not isinstance(data, (str, HealData)):
        raise TypeError(f"data must be a text source (str: 'pydoc' or a file path) or HealData, not "
                        f"{type(data).__name__}. Fix: pass data='pydoc' or HealData(train_ids, val_ids)")
    return [x.strip() for x in stages.split(",")] if isinstance(stages, str) else list(stages)


def check_budget(budget_minutes: float | None, tokens: int | None) -> None:
    """A healing budget: minutes (finite, > 0) and/or training tokens (a whole number >= 1)."""
    if budget_minutes is None and tokens is None:
        raise ValueError("heal: no budget. Fix: give --minutes and/or --tokens")
    if budget_minutes is not None and (isinstance(budget_minutes, bool) or not isinstance(budget_minutes, (int, float))
                                       or not math.isfinite(budget_minutes) or budget_minutes <= 0):
        raise ValueError(f"heal: a budget of {budget_minutes!r} minutes. Fix: give a positive, finite number of "
                         "minutes (e.g. --minutes 15)")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ValueError(f"heal: a budget of {tokens!r} tokens. Fix: give --tokens as a whole number >= 1")


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
    out = check_output(out, sources=sources, overwrite=(Path(out) / STATE_DIR).is_dir())  # only its own run dir
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


__all__ = ["HealConfig", "HealData", "HealReport", "STAGES", "check_budget", "heal_pruned", "load_curve", "save_healed"]
