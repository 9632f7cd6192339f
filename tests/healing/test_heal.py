"""Healing: layer-wise stage lowers its loss (teacher streamed from a checkpoint), resume is exact, best is kept."""

from __future__ import annotations

import math

import pytest
import torch

from layerfold import build_model, save_checkpoint
from layerfold.evaluation.evaluate import perplexity
from layerfold.healing.common import STATE_DIR, HealConfig, HealData, heal_targets, relative_mse
from layerfold.healing.heal import heal_pruned, load_curve, save_healed
from tests.support.models import tiny_model
from tests.support.tolerances import approx

V = 53


pytestmark = pytest.mark.usefixtures("one_thread")



# the teacher: 24 wide, GQA 4/2 heads of 6, FFN 40, six layers, tied; N(0, 0.15) weights
TEACHER = dict(d_model=24, n_layers=6, heads=4, kv_heads=2, head_dim=6, ffn=40, vocab=V, tie=True, std=0.15)


def drop_layer(t: torch.nn.Module, drop: int) -> torch.nn.Module:
    """The teacher without layer ``drop`` (a copy): layer_map [[0], .., [drop-1], [drop+1], ..]."""
    state = {}
    for k, v in t.state_dict().items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            i = int(i)
            if i == drop:
                continue
            k = f"layers.{i - (i > drop)}.{rest}"
        state[k] = v.clone()
    return build_model(t.spec.with_layers(t.spec.layers[:-1]), state)


def data(seed: int = 0) -> HealData:
    """Token streams with structure (a noisy cycle) so that the teacher's predictions are not uniform."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(6000) * 7 % V
    noise = torch.randint(0, V, (6000,), generator=g)
    keep = torch.rand(6000, generator=g) < 0.7
    s = torch.where(keep, base, noise)
    return HealData(train=s[:5000], val=s[5000:])


def selection_windows() -> torch.Tensor:
    """The validation windows healing selects on with CFG: the last 256 // 32 of the val split (evaluations
    read its first tokens). 1,000 tokens -> windows 23-30 of 31."""
    v = data().val
    return v[: v.numel() // 32 * 32].view(-1, 32)[-8:]


CFG = dict(seq_len=32, micro_batch=4, eval_every=4, val_tokens=256, warmup_steps=2)
MAP = [[0], [1], [3], [4], [5]]  # layer 2 removed: student layer 2 (teacher 3) follows the gap


def test_heal_targets():
    assert heal_targets(MAP, [], 6) == [2]
    assert heal_targets([[0], [1, 2, 3], [4], [5]], [1], 6) == [1]
    assert heal_targets([[0], [1], [2]], [], 5) == [2]  # trailing layers removed: the last layer
    assert heal_targets([[1], [2]], [], 3) == [0]


def test_relative_mse_is_scale_free_per_token():
    y = torch.tensor([[[1.0, 0.0], [1000.0, 0.0]]])
    t = torch.tensor([[[1.1, 0.0], [1100.0, 0.0]]])
    assert relative_mse(y, t).item() == approx((0.1 / 1.1) ** 2, torch.float32)


def test_layer_stage_reduces_loss_with_teacher_streamed_from_checkpoint(tmp_path):
    t = tiny_model(**TEACHER)
    src = save_checkpoint(tmp_path / "teacher", t.spec, t.state_dict())
    s = drop_layer(t, 2)
    untouched = {k: v.clone() for k, v in s.state_dict().items() if not k.startswith("layers.2.")}
    rep = heal_pruned(s, str(src), MAP, [], data=data(), budget_minutes=None, tokens=6000, stages=("layer",),
                      progress=False, config=HealConfig(**CFG, lr_layer=3e-3))
    assert rep.status == "done" and rep.trained_layers == [2]
    (lay,) = rep.layer_stage
    assert lay["stands_for"] == [3, 3] and lay["target"] == "teacher h_4"
    assert lay["probe_loss_after"] < 0.7 * lay["probe_loss_before"], lay
    assert all(torch.equal(untouched[k], v) for k, v in s.state_dict().items() if k in untouched)
    assert "one block at a time" in rep.memory["layer"]["teacher_held"]
    assert rep.best_val_ppl <= rep.start_val_ppl


def _run(out_dir, stop_after=None, **kw):
    t = tiny_model(**TEACHER)
    s = drop_layer(t, 2)
    cfg = HealConfig(**CFG, lr_layer=2e-3, lr_global=2e-3, stop_after_steps=stop_after)
    rep = heal_pruned(s, t, MAP, [], data=data(), budget_minutes=None, tokens=5120, out_dir=out_dir,
                      progress=False, config=cfg, **kw)
    return s, rep


def test_resume_continues_to_the_identical_result(tmp_path):
    ref, rep_ref = _run(None)
    assert rep_ref.status == "done"
    again, _ = _run(None)  # the same seed and token budget: the same healed weights, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), again.state_dict().values(), strict=True))
    _, paused = _run(tmp_path, stop_after=3)  # inside the layer stage
    assert paused.status == "paused" and (tmp_path / STATE_DIR / "latest.json").is_file()
    _, paused2 = _run(tmp_path, stop_after=9)  # resumed, then paused again inside the global stage
    assert paused2.status == "paused" and paused2.resumed and paused2.steps == 12
    got, rep = _run(tmp_path)
    assert rep.status == "done" and rep.resumed
    assert rep.curve == rep_ref.curve and rep.tokens == rep_ref.tokens
    for (k, a), b in zip(ref.state_dict().items(), got.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_resume_refuses_another_run(tmp_path):
    _run(tmp_path, stop_after=2)
    t = tiny_model(**TEACHER)
    with pytest.raises(ValueError, match="different run"):
        heal_pruned(drop_layer(t, 2), t, MAP, [], data=data(), budget_minutes=None, tokens=5120, out_dir=tmp_path,
                    progress=False, config=HealConfig(**{**CFG, "seq_len": 16}))


def test_best_state_is_kept(tmp_path):
    t = tiny_model(**TEACHER)
    s = drop_layer(t, 2)
    cfg = HealConfig(**{**CFG, "eval_every": 2}, lr_global=0.3, grad_clip=100.0)  # diverges after a few steps
    rep = heal_pruned(s, t, MAP, [], data=data(), budget_minutes=None, tokens=4096, stages=("global",),
                      progress=False, config=cfg)
    ppls = [p for _, p in rep.curve]
    assert ppls[-1] > min(ppls), "the test needs a run that gets worse"
    assert rep.best_val_ppl == min(ppls)
    assert perplexity(s, selection_windows(), seq_len=32, batch_size=4)["ppl"] == approx(rep.best_val_ppl,
                                                                                       torch.float32)
    head = data().val[:256].view(-1, 32)  # what an evaluation reads: not what picked the state
    assert perplexity(s, head, seq_len=32, batch_size=4)["ppl"] != approx(rep.best_val_ppl, torch.float32)
    out = save_healed(tmp_path / "healed", s, rep, provenance={"layer_map": MAP})
    assert load_curve(out) == [(int(a), float(b)) for a, b in rep.curve]
    assert math.isfinite(rep.memory["global"]["peak_rss_mib"]) and rep.memory["global"]["params_trained"] > 0


def test_cli_heal_writes_a_checkpoint_and_guards_its_directory(tmp_path, capsys):
    from layerfold.cli.main import main
    from layerfold.core.loading import load, load_tokenizer, resolve

    tok = load_tokenizer(resolve("smollm2-135m", quiet=True))
    t = tiny_model(d_model=16, n_layers=3, heads=2, kv_heads=1, head_dim=8, ffn=24, vocab=len(tok), tie=True, std=0.1)
    teacher = save_checkpoint(tmp_path / "teacher", t.spec, t.state_dict(), tokenizer=tok)
    s = drop_layer(t, 1)
    pruned = save_checkpoint(tmp_path / "pruned", s.spec, s.state_dict(), tokenizer=tok,
                             provenance={"layer_map": [[0], [2]], "changed_layers": [], "teacher": str(teacher)})
    out = tmp_path / "healed"
    args = ["heal", str(pruned), "--out", str(out), "--tokens", "1024", "--seq-len", "64", "--micro-batch", "2",
            "--val-tokens", "256", "--eval-every", "2"]
    assert main(args) == 0
    healed, _ = load(out, quiet=True)
    assert healed.provenance["healed"]["tokens"] == 1024 and healed.provenance["layer_map"] == [[0], [2]]
    assert len(load_curve(out)) >= 3 and (out / STATE_DIR / "latest.json").is_file()
    capsys.readouterr()
    assert main(args) == 2  # a finished run's directory: needs --resume (or another --out)
    assert "--resume" in capsys.readouterr().err


class _Payload:
    """Unpickling this creates the file ``marker``: what a crafted optim.pt could do (run any code)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("keep_new_state", [True, False])
def test_resume_never_unpickles(tmp_path, keep_new_state):
    import pickle

    _run(tmp_path / "run", stop_after=3)
    state = tmp_path / "run" / STATE_DIR
    (ckpt,) = state.glob("ckpt-*")
    marker = tmp_path / "pwned"
    (ckpt / "optim.pt").write_bytes(pickle.dumps(_Payload(str(marker))))
    if keep_new_state:  # the payload beside a good state: ignored, the run resumes
        _, rep = _run(tmp_path / "run")
        assert rep.status == "done" and rep.resumed
    else:  # only the pickle (an older layerfold's state): refused with the fix, not unpickled
        (ckpt / "optim.safetensors").unlink()
        (ckpt / "optim.json").unlink()
        with pytest.raises(ValueError, match="optim.pt, a pickle.*never loaded.*Fix: start over"):
            _run(tmp_path / "run")
    assert not marker.exists()


def test_no_pickle_loading_in_the_package():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    hits = [f"{f.relative_to(root)}: {needle}" for d in ("engine", "kernels") for f in (root / d).rglob("*.py")
            for needle in ("torch.load(", "import pickle", "pickle.load", "weights_only=False", "allow_pickle=True")
            if needle in f.read_text()]
    assert not hits, f"pickle loading found: {hits}"
