"""Every kind of model layerfold makes x every export format (hf, decilm, gguf): each cell exports and its consumer
reads back the logits of layerfold's forward (hf: transformers, no remote code, no missing or unexpected weights;
decilm: a reference written from vLLM's semantics and layerfold's own reader; gguf: a reference of llama.cpp's
llama/deci graph written here from its source, and transformers' GGUF reader where it applies), or it is refused
before anything is written, naming the cause and the formats that carry the model. Then the output paths (inside the
source, existing folders and files, read-only places) and bad weights (NaN, Inf, beyond fp16).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import layerfold
from layerfold.core.checkpoint import save_checkpoint
from layerfold.core.model import build_model
from layerfold.core.spec import LayerSpec, ModelSpec
from layerfold.interop.export import export
from layerfold.interop.formats import gguf_arch
from layerfold.surgery.depth import apply_depth_plan
from layerfold.surgery.plan import DepthPlan, Merge
from tests.support.decilm_ref import DeciLMReference
from tests.support.models import tiny_model, tiny_spec
from tests.support.tolerances import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

L = LayerSpec
V, D = 96, 32
IDS = torch.randint(0, V, (1, 19), generator=torch.Generator().manual_seed(0))  # longer than the sliding window (5)
FORMATS = ("hf", "decilm", "gguf")


def U(**kw) -> ModelSpec:
    """A uniform Llama: 32 wide, GQA 4/2 heads of 8, FFN 48, three layers."""
    return tiny_spec(**{"d_model": D, "n_layers": 3, "heads": 4, "kv_heads": 2, "ffn": 48, "vocab": V,
                        "max_position": 64, "rope_theta": 500.0, **kw})


def layers(*ls: LayerSpec, **kw) -> ModelSpec:
    return ModelSpec(vocab_size=V, d_model=D, layers=ls, max_position=64, rope_theta=500.0, **kw).validate()


DEC, MLP, ATT = L(D, D, D, 4, 2, 8, 48), L(D, D, D, d_ffn=40, has_attn=False, kind="mlp"), \
    L(D, D, D, 4, 2, 8, 0, has_mlp=False)
COME = (DEC, L(D, D, D, 4, 1, 8, 256), L(D, D, D, 4, 4, 8, 24))  # 256: a width ffn_mult gives back exactly


def depth_pruned() -> layerfold.Model:
    return apply_depth_plan(tiny_model(U(n_layers=5), std=0.1, norm_gains=True),
                            DepthPlan(5, drop=(1,), merge=(Merge(2, 3),)))


def sliced(basis: str) -> layerfold.Model:
    from layerfold.methods.slicing import make_plan
    from layerfold.surgery.slicing import slice_model

    m = tiny_model(U(d_model=48, heads=4, head_dim=12, ffn=64), std=0.1, norm_gains=True)
    plan = make_plan(m.spec, 0.25, basis="global", keep_ends=False) if basis == "global" else make_plan(m.spec, 0.25)
    return slice_model(m, torch.randint(0, V, (8, 16), generator=torch.Generator().manual_seed(1)), plan)[0]


NONE_CARRY = r"no export format carries it: run it with layerfold itself"
# name -> (spec or model builder, {format: None (exports) | what its refusal must say}, expected HF class)
CASES = {
    "dense-tied": (U(tie=True), {}, "LlamaForCausalLM"),
    "dense-untied": (U(), {}, "LlamaForCausalLM"),
    "depth-pruned": (depth_pruned, {}, "LlamaForCausalLM"),
    "streamline-mlp": (U(n_layers=4, mlp_blocks=(2,)), {
        "hf": r"MLP replacement block.*--format decilm \(or gguf\).*--replacement decoder"}, None),
    "mlp-first-layer": (U(mlp_blocks=(0,)), {"hf": r"MLP replacement block.*--format gguf",
                                             "decilm": r"layer 0 has no attention.*--format gguf"}, None),
    "attention-only": (layers(DEC, ATT, DEC), {"hf": r"layer 1 lacks an MLP.*--format decilm",
                                               "gguf": r"attention-only.*dropped.*--format decilm"}, None),
    "all-attention-only": (layers(ATT, ATT), {"hf": r"lacks an MLP.*--format decilm",
                                              "gguf": r"attention-only.*--format decilm"}, None),
    "come-widths-kv": (layers(*COME), {"hf": r"layer 1 has a different shape.*--format decilm \(or gguf\)"}, None),
    "slicegpt-shortcuts": (lambda: sliced("point"), dict.fromkeys(FORMATS, r"shortcut matrices.*" + NONE_CARRY +
                                                                 r".*--basis global --slice-ends"), None),
    "slicegpt-global": (lambda: sliced("global"), {}, "LlamaForCausalLM"),
    "qwen2": (U(arch="qwen2", qkv_bias=True), {}, "Qwen2ForCausalLM"),
    "qwen2-come": (layers(*COME, arch="qwen2", qkv_bias=True), {"hf": r"different shape.*--format decilm;",
                                                                 "gguf": r"q/k/v biases.*--format decilm;"}, None),
    "qwen3": (U(arch="qwen3", qk_norm=True, head_dim=16), {"decilm": r"normalises q and k.*--format hf \(or gguf\)"},
              "Qwen3ForCausalLM"),
    "qwen3-come": (layers(*COME, arch="qwen3", qk_norm=True), dict.fromkeys(
        ("hf", "decilm", "gguf"), r"(different shape|normalises q and k|q/k norms).*" + NONE_CARRY), None),
    "qwen3+bias": (U(arch="qwen3", qk_norm=True, qkv_bias=True), {
        "hf": "combines q/k/v biases and q/k norms.*" + NONE_CARRY, "decilm": "normalises q and k.*" + NONE_CARRY,
        "gguf": "both q/k/v biases and q/k norms.*" + NONE_CARRY}, None),
    "mistral-window": (U(arch="mistral", sliding_window=5), {"decilm": r"sliding-window.*--format hf;",
                                                             "gguf": r"sliding-window.*--format hf;"},
                       "MistralForCausalLM"),
    "llama3-rope": (U(rope_type="llama3", rope_factor=8.0, rope_original_max_pos=16), {}, "LlamaForCausalLM"),
    "linear-rope": (U(rope_type="linear", rope_factor=4.0), {}, "LlamaForCausalLM"),
    "llama3-rope-come": (layers(*COME, rope_type="llama3", rope_factor=8.0, rope_original_max_pos=16),
                         {"hf": r"different shape.*--format decilm \(or gguf\)"}, None),
    "linear-rope-mlp": (layers(DEC, MLP, DEC, rope_type="linear", rope_factor=2.0),
                        {"hf": r"MLP replacement block.*--format decilm \(or gguf\)"}, None),
    # a spec's family and its attention features disagree (a ModelSpec built by hand): the export picks the class
    # that computes that attention (these four were written as the family's class, with wrong logits)
    "llama+qkv-bias": (U(qkv_bias=True), {}, "Qwen2ForCausalLM"),
    "llama+window": (U(sliding_window=5), {"decilm": r"sliding-window.*--format hf;",
                                           "gguf": r"sliding-window.*--format hf;"}, "MistralForCausalLM"),
    "llama+qk-norm": (U(qk_norm=True), {"decilm": r"normalises q and k.*--format hf \(or gguf\)"}, "Qwen3ForCausalLM"),
    "qwen3-no-qk-norm": (U(arch="qwen3"), {}, "LlamaForCausalLM"),
    "qwen2-no-bias": (U(arch="qwen2"), {}, "Qwen2ForCausalLM"),  # zero biases written: none left to initialise
    "qwen2+window": (U(arch="qwen2", qkv_bias=True, sliding_window=5), {
        "hf": r"combines q/k/v biases and sliding-window(?!.*prune with).*" + NONE_CARRY,
        "decilm": "sliding-window.*" + NONE_CARRY, "gguf": "sliding-window.*" + NONE_CARRY}, None),
}
CASES["yarn-rope"] = (U(rope_type="yarn", rope_factor=4.0, rope_original_max_pos=16,
                        rope_attention_factor=0.1 * math.log(4.0) + 1), {}, "LlamaForCausalLM")
CASES["qwen3-yarn"] = (U(arch="qwen3", qk_norm=True, rope_type="yarn", rope_factor=4.0, rope_original_max_pos=16,
                         rope_attention_factor=0.1 * math.log(4.0) + 1), {"decilm": r"normalises q and k"},
                       "Qwen3ForCausalLM")
CASES["yarn-odd"] = (U(rope_type="yarn", rope_factor=4.0, rope_original_max_pos=16, rope_attention_factor=0.7),
                     {"gguf": r"YaRN scaling sets rope_attention_factor.*--format hf \(or decilm\)"},
                     "LlamaForCausalLM")
CASES["qwen2-llama3-rope"] = (U(arch="qwen2", qkv_bias=True, rope_type="llama3", rope_factor=8.0,
                                rope_original_max_pos=16), {"gguf": r"Llama-3 rope scaling.*--format hf"},
                              "Qwen2ForCausalLM")


def _model(case: str, dtype: torch.dtype = torch.float32) -> layerfold.Model:
    what = CASES[case][0]
    return (tiny_model(what, std=0.1, norm_gains=True) if isinstance(what, ModelSpec) else what()).to(dtype).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[layerfold.Model, Path]]:
    """Each case's model in a dtype, saved once on first use."""
    root, made = tmp_path_factory.mktemp("matrix"), {}

    def get(case: str, dtype: torch.dtype = torch.float32) -> tuple[layerfold.Model, Path]:
        if (case, dtype) not in made:
            m = _model(case, dtype)
            made[case, dtype] = m, save_checkpoint(root / f"{case}-{str(dtype)[6:]}", m.spec, m.state_dict())
        return made[case, dtype]
    return get


# ---- llama.cpp's graph, from its source (src/models/llama.cpp, src/models/deci.cpp) -----------------------------
def llama_cpp_logits(path: Path, ids: list[int]) -> torch.Tensor:
    """Logits (T, V) in float64 from the GGUF file as llama.cpp computes them: weights as stored (q/k rows in its
    adjacent-pair rotary layout), per-layer head counts and FFN lengths, 0 heads = no attention and no residual add of
    its own, an FFN length of 0 = the layer is skipped (``continue``), rotary frequencies from rope.freq_base,
    rope.scaling.factor (freq_scale = 1/factor) and the rope_freqs tensor; the head is token_embd without output."""
    import gguf

    r = gguf.GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()

    def key(k: str, default=None):
        f = r.fields.get(f"{arch}.{k}")
        return default if f is None else f.contents()
    n = key("block_count")
    heads, kvs, ffs = ([*v] if isinstance(v, list) else [v] * n for v in map(key, (
        "attention.head_count", "attention.head_count_kv", "feed_forward_length")))
    hd, eps = key("attention.key_length"), key("attention.layer_norm_rms_epsilon")
    w = {t.name: torch.from_numpy(np.array(gguf.dequantize(t.data, t.tensor_type), dtype=np.float64))
         .reshape([int(x) for x in reversed(t.shape)]) for t in r.tensors}
    base = key("rope.freq_base") ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    scale, mscale = 1 / key("rope.scaling.factor", 1.0), 1.0
    if key("rope.scaling.type") == "yarn":  # ggml_rope_yarn: a ramp between the corrected dims, and mscale
        def corr(rot: float) -> float:
            return hd * math.log(key("rope.scaling.original_context_length") / (rot * 2 * math.pi)) / (
                2 * math.log(key("rope.freq_base")))
        lo, hi = max(0, math.floor(corr(32))), min(hd - 1, math.ceil(corr(1)))
        keep = 1 - ((torch.arange(hd // 2, dtype=torch.float64) - lo) / max(0.001, hi - lo)).clamp(0, 1)
        freqs = base * scale * (1 - keep) + base * keep
        mscale = 1 + 0.1 * math.log(1 / scale)
    else:
        freqs = base * scale / w.get("rope_freqs.weight", torch.ones(1, dtype=torch.float64))
    T = len(ids)
    ang = torch.arange(T, dtype=torch.float64)[:, None, None] * freqs  # (T, 1, hd/2)
    cos, sin = ang.cos() * mscale, ang.sin() * mscale
    neox = arch in ("qwen2", "qwen3")

    def rope(x: torch.Tensor) -> torch.Tensor:  # NORM: pairs (x[2i], x[2i+1]); NEOX (qwen): (x[i], x[i + hd/2])
        if neox:
            x0, x1 = x[..., :hd // 2], x[..., hd // 2:]
            return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)

    def rms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g
    h = w["token_embd.weight"][torch.tensor(ids)]
    for i in range(n):
        blk = {k[len(f"blk.{i}."):]: v for k, v in w.items() if k.startswith(f"blk.{i}.")}

        def b(n: str, blk: dict = blk) -> torch.Tensor:
            return blk[n + ".weight"]

        def proj(x: torch.Tensor, n: str, heads: int, blk: dict = blk) -> torch.Tensor:  # (+ bias, + norm: qwen)
            y = (x @ blk[n + ".weight"].T + blk.get(n + ".bias", 0)).view(T, heads, hd)
            return rms(y, blk[n + "_norm.weight"]) if n + "_norm.weight" in blk else y
        cur = h
        if heads[i]:
            x = rms(h, b("attn_norm"))
            q = rope(proj(x, "attn_q", heads[i]))
            k, v = rope(proj(x, "attn_k", kvs[i])), proj(x, "attn_v", kvs[i])
            k, v = k.repeat_interleave(heads[i] // kvs[i], 1), v.repeat_interleave(heads[i] // kvs[i], 1)
            s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
            p = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
            cur = torch.einsum("hqk,khd->qhd", p, v).reshape(T, -1) @ b("attn_output").T + h
        if ffs[i] == 0:
            continue
        x = rms(cur, b("ffn_norm"))
        h = cur + (F.silu(x @ b("ffn_gate").T) * (x @ b("ffn_up").T)) @ b("ffn_down").T
    return rms(h, w["output_norm.weight"]) @ w.get("output.weight", w["token_embd.weight"]).T


# ---- one cell ----------------------------------------------------------------------------------------------------
def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def assert_refused(src: Path, out: Path, pattern: str, **kw) -> str:
    """export(src, out) raises a ValueError matching ``pattern`` with a Fix, and nothing under out's parent changed."""
    before = tree(out.parent)
    with pytest.raises(ValueError) as e:
        export(src, out, **kw)
    msg = str(e.value)
    assert "Fix:" in msg and re.search(pattern, msg), msg
    assert tree(out.parent) == before and not out.exists()
    return msg


def reference(m: layerfold.Model) -> torch.Tensor:
    """layerfold's forward in float32 on the model's own (possibly rounded) weights."""
    with torch.no_grad():
        return build_model(m.spec, {k: v.float() for k, v in m.state_dict().items()}).eval()(IDS)[0]


def check_consumers(fmt: str, info: dict, m: layerfold.Model, hf_class: str | None) -> None:
    out, want, spec = Path(info["out"]), reference(m), m.spec
    if fmt == "hf":
        from transformers import AutoModelForCausalLM

        hf, load = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
        assert not any(load.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), load
        assert type(hf).__name__ == hf_class == info["architecture"]
        with torch.no_grad():
            assert_close(hf.eval()(IDS).logits[0], want, torch.float32, "transformers")
    elif fmt == "decilm":
        back, _ = layerfold.load(out, tokenizer=False, dtype=torch.float32)
        with torch.no_grad():
            assert_close(back(IDS)[0], want, torch.float32, "layerfold reading the decilm export")
        cfg = json.loads((out / "config.json").read_text())
        assert cfg.get("rope_scaling", {}).get("rope_type", "default") == spec.rope_type
        if spec.rope_type == "default":  # the reference knows plain rotary embeddings only
            assert_close(DeciLMReference(out)(IDS[0]), want, torch.float32, "vLLM-semantics reference")
    else:
        assert info["architecture"] == gguf_arch(spec)
        got = llama_cpp_logits(Path(info["file"]), IDS[0].tolist())
        assert_close(got, want, torch.float32, "llama.cpp's graph on the GGUF file")
        if spec.uniform and spec.rope_type == "default" and info["architecture"] != "qwen3":  # (verify.py says why)
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
            with torch.no_grad():
                assert_close(hf(IDS).logits[0], want, torch.float32, "transformers' GGUF reader")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(CASES))
def test_cell(tmp_path: Path, checkpoints, case: str, fmt: str) -> None:
    m, ckpt = checkpoints(case)
    refusal, hf_class = CASES[case][1].get(fmt), CASES[case][2]
    if refusal is not None:
        msg = assert_refused(ckpt, tmp_path / "out", refusal, format=fmt)
        assert f"cannot be exported as {fmt}" in msg
        return
    info = export(ckpt, tmp_path / "out", format=fmt, verify=True)
    assert info["verify"]["max_rel_diff"] < 1e-4 and info["layers"] == m.spec.n_layers
    check_consumers(fmt, info, m, hf_class)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case,fmt", [("dense-untied", "hf"), ("streamline-mlp", "decilm"), ("dense-tied", "gguf"),
                                      ("come-widths-kv", "gguf")])
def test_half_precision_weights(tmp_path: Path, checkpoints, case: str, fmt: str, dtype: torch.dtype) -> None:
    """fp16/bf16 checkpoints export in their own dtype (the tensors say so) with the logits of their rounded weights."""
    import gguf
    from safetensors import safe_open

    m, ckpt = checkpoints(case, dtype)
    info = export(ckpt, tmp_path / "out", format=fmt, verify=True)
    name = str(dtype).removeprefix("torch.")
    assert info["dtype"] == name and info["verify"]["max_rel_diff"] < 1e-4
    if fmt == "gguf":
        kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(info["file"]).tensors}
        assert kinds["blk.0.ffn_up.weight"] == {"float16": "F16", "bfloat16": "BF16"}[name]
    else:
        with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
    check_consumers(fmt, info, m, CASES[case][2])


# ---- bad weights -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights_are_refused_before_writing(tmp_path: Path, fmt: str, bad: float) -> None:
    m = tiny_model(U(), std=0.1)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    state["layers.1.mlp.up.weight"][3, 5] = bad
    ckpt = save_checkpoint(tmp_path / "ck", m.spec, state)
    assert_refused(ckpt, tmp_path / "out", r"'layers.1.mlp.up.weight' holds NaN or Inf.*--allow-nonfinite",
                   format=fmt)
    with pytest.warns(UserWarning, match="exported anyway"):
        assert export(ckpt, tmp_path / "out", format=fmt, allow_nonfinite=True)["layers"] == 3


@pytest.mark.parametrize("fmt", FORMATS)
def test_weights_beyond_float16_are_refused_for_a_float16_export(tmp_path: Path, fmt: str) -> None:
    m = tiny_model(U(), std=0.1)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    state["layers.0.attn.v.weight"][0, 0] = 1e5  # the cast would make it Inf
    ckpt = save_checkpoint(tmp_path / "ck", m.spec, state)
    assert_refused(ckpt, tmp_path / "out", r"'layers.0.attn.v.weight' holds values up to 1e\+05.*--dtype bfloat16",
                   format=fmt, dtype="float16")
    assert export(ckpt, tmp_path / "out", format=fmt, dtype="bfloat16", verify=True)["dtype"] == "bfloat16"


# ---- where the export goes ---------------------------------------------------------------------------------------
@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "ck", (m := tiny_model(U(), std=0.1)).spec, m.state_dict())


@pytest.mark.parametrize("fmt", FORMATS)
def test_output_paths_are_checked_before_anything_is_written(tmp_path: Path, ckpt: Path, fmt: str) -> None:
    (mine := tmp_path / "mine").mkdir()
    (mine / "notes.txt").write_text("keep me")
    (tmp_path / "file").write_text("keep me too")
    other = save_checkpoint(tmp_path / "other", (m := tiny_model(U(n_layers=1))).spec, m.state_dict())  # a checkpoint
    src_files = {p: p.read_bytes() for d in (ckpt, other) for p in d.iterdir()}
    for out, pattern, kw in [
        (ckpt / "sub", r"refusing to write over, inside or around the source", {}),
        (ckpt, r"refusing to write over, inside or around the source", {"overwrite": True}),
        (mine, r"already exists. Fix: choose a new --out or pass --overwrite", {}),
        (mine, r"was not written by layerfold, so --overwrite will not replace it", {"overwrite": True}),
        (other, r"is not an earlier export .*so --overwrite will not replace it", {"overwrite": True}),
        (tmp_path / "file", r"exists and is a file", {"overwrite": True}),
        (tmp_path / "file" / "out", r"is a file, not a directory", {}),
        (tmp_path / "pruned.gguf", r"--out names a .gguf file.*--out .*pruned \(the gguf format writes", {}),
    ]:
        before = tree(tmp_path)
        with pytest.raises(ValueError, match=pattern) as e:
            export(ckpt, out, format=fmt, **kw)
        assert "Fix:" in str(e.value) and tree(tmp_path) == before
    assert (mine / "notes.txt").read_text() == "keep me" and (tmp_path / "file").read_text() == "keep me too"
    assert {p: p.read_bytes() for d in (ckpt, other) for p in d.iterdir()} == src_files
    with pytest.raises(ValueError, match=r"cannot write in /proc.*Fix: choose a --out in a folder you can write"):
        export(ckpt, "/proc/layerfold-export-test", format=fmt)  # read-only for every user, root included
    info = export(ckpt, tmp_path / "new" / "deeper", format=fmt)  # missing parents are made
    again = export(ckpt, info["out"], format=fmt, overwrite=True)  # an export of layerfold's own is replaced
    assert again["out"] == info["out"] and not [p for p in (tmp_path / "new").iterdir() if p.name != "deeper"]


def test_cli_refusal_and_allow_nonfinite(tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    from layerfold.cli.main import main

    m = tiny_model(U(mlp_blocks=(1,)), std=0.1)
    mlp = save_checkpoint(tmp_path / "mlp", m.spec, m.state_dict())
    assert main(["export", str(mlp), "--format", "hf", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "MLP replacement block" in err and "--format decilm" in err and not (tmp_path / "o").exists()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    state["norm.weight"][0] = float("nan")
    bad = save_checkpoint(tmp_path / "bad", m.spec, state)
    assert main(["export", str(bad), "--format", "gguf", "--out", str(tmp_path / "g")]) == 2
    assert "--allow-nonfinite" in capsys.readouterr().err and not (tmp_path / "g").exists()
    with pytest.warns(UserWarning):
        assert main(["export", str(bad), "--format", "gguf", "--out", str(tmp_path / "g"), "--allow-nonfinite"]) == 0
    assert "no tokenizer" in capsys.readouterr().out


# ---- GGUF files read back by layerfold's own GGUF import ---------------------------------------------------------
def byte_bpe(vocab: int = 300):
    """A tiny byte-level BPE tokenizer (what the GGUF export converts from tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(["The capital of France is Paris. def fibonacci(n): return n"] * 9, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LAYERFOLD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def gguf_with_tokenizer(tmp_path: Path, spec: ModelSpec) -> tuple[layerfold.Model, object, dict]:
    tok = byte_bpe()
    m = tiny_model(spec, std=0.1, norm_gains=True)
    ck = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict(), tokenizer=tok)
    return m, tok, export(ck, tmp_path / "g", format="gguf", verify=True)


def test_llama_gguf_loads_back_in_layerfold(tmp_path: Path, cache: Path) -> None:
    m, tok, info = gguf_with_tokenizer(tmp_path, U(vocab=300, tie=True, bos_token_id=0, eos_token_ids=(1,)))
    assert info["tokenizer_source"] == "tokenizer.json" and "note" not in info
    back, tok2 = layerfold.load(info["file"])
    text = "The capital of France is"
    assert tok2(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert_close(back(ids), m(ids), torch.float32, "layerfold's GGUF import")


def test_gguf_without_tokenizer_says_so_and_still_loads_in_llama_cpp(tmp_path: Path, ckpt: Path, cache: Path) -> None:
    """llama.cpp refuses a file without tokenizer.ggml.model; "none" is its vocabulary-free model (token ids)."""
    import gguf

    info = export(ckpt, tmp_path / "g", format="gguf")
    assert not info["tokenizer"] and "no tokenizer" in info["note"] and "Fix:" in info["note"]
    r = gguf.GGUFReader(info["file"])
    assert r.fields["tokenizer.ggml.model"].contents() == "none" and r.fields["llama.vocab_size"].contents() == V
    with pytest.raises(ValueError, match="tokenizer"):  # layerfold's import needs a tokenizer (names it)
        layerfold.load(info["file"])


def test_deci_gguf_is_refused_by_layerfold_import_naming_the_arch(tmp_path: Path, cache: Path) -> None:
    _, _, info = gguf_with_tokenizer(tmp_path, tiny_spec(d_model=D, n_layers=3, heads=4, kv_heads=2, ffn=48, vocab=300,
                                                         mlp_blocks=(1,)))
    assert info["architecture"] == "deci"
    with pytest.raises(ValueError, match="deci"):
        layerfold.load(info["file"])


def test_rope_scaled_gguf_loads_back_in_layerfold(tmp_path: Path, cache: Path) -> None:
    m, tok, info = gguf_with_tokenizer(tmp_path, U(vocab=300, rope_type="llama3", rope_factor=8.0,
                                                   rope_original_max_pos=16))
    back, _ = layerfold.load(info["file"])
    ids = torch.tensor([tok("The capital of France is Paris.")["input_ids"]])
    with torch.no_grad():
        assert_close(back(ids), m(ids), torch.float32, "layerfold's import of a rope-scaled GGUF")
