"""Hostile or malformed user input beyond model files and the server: numbers, plan files, statistics, --data
lines, output paths into the model cache or a source, healing budgets, sampling settings and bench sizes. Each
ends in one line naming the cause and the fix, exit status 2, before the model is loaded (or any long work),
and nothing of the user's is written or lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from layerfold.core.checkpoint import save_checkpoint
from tests.cli.test_cli_errors import cli, fails
from tests.support.models import SMOLLM2_VOCAB, smollm2_vocab_spec, tiny_model, tiny_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def _calibrate(capsys: pytest.CaptureFixture, model: Path, out: Path) -> Path:
    rc, _, err = cli(capsys, "calibrate", model, "--out", out, "--samples", "2", "--seq-len", "16", "--grams",
                     "--no-progress", "--json")
    assert rc == 0, err
    return out


PRUNE = ("--method", "shortgpt", "--target", "1", "--no-eval", "--samples", "2", "--seq-len", "16")


# ---- numbers -------------------------------------------------------------------------------------------
PAST_CONTEXT = r"sequences of 100000 tokens \(--seq-len\) are longer than the model's context of \d+ positions.*Fix"


@pytest.mark.parametrize("cmd,flag,value,match", [
    ("prune", "--samples", "0", "argument --samples: 0 must be >= 1"),
    ("prune", "--samples", "-3", "argument --samples: -3 must be >= 1"),
    ("prune", "--samples", "abc", "argument --samples: 'abc' is not a whole number"),
    ("prune", "--seq-len", "1", "argument --seq-len: 1 must be >= 2"),
    ("calibrate", "--samples", "0", "argument --samples: 0 must be >= 1"),
    ("calibrate", "--seq-len", "-1", "argument --seq-len: -1 must be >= 2"),
    ("calibrate", "--window", "-2", "argument --window: -2 must be >= 0"),
    ("calibrate", "--window", str(10**12), "window=1000000000000: more than the model's 3 layers.*--window 8 or less"),
    ("calibrate", "--micro-batch", "0", "argument --micro-batch: 0 must be >= 1"),
    ("calibrate", "--offload-dir", "AFILE", "--offload-dir .*afile: not an existing directory"),
    ("calibrate", "--skip-positions", "16", "skip_positions=16 leaves none of a sequence's 16 positions.*Fix"),
    # past the model's context: statistics of positions it was never trained at (it used to run)
    ("calibrate", "--seq-len", "100000", PAST_CONTEXT),
    ("prune", "--seq-len", "100000", PAST_CONTEXT),
])
def test_bad_numbers_before_loading(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_load: None,
                                    cmd: str, flag: str, value: str, match: str) -> None:
    """A window of 10**12 allocated (L, W) sums and died in MemoryError; --offload-dir naming a file died in
    NotADirectoryError after calibration had started; --samples 0 was refused only after loading the model."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    opts = {"--samples": "2", "--seq-len": "16"} if cmd == "calibrate" else {"--samples": "2", "--seq-len": "16",
                                                                              "--method": "shortgpt", "--target": "1"}
    if flag == "--offload-dir":
        opts["--offload"] = "disk"
    opts[flag] = str(afile) if value == "AFILE" else value
    fails(capsys, cmd, ckpt, *[x for kv in opts.items() for x in kv], "--out", tmp_path / "out", match=match,
          limit_s=10)
    assert not (tmp_path / "out").exists() and afile.read_text() == "x"


# ---- output paths: the cache of converted models ----------------------------------------------------------
def test_out_into_the_cache_of_converted_models(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch, no_load: None) -> None:
    """--out naming the cached conversion of smollm2-135m (a layerfold checkpoint, so --overwrite took it) replaced
    the model every later `smollm2-135m` loaded, silently; calibrate wrote statistics over the model it read."""
    from layerfold.core.paths import check_output

    cache = tmp_path / "cache"
    monkeypatch.setenv("LAYERFOLD_CACHE", str(cache))
    m = tiny_model(smollm2_vocab_spec(n_layers=2), seed=1)
    conv = save_checkpoint(cache / "SmolLM2-abc", m.spec, m.state_dict(), provenance={
        "source": "/x/SmolLM2.gguf", "source_format": "gguf", "dequantized_to": "float32"})
    before = {p.name: p.read_bytes() for p in conv.iterdir()}
    for out in (conv, conv / "sub", cache):
        fails(capsys, "prune", ckpt, *PRUNE, "--out", out, "--overwrite", match="cache of converted models",
              limit_s=10)
        fails(capsys, "calibrate", ckpt, "--out", out, "--overwrite", match="cache of converted models", limit_s=10)
        fails(capsys, "convert", ckpt, "--out", out, "--overwrite", match="cache of converted models", limit_s=10)
    assert {p.name: p.read_bytes() for p in conv.iterdir()} == before
    assert check_output(cache / "demo-streamline-8", overwrite=True) == cache / "demo-streamline-8"  # the demo's


# ---- --data ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("line,match", [
    ("[" * 100_000 + "]" * 100_000, "deep.jsonl:1: not a JSON line layerfold can read \\(RecursionError"),
    ('{"text": 5}', 'no "text" string field \\(got "text" holding int\\)'),
])
def test_jsonl_lines_python_cannot_read(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture, line: str,
                                        match: str) -> None:
    f = tmp_path / "deep.jsonl"
    f.write_text(line + "\n")
    fails(capsys, "prune", ckpt, *PRUNE, "--out", tmp_path / "o", "--data", f, match=match)
    fails(capsys, "eval", ckpt, "--data", f, match=match)


# ---- --stats ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stats(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from layerfold.cli.main import main

    out = tmp_path_factory.mktemp("stats") / "st"
    assert main(["calibrate", str(ckpt), "--out", str(out), "--samples", "2", "--seq-len", "16", "--grams",
                 "--no-progress", "--json"]) == 0
    return out


@pytest.mark.parametrize("change,match", [
    ({"version": "2"}, '"version" is \'2\', not a whole number'),
    ({"n_layers": None}, '"n_layers" is None'),
    ({"n_layers": "abc"}, '"n_layers" is \'abc\''),
    ({"n_layers": 3.7}, '"n_layers" is 3.7'),
    ({"counts": [1, 2]}, '"counts" / "meta" are not what calibrate writes'),
    ({"meta": "x"}, '"counts" / "meta"'),
    ("[" * 100_000 + "]" * 100_000, "corrupt JSON \\(RecursionError"),
])
def test_damaged_stats_json(ckpt: Path, stats: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_load: None,
                            change: Any, match: str) -> None:
    """A KeyError, an AttributeError or a RecursionError escaped as a traceback; a str version, a bare TypeError."""
    st = Path(shutil.copytree(stats, tmp_path / "st"))
    cfg = json.loads((st / "stats.json").read_text())
    (st / "stats.json").write_text(change if isinstance(change, str) else json.dumps({**cfg, **change}))
    fails(capsys, "prune", ckpt, *PRUNE, "--out", tmp_path / "o", "--stats", st, match=match, limit_s=10)


def test_stats_of_another_model_with_as_many_layers(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Statistics of a 32-wide model were used for this 64-wide one (same layer count) without a word."""
    m = tiny_model(tiny_spec(d_model=32, n_layers=3, vocab=SMOLLM2_VOCAB, tie=True), seed=1)
    other = save_checkpoint(tmp_path / "other", m.spec, m.state_dict(), tokenizer=tok)
    st = _calibrate(capsys, other, tmp_path / "st")
    import layerfold.pipeline as P

    monkeypatch.setattr(P, "load", lambda *a, **k: pytest.fail("loaded the model before checking --stats"))
    for method, target in (("streamline", "1"), ("dynamic-slicing", "0.2"), ("shortgpt", "1")):
        fails(capsys, "prune", ckpt, "--method", method, "--target", target, "--no-eval", "--out", tmp_path / "o",
              "--stats", st, match=r"statistics of another model \('attn_in.0' is \(32, 32\), this model's is "
              r"\(64, 64\)\).*Fix: calibrate this model", limit_s=10)


# ---- plan files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,match", [
    (json.dumps({"kind": "depth", "n_layers": 10**12, "drop": [1]}), "n_layers = 1000000000000.*1..100000"),
    (json.dumps({"kind": "depth", "n_layers": 3, "merge": [{"first": 0, "last": 10**12}]}),
     "merge 0-1000000000000 names layers out of range for a 3-layer model"),
    ("[" * 100_000 + "]" * 100_000, "nests JSON deeper than Python can read"),
    ('{"kind": "depth", "n_layers": 3, "drop": [' + "9" * 5000 + "]}", "is not valid JSON \\(Exceeds the limit"),
    (b"\xff\xfe\x00\x01" * 100, "is not UTF-8 text"),
    (json.dumps({"kind": "depth", "n_layers": 3, "drop": [1], "notes": "abc"}), '"notes" must be an object'),
])
def test_hostile_plan_files(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_load: None,
                            text: str | bytes, match: str) -> None:
    """n_layers = 10**12 hung walking its layers, a merge to 10**12 died in MemoryError, deep nesting in
    RecursionError; a binary file, a 5000-digit number and notes of the wrong type gave messages without a fix."""
    plan = tmp_path / "plan.json"
    plan.write_bytes(text if isinstance(text, bytes) else text.encode())
    fails(capsys, "prune", ckpt, "--plan", plan, "--out", tmp_path / "o", "--no-eval", match=f"plan: .*{match}",
          limit_s=10)


# ---- heal ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pruned(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from layerfold.cli.main import main

    out = tmp_path_factory.mktemp("pruned") / "p"
    assert main(["prune", str(ckpt), *PRUNE, "--out", str(out), "--quiet", "--json"]) == 0
    return out


@pytest.mark.parametrize("args,match", [
    (("--minutes", "nan"), "argument --minutes: 'nan' is not a finite number"),
    (("--minutes", "inf"), "argument --minutes: 'inf' is not a finite number"),
    (("--minutes", "-1"), "a budget of -1.0 minutes"),
    (("--minutes", "0"), "a budget of 0.0 minutes"),
    (("--tokens", "-5"), "argument --tokens: -5 must be >= 1"),
    (("--tokens", "64", "--lr-global", "nan"), "lr_global=nan must be a finite number > 0"),
    (("--tokens", "64", "--lr-layer", "-1"), "lr_layer=-1.0 must be a finite number > 0"),
    (("--tokens", "64", "--val-tokens", "0"), "val_tokens=0 must be a finite number >= 1"),
    (("--tokens", "64", "--data", "nowhere.txt"), "--data nowhere.txt: no such file"),
    (("--tokens", "64", "--seq-len", "100000"), PAST_CONTEXT),
])
def test_heal_budget_and_settings_before_loading(pruned: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 no_load: None, args: tuple[str, ...], match: str) -> None:
    """--minutes inf died in OverflowError, nan in a bare ValueError; -1 and 0 minutes and -5 tokens trained
    anyway; --lr-global nan failed inside the run and left a half heal_state behind in --out."""
    out = tmp_path / "healed"
    fails(capsys, "heal", pruned, "--out", out, *args, match=match, limit_s=10)
    assert not out.exists()


@pytest.mark.parametrize("where", ["source", "teacher"])
def test_heal_out_inside_a_source_is_refused_before_training(pruned: Path, ckpt: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture, where: str) -> None:
    """--out inside the pruned model (or its teacher) trained for the whole budget, wrote heal_state into the
    source, and was refused only when saving."""
    src = Path(shutil.copytree(pruned, tmp_path / "p"))
    teacher = Path(shutil.copytree(ckpt, tmp_path / "t"))
    before = sorted(p.name for p in src.iterdir())
    out = (src if where == "source" else teacher) / "healed"
    fails(capsys, "heal", src, "--teacher", teacher, "--out", out, "--tokens", "64", "--seq-len", "16",
          match="refusing to write over, inside or around the source", limit_s=10)
    assert not out.exists() and sorted(p.name for p in src.iterdir()) == before
    prov_teacher = json.loads((src / "config.json").read_text())["provenance"]["teacher"]
    assert prov_teacher  # the recorded teacher (no --teacher) is checked too, once the provenance is read
    fails(capsys, "heal", pruned, "--out", Path(prov_teacher) / "healed", "--tokens", "64",
          match="refusing to write over, inside or around the source", limit_s=10)
    assert not (Path(prov_teacher) / "healed").exists()


# ---- generate and bench -----------------------------------------------------------------------------------
@pytest.mark.parametrize("args,match", [
    (("--temperature", "nan"), "temperature=nan.*finite"),
    (("--temperature", "inf", "--seed", "1"), "temperature=inf.*finite"),
    (("--temperature", "1", "--seed", str(10**23)), "seed=100000000000000000000000 is out of range"),
])
def test_generate_sampling_settings_before_loading(ckpt: Path, capsys: pytest.CaptureFixture, no_load: None,
                                                   args: tuple[str, ...], match: str) -> None:
    """NaN and infinite temperatures generated anyway (greedy, or uniform noise); a seed past 2**64 gave
    "Overflow when unpacking long long" after loading."""
    fails(capsys, "generate", ckpt, "hi", "--max-new-tokens", "2", *args, match=match, limit_s=10)


def test_empty_prompt_names_the_fix(ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    """It said the prompt did not fit the cache and to build the Runtime with a larger max_len."""
    fails(capsys, "generate", ckpt, "", "--no-chat", "--max-new-tokens", "2", match="prompt 0 is empty.*Fix: give "
          "a non-empty prompt")


@pytest.mark.parametrize("args,match", [
    (("--threads", "100000"), "--threads 100000: this machine has \\d+ CPUs"),
    (("--batch-sizes", str(10**8)), "100000000 rows x 6 tokens need a .* GiB KV cache, more than the"),
])
def test_bench_sizes_the_machine_cannot_hold(ckpt: Path, capsys: pytest.CaptureFixture, args: tuple[str, ...],
                                             match: str) -> None:
    """--threads 100000 crashed torch (SIGSEGV); a batch of 10**8 built its prompts and cache until memory ran out."""
    fails(capsys, "bench", ckpt, "--new-tokens", "2", "--prompt-len", "4", "--repeats", "1", "--no-compile", *args,
          match=match, limit_s=15)



@pytest.mark.parametrize("name,match", [
    ("nodir/chart.png", "its folder .*nodir does not exist"),
    ("chart.json", "not an image file name.*\\.png"),
    ("adir.png", "is a directory"),
])
def test_bench_plot_path_before_the_benchmark(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch, name: str, match: str) -> None:
    """A --plot the chart could not be written to failed after the whole benchmark (FileNotFoundError, or
    matplotlib's "Format 'json' is not supported"), without a fix."""
    pytest.importorskip("matplotlib")
    import layerfold.evaluation.benchmark as B

    monkeypatch.setattr(B, "bench_models", lambda *a, **k: pytest.fail("benchmarked before checking --plot"))
    (tmp_path / "adir.png").mkdir()
    fails(capsys, "bench", ckpt, "--plot", tmp_path / name, match=match, limit_s=10)
