"""Everything that depends on Faust 0.15's quirks, in one module.

- :func:`bundling_scheduler`: a ``ConsumerScheduler`` (a documented Faust class setting)
  that hands Faust *one* message per run of consecutive records of a partition, a
  :class:`Bundle` carried by a record at the run's last offset. Faust registers the
  skipped offsets as a gap (its mechanism for compacted topics and transaction markers)
  and commits past them only once that message is acked. Faust 0.15's gap bookkeeping
  counts a read offset of 0 as "none" (so the run after offset 0 starts with a single
  record), and a gap includes the acked offset itself, so one commit advances a partition
  by one bundle only: :func:`commit_bundles` commits once per acked bundle.
  ``tests/services/test_worker_pipeline.py`` replays that arithmetic with Faust's own
  ``_add_gap``/``_new_offset``.
- :class:`PromptTableManager`: Faust's table manager waits a fixed 1 s for late tables.
- :func:`faust_settings`: the tuned settings (short sessions on the embedded broker,
  large polls, a small queue of bundles), and :func:`faust_credentials`.
"""

from __future__ import annotations

import os
import re
import tempfile
from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any, NamedTuple

import faust
from aiokafka.structs import ConsumerRecord
from faust.tables.manager import TableManager
from faust.transport.utils import DefaultSchedulingStrategy
from faust.types import TP

from streamlearn.settings import Settings

#: Most records and bytes one bundle carries: bounds the work behind one ack.
BUNDLE_MAX_RECORDS = 4096
BUNDLE_MAX_BYTES = 4 * 1024 * 1024
#: Faust's per-topic queue holds bundles, so a few already buffer ~30k events (or 30 MB).
STREAM_BUFFER_BUNDLES = 8


class Bundle(NamedTuple):
    """The value Faust carries for a run of consecutive records of one partition."""

    offsets: list[int]
    values: list[bytes | None]
    nbytes: int


def bundling_scheduler(
    topics: frozenset[str],
    max_records: int = BUNDLE_MAX_RECORDS,
    max_bytes: int = BUNDLE_MAX_BYTES,
) -> type[DefaultSchedulingStrategy]:
    """A Faust ``ConsumerScheduler`` class that bundles the records of ``topics``."""

    class BundlingScheduler(DefaultSchedulingStrategy):
        """Yield one synthetic record per run of records; other topics pass through."""

        def __init__(self) -> None:
            super().__init__()
            # Faust's gap bookkeeping skips a read offset of 0 (it tests ``if r_offset``),
            # so the run after a record at offset 0 starts with a single record.
            self._after_zero: set[TP] = set()

        def iterate(self, records: Mapping[TP, list]) -> Iterator[tuple[TP, Any]]:
            rest = {tp: recs for tp, recs in records.items() if tp.topic not in topics}
            for tp, recs in records.items():
                if tp.topic in topics and recs:
                    yield from ((tp, rec) for rec in self._bundles(tp, recs))
            if rest:
                yield from super().iterate(rest)

        def _bundles(self, tp: TP, recs: Sequence[ConsumerRecord]) -> Iterator[ConsumerRecord]:
            values = [r.value for r in recs]
            offsets = [r.offset for r in recs]
            ends = list(accumulate(len(v) if v else 0 for v in values))
            i, n = 0, len(recs)
            if tp in self._after_zero:
                self._after_zero.discard(tp)
                yield _bundle_record(recs[0], offsets[:1], values[:1], ends[0])
                i = 1
            while i < n:
                before = ends[i - 1] if i else 0
                j = min(i + max_records, bisect_left(ends, before + max_bytes, i) + 1, n)
                yield _bundle_record(recs[j - 1], offsets[i:j], values[i:j], ends[j - 1] - before)
                i = j
            if offsets[-1] == 0:
                self._after_zero.add(tp)

    return BundlingScheduler


def _bundle_record(last: ConsumerRecord, offsets: list[int], values: list[bytes | None],
                   nbytes: int) -> ConsumerRecord:
    return ConsumerRecord(
        topic=last.topic, partition=last.partition, offset=last.offset,
        timestamp=last.timestamp, timestamp_type=last.timestamp_type, key=None,
        value=Bundle(offsets, values, nbytes),
        checksum=None, serialized_key_size=0, serialized_value_size=nbytes, headers=(),
    )


class PromptTableManager(TableManager):
    """Faust's table manager waits 1 s at start for late tables; with none, start at once."""

    async def on_start(self) -> None:
        if len(self):
            await super().on_start()
        elif not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


#: Longest a fetch of the worker's consumer waits for data on the embedded broker. Faust
#: fixes aiokafka's ``fetch_max_wait_ms`` at 1500, and Tansu answers a waiting fetch when
#: that time is up, not when data arrives (measured: 0.62 s from a send to its consumer
#: at 1500, 0.12 s at 500, 0.012 s at 50): an event of a quiet stream waited that long.
#: Shorter waits also shrink Tansu's answers to a backlog: the batch-record worker ran at
#: 0.24x of its raw ceiling at 50 ms, 0.41-0.44x at 200, 0.46x at 1500 (one run each);
#: at 200 a new aggregate still reached /predict in 0.19 s (median, e2e test).
#: A real Kafka answers as soon as data is there and keeps Faust's value.
FAST_FETCH_WAIT_MS = 200


def patch_fetch_wait(ms: int) -> None:
    """Make the worker consumers Faust creates wait at most ``ms`` per fetch."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    create = getattr(AIOKafkaConsumerThread, "_streamlearn_create", None)
    if create is None:
        create = AIOKafkaConsumerThread._create_worker_consumer
        AIOKafkaConsumerThread._streamlearn_create = create  # type: ignore[attr-defined]

    def create_worker_consumer(self: Any, *args: Any, **kwargs: Any) -> Any:
        consumer = create(self, *args, **kwargs)
        consumer._fetch_max_wait_ms = ms  # read when the consumer starts its fetcher
        return consumer

    AIOKafkaConsumerThread._create_worker_consumer = create_worker_consumer  # type: ignore[method-assign]


#: Longest one poll of Faust's consumer waits. Faust polls with a fixed 1.0 s, for the
#: partitions whose stream buffer is not full only (flow control): when the learner holds
#: the others back and the polled ones are quiet (a drained partition, an empty labels
#: topic), the poll waits out its second after the held partitions were released, and
#: consumption stops meanwhile. Measured on bench_worker: one stall of 0.86-0.92 s in most
#: runs of 300,000 events (113-130k ev/s, against ~200k in the runs without one).
POLL_TIMEOUT_S = 0.1


def cap_poll_timeout(seconds: float = POLL_TIMEOUT_S) -> None:
    """Make Faust's consumer poll at most ``seconds`` at a time (idempotent)."""
    from faust.transport.consumer import Consumer

    poll = getattr(Consumer, "_streamlearn_getmany", None)
    if poll is None:
        poll = Consumer.getmany
        Consumer._streamlearn_getmany = poll  # type: ignore[attr-defined]

    def getmany(self: Any, timeout: float) -> Any:
        return poll(self, timeout=min(timeout, seconds))

    Consumer.getmany = getmany  # type: ignore[method-assign]


def faust_settings(settings: Settings, bootstrap: str) -> dict[str, Any]:
    """Faust keyword settings, tuned for the embedded broker unless told otherwise.

    Tansu holds a new group's JoinGroup for about half the session timeout, so
    Faust's default 60 s session makes a worker wait ~30 s to consume. A short
    session trades that for a risk of spurious rebalances during long batches,
    which our sub-second mini-batches do not have; a real Kafka keeps defaults.
    Polls are large and Faust's queue small, because each queued item is a bundle.
    """
    w = settings.worker
    session = w.session_timeout_s or (2.0 if settings.fast_join else None)
    heartbeat = w.heartbeat_interval_s or (0.5 if settings.fast_join else None)
    opts: dict[str, Any] = {
        "broker": f"kafka://{bootstrap}",
        "store": "memory://",
        "datadir": faust_datadir(w.app_id),
        "web_enabled": False,
        "topic_partitions": settings.kafka.partitions,
        "consumer_auto_offset_reset": "earliest",
        "producer_linger": 0.005,
        "stream_wait_empty": False,
        "ConsumerScheduler": bundling_scheduler(frozenset(
            t for s in settings.specs for t in (s.topic, s.labels_topic))),
        "broker_max_poll_records": 2 * BUNDLE_MAX_RECORDS,
        "consumer_max_fetch_size": BUNDLE_MAX_BYTES,
        "stream_buffer_maxsize": STREAM_BUFFER_BUNDLES,
        "TableManager": PromptTableManager,
    }
    cap_poll_timeout()
    if settings.fast_join:
        patch_fetch_wait(FAST_FETCH_WAIT_MS)
    if session:
        opts["broker_session_timeout"] = session
        opts["broker_rebalance_timeout"] = session * 2
    if heartbeat:
        opts["broker_heartbeat_interval"] = heartbeat
    credentials = faust_credentials(settings)
    if credentials is not None:
        opts["broker_credentials"] = credentials
    return opts


def faust_datadir(app_id: str) -> str:
    """Where Faust makes its data folder, which the memory store leaves empty.

    In this user's folder of the temporary directory: not ``<app id>-data`` in whatever
    directory the worker started in, nor in the snapshot folder (whose failures the
    checkpoint owns), nor where another user's worker of the same app id made it first.
    """
    uid = getattr(os, "getuid", lambda: "user")()
    base = Path(tempfile.gettempdir()) / f"streamlearn-faust-{uid}"
    base.mkdir(mode=0o700, exist_ok=True)  # Faust makes the last level only
    return str(base / re.sub(r"[^A-Za-z0-9._-]", "_", app_id))


def faust_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """Faust's form of ``kafka.security_protocol`` and friends (None: plaintext)."""
    k = settings.kafka
    if k.security_protocol == "PLAINTEXT":
        return None
    context = k.ssl_context()
    if k.security_protocol.startswith("SASL"):
        creds = faust.SASLCredentials(
            username=k.sasl_username, password=k.sasl_password.get_secret_value(),
            ssl_context=context, mechanism=k.sasl_mechanism)
        return creds
    return faust.SSLCredentials(context)


async def commit_bundles(app: faust.App, topic: str, bundles: int) -> None:
    """Commit what was just acked: Faust 0.15 advances a partition one bundle per commit."""
    for _ in range(bundles):
        if not await app.commit({topic}):
            break
