"""The real-data quality table as one picture: every system against the best default anchor.

Reads what ``bench_learning.py --real --json FILE`` wrote (``--plot`` there calls this on
the same run) and draws, per data set, each system's distance to the best default anchor
(river, scikit-learn, Vowpal Wabbit) with the targets as lines: AUC minus the best anchor's
for binary and ranking sets (target: >= -0.002), RMSE over the best anchor's for regression
(target: <= 1.02x). Points past the axis limits sit on the edge as arrows, with their value.

    .venv/bin/python load_tests/quality_plot.py real.json docs/learning_quality.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

ANCHORS = ("river learn_one", "sklearn SGD", "vw (pyvw, per row)")
STYLE = {  # system: (label, marker, color, size)
    "streamlearn (arrays)": ("streamlearn", "o", "C3", 36),
    "river learn_one": ("river", "s", "C0", 18),
    "sklearn SGD": ("scikit-learn", "^", "C2", 18),
    "vw (pyvw, per row)": ("Vowpal Wabbit", "D", "C1", 18),
}
AUC_LIMITS = (-0.06, 0.10)
RATIO_LIMITS = (0.4, 2.5)


def distances(report: dict[str, Any]) -> dict[str, list[tuple[str, dict[str, float]]]]:
    """Per panel (``auc``, ``rmse``): ``(data set, {system: distance})``, sorted by
    streamlearn's distance, best first. Data sets without an anchor figure are left out."""
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for r in report["results"]:
        by.setdefault(r["dataset"], {})[r["system"]] = r
    tasks = {d["name"]: d["task"] for d in report["datasets"]}
    out: dict[str, list[tuple[str, dict[str, float]]]] = {"auc": [], "rmse": []}
    for name, systems in by.items():
        if name not in tasks:
            continue  # the synthetic speed and drift streams
        metric = "rmse" if tasks[name] == "regression" else "auc"
        vals = {s: r[metric] for s, r in systems.items()
                if s in STYLE and r.get(metric) is not None and math.isfinite(r[metric])}
        anchors = [vals[s] for s in ANCHORS if s in vals]
        if not anchors or "streamlearn (arrays)" not in vals:
            continue
        if metric == "auc":
            best = max(anchors)
            out[metric].append((name, {s: v - best for s, v in vals.items()}))
        else:
            best = min(anchors)
            out[metric].append((name, {s: v / best for s, v in vals.items()}))
    out["auc"].sort(key=lambda kv: -kv[1]["streamlearn (arrays)"])
    out["rmse"].sort(key=lambda kv: kv[1]["streamlearn (arrays)"])
    return out


def draw(report: dict[str, Any], path: str | Path) -> Path:
    """Write the picture (PNG, or SVG by the name's suffix)."""
    from matplotlib.figure import Figure

    panels = distances(report)
    n_auc, n_rmse = len(panels["auc"]), len(panels["rmse"])
    fig = Figure(figsize=(9, 0.19 * (n_auc + n_rmse) + 2.4), layout="constrained")
    axes = fig.subplots(2, 1, height_ratios=[max(n_auc, 1) + 3, max(n_rmse, 1) + 3])
    _panel(axes[0], panels["auc"], AUC_LIMITS, -0.002, log=False,
           xlabel="AUC minus the best default anchor's (right is better; "
                  "dashed: the target, -0.002)")
    _panel(axes[1], panels["rmse"], RATIO_LIMITS, 1.02, log=True,
           xlabel="RMSE over the best default anchor's (left is better; "
                  "dashed: the target, 1.02x)")
    argv = " ".join(_without_paths(report.get("argv", [])))
    fig.suptitle("Prequential quality on real data, every system at its defaults, one run"
                 + (f"\n(bench_learning.py {argv})" if argv else ""), fontsize=10)
    path = Path(path)
    fig.savefig(path, format="svg" if path.suffix.lower() == ".svg" else "png", dpi=110)
    return path


def _without_paths(argv: list[str]) -> list[str]:
    """The run's arguments without where it wrote its files."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--json", "--plot"):
            skip = True
        elif not a.startswith(("--json=", "--plot=")):
            out.append(a)
    return out


def _panel(ax: Any, rows: list[tuple[str, dict[str, float]]], limits: tuple[float, float],
           target: float, *, log: bool, xlabel: str) -> None:
    lo, hi = limits
    ys = range(len(rows))
    for k, (system, (label, marker, color, size)) in enumerate(STYLE.items()):
        if not any(system in vals for _, vals in rows):
            continue  # not in this run
        xs, yy, clipped = [], [], []
        for y, (_, vals) in zip(ys, rows, strict=True):
            v = vals.get(system)
            if v is None:
                continue
            if v < lo or v > hi:
                clipped.append((y, v))
                continue
            xs.append(v)
            yy.append(y)
        ax.scatter(xs, yy, marker=marker, s=size, color=color, label=label,
                   zorder=3 if system.startswith("streamlearn") else 2, alpha=0.9)
        for y, v in clipped:  # off the axis: an arrow on the edge, with the value
            edge, arrow, align = (lo, "<", "left") if v < lo else (hi, ">", "right")
            ax.scatter([edge], [y], marker=arrow, s=size, color=color, zorder=2)
            text = f"{v:.2g}x" if log else f"{v:+.2f}"
            shift = 6 + 24 * k  # one column per system, so that the values do not overlap
            ax.annotate(text, (edge, y), xytext=(shift if align == "left" else -shift, 0),
                        textcoords="offset points", ha=align, va="center", fontsize=6,
                        color=color)
    if log:
        from matplotlib.ticker import FixedLocator, NullLocator

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([0.4, 0.5, 0.7, 1.0, 1.5, 2.0, 2.5]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(lambda x, _pos: f"{x:g}x")
    ax.set_xlim(lo, hi)
    ax.axvline(target, color="k", linestyle="--", linewidth=0.8)
    ax.axvline(1.0 if log else 0.0, color="k", linewidth=0.5, alpha=0.5)
    ax.set_yticks(list(ys), [name for name, _ in rows], fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_xlabel(xlabel, fontsize=8)
    if not log:  # one legend: the panels share their markers
        ax.legend(loc="lower right", fontsize=7)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", help="JSON written by bench_learning.py --real --json")
    ap.add_argument("out", help="picture to write (.png or .svg)")
    args = ap.parse_args()
    print(f"wrote {draw(json.loads(Path(args.results).read_text()), args.out)}")


if __name__ == "__main__":
    main()
