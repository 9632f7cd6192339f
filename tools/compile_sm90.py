"""Compile every Triton kernel launch the tests make for a Hopper GPU (sm_90), on a machine with no GPU.

The interpreter tests prove the kernels' arithmetic, but not that they compile: the interpreter runs
Python, and a construct it accepts may not lower (or may lower differently) in the Triton release the
GPU machine has. A lent GPU is scarce (15 minutes a session), so a compile error found there costs a
run. This tool finds it here:

    # 1. record the launches: run tests in the interpreter with every launch's signature kept
    python tools/compile_sm90.py capture /tmp/launches.json -- tests/kernels tests/inference -q
    # 2. compile each distinct one for sm_90 (any venv whose triton matches the GPU machine's)
    python tools/compile_sm90.py compile /tmp/launches.json [--arch 90] [--jobs N]
    # 3. optionally, what each one's main loop does (global / shared loads and stores, barriers, FFMAs)
    python tools/compile_sm90.py loop /tmp/launches.json

``compile`` needs only triton (it ships ptxas); a launch whose kernel has a ``PDL`` constexpr is also
compiled with it on, as ``LAYERFOLD_PDL=1`` launches it on Hopper. It prints one line per failure and a
summary, and exits 1 if anything failed to compile (2 if the installed triton is older than 3.3).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import checkout  # noqa: E402,F401  (``layerfold`` from this checkout where it is not installed)

# Launch options of ``kernel[grid](...)`` that are not kernel arguments.
_OPTIONS = {"num_warps", "num_stages", "num_ctas", "maxnreg", "launch_pdl", "enable_fp_fusion"}
_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64", "int8": "i8",
           "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "i1"}


def _constexpr_names(fn) -> set[str]:
    names = set()
    for p in inspect.signature(fn).parameters.values():
        ann = p.annotation
        if ann is not inspect.Parameter.empty and "constexpr" in (ann if isinstance(ann, str) else repr(ann)):
            names.add(p.name)
    return names


def _arg_type(value) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2 ** 31) <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no signature type for {type(value).__name__}")


def capture(out: Path, pytest_args: list[str]) -> int:
    """Run pytest in the interpreter, recording the signature of every launch."""
    os.environ["TRITON_INTERPRET"] = "1"
    import pytest
    from triton.runtime.interpreter import InterpretedFunction

    seen: dict[str, dict] = {}

    def record(fn, args, kwargs) -> None:
        sig = inspect.signature(fn)
        names = list(sig.parameters)
        const = _constexpr_names(fn)
        call = sig.bind(*args, **{k: v for k, v in kwargs.items() if k not in _OPTIONS})
        call.apply_defaults()  # a constexpr left out (PDL off) is compiled with its default, as on the GPU
        bound = call.arguments
        signature, constexprs, divisible = {}, {}, []
        for name in names:
            value = bound.get(name)
            # as the JIT specialises: an int of 1 becomes a constant; an int that is a multiple of 16, or a
            # tensor whose address is, is compiled knowing it (what lets the loads be vectorised)
            if name in const or value is None or (type(value) is int and value == 1):
                constexprs[name] = value
                signature[name] = "constexpr"
                continue
            signature[name] = _arg_type(value)
            if type(value) is int and value % 16 == 0 or hasattr(value, "data_ptr") and value.data_ptr() % 16 == 0:
                divisible.append(name)
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        entry = {"module": fn.__module__, "kernel": fn.__name__, "signature": signature,
                 "constexprs": constexprs, "divisible": divisible, "options": options}
        seen.setdefault(json.dumps(entry, sort_keys=True, default=str), entry)

    launcher = InterpretedFunction.__getitem__  # kernel[grid](...): how every layerfold kernel is launched

    def recording_getitem(self, grid):
        launch = launcher(self, grid)

        def recording_launch(*args, **kwargs):
            record(self.fn, args, kwargs)
            return launch(*args, **kwargs)
        return recording_launch

    InterpretedFunction.__getitem__ = recording_getitem
    rc = pytest.main(["-p", "no:cacheprovider", *pytest_args])
    out.write_text(json.dumps(list(seen.values()), indent=1, default=str))
    print(f"[compile_sm90] {len(seen)} distinct launches recorded in {out} (pytest exit {int(rc)})")
    return int(rc)


def build(entry: dict, arch: int = 90):
    """The compiled kernel of one recorded launch (``.asm["ptx"]``, ``.asm["sass"]``), as the JIT would make it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(entry["module"]), entry["kernel"])
    names = list(entry["signature"])
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in entry.get("divisible", [])}
    src = ASTSource(fn=kernel, signature=entry["signature"], constexprs=entry["constexprs"], attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=entry["options"])


def loop_stats(sass: str) -> dict[str, int]:
    """Instruction counts in a kernel's largest loop (the body between a label and the branch back to it):
    global loads (and the 16-byte ones), shared-memory stores and loads, barriers, FFMAs. A streaming loop
    (a GEMV's) should load its tile and multiply, with no barrier; a tile moved through shared memory every
    iteration (a layout conversion) serialises the loop's warps."""
    lines = sass.splitlines()
    labels = {line.strip()[:-1]: i for i, line in enumerate(lines) if re.match(r"^\s*[.\w]+:\s*$", line)}
    body: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA (?:`\()?([.\w]+)\)?;", line)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > len(body):
            body = lines[labels[m.group(1)]:i + 1]
    count = lambda pattern: sum(1 for line in body if re.search(pattern, line))
    return {"instructions": len(body), "ldg": count(r"\bLDG"), "ldg128": count(r"\bLDG\.E\.128"),
            "sts": count(r"\bSTS"), "lds": count(r"\bLDS"), "bar": count(r"\bBAR\.SYNC"), "ffma": count(r"\bFFMA")}


def _compile_one(entry: dict, arch: int) -> str | None:
    """None if the launch compiles for ``sm_<arch>``, else a line naming it and the error."""
    try:
        build(entry, arch)
        return None
    except Exception as exc:  # noqa: BLE001 - every failure is reported, then the next is tried
        short = {k: v for k, v in entry["constexprs"].items() if v is not None}
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        return f"FAIL {entry['kernel']} {short} {entry['options']}: {type(exc).__name__}: {last}"


def compile_all(path: Path, arch: int, jobs: int = 1) -> int:
    """Compile each recorded launch for ``sm_<arch>`` in ``jobs`` processes; 1 if any fails."""
    import triton

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 3):
        print(f"[compile_sm90] triton {triton.__version__} is too old for this tool (it needs the ASTSource "
              f"API of triton >= 3.3). Fix: run it in a venv with the GPU machine's triton (3.6 in runs 1-4)")
        return 2
    todo = []
    for entry in json.loads(path.read_text()):
        todo.append(entry)
        if entry["constexprs"].get("PDL") is False:  # LAYERFOLD_PDL=1 launches it with PDL on
            todo.append({**entry, "constexprs": {**entry["constexprs"], "PDL": True}})
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        failures = [f for f in pool.map(_compile_one, todo, [arch] * len(todo)) if f is not None]
    for line in failures:
        print(line)
    print(f"[compile_sm90] triton {triton.__version__}, sm_{arch}: {len(todo) - len(failures)} of {len(todo)} "
          f"compiled, {len(failures)} failed, {time.perf_counter() - t0:.0f} s")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    cap = sub.add_parser("capture", help="run pytest in the interpreter, recording every launch")
    cap.add_argument("out", type=Path)
    cap.add_argument("pytest_args", nargs=argparse.REMAINDER)
    com = sub.add_parser("compile", help="compile each recorded launch for a GPU target")
    com.add_argument("launches", type=Path)
    com.add_argument("--arch", type=int, default=90)
    com.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes compiling at once")
    lp = sub.add_parser("loop", help="print each recorded launch's largest loop's instruction counts (JSON)")
    lp.add_argument("launches", type=Path)
    lp.add_argument("--arch", type=int, default=90)
    args = parser.parse_args(argv)
    if args.cmd == "capture":
        rest = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
        return capture(args.out, rest)
    os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be built for the GPU, not the interpreter
    if args.cmd == "loop":
        print(json.dumps([loop_stats(build(e, args.arch).asm["sass"]) for e in json.loads(args.launches.read_text())]))
        return 0
    return compile_all(args.launches, args.arch, args.jobs)


if __name__ == "__main__":
    sys.exit(main())
