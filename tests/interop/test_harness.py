"""The lm-evaluation-harness adapter (`layerfold` model, `layerfold lm-eval`), offline on local tasks: the same
accuracy as `layerfold eval` on the same items, and the same numbers as `lm_eval --model hf` on an HF export."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")

from layerfold.core.checkpoint import save_checkpoint  # noqa: E402
from layerfold.core.data import load_mc_file, mc_task  # noqa: E402
from layerfold.core.loading import load_tokenizer, resolve  # noqa: E402
from layerfold.evaluation.evaluate import mc_accuracy  # noqa: E402
from layerfold.surgery.depth import apply_depth_plan  # noqa: E402
from layerfold.surgery.plan import DepthPlan  # noqa: E402
from tests.support.lm_eval_task import write_mc_task  # noqa: E402
from tests.support.models import SMOLLM2_VOCAB, smollm2_vocab_spec, tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A depth-pruned tiny model and a Streamline-shaped one (both with the embedded model's tokenizer, random
    weights), their checkpoints, an HF export of the first, and a 24-item local multiple-choice task."""
    from layerfold.interop.hf import export_hf

    root = tmp_path_factory.mktemp("harness")
    tok = load_tokenizer(resolve("smollm2-135m", quiet=True))
    dense = tiny_model(d_model=64, n_layers=3, heads=4, kv_heads=2, ffn=128, vocab=SMOLLM2_VOCAB, tie=True,
                       std=0.08, norm_gains=True, max_position=256)
    depth = apply_depth_plan(dense, DepthPlan(n_layers=3, drop=(1,)))
    ck_depth = save_checkpoint(root / "depth", depth.spec, depth.state_dict(), tokenizer=tok)
    stream = tiny_model(smollm2_vocab_spec(3, max_position=256), std=0.08, norm_gains=True)
    ck_stream = save_checkpoint(root / "stream", stream.spec, stream.state_dict(), tokenizer=tok)
    export_hf(ck_depth, root / "hf")
    items = mc_task(tok, "pydoc", "val", n=24, seed=3)
    tasks = write_mc_task(root / "tasks", items, "lf_mc").parent
    path = tasks / "items.jsonl"
    return {"tok": tok, "depth": (depth, ck_depth), "stream": (stream, ck_stream), "hf": root / "hf",
            "items": path, "tasks": tasks}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def run_task(model, model_args: dict, tasks_dir) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import layerfold.interop.harness  # noqa: F401  (registers "layerfold")

    res = simple_evaluate(model=model, model_args=model_args, tasks=["lf_mc"],
                          task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                          log_samples=True)
    return res


def lls(res: dict) -> list[list[float]]:
    docs = sorted(res["samples"]["lf_mc"], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in docs]


def check_equals_layerfold_eval(res: dict, model, setup) -> None:
    ours = mc_accuracy(model, setup["tok"], load_mc_file(setup["items"]))
    got = res["results"]["lf_mc"]
    assert got["acc,none"] == ours["acc"] and got["acc_norm,none"] == ours["acc_norm"]
    assert math.isclose(got["acc_stderr,none"], ours["acc_stderr"], rel_tol=1e-9)


def test_adapter_on_a_streamline_model_equals_layerfold_eval(setup) -> None:
    model, ckpt = setup["stream"]
    check_equals_layerfold_eval(run_task("layerfold", {"pretrained": str(ckpt), "batch_size": 4}, setup["tasks"]),
                                model, setup)


def test_adapter_equals_layerfold_eval_and_lm_eval_hf_on_an_hf_export(setup) -> None:
    model, ckpt = setup["depth"]
    ours = run_task("layerfold", {"pretrained": str(ckpt), "batch_size": 4}, setup["tasks"])
    check_equals_layerfold_eval(ours, model, setup)
    hf = run_task("hf", {"pretrained": str(setup["hf"]), "dtype": "float32", "device": "cpu", "batch_size": 4},
                  setup["tasks"])
    for key in ("acc,none", "acc_norm,none"):
        assert ours["results"]["lf_mc"][key] == hf["results"]["lf_mc"][key], key
    a, b = torch.tensor(lls(ours)), torch.tensor(lls(hf))
    assert (a - b).abs().max().item() < 1e-4


def test_rolling_and_generation_match_the_hf_model(setup) -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from layerfold.interop.harness import LayerfoldLM

    ours = LayerfoldLM(pretrained=str(setup["depth"][1]), batch_size=3, max_length=40)
    hf = HFLM(pretrained=str(setup["hf"]), dtype="float32", device="cpu", batch_size=3, max_length=40)
    texts = ["The quick brown fox jumps over the lazy dog. " * 6, "def f(x):\n    return x + 1\n", "Hello"]
    roll = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    a, b = ours.loglikelihood_rolling(roll), hf.loglikelihood_rolling(roll)
    assert len(ours.tok_encode(texts[0])) > 40  # several windows
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-4), (a, b)
    gk = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}
    gen = [Instance("generate_until", {}, (t, dict(gk)), i) for i, t in enumerate(["Once upon a time", "x = 1 +"])]
    assert ours.generate_until(gen) == hf.generate_until(gen)


def test_cli_runs_a_local_task_on_a_streamline_model(setup, tmp_path, capsys) -> None:
    from layerfold.cli.main import main

    out = tmp_path / "res.json"
    assert main(["lm-eval", str(setup["stream"][1]), "--tasks", "lf_mc", "--include-path", str(setup["tasks"]),
                 "--limit", "8", "--output", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "lf_mc" in shown and "acc_norm" in shown and "sample_len" not in shown  # metrics only
    res = json.loads(out.read_text())
    assert res["results"]["lf_mc"]["acc,none"] is not None and res["layerfold"]["versions"]["lm_eval"]
    assert main(["lm-eval", str(setup["stream"][1]), "--tasks", "no_such_task", "--include-path",
                 str(setup["tasks"])]) == 2
    # more few-shot examples than the task's other items: the harness's bare "Sample larger than population"
    # becomes an error naming --num-fewshot, and --output is not written
    capsys.readouterr()
    assert main(["lm-eval", str(setup["stream"][1]), "--tasks", "lf_mc", "--include-path", str(setup["tasks"]),
                 "--num-fewshot", "30", "--limit", "2", "--output", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert "30 few-shot examples" in err and "Fix: lower --num-fewshot" in err and not (tmp_path / "none.json").exists()


def test_host_weights_score_and_generate_the_same(setup, monkeypatch) -> None:
    """weights=host: the model stays in host memory and log-likelihoods stream it (evaluation.streamed), in
    several passes when the hidden states exceed the budget; generation decodes on the StreamedRuntime with
    the same greedy completions."""
    from lm_eval.api.instance import Instance

    from layerfold.evaluation import streamed
    from layerfold.interop.harness import LayerfoldLM

    model, ckpt = setup["stream"]
    monkeypatch.setattr(streamed, "HIDDEN_BUDGET", 64 * 40 * 4 * 8)  # about 8 short rows a pass
    res = run_task("layerfold", {"pretrained": str(ckpt), "batch_size": 4, "weights": "host"}, setup["tasks"])
    check_equals_layerfold_eval(res, model, setup)
    plain = run_task("layerfold", {"pretrained": str(ckpt), "batch_size": 4}, setup["tasks"])
    assert torch.allclose(torch.tensor(lls(res)), torch.tensor(lls(plain)), rtol=1e-5, atol=1e-5)
    lm = LayerfoldLM(pretrained=str(ckpt), weights="host", batch_size=1)
    assert lm.weights == "host" and lm.streamed is not None
    roll = [Instance("loglikelihood_rolling", {}, (f"def f{i}(x):\n    return x + {i}\n" * 3,), i) for i in range(12)]
    assert lm.loglikelihood_rolling(roll) == pytest.approx(LayerfoldLM(pretrained=str(ckpt)).loglikelihood_rolling(
        roll), rel=1e-5)
    assert lm.streamed.passes == 2  # twelve one-row batches of ~45 tokens: the budget holds about eight
    gk = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}
    gen = [Instance("generate_until", {}, (t, dict(gk)), i) for i, t in enumerate(["Once upon a time", "x = 1 +"])]
    lm.batch_size_per_gpu = 2  # both prompts in one streamed batch (left-padded there)
    texts = lm.generate_until(gen)
    assert texts == LayerfoldLM(pretrained=str(ckpt)).generate_until(gen) and any(texts)


def test_task_generation_kwargs_reach_the_sampler_or_are_refused() -> None:
    from layerfold.interop.harness import gen_controls

    assert gen_controls({"do_sample": True, "temperature": 0.7, "top_k": 40, "min_p": 0.05}) == {"top_k": 40,
                                                                                                 "min_p": 0.05}
    # HF applies the repetition penalty to greedy decoding too; top_k means nothing without sampling
    assert gen_controls({"do_sample": False, "top_k": 40, "repetition_penalty": 1.2}) == {"repetition_penalty": 1.2}
    assert gen_controls({"num_beams": 1, "num_return_sequences": 1}) == {}
    for bad in ({"num_beams": 4}, {"no_repeat_ngram_size": 3}, {"typical_p": 0.9}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}=.*Fix"):
            gen_controls(bad)
