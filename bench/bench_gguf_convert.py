"""Converting a quantised GGUF file into layerfold's cache: wall time and peak memory (RSS), layerfold's
streamed conversion (core.gguf_weights: one tensor dequantised at a time) against transformers' GGUF reader
(``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)``, which layerfold used before), each in a fresh
process on the same file.

    python bench/bench_gguf_convert.py                       # a TinyLlama-1.1B-shaped random model, Q8_0
    python bench/bench_gguf_convert.py --layers 4 --quant Q4_0

The model has random weights of the given shape (nothing is downloaded); the file is written once into
--work (default: a temporary folder) and removed afterwards. Results: docs/PERFORMANCE.md, "Loading".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the child's own high-water mark (VmHWM, in KiB): ru_maxrss would carry over the forking parent's (Linux keeps it
# across exec), and the parent holds the whole model while it makes the file
PEAK = ("; print('PEAK', next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))")
CHILD = {
    "layerfold": "import layerfold.core.loading as L, sys; from pathlib import Path; L.resolve(Path(sys.argv[1]), "
                 "quiet=True)",
    "transformers": "import sys, torch; from pathlib import Path; from transformers import AutoModelForCausalLM; "
                    "p = Path(sys.argv[1]); AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, "
                    "dtype=torch.float32)",
}


def make_file(work: Path, args: argparse.Namespace) -> Path:
    sys.path.insert(0, str(ROOT))
    from layerfold.core.checkpoint import save_checkpoint
    from layerfold.core.loading import load_tokenizer, resolve
    from layerfold.interop.export import export
    from tests.support.gguf_files import quantized_copy
    from tests.support.models import tiny_model

    m = tiny_model(d_model=args.d_model, n_layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                   ffn=args.ffn, vocab=args.vocab, max_position=2048, std=0.02, seed=0)
    tok = load_tokenizer(resolve("smollm2-135m", quiet=True))  # a tokenizer the file carries (its vocabulary)
    ck = save_checkpoint(work / "ck", m.spec, m.state_dict(), tokenizer=tok)
    del m
    f32 = Path(export(ck, work / "g", format="gguf")["file"])
    out = quantized_copy(f32, work / f"model-{args.quant}.gguf", args.quant)
    f32.unlink()
    return out


def measure(engine: str, f: Path, cache: Path) -> dict[str, float]:
    """Wall time and the child's own peak RSS."""
    env = {**os.environ, "LAYERFOLD_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD[engine] + PEAK, str(f)], check=True, env=env,
                         stdout=subprocess.PIPE, text=True).stdout
    dt = time.perf_counter() - t0
    peak = int(next(line.split()[1] for line in out.splitlines() if line.startswith("PEAK")))  # KiB
    return {"seconds": round(dt, 2), "peak_rss_gib": round(peak / 2 ** 20, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=49152, help="(the embedded tokenizer's, which the file carries)")
    p.add_argument("--quant", default="Q8_0", choices=["Q8_0", "Q4_0", "Q5_0"])
    p.add_argument("--engines", default="layerfold,transformers")
    p.add_argument("--work", default=None, help="folder for the GGUF file and the cache (default: a temporary one)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        f = make_file(work, args)
        made = time.perf_counter() - t0
        res = {"file": f.name, "file_gib": round(f.stat().st_size / 2 ** 30, 3), "made_in_s": round(made, 1)}
        for engine in [e for e in ("layerfold", "transformers") if e in args.engines.split(",")]:
            res[engine] = measure(engine, f, work / f"cache-{engine}")
        res["shape"] = {k: getattr(args, k) for k in ("d_model", "layers", "heads", "kv_heads", "ffn", "vocab")}
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
