"""Weights kept in host memory and streamed to the compute device a layer at a time (``--weights host``):
the same logits, evaluation numbers and pruned checkpoints as with the model on the device.

On this CPU-only machine "host" and "device" are one memory, so these tests run every streamed code path
(LayerStream blocks, the streamed Streamline pairs, the StreamedLM evaluation) against the plain one; the
GPU tests at the end check the same on CUDA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from layerfold.core.checkpoint import load_checkpoint, save_checkpoint
from layerfold.core.spec import ModelSpec, dense_layer
from layerfold.evaluation.evaluate import perplexity
from layerfold.evaluation.streamed import StreamedLM, weight_bytes, weights_place
from layerfold.pipeline import prune
from tests.support.models import (
    RUNTIME_SPECS,
    SMOLLM2_VOCAB,
    embedded_tokenizer,
    hetero_reference_spec,
    tiny_model,
    tiny_spec,
)
from tests.support.tolerances import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = {"hetero-reference": hetero_reference_spec(), **RUNTIME_SPECS}


@pytest.mark.parametrize("name", [*sorted(SPECS), "tied"])
def test_streamed_logits_equal_the_model(name: str) -> None:
    spec = SPECS[name] if name in SPECS else tiny_spec(tie=True, n_layers=3)
    m = tiny_model(spec, norm_gains=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (3, 11), generator=g)
    ok = torch.ones_like(ids, dtype=torch.bool)
    ok[1, 7:] = False  # right padding
    ok[2, :4] = False  # left padding
    s = StreamedLM(m, "cpu")
    assert_close(s(ids), m(ids), torch.float32)
    assert_close(s(ids, key_valid=ok), m(ids, key_valid=ok), torch.float32)
    assert s.num_params() == m.num_params()


def test_many_takes_several_passes_within_its_hidden_budget() -> None:
    m = tiny_model(tiny_spec(n_layers=3), norm_gains=True)
    ids = torch.randint(0, m.spec.vocab_size, (6, 16), generator=torch.Generator().manual_seed(4))
    s = StreamedLM(m, "cpu")
    s.hidden_budget = 2 * 16 * m.spec.d_model * 4  # two one-row batches of 16 tokens a pass
    got = list(s.many([(ids[i:i + 1], None) for i in range(6)]))
    assert s.passes == 3
    assert_close(torch.cat(got), m(ids), torch.float32)


def test_weights_place_rules() -> None:
    assert weights_place("auto", "cpu", 10**12) == ("device", "cpu: host and device memory are one")
    assert weights_place("host", "cpu", 1)[0] == "host"
    assert weights_place("device", "cpu", 10**15)[0] == "device"  # asked for: the job may still run out
    with pytest.raises(ValueError, match="--weights 'disk' is unknown. Fix: use one of auto, device, host"):
        weights_place("disk", "cpu", 1)
    m = tiny_model(n_layers=2)
    assert weight_bytes(m) == 4 * m.num_params()
    assert weight_bytes(m, torch.bfloat16) == 2 * m.num_params()


# ---- the whole prune pipeline with the weights in host memory -----------------------------------------
@pytest.fixture(scope="module")
def tok() -> Any:
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory, tok: Any) -> Path:
    """Six decoder layers with the SmolLM2 tokenizer's vocabulary (tied)."""
    spec = ModelSpec(vocab_size=SMOLLM2_VOCAB, d_model=64, layers=(dense_layer(64, 4, 2, 16, 128),) * 6,
                     tie_embeddings=True).validate()
    m = tiny_model(spec, seed=3, norm_gains=True)
    return save_checkpoint(tmp_path_factory.mktemp("dense") / "model", m.spec, m.state_dict(), tokenizer=tok)


EVAL = {"seq_len": 64, "max_tokens": 1024, "mc_items": 6}
RUNS = {"shortgpt": ("2", {}), "streamline": ("2", {"epochs": 1}), "dynamic-slicing": ("25%", {}),
        "come": ("1", {})}


@pytest.mark.parametrize("method", sorted(RUNS))
def test_prune_with_host_weights_gives_the_same_checkpoint(method: str, dense: Path, tmp_path: Path) -> None:
    target, opts = RUNS[method]
    kw: dict[str, Any] = dict(samples=4, seq_len=32, options=opts, eval_options=EVAL, progress=False)
    ref = prune(dense, method, target, tmp_path / "device", weights="device", **kw)
    got = prune(dense, method, target, tmp_path / "host", weights="host", **kw)
    assert ref["weights"]["place"] == "device" and got["weights"]["place"] == "host"
    assert ref["device_peak_gb"] == {} == got["device_peak_gb"]  # a CPU job has no device peaks to report
    assert got["weights"]["bytes"] == weight_bytes(dense)
    assert got["layer_map"] == ref["layer_map"] and got["plan"] == ref["plan"]
    for key in ("ppl", "acc", "acc_norm", "params", "layers"):
        assert got["pruned"][key] == pytest.approx(ref["pruned"][key], rel=1e-4), key
        assert got["dense"][key] == pytest.approx(ref["dense"][key], rel=1e-4), key
    a, b = load_checkpoint(tmp_path / "device")[1], load_checkpoint(tmp_path / "host")[1]
    assert sorted(a) == sorted(b)
    for k in a:
        assert_close(b[k], a[k], torch.float32)


def test_host_weights_refuse_a_whole_model_search_before_loading(dense: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import layerfold.pipeline as P

    def no_load(*a: Any, **k: Any) -> None:
        raise AssertionError("loaded the model before refusing")

    monkeypatch.setattr(P, "load", no_load)
    for method in ("laco", "slm"):
        with pytest.raises(ValueError, match=f"{method} searches by running the whole model many times.*Fix:"):
            prune(dense, method, "2", tmp_path / method, weights="host", progress=False)
        assert not (tmp_path / method).exists()


def test_auto_places_the_weights_by_free_device_memory(dense: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU "auto" keeps the weights on the device while they fit 60% of its free memory; with --heal the
    pruned student (estimated from the target: 4 of 6 layers) must fit beside them. (The free memory is
    stubbed: this machine has no GPU.)"""
    import layerfold.pipeline as P
    from layerfold.methods import Target, get_method

    nbytes = weight_bytes(dense)

    def free(n: float) -> None:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(n), 10**12))

    two = Target.parse("2")
    free(nbytes / 0.6 * 1.05)  # the dense model fits, with 5% to spare
    assert P.where_weights(dense, None, "auto", "cuda", None, False, two)["place"] == "device"
    healing = P.where_weights(dense, None, "auto", "cuda", None, True, two)
    assert healing["place"] == "host" and "the pruned student beside it" in healing["why"]
    assert P.where_weights(dense, None, "device", "cuda", None, True, two)["place"] == "device"  # as asked
    with pytest.raises(ValueError, match="laco searches by running the whole model"):
        P.where_weights(dense, get_method("laco"), "auto", "cuda", None, True, two)
    free(nbytes / 0.6 * 0.6)  # the student alone (about 2/3 of the model) does not fit either
    with pytest.raises(ValueError, match="--heal trains the pruned model on cuda .*more than 60%.*Fix: prune without"):
        P.where_weights(dense, None, "auto", "cuda", None, True, two)
    assert P.where_weights(dense, None, "auto", "cuda", None, False, two)["place"] == "host"  # no --heal: fine


def test_prune_and_heal_with_host_weights(dense: Path, tmp_path: Path) -> None:
    """The student heals on the device while the teacher stays in host memory (healing.teacher): the same
    healed checkpoint, bit for bit, as with both on the device."""
    from layerfold.healing.common import HealConfig

    heal = {"tokens": 1536, "budget_minutes": None,
            "config": HealConfig(seq_len=32, micro_batch=2, val_tokens=256, eval_every=4)}
    kw: dict[str, Any] = dict(samples=4, seq_len=32, eval_options=EVAL, progress=False, heal=True, heal_options=heal)
    ref = prune(dense, "shortgpt", "2", tmp_path / "device", weights="device", **kw)
    got = prune(dense, "shortgpt", "2", tmp_path / "host", weights="host", **kw)
    assert ref["heal"]["config"]["teacher"] == "device" and got["heal"]["config"]["teacher"] == "host"
    assert got["heal"]["curve"] == ref["heal"]["curve"] and got["heal"]["tokens"] == 1536
    assert got["pruned"]["ppl"] == pytest.approx(ref["pruned"]["ppl"], rel=1e-4)
    assert got["pruned_before_heal"]["ppl"] == pytest.approx(ref["pruned_before_heal"]["ppl"], rel=1e-4)
    a, b = load_checkpoint(tmp_path / "device")[1], load_checkpoint(tmp_path / "host")[1]
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_cli_streams_host_weights(dense: Path, capsys: pytest.CaptureFixture) -> None:
    from layerfold.cli.main import main

    args = ["eval", str(dense), "--json", "--seq-len", "64", "--max-tokens", "512", "--mc-items", "4"]
    assert main([*args, "--weights", "host"]) == 0
    host = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert host["weights"]["place"] == "host" and plain["weights"]["place"] == "device"
    assert host["ppl"]["ppl"] == pytest.approx(plain["ppl"]["ppl"], rel=1e-5)
    assert host["mc"]["acc"] == plain["mc"]["acc"]


# ---- on the GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_streamed_evaluation_equals_the_cpu_model(tok: Any) -> None:
    spec = RUNTIME_SPECS["hetero"]
    m = tiny_model(spec, norm_gains=True)
    ids = torch.randint(0, spec.vocab_size, (4, 40), generator=torch.Generator().manual_seed(2))
    s = StreamedLM(m, "cuda")
    assert m.device.type == "cpu"  # the weights stayed where they were
    torch.testing.assert_close(s(ids).cpu(), m(ids), rtol=2e-4, atol=2e-4)
    ref = perplexity(m, ids.reshape(-1), seq_len=40)
    got = perplexity(s, ids.reshape(-1), seq_len=40)
    assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_prune_reports_the_device_peak_after_each_stage(dense: Path, tmp_path: Path) -> None:
    """`prune --device cuda` reports the device's high-water mark after each stage (GPU run 4: slicing peaked
    at 39.9 GB against ~27 predicted, and the job's one peak did not say in which stage)."""
    torch.cuda.reset_peak_memory_stats()
    rep = prune(dense, "shortgpt", "2", tmp_path / "o", device="cuda", weights="device", samples=4, seq_len=32,
                eval_options=EVAL, progress=False)
    peaks = rep["device_peak_gb"]
    assert list(peaks) == ["load", "calibrate", "method", "eval_dense", "eval_pruned", "save"]
    assert all(b >= a for a, b in zip(list(peaks.values()), list(peaks.values())[1:], strict=False))
    assert peaks["load"] >= weight_bytes(dense) / 1e9 * 0.99  # the weights are on the device by then
    on_disk = json.loads((tmp_path / "o" / "report.json").read_text())["device_peak_gb"]
    assert on_disk == peaks
