"""`layerfold prune MODEL --method M --target T --out DIR`: calibrate, plan, apply, evaluate, save."""

from __future__ import annotations

import argparse
from typing import Any

from layerfold.cli.util import add_common, add_weights, count_arg, emit, finite_arg, torch_dtype
from layerfold.core.console import table

EPILOG = """\
targets: 8 (layers removed), 25% or 0.25 (fraction of layers), params:0.2 or 0.2p (fraction of parameters)
  streamline removes a window of that many layers and adds one trained block back (a params target
  counts the block); merge methods (laco, slm) leave exactly that many fewer layers.

a hand-written plan (--plan FILE, JSON; source-layer indices, ranges inclusive):
  {"kind": "depth", "n_layers": 30, "drop": [24],
   "merge": [{"first": 20, "last": 22, "how": "consolidate"}],
   "replace": [{"first": 11, "last": 18, "block": "mlp"}]}
report.json of an earlier prune also works as a plan file (its "plan" is read).
"""


class _SharedArgs:
    """What each method's ``add_args`` sees: adds its options to the parser, once per flag.

    Methods may share an option (slm and laco both read --similarity): the first definition wins and the
    value reaches every method through ``options``."""

    def __init__(self, parser: argparse.ArgumentParser, group: Any, seen: dict[str, str]):
        self.parser, self.group, self.seen = parser, group, seen
        self.dests: list[str] = []

    def add_argument(self, *flags: str, **kw: Any) -> Any:
        known = [f for f in flags if f in self.seen]
        if known:
            self.dests.append(self.seen[known[0]])
            return None
        kw.setdefault("default", None)
        action = self.group.add_argument(*flags, **kw)
        for f in flags:
            self.seen[f] = action.dest
        self.dests.append(action.dest)
        return action

    def add_argument_group(self, *a: Any, **kw: Any) -> _SharedArgs:
        return self

    def add_mutually_exclusive_group(self, *a: Any, **kw: Any) -> _SharedArgs:
        return self


def register(sub: argparse._SubParsersAction) -> None:
    from layerfold.methods import all_methods

    methods = all_methods()
    p = sub.add_parser("prune", help="remove, merge or replace layers (or slice width) and save the result",
                       description="Prune a model end to end: calibrate (or reuse --stats) -> plan -> apply -> train "
                                   "the replacement where the method has one -> evaluate dense and pruned on the same "
                                   "val data -> save a checkpoint with report.json.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p)
    add_weights(p)
    names = sorted(methods)
    p.add_argument("--method", choices=names, default=None,
                   help="; ".join(f"{n}: {methods[n].help}" for n in names if methods[n].help) or None)
    p.add_argument("--target", default=None, help="how much to prune (see below)")
    p.add_argument("--out", required=True, help="output checkpoint directory (never the source)")
    p.add_argument("--plan", default=None, help="apply this plan JSON instead of running a method")
    p.add_argument("--stats", default=None, help="statistics directory from `layerfold calibrate` (skip calibration)")
    p.add_argument("--data", default="pydoc", help="calibration and evaluation text: pydoc (built in) or a file")
    p.add_argument("--samples", type=count_arg(1), default=64, help="calibration sequences (default 64)")
    p.add_argument("--seq-len", type=count_arg(2), default=256, help="tokens per calibration sequence (default 256)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling and training seed")
    p.add_argument("--heal", action="store_true", help="heal the pruned model against the dense one")
    p.add_argument("--heal-minutes", type=finite_arg, default=None, help="healing budget in minutes (default 15)")
    p.add_argument("--heal-tokens", type=count_arg(1), default=None, help="healing budget in training tokens instead")
    p.add_argument("--heal-global-params", choices=("auto", "all", "lora", "changed"), default=None,
                   help="what healing's global stage trains besides the changed layers (see `layerfold heal -h`)")
    p.add_argument("--no-eval", action="store_true", help="skip the dense vs pruned evaluation")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never the source)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    seen: dict[str, str] = {}
    dests: dict[str, list[str]] = {}  # method -> the dests of its own options (shared ones included)
    for n in names:
        if methods[n].add_args is None:
            continue
        shared = _SharedArgs(p, p.add_argument_group(f"{n} options"), seen)
        methods[n].add_args(shared)  # type: ignore[arg-type]
        dests[n] = sorted(set(shared.dests))
    p.set_defaults(func=run, _method_dests=dests)


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of the chosen method only (a plan file's replacement blocks train as streamline does)."""
    name = args.method or ("streamline" if args.plan else None)
    return {d: getattr(args, d) for d in args._method_dests.get(name, []) if getattr(args, d, None) is not None}


def run(args: argparse.Namespace) -> int:
    from layerfold.pipeline import prune

    opts = method_options(args)
    report = prune(args.model, args.method, args.target, args.out, stats=args.stats, data=args.data,
                   samples=args.samples, seq_len=args.seq_len, plan=args.plan, options=opts, heal=args.heal,
                   heal_options=heal_options(args),
                   eval=not args.no_eval, device=args.device, dtype=torch_dtype(args.dtype), seed=args.seed,
                   progress=not (args.quiet or args.json), overwrite=args.overwrite,
                   allow_nonfinite=args.allow_nonfinite, weights=args.weights)
    emit(args, report, summary(report))
    return 0


def heal_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The healing budget and global-stage choice given on the prune command line (None: the defaults)."""
    from layerfold.healing.common import HealConfig
    from layerfold.healing.heal import check_budget

    if getattr(args, "heal", False):  # checked here, before the model is loaded and calibrated
        check_budget(15.0 if args.heal_minutes is None and args.heal_tokens is None else args.heal_minutes,
                     args.heal_tokens)
    kw: dict[str, Any] = {}
    if args.heal_tokens is not None:
        kw.update(tokens=args.heal_tokens, budget_minutes=args.heal_minutes)
    elif args.heal_minutes is not None:
        kw["budget_minutes"] = args.heal_minutes
    if args.heal_global_params is not None:
        kw["config"] = HealConfig(global_params=args.heal_global_params)
    return kw or None


def summary(report: dict[str, Any]) -> str:
    from layerfold.pipeline import where_layers_went

    d, p = report["dense"], report["pruned"]
    rows = []
    for key, label in (("layers", "layers"), ("params", "parameters"), ("ppl", "val perplexity"),
                       ("acc", "val accuracy"), ("acc_norm", "val accuracy (norm)")):
        a, b = d.get(key), p.get(key)
        if a is None and b is None:
            continue
        ratio = f"{b / a:.3f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else "-"
        rows.append([label, _num(a), _num(b), ratio])
        pre = (report.get("pruned_before_heal") or {}).get(key)
        if pre is not None:
            num = isinstance(a, (int, float)) and a
            rows.append(["  before healing", "", _num(pre), f"{pre / a:.3f}x" if num else "-"])
    info = report.get("info") or {}
    if report["removed_layers"] == 0 and info.get("mean_sliced_fraction") is not None:  # width methods
        what = f"sliced {info['mean_sliced_fraction']:.1%} of the residual width on average"
    else:
        what = f"removed {report['removed_layers']} of {d['layers']} layers"
    lines = [f"{report['method']}: {what} -> {report['out']}",
             table(rows, ["", "dense", "pruned", "pruned/dense"])]
    where = where_layers_went(report)
    if where:
        lines += ["", "where the layers went:"] + [f"  {w}" for w in where]
    h = report.get("heal")
    if h:
        per_layer = ", ".join(f"{x['layer']}: {x['steps']}" for x in h.get("layer_stage", []))
        st = h.get("stage_tokens", {})
        lines += ["", f"healing: {h['tokens']:,} tokens (layer stage {st.get('layer', 0):,}, global "
                  f"{st.get('global', 0):,}) in {h['wall_minutes']:.1f} wall / {h['cpu_minutes']:.1f} CPU min, "
                  f"budget clock {h['budget']['clock']}; global stage trains: {h.get('global_params')}; "
                  f"val ppl {h['start_val_ppl']:.2f} -> best {h['best_val_ppl']:.2f}"
                  + (f"; layer-stage steps per layer: {per_layer}" if per_layer else "")]
    w = report.get("weights") or {}
    if w.get("place") == "host":
        lines += ["", f"weights: host memory, streamed to {report['device']} a layer at a time ({w.get('why')})"
                  + (f"; healing's teacher: {h['memory']['global'].get('teacher_held')}"
                     if h and "global" in h.get("memory", {}) else "")]
    t = report.get("times", {})
    lines.append("")
    lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    return "\n".join(lines)


def _num(v: Any) -> Any:
    if v is None:
        return "-"
    if isinstance(v, int) and v > 10_000:
        return f"{v / 1e6:.2f}M"
    return v
