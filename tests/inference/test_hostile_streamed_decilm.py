"""Hostile input to recently added code: the StreamedRuntime (generation with the weights in host memory) and how
generate(stream_to=) reaches it, hand-edited DeciLM block_configs, save_checkpoint's state and extra files, and
kernels.unit_rows' out/dtype. Each case is refused with its cause and fix before any work, and loses nothing."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import layerfold
from layerfold.core.checkpoint import load_checkpoint, save_checkpoint
from layerfold.core.spec import LayerSpec, ModelSpec
from layerfold.core.state import CheckpointError
from layerfold.inference.generate import generate
from layerfold.inference.streamed_decode import StreamedRuntime
from layerfold.interop.decilm import export_decilm
from layerfold.kernels import unit_rows
from layerfold.kernels.cosine import unit_rows_ref
from tests.support.models import RUNTIME_SPECS, tiny_model, tiny_spec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hetero() -> Any:
    return tiny_model(RUNTIME_SPECS["hetero"])  # vocab 300, 256 positions, every layer kind


# ---- StreamedRuntime -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, err, match", [
    (dict(max_batch=True), TypeError, "whole numbers of rows and slots"),
    (dict(max_batch=2.5), TypeError, "whole numbers of rows and slots"),  # was int(2.5) = 2 rows, silently
    (dict(max_batch="2"), TypeError, "whole numbers of rows and slots"),  # was int("2")
    (dict(max_batch=None), TypeError, "whole numbers of rows and slots"),  # was int(None): a bare TypeError
    (dict(max_len=float("nan")), TypeError, "whole numbers of rows and slots"),  # was "cannot convert float NaN"
    (dict(max_len=0), ValueError, "at least one row of two slots"),  # was 0 -> the 256-slot default
    (dict(max_len=True), TypeError, "whole numbers of rows and slots"),
    (dict(device="nope"), ValueError, "'nope' is not a device. Fix"),  # was torch's RuntimeError
    (dict(device="meta"), ValueError, "runs on cpu and cuda devices. Fix"),  # was accepted: NotImplementedError later
    (dict(device=""), ValueError, "is not a device. Fix"),
    (dict(dtype=torch.int64), TypeError, "not a floating-point torch dtype. Fix"),
    (dict(dtype="bfloat16"), TypeError, "not a floating-point torch dtype. Fix"),
])
def test_streamed_runtime_refuses_odd_sizes_devices_and_dtypes(hetero: Any, kw: dict, err: type, match: str) -> None:
    args = dict(device="cpu", max_batch=1, max_len=8) | kw
    with pytest.raises(err, match=match):
        StreamedRuntime(hetero, args.pop("device"), **args)


def test_streamed_runtime_refuses_what_is_not_a_model() -> None:
    with pytest.raises(TypeError, match="must be a layerfold Model.*Fix"):
        StreamedRuntime("path/to/model", "cpu")  # was AttributeError: 'str' object has no attribute 'spec'


def test_streamed_prefill_refuses_prompts_that_are_not_token_ids(hetero: Any) -> None:
    rt = StreamedRuntime(hetero, "cpu", max_batch=2, max_len=16)
    with pytest.raises(ValueError, match="0 prompts.*Fix: pass at least one prompt"):
        rt.prefill([])  # said "build it with max_batch=1"
    with pytest.raises(ValueError, match=r"prompt 0 is \[1.5, 2\], not a list of token ids.*Fix"):
        rt.prefill([[1.5, 2]])  # was truncated to [1, 2] silently
    with pytest.raises(ValueError, match="prompt 1 is .*not a list of token ids.*Fix"):
        rt.prefill([[1, 2], [[3, 4]]])  # a list of lists was flattened
    with pytest.raises(ValueError, match="prompt 0 is abc, not a list of token ids"):
        rt.prefill(["abc"])  # was TypeError: '<=' not supported between 'int' and 'str'
    with pytest.raises(ValueError, match=r"prompt 0 holds token id -1, outside \[0, 300\)"):
        rt.prefill([[5, -1]])
    assert rt.prefill([torch.tensor([1, 2, 3])]).shape == (1, 300)  # a tensor of ids is fine


def test_streamed_decode_refuses_ids_outside_the_vocabulary_and_a_wrong_count(hetero: Any) -> None:
    """An id past the embedding was an IndexError on CPU and a device-side assert on CUDA (the process's GPU is
    unusable after it); extra tokens were dropped silently."""
    rt = StreamedRuntime(hetero, "cpu", max_batch=2, max_len=16)
    rt.prefill([[1, 2, 3], [4]])
    with pytest.raises(ValueError, match=r"decode's tokens holds token id 300, outside \[0, 300\).*Fix"):
        rt.decode([300, 2])
    with pytest.raises(ValueError, match=r"token id -1, outside"):
        rt.decode(torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="3 tokens for 2 rows. Fix"):
        rt.decode([1, 2, 3])
    with pytest.raises(ValueError, match="2 tokens and 1 active flags for 2 rows. Fix"):
        rt.decode([1, 2], active=[True])
    with pytest.raises(ValueError, match="not a list of token ids"):
        rt.decode([1.7, 2.2])
    assert rt.steps == 1 and rt.lengths == [3, 1]  # nothing ran, nothing moved
    assert rt.decode([1, 2]).shape == (2, 300) and rt.lengths == [4, 2]


def test_generate_stream_to_a_device_that_does_not_exist_names_it(hetero: Any) -> None:
    for dev, match in (("nope", "'nope' is not a device"), ("meta", "runs on cpu and cuda devices"),
                       (True, "'True' is not a device")):
        with pytest.raises(ValueError, match=match + ".*Fix"):
            generate(hetero, object(), [[1, 2, 3]], max_new_tokens=2, chat=False, stream_to=dev)


def test_stream_to_a_model_without_attention_layers_equals_its_forward() -> None:
    """No attention layer at all (an empty KV cache) and prompts of very different lengths: the streamed greedy
    steps give the in-memory model's logits."""
    model = tiny_model(tiny_spec(n_layers=3, mlp_blocks=(0, 1, 2), vocab=61, max_position=64), seed=2)
    prompts = [[5], list(range(1, 40)), [7, 8, 9]]
    rt = StreamedRuntime(model, "cpu", max_batch=3, max_len=48)
    logits = rt.prefill(prompts)
    seqs = [list(p) for p in prompts]
    for _ in range(4):
        nxt = logits.argmax(-1).tolist()
        with torch.no_grad():
            want = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
        for s, t in zip(seqs, nxt, strict=True):
            s.append(t)
        logits = rt.decode(nxt)


# ---- DeciLM block_configs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    L = LayerSpec
    layers = (L(48, 48, 48, 4, 2, 12, 72), L(48, 48, 48, 4, 1, 12, 256), L(48, 48, 48, d_ffn=40, has_attn=False,
                                                                            kind="mlp"),
              L(48, 48, 48, 4, 4, 12, 0, has_mlp=False))
    m = tiny_model(ModelSpec(vocab_size=61, d_model=48, layers=layers).validate(), std=0.1)
    root = tmp_path_factory.mktemp("decilm")
    export_decilm(save_checkpoint(root / "ck", m.spec, m.state_dict()), root / "vllm")
    return root / "vllm"


def _set(i: int, sec: str, **kv: Any) -> Any:
    return lambda c: c["block_configs"][i][sec].update(kv)


HOSTILE_BLOCKS = {  # name: (edit of config.json, what the error says)
    "n_heads_in_group-0": (_set(0, "attention", n_heads_in_group=0),  # was ZeroDivisionError
                           r"block 0: n_heads_in_group=0 is not a whole number >= 1 that divides the 4 heads"),
    "n_heads_in_group-negative": (_set(0, "attention", n_heads_in_group=-2),  # named a spec field (n_kv_heads=-2)
                                  r"block 0: n_heads_in_group=-2 is not a whole number >= 1"),
    "ffn_mult-0": (_set(1, "ffn", ffn_mult=0), r"block 1: ffn ffn_mult=0 gives an FFN width of 0"),
    "ffn_mult-tiny": (_set(1, "ffn", ffn_mult=1e-9), r"block 1: ffn ffn_mult=1e-09 gives an FFN width of 0"),
    "intermediate_size-0": (_set(0, "ffn", intermediate_size=0), r"block 0: ffn intermediate_size=0 gives"),
    "both-no_op": (lambda c: (_set(0, "attention", no_op=True)(c), _set(0, "ffn", no_op=True)(c)),
                   r"block 0: attention and ffn are both no_op"),  # named "layers[0]" of a spec the user never wrote
    "attention_bias": (lambda c: c.update(attention_bias=True), r"no o_proj or MLP biases"),  # ignored before
    "mlp_bias": (lambda c: c.update(mlp_bias=True), r"no o_proj or MLP biases"),  # ignored before
    "qkv_bias-string": (lambda c: c.update(qkv_bias="true"), r"'qkv_bias': 'true'"),  # read as false before
    "one-block-short": (lambda c: c["block_configs"].pop(), r"num_hidden_layers=4\), not 3 blocks"),
    "block_configs-object": (lambda c: c.update(block_configs={"0": c["block_configs"][0]}), r"not a JSON dict"),
    "null-intermediate_size": (_set(0, "ffn", intermediate_size=None), r"intermediate_size=None is not a whole"),
    "replace_with_linear": (_set(0, "ffn", replace_with_linear=True), r"replace_with_linear is not supported"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_BLOCKS))
def test_hand_edited_block_configs_are_refused_naming_the_block(decilm_dir: Path, tmp_path: Path, case: str) -> None:
    edit, match = HOSTILE_BLOCKS[case]
    d = tmp_path / "m"
    shutil.copytree(decilm_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match + ".*Fix"):
        layerfold.load(d, tokenizer=False, quiet=True)
    assert json.loads((d / "config.json").read_text()) == cfg  # the folder is left as it was


def test_unknown_extra_block_keys_are_ignored_as_vllm_does(decilm_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(decilm_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    orig = copy.deepcopy(cfg)
    cfg["block_configs"][0]["note"] = "x"
    cfg["block_configs"][2]["attention"]["n_heads_in_group"] = 2  # no_op attention: its group is not read
    (d / "config.json").write_text(json.dumps(cfg))
    a, _ = layerfold.load(d, tokenizer=False, quiet=True)
    b, _ = layerfold.load(decilm_dir, tokenizer=False, quiet=True)
    assert a.spec == b.spec and orig["block_configs"][0] != cfg["block_configs"][0]


# ---- save_checkpoint ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small() -> Any:
    return tiny_model(tiny_spec(n_layers=2), seed=1)


def test_a_state_with_shared_storage_is_saved_and_loads_back(small: Any, tmp_path: Path) -> None:
    """A head that shares the embedding's storage (tie by assignment) was safetensors' RuntimeError "Some tensors
    share memory"; each tensor now gets its own bytes."""
    state = dict(small.state_dict())
    state["lm_head.weight"] = state["embed.weight"]
    state["layers.1.attn_norm.weight"] = state["layers.0.attn_norm.weight"][:]
    _, back = load_checkpoint(save_checkpoint(tmp_path / "out", small.spec, state))
    assert torch.equal(back["lm_head.weight"], state["embed.weight"])
    assert torch.equal(back["layers.1.attn_norm.weight"], state["layers.0.attn_norm.weight"])


def test_saving_an_mmapped_state_copies_no_tensor(small: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """A loaded checkpoint's tensors are views of one mmapped buffer, side by side: saving them (prune's unchanged
    layers) must not copy them into memory, as copying every tensor that shares a storage would."""
    _, mapped = load_checkpoint(save_checkpoint(tmp_path / "a", small.spec, small.state_dict()))
    assert len({t.untyped_storage().data_ptr() for t in mapped.values()}) == 1
    clones: list[int] = []
    real = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: clones.append(1) or real(t, *a, **k))
    save_checkpoint(tmp_path / "b", small.spec, mapped)
    assert clones == []


# check=False refuses meta and sparse tensors too (no file can hold them); it writes float8, as any state, anyway
@pytest.mark.parametrize("what, check", [("meta", True), ("meta", False), ("sparse", True), ("sparse", False),
                                         ("float8", True)])
def test_a_state_no_file_can_hold_is_refused_before_writing(small: Any, tmp_path: Path, what: str,
                                                            check: bool) -> None:
    """Meta and sparse tensors failed inside the save (NotImplementedError, RuntimeError); float8 was written into a
    checkpoint layerfold then refused to load."""
    state = dict(small.state_dict())
    w = state["norm.weight"]
    state["norm.weight"] = {"meta": w.to("meta"), "sparse": w.to_sparse(), "float8": w.to(torch.float8_e4m3fn)}[what]
    with pytest.raises(CheckpointError, match="tensor 'norm.weight' .*Fix"):
        save_checkpoint(tmp_path / "out", small.spec, state, check=check)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", [{"../evil.txt": "x"}, {"{tmp}/evil.txt": "x"}, {"sub/a.txt": "x"},
                                   {"model.safetensors": "x"}, {"config.json": "{}"}, {"a.txt": b"bytes"}])
def test_extra_files_stay_inside_the_checkpoint(small: Any, tmp_path: Path, extra: dict) -> None:
    """'../evil.txt' and absolute names were written outside the checkpoint; 'model.safetensors' replaced the
    weights (a checkpoint that then failed to load)."""
    out = tmp_path / "sub" / "out"
    extra = {k.replace("{tmp}", str(tmp_path)): v for k, v in extra.items()}  # an absolute name
    with pytest.raises(ValueError, match="extra_files: .*plain file name.*Fix"):
        save_checkpoint(out, small.spec, small.state_dict(), extra_files=extra)
    assert list(tmp_path.iterdir()) == []


def test_provenance_that_is_not_an_object_is_refused(small: Any, tmp_path: Path) -> None:
    """A list was written as "provenance": [...], which read_config then refused: an unreadable checkpoint."""
    with pytest.raises(TypeError, match="provenance must be a dict.*Fix"):
        save_checkpoint(tmp_path / "out", small.spec, small.state_dict(), provenance=["pruned"])
    assert not (tmp_path / "out").exists()
    save_checkpoint(tmp_path / "ok", small.spec, small.state_dict(), extra_files={"NOTES.md": "hi"})
    assert (tmp_path / "ok" / "NOTES.md").read_text() == "hi"


# ---- kernels.unit_rows --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["out-int", "out-bool", "dtype-int", "dtype-str", "dtype-vs-out", "out-list",
                                  "x-0d", "x-int", "eps-0", "out-expanded"])
def test_unit_rows_refuses_outputs_it_cannot_write(case: str) -> None:
    """An integer or bool out was filled with zeros / True; a dtype that disagreed with out was ignored; an expanded
    out had every row written over the others; eps 0 gave nan for zero rows."""
    x = torch.randn(4, 8)
    kw = {"out-int": dict(out=torch.empty(4, 8, dtype=torch.int64)), "out-bool": dict(out=torch.empty(4, 8).bool()),
          "dtype-int": dict(dtype=torch.int32), "dtype-str": dict(dtype="float16"),
          "dtype-vs-out": dict(dtype=torch.float16, out=torch.empty(4, 8)), "out-list": dict(out=[0.0] * 32),
          "x-0d": dict(x=torch.tensor(3.0)), "x-int": dict(x=torch.ones(4, 8, dtype=torch.int64)),
          "eps-0": dict(x=torch.zeros(4, 8), eps=0.0), "out-expanded": dict(out=torch.empty(1, 8).expand(4, 8))}[case]
    x = kw.pop("x", x)
    with pytest.raises((TypeError, ValueError), match="Fix"):
        unit_rows(x, kw.pop("dtype", None), **kw)


def test_unit_rows_of_empty_rows_and_non_contiguous_x() -> None:
    assert unit_rows(torch.empty(4, 0)).shape == (4, 0)  # was a Triton launch with an empty arange
    assert unit_rows(torch.empty(0, 8), torch.float16).dtype == torch.float16
    x = torch.randn(8, 6).t()  # rows 1 apart, channels 6 apart
    torch.testing.assert_close(unit_rows(x), unit_rows_ref(x), atol=1e-6, rtol=0)
    out = torch.empty(6, 8, dtype=torch.float16)
    assert unit_rows(x, out=out) is out
    torch.testing.assert_close(out, unit_rows_ref(x, torch.float16), atol=1e-3, rtol=0)
