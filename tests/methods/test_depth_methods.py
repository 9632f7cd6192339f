"""Depth methods on a tiny random model: every method hits its target; the pipeline saves what it pruned."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import layerfold
from layerfold.core.checkpoint import save_checkpoint
from layerfold.methods import PruneContext, Target, get_method
from layerfold.methods.merge_search import MergeSimilarity, groups_of
from layerfold.methods.slm import slide
from tests.support.models import tiny_model
from tests.support.tolerances import approx

L = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    m = tiny_model(d_model=48, n_layers=L, heads=4, kv_heads=2, ffn=72, vocab=61, tie=True, arch="llama",
                   std=0.08).requires_grad_(False)
    calib = torch.randint(0, 61, (6, 24), generator=torch.Generator().manual_seed(1))
    from layerfold.calibration.calibrate import calibrate

    stats = calibrate(m, calib, window=L, cka=False, channels=False)
    return m, calib, stats


def ctx(setup, target: str, **options) -> PruneContext:
    m, calib, stats = setup
    return PruneContext(model=m, tokenizer=None, source="tiny", target=Target.parse(target), stats=stats,
                        calib=calib, options=options, progress=False)


@pytest.mark.parametrize("method, options", [
    ("shortgpt", {}),
    ("laco", {}),
    ("slm", {"similarity": "cka"}),
    ("slm", {"similarity": "final-cosine"}),
    ("streamline", {"replacement": "mlp", "epochs": 1, "train_batch": 3}),
    ("streamline", {"replacement": "decoder", "epochs": 1, "train_batch": 3, "pair_cache": "none"}),
])
@pytest.mark.parametrize("target", ["3"])
def test_every_method_hits_its_target(setup, method: str, options: dict, target: str) -> None:
    m = setup[0]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = get_method(method).fn(ctx(setup, target, sim_seq_len=24, **options))
    k = Target.parse(target).layers_to_remove(m)
    added = 1 if method == "streamline" else 0  # streamline removes a window of k and adds one block back
    assert res.model.spec.n_layers == L - k + added, res.info.get("note")
    assert len(res.layer_map) == L - k + added
    assert sorted(i for g in res.layer_map for i in g) == [i for i in range(L) if i in {j for g in res.layer_map
                                                                                          for j in g}]
    json.dumps(res.plan)  # JSON-serialisable
    for c in res.changed_layers:
        assert len(res.layer_map[c]) > 1
    if method == "streamline":
        assert res.info["training"]["steps"] > 0 and res.info["training"]["final_loss"] < 10
    with torch.no_grad():
        assert torch.isfinite(res.model(setup[1][:1])).all()
    for name, v in m.state_dict().items():
        assert torch.equal(v, before[name]), f"{method} changed the dense model's {name}"


@pytest.mark.parametrize("method", ["shortgpt", "slm"])
def test_fraction_target(setup, method: str) -> None:
    res = get_method(method).fn(ctx(setup, "25%", sim_seq_len=24))
    assert res.model.spec.n_layers == L - 2


def test_params_target_counts_the_replacement(setup) -> None:
    m = setup[0]
    res = get_method("streamline").fn(ctx(setup, "params:0.3", no_train=True))
    removed = 1 - res.model.num_params() / m.num_params()
    assert removed >= 0.3 - 1e-9


def test_shortgpt_drops_lowest_bi(setup) -> None:
    res = get_method("shortgpt").fn(ctx(setup, "2"))
    bi = setup[2].bi
    dropped = res.info["dropped"]
    assert sorted(dropped) == sorted(torch.argsort(bi)[:2].tolist())


def test_slm_slide_follows_the_rule() -> None:
    """A fake similarity: merging [a..b] is accepted when the group stays within a 'block' of equal labels."""
    labels = [0, 1, 1, 1, 2, 2, 3, 4]

    def sim(groups):
        return min(1.0 if len({labels[i] for i in g}) == 1 else 0.0 for g in groups)

    assert slide(8, sim, 0.5) == [(4, 5), (1, 3)]
    assert slide(8, sim, 0.5, budget=2) == [(4, 5), (2, 3)]
    assert groups_of(8, [(4, 5), (1, 3)]) == [[0], [1, 2, 3], [4, 5], [6], [7]]


def test_similarity_of_the_dense_partition_is_one(setup) -> None:
    m, calib, _ = setup
    s = MergeSimilarity(m, calib[:3])
    sc = s.scores([[i] for i in range(L)])
    assert sc["cka"] == approx(1.0, torch.float32) and sc["final-cosine"] == approx(1.0, torch.float32)
    sc2 = s.scores(groups_of(L, [(2, 4)]))
    assert sc2["final-cosine"] < 1 and s.evaluations == 2


def greedy(model: layerfold.Model, ids: torch.Tensor, n: int) -> list[int]:
    out = ids.clone()
    with torch.no_grad():
        for _ in range(n):
            nxt = model(out, last_only=True)[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("method, options", [("slm", {}), ("streamline", {"epochs": 1})])
def test_pruned_model_saves_reloads_and_generates(setup, tmp_path, method: str, options: dict) -> None:
    res = get_method(method).fn(ctx(setup, "3", sim_seq_len=24, **options))
    out = save_checkpoint(tmp_path / "pruned", res.model.spec, res.model.state_dict(),
                          provenance={"layer_map": res.layer_map, "changed_layers": res.changed_layers})
    again, _ = layerfold.load(out, tokenizer=False)
    assert again.spec == res.model.spec
    prompt = setup[1][:1, :5]
    assert greedy(again, prompt, 6) == greedy(res.model, prompt, 6)


def test_prune_pipeline_writes_report_and_provenance(setup, tmp_path, monkeypatch) -> None:
    """layerfold.pipeline.prune end to end with the tiny model (load, data and evaluation stubbed)."""
    from layerfold import pipeline as P
    from layerfold.core import data as data
    from layerfold.evaluation import evaluate as evaluate

    m, calib, stats = setup
    src = save_checkpoint(tmp_path / "dense", m.spec, m.state_dict())
    monkeypatch.setattr(P, "load", lambda *a, **k: (layerfold.load(src, tokenizer=False)[0], None))
    monkeypatch.setattr(data, "calib_batches", lambda *a, **k: calib)
    monkeypatch.setattr(P, "check_data", lambda *a, **k: None)  # the stubbed load gives no tokenizer
    monkeypatch.setattr(evaluate, "evaluate",
                        lambda model, tok, **k: {"ppl": {"ppl": 10.0 + model.spec.n_layers, "seq_len": 512,
                                                         "tokens": 8176, "windows": 16},
                                                 "mc": {"acc": 0.5, "acc_norm": 0.4, "acc_stderr": 0.05,
                                                        "acc_norm_stderr": 0.049, "n": 100},
                                                 "data": "pydoc", "split": "val"})
    with pytest.raises(ValueError, match="refusing to write over"):
        P.prune(src, "shortgpt", "2", src / "inner", overwrite=True, progress=False)
    rep = P.prune(src, "shortgpt", "2", tmp_path / "out", progress=False)
    assert rep["removed_layers"] == 2 and rep["pruned"]["ppl"] == 16.0 and rep["dense"]["layers"] == L
    saved = json.loads((tmp_path / "out" / "report.json").read_text())  # how to reproduce it
    assert saved["evaluation"]["seq_len"] == 512 and saved["evaluation"]["tokens"] == 8176
    assert saved["evaluation"]["mc_items"] == 100 and saved["evaluation"]["data"] == "pydoc"
    assert saved["pruned"]["acc_stderr"] == 0.05 and saved["dense"]["acc_norm_stderr"] == 0.049
    assert {"layerfold", "torch", "transformers", "triton"} <= set(saved["versions"])
    assert saved["versions"]["torch"] and saved["versions"]["layerfold"] == layerfold.__version__
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    prov = cfg["provenance"]
    assert prov["method"] == "shortgpt" and prov["layer_map"] == rep["layer_map"] and prov["teacher"] == str(src)
    assert prov["calibration"]["samples"] == calib.shape[0]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["times"]["total"] > 0
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"kind": "depth", "n_layers": L, "drop": [7], "merge": [{"first": 1, "last": 2}]}))
    rep2 = P.prune(src, None, None, tmp_path / "out2", plan=plan, eval=False, progress=False)
    assert rep2["layer_map"] == [[0], [1, 2], [3], [4], [5], [6]] and rep2["changed_layers"] == [1]
    plan.write_text(json.dumps({"kind": "depth", "n_layers": L, "drop": [8]}))
    with pytest.raises(ValueError, match="out of range"):
        P.prune(src, None, None, tmp_path / "out3", plan=plan, eval=False, progress=False)


def test_cli_passes_only_the_chosen_methods_options() -> None:
    from layerfold.cli.main import build_parser
    from layerfold.cli.prune import method_options

    def opts(*argv: str) -> dict:
        return method_options(build_parser().parse_args(["prune", "m", "--target", "8", "--out", "o", *argv]))

    slm = opts("--method", "slm", "--similarity", "final-cosine", "--replacement", "decoder")
    assert slm == {"similarity": "final-cosine"}  # --replacement is streamline's: not in slm's method_params
    st = opts("--method", "streamline", "--replacement", "decoder", "--epochs", "2")
    assert st == {"replacement": "decoder", "epochs": 2}  # no slicing or CoMe defaults
    assert set(opts("--method", "slicegpt")) == {"pca_tokens", "basis"}  # the method's own defaults stay
    assert opts("--plan", "p.json", "--epochs", "3") == {"epochs": 3}  # a plan's blocks train as streamline's


def test_streamline_needs_a_wide_enough_window(setup) -> None:
    fake = SimpleNamespace(window=2, cos_window=torch.zeros(L, 2), bi=torch.zeros(L))
    c = ctx(setup, "3")
    c.stats = fake
    with pytest.raises(ValueError, match="--window 3"):
        get_method("streamline").fn(c)


def test_prune_passes_heal_through(setup) -> None:
    """--heal reaches layerfold.healing.heal.heal_pruned with the plan's layer_map / changed_layers (tiny budget)."""
    from layerfold.healing.heal import HealConfig, HealData
    from layerfold.pipeline import heal_result

    m, calib, _ = setup
    res = get_method("slm").fn(ctx(setup, "3", sim_seq_len=24))
    before = {k: v.clone() for k, v in res.model.state_dict().items()}
    data = HealData(train=torch.randint(0, 61, (4096,)), val=torch.randint(0, 61, (512,)))
    info = heal_result(res, m, None, data="pydoc", device="cpu", progress=False,
                       options={"data": data, "tokens": 512, "budget_minutes": None, "stages": ["global"],
                                "config": HealConfig(seq_len=32, micro_batch=2, eval_every=2, val_tokens=256,
                                                    global_params="changed", autocast=False)})
    assert info["tokens"] > 0 and info["trained_layers"] == res.changed_layers and info["global_params"] == "changed"
    assert info["steps"] == 8 and [t for t, _ in info["curve"]] == [0, 128, 256, 384, 512]
    changed = any(not torch.equal(v, before[k]) for k, v in res.model.state_dict().items())
    assert changed == (info["best_tokens"] > 0), info["curve"]  # left at its best state: trained, or as it came
