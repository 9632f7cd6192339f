"""Careless input to the CLI ends in one line naming the cause and the fix, exit status 2, before any long
work, and nothing of the user's is lost: the cases of issue 19's "Found" list and their neighbours."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerfold.cli.main import main
from layerfold.core.loading import resolve_alias
from tests.support.models import smollm2_vocab_spec, tiny_hf, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def copy_of(ckpt: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(ckpt, out)
    return out


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors (a --type check) exit 2 from parse_args
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def fails(capsys: pytest.CaptureFixture, *argv: str, match: str, limit_s: float = 20.0) -> str:
    """Run the CLI; assert exit 2 with one error line matching ``match`` and a Fix, within ``limit_s``."""
    t0 = time.perf_counter()
    rc, _, err = cli(capsys, *argv)
    took = time.perf_counter() - t0
    assert rc == 2, err
    assert "Traceback" not in err and "Fix:" in err, err
    assert pytest.importorskip("re").search(match, err), err
    assert took < limit_s, f"the error came after {took:.1f} s"
    return err


# ---- damaged models ---------------------------------------------------------------------------------
def test_int32_tensor(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = copy_of(ckpt, tmp_path)
    st = load_file(str(d / "model.safetensors"))
    st["norm.weight"] = st["norm.weight"].to(torch.int32)
    save_file(st, str(d / "model.safetensors"))
    fails(capsys, "generate", d, "hi", "--max-new-tokens", "1", match="'norm.weight' is stored as int32")


def test_gguf_cut_to_1000_bytes(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERFOLD_CACHE", str(tmp_path / "cache"))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(resolve_alias("smollm2-135m").read_bytes()[:1000])
    fails(capsys, "inspect", cut, match="cut.gguf: could not read the GGUF file")
    assert not any((tmp_path / "cache").glob("*/config.json"))  # no half conversion cached


@pytest.mark.parametrize("config,match", [
    ([1, 2, 3], "holds a JSON list, not an object"),
    ("{not json", "corrupt JSON"),
    ({"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "vocab_size": 97},
     "num_hidden_layers, num_attention_heads missing"),
    ({"model_type": "gpt2"}, "architecture 'gpt2' is not supported"),
])
def test_bad_hf_config(tmp_path: Path, capsys: pytest.CaptureFixture, config: Any, match: str) -> None:
    d = tmp_path / "hf"
    tiny_hf("llama").save_pretrained(d)
    (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    fails(capsys, "inspect", d, match=match)


@pytest.mark.parametrize("change,match", [
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "is quantized \\(gptq\\).*Fix: use the model's "
     "unquantized release"),
    ({"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}, "is quantized \\(fp8\\)"),
    ({"hidden_act": "gelu_pytorch_tanh"}, "hidden_act='gelu_pytorch_tanh'.*Fix:"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "longrope short_factor is None.*Fix:"),
])
def test_hf_config_layerfold_cannot_run(tmp_path: Path, capsys: pytest.CaptureFixture, change: dict[str, Any],
                                        match: str) -> None:
    """A real config with one setting layerfold does not run: refused from config.json, with the fix."""
    d = tmp_path / "hf"
    tiny_hf("llama").save_pretrained(d)
    cfg = {**json.loads((d / "config.json").read_text()), **change}
    if "rope_scaling" in change:  # transformers 5 writes rope_parameters, which would take precedence
        cfg.pop("rope_parameters", None)
    (d / "config.json").write_text(json.dumps(cfg))
    if "quantization_config" in change:  # 4-bit weights take fewer bytes than their count: still named as quantized
        (d / "model.safetensors").write_bytes(b"x" * 1000)
    fails(capsys, "inspect", d, match=match)


@pytest.mark.parametrize("version", ['"2"', "null", "1.5", "-1", "99"])
def test_config_version_not_a_number(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture, version: str) -> None:
    d = copy_of(ckpt, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg).replace('"version": 1', f'"version": {version}'))
    fails(capsys, "inspect", d, match="newer than this layerfold" if version == "99" else "not a whole number")


def test_nonfinite_weights_refused_or_allowed(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = copy_of(ckpt, tmp_path)
    st = load_file(str(d / "model.safetensors"))
    st["layers.1.mlp.down.weight"][0, 0] = float("nan")
    save_file(st, str(d / "model.safetensors"))
    fails(capsys, "generate", d, "hi", match="'layers.1.mlp.down.weight' holds NaN or Inf.*--allow-nonfinite")
    fails(capsys, "eval", d, "--task", "ppl", match="holds NaN or Inf")
    with pytest.warns(UserWarning, match="NaN or Inf"):
        rc, out, err = cli(capsys, "eval", d, "--allow-nonfinite", "--json", "--task", "ppl", "--seq-len", "32",
                           "--max-tokens", "64")
    assert rc == 0, err
    res = json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON"))  # valid, strict JSON
    assert res["ppl"]["ppl"] is None and math.isnan(float("nan"))


# ---- output paths -------------------------------------------------------------------------------------
PRUNE = ("prune", "--method", "shortgpt", "--target", "1", "--no-eval", "--samples", "2", "--seq-len", "16")


def test_overwrite_never_replaces_a_users_folder(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "precious.txt").write_text("mine")
    fails(capsys, PRUNE[0], ckpt, *PRUNE[1:], "--out", out, "--overwrite", match="not written by layerfold")
    assert (out / "sub" / "precious.txt").read_text() == "mine"


def test_overwrite_replaces_layerfold_output(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    rc, _, err = cli(capsys, PRUNE[0], ckpt, *PRUNE[1:], "--out", out, "--quiet")
    assert rc == 0, err
    rc, _, err = cli(capsys, PRUNE[0], ckpt, *PRUNE[1:], "--out", out, "--quiet")
    assert rc == 2 and "--overwrite" in err
    rc, _, err = cli(capsys, PRUNE[0], ckpt, *PRUNE[1:], "--out", out, "--quiet", "--overwrite")
    assert rc == 0, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary left


@pytest.mark.parametrize("where,match", [
    ("afile.txt/sub", "afile.txt is a file, not a directory"),
    ("afile.txt", "exists and is a file"),
    (".", "is the current directory"),
])
def test_bad_out(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                 where: str, match: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile.txt").write_text("x")
    fails(capsys, PRUNE[0], ckpt, *PRUNE[1:], "--out", where, "--overwrite", match=match)
    assert (tmp_path / "afile.txt").read_text() == "x"


def test_stale_temporary_of_a_killed_save_is_cleaned(ckpt: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    stale = tmp_path / f".out.tmp-{dead}-123"
    (stale / "half").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    rc, _, err = cli(capsys, PRUNE[0], ckpt, *PRUNE[1:], "--out", tmp_path / "out", "--quiet")
    assert rc == 0, err
    assert not stale.exists() and (tmp_path / "out" / "config.json").is_file()


# ---- targets and data: errors in seconds, not after calibration ----------------------------------------
@pytest.mark.parametrize("target,match", [
    ("40", "removing 40 of 3 layers: impossible"),
    ("params:0.99", "removing 3 of 3 layers: impossible"),
    ("3", "removing 3 of 3 layers"),
    ("1.5", "not understood"),
    ("params:1.2", "strictly between 0 and 1"),
])
def test_impossible_target_before_loading(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch, target: str, match: str) -> None:
    import layerfold.pipeline as P

    monkeypatch.setattr(P, "load", lambda *a, **k: pytest.fail("loaded the model before checking the target"))
    fails(capsys, "prune", ckpt, "--method", "shortgpt", "--target", target, "--out", tmp_path / "o", match=match,
          limit_s=10)


def test_too_little_data_says_what_prune_has(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import layerfold.calibration.calibrate as C

    monkeypatch.setattr(C, "calibrate", lambda *a, **k: pytest.fail("calibrated before checking the data"))
    text = tmp_path / "small.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog again and again."
                                for i in range(400)))  # ~8K tokens in 14 documents
    err = fails(capsys, "prune", ckpt, "--method", "shortgpt", "--target", "1", "--out", tmp_path / "o",
                "--data", text, "--samples", "64", "--seq-len", "256", match="fewer than 64 samples x 256 tokens")
    assert "--split" not in err and "--samples" in err
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("only a few words here")
    err = fails(capsys, "prune", ckpt, "--method", "shortgpt", "--target", "1", "--out", tmp_path / "o",
                "--data", tiny, "--samples", "1", "--seq-len", "2", match="split")
    assert "--split" not in err


@pytest.mark.parametrize("name", ["random.txt", "random.jsonl"])
def test_binary_data_is_named(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture, name: str) -> None:
    f = tmp_path / name
    f.write_bytes(torch.randint(0, 256, (20000,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
                  .numpy().tobytes())
    fails(capsys, "prune", ckpt, "--method", "shortgpt", "--target", "1", "--out", tmp_path / "o", "--data", f,
          match=f"{name}: not UTF-8 text")
    fails(capsys, "eval", ckpt, "--data", f, match=f"{name}: not UTF-8 text")


def test_serve_port_checked_before_loading(ckpt: Path, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fastapi")
    import layerfold.core.loading as L

    monkeypatch.setattr(L, "load", lambda *a, **k: pytest.fail("loaded the model before checking the port"))
    for port in ("70000", "0", "-1"):
        fails(capsys, "serve", ckpt, "--port", port, match=f"--port {port}.*1..65535", limit_s=5)


def test_device_checked_before_loading(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import layerfold.core.loading as L

    monkeypatch.setattr(L, "load", lambda *a, **k: pytest.fail("loaded the model before checking --device"))
    out = tmp_path / "o"
    fails(capsys, "prune", ckpt, "--method", "shortgpt", "--target", "1", "--out", out, "--device", "gpu",
          match="'gpu' is not a device", limit_s=5)
    fails(capsys, "eval", ckpt, "--device", "mps", match="runs on cpu and cuda", limit_s=5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cmd in (["prune", ckpt, "--method", "shortgpt", "--target", "1", "--out", out], ["heal", ckpt, "--out", out],
                ["calibrate", ckpt, "--out", out], ["bench"]):
        fails(capsys, *cmd, "--device", "cuda", match="'cuda': (this torch build has no CUDA|no CUDA GPU is "
              "visible).*--device cpu", limit_s=5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    fails(capsys, "generate", ckpt, "hi", "--device", "cuda:1", match="1 CUDA device.*cuda:0..cuda:0", limit_s=5)
    assert not out.exists()


# ---- the converted-model cache ----------------------------------------------------------------------
def test_damaged_cached_conversion_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tok: Any) -> None:
    import layerfold.core.loading as L

    monkeypatch.setenv("LAYERFOLD_CACHE", str(tmp_path / "cache"))
    m = tiny_model(smollm2_vocab_spec(n_layers=2), seed=3)
    calls = []

    def fake_read(path: Path, **kw: Any) -> tuple[Any, Any, Any]:
        calls.append(path)
        return m.spec, m.state_dict(), tok

    monkeypatch.setattr(L, "read_gguf", fake_read)
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + b"\0" * 100)
    first = L.resolve(src, quiet=True)
    assert L.resolve(src, quiet=True) == first and len(calls) == 1  # cached
    damage = [("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:5000])),
              ("config.json", lambda p: p.write_text("{")),
              ("model.safetensors", lambda p: p.unlink()),
              ("tokenizer.json", lambda p: p.write_text("[")),
              ("config.json", lambda p: p.unlink())]
    for i, (name, hurt) in enumerate(damage, start=2):
        hurt(first / name)
        assert L.resolve(src, quiet=True) == first and len(calls) == i, name  # detected and converted again
        model, _ = L.load(src, quiet=True)
        assert torch.equal(model.embed.weight, m.embed.weight)
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    os.utime(src)  # unchanged key: still cached


def test_api_load_checks_the_device_first(monkeypatch: pytest.MonkeyPatch) -> None:
    import layerfold
    import layerfold.core.loading as L
    from layerfold.core.devices import check_device

    monkeypatch.setattr(L, "resolve", lambda *a, **k: pytest.fail("read the source before checking the device"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda:0': (this torch build has no CUDA|no CUDA GPU).*Fix: use the cpu"):
        layerfold.load("smollm2-135m", device="cuda:0")
    with pytest.raises(ValueError, match="'tpu' is not a device"):
        check_device("tpu")
    assert check_device("cpu") == torch.device("cpu")
