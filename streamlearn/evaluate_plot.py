"""``streamlearn evaluate --plot``: the per-window metrics over the stream, as PNG or HTML.

Drawn with matplotlib's object API (``Figure``, no pyplot), so no GUI backend and no
global state: PNG through Agg, and for ``.html`` an SVG inlined in a self-contained page.
"""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any

from streamlearn.evaluate import BINARY_METRICS, REGRESSION_METRICS, Report, format_report

_PANELS = {"binary": (BINARY_METRICS[0], BINARY_METRICS[2]),
           "regression": (REGRESSION_METRICS[1], REGRESSION_METRICS[0])}


def _figure(report: Report) -> Any:
    from matplotlib.figure import Figure

    task = report.variants[0].spec.task
    panels = _PANELS["regression" if task == "regression" else "binary"]
    fig = Figure(figsize=(9, 6.2), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True)
    colors = [f"C{i}" for i in range(10)]
    for ax, (key, label) in zip(axes, panels, strict=True):
        for i, v in enumerate(report.variants):
            xs = [w["end"] for w in v.windows]
            ys = [float("nan") if w.get(key) is None else w[key] for w in v.windows]
            color = colors[i % len(colors)]
            overall = v.overall.get(key)
            tail = f" (whole stream {overall:.4g})" if overall is not None else ""
            ax.plot(xs, ys, color=color, marker="o" if len(xs) <= 40 else None,
                    markersize=3, linewidth=1.6, label=f"{v.name}{tail}")
            if overall is not None:
                ax.axhline(overall, color=color, linewidth=0.8, linestyle="--", alpha=0.6)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("rows of the stream (end of each window)")
    axes[-1].xaxis.set_major_formatter(_thousands())
    source = report.source if report.source.startswith("topic ") else Path(report.source).name
    fig.suptitle(f"{source}: prequential metrics per window of {report.window:,} rows\n"
                 f"(test-then-train, {report.rows:,} rows)", fontsize=11)
    return fig


def _thousands() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _pos: f"{x:,.0f}")


def write_plot(report: Report, path: str | Path) -> Path:
    """Write the plot; an ``.html``/``.htm`` name gets a self-contained page, else a PNG."""
    path = Path(path)
    fig = _figure(report)
    if path.suffix.lower() in (".html", ".htm"):
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
        svg = buf.getvalue()
        svg = svg[svg.index("<svg"):]  # drop the XML prolog: the page is HTML
        title = html.escape(f"streamlearn evaluate: {report.source}")
        page = (
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{title}</title><style>body{{font-family:system-ui,sans-serif;"
            "max-width:960px;margin:2em auto;padding:0 1em}pre{background:#f6f6f6;"
            "padding:1em;overflow-x:auto}svg{max-width:100%;height:auto}</style></head>\n"
            f"<body><h1>{title}</h1>\n{svg}\n<pre>{html.escape(format_report(report))}</pre>"
            "\n</body></html>\n")
        path.write_text(page, encoding="utf-8")
    else:
        fig.savefig(path, format="png", dpi=110)
    return path
