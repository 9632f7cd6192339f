"""Cost of turning accepted tokens into released text, per token, against the completion's length.

    python bench/bench_detokenize.py [--tokens 1000,4000,8000] [--model smollm2-135m]

Prints, for each length n: the mean time of TextStream.push over a completion of n tokens (what the
scheduler's thread pays per row and step) and the time to decode all n ids once (what every token cost
before TextStream decoded a window). The ids are README.md's text, repeated as needed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from layerfold.core.loading import load_tokenizer, resolve
from layerfold.inference.sampling import TextStream


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1000,4000,8000", help="completion lengths, comma-separated")
    ap.add_argument("--model", default="smollm2-135m", help="whose tokenizer")
    args = ap.parse_args()
    lengths = [int(x) for x in args.tokens.split(",")]
    tok = load_tokenizer(resolve(args.model, quiet=True))
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    ids: list[int] = []
    while len(ids) < max(lengths):
        ids += tok.encode(text)
    print(f"{'tokens':>8} {'push, us/token':>15} {'decode all ids once, ms':>24}")
    for n in lengths:
        s = TextStream(tok, stop=["###END"])
        t = time.perf_counter()
        for i in ids[:n]:
            s.push(i)
        push = (time.perf_counter() - t) / n
        t = time.perf_counter()
        for _ in range(20):
            tok.decode(ids[:n], skip_special_tokens=True)
        whole = (time.perf_counter() - t) / 20
        print(f"{n:>8} {push * 1e6:>15.1f} {whole * 1e3:>24.2f}")


if __name__ == "__main__":
    main()
