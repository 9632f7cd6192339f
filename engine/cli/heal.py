"""`layerfold heal PRUNED --teacher MODEL --out DIR`: distil a pruned checkpoint back towards its dense model.

Reads the correspondence surgery recorded (provenance ``layer_map`` / ``changed_layers``), runs the
layer-wise and global stages of :func:`layerfold.healing.heal.heal_pruned` within the budget, and writes the best
state as a layerfold checkpoint at DIR with the healing report and curve. Progress is kept in
DIR/heal_state: Ctrl-C (or the budget) stops the run, ``--resume`` continues it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from layerfold.cli.util import add_common, count_arg, emit, finite_arg
from layerfold.core.console import human_bytes, table
from layerfold.core.paths import check_output
from layerfold.healing.common import TEACHER
from layerfold.healing.heal import STAGES, STATE_DIR, HealConfig, check_budget, heal_pruned, save_healed


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("heal", help="heal a pruned model by distillation from its dense teacher",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p, dtype=False)
    p.set_defaults(func=main)
    p.add_argument("--teacher", help="the dense model (default: provenance['teacher'] of the pruned checkpoint)")
    p.add_argument("--out", required=True, help="directory of the healed checkpoint (heal_state/ is kept in it)")
    p.add_argument("--minutes", type=finite_arg, default=None, help="time budget of the whole healing (default 15 "
                   "unless --tokens is given)")
    p.add_argument("--tokens", type=count_arg(1), default=None, help="training-token budget (both stages)")
    p.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                   help="what --minutes measures: wall time, or process CPU time / threads (the same work on a "
                   "busy or an idle machine); auto (default): cpu on a CPU, wall on a GPU")
    p.add_argument("--stage", default="layer,global", help="stages to run, comma-separated (default layer,global)")
    p.add_argument("--global-params", choices=("auto", "all", "lora", "changed"), default="auto",
                   help="what the global stage trains besides the layers surgery changed: all (every parameter), "
                   "lora (rank --lora-rank adapters on the other layers, merged into the weights at the end), "
                   "changed (nothing else); auto (default): all when its AdamW state fits in memory, else lora")
    p.add_argument("--train-all", action="store_true", help="same as --global-params all")
    p.add_argument("--resume", action="store_true", help="continue a stopped run from DIR/heal_state")
    p.add_argument("--data", default="pydoc", help="training/validation text: pydoc or a text file (default pydoc)")
    d = HealConfig()
    for name, typ, hlp in (("seq_len", int, "tokens per training sequence"),
                           ("micro_batch", int, "sequences per micro-batch"),
                           ("accum", int, "micro-batches per optimizer step"),
                           ("lr_global", float, "AdamW peak learning rate, global stage"),
                           ("lr_layer", float, "AdamW peak learning rate, layer stage"),
                           ("layer_frac", float, "share of the budget for the layer stage"),
                           ("hidden_weight", float, "global stage: weight of hidden-state MSE at correspondences"),
                           ("eval_every", int, "global steps between validation perplexities"),
                           ("val_tokens", int, "validation tokens per perplexity"),
                           ("seed", int, "data order seed")):
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=getattr(d, name),
                       help=f"{hlp} (default {getattr(d, name)})")
    p.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast in training (about 2x on CPUs with AVX512-BF16/AMX and on GPUs; validation "
                   "stays in the model's dtype); default: on where bf16 is native")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help=f"LoRA rank with --global-params lora "
                   f"(default {d.lora_rank}; alpha {d.lora_alpha:g})")
    p.add_argument("--teacher-weights", choices=TEACHER, default=d.teacher,
                   help="where the dense teacher is held: device (whole), host (host memory, one pass over its "
                   "layers per chunk of upcoming micro-batches: a teacher that does not fit beside the student on "
                   "the GPU); auto (default): host where it does not fit. The results are the same")
    p.add_argument("--layer-input", choices=("student", "teacher"), default=d.layer_input,
                   help="layer stage input: the student's own hidden state (default) or the teacher's")


def main(args: argparse.Namespace) -> int:
    import layerfold

    stages = [s.strip() for s in args.stage.split(",") if s.strip()]
    if not stages or any(s not in STAGES for s in stages):
        raise ValueError(f"--stage {args.stage!r}: unknown stage. Fix: use a comma-separated subset of {STAGES}")
    minutes = args.minutes if args.minutes is not None or args.tokens is not None else 15.0
    check_budget(minutes, args.tokens)
    cfg = HealConfig(seq_len=args.seq_len, micro_batch=args.micro_batch, accum=args.accum, lr_global=args.lr_global,
                     lr_layer=args.lr_layer, layer_frac=args.layer_frac, hidden_weight=args.hidden_weight,
                     eval_every=args.eval_every, val_tokens=args.val_tokens, seed=args.seed, clock=args.clock,
                     layer_input=args.layer_input, autocast=args.autocast,
                     global_params="all" if args.train_all else args.global_params, lora_rank=args.lora_rank,
                     teacher=args.teacher_weights).check()
    out = Path(args.out)
    if out.exists():
        if not (out / STATE_DIR).exists():
            raise ValueError(f"{out}: already exists and holds no healing state. Fix: choose another --out")
        if not args.resume:
            raise ValueError(f"{out}: holds a healing run ({STATE_DIR}/). Fix: pass --resume to continue it, or "
                             "choose another --out")
    sources = [args.model, layerfold.resolve(args.model, quiet=True)]
    if args.teacher:
        sources += [args.teacher, layerfold.resolve(args.teacher, quiet=True)]
    check_output(out, sources=sources, overwrite=(out / STATE_DIR).is_dir())  # as save_healed will, before training
    if args.data != "pydoc" and not Path(args.data).is_file():
        raise FileNotFoundError(f"--data {args.data}: no such file. Fix: use --data pydoc (built-in text) or the path "
                                "of a .txt or .jsonl file")
    from layerfold.calibration.calibrate import check_context
    from layerfold.core.loading import load_spec_state

    check_context(args.seq_len, load_spec_state(args.model, quiet=True)[0].max_position)  # the header only
    student, tok = layerfold.load(args.model, device=args.device, allow_nonfinite=args.allow_nonfinite)
    prov: dict[str, Any] = dict(getattr(student, "provenance", {}) or {})
    if "layer_map" not in prov:
        raise ValueError(f"{args.model}: its provenance records no layer_map. Fix: heal a checkpoint written by "
                         "`layerfold prune` (it records which original layers each new layer stands for)")
    teacher = args.teacher or prov.get("teacher") or prov.get("source")
    if not teacher:
        raise ValueError(f"{args.model}: no teacher recorded. Fix: pass --teacher MODEL (the dense source)")
    if not args.teacher:
        check_output(out, sources=[teacher, layerfold.resolve(teacher, quiet=True)],
                     overwrite=(out / STATE_DIR).is_dir())
    rep = heal_pruned(student, layerfold.resolve(teacher, quiet=True), prov["layer_map"],
                      prov.get("changed_layers", []), tok, data=args.data, budget_minutes=minutes, tokens=args.tokens,
                      stages=stages, out_dir=out, resume=args.resume,
                      progress=not args.json, config=cfg)
    if rep.status != "done":
        emit(args, {"status": rep.status, "tokens": rep.tokens, "state": str(out / STATE_DIR)},
             f"healing {rep.status} after {rep.tokens} tokens; progress saved in {out / STATE_DIR}. "
             "Fix: run the same command with --resume to continue")
        return 130 if rep.status == "interrupted" else 0
    base = _read_report(Path(layerfold.resolve(args.model, quiet=True)))
    prov = {**prov, "teacher": str(teacher), "healed_from": str(args.model)}
    save_healed(out, student, rep, provenance=prov, base_report=base, tokenizer=tok,
                sources=[args.model, layerfold.resolve(teacher, quiet=True)])
    emit(args, {"out": str(out), **rep.to_dict()}, _text(out, rep))
    return 0


def _read_report(path: Path) -> dict[str, Any]:
    p = path / "report.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _text(out: Path, rep: Any) -> str:
    rows = [[t, round(v, 3)] for t, v in rep.curve]
    mem = "; ".join(f"{k}: peak RSS {human_bytes(v.get('peak_rss_mib', 0) * 2**20)}"
                    + (f", device peak {human_bytes(v['cuda_peak_mib'] * 2**20)}" if "cuda_peak_mib" in v else "")
                    + f", {v.get('params_trained', 0):,} params trained, teacher {v.get('teacher_held', '?')}"
                    for k, v in rep.memory.items())
    rates = "; ".join(f"{k} {rep.stage_tokens.get(k, 0):,} tokens in {sec:.0f} s "
                      f"({rep.stage_tokens.get(k, 0) / max(sec, 1e-9):,.0f} tokens/s)"
                      for k, sec in rep.stage_seconds.items())
    lines = [f"healed -> {out}",
             f"val ppl {rep.start_val_ppl:.3f} -> best {rep.best_val_ppl:.3f} (at {rep.best_tokens} tokens)",
             f"budget: {rep.tokens} tokens, {rep.wall_minutes:.1f} wall min, {rep.cpu_minutes:.1f} CPU min "
             f"({rep.threads} threads); layers trained {rep.trained_layers} (global stage: {rep.global_params})",
             f"stages: {rates or '-'}", f"memory: {mem}", "", table(rows, ["tokens", "val ppl"])]
    return "\n".join(lines)
