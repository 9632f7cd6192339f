"""Multiple-choice scores of a longrope model (Phi-3-*-128k, Phi-3.5): each continuation's log-likelihood is that of
one forward over its whole sequence (transformers' rule: the long factors for a sequence longer than the original
context), also where the context is within the original context and the continuation crosses it, so the context's
cached keys (short factors) cannot be shared."""

from __future__ import annotations

import pytest
import torch

from layerfold.evaluation.evaluate import grouped_scores
from tests.core.test_longrope import ORIG, phi3
from tests.support.models import to_layerfold

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(m: torch.nn.Module, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    with torch.no_grad():
        lp = m(torch.tensor([ctx + cont[:-1]]))[0, len(ctx) - 1:].double().log_softmax(-1)
    tgt = torch.tensor(cont)
    return lp.gather(-1, tgt[:, None]).sum().item(), bool((lp.argmax(-1) == tgt).all())


def seq(n: int, seed: int) -> list[int]:
    return torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_each_continuation_scores_as_its_whole_sequence() -> None:
    m = to_layerfold(phi3()).eval()
    groups = [(seq(10, 0), [seq(3, 1), seq(12, 2), seq(1, 3)]),  # within; crosses (10 + 12 - 1 > 16); within
              (seq(ORIG, 4), [seq(2, 5), seq(4, 6)]),  # the context fills the original context: both cross
              (seq(20, 7), [seq(3, 8), seq(5, 9)]),  # all long
              (seq(5, 10), [seq(4, 11), []])]  # within, and an empty continuation
    got = grouped_scores(m, groups, batch_size=4)
    for (ctx, conts), scores in zip(groups, got, strict=True):
        for cont, (ll, greedy) in zip(conts, scores, strict=True):
            want = reference(m, ctx, cont) if cont else (0.0, True)
            assert ll == pytest.approx(want[0], rel=1e-4, abs=1e-4) and greedy == want[1], (len(ctx), len(cont))


def test_the_crossing_is_what_makes_the_difference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test above would pass for a model whose factors do not switch: with a crossing continuation, the shared
    context cache (short factors) gives another score than the whole sequence (long factors)."""
    m = to_layerfold(phi3()).eval()
    ctx, cont = seq(10, 0), seq(12, 2)
    shared = grouped_scores(m, [(ctx, [cont, seq(2, 1)])])[0][1]  # (the short one shares the cache)
    assert shared[0] == pytest.approx(reference(m, ctx, seq(2, 1))[0], rel=1e-4, abs=1e-4)
    assert abs(grouped_scores(m, [(ctx, [cont])])[0][0][0] - reference(m, ctx, cont)[0]) < 1e-4
    import layerfold.evaluation.evaluate as E

    monkeypatch.setattr(E, "_crossing", lambda spec, groups: set())  # the shared cache for every item
    assert abs(grouped_scores(m, [(ctx, [cont])])[0][0][0] - reference(m, ctx, cont)[0]) > 1e-3
