"""Healing's choices: an even layer stage under a time budget, LoRA in the global stage, defaults picked by device."""

from __future__ import annotations

import pytest
import torch

from layerfold import build_model, save_checkpoint
from layerfold.core.checkpoint import load_checkpoint
from layerfold.evaluation.evaluate import perplexity
from layerfold.healing.common import HealConfig, auto_autocast, auto_clock, auto_global_params, heal_targets
from layerfold.healing.heal import heal_pruned, save_healed
from layerfold.healing.lora import has_lora
from tests.healing.test_heal import CFG, MAP, TEACHER, data, drop_layer, selection_windows
from tests.support.models import tiny_model
from tests.support.tolerances import approx

pytestmark = pytest.mark.usefixtures("one_thread")

TWO_GAPS = [[0], [2], [4], [5]]  # layers 1 and 3 removed: student layers 1 and 2 each follow a gap


def test_time_budget_gives_every_healed_layer_the_same_steps():
    t = tiny_model(**TEACHER)
    s = drop_layer(drop_layer(t, 3), 1)
    assert heal_targets(TWO_GAPS, [], 6) == [1, 2]  # layer 2 runs after layer 1: its steps cost more
    rep = heal_pruned(s, t, TWO_GAPS, [], data=data(), budget_minutes=0.05, stages=("layer",), progress=False,
                      config=HealConfig(**CFG, clock="cpu"))
    steps = [lay["steps"] for lay in rep.layer_stage]
    assert [lay["layer"] for lay in rep.layer_stage] == [1, 2]
    assert steps[0] == steps[1] >= 1, rep.layer_stage
    assert rep.layer_stage[0]["tokens"] == rep.layer_stage[1]["tokens"]
    assert list(rep.stage_seconds) == ["layer"] and rep.stage_seconds["layer"] > 0  # the stage's training rate
    from pathlib import Path

    from layerfold.cli.heal import _text

    assert f"layer {rep.stage_tokens['layer']:,} tokens in" in _text(Path("out"), rep)


def test_lora_global_stage_merges_into_a_plain_checkpoint(tmp_path):
    t = tiny_model(**TEACHER)
    s = drop_layer(t, 2)
    before = {k: v.clone() for k, v in s.state_dict().items()}
    n_params = sum(p.numel() for p in s.parameters())
    cfg = HealConfig(**CFG, lr_global=3e-3, global_params="lora", lora_rank=4)
    rep = heal_pruned(s, t, MAP, [], data=data(), budget_minutes=None, tokens=4096, stages=("global",),
                      progress=False, config=cfg)
    assert rep.status == "done" and rep.global_params == "lora"
    assert rep.best_val_ppl < rep.start_val_ppl, rep.curve  # the test needs a run whose best state is trained
    assert not has_lora(s)  # adapters folded back in: the same tensors under the same names
    after = s.state_dict()
    assert list(after) == list(before) and all(after[k].shape == before[k].shape for k in before)
    assert torch.equal(after["embed.weight"], before["embed.weight"])  # neither changed nor adapted
    assert not torch.equal(after["layers.0.attn.q.weight"], before["layers.0.attn.q.weight"])  # adapter merged
    assert not torch.equal(after["layers.2.mlp.up.weight"], before["layers.2.mlp.up.weight"])  # trained in full
    trained = rep.memory["global"]["params_trained"]
    assert 0 < trained < n_params / 2, (trained, n_params)
    val = selection_windows()
    assert perplexity(s, val, seq_len=32, batch_size=4)["ppl"] == approx(rep.best_val_ppl, torch.float32)
    out = save_healed(tmp_path / "healed", s, rep, provenance={"layer_map": MAP})
    cfg_back, state = load_checkpoint(out)
    back = build_model(cfg_back["spec"], state)
    assert perplexity(back, val, seq_len=32, batch_size=4)["ppl"] == approx(rep.best_val_ppl, torch.float32)


def test_lora_resume_is_exact(tmp_path):
    def run(out, stop=None):
        t = tiny_model(**TEACHER)
        s = drop_layer(t, 2)
        cfg = HealConfig(**CFG, lr_layer=2e-3, lr_global=3e-3, global_params="lora", stop_after_steps=stop)
        return s, heal_pruned(s, t, MAP, [], data=data(), budget_minutes=None, tokens=4096, out_dir=out,
                              progress=False, config=cfg)

    ref, rep_ref = run(None)
    _, paused = run(tmp_path, stop=6)  # inside the global stage, adapters half trained
    assert paused.status == "paused"
    got, rep = run(tmp_path)
    assert rep.resumed and rep.curve == rep_ref.curve
    for (k, a), b in zip(ref.state_dict().items(), got.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_defaults_follow_the_device(monkeypatch):
    s = tiny_model(**TEACHER)
    cpu = torch.device("cpu")
    assert auto_clock(cpu) == "cpu" and auto_clock(torch.device("cuda")) == "wall"
    assert isinstance(auto_autocast(cpu), bool)
    assert auto_global_params(s, s.num_params(), cpu) == "all"  # a few thousand parameters fit anywhere
    import layerfold.calibration.buffers as buffers

    n = s.num_params()
    # fp32: weight, gradient, 2 moments and the best copy (20 bytes) + a teacher of the same size (4 bytes)
    monkeypatch.setattr(buffers, "host_available", lambda: 24 * n / 0.7 + 1)
    assert auto_global_params(s, n, cpu) == "all"
    monkeypatch.setattr(buffers, "host_available", lambda: 24 * n / 0.7 - 1)
    assert auto_global_params(s, n, cpu) == "lora"
    b = s.to(torch.bfloat16)  # fp32 masters (16 bytes) + bf16 best copy (2) + bf16 teacher (2): 20 bytes
    monkeypatch.setattr(buffers, "host_available", lambda: 20 * n / 0.7 + 1)
    assert auto_global_params(b, n, cpu, masters=True) == "all"
    assert auto_global_params(b, n, cpu, masters=False) == "all"  # pure bf16: 10 + 2 bytes
    monkeypatch.setattr(buffers, "host_available", lambda: 20 * n / 0.7 - 1)
    assert auto_global_params(b, n, cpu, masters=True) == "lora"
    s = s.float()
    monkeypatch.setattr(buffers, "host_available", lambda: 4 * n)
    rep = heal_pruned(drop_layer(s, 2), s, MAP, [], data=data(), budget_minutes=None, tokens=512,
                      stages=("global",), progress=False, config=HealConfig(**CFG))
    assert rep.global_params == "lora" and rep.config["clock"] == "cpu"
    assert rep.config["autocast"] in (True, False)


def test_cli_global_params_and_train_all(tmp_path, monkeypatch, capsys):
    import layerfold.cli.heal as cli_heal
    from layerfold.cli.main import main
    from layerfold.core.loading import load_tokenizer, resolve

    seen = []

    def fake_heal(*a, config, **kw):
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr(cli_heal, "heal_pruned", fake_heal)
    tok = load_tokenizer(resolve("smollm2-135m", quiet=True))
    t = tiny_model(d_model=16, n_layers=3, heads=2, kv_heads=1, head_dim=8, ffn=24, vocab=len(tok), tie=True)
    teacher = save_checkpoint(tmp_path / "teacher", t.spec, t.state_dict(), tokenizer=tok)
    s = drop_layer(t, 1)
    prov = {"layer_map": [[0], [2]], "changed_layers": [], "teacher": str(teacher)}
    bare = save_checkpoint(tmp_path / "bare", s.spec, s.state_dict(), provenance=prov)
    assert main(["heal", str(bare), "--out", str(tmp_path / "o"), "--tokens", "64"]) == 2
    assert "holds no tokenizer" in capsys.readouterr().err and not seen
    pruned = save_checkpoint(tmp_path / "pruned", s.spec, s.state_dict(), provenance=prov, tokenizer=tok)
    for extra, want in (([], "auto"), (["--global-params", "lora", "--lora-rank", "4"], "lora"),
                        (["--train-all"], "all"), (["--global-params", "changed", "--no-autocast"], "changed")):
        with pytest.raises(SystemExit):
            main(["heal", str(pruned), "--out", str(tmp_path / f"o{len(seen)}"), *extra])
        assert seen[-1].global_params == want
    assert seen[1].lora_rank == 4 and seen[0].autocast is None and seen[3].autocast is False
    assert seen[0].clock == "auto"



def test_prune_heal_options_from_the_command_line():
    import argparse

    from layerfold.cli.prune import heal_options

    ns = lambda **kw: argparse.Namespace(**{"heal_minutes": None, "heal_tokens": None, "heal_global_params": None,
                                            **kw})
    assert heal_options(ns()) is None  # heal_pruned's defaults: 15 minutes, global params auto
    assert heal_options(ns(heal_minutes=5.0)) == {"budget_minutes": 5.0}
    assert heal_options(ns(heal_tokens=4096)) == {"tokens": 4096, "budget_minutes": None}  # tokens alone: deterministic
    got = heal_options(ns(heal_global_params="lora"))
    assert got is not None and got["config"].global_params == "lora"


def test_prune_summary_shows_before_and_after_healing():
    from layerfold.cli.prune import summary

    heal = {"tokens": 3000, "stage_tokens": {"layer": 1000, "global": 2000}, "wall_minutes": 1.5, "cpu_minutes": 2.9,
            "budget": {"clock": "cpu"}, "global_params": "all", "start_val_ppl": 40.0, "best_val_ppl": 20.0,
            "layer_stage": [{"layer": 3, "steps": 7}, {"layer": 9, "steps": 7}]}
    report = {"method": "shortgpt", "out": "/o", "removed_layers": 2, "layer_map": [[0], [1], [3]], "plan": {},
              "dense": {"layers": 5, "params": 10_000_000, "ppl": 10.0, "acc": 0.5},
              "pruned": {"layers": 3, "params": 6_000_000, "ppl": 12.0, "acc": 0.45},
              "pruned_before_heal": {"ppl": 30.0, "acc": 0.4}, "heal": heal, "times": {"heal": 90.0}}
    text = summary(report)
    assert "before healing" in text and "3.000x" in text and "1.200x" in text, text
    assert "global stage trains: all" in text and "3: 7, 9: 7" in text and "40.00 -> best 20.00" in text
    report["heal"] = report["pruned_before_heal"] = None
    assert "before healing" not in summary(report) and "healing:" not in summary(report)


def _changed_fraction(autocast: bool) -> tuple[float, torch.nn.Module]:
    t = tiny_model(**TEACHER).to(torch.bfloat16)
    s = drop_layer(t, 2)
    before = s.layers[2].mlp.up.weight.detach().clone()
    # Adam steps of ~lr each: 1e-4 is below half a bf16 step of these weights (|w| ~ 0.15: 2^-3 * 2^-8 / 2)
    cfg = HealConfig(**{**CFG, "warmup_steps": 1}, lr_layer=1e-4, autocast=autocast, global_params="changed")
    heal_pruned(s, t, MAP, [], data=data(), budget_minutes=None, tokens=40 * 128, stages=("layer",),
                progress=False, config=cfg)
    assert all(p.dtype == torch.bfloat16 for p in s.parameters())  # the masters are gone again
    return float((s.layers[2].mlp.up.weight != before).float().mean()), s


def test_bf16_student_trains_through_fp32_masters():
    """A bf16 checkpoint (as loaded on a GPU) heals with fp32 master weights under autocast: updates below
    bf16's resolution accumulate instead of rounding away, and the model comes back in bf16."""
    with_masters, s = _changed_fraction(autocast=True)
    pure_bf16, _ = _changed_fraction(autocast=False)
    assert with_masters > 0.3, with_masters
    assert pure_bf16 < with_masters / 3, (pure_bf16, with_masters)  # 0.15 against 0.81 here
    val = selection_windows()
    assert torch.isfinite(torch.tensor(perplexity(s, val, seq_len=32, batch_size=4)["ppl"]))
