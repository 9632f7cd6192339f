"""Every file of a checkpoint damaged in each way gives a CheckpointError naming the file and the fix (never
a traceback from a library); a save killed with SIGKILL at any stage leaves no half output, keeps the
previous one, and the next save to the same place cleans up after it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import layerfold
from layerfold.core.checkpoint import CheckpointError, save_checkpoint
from layerfold.core.loading import verify_checkpoint
from tests.support.models import tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    m = tiny_model(n_layers=2, seed=0)
    return save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())


def _rewrite(f: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def hurt(p: Path) -> None:
        st = {k: v.clone() for k, v in load_file(str(p)).items()}
        f(st)
        save_file(st, str(p))
    return hurt


def _edit_config(f: Callable[[dict], None]) -> Callable[[Path], None]:
    def hurt(p: Path) -> None:
        cfg = json.loads(p.read_text())
        f(cfg)
        p.write_text(json.dumps(cfg))
    return hurt


DAMAGE = {
    "model.safetensors": {
        "missing": lambda p: p.unlink(),
        "empty": lambda p: p.write_bytes(b""),
        "truncated header": lambda p: p.write_bytes(p.read_bytes()[:6]),
        "truncated data": lambda p: p.write_bytes(p.read_bytes()[:-100]),
        "garbage header": lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" +
                                                  p.read_bytes()[24:]),
        "huge header length": lambda p: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:]),
        "wrong dtype": _rewrite(lambda st: st.__setitem__("embed.weight", st["embed.weight"].to(torch.int32))),
        "wrong shape": _rewrite(lambda st: st.__setitem__("norm.weight", torch.ones(7))),
        "tensor missing": _rewrite(lambda st: st.pop("layers.1.mlp.up.weight")),
        "extra tensor": _rewrite(lambda st: st.__setitem__("layers.9.bogus", torch.ones(2))),
        "a directory": lambda p: (p.unlink(), p.mkdir()),
    },
    "config.json": {
        "missing": lambda p: p.unlink(),
        "empty": lambda p: p.write_text(""),
        "truncated": lambda p: p.write_text(p.read_text()[:50]),
        "not UTF-8": lambda p: p.write_bytes(b"\xff\xfe\x00garbage"),
        "a list": lambda p: p.write_text("[1, 2]"),
        "version a string": _edit_config(lambda c: c.__setitem__("version", "2")),
        "version from the future": _edit_config(lambda c: c.__setitem__("version", 99)),
        "spec missing": _edit_config(lambda c: c.pop("spec")),
        "spec wrong type": _edit_config(lambda c: c["spec"].__setitem__("d_model", "wide")),
        "spec inconsistent": _edit_config(lambda c: c["spec"].__setitem__("d_model", 40)),
        "layers shortened": _edit_config(lambda c: c["spec"]["layers"].pop()),
    },
}
CASES = [(f, how) for f, hows in DAMAGE.items() for how in hows]


@pytest.mark.parametrize("name,how", CASES, ids=[f"{f}-{h}" for f, h in CASES])
def test_damaged_file_is_named(ckpt: Path, name: str, how: str) -> None:
    DAMAGE[name][how](ckpt / name)
    with pytest.raises((CheckpointError, FileNotFoundError)) as e:
        layerfold.load(ckpt, tokenizer=False)
    msg = str(e.value)
    assert "Fix" in msg and (name in msg or str(ckpt) in msg), msg
    with pytest.raises((CheckpointError, FileNotFoundError)):
        verify_checkpoint(ckpt)


# ---- kills at every stage of a save -----------------------------------------------------------------
CHILD = textwrap.dedent("""
    import os, pathlib, signal, sys
    sys.path.insert(0, {root!r})
    import torch
    import safetensors.torch as S
    import layerfold.core.checkpoint as C
    import layerfold.core.paths as P
    from tests.support.models import tiny_model

    stage, out = sys.argv[1], pathlib.Path(sys.argv[2])
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if stage == "weights":  # half the weights file written
        def save_file(t, path, metadata=None):
            pathlib.Path(path).write_bytes(b"\\0" * 4096)
            die()
        C.save_file = save_file
    elif stage == "config":  # weights done, config being written
        real = pathlib.Path.write_text
        def write_text(self, text, *a, **k):
            if self.name == "config.json":
                real(self, text[: len(text) // 2])
                die()
            return real(self, text, *a, **k)
        pathlib.Path.write_text = write_text
    elif stage in ("swap", "rename"):  # between moving the old output aside and renaming the new one in
        real_rename = pathlib.Path.rename
        def rename(self, target):
            r = real_rename(self, target)
            if ".old-" in str(target) or (stage == "rename" and ".tmp-" in self.name):
                die()
            return r
        pathlib.Path.rename = rename
    m = tiny_model(n_layers=2, seed=int(sys.argv[3]))
    C.save_checkpoint(out, m.spec, m.state_dict(), overwrite=True)
""")


@pytest.mark.parametrize("stage", ["weights", "config", "swap", "rename"])
def test_killed_save_leaves_nothing_half_written(tmp_path: Path, stage: str) -> None:
    out = tmp_path / "ck"
    old = tiny_model(n_layers=2, seed=1)
    save_checkpoint(out, old.spec, old.state_dict())
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    r = subprocess.run([sys.executable, str(script), stage, str(out), "2"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == -signal.SIGKILL, r.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ck.")]
    assert leftovers, "the kill came before the save wrote anything: the test does not test"
    if out.exists():  # never half: either the old checkpoint or (killed after the swap) the new one
        verify_checkpoint(out)
    new = tiny_model(n_layers=2, seed=3)
    save_checkpoint(out, new.spec, new.state_dict(), overwrite=True)  # the next save to the same place
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".ck.")]
    assert torch.equal(layerfold.load(out, tokenizer=False)[0].embed.weight, new.embed.weight)


def test_swap_cut_short_restores_the_previous_output(tmp_path: Path) -> None:
    """Killed between its two renames, a save leaves no ``out``: the previous output comes back, never lost."""
    from layerfold.core.paths import clean_stale

    out = tmp_path / "ck"
    old = tiny_model(n_layers=2, seed=1)
    save_checkpoint(out, old.spec, old.state_dict())
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    subprocess.run([sys.executable, str(script), "swap", str(out), "2"], capture_output=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert not out.exists()
    clean_stale(out)
    assert torch.equal(layerfold.load(out, tokenizer=False)[0].embed.weight, old.embed.weight)
