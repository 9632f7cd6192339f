"""CoMe: sensitivity formulas, the GQA head mapping of the concatenation merge, shapes, and the method end to end."""

from __future__ import annotations

import math

import pytest
import torch

from layerfold.methods import PruneContext, Target, get_method
from layerfold.methods.come import (
    MergeStep,
    apply_come,
    attn_group_sensitivity,
    ffn_sensitivity,
    merge_step,
    pair_distances,
    query_heads,
    split_counts,
)
from tests.support.models import tiny_model
from tests.support.tolerances import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")



# 16 wide, GQA 4/2 heads of 4, FFN 24, vocab 61, tied; N(0, 0.2) weights
TINY = dict(d_model=16, heads=4, kv_heads=2, head_dim=4, ffn=24, vocab=61, tie=True, std=0.2)


def test_ffn_sensitivity_formula():
    abs_sum = torch.tensor([2.0, 4.0, 0.0])
    w_down = torch.tensor([[1.0, -1.0, 5.0], [-2.0, 0.5, 5.0]])  # (d_out=2, d_ffn=3); column L1: 3, 1.5, 10
    got = ffn_sensitivity(abs_sum, 2, w_down)
    torch.testing.assert_close(got, torch.tensor([1.0 * 3, 2.0 * 1.5, 0.0], dtype=torch.float64))


def test_attn_group_sensitivity_formula():
    # 4 query heads of head_dim 2, 2 KV heads (group size 2): group 0 = heads 0,1 = channels 0..3
    o_abs = torch.arange(1.0, 9.0)  # channel c: sum |o_c| = c + 1 over 4 tokens -> mean (c+1)/4
    w_o = torch.ones(3, 8)
    w_o[:, 5] = -2.0  # column L1 norm 3, channel 5 has 6
    col = torch.full((8,), 3.0)
    col[5] = 6.0
    per = (o_abs / 4) * col
    want = torch.stack([per[:4].sum(), per[4:].sum()]).double()
    torch.testing.assert_close(attn_group_sensitivity(o_abs, 4, w_o, 2), want)


def test_pair_distance_and_split():
    cw = torch.tensor([[0.9, 1.0], [0.9, 0.0], [0.9, math.nan]], dtype=torch.float64)  # cos(h_i, h_{i+2}) column 1
    d = pair_distances(cw)
    assert d.tolist() == [0.0, 0.5]
    assert split_counts(0.1, 0.3, 3) == (0, 0.25)
    assert split_counts(0.3, 0.1, 1536)[0] == 1152
    assert split_counts(0.0, 0.0, 3)[0] == 1
    assert query_heads([1, 0], 3) == [3, 4, 5, 0, 1, 2]


def _label(m: torch.nn.Module) -> None:
    """Make every head identifiable: q rows of head h in layer i hold 100 i + h, k/v rows of KV head g hold
    100 i + 10 + g, o columns of head h hold 100 i + 50 + h; FFN channel c holds 1000 + 100 i + c."""
    with torch.no_grad():
        for i, blk in enumerate(m.layers):
            a, hd = blk.attn, blk.attn.hd
            for h in range(a.n_heads):
                a.q.weight[h * hd:(h + 1) * hd] = 100 * i + h
                a.o.weight[:, h * hd:(h + 1) * hd] = 100 * i + 50 + h
            for g in range(a.n_kv):
                a.k.weight[g * hd:(g + 1) * hd] = 100 * i + 10 + g
                a.v.weight[g * hd:(g + 1) * hd] = 100 * i + 20 + g
            for c in range(blk.mlp.gate.weight.shape[0]):
                blk.mlp.gate.weight[c] = 1000 + 100 * i + c
                blk.mlp.down.weight[:, c] = 1000 + 100 * i + c


@pytest.mark.parametrize("kv_a,kv_b", [([1], [0]), ([0], [1]), ([], [0, 1]), ([1, 0][:1], [1])])
def test_gqa_query_heads_stay_with_their_kv_head(kv_a, kv_b):
    m = tiny_model(**TINY, n_layers=4)  # group size 2: heads 0,1 -> KV 0; heads 2,3 -> KV 1 (h mod 2 would differ)
    _label(m)
    step = MergeStep(a=1, stands_for=[1, 2], distance=0.1, r_a=0.5, kv_a=kv_a, kv_b=kv_b,
                     ffn_a=list(range(0, 24, 2)), ffn_b=list(range(1, 24, 2)))
    new = merge_step(m, step)
    a = new.layers[1].attn
    G, hd = a.n_heads // a.n_kv, a.hd
    for h in range(a.n_heads):
        q = a.q.weight[h * hd, 0].item()
        src_layer, src_head = divmod(int(q), 100)
        kv = int(a.k.weight[(h // G) * hd, 0].item())  # the KV head this query head reads after the merge
        assert divmod(kv, 100) == (src_layer, 10 + src_head // G), f"query head {h} lost its KV head"
        assert int(a.v.weight[(h // G) * hd, 0].item()) == 100 * src_layer + 20 + src_head // G
        assert int(a.o.weight[0, h * hd].item()) == 100 * src_layer + 50 + src_head
    layers_used = [int(a.k.weight[g * hd, 0].item()) // 100 for g in range(a.n_kv)]
    assert layers_used == [1] * len(kv_a) + [2] * len(kv_b)
    gate, down = new.layers[1].mlp.gate.weight[:, 0], new.layers[1].mlp.down.weight[0]
    assert torch.equal(gate, down)  # FFN channel c keeps its own gate row and down column
    assert gate[:12].tolist() == [1100 + c for c in range(0, 24, 2)]
    assert gate[12:].tolist() == [1200 + c for c in range(1, 24, 2)]


def test_merged_layer_has_original_shape_and_norms_average():
    m = tiny_model(**TINY, n_layers=3, qkv_bias=True, qk_norm=True)
    with torch.no_grad():
        m.layers[0].attn_norm.weight.fill_(1.0)
        m.layers[1].attn_norm.weight.fill_(3.0)
        m.layers[0].attn.q_norm.weight.fill_(2.0)
        m.layers[1].attn.q_norm.weight.fill_(4.0)
    step = MergeStep(a=0, stands_for=[0, 1], distance=0.1, r_a=0.5, kv_a=[1], kv_b=[0],
                     ffn_a=list(range(12)), ffn_b=list(range(12, 24)))
    new = merge_step(m, step)
    assert new.spec.n_layers == 2 and new.spec.layers[0] == m.spec.layers[0]
    want = {k: v.shape for k, v in m.layers[0].state_dict().items()}
    assert {k: v.shape for k, v in new.layers[0].state_dict().items()} == want
    assert torch.all(new.layers[0].attn_norm.weight == 2.0) and torch.all(new.layers[0].attn.q_norm.weight == 3.0)
    assert torch.equal(new.layers[1].attn.q.weight, m.layers[2].attn.q.weight)  # later layers shift down, copied
    assert new.layers[1].attn.q.weight.data_ptr() != m.layers[2].attn.q.weight.data_ptr()
    ids = torch.randint(0, 61, (2, 7))
    assert torch.isfinite(new(ids)).all()


def test_fold_norms_is_exact_for_a_pair_of_one_layer():
    """Merging a layer with itself (all groups/channels from a) under norms='fold' reproduces the layer."""
    m = tiny_model(**TINY, n_layers=2)
    with torch.no_grad():
        m.layers[0].attn_norm.weight.uniform_(0.5, 2.0)
        m.layers[0].mlp_norm.weight.uniform_(0.5, 2.0)
    step = MergeStep(a=0, stands_for=[0, 1], distance=0.0, r_a=1.0, kv_a=[0, 1], kv_b=[],
                     ffn_a=list(range(24)), ffn_b=[])
    new = merge_step(m, step, norms="fold")
    x = torch.randn(2, 5, 16)
    h, ropes, mask = m.prepare(torch.zeros(2, 5, dtype=torch.long))
    assert_close(new.run_layer(0, x, ropes, mask), m.run_layer(0, x, ropes, mask), torch.float32, "folded layer",
                 check_dtype=True)


def test_come_method_end_to_end_and_plan_replays():
    m = tiny_model(d_model=24, n_layers=6, heads=6, kv_heads=3, head_dim=4, ffn=32, vocab=61, tie=True, std=0.2, seed=1)
    calib = torch.randint(0, 61, (6, 24), generator=torch.Generator().manual_seed(0))
    ctx = PruneContext(model=m, tokenizer=None, source="tiny", target=Target.parse("2"), stats=None, calib=calib,
                       progress=False, options={"come_samples": 4})
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = get_method("come").fn(ctx)
    assert res.model.spec.n_layers == 4
    assert sorted(i for g in res.layer_map for i in g) == list(range(6))  # every original layer accounted for
    assert res.changed_layers == [j for j, g in enumerate(res.layer_map) if len(g) > 1]
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # the source is untouched
    replay = apply_come(m, res.plan)
    assert all(torch.equal(a, b) for a, b in zip(replay.state_dict().values(), res.model.state_dict().values(),
                                                 strict=True))
    for s in res.plan["steps"]:
        assert len(s["kv_a"]) + len(s["kv_b"]) == 3 and len(s["ffn_a"]) + len(s["ffn_b"]) == 32
