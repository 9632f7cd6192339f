"""sample_each (batched: inference.sample_batch) against the per-row rules (sample_row, LogitShaper) row by row."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from layerfold.inference import sample_batch as sb
from layerfold.inference.controls import LogitShaper, SamplingParams, shape_rows
from layerfold.inference.sampling import NONFINITE, SamplingError, sample_each, sample_row

P = SamplingParams
V = 300


def reference(logits: torch.Tensor, params: list[SamplingParams], gens: list[Any], shapers: list[Any]) -> list[Any]:
    """The per-row loop sample_each ran before it was batched (the rules: sample_row)."""
    greedy, finite = logits.argmax(-1).tolist(), torch.isfinite(logits).all(-1).tolist()
    out: list[Any] = []
    for i, (p, g, sh) in enumerate(zip(params, gens, shapers, strict=True)):
        try:
            if not finite[i]:
                raise SamplingError(NONFINITE)
            if sh is not None:
                try:
                    row = sh(logits[i])
                except (RuntimeError, IndexError, ValueError) as e:
                    raise SamplingError(f"shaping the logits failed: {type(e).__name__}: {e}") from e
                out.append(sample_row(row, p, g))
            else:
                out.append(greedy[i] if p.greedy else sample_row(logits[i], p, g, greedy[i]))
        except SamplingError as e:
            out.append(e)
    return out


MIX = [  # (params, seeded, shaped: (prompt ids, end ids, observed tokens))
    (P(0.0), False, None),
    (P(0.8), True, None),
    (P(1.3, min_p=0.05), True, None),
    (P(0.7, top_k=5), True, None),
    (P(1.0, top_p=0.9), True, None),
    (P(0.9, top_p=0.5, top_k=40, min_p=0.01), True, None),
    (P(1.0, top_p=1e-9), True, None),  # the first token only
    (P(1.2, top_k=V + 5), True, None),  # k past the vocabulary: all
    (P(0.0, repetition_penalty=1.3, logit_bias=((3, 5.0),)), False, ([1, 2, 3], [7], [3, 3, 9])),
    (P(0.8, top_p=0.95, top_k=40, repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.3), True,
     ([4, 5, 6], [0], [5, 8, 8, 1])),
    (P(0.9, min_tokens=3, logit_bias=((10, -100.0), (11, 100.0), (10, 2.0))), True, ([], [11, 12], [1])),
    (P(1.0, min_tokens=1), True, ([], list(range(1, V)), [])),  # all but token 0 banned
    (P(0.0, min_tokens=1), False, ([], list(range(V - 1)), [])),  # greedy, all but the last banned
    (P(1.1, top_k=3, repetition_penalty=1e-300, presence_penalty=-2.0), True, ([7, 8], [], [8, 2])),
    (P(0.6), False, None),  # unseeded: the default generator, drawn in row order
]


def build(kinds: list[int], logits: torch.Tensor, seed: int) -> tuple[list[Any], list[Any], list[Any]]:
    params, gens, shapers = [], [], []
    for j, k in enumerate(kinds):
        p, seeded, sh = MIX[k]
        params.append(p)
        gens.append(torch.Generator().manual_seed(seed + j) if seeded else None)
        if sh is None:
            shapers.append(None)
        else:
            s = LogitShaper(p, sh[0], sh[1])
            for t in sh[2]:
                s.observe(t)
            shapers.append(s)
    return params, gens, shapers


def same(a: list[Any], b: list[Any]) -> None:
    assert [str(x) if isinstance(x, SamplingError) else x for x in a] == \
        [str(x) if isinstance(x, SamplingError) else x for x in b]


@pytest.mark.parametrize("trial", range(12))
def test_batched_equals_the_per_row_rules(trial: int) -> None:
    g = torch.Generator().manual_seed(trial)
    n = 24
    kinds = torch.randint(0, len(MIX), (n,), generator=g).tolist()
    kinds[1:4] = [k if k != len(MIX) - 1 else 0 for k in kinds[1:4]]  # (a failing row draws, unlike before:
    # only the default generator's state sees it, so the unseeded rows' reference would differ after it)
    logits = (torch.randn(n, V, generator=g) * (1 + 3 * trial % 5)).bfloat16().float()  # bf16: ties
    logits[1, 17] = float("nan")
    logits[2, 5] = float("inf")
    logits[3, 9] = -float("inf")  # the model's -Inf fails too (only shaping bans)
    outs = []
    for fn in (reference, sample_each):
        torch.manual_seed(1000 + trial)  # the unseeded rows' draws
        outs.append(fn(logits, *build(kinds, logits, 50 * trial)))
    same(outs[0], outs[1])
    assert all(isinstance(outs[1][i], SamplingError) for i in (1, 2, 3))


def test_every_kind_in_one_batch_and_shapers_over_steps() -> None:
    kinds = list(range(len(MIX)))
    logits = torch.randn(len(kinds), V, generator=torch.Generator().manual_seed(3)) * 4
    ref, new = build(kinds, logits, 7), build(kinds, logits, 7)
    for step in range(6):  # the shapers see each step's tokens (counts, min_tokens)
        x = logits.roll(step, -1)
        torch.manual_seed(step)
        a = reference(x, *ref)
        torch.manual_seed(step)
        b = sample_each(x, *new)
        same(a, b)
        if step == 0:
            assert b[11] == 0 and b[12] == V - 1
        for out, shapers in ((a, ref[2]), (b, new[2])):
            for t, sh in zip(out, shapers, strict=True):
                if sh is not None and not isinstance(t, SamplingError):
                    sh.observe(t)


def test_shape_rows_is_each_shaper_bit_for_bit() -> None:
    kinds = [8, 9, 10, 11, 13, 9]
    logits = torch.randn(len(kinds), V, generator=torch.Generator().manual_seed(5)) * 30
    logits[0, :3] = 3.4e38
    _, _, shapers = build(kinds, logits, 0)
    want = torch.stack([sh(logits[i]) for i, sh in enumerate(shapers)])
    x = logits.clone()
    shape_rows(x, list(enumerate(shapers)))
    assert torch.equal(x, want)


def test_seeded_rows_do_not_depend_on_the_other_rows() -> None:
    row = torch.randn(V, generator=torch.Generator().manual_seed(9))
    p = P(0.9, top_p=0.9, top_k=50)
    got = set()
    for others in range(8):
        n = 1 + others
        logits = torch.randn(n, V, generator=torch.Generator().manual_seed(others)) * 3
        at = others // 2
        logits[at] = row
        params = [P(float(j % 3), top_k=j) for j in range(n)]
        gens: list[Any] = [torch.Generator().manual_seed(j) if j % 2 else None for j in range(n)]
        params[at], gens[at] = p, torch.Generator().manual_seed(1234)
        got.add(sample_each(logits, params, gens)[at])
    assert len(got) == 1
    assert got == {sample_row(row, p, torch.Generator().manual_seed(1234))}


class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.seeds: set[int] = set()  # ids of the tensors randint made (a seeded row's seed, drawn on the host)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense" and id(args[0]) in self.seeds:
            name = "seed_read"
        if name == "randint":
            self.seeds.add(id(out))
        self.ops.append(name)
        return out


def test_one_host_read_back_on_the_device_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path a GPU takes (device draws: HOST_DRAWS empty), run on the CPU: one ``tolist``, no op that reads a
    device value back (``item``/``int``, ``nonzero``, ``multinomial``'s checks, boolean masks), and the seeded
    rows deterministic whatever shares their batch."""
    monkeypatch.setattr(sb, "HOST_DRAWS", ())
    monkeypatch.setattr(sb, "_device_gens", {})
    calls = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append(1) or real(t))
    kinds = list(range(len(MIX)))
    logits = torch.randn(len(kinds), V, generator=torch.Generator().manual_seed(2)) * 3
    logits[0, 1] = float("nan")
    args = build(kinds, logits, 11)
    for sh in args[2]:  # made on an earlier step (the first step makes each shaper's tensors, once)
        if sh is not None:
            sh._make(logits[0])
    with Ops() as mode:
        out = sample_each(logits, *args)
    assert len(calls) == 1
    syncing = {"_local_scalar_dense", "item", "nonzero", "masked_select", "multinomial", "unique", "_unique2",
               "repeat_interleave", "is_nonzero", "equal"}
    assert not syncing & set(mode.ops), sorted(syncing & set(mode.ops))
    assert mode.ops.count("seed_read") == sum(g is not None for g in args[1])
    assert isinstance(out[0], SamplingError) and out[11] == 0 and out[12] == V - 1
    row, p = logits[5], MIX[5][0]
    picks = {sample_each(torch.stack([row, logits[j]]), [p, MIX[j][0]],
                         [torch.Generator().manual_seed(77), torch.Generator().manual_seed(j)])[0]
             for j in range(1, 8)}
    assert len(picks) == 1


def test_shaper_failure_fails_its_row_alone() -> None:
    logits = torch.randn(3, V)
    bad = LogitShaper(P(1.0, logit_bias=((V + 3, 1.0),)))  # a token past the vocabulary (check() would refuse it)
    out = sample_each(logits, [P(0.0)] * 3, [None] * 3, [None, bad, LogitShaper(P(0.0, presence_penalty=1.0))])
    assert isinstance(out[1], SamplingError) and "shaping the logits failed" in str(out[1])
    assert out[0] == int(logits[0].argmax()) and out[2] == int(logits[2].argmax())


def test_every_token_banned_fails_a_sampled_row() -> None:
    sh = LogitShaper(P(1.0, min_tokens=2), [], range(V))
    out = sample_each(torch.randn(2, V), [P(1.0, min_tokens=2), P(1.0)], [None, None], [sh, None])
    assert isinstance(out[0], SamplingError) and "banned" in str(out[0]) and isinstance(out[1], int)


def test_empty_and_mismatched() -> None:
    assert sample_each(torch.empty(0, V), [], []) == []
    with pytest.raises(ValueError):
        sample_each(torch.randn(2, V), [P()], [None, None])
