"""``prune``: the end-to-end depth/width pruning pipeline behind ``layerfold prune``.

load -> calibrate (or reuse saved statistics) -> plan (a registered method, or a hand-written plan file)
-> apply -> train what the method trains -> optionally heal -> evaluate dense and pruned on the same
``val`` data -> save a checkpoint (atomic, never over the source) with report.json and provenance.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from layerfold.calibration.calibrate import check_context
from layerfold.core.args import whole
from layerfold.core.checkpoint import save_checkpoint
from layerfold.core.extras import package_versions
from layerfold.core.loading import load, resolve
from layerfold.core.model import Model
from layerfold.core.paths import check_output
from layerfold.evaluation.evaluate import check_eval_args
from layerfold.evaluation.streamed import evaluation_model
from layerfold.methods import PruneContext, PruneResult, Target, get_method
from layerfold.surgery.plan import DepthPlan

SAMPLES, SEQ_LEN = 64, 256


def layer_counts(model: Model) -> dict[str, Any]:
    return {"layers": model.spec.n_layers, "params": model.num_params()}


def load_stats(path: str | Path, model: Model, window: int) -> Any:
    """Saved statistics checked against ``model`` (a built or a meta-device Model: only its spec is read)."""
    from layerfold.calibration.stats import Stats

    st = Stats.load(path)
    st.check_model(model.spec, path)
    if st.window < window:
        raise ValueError(f"{path}: calibrated with window {st.window}, this prune needs cosines {window} layers "
                         f"apart. Fix: recalibrate with --window {window}, or drop --stats to calibrate here")
    return st


def needed_window(model: Model, target: Target | None) -> int:
    """Window W the calibration must cover: Streamline reads cos(h_j, h_{j+n}) with n = layers removed."""
    L = model.spec.n_layers
    if target is None:
        return 8
    try:
        k = target.layers_to_remove(model)
    except ValueError:
        k = 8
    return max(8, min(L, k + (2 if target.kind == "params" else 0)))


def run_method(model: Model, tokenizer: Any, method: str, target: Target, calib: torch.Tensor, *, stats: Any = None,
               options: dict[str, Any] | None = None, source: str = "", device: str = "cpu", seed: int = 0,
               progress: bool = False, weights: str = "device") -> PruneResult:
    """Plan, apply and train with a registered method; the dense model is left as it was. ``weights="host"``:
    the model is in host memory and the method computes on ``device`` a layer at a time."""
    m = get_method(method)
    ctx = PruneContext(model=model, tokenizer=tokenizer, source=source, target=target, stats=stats, calib=calib,
                       device=device, options=dict(options or {}), progress=progress, seed=seed, weights=weights)
    return m.fn(ctx)


def run_plan(model: Model, plan: DepthPlan, calib: torch.Tensor, options: dict[str, Any] | None = None,
             seed: int = 0, progress: bool = False, device: str | None = None) -> PruneResult:
    """Apply a hand-written plan; replacement blocks are trained as Streamline trains them (unless no_train),
    on ``device`` with the dense weights streamed there when given (None: where the model is)."""
    from layerfold.methods.streamline import train_options, train_replacement
    from layerfold.surgery.depth import apply_depth_plan

    opts = dict(options or {})
    new = apply_depth_plan(model, plan)
    info: dict[str, Any] = {"plan_file": True}
    idx = {r.first: j for j, group in enumerate(plan.layer_map()) for r in plan.replace if group[0] == r.first}
    for r in plan.replace:
        if not opts.get("no_train"):
            info[f"training_{r.first}_{r.last}"] = train_replacement(
                model, new, idx[r.first], r.first, r.last - r.first + 1, calib, **train_options(opts), seed=seed,
                progress=progress, device=device)
    return PruneResult(new, plan.to_dict(), plan.layer_map(), plan.changed_layers(), info)


def heal_result(res: PruneResult, teacher: Model, tokenizer: Any, *, data: str, device: str, progress: bool,
                options: dict[str, Any] | None = None, host_teacher: bool = False) -> dict[str, Any]:
    """Heal the pruned model in place against ``teacher`` (layerfold.healing) and return its report.
    ``host_teacher``: both models are in host memory; the student trains on ``device`` (and comes back), the
    teacher stays where it is (HealConfig.teacher "host": one pass over its layers per chunk of batches)."""
    from dataclasses import replace

    from layerfold.healing import heal as heal_mod
    from layerfold.healing.common import HealConfig

    kw: dict[str, Any] = {"data": data, "progress": progress, **(options or {})}
    if host_teacher:
        kw["config"] = replace(kw.get("config") or HealConfig(), teacher="host")
        res.model.to(device)
    try:
        rep = heal_mod.heal_pruned(res.model, teacher, res.layer_map, res.changed_layers, tokenizer, **kw)  # in place
    finally:
        if host_teacher:
            res.model.to("cpu")
    return rep.to_dict() if hasattr(rep, "to_dict") else dict(rep or {})


EVAL_KEYS = ("ppl", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr")


def run_eval(model: Model, tokenizer: Any, data: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    from layerfold.evaluation.evaluate import evaluate

    t0 = time.time()
    r = evaluate(model, tokenizer, data=data, **(options or {}))
    ppl = r.get("ppl", {}) if isinstance(r.get("ppl"), dict) else {"ppl": r.get("ppl")}
    mc = r.get("mc", {}) if isinstance(r.get("mc"), dict) else {}
    return {"ppl": ppl.get("ppl"), **{k: mc.get(k) for k in EVAL_KEYS[1:]}, "seconds": time.time() - t0, "raw": r}


def eval_settings(raw: dict[str, Any], options: dict[str, Any] | None) -> dict[str, Any]:
    """What an evaluation read, so that ``layerfold eval`` can repeat it: data, split, perplexity windows and
    tokens, multiple-choice items (acc / acc_norm and their standard errors follow lm-eval-harness)."""
    from layerfold.evaluation.evaluate import DEFAULT_MAX_TOKENS, DEFAULT_MC_ITEMS

    opts = options or {}
    ppl, mc = raw.get("ppl") or {}, raw.get("mc") or {}
    return {"data": raw.get("data"), "split": raw.get("split"), "seq_len": ppl.get("seq_len"),
            "max_tokens": opts.get("max_tokens", DEFAULT_MAX_TOKENS), "tokens": ppl.get("tokens"),
            "windows": ppl.get("windows"), "mc_items": mc.get("n"), "mc_items_asked": opts.get("mc_items",
                                                                                                DEFAULT_MC_ITEMS),
            "batch_size": opts.get("batch_size", 8),
            "metrics": "ppl over non-overlapping seq_len windows; acc, acc_norm with lm-eval-harness definitions "
                       "and standard errors sqrt(p(1-p)/(n-1))"}


def check_args(source: Any, out: Any, samples: Any, seq_len: Any, device: Any, dtype: Any) -> torch.dtype | None:
    """``prune``'s arguments that need no file: a TypeError / ValueError naming the argument and the fix. Returns
    ``dtype`` as a torch dtype (a name such as "bfloat16" is accepted)."""
    from layerfold.core.devices import check_device
    from layerfold.core.dtypes import check_dtype
    from layerfold.core.paths import check_source

    check_source(source)
    if not isinstance(out, (str, Path)):
        raise TypeError(f"out must be a directory path (str or Path), not {type(out).__name__}. Fix: pass where to "
                        "write the pruned checkpoint")
    whole("samples", samples, 1)
    whole("seq_len", seq_len, 2)
    check_device(device)
    return None if dtype is None else check_dtype(dtype)


def check_before_load(source: str | Path, method: Any, target: Target | None, plan: str | Path | DepthPlan | None,
                      data: str, seq_len: int | None = None) -> DepthPlan | None:
    """What can be checked from the model's spec alone (no weights read, no model built): the target of a
    depth method, the plan, the data file, the calibration length. Returns the plan, validated."""
    from layerfold.core.loading import load_spec_state

    if data != "pydoc" and not Path(data).is_file():
        raise FileNotFoundError(f"--data {data}: no such file. Fix: use --data pydoc (built-in text) or the path of "
                                "a .txt or .jsonl file")
    spec = load_spec_state(source, quiet=True)[0]
    check_context(seq_len, spec.max_position)
    if plan is not None:
        dp = plan if isinstance(plan, DepthPlan) else DepthPlan.load(plan)
        dp.validate(spec.n_layers)
        return dp
    if target is not None and method is not None and method.kind == "depth":
        with torch.device("meta"):  # sizes without memory: a params target counts the layers' parameters
            target.layers_to_remove(Model(spec))
    return None


SPLIT_NOTE = ("calibration reads the 'calib' split of --data (about 80% of its documents, assigned by a hash); "
              "evaluation reads the rest ('val')")


def calibration_set(tokenizer: Any, data: str, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """The calibration batches, at least samples x seq_len distinct tokens; a NotEnoughData with this command's fix."""
    from layerfold.core import data as D

    try:
        return D.calib_batches(tokenizer, source=data, split="calib", n_samples=samples, seq_len=seq_len, seed=seed,
                               distinct=True)
    except D.NotEnoughData as e:
        cause = str(e).split(" Fix:")[0].rstrip(".")
        raise D.NotEnoughData(f"{cause}; {SPLIT_NOTE}. Fix: lower --samples or --seq-len, or give a larger --data "
                              "file") from None


def check_data(tokenizer: Any, data: str, eval_options: dict[str, Any] | None, model: Model | None = None) -> None:
    """The evaluation's data checked before calibration (prune evaluates on the 'val' split); with ``model``, its
    options too (their types, the window against the model's context)."""
    from layerfold.core.data import NotEnoughData
    from layerfold.evaluation.evaluate import check_eval_data

    if model is not None:
        check_eval_args(model, tokenizer, data, **(eval_options or {}))
    kw = {k: v for k, v in (eval_options or {}).items() if k in ("tasks", "seq_len", "mc_items")}
    try:
        check_eval_data(tokenizer, data, **kw)
    except NotEnoughData as e:
        cause = str(e).split(" Fix:")[0].rstrip(".")
        raise NotEnoughData(f"{cause}; {SPLIT_NOTE}. Fix: give a larger --data file (more documents), or pass "
                            "--no-eval to skip the evaluation") from None


def compose_map(source_map: list[list[int]] | None, layer_map: list[list[int]]) -> list[list[int]] | None:
    """The new layers in terms of the source's own origins, when the source was itself pruned."""
    if not source_map:
        return None
    return [sorted({o for i in group for o in source_map[i]}) for group in layer_map]


def prune(source: str | Path, method: str | None, target: str | Target | None, out: str | Path, *,
          stats: str | Path | Any | None = None, data: str = "pydoc", samples: int = SAMPLES, seq_len: int = SEQ_LEN,
          plan: str | Path | DepthPlan | None = None, options: dict[str, Any] | None = None, heal: bool = False,
          heal_options: dict[str, Any] | None = None, eval: bool = True, eval_options: dict[str, Any] | None = None,
          device: str = "cpu", dtype: torch.dtype | None = None, seed: int = 0, progress: bool = True,
          overwrite: bool = False, allow_nonfinite: bool = False, weights: str = "auto") -> dict[str, Any]:
    """Prune ``source`` with ``method`` to ``target`` (or apply ``plan``) and save it to ``out``; returns the report.

    ``weights``: where the model is held while ``device`` computes: "device", "host" (host memory, each layer
    streamed to the device when it runs: calibration, the method, the evaluations) or "auto" (the device
    when the weights fit a share of its free memory; evaluation.streamed.weights_place)."""
    t_all = time.time()
    times: dict[str, float] = {}
    peaks: dict[str, float] = {}  # the device's allocation high-water mark after each stage: where it jumps

    def done(stage: str, t0: float | None = None, seconds: float = 0.0) -> None:
        times[stage] = time.time() - t0 if t0 is not None else seconds
        if str(device).startswith("cuda") and torch.cuda.is_available():
            peaks[stage] = round(torch.cuda.max_memory_allocated(torch.device(device)) / 1e9, 3)
    dtype = check_args(source, out, samples, seq_len, device, dtype)
    out = check_output(out, sources=[str(source), resolve(source, quiet=True)], overwrite=overwrite)
    if plan is None and method is None:
        raise ValueError("nothing to do: no --method and no --plan. Fix: pass --method M --target T, or --plan FILE")
    if plan is None and target is None:
        raise ValueError("--target is missing. Fix: e.g. --target 8 (layers), --target 25% (of layers), "
                         "--target params:0.2")
    tgt = Target.parse(target) if target is not None and not isinstance(target, Target) else target
    m = get_method(method) if plan is None else None
    dp = check_before_load(source, m, tgt, plan, data, seq_len)
    stats_path = None
    if m is not None and m.needs_stats and isinstance(stats, (str, Path)):  # read and checked before the model
        from layerfold.core.loading import load_spec_state

        with torch.device("meta"):
            meta_model = Model(load_spec_state(source, quiet=True)[0])
        stats_path, stats = stats, load_stats(stats, meta_model, needed_window(meta_model, tgt))
    place = where_weights(source, m, weights, device, dtype, heal, tgt)
    if progress and place["place"] == "host":
        print(f"[prune] weights in host memory, streamed to {device} a layer at a time: {place['why']}", flush=True)
    t0 = time.time()
    model, tok = load(source, device="cpu" if place["place"] == "host" else device, dtype=dtype,
                      quiet=not progress, allow_nonfinite=allow_nonfinite)
    model.requires_grad_(False)
    done("load", t0)
    calib = calibration_set(tok, data, samples, seq_len, seed)
    if eval:
        check_data(tok, data, eval_options, model)
    calibration = {"data": data, "split": "calib", "samples": int(calib.shape[0]), "seq_len": int(calib.shape[1]),
                   "tokens": int(calib.numel()), "seed": seed}
    st = None
    if m is not None and m.needs_stats:
        t0 = time.time()
        window = needed_window(model, tgt)
        if stats is not None:  # a Stats object: given, or read from --stats above
            st = stats
            if stats_path is not None:
                calibration["stats"] = str(stats_path)
        else:
            from layerfold.calibration.calibrate import calibrate

            sopt = {"cka": False, "channels": False, **m.stats_options}
            sopt["window"] = max(window, int(sopt.get("window", 0)))
            st = calibrate(model, calib, device=device, progress=progress, meta={"data": data}, **sopt)
        done("calibrate", t0)
    t0 = time.time()
    if dp is not None:
        res = run_plan(model, dp, calib, options, seed=seed, progress=progress,
                       device=device if place["place"] == "host" else None)
        method_name = dp.method or "plan"
    else:
        assert m is not None and tgt is not None
        res = run_method(model, tok, m.name, tgt, calib, stats=st, options=options, source=str(source),
                         device=device, seed=seed, progress=progress, weights=place["place"])
        method_name = m.name
    done("method", t0)
    heal_info: dict[str, Any] | None = None
    before_heal: dict[str, Any] | None = None

    def scored(mdl: Model) -> Any:  # what the evaluations run: the model, or it streamed to the device
        return evaluation_model(mdl, device, place["place"])

    if heal and eval:  # the pruned model as surgery left it, for the before/after of healing
        r = run_eval(scored(res.model), tok, data, eval_options)
        before_heal = {k: r[k] for k in EVAL_KEYS}
        done("eval_before_heal", seconds=r["seconds"])
    if heal:
        t0 = time.time()
        heal_info = heal_result(res, model, tok, data=data, device=device, progress=progress, options=heal_options,
                                host_teacher=place["place"] == "host")
        done("heal", t0)
    dense = layer_counts(model)
    pruned = layer_counts(res.model)
    evaluation = None
    if eval:
        r = run_eval(scored(model), tok, data, eval_options)
        dense.update({k: r[k] for k in EVAL_KEYS})
        done("eval_dense", seconds=r["seconds"])
        r = run_eval(scored(res.model), tok, data, eval_options)
        pruned.update({k: r[k] for k in EVAL_KEYS})
        done("eval_pruned", seconds=r["seconds"])
        evaluation = eval_settings(r["raw"], eval_options)
    src_prov = getattr(model, "provenance", {}) or {}
    opts = {k: v for k, v in (options or {}).items() if v is not None and not k.startswith("_")}
    provenance = {
        "source": str(source), "source_format": src_prov.get("source_format", "layerfold"),
        "method": method_name, "method_params": opts, "target": tgt.to_dict() if tgt else None,
        "calibration": calibration, "layer_map": res.layer_map, "changed_layers": res.changed_layers,
        "teacher": str(source),
    }
    origin = compose_map(src_prov.get("layer_map"), res.layer_map)
    if origin is not None:
        provenance["origin_layer_map"] = origin
    report = {
        "method": method_name, "method_params": opts, "target": tgt.to_dict() if tgt else None,
        "removed_layers": dense["layers"] - pruned["layers"], "plan": res.plan, "layer_map": res.layer_map,
        "changed_layers": res.changed_layers, "dense": dense, "pruned": pruned, "pruned_before_heal": before_heal,
        "calibration": calibration,
        "info": res.info, "heal": heal_info, "times": times, "source": str(source), "data": data,
        "evaluation": evaluation, "seed": seed, "device": device, "weights": place, "device_peak_gb": peaks,
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None, "versions": package_versions(),
    }
    t0 = time.time()
    save_checkpoint(out, res.model.spec, res.model.state_dict(), tokenizer=tok, provenance=provenance, report=report,
                    sources=[str(source), str(resolve(source, quiet=True))], overwrite=overwrite)
    done("save", t0)
    times["total"] = time.time() - t_all
    report["out"] = str(out)
    from layerfold.core.paths import write_json_atomic

    write_json_atomic(out / "report.json", report)  # now with the save and total times
    return report


def where_weights(source: str | Path, method: Any, weights: str, device: str, dtype: torch.dtype | None,
                  heal: bool, target: Target | None) -> dict[str, Any]:
    """Where ``prune`` holds the model ({"place": "device" | "host", "why", "bytes"}), checked before loading.

    With ``heal``, "auto" counts the pruned student (estimated from the target) beside the dense model: it
    trains on the device, so the dense model goes to host memory when both would not fit. With the weights in
    host memory, a method that runs the whole model at once is refused, and so is healing when the student
    alone would not fit the device."""
    from layerfold.evaluation.streamed import DEVICE_SHARE, weight_bytes, weights_place

    nbytes = weight_bytes(source, dtype)
    kept = _kept_fraction(source, target)
    place, why = weights_place(weights, device, int(nbytes * (1 + kept)) if heal else nbytes)
    if heal and weights == "auto" and torch.device(device).type == "cuda":
        why += " (the dense model and, with --heal, the pruned student beside it)"
    if place == "host" and method is not None and not method.streams:
        raise ValueError(f"{method.name} searches by running the whole model many times, which needs its weights on "
                         f"the device ({why}). Fix: use a GPU that holds the model, --device cpu, or a method that "
                         "streams a layer at a time: shortgpt, streamline, come, slicegpt, dynamic-slicing")
    if place == "host" and heal and torch.device(device).type == "cuda":
        free = torch.cuda.mem_get_info(torch.device(device))[0]
        if kept * nbytes > DEVICE_SHARE * free:
            gb = 1024 ** 3
            raise ValueError(f"--heal trains the pruned model on {device} (the dense teacher stays in host memory): "
                             f"about {kept * nbytes / gb:.1f} GiB for this target, more than {DEVICE_SHARE:.0%} of "
                             f"the {free / gb:.1f} GiB free. Fix: prune without --heal and heal on a larger GPU, or "
                             "prune more")
    return {"place": place, "why": why, "bytes": nbytes}


def _kept_fraction(source: str | Path, target: Target | None) -> float:
    """About how much of the model a target keeps (layers, or the fraction itself); 1 for a plan."""
    if target is None:
        return 1.0
    if target.kind != "layers":
        return 1 - target.value
    from layerfold.core.loading import load_spec_state

    return 1 - target.value / load_spec_state(source, quiet=True)[0].n_layers


def where_layers_went(report: dict[str, Any]) -> list[str]:
    """Human-readable lines: which source layers each changed layer stands for, and what was dropped."""
    lines = []
    plan = report.get("plan") or {}
    if plan.get("kind") == "depth":
        lines = DepthPlan.from_dict(plan).describe()
    n_src = report["dense"]["layers"]
    kept = {i for g in report["layer_map"] for i in g}
    gone = [i for i in range(n_src) if i not in kept]
    if gone and not any(x.startswith("dropped") for x in lines):
        lines.append(f"source layers without a successor: {', '.join(map(str, gone))}")
    return lines
