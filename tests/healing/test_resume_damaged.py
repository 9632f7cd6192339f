"""A damaged or hostile heal_state refuses to resume with the cause and the fix, and never reaches (or deletes)
anything outside the run's own heal_state folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerfold.healing.common import STATE_DIR
from tests.healing.test_heal import _run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def paused(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run paused inside its layer stage: heal_state with model, best and optimizer state."""
    out = tmp_path_factory.mktemp("paused") / "run"
    _, rep = _run(out, stop_after=3)
    assert rep.status == "paused"
    return out


def _ckpt(run: Path) -> Path:
    (ck,) = (run / STATE_DIR).glob("ckpt-*")
    return ck


def _edit_json(f: Path, fn: Any) -> None:
    d = json.loads(f.read_text())
    r = fn(d)
    f.write_text(r if isinstance(r, str) else json.dumps(d))


def _edit_tensors(f: Path, fn: Any) -> None:
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f))


def _first_exp_avg(t: dict[str, torch.Tensor]) -> None:
    key = next(k for k in t if k.endswith(".exp_avg"))
    t[key] = torch.zeros(2)


DAMAGE = {
    "latest names ../../etc": (lambda r: (r / STATE_DIR / "latest.json").write_text('{"dir": "../../etc"}'),
                               "latest.json names '../../etc', not a ckpt-N folder"),
    "latest names an absolute path": (lambda r: (r / STATE_DIR / "latest.json").write_text('{"dir": "/tmp"}'),
                                      "names '/tmp', not a ckpt-N folder"),
    "latest names a missing ckpt": (lambda r: (r / STATE_DIR / "latest.json").write_text('{"dir": "ckpt-999"}'),
                                    "names 'ckpt-999'"),
    "latest without dir": (lambda r: (r / STATE_DIR / "latest.json").write_text('{"x": 1}'), "names None"),
    "latest corrupt": (lambda r: (r / STATE_DIR / "latest.json").write_text("{"), "latest.json: JSONDecodeError"),
    "state.json corrupt": (lambda r: (_ckpt(r) / "state.json").write_text("{oops"), "state.json: JSONDecodeError"),
    "state.json deeply nested": (lambda r: (_ckpt(r) / "state.json").write_text("[" * 100_000 + "]" * 100_000),
                                 "state.json: RecursionError"),
    "state.json without fingerprint": (lambda r: _edit_json(_ckpt(r) / "state.json", lambda d: d.pop("fingerprint")),
                                       "no run fingerprint"),
    "state phase a string": (lambda r: _edit_json(_ckpt(r) / "state.json", lambda d: d["state"].update(phase="x")),
                             "'phase' = 'x' is not what a healing run stores"),
    "state tokens negative": (lambda r: _edit_json(_ckpt(r) / "state.json", lambda d: d["state"].update(tokens=-5)),
                              "'tokens' = -5"),
    "state a list": (lambda r: _edit_json(_ckpt(r) / "state.json", lambda d: d.update(state=[1])),
                     "state is not an object"),
    "optimizer a string": (lambda r: _edit_json(_ckpt(r) / "optim.json", lambda d: d.update(optimizer="abc")),
                           "param_groups / scalars are not what layerfold writes"),
    "param_groups a string": (lambda r: _edit_json(_ckpt(r) / "optim.json",
                                                   lambda d: d["optimizer"].update(param_groups="abc")),
                              "param_groups / scalars"),
    "lr a string": (lambda r: _edit_json(_ckpt(r) / "optim.json",
                                         lambda d: [g.update(lr="fast") for g in d["optimizer"]["param_groups"]]),
                    "param_groups / scalars"),
    "current weights of another shape": (
        lambda r: _edit_tensors(_ckpt(r) / "current.safetensors", lambda t: t.update({next(iter(t)): torch.zeros(3)})),
        r"current.safetensors: '.*' is \(3,\) torch.float32, expected"),
    "best weights missing one": (lambda r: _edit_tensors(_ckpt(r) / "best.safetensors", lambda t: t.pop(next(iter(t)))),
                                 r"best.safetensors: '.*' is missing"),
    "current weights truncated": (lambda r: (_ckpt(r) / "current.safetensors").write_bytes(b"\x10" * 100),
                                  "current.safetensors: SafetensorError"),
    "rng state of floats": (lambda r: _edit_tensors(_ckpt(r) / "optim.safetensors",
                                                    lambda t: t.update(rng_state=torch.zeros(3))),
                            "rng_state is \\(3,\\) torch.float32, not a torch RNG state"),
    "AdamW moment of another shape": (lambda r: _edit_tensors(_ckpt(r) / "optim.safetensors", _first_exp_avg),
                                      r"exp_avg has shape \(2,\)"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_state_is_refused_with_the_fix(paused: Path, tmp_path: Path, case: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(paused, run)
    hurt, match = DAMAGE[case]
    hurt(run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(ValueError, match=f"damaged healing state.*{match}.*Fix: start over without --resume"):
        _run(run)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing removed, nothing added


def test_weights_of_a_parameter_the_run_does_not_train(paused: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(paused, run)
    _edit_tensors(_ckpt(run) / "best.safetensors", lambda t: t.update({"not.a.param": torch.zeros(2)}))
    with pytest.raises(ValueError, match="'not.a.param' is .*expected a parameter this run trains"):
        _run(run)


def test_symlinked_state_dir_is_refused_and_nothing_outside_is_touched(paused: Path, tmp_path: Path) -> None:
    """heal_state linked to another folder: refused before any write there (its ckpt-* folders would be pruned)."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "ckpt-000001").mkdir(parents=True)
    (elsewhere / "ckpt-000001" / "mine.txt").write_text("keep")
    run = tmp_path / "run"
    run.mkdir()
    (run / STATE_DIR).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="heal_state is a symbolic link.*Fix: start over"):
        _run(run)
    assert (elsewhere / "ckpt-000001" / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["ckpt-000001"]


def test_a_good_state_still_resumes(paused: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(paused, run)
    _, rep = _run(run)
    assert rep.status == "done" and rep.resumed
