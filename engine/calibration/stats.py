"""Calibration statistics: running sums from one streamed pass, and the values derived from them.

Everything stored is a *sum* over tokens (or over CKA minibatches) with its count, so pieces computed
on different processes or at different times combine by addition (:meth:`Stats.merge`, and an
all-reduce under torch.distributed). Derived values -- mean window cosines, Block Influence, CKA,
mean Grams and channel magnitudes -- are properties computed from the sums; they are never stored,
so they cannot disagree with them.

Notation (as in every method's module docstring): ``h_i`` is the residual stream entering layer i, ``h_0`` the
embeddings, ``h_L`` the last layer's output before the final norm.

Stored sums (``stats.safetensors``; names in brackets)::

    cos_sum   (L, W) fp64  [cos_sum]     sum over tokens of cos(h_i, h_{i+k}), column k-1
    cos_count (L, W) fp64  [cos_count]   tokens in each sum; 0 where i + k > L (mean: NaN)
    hsic      (L+1, L+1) fp64 [hsic]     sum over CKA minibatches of unbiased HSIC(h_a, h_b)
    grams[key]  (d, d) fp32 [gram.KEY]   X^T X of the residual stream at a norm input, where KEY is
                                         attn_in.{i} (= h_i), mlp_in.{i}, final (= h_L)
    gram_sum[key], gram_sq[key] (d,)     per-channel sum and sum of squares at the same points
    chan[key] (C,) fp32    [chan.KEY]    ffn_abs.{i}, ffn_sq.{i}: sum |a|, sum a^2 of a = silu(g) * u;
                                         o_abs.{i}, o_sq.{i}: the same for the o_proj input
``counts`` (in ``stats.json``): samples, tokens (valid), gram_tokens, chan_tokens (after the
position skip), cka_batches, cka_tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from layerfold.core.paths import atomic_dir, check_output, json_text

STATS_FORMAT = "layerfold-stats"
STATS_VERSION = 1
TENSORS = "stats.safetensors"
CONFIG = "stats.json"
COUNT_KEYS = ("samples", "tokens", "gram_tokens", "chan_tokens", "cka_batches", "cka_tokens")


def _check_header(cfg: dict[str, Any], where: Path) -> None:
    """stats.json's fields, typed as Stats.save writes them: a ValueError naming the first one that is not."""
    def whole(v: Any, lo: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    ver = cfg.get("version", 0)
    if not whole(ver, 0):
        raise ValueError(f"{where}: \"version\" is {ver!r}, not a whole number. Fix: calibrate again")
    if ver > STATS_VERSION:
        raise ValueError(f"{where}: statistics format version {ver} is newer than this layerfold reads "
                         f"({STATS_VERSION}). Fix: upgrade layerfold")
    for key, lo in (("n_layers", 1), ("window", 0)):
        if not whole(cfg.get(key), lo):
            raise ValueError(f"{where}: \"{key}\" is {cfg.get(key)!r}, not a whole number >= {lo}. Fix: the file is "
                             "damaged or hand-edited; calibrate again")
    counts, meta = cfg.setdefault("counts", {}), cfg.setdefault("meta", {})
    if not isinstance(counts, dict) or not all(whole(counts.get(k, 0), 0) for k in COUNT_KEYS) \
            or not isinstance(meta, dict):
        raise ValueError(f"{where}: \"counts\" / \"meta\" are not what calibrate writes. Fix: the file is damaged "
                         "or hand-edited; calibrate again")


def _merge_err(what: str) -> ValueError:
    return ValueError(f"cannot merge statistics: {what}. Fix: merge only pieces calibrated from the same model "
                      "with the same options (window, cka, grams, channels, position skip)")


@dataclass
class Stats:
    """Running sums of one calibration pass (see the module docstring for every field)."""

    n_layers: int
    window: int
    cos_sum: Tensor
    cos_count: Tensor
    hsic: Tensor | None = None
    grams: dict[str, Tensor] = field(default_factory=dict)
    gram_sum: dict[str, Tensor] = field(default_factory=dict)
    gram_sq: dict[str, Tensor] = field(default_factory=dict)
    chan: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def empty(cls, n_layers: int, window: int, *, cka: bool = True, meta: dict[str, Any] | None = None) -> Stats:
        L = n_layers
        hsic = torch.zeros(L + 1, L + 1, dtype=torch.float64) if cka else None
        return cls(L, window, torch.zeros(L, window, dtype=torch.float64),
                   torch.zeros(L, window, dtype=torch.float64), hsic,
                   counts={k: 0 for k in COUNT_KEYS}, meta=dict(meta or {}))

    # ---- derived values ----------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return int(self.counts.get("tokens", 0))

    @property
    def cos_window(self) -> Tensor:
        """(L, W) fp64: mean token-wise cos(h_i, h_{i+k}) in column k-1; NaN where i + k > L (or the
        widths of h_i and h_{i+k} differ, e.g. after SliceGPT slicing)."""
        out = self.cos_sum / self.cos_count.clamp_min(1)
        return out.masked_fill(self.cos_count == 0, math.nan)

    @property
    def angular_window(self) -> Tensor:
        """(L, W): angular distance arccos(cos)/pi of the mean cosine (Gromov et al.; CoMe pair score)."""
        return torch.arccos(self.cos_window.clamp(-1, 1)) / math.pi

    @property
    def bi(self) -> Tensor:
        """(L,) ShortGPT Block Influence: 1 - mean cos(h_i, h_{i+1}) (NaN when W = 0)."""
        if self.window < 1:
            return torch.full((self.n_layers,), math.nan, dtype=torch.float64)
        return 1.0 - self.cos_window[:, 0]

    @property
    def cka(self) -> Tensor:
        """(L+1, L+1) fp64 linear CKA between h_0..h_L from the summed minibatch HSIC."""
        if self.hsic is None:
            raise ValueError("these statistics hold no CKA (calibrated with cka=False). "
                             "Fix: calibrate again without --no-cka")
        from layerfold.kernels import cka_from_hsic

        return cka_from_hsic(self.hsic)

    def window_scores(self, n: int) -> Tensor:
        """(L,) mean cos(h_j, h_{j+n}) for each start j (NaN where j + n > L): LLM-Streamline removes
        layers j..j+n-1 for the j that maximises it."""
        if not 1 <= n <= self.window:
            raise ValueError(f"window width n={n} is outside 1..{self.window} (the calibrated window). "
                             f"Fix: recalibrate with --window {max(n, 1)} or more")
        return self.cos_window[:, n - 1]

    def gram_mean(self, key: str) -> Tensor:
        """E[x x^T] (fp64) at a norm input (key attn_in.{i} | mlp_in.{i} | final)."""
        return self._need(self.grams, key, "grams", "--grams").double() / max(self.counts["gram_tokens"], 1)

    def gram_channel_mean(self, key: str) -> tuple[Tensor, Tensor]:
        """(mean, mean of squares) per residual channel at a norm input."""
        n = max(self.counts["gram_tokens"], 1)
        s = self._need(self.gram_sum, key, "grams", "--grams").double() / n
        return s, self.gram_sq[key].double() / n

    def chan_mean(self, key: str) -> Tensor:
        """Mean over tokens of a channel sum (ffn_abs.{i} = mean |silu(g) u|, o_sq.{i} = mean o^2, ...)."""
        return self._need(self.chan, key, "channel", "channels=True").double() / max(self.counts["chan_tokens"], 1)

    def _need(self, d: dict[str, Tensor], key: str, what: str, fix: str) -> Tensor:
        if key not in d:
            have = ", ".join(sorted(d)[:4]) or "none"
            raise ValueError(f"no {what} statistic {key!r} (have: {have}{', ...' if len(d) > 4 else ''}). "
                           f"Fix: calibrate with {fix}, or check the layer index")
        return d[key]

    # ---- combining ---------------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """Every stored sum under its file name. The values alias the fields: an in-place all-reduce
        of these tensors updates the Stats."""
        out = {"cos_sum": self.cos_sum, "cos_count": self.cos_count}
        if self.hsic is not None:
            out["hsic"] = self.hsic
        for prefix, d in (("gram", self.grams), ("gram_sum", self.gram_sum), ("gram_sq", self.gram_sq),
                          ("chan", self.chan)):
            out.update({f"{prefix}.{k}": v for k, v in d.items()})
        return out

    def merge(self, other: Stats) -> Stats:
        """A new Stats whose sums are self's plus other's (pieces of one calibration set)."""
        if (self.n_layers, self.window) != (other.n_layers, other.window):
            raise _merge_err(f"shapes differ (L={self.n_layers}, W={self.window} vs L={other.n_layers}, "
                             f"W={other.window})")
        a, b = self.tensors(), other.tensors()
        if a.keys() != b.keys():
            raise _merge_err(f"different statistics ({sorted(a.keys() ^ b.keys())[:3]} in only one)")
        opts = (self.meta.get("options"), other.meta.get("options"))
        if None not in opts and opts[0] != opts[1]:
            raise _merge_err(f"options differ ({opts[0]} vs {opts[1]})")
        summed = {k: a[k] + b[k] for k in a}
        counts = {k: self.counts.get(k, 0) + other.counts.get(k, 0) for k in self.counts.keys() | other.counts.keys()}
        meta = dict(self.meta)
        meta["pieces"] = self.meta.get("pieces", 1) + other.meta.get("pieces", 1)
        for k in ("samples", "tokens"):
            if k in self.meta and k in other.meta:
                meta[k] = self.meta[k] + other.meta[k]
        return Stats._from_tensors(self.n_layers, self.window, summed, counts, meta)

    def all_reduce(self, group: Any = None, device: torch.device | str | None = None) -> Stats:
        """Sum every statistic over the ranks of a torch.distributed group, in place. NCCL needs CUDA
        tensors: give ``device`` (each tensor travels there and back); gloo reduces on the host."""
        import torch.distributed as dist

        ts = self.tensors()
        counts = torch.tensor([float(self.counts.get(k, 0)) for k in COUNT_KEYS], dtype=torch.float64)
        for name in sorted(ts) + ["counts"]:
            t = counts if name == "counts" else ts[name]
            buf = t.to(device) if device is not None else t
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
            if buf is not t:
                t.copy_(buf.cpu())
        self.counts.update({k: int(v) for k, v in zip(COUNT_KEYS, counts.tolist(), strict=True)})
        return self

    # ---- files -------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """JSON-friendly derived values (what stats.json records for people and other tools)."""
        nan2none = lambda xs: [None if x != x else round(float(x), 6) for x in xs]
        out: dict[str, Any] = {"bi": nan2none(self.bi.tolist()) if self.window else None}
        if self.hsic is not None and self.counts.get("cka_batches", 0):
            out["cka_adjacent"] = nan2none(torch.diagonal(self.cka, 1).tolist())
        return out

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``stats.safetensors`` + ``stats.json`` into a directory, atomically (temp dir + rename)."""
        out = check_output(path, overwrite=overwrite)
        with atomic_dir(out) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}, str(tmp / TENSORS))
            cfg = {"format": STATS_FORMAT, "version": STATS_VERSION, "n_layers": self.n_layers,
                   "window": self.window, "counts": self.counts, "meta": self.meta, "derived": self.summary()}
            (tmp / CONFIG).write_text(json_text(cfg))
        return out

    @classmethod
    def load(cls, path: str | Path) -> Stats:
        p = Path(path)
        if not (p / CONFIG).is_file():
            raise FileNotFoundError(f"{p}: no {CONFIG} there. Fix: point to a directory written by "
                                    "`layerfold calibrate --out` (or Stats.save)")
        try:
            cfg = json.loads((p / CONFIG).read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, nesting deeper than Python's stack
            raise ValueError(f"{p / CONFIG}: corrupt JSON ({type(e).__name__}: {str(e)[:200]}). Fix: calibrate "
                             "again") from None
        if not isinstance(cfg, dict) or cfg.get("format") != STATS_FORMAT:
            raise ValueError(f"{p / CONFIG}: not a layerfold statistics file. Fix: point to the --out directory "
                             "of `layerfold calibrate`")
        _check_header(cfg, p / CONFIG)
        if not (p / TENSORS).is_file():
            raise FileNotFoundError(f"{p / TENSORS}: missing. Fix: the directory is incomplete; calibrate again")
        try:
            ts = load_file(str(p / TENSORS))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{p / TENSORS}: corrupt or truncated ({e}). Fix: calibrate again") from None
        L, W = int(cfg["n_layers"]), int(cfg["window"])
        for name, shape in (("cos_sum", (L, W)), ("cos_count", (L, W))):
            if name not in ts or tuple(ts[name].shape) != shape:
                got = tuple(ts[name].shape) if name in ts else "missing"
                raise ValueError(f"{p / TENSORS}: tensor {name!r} is {got}, {CONFIG} says {shape}. "
                                 "Fix: the two files come from different runs; calibrate again")
        if "hsic" in ts and tuple(ts["hsic"].shape) != (L + 1, L + 1):
            raise ValueError(f"{p / TENSORS}: hsic has shape {tuple(ts['hsic'].shape)}, expected {(L + 1, L + 1)}. "
                             "Fix: calibrate again")
        counts = {k: cfg["counts"].get(k, 0) for k in COUNT_KEYS}
        return cls._from_tensors(L, W, ts, counts, cfg.get("meta", {}))

    def check_model(self, spec: Any, where: str | Path) -> None:
        """Raise naming the cause when these statistics cannot be of the model ``spec`` (its layer count, and the
        widths of the stored Grams and channel sums)."""
        fix = "Fix: calibrate this model (layerfold calibrate MODEL --out DIR) or drop --stats"
        if self.n_layers != spec.n_layers:
            raise ValueError(f"{where}: statistics of a {self.n_layers}-layer model, this model has {spec.n_layers}. "
                             + fix)
        L, ls = spec.n_layers, spec.layers
        width = {"attn_in": lambda i: ls[i].d_in, "mlp_in": lambda i: ls[i].d_mid, "ffn_abs": lambda i: ls[i].d_ffn,
                 "ffn_sq": lambda i: ls[i].d_ffn, "o_abs": lambda i: ls[i].q_dim, "o_sq": lambda i: ls[i].q_dim}
        for group, square in ((self.grams, True), (self.gram_sum, False), (self.gram_sq, False), (self.chan, False)):
            for key, t in group.items():
                kind, _, idx = key.partition(".")
                if key == "final":
                    d = spec.d_final
                elif kind in width and idx.isdigit() and int(idx) < L:
                    d = width[kind](int(idx))
                else:
                    raise ValueError(f"{where}: statistics hold {key!r}, which this model has no place for. {fix}")
                want = (d, d) if square else (d,)
                if tuple(t.shape) != want:
                    raise ValueError(f"{where}: statistics of another model ({key!r} is {tuple(t.shape)}, this model's "
                                     f"is {want}). {fix}")

    @classmethod
    def _from_tensors(cls, L: int, W: int, ts: dict[str, Tensor], counts: dict[str, int],
                      meta: dict[str, Any]) -> Stats:
        def group(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) + 1:]: v for k, v in ts.items() if k.startswith(prefix + ".")}

        return cls(L, W, ts["cos_sum"], ts["cos_count"], ts.get("hsic"), group("gram"), group("gram_sum"),
                   group("gram_sq"), group("chan"), dict(counts), dict(meta))
