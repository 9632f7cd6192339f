"""SliceGPT / Dynamic Slicing: rotation exactness, slicing mechanics, plans, save/reload/generate."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch

from layerfold.core.checkpoint import save_checkpoint
from layerfold.core.loading import load
from layerfold.core.model import KVCache, Model
from layerfold.methods import get_method
from layerfold.methods.base import PruneContext, Target
from layerfold.methods.slicing import add_args, dynamic_fractions, make_plan
from layerfold.surgery.slicing import SlicePlan, count_params, plan_widths, point_dims, slice_model, sliced_spec
from tests.support.models import tiny_model, tiny_spec
from tests.support.tolerances import assert_close

V, D = 61, 40


# 40 wide, GQA 4/2 heads of 10, FFN 72; every parameter from one generator: norm gains
# U(0.5, 1.5) (folding must handle non-trivial gains), the embedding N(0, 1), the rest N(0, 0.1)
TINY = dict(vocab=V, d_model=D, heads=4, kv_heads=2, head_dim=10, ffn=72, one_generator=True, std=0.1, embed_std=1.0,
            norm_gains=True)
# each family's features ("llama" ties the embeddings); "streamline": a depth-pruned model, an MLP replacement
# block in the middle
ARCH = {"llama": dict(tie=True), "qwen2": dict(qkv_bias=True), "qwen3": dict(qk_norm=True),
        "streamline": dict(tie=True, mlp_blocks=(1,))}


def ids(n: int = 6, T: int = 17, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "streamline"])
@pytest.mark.parametrize("keep_ends", [False, True])
def test_rotation_without_slicing_is_exact(arch: str, keep_ends: bool) -> None:
    m = tiny_model(**TINY, **ARCH[arch], n_layers=3)
    x = ids()
    s, info = slice_model(m, x, SlicePlan(widths=tuple(point_dims(m.spec)), keep_ends=keep_ends), batch_size=4)
    with torch.no_grad():
        assert_close(s(x), m(x), torch.float32, f"{arch} keep_ends={keep_ends}: rotated vs dense logits")
    assert s.spec.tie_embeddings == (m.spec.tie_embeddings and keep_ends)
    for l in s.spec.layers:  # an attention-free block keeps its input basis: no attention shortcut
        assert l.attn_shortcut == l.has_attn and l.mlp_shortcut
    assert info["params"]["total"] == s.num_params()


@pytest.mark.parametrize("basis", ["layer", "global"])
@pytest.mark.parametrize("keep_ends", [False, True])
def test_shared_bases_rotate_exactly_and_drop_shortcuts(basis: str, keep_ends: bool) -> None:
    m, x = tiny_model(**TINY, n_layers=4, tie=True), ids()
    s, _ = slice_model(m, x, SlicePlan(widths=tuple(point_dims(m.spec)), keep_ends=keep_ends, basis=basis))
    with torch.no_grad():
        assert_close(s(x), m(x), torch.float32, "rotated vs dense logits")
    assert not any(l.attn_shortcut for l in s.spec.layers)
    mlp_sc = [l.mlp_shortcut for l in s.spec.layers]
    if basis == "layer":
        assert all(mlp_sc)
    else:  # only the entry into / exit from the dense basis at kept ends needs a matrix
        assert mlp_sc == ([True, False, False, True] if keep_ends else [False] * 4)
    sl, _ = slice_model(m, x, make_plan(m.spec, 0.25, basis=basis, keep_ends=keep_ends))
    assert not any(l.attn_shortcut for l in sl.spec.layers)
    with torch.no_grad():
        assert torch.isfinite(sl(x)).all()


@pytest.mark.parametrize("dynamic", [False, True])
def test_slicing_to_full_width_is_exact(dynamic: bool) -> None:
    m = tiny_model(**TINY, n_layers=3, tie=True)
    x = ids()
    plan = make_plan(m.spec, 0.0, lr=[0.1, 0.9, 0.5] if dynamic else None, base=0.0, keep_ends=False)
    assert plan.widths == tuple(point_dims(m.spec))
    s, _ = slice_model(m, x, plan)
    with torch.no_grad():
        assert_close(s(x), m(x), torch.float32, "sliced to full width vs dense logits")


def low_rank(r: int = 16) -> Model:
    """A model whose residual stream lives in an r-dim subspace: slicing to r loses nothing."""
    m = tiny_model(**TINY, n_layers=3, tie=True, seed=3)
    P = torch.linalg.qr(torch.randn(D, r, generator=torch.Generator().manual_seed(4)))[0]  # (D, r)
    with torch.no_grad():
        m.embed.weight.copy_(m.embed.weight @ P @ P.T)
        for b in m.layers:
            b.attn.o.weight.copy_(P @ P.T @ b.attn.o.weight)
            b.mlp.down.weight.copy_(P @ P.T @ b.mlp.down.weight)
    return m


@pytest.mark.parametrize("keep_ends", [False, True])
def test_norm_scale_makes_slicing_an_exact_subspace(keep_ends: bool) -> None:
    """Slicing a rank-16 residual to 16 dims is exact only with sqrt(d/w) folded after the norm."""
    m, x = low_rank(16), ids()
    widths = plan_widths(m.spec, [1 - 16 / D] * 3, multiple=8, keep_ends=keep_ends)
    assert set(widths[1:-1]) == {16}
    out = {}
    with torch.no_grad():
        dense = m(x)
        for ns in (True, False):
            s, _ = slice_model(m, x, SlicePlan(widths=widths, keep_ends=keep_ends, norm_scale=ns, pca_tokens="all"))
            out[ns] = s(x)
    assert_close(out[True], dense, torch.float32, "sliced to the rank with the norm scale vs dense")
    errs = {ns: rel(o, dense) for ns, o in out.items()}
    assert errs[False] > 100 * errs[True], errs


def test_pca_uses_the_sliced_prefix() -> None:
    """Every point's basis diagonalises the *sliced* model's own Gram there (not the dense model's)."""
    m, x = tiny_model(**TINY, n_layers=4, tie=True), ids(8, 16)
    plan = SlicePlan(widths=plan_widths(m.spec, [0.4] * 4, multiple=8, keep_ends=False), keep_ends=False,
                     pca_tokens="all")
    s, _ = slice_model(m, x, plan, batch_size=3)
    with torch.no_grad():
        h, ropes, mask = s.prepare(x)
        for i in range(s.spec.n_layers):
            taps: dict[str, torch.Tensor] = {}
            h = s.run_layer(i, h, ropes, mask, taps=taps)
            for name in ("attn_in", "mlp_in"):
                z = taps[name].reshape(-1, taps[name].shape[-1]).double()
                g = z.T @ z
                off = (g - torch.diag(g.diagonal())).abs().max() / g.diagonal().max()
                assert off < 1e-4, f"layer {i} {name}: off-diagonal {off:.2e}"
                assert (g.diagonal()[:-1] >= g.diagonal()[1:] - 1e-6 * g.diagonal()[0]).all()


def test_sliced_model_saves_reloads_and_generates(tmp_path) -> None:
    m, x = tiny_model(**TINY, n_layers=3, tie=True), ids()
    plan = SlicePlan(widths=plan_widths(m.spec, [0.25] * 3, multiple=8, keep_ends=False), keep_ends=False)
    s, _ = slice_model(m, x, plan)
    out = save_checkpoint(tmp_path / "sliced", s.spec, s.state_dict(), provenance={"method": "slicegpt"})
    r, _ = load(out, tokenizer=False)
    assert r.spec == s.spec
    with torch.no_grad():
        assert_close(r(x), s(x), torch.float32, "reloaded vs sliced")
        prompt, n_new = x[:1, :5], 6
        cache = KVCache.allocate(r.spec, 1, 5 + n_new, "cpu", torch.float32)
        tok = r(prompt, cache=cache, last_only=True).argmax(-1)
        got = [int(tok)]
        for _ in range(n_new - 1):
            tok = r(tok, cache=cache, last_only=True).argmax(-1)
            got.append(int(tok))
        seq = prompt
        for _ in range(n_new):  # the same greedy loop without a cache
            seq = torch.cat([seq, r(seq)[:, -1:].argmax(-1)], dim=1)
    assert got == seq[0, 5:].tolist()


@pytest.mark.parametrize("multiple", [1, 8, 16])
@pytest.mark.parametrize("keep_ends", [False, True])
def test_widths_rounded_to_multiple(multiple: int, keep_ends: bool) -> None:
    spec = tiny_model(**TINY, n_layers=5, tie=True).spec
    fr = dynamic_fractions([0.2, 0.9, 0.95, 0.97, 0.5], 0.3, 0.05)
    for exact in (False, True):
        w = plan_widths(spec, fr, multiple=multiple, keep_ends=keep_ends, exact_mean=exact)
        inner = w[1:-1] if keep_ends else w
        assert all(v % multiple == 0 for v in inner), w
        if keep_ends:
            assert w[0] == w[-1] == D
        assert all(w[2 * i + 1] == w[2 * i + 2] for i in range(4))  # a layer's mid and output share a width
        if exact:
            mids = w[1::2]  # one per layer (the last output point may be kept dense)
            assert abs(sum(mids) / 5 - (1 - 0.3) * D) <= multiple / 2 / 5 + 1e-9


def test_dynamic_fractions_follow_the_formula() -> None:
    lr = [0.01, 0.82, 0.95, 0.97, 0.93, 0.11]
    sp, sb = 0.25, 0.1
    fs = dynamic_fractions(lr, sp, sb)
    t = torch.tensor(lr, dtype=torch.float64)
    n = (t - t.min()) / (t.max() - t.min())
    want = sb + (sp - sb) * n / n.mean()
    assert torch.allclose(torch.tensor(fs, dtype=torch.float64), want, atol=1e-12)
    assert abs(sum(fs) / len(fs) - sp) < 1e-12
    assert min(fs) == pytest.approx(sb)
    assert dynamic_fractions(lr, sp, sp) == pytest.approx([sp] * len(lr))  # SB = SP: constant slicing
    assert dynamic_fractions([0.5] * 4, sp, 0.0) == [sp] * 4


def test_dynamic_fractions_clip_and_renormalise() -> None:
    lr = [0.0, 0.1, 0.1, 0.1, 1.0]  # unclipped the last layer would get 1.92
    fs = dynamic_fractions(lr, 0.5, 0.0)
    assert max(fs) == pytest.approx(0.95)
    assert sum(fs) / len(fs) == pytest.approx(0.5, abs=1e-9)
    assert fs[1] == pytest.approx(fs[2]) and fs[0] == 0.0
    with pytest.raises(ValueError, match="Fix"):  # 9 layers at SB = 0 and one at 0.95 cannot average 0.5
        dynamic_fractions([0.0] * 9 + [1.0], 0.5, 0.0)
    with pytest.raises(ValueError, match="Fix"):
        dynamic_fractions(lr, 0.2, 0.3)


def test_dynamic_widths_mean_equals_target_on_smollm_shape() -> None:
    spec = tiny_spec(d_model=576, n_layers=30, heads=9, kv_heads=3, head_dim=64, ffn=1536, vocab=V)
    lr = [0.01, 0.82] + [0.93 + 0.001 * i for i in range(27)] + [0.11]
    for sp in (0.15, 0.25, 0.35):
        plan = make_plan(spec, sp, lr=lr, base=0.05, round_to=8, keep_ends=False)
        layer_w = plan.widths[2::2]
        assert all(v % 8 == 0 for v in layer_w)
        assert abs(1 - sum(layer_w) / (576 * 30) - sp) <= 8 / 576 / 30 + 1e-9


class _Stats(SimpleNamespace):
    pass


@pytest.mark.parametrize("name", ["slicegpt", "dynamic-slicing"])
def test_methods_through_the_registry(name: str) -> None:
    m, x = tiny_model(**TINY, n_layers=4, tie=True), ids()
    method = get_method(name)
    p = argparse.ArgumentParser()
    add_args(p)
    add_args(p)  # both methods register the same options on one parser
    opts = vars(p.parse_args(["--slicing-base", "0.05", "--round-to", "8"]))
    stats = _Stats(cos_window=torch.tensor([[0.1], [0.9], [0.8], [0.3]]))
    ctx = PruneContext(model=m, tokenizer=None, source="tiny", target=Target.parse("0.25"), stats=stats,
                       calib=x, options=opts, progress=False)
    res = method.fn(ctx)
    assert res.model.num_params() == res.info["params"]["total"]
    assert res.info["params"]["shortcuts"] > 0
    assert len(res.info["layer_widths"]) == 4 and res.layer_map == [[0], [1], [2], [3]]
    assert res.model.spec.tie_embeddings  # default keeps the ends: a tied head stays tied
    with torch.no_grad():
        assert torch.isfinite(res.model(x)).all()
    if name == "dynamic-slicing":
        assert res.plan["layer_fractions"][0] == pytest.approx(0.05)


def test_params_target_counts_shortcuts() -> None:
    m = tiny_model(**TINY, n_layers=4, tie=True)
    spec = m.spec
    build = lambda f: make_plan(spec, f, round_to=1)
    from layerfold.methods.slicing import resolve_fraction

    f = resolve_fraction(spec, Target.parse("params:0.1"), build)
    removed = 1 - count_params(sliced_spec(spec, build(f)))["total"] / count_params(spec)["total"]
    assert removed >= 0.1 and f > 0.1  # shortcuts cost parameters: slice more than 10% to remove 10%


@pytest.mark.slow
def test_rotation_is_exact_on_smollm2() -> None:
    m, _ = load("smollm2-135m", tokenizer=False)
    x = torch.randint(0, m.spec.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    s, _ = slice_model(m, x, SlicePlan(widths=tuple(point_dims(m.spec)), keep_ends=False))
    with torch.no_grad():
        assert_close(s(x), m(x), torch.float32, "smollm2-135m rotated vs dense logits")


@pytest.mark.parametrize("arch", ["llama", "streamline"])
def test_runtime_decodes_a_sliced_model_like_the_model(arch: str) -> None:
    """The lean runtime takes shortcut matrices and per-layer widths with no special path."""
    from layerfold.inference.runtime import Runtime

    m, x = tiny_model(**TINY, **ARCH[arch], n_layers=3), ids()
    s, _ = slice_model(m, x, make_plan(m.spec, 0.3, lr=[0.2, 0.9, 0.6], base=0.1, round_to=8))
    assert len({l.d_mid for l in s.spec.layers}) > 1  # really per-layer widths
    rt = Runtime(s, max_batch=1, max_len=16)
    prompt = x[0, :5].tolist()
    got = [rt.prefill([prompt])[0]]
    seq = list(prompt)
    for _ in range(3):
        seq.append(int(got[-1].argmax()))
        got.append(rt.decode([seq[-1]])[0])
    with torch.no_grad():
        want = s(torch.tensor([seq]))[0, 4:]
    assert_close(torch.stack(got), want, torch.float32, "runtime vs forward")
