"""Figures of calibration statistics (PNG): the CKA heat map, Block Influence, window cosines.

Uses matplotlib's object API (``Figure``), not pyplot: no global state, no display needed. Every file
is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from layerfold.calibration.stats import Stats


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
    return path


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h))


def plot_cka(stats: Stats, path: str | Path, title: str = "") -> Path:
    """Layer x layer linear CKA between h_0 (embeddings) .. h_L (last layer output): the SLM picture."""
    cka = stats.cka.float().numpy()
    n = cka.shape[0]
    fig = _figure(6.4, 5.4)
    ax = fig.subplots()
    im = ax.imshow(cka, vmin=0.0, vmax=1.0, cmap="viridis", origin="upper")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="linear CKA")
    step = max(1, n // 16)
    ax.set_xticks(range(0, n, step))
    ax.set_yticks(range(0, n, step))
    ax.set_xlabel("hidden state h_j (0 = embeddings, j = output of layer j-1)")
    ax.set_ylabel("hidden state h_i")
    ax.set_title(title or f"CKA between hidden states ({stats.counts.get('cka_batches', 0)} minibatches)")
    return _save(fig, Path(path))


def plot_bi(stats: Stats, path: str | Path, title: str = "") -> Path:
    """Block Influence 1 - cos(h_i, h_{i+1}) per layer (log scale: first/last layers dwarf the rest)."""
    bi = stats.bi.numpy()
    fig = _figure(max(6.0, 0.22 * len(bi) + 2), 3.6)
    ax = fig.subplots()
    low = set(torch.from_numpy(bi).nan_to_num(float("inf")).argsort()[:5].tolist())
    ax.bar(range(len(bi)), bi, color=["tab:orange" if i in low else "tab:blue" for i in range(len(bi))])
    ax.set_yscale("log")
    ax.set_xlabel("layer i")
    ax.set_ylabel("BI = 1 - cos(h_i, h_i+1)")
    ax.set_title(title or "Block Influence (orange: 5 lowest)")
    ax.set_xticks(range(0, len(bi), max(1, len(bi) // 30)))
    return _save(fig, Path(path))


def plot_cos_window(stats: Stats, path: str | Path, title: str = "") -> Path:
    """Mean cos(h_i, h_{i+k}) for start i and width k = 1..W (LLM-Streamline's window choice)."""
    import numpy as np

    cw = stats.cos_window.numpy()
    fig = _figure(max(4.0, 0.5 * stats.window + 2.5), max(4.0, 0.18 * stats.n_layers + 1.5))
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(cw), cmap="magma", aspect="auto", origin="upper")
    fig.colorbar(im, ax=ax, label="mean token-wise cosine")
    ax.set_xticks(range(stats.window))
    ax.set_xticklabels([str(k) for k in range(1, stats.window + 1)])
    ax.set_yticks(range(0, stats.n_layers, max(1, stats.n_layers // 16)))
    ax.set_xlabel("k (layers i .. i+k-1 skipped)")
    ax.set_ylabel("start i")
    ax.set_title(title or "cos(h_i, h_i+k)")
    return _save(fig, Path(path))


def plot_all(stats: Stats, out_dir: str | Path, title: str = "") -> list[Path]:
    """Every figure the statistics allow, into ``out_dir``: cka.png, bi.png, cos_window.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    suffix = f" - {title}" if title else ""
    if stats.hsic is not None and stats.counts.get("cka_batches", 0):
        paths.append(plot_cka(stats, out / "cka.png", f"Linear CKA between hidden states{suffix}"))
    if stats.window >= 1:
        paths.append(plot_bi(stats, out / "bi.png", f"Block Influence (orange: 5 lowest){suffix}"))
        paths.append(plot_cos_window(stats, out / "cos_window.png", f"cos(h_i, h_i+k){suffix}"))
    return paths
