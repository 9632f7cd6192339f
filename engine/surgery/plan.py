"""Depth plans: what to drop, merge and replace, as a small JSON document a person can read and edit.

A plan names layers of the *source* model (0..n_layers-1). Every source layer is either kept (the
default), dropped, one of a merge group (the group becomes one layer at the group's position), or one
of a replaced window (the window becomes one new block). Example::

    {
      "kind": "depth",
      "n_layers": 30,
      "drop": [24, 26],
      "merge": [{"first": 20, "last": 22, "how": "consolidate"}],
      "replace": [{"first": 11, "last": 18, "block": "mlp"}]
    }

``merge.how``: ``consolidate`` (theta_a + sum_{k>a} (theta_k - theta_a), as the LaCo/SLM papers write it),
``mean`` or ``keep-top`` (the top layer's linear weights: what the public LaCo/SLM code ends up with).
Norms always keep the first layer's gains. ``replace.block``: ``mlp`` (SwiGLU FFN with its own pre-norm and
residual, initialised from layer ``init``'s MLP and post-attention norm) or ``decoder`` (a copy of layer
``init``); ``init`` defaults to ``first``. ``method`` and ``notes`` are for readers; surgery ignores them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MERGE_HOW = ("consolidate", "mean", "keep-top")
BLOCKS = ("mlp", "decoder")
KIND = "depth"
MAX_LAYERS = 100_000  # far above any model's depth: a plan's n_layers above it is a typo (and would be walked)


def _bad(msg: str, fix: str) -> ValueError:
    return ValueError(f"plan: {msg}. Fix: {fix}")


def _int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"{where} = {v!r} is not a whole number", "write layer indices as integers, e.g. 12")
    return v


@dataclass(frozen=True)
class Merge:
    first: int  # the group is source layers first..last (inclusive); the merged layer sits at ``first``
    last: int
    how: str = "consolidate"

    @property
    def layers(self) -> list[int]:
        return list(range(self.first, self.last + 1))


@dataclass(frozen=True)
class Replace:
    first: int  # source layers first..last (inclusive) become one new block
    last: int
    block: str = "mlp"
    init: int | None = None  # source layer the new block is initialised from (default: first)

    @property
    def layers(self) -> list[int]:
        return list(range(self.first, self.last + 1))

    @property
    def init_layer(self) -> int:
        return self.first if self.init is None else self.init


@dataclass(frozen=True)
class DepthPlan:
    n_layers: int  # layer count of the source model the plan is written for
    drop: tuple[int, ...] = ()
    merge: tuple[Merge, ...] = ()
    replace: tuple[Replace, ...] = ()
    method: str = ""
    notes: dict[str, Any] = field(default_factory=dict, compare=False)

    # ---- checks --------------------------------------------------------------------------------
    def validate(self, n_layers: int | None = None) -> DepthPlan:
        """Raise ValueError naming the first problem; ``n_layers``: the model the plan is applied to."""
        L = self.n_layers
        if n_layers is not None and n_layers != L:
            raise _bad(f"written for a {L}-layer model, applied to one with {n_layers} layers",
                       f"set \"n_layers\": {n_layers} and check every index against that model")
        if not 1 <= L <= MAX_LAYERS:
            raise _bad(f"n_layers = {L}", f"give the source model's layer count (1..{MAX_LAYERS})")
        owner: dict[int, str] = {}

        def claim(i: int, what: str) -> None:
            if not 0 <= i < L:
                raise _bad(f"{what} names layer {i}, out of range for a {L}-layer model",
                           f"use indices 0..{L - 1}")
            if i in owner:
                raise _bad(f"layer {i} is in both {owner[i]} and {what} (overlapping operations)",
                           "put every layer in at most one of drop / merge / replace")
            owner[i] = what

        def span(kind: str, g: Merge | Replace, field: str, value: str, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                raise _bad(f"{kind} {g.first}-{g.last}: {field}={value!r} is unknown", f"use one of {allowed}")
            if g.last < g.first:
                raise _bad(f"{kind} first={g.first} > last={g.last}", "write the lower index as first")
            if g.first < 0 or g.last >= L:  # named before the range is walked (a last of 10**12 is not a list)
                raise _bad(f"{kind} {g.first}-{g.last} names layers out of range for a {L}-layer model",
                           f"use indices 0..{L - 1}")
            for i in g.layers:
                claim(i, f"{kind} {g.first}-{g.last}")

        for i in self.drop:
            claim(_int(i, "drop entry"), "drop")
        for g in self.merge:
            span("merge", g, "how", g.how, MERGE_HOW)
        for r in self.replace:
            span("replace", r, "block", r.block, BLOCKS)
            if not 0 <= r.init_layer < L:
                raise _bad(f"replace {r.first}-{r.last}: init layer {r.init_layer} is out of range",
                           f"use a source layer 0..{L - 1}")
        if self.n_layers_after() < 1:
            raise _bad("no layer would remain", "keep at least one layer")
        return self

    # ---- what the plan does --------------------------------------------------------------------
    def layer_map(self) -> list[list[int]]:
        """Per layer of the pruned model: the source layers it stands for (docs/CONTRACTS.md: provenance layer_map)."""
        starts: dict[int, list[int]] = {g.first: g.layers for g in self.merge}
        starts.update({r.first: r.layers for r in self.replace})
        covered = {i for g in self.merge for i in g.layers} | {i for r in self.replace for i in r.layers}
        dropped = set(self.drop)
        out: list[list[int]] = []
        for i in range(self.n_layers):
            if i in starts:
                out.append(starts[i])
            elif i not in covered and i not in dropped:
                out.append([i])
        return out

    def ops(self) -> list[tuple[str, Any]]:
        """Per layer of the pruned model: ("keep", i) | ("merge", Merge) | ("replace", Replace)."""
        by_first: dict[int, tuple[str, Any]] = {g.first: ("merge", g) for g in self.merge}
        by_first.update({r.first: ("replace", r) for r in self.replace})
        out = []
        for group in self.layer_map():
            out.append(by_first.get(group[0], ("keep", group[0])))
        return out

    def changed_layers(self) -> list[int]:
        """Pruned-model indices of layers surgery created or altered (a merge group of one is unchanged)."""
        return [j for j, (op, x) in enumerate(self.ops())
                if op == "replace" or (op == "merge" and x.last > x.first)]

    def n_layers_after(self) -> int:
        return len(self.layer_map())

    def removed(self) -> int:
        return self.n_layers - self.n_layers_after()

    def describe(self) -> list[str]:
        """One line per pruned-model layer that is not a plain kept layer, plus the dropped ones."""
        lines = []
        for j, (op, x) in enumerate(self.ops()):
            if op == "merge" and x.last > x.first:
                lines.append(f"layer {j} <- merge of source layers {x.first}-{x.last} ({x.how})")
            elif op == "replace":
                lines.append(f"layer {j} <- {x.block} block replacing source layers {x.first}-{x.last} "
                             f"(init from layer {x.init_layer})")
        if self.drop:
            lines.append(f"dropped source layers: {', '.join(map(str, sorted(self.drop)))}")
        return lines

    # ---- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": KIND, "n_layers": self.n_layers}
        if self.method:
            d["method"] = self.method
        d["drop"] = sorted(self.drop)
        d["merge"] = [{"first": g.first, "last": g.last, "how": g.how} for g in self.merge]
        d["replace"] = [{"first": r.first, "last": r.last, "block": r.block}
                        | ({"init": r.init} if r.init is not None else {}) for r in self.replace]
        d["result"] = {"n_layers": self.n_layers_after(), "layer_map": self.layer_map()}
        if self.notes:
            d["notes"] = self.notes
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=float)

    @classmethod
    def from_dict(cls, d: Any) -> DepthPlan:
        if not isinstance(d, dict):
            raise _bad(f"expected a JSON object, got {type(d).__name__}", "write {\"kind\": \"depth\", ...}")
        if d.get("kind", KIND) != KIND:
            raise _bad(f"kind={d.get('kind')!r} is not a depth plan", "use \"kind\": \"depth\"")
        known = {"kind", "n_layers", "method", "drop", "merge", "replace", "notes", "result"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise _bad(f"unknown field(s) {unknown}", f"use only {sorted(known)}")
        if "n_layers" not in d:
            raise _bad("missing \"n_layers\"", "give the source model's layer count (layerfold inspect shows it)")
        merges = tuple(_group(Merge, g, "merge", ("first", "last", "how")) for g in _list(d, "merge"))
        reps = tuple(_group(Replace, r, "replace", ("first", "last", "block", "init")) for r in _list(d, "replace"))
        drop = tuple(_int(i, "drop entry") for i in _list(d, "drop"))
        notes = d.get("notes") or {}
        if not isinstance(notes, dict):
            raise _bad(f"\"notes\" must be an object, got {type(notes).__name__}",
                       "write \"notes\": {...} or leave it out")
        plan = cls(n_layers=_int(d["n_layers"], "n_layers"), drop=drop, merge=merges, replace=reps,
                   method=str(d.get("method", "")), notes=dict(notes))
        plan.validate()
        res = d.get("result")
        if isinstance(res, dict) and "n_layers" in res and res["n_layers"] != plan.n_layers_after():
            raise _bad(f"\"result\" says {res['n_layers']} layers but the operations leave {plan.n_layers_after()}",
                       "delete the \"result\" block after editing (it is recomputed on save)")
        return plan

    @classmethod
    def from_json(cls, s: str) -> DepthPlan:
        return cls.from_dict(_parse(s, "the plan"))

    @classmethod
    def load(cls, path: str | Path) -> DepthPlan:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: plan file not found. Fix: write one (see `layerfold prune --help`) or "
                                    "take report.json's \"plan\" from an earlier prune")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise _bad(f"{p} is not UTF-8 text (a binary file?)", "give the plan's JSON file") from None
        obj = _parse(text, str(p))
        if isinstance(obj, dict) and "plan" in obj and "kind" not in obj:  # a report.json
            obj = obj["plan"]
        return cls.from_dict(obj)

    def save(self, path: str | Path) -> None:
        from layerfold.core.paths import write_json_atomic

        write_json_atomic(path, self.to_dict())


def _parse(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise _bad(f"{what} nests JSON deeper than Python can read", "write the flat plan object") from None
    except ValueError as e:  # JSONDecodeError, or an integer of thousands of digits
        raise _bad(f"{what} is not valid JSON ({str(e)[:200]})", "check commas, brackets and numbers") from None


def _list(d: dict[str, Any], key: str) -> list[Any]:
    v = d.get(key) or []
    if not isinstance(v, list):
        raise _bad(f"\"{key}\" must be a list, got {type(v).__name__}", f"write \"{key}\": [...]")
    return v


def _group(cls: type, g: Any, what: str, allowed: tuple[str, ...]) -> Any:
    if not isinstance(g, dict) or "first" not in g or "last" not in g:
        raise _bad(f"a {what} entry must be an object with \"first\" and \"last\", got {g!r}",
                   "write {\"first\": 20, \"last\": 23} (inclusive source-layer range)")
    bad = sorted(set(g) - set(allowed))
    if bad:
        raise _bad(f"{what} entry has unknown field(s) {bad}", f"use only {list(allowed)}")
    kw = {k: g[k] for k in allowed if k in g}
    kw["first"], kw["last"] = _int(g["first"], f"{what}.first"), _int(g["last"], f"{what}.last")
    if "init" in kw and kw["init"] is not None:
        kw["init"] = _int(kw["init"], f"{what}.init")
    return cls(**kw)


def plan_from_groups(n_layers: int, groups: list[list[int]], how: str = "consolidate", method: str = "",
                     notes: dict[str, Any] | None = None) -> DepthPlan:
    """A merge plan from a partition of 0..n_layers-1 into consecutive groups (what LaCo/SLM search over)."""
    merges = tuple(Merge(g[0], g[-1], how) for g in groups if len(g) > 1)
    return DepthPlan(n_layers=n_layers, merge=merges, method=method, notes=notes or {}).validate()
