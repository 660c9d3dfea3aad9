"""``streamlearn evaluate --shuffles K``: the same rows in K seeded orders, mean and spread.

A file whose rows have no order of their own (a table, not a log) is one draw of many
equally arbitrary streams, and on a few thousand rows one draw moves a prequential metric
more than most settings do: over 8 shuffles of the benchmark's Mroz table (753 rows) the
default model's AUC ran from 0.6775 to 0.7032. Replaying K seeded shuffles, each through
fresh models, gives each spec's mean and its standard error over the shuffles and, with
``--compare``, each spec's *paired* difference to the first (both saw the same K orders),
which tells a setting's effect from an order's.

The rows are decoded once, in file order (so an error names its data row), by the same
decoders as a plain replay; each shuffle is then replayed through
:func:`~streamlearn.evaluate.evaluate`, the worker's learning step.

Examples
--------
>>> import dataclasses
>>> from streamlearn.evaluate import Variant
>>> spec = ModelSpec(name="m", topic="t", numeric=("x",), label="y", batch_size=32)
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(600, 1))
>>> y = (x[:, 0] + rng.normal(size=600) > 0).astype(np.float32)
>>> rows = FeatureBatch(x, np.empty((600, 0), np.int64), y, list(range(600)))
>>> sgd = dataclasses.replace(spec, optimizer="sgd")
>>> variants = [Variant("m", spec, None), Variant("sgd", sgd, None)]
>>> report = replay_orders(variants, [rows, rows], 4)
>>> [len(v.per_order) for v in report.variants], report.variants[0].mean("auc") > 0.7
([4, 4], True)
>>> report.variants[1].difference(report.variants[0], "auc")[1] > 0  # its standard error
True
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from streamlearn.config import ModelSpec
from streamlearn.evaluate import (
    BINARY_METRICS,
    REGRESSION_METRICS,
    EvaluateError,
    Variant,
    evaluate,
    format_value,
)
from streamlearn.features import FeatureBatch
from streamlearn.models import OnlineModel


@dataclass
class OrdersResult:
    """One spec over the shuffles: its overall metrics in each order."""

    name: str
    spec: ModelSpec
    changes: list[str]
    rows: int
    labelled: int
    per_order: list[dict[str, Any]]

    def values(self, key: str) -> np.ndarray:
        """``key`` in each order (NaN where undefined)."""
        return np.array([math.nan if m.get(key) is None else m[key] for m in self.per_order])

    def mean(self, key: str) -> float:
        """Mean of ``key`` over the orders."""
        return float(np.mean(self.values(key)))

    def se(self, key: str) -> float:
        """Standard error of that mean over the orders."""
        return _se(self.values(key))

    def difference(self, other: OrdersResult, key: str) -> tuple[float, float]:
        """Paired difference to ``other`` over the same orders: (mean, standard error)."""
        d = self.values(key) - other.values(key)
        return float(np.mean(d)), _se(d)

    def to_dict(self, first: OrdersResult) -> dict[str, Any]:
        """JSON-ready: the metrics per order, their means and errors, and the paired
        differences to ``first`` (none for the first itself)."""
        keys = [k for k in self.per_order[0] if k != "n"]
        out: dict[str, Any] = {
            "name": self.name, "changes": self.changes, "spec": self.spec.to_dict(),
            "rows": self.rows, "labelled": self.labelled, "per_order": self.per_order,
            "mean": {k: _none(self.mean(k)) for k in keys},
            "se": {k: _none(self.se(k)) for k in keys},
        }
        if self is not first:
            out["difference"] = {k: dict(zip(("mean", "se"), map(_none, self.difference(
                first, k)), strict=True)) for k in keys}
        return out


@dataclass
class OrdersReport:
    """Everything ``streamlearn evaluate --shuffles`` prints and writes."""

    source: str
    shuffles: int
    seconds: float
    variants: list[OrdersResult]

    def to_json(self) -> bytes:
        """Indented JSON: the source, the orders' seeds, every spec's figures."""
        first = self.variants[0]
        return orjson.dumps({
            "source": self.source, "task": first.spec.task, "rows": first.rows,
            "shuffles": self.shuffles, "seeds": list(range(1, self.shuffles + 1)),
            "seconds": self.seconds, "variants": [v.to_dict(first) for v in self.variants],
        }, option=orjson.OPT_INDENT_2)


def check_shuffles(k: int) -> None:
    """Refuse fewer than two orders: one has no spread to report."""
    if k < 2:
        raise EvaluateError(f"--shuffles must be at least 2, got {k}")


def replay_orders(variants: Sequence[Variant], batches: Sequence[FeatureBatch], k: int, *,
                  source: str = "", progress: Callable[[int], None] | None = None,
                  ) -> OrdersReport:
    """Replay each spec's rows (``batches[i]`` for ``variants[i]``, the same rows decoded
    for each) in ``k`` seeded shuffles (seeds 1..k, numpy's ``default_rng``), a fresh
    model per spec and order; ``progress(orders_done)`` after each order."""
    check_shuffles(k)
    n = len(batches[0])
    if any(len(b) != n for b in batches):  # pragma: no cover - file decoders keep every row
        raise EvaluateError("the specs read different rows: compare them without --shuffles")
    t0 = time.perf_counter()
    per: list[list[dict[str, Any]]] = [[] for _ in variants]
    for seed in range(1, k + 1):
        order = np.random.default_rng(seed).permutation(n)
        for i, (variant, rows) in enumerate(zip(variants, batches, strict=True)):
            result = evaluate([rows.take(order)], OnlineModel(variant.spec), window=max(1, n))
            per[i].append(result.overall)
        if progress is not None:
            progress(seed)
    labelled = int((~np.isnan(batches[0].labels)).sum())
    results = [OrdersResult(v.name, v.spec, list(v.changes), n, labelled, p)
               for v, p in zip(variants, per, strict=True)]
    return OrdersReport(source, k, time.perf_counter() - t0, results)


def format_orders(report: OrdersReport) -> str:
    """The table ``streamlearn evaluate --shuffles`` prints: one column per spec, each
    figure the mean over the shuffles +- its standard error; then, with more than one spec,
    each one's paired difference to the first."""
    vs = report.variants
    first = vs[0]
    task = first.spec.task
    metrics = REGRESSION_METRICS if task == "regression" else BINARY_METRICS
    label_w = 22
    width = max(20, *(len(v.name) + 2 for v in vs))
    lines = [
        f"{report.source}: {first.rows:,} rows ({first.labelled:,} labelled), {task}, "
        f"{report.shuffles} seeded shuffles: mean +- standard error",
        "",
        " " * label_w + "".join(v.name.rjust(width) for v in vs),
    ]
    for key, label in metrics:
        lines.append(label.ljust(label_w) + "".join(
            _pm(v.mean(key), v.se(key), key).rjust(width) for v in vs))
    if len(vs) > 1:
        lines += ["", f"paired difference to {first.name} (the same {report.shuffles} orders)"]
        for key, label in metrics:
            lines.append(label.ljust(label_w) + "-".rjust(width) + "".join(
                _pm(*v.difference(first, key), key, sign=True).rjust(width) for v in vs[1:]))
    lines.append(f"replay: {report.seconds:.3g} s for {report.shuffles} orders of every spec")
    return "\n".join(lines)


def _pm(mean: float, se: float, key: str, *, sign: bool = False) -> str:
    if math.isnan(mean):
        return "-"
    text = format_value(mean, key)
    if sign and not text.startswith("-"):
        text = "+" + text
    return f"{text} +- {format_value(se, key)}"


def _se(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return math.nan
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def _none(value: float) -> float | None:
    return None if math.isnan(value) else value
