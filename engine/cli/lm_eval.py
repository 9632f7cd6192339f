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

from layerfold.cli.util import add_common, add_weights, count_arg, emit, finite_arg
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
    p.add_argument("--num-fewshot", type=count_arg(0), default=None, help="few-shot examples per item (task default)")
    p.add_argument("--limit", type=limit_arg, default=None,
                   help="items per task (a fraction if < 1), for quick checks")
    p.add_argument("--batch-size", type=count_arg(1), default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--max-length", type=count_arg(2), default=None, help="context length (default: the model's)")
    p.add_argument("--seed", type=count_arg(0), default=0,
                   help="seed for the harness and sampled generation, 0..2**32-1 (default 0)")
    p.add_argument("--output", default=None, help="also write the harness's results JSON to this file")
    p.set_defaults(func=run)


def limit_arg(text: str) -> float:
    """--limit: a number of items (a whole number >= 1) or a fraction of them (0 < x < 1)."""
    v = finite_arg(text)
    if not (0 < v < 1 or (v >= 1 and v == int(v))):
        raise argparse.ArgumentTypeError(f"{text!r} is neither a whole number of items >= 1 nor a fraction between 0 "
                                         "and 1. Fix: e.g. --limit 100 (items per task) or --limit 0.1 (a tenth)")
    return v


def _earlier_results(path: Path) -> bool:
    """Whether ``path`` is a results file this command wrote (a rerun may replace it)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(d, dict) and "results" in d and "layerfold" in d


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
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"--seed {seed} is outside 0..2**32-1, the range the harness seeds numpy with. Fix: pass a "
                         "seed in that range, e.g. --seed 0")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from layerfold.interop.harness import LayerfoldLM

    # task names before the model is loaded; indexing the harness's own thousands of task files takes seconds:
    # skip it when --include-path has them all
    tm = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if tm is None or any(t not in tm.all_tasks for t in tasks):
        tm = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}. Fix: check the names (`lm_eval ls tasks`), or give "
                         "--include-path with your own task YAML files")
    lm = LayerfoldLM(pretrained=model, device=device, dtype=dtype, batch_size=batch_size, max_length=max_length,
                     seed=seed, weights=weights)
    try:
        res = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                              log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed)
    except ConnectionError as e:  # a task's dataset is not in the datasets cache and the Hub cannot be reached
        raise ValueError(f"a task's data could not be fetched ({str(e)[:300]}). Fix: run it once where there is "
                         "network (the datasets cache keeps it; HF_DATASETS_CACHE says where), or use your own "
                         "local task files with --include-path") from None
    except ValueError as e:  # random.sample: a task has fewer documents to draw the few-shot examples from
        if "sample larger than population" not in str(e).lower():
            raise
        raise ValueError(f"a task has too few items to draw {num_fewshot} few-shot examples for each item from its "
                         "few-shot split (or, without one, from the other items of its test split). Fix: lower "
                         "--num-fewshot, or give the task a larger fewshot_split") from None
    res["layerfold"] = {"model": model, "device": device, "dtype": dtype, "batch_size": batch_size,
                        "weights": lm.weights,
                        "max_length": lm.max_length, "versions": package_versions(("torch", "transformers", "triton",
                                                                                   "lm_eval"))}
    return res


def run(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks is empty. Fix: name at least one task, e.g. --tasks arc_easy")
    if args.output:  # checked now, not after the evaluation (hours) has run
        from layerfold.core.paths import check_output_file

        check_output_file(args.output, sources=[args.model], what="--output", replace=_earlier_results)
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
            name, comma, filt = key.partition(",")
            if comma and isinstance(v, (int, float)) and not name.endswith("_stderr"):  # "metric,filter" keys only
                se = metrics.get(f"{name}_stderr,{filt}")
                rows.append([task, name, f"{v:.4f}", f"{se:.4f}" if isinstance(se, (int, float)) else "-"])
    emit(args, json.loads(json.dumps(out, default=str)), table(rows, ["task", "metric", "value", "stderr"]))
    return 0
