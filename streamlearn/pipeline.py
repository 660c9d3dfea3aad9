"""One model's step, from raw Kafka values to output records, without I/O.

The worker feeds it blocks of consecutive messages (one partition each) and sends
what it returns: prediction records and dead letters.  Keeping this pure lets the
whole decode/validate/score/learn path be tested without a broker.

Where the time goes, and why the code looks like this:

- JSON events are read by a compiled scanner straight into columns
  (:mod:`streamlearn.json_columns`): no Python object per value.  A message with anything
  unusual (a non-object, a wrong type, a value out of bounds, a bad label, an escaped or
  repeated key) goes alone through ``orjson`` and :meth:`Vectorizer.transform_many`, so
  the reasons for rejects stay the vectorizer's.  ``load_tests/bench_vectorize.py`` measures
  it on 74-field events against plain ``orjson.loads`` of the same messages.
- Batch records (:mod:`streamlearn.batch_format`) skip JSON entirely; a malformed one
  is dead-lettered whole, with its reason, and the next one goes on.
- Learning keeps the spec's mini-batch size whatever the transport: a batch record of
  4,096 events is learned in ``spec.batch_size`` chunks, like 4,096 JSON events, so the
  model does not depend on how the producer packed its events (a test checks both give
  the same weights).  All the chunks of a call go through one
  ``OnlineModel.process_many``: on the CPU one compiled call that releases the GIL, so
  the worker's consuming thread runs while this one learns.
"""

from __future__ import annotations

import base64
import hashlib
import math
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import orjson

from streamlearn.batch_format import BatchFormatError, FeatureDecoder, encode_columns, is_batch
from streamlearn.config import ModelSpec
from streamlearn.features import (
    FeatureBatch,
    InvalidEvent,
    Vectorizer,
    concat_batches,
    label_value,
)
from streamlearn.json_columns import JsonColumns
from streamlearn.metrics import LEARN_BUCKETS
from streamlearn.models import OnlineModel
from streamlearn.reasons import reason_codes


class Record(NamedTuple):
    """One consumed Kafka message."""

    value: bytes | None
    topic: str
    partition: int
    offset: int


class Block(NamedTuple):
    """Consecutive messages of one partition, in offset order (the worker's unit of work)."""

    topic: str
    partition: int
    offsets: Sequence[int]
    values: Sequence[bytes | None]

    def record(self, i: int) -> Record:
        """The ``i``-th message as a :class:`Record` (only built for dead letters)."""
        return Record(self.values[i], self.topic, self.partition, self.offsets[i])


#: Original bytes copied into a dead-letter record; a longer message is truncated there
#: (its size and SHA-256 say what it was), so that a record stays under the producer's
#: 16 MiB request limit whatever arrived (base64 adds a third).
DEADLETTER_MAX_VALUE_BYTES = 1024 * 1024
#: Longest reason kept in a dead-letter record.
DEADLETTER_MAX_REASON = 1000
#: Event ids: JSON scalars only (orjson cannot write ids nested 255+ levels deep, so a
#: nested id used to be learned and then kill the worker when its prediction was sent).
ID_TYPES = frozenset({str, int, float, type(None)})
MAX_ID_CHARS = 256
_INT_RANGE = (-(2**63), 2**64 - 1)  # what orjson can write


class DeadLetter(NamedTuple):
    """A rejected message and why."""

    record: Record
    reason: str

    def encode(self, model: str, max_value: int = DEADLETTER_MAX_VALUE_BYTES) -> bytes:
        """JSON envelope: the original bytes (base64), whole unless over ``max_value``.

        ``value_b64`` is null for a tombstone (a null Kafka value); ``size`` and
        ``sha256`` describe the original message, ``truncated`` says whether
        ``value_b64`` holds only its first ``max_value`` bytes.

        Examples
        --------
        >>> rec = DeadLetter(Record(b"x" * 10, "t", 2, 7), "bad").encode("m", max_value=4)
        >>> d = orjson.loads(rec)
        >>> d["size"], d["truncated"], base64.b64decode(d["value_b64"]), d["source"]["partition"]
        (10, True, b'xxxx', 2)
        >>> orjson.loads(DeadLetter(Record(None, "t", 0, 1), "tombstone").encode("m"))["value_b64"]
        """
        value = self.record.value
        size = len(value) if value is not None else 0
        kept = value if value is None or size <= max_value else value[:max_value]
        reason = self.reason
        if len(reason) > DEADLETTER_MAX_REASON:
            reason = reason[:DEADLETTER_MAX_REASON] + "..."
        return orjson.dumps({
            "model": model,
            "reason": reason,
            "source": {"topic": self.record.topic, "partition": self.record.partition,
                       "offset": self.record.offset},
            "value_b64": None if kept is None else base64.b64encode(kept).decode(),
            "size": size,
            "truncated": kept is not value,
            "sha256": None if value is None else hashlib.sha256(value).hexdigest(),
        })


def id_problem(value: Any) -> str | None:
    """Why ``value`` cannot be an event id, or None when it can.

    Examples
    --------
    >>> id_problem("tx-1"), id_problem(7), id_problem(None)
    (None, None, None)
    >>> id_problem([1]), id_problem("x" * 300)
    ('event id must be a string, number or null, got list', 'event id longer than 256 characters')
    """
    kind = type(value)
    if kind not in ID_TYPES:
        return f"event id must be a string, number or null, got {kind.__name__}"
    if kind is str and len(value) > MAX_ID_CHARS:
        return f"event id longer than {MAX_ID_CHARS} characters"
    if kind is int and not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
        return "event id is an integer outside 64 bits"
    if kind is float and not math.isfinite(value):
        return "event id must be finite"
    return None


def bad_ids(ids: Sequence[Any] | np.ndarray) -> list[tuple[int, str]]:
    """``(row, reason)`` for each unusable id; one set check when all are plain.

    Examples
    --------
    >>> bad_ids([1, "a", None])
    []
    >>> bad_ids([1, {"x": 1}, "y" * 999])  # doctest: +NORMALIZE_WHITESPACE
    [(1, 'event id must be a string, number or null, got dict'),
     (2, 'event id longer than 256 characters')]
    """
    if isinstance(ids, np.ndarray):
        return [] if ids.dtype.kind in "iu" else [(0, f"event ids of dtype {ids.dtype}")]
    types = set(map(type, ids))
    if types <= {int, type(None)} and (int not in types or _ints_fit(ids)):
        return []
    if types <= {str, type(None)} and (
            str not in types or max(len(i) for i in ids if i is not None) <= MAX_ID_CHARS):
        return []
    return [(i, why) for i, v in enumerate(ids) if (why := id_problem(v)) is not None]


def decode_json(decoder: JsonDecoder, values: Sequence[bytes | None],
                ) -> tuple[FeatureBatch, list[tuple[int, str]]]:
    """JSON messages as the worker takes them: :meth:`JsonDecoder.decode`, then events
    whose id cannot be written back join the rejects, before anything learns them."""
    batch, rejects = decoder.decode(values)
    return _drop_bad_ids(batch, rejects, len(values))


def decode_record(decoder: FeatureDecoder, payload: bytes) -> FeatureBatch:
    """A batch record as the worker takes it: the schema rules, then the ids; a bad id
    rejects the record whole, like any other schema break (:class:`BatchFormatError`)."""
    batch = decoder.decode(payload)
    bad = bad_ids(batch.ids)
    if bad:
        row, why = bad[0]
        raise BatchFormatError(f"row {row}: {why}")
    return batch


def decode_labels(spec: ModelSpec, values: Sequence[bytes | None],
                  ) -> tuple[list[Any], np.ndarray, list[tuple[int, str]]]:
    """Messages of ``<model>.labels`` (``{id_field: ..., label: ...}``): the ids and
    labels of the valid ones, and ``(index, reason)`` for the others."""
    ids: list[Any] = []
    labels: list[float] = []
    messages, index, rejects = _decode_slow(values)  # the events' rules for the bytes
    for i, message in zip(index, messages, strict=True):
        if not isinstance(message, dict):
            rejects.append((i, f"a label must be a JSON object, got {type(message).__name__}"))
            continue
        key = message.get(spec.id_field)
        why = (f"a label needs its event's id in field {spec.id_field!r}" if key is None
               else id_problem(key))
        if why is None:
            try:
                y = label_value(spec, message.get(spec.label), allow_missing=False)
            except InvalidEvent as exc:
                why = str(exc)
        if why is not None:
            rejects.append((i, why))
            continue
        ids.append(key)
        labels.append(y)
    rejects.sort()
    return ids, np.array(labels, dtype=np.float32), rejects


def _ints_fit(ids: Sequence[Any]) -> bool:
    ints = [i for i in ids if i is not None]
    return _INT_RANGE[0] <= min(ints) and max(ints) <= _INT_RANGE[1]


@dataclass
class Outcome:
    """What one call produced.

    ``predictions`` holds one JSON record per scored JSON event, and one batch record
    (columns ``id``, ``score``, ``version``; ``meta.model``) per input batch record.
    """

    predictions: list[bytes] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    scored: int = 0
    learned: int = 0
    learn_seconds: float = 0.0


@dataclass
class Telemetry:
    """Cumulative worker counters shipped inside snapshots (the API exports them).

    ``consumed`` counts events (a batch record counts its rows), ``messages`` Kafka
    messages; ``first_at``/``last_at`` are wall-clock times of the first message seen
    and of the end of the latest step, for throughput figures.
    """

    consumed: int = 0
    scored: int = 0
    learned: int = 0
    deadlettered: int = 0
    messages: int = 0
    labels: int = 0  # messages of <model>.labels
    first_at: float = 0.0
    last_at: float = 0.0
    learn_counts: list[int] = field(default_factory=lambda: [0] * len(LEARN_BUCKETS))
    learn_sum: float = 0.0
    learn_count: int = 0

    def observe_learn(self, seconds: float, count: int = 1) -> None:
        """Add ``count`` mini-batches that took ``seconds`` each to the cumulative histogram."""
        for i, le in enumerate(LEARN_BUCKETS):
            if seconds <= le:
                self.learn_counts[i] += count
        self.learn_sum += seconds * count
        self.learn_count += count

    def to_dict(self) -> dict[str, Any]:
        """The snapshot's ``telemetry`` entry."""
        return {
            "consumed": self.consumed, "scored": self.scored, "learned": self.learned,
            "deadlettered": self.deadlettered, "messages": self.messages, "labels": self.labels,
            "first_at": self.first_at, "last_at": self.last_at,
            "learn_seconds": {"le": list(LEARN_BUCKETS), "counts": list(self.learn_counts),
                              "sum": self.learn_sum, "count": self.learn_count},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Telemetry:
        """Resume counters from a snapshot (defaults for missing fields)."""
        keys = ("consumed", "scored", "learned", "deadlettered", "messages", "labels")
        t = cls(**{k: int(d.get(k, 0)) for k in keys})
        ls = d.get("learn_seconds") or {}
        if list(ls.get("le", [])) == list(LEARN_BUCKETS):
            t.learn_counts = [int(c) for c in ls["counts"]]
            t.learn_sum, t.learn_count = float(ls["sum"]), int(ls["count"])
        return t


class JsonDecoder:
    """JSON values to a :class:`FeatureBatch`: compiled columns, a careful path per message.

    Examples
    --------
    >>> spec = ModelSpec(name="m", topic="t", numeric=("x",), categorical=("c",), label="y",
    ...                  hash_bits=4)
    >>> dec = JsonDecoder(spec, Vectorizer(spec))
    >>> batch, rejects = dec.decode([b'{"event_id": 1, "x": 2, "c": "a", "y": 1}', b'[1]',
    ...                              b'{"event_id": 3}', b''])
    >>> batch.ids, batch.numeric.tolist(), rejects
    ([1, 3], [[2.0], [nan]], [(1, 'event must be a JSON object, got list'), (3, 'empty message')])
    """

    def __init__(self, spec: ModelSpec, vectorizer: Vectorizer) -> None:
        self.spec = spec
        self.vectorizer = vectorizer
        self.columns = JsonColumns(vectorizer)

    def decode(self, values: Sequence[bytes | None]) -> tuple[FeatureBatch, list[tuple[int, str]]]:
        """Vectorize the valid values, in order; return ``(batch, [(index, reason), ...])``
        with the rejects in message order.

        :class:`~streamlearn.json_columns.JsonColumns` reads every message it is sure of
        straight into columns; the others go through ``orjson`` and
        :meth:`Vectorizer.transform_many`, which decide them and name the reasons.  Ids
        are not checked here: the worker takes JSON through :func:`decode_json`.
        """
        scan = self.columns.read(values)
        if not scan.careful.size:
            return scan.batch, []
        careful = scan.careful
        batch, bad = self._careful([values[i] for i in careful])
        rejects = [(int(careful[i]), reason) for i, reason in bad]
        if not scan.sure.size:
            return batch, rejects
        kept = np.delete(careful, [i for i, _ in bad])
        # both parts, back in message order
        order = np.argsort(np.concatenate([scan.sure, kept]), kind="stable")
        return concat_batches([scan.batch, batch]).take(order), rejects

    def _careful(self, part: Sequence[bytes | None]) -> tuple[FeatureBatch, list[tuple[int, str]]]:
        """``orjson`` then the vectorizer's rules, with every reject's reason (in order)."""
        index: list[int] | None = None
        rejects: list[tuple[int, str]] = []
        loads = orjson.loads
        try:
            events = [loads(v) for v in part]  # type: ignore[arg-type]
        except orjson.JSONDecodeError:
            events, index, rejects = _decode_slow(part)
        batch, bad = self.vectorizer.transform_many(events)
        rejects += [(i if index is None else index[i], reason) for i, reason in bad]
        rejects.sort()
        return batch, rejects


def _decode_slow(
    values: Sequence[bytes | None],
) -> tuple[list[Any], list[int], list[tuple[int, str]]]:
    events: list[Any] = []
    index: list[int] = []
    rejects: list[tuple[int, str]] = []
    loads = orjson.loads
    for i, v in enumerate(values):
        if v is None:
            rejects.append((i, "tombstone: null message value"))
            continue
        if not v:
            rejects.append((i, "empty message"))
            continue
        try:
            events.append(loads(v))
        except orjson.JSONDecodeError as exc:
            rejects.append((i, f"not valid JSON: {exc}"))
            continue
        index.append(i)
    return events, index, rejects


class ModelRunner:
    """Prequential processing of raw messages for one model.

    Examples
    --------
    >>> from streamlearn.config import ModelSpec
    >>> spec = ModelSpec(name="m", topic="t", numeric=("x",), label="y", hash_bits=4)
    >>> runner = ModelRunner(OnlineModel(spec, device="cpu"))
    >>> recs = [Record(b'{"event_id": 1, "x": 2.0, "y": 1}', "t", 0, 10),
    ...         Record(b'{"event_id": 2, "x": "two"}', "t", 0, 11),
    ...         Record(b'not json', "t", 1, 5)]
    >>> out = runner.handle(recs)
    >>> out.scored, out.learned, [d.reason[:24] for d in out.dead]
    (1, 1, ["field 'x': expected a nu", 'not valid JSON: invalid '])
    >>> runner.model.offsets
    {'t:0': 12, 't:1': 6}
    >>> sorted(orjson.loads(out.predictions[0]))
    ['id', 'model', 'score', 'version']
    """

    def __init__(self, model: OnlineModel, telemetry: Telemetry | None = None,
                 emit_predictions: bool = True, clock: Callable[[], float] = time.time,
                 ) -> None:
        self.model = model
        self.telemetry = telemetry or Telemetry()
        self.emit_predictions = emit_predictions
        self.clock = clock  # wall time of arrival: the pending labels' TTL
        self.json = JsonDecoder(model.spec, model.vectorizer)
        self.batches = FeatureDecoder(model.spec, model.vectorizer)

    def handle(self, records: Sequence[Record]) -> Outcome:
        """Decode, validate, score every valid event, learn from the labelled ones."""
        return self.handle_blocks(_blocks(records))

    def handle_blocks(self, blocks: Iterable[Block]) -> Outcome:
        """:meth:`handle` for blocks: JSON runs are vectorized together, batch records alone.

        Message order is kept: a batch record first flushes the JSON events before it.
        """
        out = Outcome()
        t = self.telemetry
        if not t.first_at:
            t.first_at = time.time()
        json_values: list[bytes | None] = []
        json_from: list[tuple[int, Block]] = []  # (first index in json_values, its block)
        labels_topic = self.model.spec.labels_topic
        for block in blocks:
            values = block.values
            if block.topic == labels_topic:  # after the events that came before it
                self._json(json_values, json_from, out)
                json_values, json_from = [], []
                self._labels(block, out)
            elif any(map(is_batch, values)):
                for i, value in enumerate(values):
                    if is_batch(value):
                        self._json(json_values, json_from, out)
                        json_values, json_from = [], []
                        self._batch(block, i, out)
                    else:
                        json_from.append((len(json_values), block._replace(
                            offsets=block.offsets[i : i + 1], values=values[i : i + 1])))
                        json_values.append(value)
            else:
                json_from.append((len(json_values), block))
                json_values.extend(values)
            self._advance_offset(block)
            t.messages += len(values)
        self._json(json_values, json_from, out)
        t.scored += out.scored
        t.learned += out.learned
        t.deadlettered += len(out.dead)
        t.last_at = time.time()
        return out

    def _json(self, values: list[bytes | None], sources: list[tuple[int, Block]],
              out: Outcome) -> None:
        if not values:
            return
        self.telemetry.consumed += len(values)
        batch, rejects = decode_json(self.json, values)
        if rejects:
            starts = [start for start, _ in sources]
            for i, reason in rejects:
                start, block = sources[bisect_right(starts, i) - 1]
                out.dead.append(DeadLetter(block.record(i - start), reason))
        parts = None
        if batch.aux is not None or self.model.pending.enabled:
            # Each event's partition: its entities and its waiting row live with it.
            parts = np.empty(len(values), dtype=np.int64)
            for start, block in sources:
                parts[start : start + len(block.values)] = block.partition
            if rejects:
                keep = np.ones(len(values), dtype=bool)
                keep[[i for i, _ in rejects]] = False
                parts = parts[keep]
            if batch.aux is not None:
                batch.aux.partitions = parts
        self._process(batch, out, as_batch=False, parts=parts)

    def _labels(self, block: Block, out: Outcome) -> None:
        """Join the labels of one ``<model>.labels`` block to their waiting events, and
        learn those (:mod:`streamlearn.labels`)."""
        self.telemetry.labels += len(block.values)
        ids, labels, rejects = decode_labels(self.model.spec, block.values)
        for i, reason in rejects:
            out.dead.append(DeadLetter(block.record(i), reason))
        if not ids:
            return
        joined = self.model.pending.join(ids, labels, now=self.clock())
        if len(joined):
            t0 = time.perf_counter()
            steps = self.model.learn_joined(joined)
            out.learn_seconds += time.perf_counter() - t0
            out.learned += int(steps.learned.sum())

    def _batch(self, block: Block, i: int, out: Outcome) -> None:
        value = block.values[i]
        assert value is not None
        try:
            batch = decode_record(self.batches, value)
        except BatchFormatError as exc:
            self.telemetry.consumed += 1
            out.dead.append(DeadLetter(block.record(i), f"bad batch record: {exc}"))
            return
        self.telemetry.consumed += len(batch)
        parts = np.full(len(batch), block.partition, dtype=np.int64)
        if batch.aux is not None:
            batch.aux.partitions = parts
        self._process(batch, out, as_batch=True, parts=parts)

    def _process(self, batch: FeatureBatch, out: Outcome, *, as_batch: bool,
                 parts: np.ndarray | None = None) -> None:
        """Score and learn ``batch``; ``parts``: each row's partition (waiting events
        remember it, to follow it in a rebalance)."""
        n = len(batch)
        if n == 0:
            return
        model, size = self.model, self.model.spec.batch_size
        k = getattr(model.spec, "reasons_in_records", 0)
        model.fill_aggregates(batch, update=True)  # in event order, before anything reads them
        # Reasons of the model as the batch found it (it learns while scoring the batch).
        reasons = (reason_codes(model, batch, k)
                   if k and self.emit_predictions and not as_batch else None)
        t0 = time.perf_counter()
        steps = model.process_many(batch, size)
        seconds = time.perf_counter() - t0
        pending = model.pending
        if pending.enabled:
            pending.expire(now=self.clock())
            waiting = np.isnan(batch.labels)
            if waiting.any():  # scored without a label: kept for one that comes later
                ids = batch.ids.tolist() if isinstance(batch.ids, np.ndarray) else batch.ids
                rows = np.flatnonzero(waiting)
                pending.add([ids[i] for i in rows.tolist()], batch.numeric[rows],
                            batch.hashed[rows], steps.scores[rows], now=self.clock(),
                            partitions=None if parts is None else parts[rows])
        out.learn_seconds += seconds
        out.learned += int(steps.learned.sum())
        out.scored += n
        n_steps = int(np.count_nonzero(steps.learned))
        if n_steps:  # one compiled call: its time, spread evenly over its mini-batches
            self.telemetry.observe_learn(seconds / n_steps, n_steps)
        if not self.emit_predictions:
            return
        if as_batch:
            ids = batch.ids if isinstance(batch.ids, np.ndarray) else list(batch.ids)
            out.predictions.append(encode_columns(
                {"id": ids, "score": steps.scores, "version": np.repeat(steps.versions, size)[:n]},
                meta={"model": model.spec.name, "kind": "predictions"},
            ))
            return
        for c, version in enumerate(steps.versions.tolist()):
            lo = c * size
            out.predictions.extend(_prediction_records(
                batch.ids[lo : lo + size], steps.scores[lo : lo + size], model.spec.name, version,
                None if reasons is None else reasons[lo : lo + size]))

    def _advance_offset(self, block: Block) -> None:
        if not block.offsets:
            return
        offsets = self.model.offsets
        key = f"{block.topic}:{block.partition}"
        nxt = max(block.offsets) + 1
        if nxt > offsets.get(key, -1):
            offsets[key] = nxt

    def snapshot_state(self, replica: str) -> dict[str, Any]:
        """Model state plus replica id and telemetry, ready for ``snapshots.encode``."""
        state = self.model.to_state()
        state["replica"] = replica
        state["telemetry"] = self.telemetry.to_dict()
        return state


def _drop_bad_ids(batch: FeatureBatch, rejects: list[tuple[int, str]],
                  n: int) -> tuple[FeatureBatch, list[tuple[int, str]]]:
    """Move events whose id cannot be written to the rejects, before anything learns them.

    ``rejects`` index the ``n`` decoded values; the batch holds the others, in order.
    """
    bad = bad_ids(batch.ids)
    if not bad:
        return batch, rejects
    rejected = {i for i, _ in rejects}
    source = [i for i in range(n) if i not in rejected]  # batch row -> value index
    keep = np.ones(len(batch), dtype=bool)
    for row, _ in bad:
        keep[row] = False
    kept = batch.take(keep)
    return kept, rejects + [(source[row], why) for row, why in bad]


def _blocks(records: Sequence[Record]) -> list[Block]:
    """Group records into runs of one partition (order kept)."""
    blocks: list[Block] = []
    run: list[Record] = []
    for rec in records:
        if run and (rec.topic, rec.partition) != (run[0].topic, run[0].partition):
            blocks.append(_block(run))
            run = []
        run.append(rec)
    if run:
        blocks.append(_block(run))
    return blocks


def _block(run: list[Record]) -> Block:
    return Block(run[0].topic, run[0].partition, [r.offset for r in run], [r.value for r in run])


def _prediction_records(
    ids: Sequence[Any], scores: np.ndarray, model: str, version: int,
    reasons: list[list[dict[str, Any]]] | None = None,
) -> list[bytes]:
    """``{"id", "model", "version", "score"}`` per event, byte-identical to ``orjson.dumps``;
    with ``reasons`` (spec ``reasons_in_records``), a ``reasons`` list too.

    Spliced from constant parts: building and dumping one dict per event measured ~5x
    slower.
    """
    dumps = orjson.dumps
    head = b'{"id":'
    mid = b',"model":' + dumps(model) + b',"version":' + dumps(version) + b',"score":'
    if reasons is not None:
        return [head + dumps(i) + mid + dumps(s) + b',"reasons":' + dumps(r) + b"}"
                for i, s, r in zip(ids, scores.tolist(), reasons, strict=True)]
    return [head + dumps(i) + mid + dumps(s) + b"}" for i, s in zip(ids, scores.tolist(),
                                                                       strict=True)]
