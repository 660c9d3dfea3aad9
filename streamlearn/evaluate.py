"""``streamlearn evaluate``: replay a stream through the worker's learning path, test-then-train.

Every row is scored by the model as it stands, then learned from, in order, in the
spec's mini-batches: exactly :meth:`OnlineModel.process_many`, the worker's step. What
this module adds is only the bookkeeping around it: it keeps the scores and labels, and
turns them into prequential metrics over the whole stream and per window of rows.

Rows reach the model through the worker's own decoders, so a file row and the same
event sent to the worker get the same features, bit for bit (a test checks it):

- files (CSV, Parquet; :class:`TableFile`) are read with pyarrow in record batches, so a
  large file streams, and each record batch becomes a batch record's columns
  (numerics as float64, categoricals pre-hashed with the worker's crc32, the label as
  float32) checked and turned into features by :class:`~streamlearn.batch_format.FeatureDecoder`;
- Kafka message values (:class:`MessageDecoder`) go through
  :class:`~streamlearn.pipeline.JsonDecoder` and the batch-record decoder; what the
  worker would dead-letter is dropped and counted.

Mini-batch boundaries fall every ``spec.batch_size`` rows from the start of the stream,
whatever size the decoded pieces come in, as they do for a batch record in the worker;
so a replay is deterministic and does not depend on how a file was blocked.

Several model specs (``--compare``) are replayed side by side from one read of the data;
each has its own decoder (hash size and fields may differ) and its own model.

Examples
--------
>>> spec = ModelSpec(name="m", topic="t", numeric=("x",), label="y", batch_size=32)
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(2000, 1))
>>> y = (x[:, 0] + rng.normal(scale=0.5, size=2000) > 0).astype(np.float32)
>>> batches = [FeatureBatch(x[i:i + 300], np.empty((len(x[i:i + 300]), 0), np.int64),
...                         y[i:i + 300], list(range(i, i + len(x[i:i + 300]))))
...            for i in range(0, 2000, 300)]
>>> result = evaluate(batches, OnlineModel(spec, device="cpu"), window=1000)
>>> result.rows, result.labelled, len(result.windows)
(2000, 2000, 2)
>>> result.overall["auc"] > 0.85
True
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
import time
import types
import typing
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

from streamlearn import prequential
from streamlearn.aggregates import AggregateInputs
from streamlearn.batch_format import BatchFormatError, BatchRecord, Column, FeatureDecoder, is_batch
from streamlearn.config import ModelSpec
from streamlearn.features import (
    _MISSING,
    MAX_ABS_VALUE,
    FeatureBatch,
    Vectorizer,
    concat_batches,
    stable_hash,
)
from streamlearn.models import OnlineModel
from streamlearn.pipeline import JsonDecoder, decode_json, decode_record

#: (key, label) of the metrics per task, in the order they are printed.
BINARY_METRICS: tuple[tuple[str, str], ...] = (
    ("auc", "ROC AUC"),
    ("pr_auc", "PR AUC"),
    ("log_loss", "log loss"),
    ("recall_at_1pct_fpr", "recall @ 1% FPR"),
)
REGRESSION_METRICS: tuple[tuple[str, str], ...] = (("mae", "MAE"), ("rmse", "RMSE"))
_HASH_CACHE_LIMIT = 1_000_000
_MAX_REASONS = 20


class EvaluateError(ValueError):
    """Input that cannot be evaluated; the message names the file, column or setting."""


# -- model specs ---------------------------------------------------------------------------


def spec_with(base: Mapping[str, Any], assignments: Iterable[str]) -> ModelSpec:
    """``base`` (a :meth:`ModelSpec.to_dict`) with ``key=value`` assignments applied.

    Values are coerced to the type each :class:`ModelSpec` field declares, whatever the
    fields are: lists split on commas, ``none`` is ``None`` for optional fields, booleans
    read ``true``/``false``, dicts are JSON.

    Examples
    --------
    >>> spec = spec_with({"name": "m", "topic": "t"},
    ...                  ["numeric=a,b", "optimizer=ftrl", "hash_bits=12", "l2=0"])
    >>> spec.numeric, spec.optimizer, spec.hash_bits, spec.l2
    (('a', 'b'), 'ftrl', 12, 0.0)
    >>> spec_with({"name": "m", "topic": "t"}, ["numeric=a", "optimizer=adam"])
    Traceback (most recent call last):
    ...
    streamlearn.evaluate.EvaluateError: optimizer=adam: expected one of 'sgd', 'adagrad', 'ftrl'
    >>> spec_with({"name": "m", "topic": "t"}, ["numeric=a", "speed=3"])
    Traceback (most recent call last):
    ...
    streamlearn.evaluate.EvaluateError: speed=3: not a model setting (known: ...)
    """
    d = dict(base)
    hints = _spec_types()
    for text in assignments:
        key, sep, value = text.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise EvaluateError(f"{text!r}: expected key=value")
        if key not in hints:
            raise EvaluateError(f"{text}: not a model setting (known: {', '.join(sorted(hints))})")
        d[key] = _coerce(hints[key], value.strip(), text)
    try:
        return ModelSpec.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise EvaluateError(f"invalid model spec: {exc}") from None


def split_assignments(text: str) -> list[str]:
    """Split ``"a=1,b=x,y"`` into ``["a=1", "b=x,y"]``: a piece without ``=`` continues a list.

    Examples
    --------
    >>> split_assignments("learning_rate=0.1,numeric=a,b,optimizer=sgd")
    ['learning_rate=0.1', 'numeric=a,b', 'optimizer=sgd']
    """
    out: list[str] = []
    for piece in text.split(","):
        if "=" in piece or not out:
            out.append(piece.strip())
        else:
            out[-1] += "," + piece.strip()
    return [p for p in out if p]


def _spec_types() -> dict[str, Any]:
    hints = typing.get_type_hints(ModelSpec)
    return {f.name: hints.get(f.name, str) for f in dataclasses.fields(ModelSpec)}


def _coerce(tp: Any, value: str, text: str) -> Any:
    """``value`` as an instance of the annotation ``tp``; raise :class:`EvaluateError`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == value:
                return choice
        raise EvaluateError(f"{text}: expected one of {', '.join(map(repr, args))}")
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and value.lower() in ("", "none", "null"):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, text)
            except EvaluateError as exc:
                errors.append(str(exc))
        raise EvaluateError(errors[0] if errors else f"{text}: cannot parse")
    if origin in (tuple, list):
        inner = args[0] if args else str
        items = [v.strip() for v in value.split(",") if v.strip()]
        out = [_coerce(inner, v, text) for v in items]
        return tuple(out) if origin is tuple else out
    if tp is Any or origin is dict or tp is dict:
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            if tp is Any:
                return value
            raise EvaluateError(f"{text}: expected a JSON object") from None
        if tp is not Any and not isinstance(parsed, dict):
            raise EvaluateError(f"{text}: expected a JSON object")
        return parsed
    if tp is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise EvaluateError(f"{text}: expected true or false")
    if tp is int:
        try:
            return int(value)
        except ValueError:
            try:
                f = float(value)
            except ValueError:
                f = math.nan
            if f.is_integer():
                return int(f)
            raise EvaluateError(f"{text}: expected an integer") from None
    if tp is float:
        try:
            return float(value)
        except ValueError:
            raise EvaluateError(f"{text}: expected a number") from None
    if tp is str:
        return value
    try:
        return tp(value)
    except Exception as exc:  # noqa: BLE001 - a field type this module does not know
        raise EvaluateError(f"{text}: {exc}") from None


# -- metrics -------------------------------------------------------------------------------


def stream_metrics(task: str, y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """Prequential metrics of labelled ``y`` and pre-update scores ``p`` (``None`` = undefined).

    Binary and ranking: ROC AUC, PR AUC (average precision), log loss, recall at 1% false
    positive rate, and the positive rate; regression: MAE and RMSE, and the label mean.

    Examples
    --------
    >>> stream_metrics("regression", np.array([1.0, 3.0]), np.array([2.0, 2.0]))
    {'n': 2, 'mae': 1.0, 'rmse': 1.0, 'label_mean': 2.0}
    >>> stream_metrics("binary", np.array([1.0, 1.0]), np.array([0.5, 0.9]))["auc"] is None
    True
    """
    out: dict[str, Any] = {"n": len(y)}
    if task == "regression":
        values = {"mae": prequential.mae(y, p), "rmse": prequential.rmse(y, p),
                  "label_mean": float(np.mean(y)) if len(y) else math.nan}
    else:
        values = {
            "auc": prequential.roc_auc(y, p) if len(y) else math.nan,
            "pr_auc": prequential.average_precision(y, p),
            "log_loss": prequential.log_loss(y, p),
            "recall_at_1pct_fpr": prequential.recall_at_fpr(y, p, 0.01),
            "positive_rate": float(np.mean(y)) if len(y) else math.nan,
        }
    out.update({k: None if math.isnan(v) else v for k, v in values.items()})
    return out


def window_metrics(task: str, labels: np.ndarray, scores: np.ndarray,
                   window: int) -> list[dict[str, Any]]:
    """:func:`stream_metrics` per consecutive ``window`` rows of the stream (the last may be
    short); unlabelled rows (NaN) count as rows but not in the metrics.

    Examples
    --------
    >>> y = np.array([1, 0, np.nan, 1, 0], dtype=np.float32)
    >>> [(w["start"], w["end"], w["n"]) for w in window_metrics("binary", y, y, 2)]
    [(0, 2, 2), (2, 4, 1), (4, 5, 1)]
    """
    out = []
    for lo in range(0, len(labels), window):
        y, p = labels[lo : lo + window], scores[lo : lo + window]
        mask = ~np.isnan(y)
        out.append({"start": lo, "end": lo + len(y), **stream_metrics(task, y[mask], p[mask])})
    return out


# -- driving one model ---------------------------------------------------------------------


def _slice(batch: FeatureBatch, lo: int, hi: int) -> FeatureBatch:
    aux = None if batch.aux is None else batch.aux.take(np.arange(lo, min(hi, len(batch))))
    return FeatureBatch(batch.numeric[lo:hi], batch.hashed[lo:hi], batch.labels[lo:hi],
                        batch.ids[lo:hi], aux)


class Evaluator:
    """Test-then-train one model on consecutive :class:`FeatureBatch` pieces of a stream.

    Rows are handed to ``model.process_many`` in whole mini-batches of ``spec.batch_size``
    (a short piece waits for the next), so the result does not depend on the pieces' sizes.

    ``label_delay`` (seconds of event time): each row is scored on arrival without its
    label, and waits in ``model.pending`` (the worker's delayed-label state); its label is
    joined and learned (``model.learn_joined``, the worker's path for ``<model>.labels``)
    once the stream's event time reaches the row's time plus the delay, before the next
    mini-batch.  The metrics take the scores the rows got on arrival.  Event times come
    from the batches' ``aux`` (:class:`~streamlearn.aggregates.AggregateInputs`); the
    pending state's TTL (``spec.label_ttl_s``) runs in event time too, so a delay past it
    makes every label late (counted in ``model.pending.counts``).
    """

    def __init__(self, model: OnlineModel, label_delay: float | None = None) -> None:
        self.model = model
        self.size = model.spec.batch_size
        self.rows = 0
        self.learn_seconds = 0.0
        self._pending: FeatureBatch | None = None
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        if label_delay is not None and not (math.isfinite(label_delay) and label_delay >= 0):
            raise EvaluateError(f"--label-delay must be a number of seconds >= 0, "
                                f"got {label_delay}")
        self.label_delay = label_delay
        # Labels on their way: (due event time, row keys, labels) per mini-batch, in order.
        self._due: deque[tuple[float, list[int], np.ndarray]] = deque()

    def feed(self, batch: FeatureBatch) -> None:
        """Add the next rows of the stream."""
        if len(batch) == 0:
            return
        if self._pending is not None:
            batch = concat_batches([self._pending, batch])
            self._pending = None
        full = len(batch) - len(batch) % self.size
        if full:
            self._run(_slice(batch, 0, full) if full < len(batch) else batch)
        if full < len(batch):
            self._pending = _slice(batch, full, len(batch))

    def warm_up(self) -> None:
        """Load the compiled step on a throwaway model, so that rows/s measures learning."""
        # hash_bits=1: the same compiled signature without a second copy of a large model
        spec = dataclasses.replace(self.model.spec, hash_bits=1)
        throwaway = OnlineModel(spec, device=self.model.backend.name)
        # A whole mini-batch, so the concept-drift detector is built (river's import) too.
        n = spec.batch_size
        hashed = np.full((n, len(spec.categorical)), spec.first_slot, dtype=np.int64)
        throwaway.process_many(FeatureBatch(np.zeros((n, spec.n_numeric)), hashed,
                                            np.zeros(n, np.float32), list(range(n))))

    def finish(self) -> None:
        """Learn the last, short mini-batch."""
        if self._pending is not None:
            self._run(self._pending)
            self._pending = None

    def _run(self, batch: FeatureBatch) -> None:
        if self.label_delay is not None:
            for lo in range(0, len(batch), self.size):
                self._delayed(_slice(batch, lo, lo + self.size))
            return
        t0 = time.perf_counter()
        steps = self.model.process_many(batch, self.size)
        self.learn_seconds += time.perf_counter() - t0
        self._scores.append(steps.scores)
        self._labels.append(np.array(batch.labels, dtype=np.float32))
        self.rows += len(batch)

    def _delayed(self, batch: FeatureBatch) -> None:
        """One mini-batch under ``label_delay``: learn the labels now due, then score the
        rows without their labels and send those on their way."""
        if batch.aux is None:
            raise EvaluateError(
                "--label-delay needs each row's event time: the spec's time_field "
                f"({self.model.spec.time_field!r}) was not read for this source")
        model, delay = self.model, float(self.label_delay)  # type: ignore[arg-type]
        times = np.asarray(batch.aux.times, dtype=np.float64)
        now = float(times[0])
        t0 = time.perf_counter()
        self.release(now)
        labels = np.array(batch.labels, dtype=np.float32)
        blind = FeatureBatch(batch.numeric, batch.hashed, np.full(len(batch), np.nan,
                                                                  np.float32),
                             batch.ids, batch.aux)
        steps = model.process_many(blind, self.size)  # fills the aggregate columns too
        keys = list(range(self.rows, self.rows + len(batch)))
        model.pending.expire(now=now)
        model.pending.add(keys, blind.numeric, blind.hashed, steps.scores, now=now)
        known = ~np.isnan(labels)
        if known.any():
            rows = np.flatnonzero(known)
            self._due.append((float(times[rows].max()) + delay, [keys[i] for i in rows],
                              labels[rows]))
        self.learn_seconds += time.perf_counter() - t0
        self._scores.append(steps.scores)
        self._labels.append(labels)
        self.rows += len(batch)

    def release(self, now: float) -> None:
        """Join and learn the labels due by event time ``now``."""
        model = self.model
        while self._due and self._due[0][0] <= now:
            _, keys, labels = self._due.popleft()
            joined = model.pending.join(keys, labels, now=now)
            if len(joined):
                model.learn_joined(joined)

    @property
    def scores(self) -> np.ndarray:
        """Every row's score, taken before the model learned from that row."""
        return np.concatenate(self._scores) if self._scores else np.empty(0, np.float32)

    @property
    def labels(self) -> np.ndarray:
        """Every row's label (NaN: unlabelled, scored but not learned)."""
        return np.concatenate(self._labels) if self._labels else np.empty(0, np.float32)


@dataclass
class VariantResult:
    """One model spec's replay: metrics overall and per window, and where the time went."""

    name: str
    spec: ModelSpec
    changes: list[str]
    rows: int
    labelled: int
    overall: dict[str, Any]
    windows: list[dict[str, Any]]
    learn_seconds: float
    decode_seconds: float = 0.0
    dropped: dict[str, int] = field(default_factory=dict)
    #: ``--label-delay``: what became of the labels (:attr:`PendingLabels.counts`).
    label_counts: dict[str, int] = field(default_factory=dict)
    scores: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32), repr=False)
    labels: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (no arrays)."""
        return {
            "name": self.name,
            "changes": list(self.changes),
            "spec": self.spec.to_dict(),
            "rows": self.rows,
            "labelled": self.labelled,
            "overall": self.overall,
            "windows": self.windows,
            "learn_seconds": self.learn_seconds,
            "learn_rows_per_s": self.rows / self.learn_seconds if self.learn_seconds else None,
            "decode_seconds": self.decode_seconds,
            "dropped": dict(self.dropped),
            "labels": dict(self.label_counts),
        }


def _result(name: str, evaluator: Evaluator, window: int, changes: Sequence[str] = ()
            ) -> VariantResult:
    evaluator.finish()
    spec = evaluator.model.spec
    labels, scores = evaluator.labels, evaluator.scores
    mask = ~np.isnan(labels)
    return VariantResult(
        name=name, spec=spec, changes=list(changes), rows=len(labels),
        labelled=int(mask.sum()),
        overall=stream_metrics(spec.task, labels[mask], scores[mask]),
        windows=window_metrics(spec.task, labels, scores, window),
        learn_seconds=evaluator.learn_seconds, scores=scores, labels=labels,
        label_counts=({} if evaluator.label_delay is None
                      else dict(evaluator.model.pending.counts)),
    )


def evaluate(batches: Iterable[FeatureBatch], model: OnlineModel, *, window: int | None = None,
             name: str | None = None, label_delay: float | None = None) -> VariantResult:
    """Replay ``batches`` through ``model``, test-then-train; metrics overall and per window.
    ``label_delay``: see :class:`Evaluator`."""
    ev = Evaluator(model, label_delay)
    for batch in batches:
        ev.feed(batch)
    return _result(name or model.spec.name, ev, window or model.spec.rolling_window)


# -- several specs over one stream ---------------------------------------------------------


class Decoder(Protocol):
    """Turns one chunk of the source (a record batch, a list of messages) into features."""

    dropped: Counter[str]

    def decode(self, chunk: Any) -> FeatureBatch: ...


@dataclass
class Variant:
    """A model spec to replay, with the decoder that reads the source for it."""

    name: str
    spec: ModelSpec
    decoder: Decoder
    changes: list[str] = field(default_factory=list)


@dataclass
class Report:
    """Everything ``streamlearn evaluate`` prints and writes."""

    source: str
    window: int
    seconds: float
    variants: list[VariantResult]
    positive: str | None = None
    label_delay: float | None = None

    @property
    def rows(self) -> int:
        """Rows replayed (of the first spec; a topic's dead letters may differ per spec)."""
        return self.variants[0].rows if self.variants else 0

    @property
    def rows_per_s(self) -> float | None:
        """End to end: reading, decoding and learning every spec, per row of the stream."""
        return self.rows / self.seconds if self.seconds > 0 else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "source": self.source,
            "task": self.variants[0].spec.task if self.variants else None,
            "window": self.window,
            "rows": self.rows,
            "seconds": self.seconds,
            "rows_per_s": self.rows_per_s,
            "positive": self.positive,
            "label_delay": self.label_delay,
            "variants": [v.to_dict() for v in self.variants],
        }

    def to_json(self) -> bytes:
        """Indented JSON of :meth:`to_dict`."""
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)


class Replay:
    """Feed one source to several model specs side by side, chunk by chunk (push style, so a
    file loop and an asyncio Kafka loop drive it alike)."""

    def __init__(self, variants: Sequence[Variant], *, window: int | None = None,
                 limit: int | None = None, source: str = "", positive: str | None = None,
                 label_delay: float | None = None) -> None:
        if not variants:
            raise ValueError("nothing to evaluate: no model spec")
        self.variants = list(variants)
        self.window = window or self.variants[0].spec.rolling_window
        if self.window < 1:
            raise EvaluateError(f"--window must be at least 1, got {self.window}")
        self.limit = limit
        self.source = source
        self.positive = positive
        self.label_delay = label_delay
        self.evaluators = [Evaluator(OnlineModel(v.spec), label_delay) for v in self.variants]
        for ev in self.evaluators:
            ev.warm_up()
        self._fed = [0] * len(self.variants)
        self._decode_seconds = [0.0] * len(self.variants)
        self._t0: float | None = None

    @property
    def done(self) -> bool:
        """True once every spec has seen ``limit`` rows."""
        return self.limit is not None and all(n >= self.limit for n in self._fed)

    def feed(self, chunk: Any) -> int:
        """Decode ``chunk`` for each spec and learn from it; return the first spec's rows."""
        if self._t0 is None:
            self._t0 = time.perf_counter()
        first = 0
        for i, (variant, ev) in enumerate(zip(self.variants, self.evaluators, strict=True)):
            if self.limit is not None and self._fed[i] >= self.limit:
                continue
            t0 = time.perf_counter()
            batch = variant.decoder.decode(chunk)
            self._decode_seconds[i] += time.perf_counter() - t0
            if self.limit is not None and self._fed[i] + len(batch) > self.limit:
                batch = _slice(batch, 0, self.limit - self._fed[i])
            self._fed[i] += len(batch)
            ev.feed(batch)
            if i == 0:
                first = len(batch)
        return first

    def finish(self) -> Report:
        """Learn what is pending; metrics for every spec."""
        results = []
        for i, (variant, ev) in enumerate(zip(self.variants, self.evaluators, strict=True)):
            r = _result(variant.name, ev, self.window, variant.changes)
            r.decode_seconds = self._decode_seconds[i]
            r.dropped = dict(variant.decoder.dropped)
            results.append(r)
        seconds = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        return Report(self.source, self.window, seconds, results, self.positive,
                      self.label_delay)


# -- files ---------------------------------------------------------------------------------

_CSV_CONVERSION = re.compile(r"In CSV column #(\d+): CSV conversion error to (\w+): "
                             r"invalid value '(.*)'", re.S)


def needed_columns(specs: Iterable[ModelSpec], *, times: bool = False) -> dict[str, str]:
    """Every column the specs read, with its role (``numeric``, ``categorical``, ``label``;
    for aggregates ``event time``, ``aggregated field``, ``aggregate entity``; the event
    time also with ``times``, for ``--label-delay``)."""
    roles: dict[str, str] = {}
    for spec in specs:
        for name in spec.numeric:
            roles.setdefault(name, "numeric")
        for name in spec.categorical:
            roles.setdefault(name, "categorical")
        roles.setdefault(spec.label, "label")
        if spec.aggregates or times:
            roles.setdefault(spec.time_field, "event time")
        for a in spec.aggregates:
            roles.setdefault(a.field, "aggregated field")
            roles.setdefault(a.entity, "aggregate entity")
    return roles


class TableFile:
    """A CSV or Parquet file, read in record batches of the columns the specs need.

    The format comes from the content (Parquet's ``PAR1`` magic), then the name; anything
    else is read as CSV (``.tsv``: tab-separated; ``.gz``/``.bz2``/``.zst``: compressed).
    Iterating yields ``(record_batch, first_row)`` chunks for :class:`ArrowDecoder`.
    """

    def __init__(self, path: str | Path, columns: Mapping[str, str], *,
                 batch_rows: int = 65_536, csv_block_bytes: int = 4 << 20) -> None:
        import pyarrow as pa

        self.path = Path(path)
        self.roles = dict(columns)
        self.batch_rows = batch_rows
        self.csv_block_bytes = csv_block_bytes
        name = str(path)
        if not self.path.exists():
            raise EvaluateError(f"{name}: no such file")
        if self.path.is_dir():
            raise EvaluateError(f"{name}: is a directory, not a CSV or Parquet file")
        try:
            with open(self.path, "rb") as f:
                head = f.read(4)
        except OSError as exc:
            raise EvaluateError(f"{name}: cannot read it ({exc.strerror or exc})") from None
        self.size = self.path.stat().st_size
        suffixes = [s.lower() for s in self.path.suffixes]
        self.kind = "parquet" if head == b"PAR1" or (suffixes[-1:] in (
            [".parquet"], [".pq"])) else "csv"
        self._codec = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}.get(
            suffixes[-1] if suffixes else "")
        if self.kind == "csv" and self._codec is None and head[:2] == b"\x1f\x8b":
            self._codec = "gzip"
        self._delimiter = "\t" if ".tsv" in suffixes else ","
        self._raw: pa.NativeFile | None = None
        self.total_rows: int | None = None
        self._rows_read = self._batches_read = 0
        if self.kind == "parquet":
            self._open_parquet()
        else:
            self._open_csv()
        missing = [c for c in self.roles if c not in self.names]
        if missing:
            c = missing[0]
            have = ", ".join(self.names[:30]) + (", ..." if len(self.names) > 30 else "")
            raise EvaluateError(
                f"{name}: column {c!r} ({self.roles[c]} in the model spec) is not in the "
                f"file; its columns are: {have}")

    def _open_parquet(self) -> None:
        import pyarrow.parquet as pq

        try:
            self._pq = pq.ParquetFile(self.path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds
            raise EvaluateError(f"{self.path}: not a readable Parquet file ({exc})") from None
        self.names = list(self._pq.schema_arrow.names)
        self.total_rows = self._pq.metadata.num_rows

    def _input(self) -> Any:
        import pyarrow as pa

        self._raw = pa.OSFile(str(self.path))
        return pa.CompressedInputStream(self._raw, self._codec) if self._codec else self._raw

    def _open_csv(self) -> None:
        try:
            stream = self._input()
            head = stream.read(1 << 20)
        except Exception as exc:  # noqa: BLE001 - OSError, ArrowInvalid for bad compression
            raise EvaluateError(f"{self.path}: cannot read it as CSV ({exc})") from None
        finally:
            if self._raw is not None:
                self._raw.close()
        if b"\0" in head:
            raise EvaluateError(f"{self.path}: not a CSV or Parquet file (binary content)")
        try:
            first = head.split(b"\n", 1)[0].decode("utf-8-sig").rstrip("\r")
        except UnicodeDecodeError:
            raise EvaluateError(f"{self.path}: not a CSV file (not UTF-8 text)") from None
        self.names = next(csv.reader([first], delimiter=self._delimiter), [])
        if not first.strip():
            raise EvaluateError(f"{self.path}: empty CSV file (no header line)")

    def kinds(self) -> dict[str, str]:
        """Each column's kind by its type, ``numeric`` or ``categorical`` (text, booleans,
        and columns empty in the rows read): Parquet's schema, or the types pyarrow infers
        from the first block of a CSV (so a column numeric there that later holds text
        is reported when it is read, naming the column and the row)."""
        import pyarrow as pa

        if self.kind == "parquet":
            schema = self._pq.schema_arrow
        else:
            import pyarrow.csv as pacsv

            try:
                schema = pacsv.open_csv(
                    self._input(), read_options=pacsv.ReadOptions(block_size=self.csv_block_bytes),
                    parse_options=pacsv.ParseOptions(delimiter=self._delimiter)).schema
            except pa.ArrowInvalid as exc:
                raise self._csv_error(str(exc)) from None
            finally:
                if self._raw is not None:
                    self._raw.close()
        numeric = (pa.types.is_integer, pa.types.is_floating, pa.types.is_decimal)
        return {f.name: "numeric" if any(t(f.type) for t in numeric) else "categorical"
                for f in schema}

    def progress(self) -> tuple[float, float | None, str]:
        """``(done, total, unit)`` for a progress bar: bytes for CSV, rows for Parquet.

        CSV bytes are counted as blocks parsed (pyarrow reads ahead on its own threads, so
        the file position runs ahead of the rows); a compressed CSV counts rows, no total.
        """
        if self.kind == "csv" and self._codec is None:
            done = min(self.size, self._batches_read * self.csv_block_bytes)
            return float(done), float(self.size), "B"
        total = float(self.total_rows) if self.total_rows else None
        return float(self._rows_read), total, "rows"

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        self._rows_read = self._batches_read = 0
        batches = self._parquet_batches() if self.kind == "parquet" else self._csv_batches()
        row = 0
        for rb in batches:
            if rb.num_rows:
                self._rows_read = row + rb.num_rows  # counted before the caller feeds it
                self._batches_read += 1
                yield rb, row
                row += rb.num_rows

    def _parquet_batches(self) -> Iterator[Any]:
        try:
            yield from self._pq.iter_batches(batch_size=self.batch_rows, columns=list(self.roles))
        except Exception as exc:  # noqa: BLE001 - a corrupt page or column chunk
            raise EvaluateError(f"{self.path}: cannot read the Parquet data ({exc})") from None

    def _csv_batches(self) -> Iterator[Any]:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        # Numerics as float64 from the start: type inference on the first block would
        # take an int column that later holds 2.5 for int64, and fail there.
        types_ = {c: pa.float64() if role == "numeric" else pa.string()
                  for c, role in self.roles.items()}
        convert = pacsv.ConvertOptions(column_types=types_, include_columns=list(self.roles),
                                       strings_can_be_null=True)
        read = pacsv.ReadOptions(block_size=self.csv_block_bytes)
        parse = pacsv.ParseOptions(delimiter=self._delimiter)
        try:
            reader = pacsv.open_csv(self._input(), read_options=read, parse_options=parse,
                                    convert_options=convert)
            while True:
                try:
                    rb = reader.read_next_batch()
                except StopIteration:
                    break
                yield rb
        except pa.ArrowInvalid as exc:
            raise self._csv_error(str(exc)) from None
        finally:
            if self._raw is not None:
                self._raw.close()

    def _csv_error(self, message: str) -> EvaluateError:
        m = _CSV_CONVERSION.search(message)
        if m and int(m.group(1)) < len(self.names):
            col = self.names[int(m.group(1))]
            where = self._locate(col, m.group(3))
            return EvaluateError(f"{self.path}: column {col!r} ({self.roles.get(col, '?')}): "
                                 f"{m.group(3)!r}{where} is not a number")
        first = message.strip().splitlines()[0][:300] if message.strip() else "unknown error"
        return EvaluateError(f"{self.path}: not a readable CSV file ({first})")

    def _locate(self, col: str, value: str) -> str:
        """Where ``value`` first occurs in column ``col`` (a slow pass, on the error path)."""
        import pyarrow as pa
        import pyarrow.csv as pacsv

        try:
            reader = pacsv.open_csv(
                self._input(), parse_options=pacsv.ParseOptions(delimiter=self._delimiter),
                convert_options=pacsv.ConvertOptions(column_types={col: pa.string()},
                                                     include_columns=[col]))
            row = 0
            for rb in reader:
                values = rb.column(0).to_pylist()
                if value in values:
                    return f" at data row {row + values.index(value) + 1}"
                row += rb.num_rows
        except Exception:  # noqa: BLE001 - only a nicer message is at stake
            pass
        finally:
            if self._raw is not None:
                self._raw.close()
        return ""


class ArrowDecoder:
    """A file's record batch to features, through the worker's batch-record decoder.

    The columns become a batch record's (numerics float64 with NaN for missing,
    categoricals pre-hashed with the worker's crc32 of ``field=value``, the label float32
    with NaN for unlabelled) and :meth:`FeatureDecoder.features` applies the spec, as it
    does for a batch record on the topic.

    Binary labels may be 0/1 numbers, booleans or ``true``/``false``; any other two-valued
    column needs ``positive`` (the value that means 1).

    A spec with aggregates also reads the event time, the aggregated fields and the entity
    fields into the batch's ``aux`` (:class:`~streamlearn.aggregates.AggregateInputs`), as
    the worker's :class:`~streamlearn.features.Vectorizer` does; the model fills the
    aggregate columns as it learns.  ``times``: read the event time even without
    aggregates (``--label-delay``).
    """

    def __init__(self, spec: ModelSpec, *, positive: str | None = None,
                 source: str = "", times: bool = False) -> None:
        self.spec = spec
        self.positive = positive
        self.source = f"{source}: " if source else ""
        self.times = times or bool(spec.aggregates)
        # The batch-record decoder reads the spec's own fields; the aggregate columns are
        # added here (NaN until the model fills them) and the hashed slots shifted past them.
        self._plain = dataclasses.replace(spec, aggregates=()) if spec.aggregates else spec
        self._shift = spec.first_slot - self._plain.first_slot
        self.features = FeatureDecoder(self._plain, Vectorizer(self._plain))
        self.dropped: Counter[str] = Counter()
        self._hashes: dict[str, dict[Any, int]] = {}
        self._label_values: set[str] = set()

    def decode(self, chunk: tuple[Any, int]) -> FeatureBatch:
        """``(record_batch, first_row)`` to a :class:`FeatureBatch`; raise EvaluateError."""
        rb, first = chunk
        spec, n = self.spec, rb.num_rows
        cols: dict[str, Column] = {}
        for name in spec.numeric:
            cols[name] = Column(name, "<f8", self._numeric(rb.column(name), name, first))
        for name in spec.categorical:
            cols[name] = Column(name, "<u4", self._hashed(rb.column(name), name),
                                encoding="crc32")
        cols[spec.label] = Column(spec.label, "<f4", self._labels(rb.column(spec.label), first))
        if spec.id_field not in cols:
            cols[spec.id_field] = Column(spec.id_field, "<i8",
                                         np.arange(first, first + n, dtype=np.int64))
        try:
            batch = self.features.features(BatchRecord(n, cols))
        except BatchFormatError as exc:
            raise EvaluateError(f"{self.source}{exc}") from None
        if self._shift:
            numeric = np.full((n, spec.n_numeric), np.nan)
            numeric[:, : batch.numeric.shape[1]] = batch.numeric
            batch = FeatureBatch(numeric, batch.hashed + self._shift, batch.labels, batch.ids)
        if self.times:
            batch.aux = self._aux(rb, first)
        return batch

    def _aux(self, rb: Any, first: int) -> AggregateInputs:
        """What the aggregates read: event times (required), aggregated values (NaN when
        missing) and entity keys (strings or integers, None when missing)."""
        spec = self.spec
        name = spec.time_field
        times = self._numeric(rb.column(name), name, first, role="event time")
        gaps = np.flatnonzero(np.isnan(times))
        if len(gaps):
            raise EvaluateError(f"{self.source}column {name!r} (event time): missing at data "
                                f"row {first + int(gaps[0]) + 1}; the model's aggregates and "
                                "--label-delay need every row's time (Unix seconds)")
        values = np.empty((len(times), len(spec.aggregates)))
        for k, a in enumerate(spec.aggregates):
            values[:, k] = self._numeric(rb.column(a.field), a.field, first,
                                         role="aggregated field")
        keys = [self._keys(rb.column(e), e) for e in spec.aggregate_entities]
        return AggregateInputs(times, values, keys)

    def _keys(self, arr: Any, name: str) -> list[Any]:
        import pyarrow as pa

        t = arr.type
        if pa.types.is_dictionary(t):
            arr = arr.cast(t.value_type)
            t = arr.type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)
                or pa.types.is_integer(t) or pa.types.is_null(t)):
            raise EvaluateError(f"{self.source}column {name!r} (aggregate entity) holds {t} "
                                "values; the worker takes strings or integers")
        return arr.to_pylist()

    def _where(self, name: str, role: str, row: int, value: Any, what: str) -> EvaluateError:
        return EvaluateError(f"{self.source}column {name!r} ({role}): {value!r} at data row "
                             f"{row + 1} {what}")

    def _numeric(self, arr: Any, name: str, first: int, role: str = "numeric") -> np.ndarray:
        import pyarrow as pa

        t = arr.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            for i, v in enumerate(arr.to_pylist()):
                if v is None:
                    continue
                try:
                    float(v)
                except ValueError:
                    raise self._where(name, role, first + i, v, "is not a number") from None
        elif not (pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_decimal(t)
                  or pa.types.is_null(t)):
            raise EvaluateError(f"{self.source}column {name!r} ({role}) holds {t} values, "
                                "not numbers")
        try:
            x = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid as exc:
            raise EvaluateError(f"{self.source}column {name!r} ({role}): {exc}") from None
        bad = np.flatnonzero(np.abs(x) > MAX_ABS_VALUE)  # the worker's bound (inf too)
        if len(bad):
            raise self._where(name, role, first + int(bad[0]), float(x[bad[0]]),
                              f"has a magnitude above {MAX_ABS_VALUE:g}")
        return x

    def _hashed(self, arr: Any, name: str) -> np.ndarray:
        import pyarrow as pa
        import pyarrow.compute as pc

        t = arr.type
        if not pa.types.is_dictionary(t):
            if not (pa.types.is_string(t) or pa.types.is_large_string(t)
                    or pa.types.is_integer(t) or pa.types.is_null(t)):
                raise EvaluateError(
                    f"{self.source}column {name!r} (categorical) holds {t} values; the "
                    "worker takes strings or integers (list it as numeric, or cast it)")
            arr = pc.dictionary_encode(arr)
        values = arr.dictionary.to_pylist()
        if values and any(isinstance(v, bool | float) for v in values[:1]):
            raise EvaluateError(f"{self.source}column {name!r} (categorical) holds "
                                f"{arr.dictionary.type} values; want strings or integers")
        cache = self._hashes.setdefault(name, {})
        if len(cache) > _HASH_CACHE_LIMIT:
            cache.clear()
        table = np.empty(len(values) + 1, dtype=np.uint32)
        for i, v in enumerate(values):
            h = cache.get(v)
            if h is None:  # the worker's slot: crc32 of "field\x1fstr(value)"
                h = cache[v] = stable_hash(name, v if isinstance(v, str) else str(v))
            table[i] = h
        table[-1] = stable_hash(name, _MISSING)
        codes = pc.fill_null(arr.indices.cast(pa.int64()), len(values))
        return table[codes.to_numpy(zero_copy_only=False)]

    def _labels(self, arr: Any, first: int) -> np.ndarray:
        import pyarrow as pa
        import pyarrow.compute as pc

        spec, name = self.spec, self.spec.label
        t = arr.type
        if pa.types.is_dictionary(t):
            arr = arr.cast(t.value_type)
            t = arr.type
        if pa.types.is_boolean(t) and spec.task != "regression":
            return arr.cast(pa.float32()).to_numpy(zero_copy_only=False).astype(np.float32)
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            if self.positive is not None and spec.task != "regression":
                return self._positive(arr, first)
            try:
                arr = pc.cast(arr, pa.float64())
            except pa.ArrowInvalid:
                return self._string_labels(arr, first)
            t = arr.type
        if not (pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_decimal(t)
                or pa.types.is_null(t)):
            raise EvaluateError(f"{self.source}label column {name!r} holds {t} values")
        y = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
        if self.positive is not None and spec.task != "regression":
            try:
                pos = float(self.positive)
            except ValueError:
                raise EvaluateError(f"{self.source}--positive {self.positive!r}: label column "
                                    f"{name!r} holds numbers") from None
            self._two_values(np.unique(y[~np.isnan(y)]).tolist(), first)
            return np.where(np.isnan(y), np.nan, y == pos).astype(np.float32)
        if spec.task == "regression":
            bad = np.flatnonzero(np.abs(y) > MAX_ABS_VALUE)
            if len(bad):
                raise self._where(name, "label", first + int(bad[0]), float(y[bad[0]]),
                                  f"has a magnitude above {MAX_ABS_VALUE:g}")
            return y.astype(np.float32)
        bad = np.flatnonzero(~np.isnan(y) & (y != 0.0) & (y != 1.0))
        if len(bad):
            raise self._where(name, "label", first + int(bad[0]), float(y[bad[0]]),
                              f"is not 0 or 1 ({spec.task} task; for another pair of values "
                              "pass --positive VALUE)")
        return y.astype(np.float32)

    def _string_labels(self, arr: Any, first: int) -> np.ndarray:
        """true/false text (any case), else a clear error."""
        import pyarrow as pa
        import pyarrow.compute as pc

        name = self.spec.label
        if self.spec.task == "regression":
            for i, v in enumerate(arr.to_pylist()):
                try:
                    if v is not None:
                        float(v)
                except ValueError:
                    raise self._where(name, "label", first + i, v, "is not a number") from None
            raise EvaluateError(f"{self.source}label column {name!r}: cannot read it as numbers")
        low = pc.utf8_lower(pc.utf8_trim_whitespace(arr))
        distinct = [v for v in pc.unique(low).to_pylist() if v is not None]
        if set(distinct) <= {"true", "false", "0", "1", "0.0", "1.0"}:
            y = pc.is_in(low, value_set=pa.array(["true", "1", "1.0"]))
            out = y.cast(pa.float32()).to_numpy(zero_copy_only=False).astype(np.float32)
            out[np.asarray(low.is_null())] = np.nan
            return out
        shown = ", ".join(repr(v) for v in pc.unique(arr).drop_null().to_pylist()[:5])
        raise EvaluateError(
            f"{self.source}label column {name!r} holds text ({shown}); a {self.spec.task} "
            "label is 0/1 or true/false: pass --positive VALUE to say which value is the "
            "positive class")

    def _positive(self, arr: Any, first: int) -> np.ndarray:
        import pyarrow as pa
        import pyarrow.compute as pc

        self._two_values(pc.unique(arr).drop_null().to_pylist(), first)
        y = pc.equal(arr, pa.scalar(self.positive)).cast(pa.float32())
        return y.to_numpy(zero_copy_only=False).astype(np.float32)  # null -> NaN, unlabelled

    def _two_values(self, values: list[Any], first: int) -> None:
        self._label_values.update(str(v) for v in values)
        if len(self._label_values) > 2:
            shown = ", ".join(repr(v) for v in sorted(self._label_values)[:5])
            raise EvaluateError(
                f"{self.source}label column {self.spec.label!r} has more than two values "
                f"({shown}, by data row {first + 1}...); a {self.spec.task} label has two")


# -- Kafka messages ------------------------------------------------------------------------


class MessageDecoder:
    """Kafka message values to features with the worker's decoders (JSON events and batch
    records, told apart by the first byte); what the worker would dead-letter is dropped
    and counted by reason.

    Examples
    --------
    >>> spec = ModelSpec(name="m", topic="t", numeric=("x",), label="y", hash_bits=4)
    >>> dec = MessageDecoder(spec)
    >>> batch = dec.decode([b'{"x": 1, "y": 1}', b'oops', b'{"x": "two", "y": 0}'])
    >>> len(batch), sum(dec.dropped.values())
    (1, 2)
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        vec = Vectorizer(spec)
        self.json = JsonDecoder(spec, vec)
        self.batches = FeatureDecoder(spec, vec)
        self.dropped: Counter[str] = Counter()

    def decode(self, values: Sequence[bytes | None]) -> FeatureBatch:
        """Decode in message order: JSON runs together, batch records one by one."""
        parts: list[FeatureBatch] = []
        run: list[bytes | None] = []
        for value in values:
            if is_batch(value):
                self._json(run, parts)
                run = []
                try:
                    parts.append(decode_record(self.batches, value))  # type: ignore[arg-type]
                except BatchFormatError as exc:
                    self._drop(f"bad batch record: {exc}")
            else:
                run.append(value)
        self._json(run, parts)
        parts = [p for p in parts if len(p)]
        if not parts:
            return FeatureBatch(np.empty((0, self.spec.n_numeric)),
                                np.empty((0, len(self.spec.categorical)), np.int64),
                                np.empty(0, np.float32), [])
        return concat_batches(parts)

    def _json(self, values: list[bytes | None], parts: list[FeatureBatch]) -> None:
        if values:
            batch, rejects = decode_json(self.json, values)
            for _, reason in rejects:
                self._drop(reason)
            parts.append(batch)

    def _drop(self, reason: str) -> None:
        key = reason if reason in self.dropped or len(self.dropped) < _MAX_REASONS else "other"
        self.dropped[key] += 1


# -- printing ------------------------------------------------------------------------------


def format_value(value: Any, key: str = "") -> str:
    """A figure as the tables print it: counts with separators, MAE/RMSE to 4
    significant digits, other metrics to 4 decimals, ``-`` when undefined."""
    if value is None:
        return "-"
    if isinstance(value, int | np.integer):
        return f"{value:,}"
    if key in ("mae", "rmse", "label_mean"):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return f"{value:.4f}"


def format_report(report: Report, *, max_windows: int = 12) -> str:
    """The table ``streamlearn evaluate`` prints: one column per spec."""
    vs = report.variants
    first = vs[0]
    task = first.spec.task
    lines = [
        f"{report.source}: {report.rows:,} rows ({first.labelled:,} labelled), {task}, "
        f"window {report.window:,} rows"
        + ("" if report.label_delay is None else
           f", labels learned {report.label_delay:g} s of event time after their rows"),
    ]
    names = [v.name for v in vs]
    width = max(12, *(len(n) + 2 for n in names))
    label_w = 22
    metrics = REGRESSION_METRICS if task == "regression" else BINARY_METRICS
    extra = (("label_mean", "label mean"),) if task == "regression" else (
        ("positive_rate", "positive rate"),)
    header = " " * label_w + "".join(n.rjust(width) for n in names)
    lines += ["", header]
    for key, label in (*metrics, *extra):
        lines.append(label.ljust(label_w) + "".join(
            format_value(v.overall.get(key), key).rjust(width) for v in vs))
    lines.append("learn rows/s".ljust(label_w) + "".join(
        (f"{v.rows / v.learn_seconds:,.0f}" if v.learn_seconds else "-").rjust(width)
        for v in vs))
    dropped = [sum(v.dropped.values()) for v in vs]
    if any(dropped):
        lines.append("dropped messages".ljust(label_w) + "".join(f"{d:,}".rjust(width)
                                                                 for d in dropped))
    rate = report.rows_per_s
    lines.append(f"replay: {report.seconds:.3g} s, "
                 + (f"{rate:,.0f} rows/s" if rate else "-")
                 + " end to end (read, decode, learn" + (" every spec)" if len(vs) > 1 else ")"))
    windows = first.windows
    if len(windows) > 1:
        key, label = metrics[0]
        step = max(1, math.ceil(len(windows) / max_windows))
        shown = list(range(0, len(windows), step))
        if shown[-1] != len(windows) - 1:
            shown.append(len(windows) - 1)
        note = "" if step == 1 else f", one in {step} of {len(windows)} shown (all in --json)"
        lines += ["", f"{label} per window of {report.window:,} rows{note}:",
                  "rows".ljust(label_w) + "".join(n.rjust(width) for n in names)]
        for i in shown:
            w = windows[i]
            span = f"{w['start']:,}-{w['end']:,}"
            lines.append(span.ljust(label_w) + "".join(
                format_value(v.windows[i].get(key) if i < len(v.windows) else None,
                             key).rjust(width)
                for v in vs))
    for v in vs:
        if v.label_counts:
            c = v.label_counts
            told = sum(c.get(k, 0) for k in ("joined", "late", "duplicate", "unknown"))
            lines.append(f"{v.name}: labels joined {c.get('joined', 0):,}, late "
                         f"{c.get('late', 0):,} (past label_ttl_s or max_pending), not due "
                         f"by the end {v.labelled - told:,}")
        if v.dropped:
            top = sorted(v.dropped.items(), key=lambda kv: -kv[1])[:3]
            lines.append(f"{v.name}: dropped (the worker would dead-letter): "
                         + "; ".join(f"{n:,} x {r[:80]}" for r, n in top))
    return "\n".join(lines)


def make_variants(base: ModelSpec, compare: Sequence[str], decoder: Callable[[ModelSpec], Any],
                  *, name: str | None = None) -> list[Variant]:
    """The base spec and one variant per ``--compare`` text, each with its own decoder."""
    variants = [Variant(name or base.name, base, decoder(base))]
    seen = {variants[0].name}
    for text in compare:
        changes = split_assignments(text)
        spec = spec_with(base.to_dict(), changes)
        label = ",".join(changes)
        if label in seen:
            raise EvaluateError(f"--compare {text}: given twice")
        seen.add(label)
        variants.append(Variant(label, spec, decoder(spec), changes))
    return variants
