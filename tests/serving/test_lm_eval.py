"""lm-evaluation-harness's ``local-completions`` model runs a local multiple-choice task against the server
(loopback, offline: a YAML task over a jsonl file in tmp) and gets what ``layerfold eval`` gets on the
same items: the same loglikelihood for every choice and the same acc / acc_norm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("uvicorn", reason="the serve extra brings uvicorn")
pytest.importorskip("lm_eval", reason="the dev extra brings lm-eval")
pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api]")

from layerfold.core.data import mc_task  # noqa: E402
from layerfold.core.loading import load_tokenizer, resolve  # noqa: E402
from layerfold.evaluation.evaluate import encode_pair, loglikelihoods, mc_accuracy  # noqa: E402
from layerfold.serving.server import create_app  # noqa: E402
from tests.support.lm_eval_task import write_mc_task  # noqa: E402
from tests.support.models import smollm2_vocab_spec, tiny_model  # noqa: E402
from tests.support.server import running  # noqa: E402
from tests.support.tolerances import approx  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize("batch_size", [1, 3])  # 3: lm-eval sends several token-id prompts per request
def test_lm_eval_local_completions_matches_layerfold_eval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          batch_size: int) -> None:
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    tok_dir = resolve("smollm2-135m", quiet=True)
    tok = load_tokenizer(tok_dir)
    model = tiny_model(smollm2_vocab_spec(n_layers=2, max_position=2048), seed=4)
    items = mc_task(tok, "pydoc", "val", n=10, seed=1)
    write_mc_task(tmp_path, items, "layerfold_mc")
    want = mc_accuracy(model, tok, items)
    want_ll = loglikelihoods(model, [encode_pair(tok, it.context, it.delimiter + c) for it in items
                                     for c in it.choices])

    app = create_app(model, tok, model_name="tiny", max_batch=4, max_len=512)
    with running(app) as base:
        res: Any = lm_eval.simple_evaluate(
            model="local-completions", tasks=["layerfold_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
            model_args={"base_url": f"{base}/v1/completions", "model": "tiny", "tokenizer": str(tok_dir),
                        "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": 2,
                        "max_retries": 1, "batch_size": batch_size},
            cache_requests=False, log_samples=True)
    got = res["results"]["layerfold_mc"]
    samples = sorted(res["samples"]["layerfold_mc"], key=lambda s: s["doc_id"])
    got_ll = [ll for s in samples for ll, _ in s["filtered_resps"]]
    assert got_ll == approx(want_ll, torch.float32)
    assert got["acc,none"] == want["acc"] and got["acc_norm,none"] == want["acc_norm"]
    assert len(samples) == want["n"] == 10
