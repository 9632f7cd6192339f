"""The teacher kept in host memory (``HealConfig(teacher="host")``: one pass over its layers per chunk of
upcoming micro-batches, healing.teacher) heals to the same weights, bit for bit, as the teacher held whole.

On this CPU "host" and "device" are one memory, so the runs differ only in how the teacher's outputs are
made: that is what must not change the result."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from layerfold.healing import teacher as T
from layerfold.healing.common import STATE_DIR, HealConfig
from layerfold.healing.heal import heal_pruned
from tests.healing.test_heal import CFG, MAP, TEACHER, data, drop_layer
from tests.support.models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = HealConfig(**CFG, lr_layer=2e-3, lr_global=2e-3, global_params="all")


def run(cfg: HealConfig, out_dir: Any = None, tokens: int = 5120, changed: list[int] | None = None) -> tuple[Any, Any]:
    t = tiny_model(**TEACHER)
    s = drop_layer(t, 2)
    rep = heal_pruned(s, t, MAP, changed or [], data=data(), budget_minutes=None, tokens=tokens, out_dir=out_dir,
                      progress=False, config=cfg)
    return s, rep


def same(a: Any, b: Any) -> None:
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), k


@pytest.mark.parametrize("change", [
    {},  # both stages, every parameter in the global stage
    {"global_params": "lora"},
    {"accum": 2, "hidden_weight": 0.5},  # two micro-batches a step; the hidden-state term at the correspondences
    {"layer_input": "teacher", "changed": [2]},  # the layer stage then trains the changed layers only
])
def test_host_teacher_heals_bit_identically(change: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T, "MAX_CHUNK", 3)  # several chunks, and chunks that cross an epoch of the data
    passes: list[int] = []
    real = T.TeacherFeed._pass

    def counted(self: Any, items: Any, depths: Any, logits: bool) -> None:
        passes.append(len(items))
        real(self, items, depths, logits)

    monkeypatch.setattr(T.TeacherFeed, "_pass", counted)
    changed = change.pop("changed", None)
    ref, rep_ref = run(replace(BASE, teacher="device", **change), changed=changed)
    got, rep = run(replace(BASE, teacher="host", **change), changed=changed)
    assert rep_ref.config["teacher"] == "device" and rep.config["teacher"] == "host"
    assert rep.curve == rep_ref.curve and rep.tokens == rep_ref.tokens
    same(ref, got)
    steps = rep.steps * rep.config["accum"]  # micro-batches drawn
    # chunks of at most 3, and no teacher work for a micro-batch the phase will not draw (its budget is in tokens)
    assert len(passes) >= steps / 3 and max(passes) == 3 and sum(passes) == steps, passes
    assert "host memory" in rep.memory["global"]["teacher_held"]
    assert "host memory" in rep.memory["layer"]["teacher_held"]


def test_host_teacher_resumes_to_the_identical_result(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T, "MAX_CHUNK", 4)
    ref, rep_ref = run(replace(BASE, teacher="device"))
    _, paused = run(replace(BASE, teacher="host", stop_after_steps=9), tmp_path)  # inside the global stage
    assert paused.status == "paused" and (tmp_path / STATE_DIR / "latest.json").is_file()
    got, rep = run(replace(BASE, teacher="host"), tmp_path)
    assert rep.resumed and rep.curve == rep_ref.curve
    same(ref, got)


def test_chunk_size_follows_the_budget() -> None:
    from layerfold.core.streaming import LayerStream

    t = LayerStream(tiny_model(**TEACHER))
    feed = T.TeacherFeed(t, lambda n: [], budget=10 * 4 * 32 * 53 * 4)  # ten micro-batches' logits (fp32)
    mb = torch.zeros(4, 32, dtype=torch.long)
    assert feed._chunk_size(mb, frozenset(), logits=True) == 10
    assert feed._chunk_size(mb, frozenset({3}), logits=False) == 10 * 53 // 24  # one 24-wide state instead
    feed.budget = 10**12
    assert feed._chunk_size(mb, frozenset({3}), logits=True) == T.MAX_CHUNK
    with pytest.raises(ValueError, match="teacher='disk'. Fix: use one of auto, device, host"):
        T.teacher_place("disk", t, None, torch.device("cpu"), "all")
    assert T.teacher_place("auto", t, None, torch.device("cpu"), "lora") == "device"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_host_teacher_heals_like_a_held_one() -> None:
    """On CUDA the feed keeps the teacher's outputs in host memory and copies each micro-batch's back."""
    def go(where: str) -> tuple[Any, Any]:
        t = tiny_model(**TEACHER)
        s = drop_layer(t, 2).cuda()
        rep = heal_pruned(s, t, MAP, [], data=data(), budget_minutes=None, tokens=3072, progress=False,
                          config=replace(BASE, teacher=where, autocast=False))
        return s, rep

    ref, rep_ref = go("device")
    got, rep = go("host")
    assert rep.config["teacher"] == "host" and "host memory" in rep.memory["global"]["teacher_held"]
    assert rep.curve[-1][1] == pytest.approx(rep_ref.curve[-1][1], rel=1e-3)
    for (k, a), b in zip(ref.state_dict().items(), got.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=k)


def test_layer_stage_plan_counts_a_host_teachers_transfer_once_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """A time budget splits the layer stage in steps from a timed probe. The probe streams the teacher for its
    one micro-batch; with a feed, training shares that transfer across a chunk, so the plan must not count
    it per step. Every block build sleeps 20 ms here, as weights crossing a bus would."""
    import time

    from layerfold.core.streaming import LayerStream
    from layerfold.healing.common import chunks
    from layerfold.healing.loop import HealRun

    real = LayerStream.block

    def slow(self: Any, i: int) -> Any:
        time.sleep(0.02)
        return real(self, i)

    monkeypatch.setattr(LayerStream, "block", slow)

    def plan(where: str) -> list[float]:
        t = tiny_model(**TEACHER)
        d = data()
        run = HealRun(drop_layer(t, 2), LayerStream(t), MAP, [], chunks(d.train, 32, "training"),
                      chunks(d.val, 32, "validation")[-8:], replace(BASE, teacher=where, clock="wall"),
                      ["layer", "global"], 10.0, None, None, False)
        run._w, run._c = time.monotonic(), time.process_time()
        run._plan_layer_stage()
        return run.st["layer_step_cost_s"]

    streamed, fed = plan("device"), plan("host")  # on a CPU the layer stage streams a "device" teacher per step
    assert len(streamed) == len(fed) >= 1
    for a, b in zip(streamed, fed, strict=True):  # each probe built >= 3 blocks: >= 60 ms of "transfer"
        assert b < a - 0.04, (streamed, fed)
