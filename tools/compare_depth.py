"""Side-by-side comparison of the depth methods on one model, one calibration set, one evaluation.

    python tools/compare_depth.py                      # SmolLM2-135M, 4 / 8 / 10 layers removed
    python tools/compare_depth.py --targets 8 --methods shortgpt,streamline-mlp --json out.json

Calibrates once (window = the largest target, so Streamline can read cos(h_j, h_{j+n})), evaluates the
dense model once, then runs every method at every target on the same calibration ids and evaluates each
pruned model on the same ``val`` data (layerfold.evaluation.evaluate.evaluate). Results go to a JSON file after every
run (``--resume`` skips runs already there), and a markdown table is printed at the end.

For the merge methods (LaCo, SLM) it also records the evidence needed to explain their results: which
groups were merged, the similarity the search accepted and the threshold-vs-removed curve, the relative
Frobenius norm of every merged weight against the layers it came from, and the similarity of *every*
pruned model (ShortGPT's and Streamline's too) to the dense output under both measures, so one can see
whether the measure tracks perplexity. ``--ablations`` adds SLM/LaCo with ``keep-top`` and ``mean`` merges
at the middle target.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import checkout  # noqa: E402,F401  (layerfold from this checkout when it is not installed)

from layerfold.core.model import Model  # noqa: E402
from layerfold.core.paths import write_json_atomic  # noqa: E402
from layerfold.methods import Target  # noqa: E402
from layerfold.methods.merge_search import final_cosine, linear_cka  # noqa: E402
from layerfold.pipeline import run_eval, run_method  # noqa: E402

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "shortgpt": ("shortgpt", {}),
    "laco": ("laco", {}),
    "slm-cka": ("slm", {"similarity": "cka"}),
    "slm-final-cosine": ("slm", {"similarity": "final-cosine"}),
    "streamline-mlp": ("streamline", {"replacement": "mlp"}),
    "streamline-decoder": ("streamline", {"replacement": "decoder"}),
}
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "slm-cka-keep-top": ("slm", {"similarity": "cka", "merge_how": "keep-top"}),
    "slm-cka-mean": ("slm", {"similarity": "cka", "merge_how": "mean"}),
    "laco-keep-top": ("laco", {"merge_how": "keep-top"}),
    "streamline-mlp-lr2e-4": ("streamline", {"replacement": "mlp", "lr": 2e-4}),
    "streamline-mlp-mse-skip0": ("streamline", {"replacement": "mlp", "loss": "mse", "skip_first": True}),
    "streamline-mlp-mse": ("streamline", {"replacement": "mlp", "loss": "mse"}),
}
SIM_SAMPLES, SIM_SEQ_LEN = 8, 128


@torch.no_grad()
def output_similarity(model: Model, ref: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """Both merge-search measures for any pruned model: norm(h_L) against the dense ``ref`` (n, T, d)."""
    h, ropes, mask = model.prepare(ids)
    for i in range(model.spec.n_layers):
        h = model.run_layer(i, h, ropes, mask)
    rep = model.norm(h).float()
    return {"cka": linear_cka(rep, ref), "final-cosine": final_cosine(rep, ref)}


def merge_evidence(dense: Model, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Per merged group: relative Frobenius norm ||merged|| / mean ||source layers|| per weight, and
    ||merged - mean of sources|| / ||mean||, for the weights the merge formula touches."""
    from layerfold.surgery.depth import layer_state, merge_layer_states

    out = []
    for g in plan.get("merge", []):
        layers = list(range(g["first"], g["last"] + 1))
        if len(layers) < 2:
            continue
        srcs = [layer_state(dense, i) for i in layers]
        merged = merge_layer_states(srcs, g["how"])
        row: dict[str, Any] = {"layers": [g["first"], g["last"]], "how": g["how"]}
        for k in ("attn.q.weight", "attn.o.weight", "mlp.gate.weight", "mlp.down.weight"):
            if k not in merged:
                continue
            norms = torch.stack([s[k].float().norm() for s in srcs])
            mean = torch.stack([s[k].float() for s in srcs]).mean(0)
            row[k] = {"norm_ratio": round(float(merged[k].float().norm() / norms.mean()), 3),
                      "dist_from_mean": round(float((merged[k].float() - mean).norm() / mean.norm()), 3)}
        out.append(row)
    return out


def fmt_table(rows: list[dict[str, Any]], dense: dict[str, Any]) -> str:
    head = ("| removed | method | layers | params (M) | val ppl | ppl / dense | acc | acc_norm | method s | eval s |\n"
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head, f"| 0 | dense | {dense['layers']} | {dense['params'] / 1e6:.1f} | {dense['ppl']:.2f} | 1.00 | "
                   f"{dense['acc']:.3f} | {dense['acc_norm']:.3f} | - | {dense['eval_seconds']:.0f} |"]
    for r in rows:
        lines.append(f"| {r['removed']} | {r['variant']} | {r['layers']} | {r['params'] / 1e6:.1f} | {r['ppl']:.2f} | "
                     f"{r['ppl'] / dense['ppl']:.2f} | {r['acc']:.3f} | {r['acc_norm']:.3f} | "
                     f"{r['method_seconds']:.0f} | {r['eval_seconds']:.0f} |")
    return "\n".join(lines)


def bar_check(rows: list[dict[str, Any]], k: int = 8) -> str:
    by = {r["variant"]: r for r in rows if r["removed"] == k}
    if "shortgpt" not in by or "streamline-mlp" not in by:
        return f"bar (k={k}): not measured"
    s, g = by["streamline-mlp"]["ppl"], by["shortgpt"]["ppl"]
    verdict = "PASS" if s <= 0.8 * g else "FAIL"
    return (f"bar (k={k}): streamline-mlp ppl {s:.2f} vs shortgpt {g:.2f} -> {1 - s / g:.1%} lower "
            f"({verdict}, need >= 20%)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--targets", default="4,8,10", help="layers removed, comma-separated")
    ap.add_argument("--methods", default=",".join(VARIANTS), help=f"from {', '.join(VARIANTS)}")
    ap.add_argument("--ablations", action="store_true", help=f"also {', '.join(ABLATIONS)} at the middle target")
    ap.add_argument("--data", default="pydoc")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--stats", default=None, help="reuse (or write, if missing) the calibration statistics here")
    ap.add_argument("--mc-items", type=int, default=280, help="multiple-choice items per evaluation (pydoc val has "
                                                               "280)")
    ap.add_argument("--max-tokens", type=int, default=None, help="cap the perplexity tokens per evaluation")
    ap.add_argument("--json", default="compare_depth.json", help="results file (written after every run)")
    ap.add_argument("--md", default=None, help="also write the markdown table here")
    ap.add_argument("--resume", action="store_true", help="skip runs already in --json")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from layerfold.calibration.calibrate import calibrate
    from layerfold.calibration.stats import Stats
    from layerfold.core.data import calib_batches
    from layerfold.core.loading import load

    targets = [int(x) for x in args.targets.split(",")]
    names = [x.strip() for x in args.methods.split(",") if x.strip()]
    bad = [x for x in names if x not in VARIANTS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {list(VARIANTS)}")
    out = Path(args.json)
    state: dict[str, Any] = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    state.setdefault("runs", [])
    eval_opts = {"mc_items": args.mc_items, "max_tokens": args.max_tokens}
    state["setup"] = {"model": args.model, "data": args.data, "samples": args.samples, "seq_len": args.seq_len,
                      "targets": targets, "eval": eval_opts, "threads": torch.get_num_threads(),
                      "similarity_samples": [SIM_SAMPLES, SIM_SEQ_LEN], "command": " ".join(sys.argv)}
    t0 = time.time()
    model, tok = load(args.model)
    model.requires_grad_(False)
    calib = calib_batches(tok, source=args.data, split="calib", n_samples=args.samples, seq_len=args.seq_len, seed=0)
    window = max(targets)
    if args.stats and Path(args.stats).exists():
        stats = Stats.load(args.stats)
        if stats.window < window or stats.n_layers != model.spec.n_layers:
            raise SystemExit(f"{args.stats}: window {stats.window} / {stats.n_layers} layers do not fit. Fix: delete "
                             "it or pass another --stats")
        state["setup"]["calibrate_seconds"] = state["setup"].get("calibrate_seconds")
    else:
        tc = time.time()
        stats = calibrate(model, calib, window=window, cka=True, channels=False, progress=True,
                          meta={"data": args.data})
        state["setup"]["calibrate_seconds"] = time.time() - tc
        if args.stats:
            stats.save(args.stats)
    state["setup"]["bi"] = [round(float(x), 4) for x in stats.bi]
    sim_ids = calib[:SIM_SAMPLES, :SIM_SEQ_LEN]
    with torch.no_grad():
        h, ropes, mask = model.prepare(sim_ids)
        for i in range(model.spec.n_layers):
            h = model.run_layer(i, h, ropes, mask)
        ref = model.norm(h).float()
    if "dense" not in state:
        r = run_eval(model, tok, args.data, eval_opts)
        state["dense"] = {"layers": model.spec.n_layers, "params": model.num_params(), "ppl": r["ppl"],
                          "acc": r["acc"], "acc_norm": r["acc_norm"], "eval_seconds": r["seconds"]}
        write_json_atomic(out, state)
    print(f"dense: {state['dense']}", flush=True)
    plan_runs = [(k, v, *VARIANTS[v]) for k in targets for v in names]
    if args.ablations:
        mid = targets[len(targets) // 2]
        plan_runs += [(mid, v, *ABLATIONS[v]) for v in ABLATIONS]
    done = {(r["removed"], r["variant"]) for r in state["runs"]}
    for k, variant, method, opts in plan_runs:
        if (k, variant) in done:
            continue
        tm = time.time()
        res = run_method(model, tok, method, Target.parse(str(k)), calib, stats=stats,
                         options={**opts, "sim_samples": SIM_SAMPLES, "sim_seq_len": SIM_SEQ_LEN}, progress=False)
        method_s = time.time() - tm
        r = run_eval(res.model, tok, args.data, eval_opts)
        row = {"removed": k, "variant": variant, "method": method, "options": opts,
               "layers": res.model.spec.n_layers, "params": res.model.num_params(), "ppl": r["ppl"], "acc": r["acc"],
               "acc_norm": r["acc_norm"], "method_seconds": method_s, "eval_seconds": r["seconds"],
               "layer_map": res.layer_map, "plan": res.plan, "output_similarity": output_similarity(res.model, ref,
                                                                                                    sim_ids)}
        info = {k2: v2 for k2, v2 in res.info.items() if k2 not in ("candidates",)}
        if "candidates" in res.info:
            info["n_candidates"] = len(res.info["candidates"])
            info["candidates"] = res.info["candidates"][:400]
        if "training" in info:
            info["training"] = {**info["training"], "history": info["training"]["history"][::2]}
        row["info"] = info
        if method in ("laco", "slm"):
            row["merge_evidence"] = merge_evidence(model, res.plan)
        state["runs"].append(row)
        write_json_atomic(out, state)
        print(f"k={k} {variant}: layers {row['layers']} ppl {row['ppl']:.2f} acc {row['acc']:.3f} "
              f"method {method_s:.0f}s eval {r['seconds']:.0f}s sim {row['output_similarity']}", flush=True)
        del res
    state["total_seconds"] = state.get("total_seconds", 0) + time.time() - t0
    order = list(VARIANTS) + list(ABLATIONS)
    rows = sorted(state["runs"], key=lambda r: (r["removed"], order.index(r["variant"]) if r["variant"] in order
                                                 else 99))
    table = fmt_table(rows, state["dense"])
    state["table"] = table
    state["bar"] = bar_check(rows)
    write_json_atomic(out, state)
    print(table)
    print(state["bar"])
    if args.md:
        Path(args.md).write_text(table + "\n\n" + state["bar"] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
