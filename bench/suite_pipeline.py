"""The gpu_suite parts that run whole jobs on one GPU, as a user would (issue 17, items 4 and 5):

- ``prune``: ``layerfold.prune(..., device="cuda")`` (load -> calibrate -> plan -> surgery -> save) of a
  7B-shaped bf16 checkpoint for ShortGPT, Streamline (its block trained on the GPU) and dynamic slicing (PCA
  on the GPU); with --diagnose (``P.diagnose()``) also ShortGPT (with both evaluations) and Streamline with
  the weights kept in host memory and streamed to the GPU a layer at a time (``weights="host"``, what a
  model larger than the GPU gets); wall time per stage and the device peak;
- ``heal``: both healing stages of the ShortGPT-pruned 7B shape on the GPU (teacher in host memory, as
  ``layerfold heal`` holds a dense checkpoint), with the default configuration (the global stage's "auto"
  picks LoRA on the unchanged layers where AdamW for every parameter does not fit), with the changed layers
  only, and with the teacher kept in host memory (healing.teacher); tokens/s and the device peak per stage.

Random weights and the embedded model's tokenizer (its vocabulary sets the embedding size); the data is
the built-in pydoc text, so nothing is downloaded. ``tiny``: the same code on CPU with a 4-layer model.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import suite_parts as P
import torch


def _dense(tiny: bool):
    """A random dense model (host memory) of the 7B shape with the embedded tokenizer's vocabulary."""
    tok = P._tokenizer(tiny)
    base = P.dense_spec(tiny)
    spec = replace(base, vocab_size=max(len(tok), base.vocab_size), bos_token_id=tok.bos_token_id,
                   eos_token_ids=(tok.eos_token_id,))
    dtype = torch.float32 if tiny else torch.bfloat16
    return P.host_model(spec, tiny, dtype), tok


def _peak_gb(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset(dev: torch.device) -> None:
    P.free()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def part_prune(rec: P.Recorder, tiny: bool) -> None:
    from layerfold.core.checkpoint import save_checkpoint
    from layerfold.pipeline import prune

    dev = P.device(tiny)
    work = Path(tempfile.mkdtemp(prefix="layerfold-suite-prune-"))
    try:
        t = time.perf_counter()
        model, tok = _dense(tiny)
        src = save_checkpoint(work / "dense", model.spec, model.state_dict(), tokenizer=tok)
        n_params = model.num_params()
        del model
        rec.save(checkpoint_s=time.perf_counter() - t, dense_params=n_params)
        k = 1 if tiny else 8
        # (method, target, weights, evaluate): the weights on the device, then kept in host memory and streamed
        # a layer at a time (what a model larger than the GPU gets), the dense and pruned evaluations included
        jobs = [("shortgpt", str(k), "device", False), ("streamline", str(k), "device", False),
                ("dynamic-slicing", "0.25", "device", False)]
        if P.diagnose():
            jobs += [("shortgpt", str(k), "host", True), ("streamline", str(k), "host", False)]
        rows: list[dict[str, Any]] = []
        for method, target, weights, evaluate in jobs:
            _reset(dev)
            t = time.perf_counter()
            row: dict[str, Any] = {"method": method, "target": target, "weights": weights}
            try:
                rep = prune(src, method, target, work / method, device=str(dev), eval=evaluate, progress=False,
                            samples=8 if tiny else 64, seq_len=64 if tiny else 256, weights=weights,
                            eval_options={"max_tokens": 1024, "mc_items": 8, "seq_len": 64} if tiny else None)
                row.update(wall_s=time.perf_counter() - t, times={k_: round(v, 2) for k_, v in rep["times"].items()},
                           layers=rep["pruned"]["layers"], params=rep["pruned"]["params"],
                           params_ratio=rep["pruned"]["params"] / n_params, device_peak_gb=_peak_gb(dev),
                           stage_peaks_gb=rep.get("device_peak_gb"),
                           weight_gb=rep["weights"]["bytes"] / 1e9)
                if evaluate:
                    row["ppl"] = {"dense": rep["dense"].get("ppl"), "pruned": rep["pruned"].get("ppl")}
                if method == "streamline":
                    row["block_training"] = {k_: rep["info"].get("training", {}).get(k_)
                                             for k_ in ("steps", "train_seconds", "final_loss")}
            except Exception as e:  # one method's failure must not lose the others
                row.update(error=f"{type(e).__name__}: {e}"[:500], wall_s=time.perf_counter() - t)
            shutil.rmtree(work / method, ignore_errors=True)
            rows.append(row)
            rec.save(rows=rows)
        rec.save(status="done" if all("error" not in r for r in rows) else "failed")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def part_heal(rec: P.Recorder, tiny: bool) -> None:
    from layerfold.healing.common import HealConfig, HealData
    from layerfold.healing.heal import heal_pruned
    from layerfold.surgery.depth import drop_layers

    dev = P.device(tiny)
    dense, tok = _dense(tiny)  # the teacher, in host memory
    L = dense.spec.n_layers
    k = 1 if tiny else 8
    start = L - k - 3  # the late-middle window real calibrations pick (evaluation.shapes.pruned_shapes)
    drop = list(range(start, start + k))
    layer_map = [[i] for i in range(L) if i not in drop]
    g = torch.Generator().manual_seed(0)
    V = dense.spec.vocab_size
    data = HealData(torch.randint(3, V, (64 * 256,), generator=g), torch.randint(3, V, (4096,), generator=g))
    cfg = HealConfig(seq_len=64 if tiny else 256, micro_batch=2 if tiny else 4, val_tokens=256 if tiny else 4096,
                     eval_every=30)
    per_step = cfg.seq_len * cfg.micro_batch
    tokens = (10 if tiny else 40) * per_step  # layer stage 20% of it, the global stage the rest
    rows = []
    # warm-up, untimed: run 3's first configuration paid the first compiles and cuBLAS set-up inside its layer
    # stage (4,035 tokens/s against 21,558 for the same stage of the next configuration)
    t = time.perf_counter()
    student = drop_layers(dense, drop).to(dev)
    heal_pruned(student, dense, layer_map, [], data=data, budget_minutes=None, tokens=5 * per_step, progress=False,
                config=cfg)
    del student
    rec.save(warmup_s=time.perf_counter() - t)
    # the default, the changed layers only, and the default with the teacher kept in host memory (one pass over
    # its layers per chunk of micro-batches: what a teacher that does not fit beside the student gets)
    for name, gp, where in (("default", "auto", "auto"), ("changed layers only", "changed", "auto"),
                            ("teacher in host memory", "auto", "host")):
        _reset(dev)
        t = time.perf_counter()
        student = drop_layers(dense, drop).to(dev)
        row: dict[str, Any] = {"config": name, "setup_s": time.perf_counter() - t}
        try:
            rep = heal_pruned(student, dense, layer_map, [], data=data, budget_minutes=None, tokens=tokens,
                              progress=False, config=replace(cfg, global_params=gp, teacher=where))
            sec = rep.stage_seconds
            row.update(global_params=rep.global_params, tokens=rep.stage_tokens, stage_seconds=sec,
                       tokens_s={s: rep.stage_tokens[s] / max(sec.get(s, 0.0), 1e-9) for s in sec},
                       wall_s=time.perf_counter() - t, autocast=rep.config["autocast"],
                       params_trained={s: m.get("params_trained") for s, m in rep.memory.items()},
                       device_peak_gb={s: m["cuda_peak_mib"] * 2**20 / 1e9 if "cuda_peak_mib" in m else None
                                       for s, m in rep.memory.items()},
                       teacher_held={s: m.get("teacher_held") for s, m in rep.memory.items()},
                       teacher=rep.config["teacher"],
                       dtypes_after=sorted({str(p.dtype) for p in student.parameters()}))
        except Exception as e:
            row.update(error=f"{type(e).__name__}: {e}"[:500], wall_s=time.perf_counter() - t)
        del student
        rows.append(row)
        rec.save(student_layers=len(layer_map), teacher_layers=L, tokens_budget=tokens, rows=rows)
    rec.save(status="done" if all("error" not in r for r in rows) else "failed")


def part_host_generate(rec: P.Recorder, tiny: bool) -> None:
    """Greedy generation with the 7B shape's weights in host memory (``StreamedRuntime``: every step streams
    the layers to the GPU once for all rows): seconds per step, tokens/s, and the step's share of its bound,
    the weight bytes over the pinned host-to-device bandwidth that the env part measured."""
    import json

    from layerfold.inference.decode_net import decode_weight_bytes
    from layerfold.inference.streamed_decode import StreamedRuntime

    dev = P.device(tiny)
    env_f = rec.path.parent / "env.json"
    env = json.loads(env_f.read_text()) if env_f.exists() else {}
    model, _ = _dense(tiny)
    wbytes = decode_weight_bytes(model.spec, model.dtype)
    bound_s = wbytes / ((env.get("h2d_pinned_gbs") or 1.0) * 1e9)
    prompt, new = (16, 4) if tiny else (128, 8)
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in ([1, 2] if tiny else [1, 16]):
        _reset(dev)
        prompts = torch.randint(3, model.spec.vocab_size, (batch, prompt), generator=g).tolist()
        rt = StreamedRuntime(model, dev, max_batch=batch, max_len=prompt + new + 1)
        t = time.perf_counter()
        logits = rt.prefill(prompts)
        _sync(dev)
        prefill_s, t = time.perf_counter() - t, time.perf_counter()
        for _ in range(new):
            logits = rt.decode(logits.argmax(-1).tolist())
        _sync(dev)
        step_s = (time.perf_counter() - t) / new
        rows.append({"batch": batch, "prefill_s": prefill_s, "step_s": step_s, "tok_s": batch / step_s,
                     "pct_of_bound": 100 * bound_s / step_s, "device_peak_gb": _peak_gb(dev)})
        rec.save(rows=rows, weight_gb=wbytes / 1e9, bound_s=bound_s, prompt=prompt, new_tokens=new)
    rec.save(status="done")


def markdown(p: dict[str, Any], _f: Any, _table: Any) -> list[str]:
    """The two parts' tables for gpu_suite.md (``_f`` and ``_table``: gpu_suite's formatters)."""
    lines: list[str] = []
    pr = p.get("prune", {})
    if pr.get("rows"):
        lines += ["", f"## layerfold prune on the GPU (7B shape, bf16; dense checkpoint written in "
                  f"{_f(pr.get('checkpoint_s'))} s; no evaluation)"]
        stages = ("load", "calibrate", "method", "eval_dense", "eval_pruned", "save")
        lines += _table(["method", "target", "weights", "layers", "params / dense", "wall s", *stages,
                           "device peak GB"], [
            [r["method"], r["target"], r.get("weights", "device"), r.get("layers", "-"),
             _f(r.get("params_ratio"), "{:.2f}"), _f(r.get("wall_s")),
             *(_f(r.get("times", {}).get(s)) for s in stages), _f(r.get("device_peak_gb"), "{:.1f}")]
            if "error" not in r else [r["method"], r["target"], r.get("weights", "device"), r["error"],
                                      *[""] * (len(stages) + 3)] for r in pr["rows"]], right_from=3)
        lines += [""] + [f"- {r['method']} ({r.get('weights', 'device')}): device peak after each stage, GB: "
                         + ", ".join(f"{k} {v:.1f}" for k, v in r["stage_peaks_gb"].items())
                         for r in pr["rows"] if r.get("stage_peaks_gb")]
    h = p.get("heal", {})
    if h.get("rows"):
        lines += ["", f"## layerfold heal on the GPU ({h.get('teacher_layers')} -> {h.get('student_layers')} layers, "
                  f"{h.get('tokens_budget')} tokens, teacher in host memory)"]
        rows = []
        for r in h["rows"]:
            if "error" in r:
                rows.append([r["config"], r["error"], "", "", "", ""])
                continue
            for s in r.get("stage_seconds", {}):
                rows.append([r["config"], f"{s} ({r['global_params']})" if s == "global" else s,
                             r["tokens"].get(s), _f(r["tokens_s"].get(s), "{:.0f}"),
                             f"{(r['params_trained'].get(s) or 0) / 1e6:.1f}M",
                             _f(r["device_peak_gb"].get(s), "{:.1f}")])
        lines += _table(["config", "stage", "tokens", "tokens/s", "params trained", "device peak GB"], rows,
                          right_from=2)
    hg = p.get("host-generate", {})
    if hg.get("rows"):
        lines += ["", f"## Generation with the weights in host memory ({_f(hg.get('weight_gb'))} GB streamed per "
                  f"step; bound {_f(hg.get('bound_s'), '{:.3f}')} s a step at the pinned H2D bandwidth; prompt "
                  f"{hg.get('prompt')}, {hg.get('new_tokens')} new tokens)"]
        lines += _table(["batch", "prefill s", "s / step", "tokens/s", "% of bound", "device peak GB"], [
            [r["batch"], _f(r["prefill_s"], "{:.2f}"), _f(r["step_s"], "{:.3f}"), _f(r["tok_s"]),
             _f(r["pct_of_bound"], "{:.0f}%"), _f(r.get("device_peak_gb"), "{:.1f}")] for r in hg["rows"]],
            right_from=0)
    return lines
