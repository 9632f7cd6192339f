"""Wrong arguments to the public Python API (``import layerfold``): a str where a Model is expected, a list where a
tensor is, a float for an int, None for something required, impossible values. Each is a TypeError or ValueError
naming the argument and the fix, raised before any file is read or written and before any model is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import layerfold
from tests.support.models import embedded_tokenizer, smollm2_vocab_spec, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Any:
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def model() -> layerfold.Model:
    return tiny_model(smollm2_vocab_spec(n_layers=2), seed=0)


@pytest.fixture
def nothing_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading any model source (resolving a path, converting, loading weights) fails the test."""
    import layerfold.core.loading as L

    def boom(*a: Any, **k: Any) -> Any:
        pytest.fail("read a model source before checking the arguments")

    monkeypatch.setattr(L, "load_spec_state", boom)
    monkeypatch.setattr(L, "read_gguf", boom)


def _raises(exc: type[Exception], match: str, fn: Any) -> None:
    with pytest.raises(exc, match=match) as e:
        fn()
    assert "Fix:" in str(e.value), str(e.value)


# ---- evaluate / perplexity -------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,exc,match", [
    ({"model": "smollm2-135m"}, TypeError, "model must be a model, not str"),
    ({"tokenizer": None}, TypeError, "tokenizer must be a tokenizer, not NoneType"),
    ({"tokenizer": "smollm2-135m"}, TypeError, "tokenizer must be a tokenizer, not str"),
    ({"data": None}, TypeError, "data must be a str or Path, not NoneType"),
    ({"seq_len": 16.0}, TypeError, "seq_len=16.0 must be a whole number, not float"),
    ({"seq_len": "16"}, TypeError, "seq_len='16' must be a whole number, not str"),
    ({"seq_len": 9000}, ValueError, "seq_len=9000 is longer than the model's context of 8192"),
    ({"max_tokens": -5}, ValueError, "max_tokens=-5 must be >= 1"),
    ({"batch_size": 0, "tasks": ("mc",)}, ValueError, "batch_size=0 must be >= 1"),
    ({"mc_items": 0, "tasks": ("mc",)}, ValueError, "mc_items=0 must be >= 1"),
    ({"tasks": "ppl,bleu"}, ValueError, "unknown task.*bleu"),
])
def test_evaluate_arguments(model: layerfold.Model, tok: Any, kw: dict[str, Any], exc: type[Exception],
                            match: str) -> None:
    """They died in "'str' object is not callable", "object of type 'NoneType' has no len()", "slice indices must
    be integers", "shape '[-1, 16]' is invalid" (max_tokens=-5), pathlib's TypeError; batch_size=0 scored anyway;
    seq_len 9000 on an 8,192-position model ran; mc_items=0 named n, context_tokens and cont_tokens."""
    args = {"model": model, "tokenizer": tok, "tasks": ("ppl",), "seq_len": 16, "max_tokens": 64, **kw}
    _raises(exc, match, lambda: layerfold.evaluate(args.pop("model"), args.pop("tokenizer"), **args))


def test_evaluate_takes_tasks_as_a_string(model: layerfold.Model, tok: Any) -> None:
    """tasks="ppl" was read letter by letter: "unknown task(s) ['p', 'p', 'l']"."""
    r = layerfold.evaluate(model, tok, tasks="ppl", seq_len=16, max_tokens=64)
    assert "ppl" in r and "mc" not in r


@pytest.mark.parametrize("tokens,exc,match", [
    ([1, 2, 3] * 20, TypeError, "tokens must be token ids, not list"),
    (torch.rand(64), TypeError, "not a torch.float32 tensor"),
    (torch.full((64,), 10 ** 6), ValueError, "token ids span 1000000..1000000, outside the model's vocabulary"),
    (torch.full((64,), -1), ValueError, "token ids span -1..-1"),
])
def test_perplexity_tokens(model: layerfold.Model, tokens: Any, exc: type[Exception], match: str) -> None:
    """A list died in AttributeError ('reshape'), floats in torch's embedding check, ids past the vocabulary in
    "IndexError: index out of range in self"."""
    _raises(exc, match, lambda: layerfold.perplexity(model, tokens, seq_len=16))


# ---- bench_models ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("models,kw,exc,match", [
    ("smollm2-135m", {}, TypeError, "models must be a list of models, not str"),
    (None, {}, TypeError, "models must be a list of models, not NoneType"),
    ([42], {}, TypeError, "models holds a int"),
    (["M"], {"engines": "layerfold"}, TypeError, "engines must be a list, not str"),
    (["M"], {"batch_sizes": 4}, TypeError, "batch_sizes must be a list, not int"),
    (["M"], {"batch_sizes": [1.5]}, TypeError, "batch_sizes entry=1.5 must be a whole number"),
    (["M"], {"batch_sizes": []}, ValueError, "batch_sizes is empty"),
    (["M"], {"new_tokens": 2.5}, TypeError, "new_tokens=2.5 must be a whole number"),
    (["M"], {"new_tokens": 1}, ValueError, "new_tokens=1 must be >= 2"),
    (["M"], {"repeats": 0}, ValueError, "repeats=0 must be >= 1"),
    (["M"], {"dtype": "int8"}, ValueError, "dtype 'int8' is not one of"),
    (["M"], {"dtype": torch.float64}, ValueError, "dtype float64 is not one layerfold computes in"),
])
def test_bench_models_arguments(model: layerfold.Model, nothing_read: None, models: Any, kw: dict[str, Any],
                                exc: type[Exception], match: str) -> None:
    """A str was read character by character ("/: a directory without config.json"), engines="layerfold" gave
    "engines ['l', 'a', 'y', ...] are unknown", batch_sizes=4 "'int' object is not iterable", 1.5 torch's randint
    signature, dtype="bf16" "Invalid device string"."""
    models = [model if m == "M" else m for m in models] if isinstance(models, list) else models
    _raises(exc, match, lambda: layerfold.bench_models(models, prompt_len=4, **{"new_tokens": 2, "repeats": 1, **kw}))


def test_bench_models_and_prune_check_the_device(model: layerfold.Model, tmp_path: Path, nothing_read: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """device="cuda" without CUDA died in torch's "AssertionError: Torch not compiled with CUDA enabled"."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _raises(ValueError, "'cuda': .*CUDA.*Fix: use the cpu", lambda: layerfold.bench_models([model], device="cuda"))
    _raises(ValueError, "'cuda': .*CUDA.*Fix: use the cpu",
            lambda: layerfold.prune("smollm2-135m", "shortgpt", "1", tmp_path / "o", device="cuda"))
    assert not (tmp_path / "o").exists()


# ---- load / prune / save_checkpoint ----------------------------------------------------------------------
@pytest.mark.parametrize("src", [None, 123, "MODEL"])
def test_load_source_types(model: layerfold.Model, nothing_read: None, src: Any) -> None:
    """None and 123 were looked up as file names; a Model died in "OSError: File name too long" (its repr)."""
    src = model if src == "MODEL" else src
    _raises(TypeError, "a model source must be a path, alias or Hub id", lambda: layerfold.load(src))
    _raises(TypeError, "a model source must be a path", lambda: layerfold.resolve(src))


@pytest.mark.parametrize("dtype,exc,match", [
    ("int8", ValueError, "dtype 'int8' is not one of"),
    (torch.int8, ValueError, "dtype int8 is not one layerfold computes in"),
    (16, TypeError, "dtype=16 must be a name or a torch dtype, not int"),
])
def test_load_dtype(nothing_read: None, dtype: Any, exc: type[Exception], match: str) -> None:
    """dtype="bfloat16" (a name) and "int8" died in nn.Module.to's TypeError after reading every weight."""
    _raises(exc, match, lambda: layerfold.load("smollm2-135m", dtype=dtype))


@pytest.mark.parametrize("kw,exc,match", [
    ({"source": "MODEL"}, TypeError, "a model source must be a path.*save_checkpoint"),
    ({"out": None}, TypeError, "out must be a directory path"),
    ({"samples": 2.5}, TypeError, "samples=2.5 must be a whole number"),
    ({"seq_len": 1}, ValueError, "seq_len=1 must be >= 2"),
    ({"dtype": "int8"}, ValueError, "dtype 'int8'"),
])
def test_prune_arguments(model: layerfold.Model, tmp_path: Path, nothing_read: None, kw: dict[str, Any],
                         exc: type[Exception], match: str) -> None:
    """A Model as the source died in "File name too long"; out=None in pathlib; samples=2.5 in torch's randint
    after loading and calibrating."""
    args = {"source": "smollm2-135m", "method": "shortgpt", "target": "1", "out": tmp_path / "o", **kw}
    args["source"] = model if args["source"] == "MODEL" else args["source"]
    _raises(exc, match, lambda: layerfold.prune(**args, eval=False, progress=False))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change,exc,match", [
    ({"out": None}, TypeError, "out must be a directory path"),
    ({"spec": "spec"}, TypeError, "spec must be a ModelSpec, not str"),
    ({"state": None}, TypeError, "state is None"),
    ({"state": "MODEL"}, TypeError, "state must map tensor names to tensors .*got a Model"),
    ({"state": {"embed.weight": [1, 2]}}, TypeError, "'embed.weight': a list"),
    ({"tokenizer": "tok"}, TypeError, "tokenizer must be a transformers tokenizer, not str"),
])
def test_save_checkpoint_arguments(model: layerfold.Model, tmp_path: Path, change: dict[str, Any],
                                   exc: type[Exception], match: str) -> None:
    """Each died in an AttributeError ('str' object has no attribute 'to_dict', 'NoneType' ... 'items',
    ... 'save_pretrained') or pathlib's TypeError."""
    args = {"out": tmp_path / "ck", "spec": model.spec, "state": model.state_dict(), **change}
    args["state"] = model if args["state"] == "MODEL" else args["state"]
    _raises(exc, match, lambda: layerfold.save_checkpoint(args.pop("out"), args.pop("spec"), args.pop("state"),
                                                          **args))
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary
    _raises(TypeError, "path must be a checkpoint directory", lambda: layerfold.load_checkpoint(None))


# ---- models, runtime, surgery ----------------------------------------------------------------------------
def test_model_builders_and_users_want_models(model: layerfold.Model) -> None:
    """Each died in an AttributeError: 'str' object has no attribute 'validate' / 'spec'; a list as the state in
    "tensor 'embed.weight' is missing"."""
    from layerfold.surgery.slice_plan import SlicePlan
    from layerfold.surgery.slicing import point_dims

    _raises(TypeError, "spec must be a ModelSpec, not str", lambda: layerfold.build_model("spec"))
    _raises(TypeError, "spec must be a ModelSpec, not dict", lambda: layerfold.Model(model.spec.to_dict()))
    _raises(TypeError, "state must map tensor names to tensors .*got a list",
            lambda: layerfold.build_model(model.spec, [1]))
    _raises(TypeError, "model must be a layerfold Model, not str", lambda: layerfold.Runtime("smollm2-135m"))
    plan = layerfold.DepthPlan(n_layers=2, drop=(1,))
    _raises(TypeError, "model must be a layerfold Model, not str", lambda: layerfold.apply_depth_plan("m", plan))
    _raises(TypeError, "plan must be a DepthPlan, not dict", lambda: layerfold.apply_depth_plan(model, {"drop": [1]}))
    splan = SlicePlan(widths=tuple(point_dims(model.spec)))
    ids = torch.randint(0, 100, (2, 8))
    _raises(TypeError, "model must be a layerfold Model", lambda: layerfold.slice_model("m", ids, splan))
    _raises(TypeError, "plan must be a SlicePlan, not list", lambda: layerfold.slice_model(model, ids, [0.25]))
    _raises(TypeError, "calib must be token ids", lambda: layerfold.slice_model(model, ids.float(), splan))


@pytest.mark.parametrize("opts,exc,match", [
    ({"seq_len": 9000}, ValueError, "seq_len=9000 is longer than the model's context of 8192"),
    ({"tasks": "bleu"}, ValueError, "unknown task.*bleu"),
    ({"mc_items": 0}, ValueError, "mc_items=0 must be >= 1"),
])
def test_prune_eval_options_before_calibrating(model: layerfold.Model, tok: Any, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, opts: dict[str, Any],
                                               exc: type[Exception], match: str) -> None:
    """Evaluation options were first used after calibration and surgery: a window past the context scored
    garbage, a bad task or item count failed at the very end."""
    import layerfold.calibration.calibrate as C

    monkeypatch.setattr(C, "calibrate", lambda *a, **k: pytest.fail("calibrated before checking eval_options"))
    src = layerfold.save_checkpoint(tmp_path / "src", model.spec, model.state_dict(), tokenizer=tok)
    _raises(exc, match, lambda: layerfold.prune(src, "shortgpt", "1", tmp_path / "o", samples=2, seq_len=16,
                                                eval_options=opts, progress=False))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("kw", "err", "match"), [
    ({"window": 2.5}, TypeError, "window=2.5 must be a whole number"),
    ({"micro_batch": "4"}, TypeError, "micro_batch='4' must be a whole number"),
    ({"skip_in": "grams"}, TypeError, "is one string"),
    ({"device": "tpu"}, ValueError, "'tpu' is not a device"),
    ({"dtype": torch.int8}, ValueError, "not one layerfold computes in"),
])
def test_calibrate_arguments(model: layerfold.Model, kw: dict[str, Any], err: type, match: str,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    from layerfold.calibration import calibrate as cal

    monkeypatch.setattr(cal, "LayerStream", lambda *a, **k: pytest.fail("streamed the model before the check"))
    with pytest.raises(err, match=match):
        cal.calibrate(model, torch.zeros(2, 8, dtype=torch.long), **kw)


@pytest.mark.parametrize(("args", "kw", "err", "match"), [
    (("not a model", "x", [[0]], []), {}, TypeError, "student must be a layerfold Model"),
    ((None, None, [[0], [1]], [0]), {}, TypeError, "a model source must be a path"),
    ((None, "x", [[0], ["a"]], [0]), {}, TypeError, "layer_map must list"),
    ((None, "x", [[0], [1]], [5]), {}, ValueError, r"changed_layers=\[5\] must list student layers 0..1"),
    ((None, "x", [[0], [1]], [0]), {"data": [1, 2]}, TypeError, "data must be a text source"),
])
def test_heal_pruned_arguments(model: layerfold.Model, args: tuple, kw: dict[str, Any], err: type, match: str,
                               nothing_read: None) -> None:
    from layerfold.healing.heal import heal_pruned

    args = tuple(model if a is None and i == 0 else a for i, a in enumerate(args))
    with pytest.raises(err, match=match):
        heal_pruned(*args, tokens=10, progress=False, **kw)
