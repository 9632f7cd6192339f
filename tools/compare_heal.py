"""The healing table of docs/RESULTS.md: SmolLM2-135M with 8 layers removed by shortgpt, slm, streamline and come,
each without and with healing; val perplexity and MC accuracy, healing budget (tokens, minutes).

    python tools/compare_heal.py --work /tmp/heal_cmp                      # everything (hours: 4 prunes + 4 heals)
    python tools/compare_heal.py --work /tmp/heal_cmp --steps prune        # only the pruned checkpoints
    python tools/compare_heal.py --work /tmp/heal_cmp --table              # print the table from results.json
    python tools/plot_heal.py /tmp/heal_cmp                                # healing curves -> heal_curves.png

Every piece is saved as it finishes (WORK/<method> pruned checkpoint, WORK/<method>-healed healed
checkpoint, WORK/results.json evaluations) and reused by a re-run, so the tool can be stopped and
restarted; a healing run stopped midway resumes from its heal_state. Pruning uses the depth pipeline
(layerfold.pipeline.prune, its default calibration: 64 x 256 tokens of pydoc calib); evaluation is
layerfold.evaluate on the pydoc val split (perplexity over 512-token windows, ``--mc-items`` 4-way items).
Healing budget: ``--minutes`` per model on ``--clock`` cpu (process CPU time / threads: the wall time of
an unshared machine; on a shared one the wall time is longer, and is reported too).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import checkout  # noqa: E402,F401  (layerfold from this checkout when it is not installed)

import layerfold  # noqa: E402
from layerfold.core.checkpoint import is_checkpoint  # noqa: E402
from layerfold.core.paths import write_json_atomic  # noqa: E402
from layerfold.healing.heal import HealConfig, heal_pruned, save_healed  # noqa: E402

METHODS = ("shortgpt", "slm", "streamline", "come")
SOURCE = "smollm2-135m"


def log(msg: str) -> None:
    print(f"[compare_heal {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def evaluate(path: str | Path, args: argparse.Namespace) -> dict[str, Any]:
    from layerfold.evaluation.evaluate import evaluate as ev

    model, tok = layerfold.load(path, quiet=True)
    t0, c0 = time.time(), time.process_time()
    r = ev(model, tok, data=args.data, tasks=("ppl", "mc"), seq_len=512, mc_items=args.mc_items, batch_size=8)
    return {"ppl": r["ppl"]["ppl"], "ppl_tokens": r["ppl"]["tokens"], "acc": r["mc"]["acc"],
            "acc_norm": r["mc"]["acc_norm"], "mc_items": r["mc"].get("n"), "layers": model.spec.n_layers,
            "params": model.num_params(), "eval_wall_s": round(time.time() - t0, 1),
            "eval_cpu_s": round(time.process_time() - c0, 1)}


def prune(method: str, work: Path, args: argparse.Namespace) -> Path:
    out = work / method
    if is_checkpoint(out):
        return out
    from layerfold.pipeline import prune as run_prune

    log(f"pruning {method}")
    t0 = time.time()
    run_prune(SOURCE, method, "8", out, data=args.data, eval=False, progress=False)
    log(f"pruned {method} in {time.time() - t0:.0f} s")
    return out


def heal(method: str, pruned: Path, work: Path, args: argparse.Namespace) -> Path | None:
    out = work / f"{method}-healed"
    if is_checkpoint(out):
        return out
    student, tok = layerfold.load(pruned, quiet=True)
    prov = student.provenance
    cfg = HealConfig(clock=args.clock, autocast=args.autocast, lr_global=args.lr_global, lr_layer=args.lr_layer,
                     layer_frac=args.layer_frac, eval_every=args.eval_every, val_tokens=args.val_tokens,
                     hidden_weight=args.hidden_weight, global_params="all" if args.train_all else args.global_params)
    log(f"healing {method}: {args.minutes} min ({args.clock} clock), layers {prov['changed_layers']} changed")
    rep = heal_pruned(student, layerfold.resolve(SOURCE, quiet=True), prov["layer_map"], prov["changed_layers"], tok,
                      data=args.data, budget_minutes=args.minutes, stages=("layer", "global"),
                      out_dir=out, resume=True, progress=True, config=cfg)
    if rep.status != "done":
        log(f"healing {method} {rep.status}; re-run to resume")
        return None
    base = json.loads((pruned / "report.json").read_text()) if (pruned / "report.json").is_file() else {}
    save_healed(out, student, rep, provenance={**prov, "healed_from": str(pruned)}, base_report=base,
                tokenizer=tok, sources=[str(pruned), str(layerfold.resolve(SOURCE, quiet=True))])
    log(f"healed {method}: val ppl {rep.start_val_ppl:.2f} -> {rep.best_val_ppl:.2f} ({rep.tokens} tokens, "
        f"{rep.wall_minutes:.1f} wall min, {rep.cpu_minutes:.1f} CPU min)")
    return out


def table(res: dict[str, Any]) -> str:
    d = res.get("dense")
    if not d:
        return "(no dense evaluation yet)"
    x = lambda v: f"{v:.2f} ({v / d['ppl']:.2f}x)" if v is not None else "-"
    a = lambda v: f"{100 * v:.1f}" if v is not None else "-"
    lines = [f"SmolLM2-135M (30 layers, {d['params'] / 1e6:.1f}M params): val ppl {d['ppl']:.2f}, MC acc "
             f"{a(d['acc'])}% ({d.get('mc_items')} items, chance 25%); pydoc val, {d['ppl_tokens']} tokens", "",
             "| method | layers | params | val ppl (x dense) | MC acc % | healed val ppl (x dense) | healed MC acc % "
             "| heal tokens (layer + global stage) | heal wall min | heal CPU min |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in METHODS:
        r = res.get(m, {})
        p, h, b = r.get("pruned") or {}, r.get("healed") or {}, r.get("heal") or {}
        if not p:
            continue
        st = b.get("stage_tokens")
        tok = f"{st['layer'] / 1e3:.0f}k + {st['global'] / 1e3:.0f}k" if st else "-"
        lines.append(f"| {m} | {p['layers']} | {p['params'] / 1e6:.1f}M | {x(p.get('ppl'))} | {a(p.get('acc'))} | "
                     f"{x(h.get('ppl'))} | {a(h.get('acc'))} | {tok} | {b.get('wall_minutes', '-')} "
                     f"| {b.get('cpu_minutes', '-')} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/heal_cmp", help="working directory (checkpoints, results.json)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", default="prune,eval,heal", help="subset of prune,eval,heal")
    p.add_argument("--table", action="store_true", help="only print the table from results.json")
    p.add_argument("--data", default="pydoc")
    p.add_argument("--mc-items", type=int, default=100)
    p.add_argument("--minutes", type=float, default=15.0, help="healing budget per model (default 15)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast in healing (default on: 2x on this CPU)")
    p.add_argument("--global-params", choices=("auto", "all", "lora", "changed"), default="auto",
                   help="what the global stage trains besides the changed layers (layerfold heal -h)")
    p.add_argument("--train-all", action="store_true", help="same as --global-params all")
    d = HealConfig()
    p.add_argument("--lr-global", type=float, default=d.lr_global)
    p.add_argument("--lr-layer", type=float, default=d.lr_layer)
    p.add_argument("--layer-frac", type=float, default=d.layer_frac)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--val-tokens", type=int, default=d.val_tokens)
    p.add_argument("--hidden-weight", type=float, default=d.hidden_weight)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rpath = work / "results.json"
    res: dict[str, Any] = json.loads(rpath.read_text()) if rpath.is_file() else {}
    if args.table:
        print(table(res))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = set(args.steps.split(","))
    save = lambda: write_json_atomic(rpath, res)
    if "heal" in steps:  # the healing settings; eval runs record theirs under "eval_settings"
        write_json_atomic(work / "heal_settings.json", {**vars(args), "threads_used": torch.get_num_threads()})
    if "eval" in steps:
        res["eval_settings"] = {"data": args.data, "mc_items": args.mc_items, "seq_len": 512,
                                "threads": torch.get_num_threads()}
    if "eval" in steps and "dense" not in res:
        log("evaluating dense")
        res["dense"] = evaluate(layerfold.resolve(SOURCE, quiet=True), args)
        save()
    if "eval" in steps and "dense_track" not in res:  # the perplexity healing tracks, for the curves' reference
        from layerfold.core.data import token_stream
        from layerfold.evaluation.evaluate import perplexity

        model, tok = layerfold.load(SOURCE, quiet=True)
        c = HealConfig(val_tokens=args.val_tokens)
        val = token_stream(tok, args.data, "val")[: c.val_tokens // c.seq_len * c.seq_len].view(-1, c.seq_len)
        res["dense_track"] = {"ppl": perplexity(model, val, seq_len=c.seq_len, batch_size=c.micro_batch)["ppl"],
                              "tokens": val.numel()}
        save()
    for m in args.methods.split(","):  # only the eval step writes results.json: prune/heal may run in another process
        if "prune" in steps:
            prune(m, work, args)
        pruned = work / m
        if not is_checkpoint(pruned):
            continue
        if "heal" in steps and heal(m, pruned, work, args) is None:
            return 130
        r = res.setdefault(m, {})
        if "eval" in steps and "pruned" not in r:
            log(f"evaluating {m}")
            r["pruned"] = evaluate(pruned, args)
            save()
        healed = work / f"{m}-healed"
        if "eval" in steps and is_checkpoint(healed) and "healed" not in r:
            rep = json.loads((healed / "report.json").read_text())["heal"]
            r["heal"] = {k: rep[k] for k in ("tokens", "wall_minutes", "cpu_minutes", "threads", "start_val_ppl",
                                             "best_val_ppl", "best_tokens", "trained_layers", "memory", "budget",
                                             "curve", "train_all", "global_params", "config")
                        if k in rep}
            lay = sum(x["tokens"] for x in rep["layer_stage"])
            r["heal"]["stage_tokens"] = {"layer": lay, "global": rep["tokens"] - lay}
            log(f"evaluating {m} healed")
            r["healed"] = evaluate(healed, args)
            save()
    (work / "table.md").write_text(table(res) + "\n")
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
