"""`layerfold lm-eval MODEL --tasks T[,T...]`: lm-evaluation-harness tasks on any layerfold checkpoint.

Runs ``lm_eval.simple_evaluate`` with the ``layerfold`` model (layerfold.interop.harness), so width-pruned
and replacement-block models, which ``lm_eval --model hf`` cannot load, are evaluated the same way.
Needs the ``lm-eval`` extra.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from layerfold.cli.util import add_common, add_weights, emit
from layerfold.core.console import table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lm-eval", help="run lm-evaluation-harness tasks on a layerfold model",
                       description="Evaluate MODEL with lm-evaluation-harness (pip install 'layerfold[lm-eval]') "
                                   "through the `layerfold` model adapter: any checkpoint, including width-pruned "
                                   "and LLM-Streamline models. Tasks are the harness's names (hellaswag, arc_easy, "
                                   "...) or your own YAML tasks in --include-path.")
    add_common(p)
    add_weights(p)
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--include-path", default=None, help="folder of your own task YAML files")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per item (task default)")
    p.add_argument("--limit", type=float, default=None, help="items per task (a fraction if < 1), for quick checks")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--max-length", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed for the harness and sampled generation (default 0)")
    p.add_argument("--output", default=None, help="also write the harness's results JSON to this file")
    p.set_defaults(func=run)


def lm_eval(model: str, tasks: list[str], *, device: str = "cpu", dtype: str | None = None, batch_size: int = 8,
            num_fewshot: int | None = None, limit: float | None = None, include_path: str | None = None,
            max_length: int | None = None, seed: int = 0, log_samples: bool = False,
            weights: str = "auto") -> dict[str, Any]:
    """The harness's results dict (``lm_eval.simple_evaluate``) for ``model`` on ``tasks``."""
    from layerfold.core.extras import package_versions, require

    require("lm-eval", "layerfold lm-eval")
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path {include_path}: no such directory. Fix: give the folder that holds "
                                "your task YAML files")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from layerfold.interop.harness import LayerfoldLM

    lm = LayerfoldLM(pretrained=model, device=device, dtype=dtype, batch_size=batch_size, max_length=max_length,
                     seed=seed, weights=weights)
    # indexing the harness's own thousands of task files takes seconds: skip it when --include-path has them all
    tm = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if tm is None or any(t not in tm.all_tasks for t in tasks):
        tm = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}. Fix: check the names (`lm_eval ls tasks`), or give "
                         "--include-path with your own task YAML files")
    res = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                          log_samples=log_samples, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed)
    res["layerfold"] = {"model": model, "device": device, "dtype": dtype, "batch_size": batch_size,
                        "weights": lm.weights,
                        "max_length": lm.max_length, "versions": package_versions(("torch", "transformers", "triton",
                                                                                   "lm_eval"))}
    return res


def run(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks is empty. Fix: name at least one task, e.g. --tasks arc_easy")
    res = lm_eval(args.model, tasks, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                  num_fewshot=args.num_fewshot, limit=args.limit, include_path=args.include_path,
                  max_length=args.max_length, seed=args.seed, weights=args.weights)
    out = {k: res.get(k) for k in ("results", "versions", "n-shot", "config", "layerfold")}
    if args.output:
        from layerfold.core.paths import write_json_atomic

        write_json_atomic(args.output, out)
    rows = []
    for task, metrics in (res.get("results") or {}).items():
        for key, v in metrics.items():
            name, _, filt = key.partition(",")
            if isinstance(v, (int, float)) and not name.endswith("_stderr"):
                se = metrics.get(f"{name}_stderr,{filt}")
                rows.append([task, name, f"{v:.4f}", f"{se:.4f}" if isinstance(se, (int, float)) else "-"])
    emit(args, json.loads(json.dumps(out, default=str)), table(rows, ["task", "metric", "value", "stderr"]))
    return 0
