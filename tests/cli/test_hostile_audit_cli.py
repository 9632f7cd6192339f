"""Hostile CLI input an audit found: ``bench --plot`` wrote its chart over a user's image and into the model's own
checkpoint folder, after the whole benchmark. Both are now refused before any work (exit 2, a Fix, nothing
written); a chart the command made earlier is still replaced."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from tests.cli.test_cli_errors import fails

pytestmark = pytest.mark.usefixtures("one_thread")


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        h.update(p.read_bytes() if p.is_file() else b"/")
    return h.hexdigest()


@pytest.fixture
def no_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    import layerfold.evaluation.benchmark as B

    monkeypatch.setattr(B, "bench_models", lambda *a, **k: pytest.fail("benchmarked before checking --plot"))


def test_plot_over_a_users_image_is_refused_first(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  no_bench: None) -> None:
    mine = tmp_path / "holiday.png"
    mine.write_bytes(b"\x89PNG\r\n\x1a\n my own picture")
    fails(capsys, "bench", ckpt, "--plot", mine, match=r"--plot .*holiday\.png: exists and is not an earlier result",
          limit_s=10)
    assert mine.read_bytes() == b"\x89PNG\r\n\x1a\n my own picture"


def test_plot_inside_the_model_is_refused_first(ckpt: Path, capsys: pytest.CaptureFixture, no_bench: None) -> None:
    before = _digest(ckpt)
    fails(capsys, "bench", ckpt, "--plot", ckpt / "chart.png", match="refusing to write into the source", limit_s=10)
    assert _digest(ckpt) == before and not (ckpt / "chart.png").exists()


@pytest.mark.parametrize("ext", ["png", "svg", "pdf"])
def test_an_earlier_chart_may_be_replaced(tmp_path: Path, ext: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from layerfold.cli.bench import check_plot_path

    chart = tmp_path / f"chart.{ext}"
    fig, ax = plt.subplots()
    ax.bar([1], [1])
    fig.savefig(chart)
    plt.close(fig)
    check_plot_path(str(chart), sources=[str(tmp_path / "model")])  # no error: the same command may run again


def test_bench_plot_end_to_end_replaces_only_its_own_chart(ckpt: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    from tests.cli.test_cli_errors import cli

    chart = tmp_path / "bench.png"
    args: tuple[Any, ...] = ("bench", ckpt, "--new-tokens", "2", "--prompt-len", "4", "--repeats", "1",
                             "--no-compile", "--batch-sizes", "1", "--dtype", "float32", "--plot", chart)
    for _ in range(2):  # the second run replaces the first run's chart
        rc, _, err = cli(capsys, *args)
        assert rc == 0, err
        assert chart.read_bytes().startswith(b"\x89PNG")
