"""Healing curves (validation perplexity vs training tokens) as a PNG, from saved healing reports.

    python tools/plot_heal.py /tmp/heal_cmp                      # compare_heal's work dir -> heal_curves.png in it
    python tools/plot_heal.py healed_a healed_b --out curves.png  # healed checkpoints (their report.json)

Each curve starts at the unhealed model (0 tokens); its second point is the end of the layer-wise stage,
the rest the global stage's evaluations. The perplexity is the one healing tracks (first ``val_tokens``
of the val split in ``seq_len`` windows), so the dense reference line is measured the same way when
compare_heal recorded it (``dense_track``), and the 1.6x bar is drawn from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import checkout  # noqa: E402,F401  (layerfold from this checkout when it is not installed)

from layerfold.healing.heal import load_curve  # noqa: E402


def collect(paths: list[str]) -> tuple[dict[str, list[tuple[int, float]]], float | None]:
    curves: dict[str, list[tuple[int, float]]] = {}
    dense = None
    for a in paths:
        p = Path(a)
        if (p / "results.json").is_file():
            res = json.loads((p / "results.json").read_text())
            dense = (res.get("dense_track") or {}).get("ppl", dense)
            for name, r in res.items():
                if isinstance(r, dict) and (r.get("heal") or {}).get("curve"):
                    curves[name] = [(int(t), float(v)) for t, v in r["heal"]["curve"]]
        elif p.exists():
            curves[p.name] = load_curve(p)
        else:
            raise FileNotFoundError(f"{p}: not found. Fix: give compare_heal's --work directory or healed checkpoints")
    if not curves:
        raise ValueError("no healing curves found. Fix: run tools/compare_heal.py (or layerfold heal) first")
    return curves, dense


def plot(curves: dict[str, list[tuple[int, float]]], dense: float | None, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for name, c in curves.items():
        xs, ys = [t / 1000 for t, _ in c], [v for _, v in c]
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=f"{name} (best {min(ys):.2f})")
        if len(c) > 1:
            ax.plot(xs[1], ys[1], marker="s", markersize=7, color=line.get_color(), fillstyle="none")
    if dense:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.2f})")
        ax.axhline(1.6 * dense, color="gray", linestyle=":", linewidth=1, label="1.6x dense (the bar)")
    ax.set_yscale("log")
    ax.set_xlabel("healing tokens (thousands); square = end of the layer-wise stage")
    ax.set_ylabel("val perplexity (log scale)")
    ax.set_title("Healing SmolLM2-135M after removing 8 of 30 layers")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="compare_heal work dir, or healed checkpoint dirs")
    p.add_argument("--out", default=None, help="PNG path (default: heal_curves.png in the first path)")
    args = p.parse_args()
    curves, dense = collect(args.paths)
    out = Path(args.out) if args.out else Path(args.paths[0]) / "heal_curves.png"
    print(plot(curves, dense, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
