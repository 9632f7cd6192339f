"""Depth plans and surgery on tiny random models: drop = skip, merge formulas, replacement blocks, JSON."""

from __future__ import annotations

import json

import pytest
import torch

from layerfold.surgery.depth import apply_depth_plan, layer_state, merge_layer_states, merge_tensors
from layerfold.surgery.plan import DepthPlan, Merge, Replace, plan_from_groups
from tests.support.models import tiny_model
from tests.support.tolerances import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


# GQA (group of 2), non-power-of-two widths; std 0.15 is large enough that every layer changes the output
TINY = dict(d_model=48, n_layers=6, heads=4, kv_heads=2, head_dim=12, ffn=72, vocab=61, tie=True, norm_eps=1e-6,
            std=0.15, norm_gains=True)


def ids(B: int = 2, T: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 61, (B, T), generator=torch.Generator().manual_seed(seed))


def run_skipping(m, x: torch.Tensor, skip: set[int]) -> torch.Tensor:
    h, ropes, mask = m.prepare(x)
    for i in range(m.spec.n_layers):
        if i not in skip:
            h = m.run_layer(i, h, ropes, mask)
    return m.logits(h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("drop", [[0], [2, 4], [5], [1, 2, 3]])
def test_drop_equals_skipping_in_forward(drop: list[int], dtype: torch.dtype) -> None:
    m = tiny_model(**TINY, dtype=dtype)
    x = ids()
    plan = DepthPlan(n_layers=6, drop=tuple(drop))
    new = apply_depth_plan(m, plan)
    assert new.spec.n_layers == 6 - len(drop)
    with torch.no_grad():
        got, want = new(x), run_skipping(m, x, set(drop))
    assert_close(got, want, dtype, "pruned model vs skipping the layers (b, t, v)")
    assert plan.layer_map() == [[i] for i in range(6) if i not in drop]
    assert plan.changed_layers() == []


def test_merge_group_of_one_is_identity() -> None:
    m = tiny_model(**TINY)
    plan = DepthPlan(n_layers=6, merge=(Merge(3, 3, "consolidate"),))
    new = apply_depth_plan(m, plan)
    x = ids()
    with torch.no_grad():
        assert torch.equal(new(x), m(x))
    for k, v in m.state_dict().items():
        assert torch.equal(new.state_dict()[k], v), k
    assert plan.changed_layers() == []


@pytest.mark.parametrize("n", [2, 3, 5])
def test_consolidate_matches_formula(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    ts = [torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(n)]
    want = ts[0] + sum(t - ts[0] for t in ts[1:])
    assert torch.allclose(merge_tensors(ts, "consolidate"), want, atol=1e-12)
    assert torch.allclose(merge_tensors(ts, "mean"), torch.stack(ts).mean(0), atol=1e-12)
    assert torch.equal(merge_tensors(ts, "keep-top"), ts[-1])


def test_merge_layers_in_model_keeps_first_norms() -> None:
    m = tiny_model(**TINY)
    plan = DepthPlan(n_layers=6, merge=(Merge(1, 3, "consolidate"),))
    new = apply_depth_plan(m, plan)
    assert new.spec.n_layers == 4 and plan.layer_map() == [[0], [1, 2, 3], [4], [5]]
    assert plan.changed_layers() == [1]
    s = [layer_state(m, i) for i in (1, 2, 3)]
    got = layer_state(new, 1)
    for k in got:
        if "norm" in k:
            assert torch.equal(got[k], s[0][k]), k
        else:
            want = s[0][k] + (s[1][k] - s[0][k]) + (s[2][k] - s[0][k])
            assert_close(got[k], want, torch.float32, k, check_dtype=True)
    assert torch.equal(layer_state(new, 2)["attn.q.weight"], layer_state(m, 4)["attn.q.weight"])
    merged = merge_layer_states(s, "mean")
    assert_close(merged["mlp.down.weight"], torch.stack([x["mlp.down.weight"] for x in s]).mean(0), torch.float32,
                 "mean merge", check_dtype=True)


def test_replace_window_by_mlp_and_decoder_blocks() -> None:
    m = tiny_model(**TINY)
    src = layer_state(m, 2)
    plan = DepthPlan(n_layers=6, replace=(Replace(2, 4, "mlp"),))
    new = apply_depth_plan(m, plan)
    ls = new.spec.layers[2]
    assert (ls.kind, ls.has_attn, ls.has_mlp, ls.d_ffn) == ("mlp", False, True, 72)
    got = layer_state(new, 2)
    assert set(got) == {"mlp_norm.weight", "mlp.gate.weight", "mlp.up.weight", "mlp.down.weight"}
    for k, v in got.items():
        assert torch.equal(v, src[k]), k
    assert plan.layer_map() == [[0], [1], [2, 3, 4], [5]] and plan.changed_layers() == [2]
    new_dec = apply_depth_plan(m, DepthPlan(n_layers=6, replace=(Replace(2, 4, "decoder", init=3),)))
    assert new_dec.spec.uniform and new_dec.spec.n_layers == 4
    for k, v in layer_state(new_dec, 2).items():
        assert torch.equal(v, layer_state(m, 3)[k]), k
    x = ids()
    with torch.no_grad():
        assert torch.isfinite(new(x)).all() and torch.isfinite(new_dec(x)).all()


def test_surgery_makes_compact_independent_copies() -> None:
    m = tiny_model(**TINY)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    new = apply_depth_plan(m, DepthPlan(n_layers=6, drop=(1,), merge=(Merge(3, 4),)))
    src_ptrs = {v.data_ptr() for v in m.state_dict().values()}
    for k, v in new.state_dict().items():
        assert v.is_contiguous(), k
        assert v.data_ptr() not in src_ptrs, f"{k} shares storage with the source"
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"surgery changed the source's {k}"


def test_plan_json_round_trip(tmp_path) -> None:
    plan = DepthPlan(n_layers=12, drop=(0, 11), merge=(Merge(2, 4, "mean"), Merge(7, 7)),
                     replace=(Replace(8, 10, "decoder", init=9),), method="hand", notes={"why": "test"})
    again = DepthPlan.from_json(plan.to_json())
    assert again == plan and again.notes == plan.notes
    assert again.layer_map() == plan.layer_map() == [[1], [2, 3, 4], [5], [6], [7], [8, 9, 10]]
    f = tmp_path / "plan.json"
    plan.save(f)
    assert DepthPlan.load(f) == plan
    d = json.loads(f.read_text())
    assert d["result"]["n_layers"] == 6 and d["merge"][0] == {"first": 2, "last": 4, "how": "mean"}
    (tmp_path / "report.json").write_text(json.dumps({"plan": d, "method": "x"}))
    assert DepthPlan.load(tmp_path / "report.json") == plan
    groups = plan_from_groups(5, [[0], [1, 2], [3, 4]])
    assert groups.layer_map() == [[0], [1, 2], [3, 4]] and groups.changed_layers() == [1, 2]


@pytest.mark.parametrize("bad, needle", [
    ({"n_layers": 6, "drop": [6]}, "out of range"),
    ({"n_layers": 6, "drop": [-1]}, "out of range"),
    ({"n_layers": 6, "drop": [2], "merge": [{"first": 1, "last": 3}]}, "overlapping"),
    ({"n_layers": 6, "merge": [{"first": 1, "last": 3}], "replace": [{"first": 3, "last": 4}]}, "overlapping"),
    ({"n_layers": 6, "merge": [{"first": 3, "last": 1}]}, "first=3 > last=1"),
    ({"n_layers": 6, "merge": [{"first": 1, "last": 2, "how": "sum"}]}, "how='sum'"),
    ({"n_layers": 6, "replace": [{"first": 1, "last": 2, "block": "conv"}]}, "block='conv'"),
    ({"n_layers": 6, "drop": [0, 1, 2, 3, 4, 5]}, "no layer would remain"),
    ({"n_layers": 6, "drop": ["2"]}, "not a whole number"),
    ({"n_layers": 6, "dropp": [2]}, "unknown field"),
    ({"drop": [2]}, "n_layers"),
    ({"n_layers": 6, "merge": [{"first": 1}]}, "\"first\" and \"last\""),
    ({"n_layers": 6, "drop": [1], "result": {"n_layers": 6}}, "\"result\" says 6"),
    ({"kind": "width", "n_layers": 6}, "not a depth plan"),
])
def test_plan_errors_name_cause_and_fix(bad: dict, needle: str) -> None:
    with pytest.raises(ValueError) as e:
        DepthPlan.from_dict(bad)
    assert needle in str(e.value) and "Fix:" in str(e.value)


def test_plan_for_another_model_is_refused() -> None:
    m = tiny_model(**TINY)
    with pytest.raises(ValueError, match="written for a 8-layer model"):
        apply_depth_plan(m, DepthPlan(n_layers=8, drop=(1,)))
