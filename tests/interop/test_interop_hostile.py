"""Careless input to `layerfold lm-eval` and the lm-evaluation-harness adapter: refused with the cause and the fix
before the model is loaded (or at least before the evaluation runs), and no file of the user's is overwritten."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lm_eval")

from layerfold.core.checkpoint import save_checkpoint  # noqa: E402
from layerfold.core.data import mc_task  # noqa: E402
from layerfold.core.loading import load_tokenizer, resolve  # noqa: E402
from tests.cli.test_cli_errors import cli, fails  # noqa: E402
from tests.support.lm_eval_task import write_mc_task  # noqa: E402
from tests.support.models import smollm2_vocab_spec, tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-layer checkpoint of 256 positions with the SmolLM2 tokenizer and a local 8-item task."""
    root = tmp_path_factory.mktemp("hostile")
    tok = load_tokenizer(resolve("smollm2-135m", quiet=True))
    m = tiny_model(smollm2_vocab_spec(n_layers=2, max_position=256), seed=0)
    ck = save_checkpoint(root / "model", m.spec, m.state_dict(), tokenizer=tok)
    tasks = write_mc_task(root / "tasks", mc_task(tok, "pydoc", "val", n=8, seed=3), "lf_mc").parent
    return {"model": ck, "tasks": tasks}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import layerfold.interop.harness as H

    monkeypatch.setattr(H, "load", lambda *a, **k: pytest.fail("loaded the model before checking the input"))


def lm_eval_args(setup: dict[str, Path], *args: Any) -> tuple[Any, ...]:
    return ("lm-eval", setup["model"], "--tasks", "lf_mc", "--include-path", setup["tasks"], *args)


@pytest.mark.parametrize("where,match", [
    ("model/config.json", "--output .*config.json: refusing to write into the source"),
    ("model/results.json", "refusing to write into the source"),
    ("nodir/res.json", "its folder .*nodir does not exist"),
    ("adir", "is a directory. Fix: name a file"),
    ("notes.txt", "exists and is not an earlier result of this command.*Fix: choose a new file name"),
])
def test_output_file_checked_before_loading(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                            no_load: None, where: str, match: str) -> None:
    """--output MODEL/config.json replaced the model's own config.json with the results once the evaluation was
    done (the model would no longer load); a missing folder or a directory failed only then, losing the run."""
    (tmp_path / "adir").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    before = (setup["model"] / "config.json").read_bytes()
    path = setup["model"] / where.removeprefix("model/") if where.startswith("model/") else tmp_path / where
    fails(capsys, *lm_eval_args(setup, "--output", path), match=match, limit_s=10)
    assert (setup["model"] / "config.json").read_bytes() == before and (tmp_path / "notes.txt").read_text() == "mine"
    assert not (setup["model"] / "results.json").exists()


def test_an_earlier_result_is_replaced(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "res.json"
    for _ in range(2):
        rc, _, err = cli(capsys, *lm_eval_args(setup, "--limit", "2", "--output", out))
        assert rc == 0, err
    assert json.loads(out.read_text())["layerfold"]["model"] == str(setup["model"])


@pytest.mark.parametrize("args,match", [
    (("--limit", "-5"), "argument --limit: '-5' is neither a whole number of items >= 1 nor a fraction"),
    (("--limit", "0"), "argument --limit: '0' is neither"),
    (("--limit", "nan"), "argument --limit: 'nan' is not a finite number"),
    (("--limit", "2.5"), "argument --limit: '2.5' is neither"),
    (("--batch-size", "0"), "argument --batch-size: 0 must be >= 1"),
    (("--batch-size", "-1"), "argument --batch-size: -1 must be >= 1"),
    (("--max-length", "0"), "argument --max-length: 0 must be >= 2"),
    (("--num-fewshot", "-1"), "argument --num-fewshot: -1 must be >= 0"),
    (("--seed", "-1"), "argument --seed: -1 must be >= 0"),
    (("--seed", str(2**32)), "--seed 4294967296 is outside 0..2\\*\\*32-1"),
])
def test_numbers_checked_before_loading(setup: dict[str, Path], capsys: pytest.CaptureFixture, no_load: None,
                                        args: tuple[str, ...], match: str) -> None:
    """--batch-size 0 and -1, --max-length 0 (read as "the model's") and --num-fewshot -1 ran without a word;
    --limit -5, 0 or nan and a seed outside numpy's range failed after loading, in the harness's words, no fix."""
    fails(capsys, *lm_eval_args(setup, *args), match=match, limit_s=10)


def test_unknown_task_before_loading(setup: dict[str, Path], capsys: pytest.CaptureFixture, no_load: None,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The model was loaded (seconds to minutes for a large one) before the task names were looked up."""
    import lm_eval.tasks

    class Tasks:  # the harness's index, without its seconds of reading thousands of task files
        def __init__(self, **kw: Any):
            self.all_tasks = ["lf_mc"]

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Tasks)
    fails(capsys, *lm_eval_args(setup, "--tasks", "lf_mc,no_such_task"), match="unknown lm-eval task\\(s\\) "
          "\\['no_such_task'\\]", limit_s=10)


def test_max_length_beyond_the_models_context(setup: dict[str, Path], capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """--max-length 100000 on a model of 256 positions scored at positions it was never trained at, silently."""
    import lm_eval as L

    monkeypatch.setattr(L, "simple_evaluate", lambda *a, **k: pytest.fail("evaluated before checking --max-length"))
    fails(capsys, *lm_eval_args(setup, "--max-length", "100000"), match="max_length=100000 is more than the model's "
          "context of 256 positions.*--max-length", limit_s=10)


@pytest.mark.parametrize("kw,match", [
    ({"batch_size": 0}, "batch_size=0 is not a whole number >= 1"),
    ({"batch_size": "many"}, "batch_size='many' is not a whole number"),
    ({"max_length": "0"}, "max_length='0' is not a whole number >= 2"),
    ({"max_gen_toks": 0}, "max_gen_toks=0 is not a whole number >= 1"),
])
def test_adapter_arguments_before_loading(setup: dict[str, Path], no_load: None, kw: dict[str, Any],
                                          match: str) -> None:
    """model_args batch_size=0 ran (and "many" died in int()); max_length=0 was read as the model's own."""
    from layerfold.interop.harness import LayerfoldLM

    with pytest.raises(ValueError, match=f"{match}.*Fix:"):
        LayerfoldLM(pretrained=str(setup["model"]), **kw)


def test_task_data_that_cannot_be_fetched(setup: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    """A task whose dataset is on the Hub, not cached, offline: a ConnectionError traceback."""
    d = tmp_path / "hubtask"
    d.mkdir()
    (d / "hubt.yaml").write_text("task: hubt\ndataset_path: nobody/no_such_dataset_here\ntest_split: test\n"
                                 "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\n"
                                 "doc_to_target: 0\nmetric_list:\n  - metric: acc\n")
    fails(capsys, "lm-eval", setup["model"], "--tasks", "hubt", "--include-path", d, match="a task's data could "
          "not be fetched .*nobody/no_such_dataset_here.*Fix: run it once where there is network", limit_s=15)


def test_an_empty_until_string_stops_nothing(setup: dict[str, Path]) -> None:
    """A task's `until: [""]` is no stop string (generation now refuses an empty one): same text as without it."""
    from lm_eval.api.instance import Instance

    from layerfold.interop.harness import LayerfoldLM

    lm = LayerfoldLM(pretrained=str(setup["model"]))
    req = [Instance("generate_until", {}, ("Once upon", {"until": u, "max_gen_toks": 5}), 0) for u in ([""], [])]
    assert lm.generate_until(req[:1]) == lm.generate_until(req[1:])
