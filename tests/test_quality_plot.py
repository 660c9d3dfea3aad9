"""The real-data quality picture: distances to the best default anchor, and the file."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "load_tests"))
quality_plot = importlib.import_module("quality_plot")

SL, RIVER, VW = "streamlearn (arrays)", "river learn_one", "vw (pyvw, per row)"


def _report() -> dict:
    def row(ds: str, system: str, **kw: float) -> dict:
        return {"dataset": ds, "system": system, "auc": math.nan, "rmse": math.nan, **kw}

    return {
        "argv": ["--real", "--json", "/tmp/x.json"],
        "datasets": [{"name": "a", "task": "binary"}, {"name": "b", "task": "binary"},
                     {"name": "r", "task": "regression"}, {"name": "none", "task": "binary"}],
        "results": [
            row("a", SL, auc=0.80), row("a", RIVER, auc=0.78), row("a", VW, auc=0.79),
            row("b", SL, auc=0.60), row("b", RIVER, auc=0.70),
            row("r", SL, rmse=2.0), row("r", RIVER, rmse=4.0), row("r", VW, rmse=1e12),
            row("none", SL, auc=0.5),  # no anchor figure: left out
            row("synthetic_dense", SL, auc=0.9), row("synthetic_dense", RIVER, auc=0.9),
        ],
    }


def test_distances_are_to_the_best_anchor_sorted_best_first() -> None:
    d = quality_plot.distances(_report())
    assert [name for name, _ in d["auc"]] == ["a", "b"]
    a, b = (vals for _, vals in d["auc"])
    assert a[SL] == pytest.approx(0.01) and a[RIVER] == pytest.approx(-0.01)
    assert b[SL] == pytest.approx(-0.10) and VW not in b
    (name, r), = d["rmse"]
    assert name == "r" and r[SL] == pytest.approx(0.5) and r[RIVER] == pytest.approx(1.0)
    assert r[VW] == pytest.approx(2.5e11)  # a diverged anchor stays, drawn on the edge


def test_draw_writes_a_png_and_an_svg(tmp_path: Path) -> None:
    png = quality_plot.draw(_report(), tmp_path / "q.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in quality_plot.draw(_report(), tmp_path / "q.svg").read_text()
    # The title names the run's arguments, not where it wrote its files.
    assert quality_plot._without_paths(
        ["--real", "--json", "/tmp/x.json", "--plot=q.png", "--datasets", "a"]) == [
        "--real", "--datasets", "a"]
