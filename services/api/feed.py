"""Background feed of model snapshots from Kafka into the :class:`ModelStore`.

The embedded broker never compacts, so ``streamlearn.models`` holds every
snapshot ever published.  The feed therefore keeps only the latest few values
per key and decodes nothing until it has caught up with the log end (or a short
deadline passes), so start-up costs one decode per replica, not one per
historical snapshot.  Decoding and building a model run in a worker thread,
so the event loop keeps serving requests: their cost follows the model size
(about 9 ms for ``hash_bits=18``), not the payload size, since mostly-zero
weights travel sparse.

Hardening (every record is untrusted input):

- Each record is *screened* as it arrives (key, tombstone, size, signature;
  :meth:`ModelStore.screen`), so a forged record never supersedes an authentic
  one.  The newest ``keep_per_key`` screened values of each key are kept; when
  the newest fails to decode, the one before it is tried.
- No record can stop the feed: a failure while handling one is counted
  (``streamlearn_snapshots_rejected_total{reason}``) and logged at most once a
  minute per reason.  Should the task end anyway, :attr:`SnapshotFeed.alive` is
  false and ``/readyz`` answers 503.
- Every ``probe_interval_s`` the feed asks the broker for metadata and the
  topic's offsets: the answer (or its absence) is ``broker_up``.  A topic whose
  end offset went backwards, or now lies behind the feed's position (a broker
  restarted without its data, a topic recreated), is read again from the
  beginning, and so is every partition once the broker answers again after an
  outage: a recreated topic may already hold as many records as the old one, so
  offsets alone cannot tell.  Re-reading costs one screening per record and a
  decode only where a key's newest value changed (duplicates are skipped by CRC).
- Repeated lines of the Kafka client's own loggers are rate-limited
  (:func:`streamlearn.logs.limit_loggers`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError, OffsetOutOfRangeError
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from streamlearn import snapshots
from streamlearn.logs import RateLimitedLog, limit_loggers
from streamlearn.serving import ModelStore

log = logging.getLogger(__name__)
_rlog = RateLimitedLog(log, interval_s=60.0)

MODELS_TOPIC = "streamlearn.models"


class SnapshotFeed:
    """Consume ``streamlearn.models`` from the beginning and offer snapshots to ``store``.

    No consumer group: every API process reads every replica's snapshots.
    Broker errors are retried with capped exponential backoff and jitter.
    """

    def __init__(
        self,
        bootstrap: str,
        store: ModelStore,
        *,
        topic: str = MODELS_TOPIC,
        max_defer_s: float = 2.0,
        backoff_s: tuple[float, float] = (0.5, 10.0),
        poll_timeout_ms: int = 500,
        probe_interval_s: float = 1.0,
        probe_timeout_s: float = 3.0,
        keep_per_key: int = 3,
        max_pending_bytes: int = 256 * 2**20,
        consumer_options: dict[str, Any] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.store = store
        self.topic = topic
        self.max_defer_s = max_defer_s
        self.backoff_s = backoff_s
        self.poll_timeout_ms = poll_timeout_ms
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.keep_per_key = max(1, keep_per_key)
        self.max_pending_bytes = max_pending_bytes
        self.consumer_options = dict(consumer_options or {})
        self.state = "idle"
        self.messages = 0
        self.superseded = 0
        self.keyless = 0
        self.offered = 0
        self.rejected = 0
        self.errors = 0
        self.resets = 0
        self.last_error = ""
        self.caught_up = False
        self.broker_up: bool | None = None  # None until the first probe
        self.broker_down_since: float | None = None  # time.time() of the first failed probe
        self.died: str = ""
        self._task: asyncio.Task[None] | None = None
        self._last_end: dict[TopicPartition, int] = {}
        self._rewind = False  # read everything again once the broker is back

    # -- status ------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """True while the feed task runs (or has not been started)."""
        return self._task is None or not self._task.done() or self.state == "stopped"

    def broker_down_for_s(self, now: float | None = None) -> float:
        """Seconds since the broker stopped answering, 0 while it answers."""
        if self.broker_down_since is None:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - self.broker_down_since)

    def status(self) -> dict[str, Any]:
        """JSON-ready counters for /readyz and /models/{name}."""
        return {
            "state": self.state, "alive": self.alive, "bootstrap": self.bootstrap,
            "topic": self.topic, "caught_up": self.caught_up, "broker_up": self.broker_up,
            "broker_down_for_s": round(self.broker_down_for_s(), 3),
            "messages": self.messages, "superseded": self.superseded,
            "keyless": self.keyless, "offered": self.offered, "rejected": self.rejected,
            "errors": self.errors, "resets": self.resets, "last_error": self.last_error,
        }

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        """Start the background task (idempotent)."""
        if self._task is None or self._task.done():
            limit_loggers()  # aiokafka logs every reconnect attempt during an outage
            self.died = ""
            self._task = asyncio.create_task(self._run(), name="snapshot-feed")
            self._task.add_done_callback(self._on_done)

    async def stop(self) -> None:
        """Cancel the task and wait for the consumer to close."""
        task, self._task = self._task, None
        self.state = "stopped"
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 - already recorded by _on_done
            log.debug("snapshot feed ended with %r", exc)

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.state == "stopped":
            return
        exc = task.exception()
        self.died = f"{type(exc).__name__}: {exc}" if exc else "the feed task returned"
        self.state = "dead"
        log.error("snapshot feed stopped: %s", self.died, exc_info=exc)

    def _error(self, exc: BaseException) -> None:
        self.errors += 1
        text, name = str(exc), type(exc).__name__
        self.last_error = text if text.startswith(name) else f"{name}: {text}"

    async def _run(self) -> None:
        delay = self.backoff_s[0]
        while True:
            consumer = self._consumer()
            try:
                self.state = "connecting"
                await consumer.start()
                self.state = "running"
                delay = self.backoff_s[0]
                await self._consume(consumer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - nothing may end the feed: retry
                self._error(exc)
                self.state = "retrying"
                if isinstance(exc, TimeoutError | KafkaError | OSError):
                    self._mark_down()
                    _rlog.warning("feed_retry", "snapshot feed from %s failed (%s); retrying",
                                  self.bootstrap, self.last_error)
                else:
                    _rlog.error("feed_bug", "snapshot feed failed unexpectedly (%s); retrying",
                                self.last_error, exc_info=True)
            finally:
                await _close(consumer)
            await asyncio.sleep(random.uniform(0.5, 1.0) * delay)  # jitter: no herd
            delay = min(delay * 2, self.backoff_s[1])

    def _consumer(self) -> AIOKafkaConsumer:
        options: dict[str, Any] = {
            "group_id": None,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "client_id": "streamlearn-api",
            "max_partition_fetch_bytes": 32 * 1024 * 1024,
            "fetch_max_bytes": 64 * 1024 * 1024,
            "metadata_max_age_ms": 5000,  # notice the topic soon after a worker creates it
            # A fetch waiting for the next snapshot returns within this (aiokafka's 500 ms
            # default put ~120 ms between a snapshot and its arrival on the embedded broker,
            # ~12 ms at 50: measured); freshness is what the API is for.
            "fetch_max_wait_ms": 50,
            "retry_backoff_ms": 500,
            "request_timeout_ms": 10_000,
        }
        options.update(self.consumer_options)  # security settings, test overrides
        return AIOKafkaConsumer(self.topic, bootstrap_servers=self.bootstrap, **options)

    # -- broker health and topic resets ----------------------------------------------
    def _mark_down(self) -> None:
        if self.broker_up is not False:
            self.broker_down_since = time.time()
            log.warning("broker %s is not answering; serving the models already loaded",
                        self.bootstrap)
        self.broker_up = False

    def _mark_up(self) -> None:
        if self.broker_up is False:
            log.warning("broker %s answers again after %.1fs", self.bootstrap,
                        self.broker_down_for_s())
            _rlog.reset("feed_retry")
            self._rewind = True
        self.broker_up = True
        self.broker_down_since = None

    async def _probe(self, consumer: AIOKafkaConsumer) -> None:
        """Is the broker answering?  Did the topic's offsets move backwards?"""
        try:
            await asyncio.wait_for(consumer.topics(), self.probe_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to answer is an outage
            self._error(exc)
            self._mark_down()
            return
        self._mark_up()
        assigned = list(consumer.assignment())
        if not assigned:
            return
        if self._rewind:
            self._rewind = False
            for tp in assigned:
                await self._reset(consumer, tp, "the broker was unreachable")
            return
        try:
            ends = await asyncio.wait_for(consumer.end_offsets(assigned), self.probe_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a partition moving between brokers
            _rlog.info("probe_offsets", "could not read end offsets of %s: %s", self.topic, exc)
            return
        for tp, end in ends.items():
            try:
                position = await asyncio.wait_for(consumer.position(tp), self.probe_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - no position yet: nothing to compare
                continue
            last = self._last_end.get(tp, 0)
            if end < last or position > end:
                await self._reset(consumer, tp,
                                  f"end offset {end} (was {last}), position {position}")
            self._last_end[tp] = end

    async def _reset(self, consumer: AIOKafkaConsumer, tp: TopicPartition, why: str) -> None:
        self.resets += 1
        self._last_end.pop(tp, None)
        log.warning("topic %s partition %d was reset (%s): reading it again from the start",
                    tp.topic, tp.partition, why)
        await consumer.seek_to_beginning(tp)

    # -- consuming -----------------------------------------------------------------------
    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        pending: dict[str, deque[bytes]] = {}
        pending_bytes = 0
        pending_since = 0.0
        next_probe = 0.0
        while True:
            if time.monotonic() >= next_probe:
                await self._probe(consumer)
                next_probe = time.monotonic() + self.probe_interval_s
            try:
                batches = await consumer.getmany(timeout_ms=self.poll_timeout_ms)
            except OffsetOutOfRangeError as exc:  # a topic truncated or recreated
                for tp in exc.args[0] if exc.args and isinstance(exc.args[0], dict) else ():
                    await self._reset(consumer, tp, "offset out of range")
                if not exc.args:
                    await consumer.seek_to_beginning()
                continue
            messages = [m for ms in batches.values() for m in ms]
            if messages:
                screened = await asyncio.to_thread(self._screen, messages)
                for key, value in screened:
                    queue = pending.get(key)
                    if queue is None:
                        if not pending:
                            pending_since = time.monotonic()
                        queue = pending[key] = deque(maxlen=self.keep_per_key)
                    else:
                        self.superseded += 1
                        if len(queue) == queue.maxlen:
                            pending_bytes -= len(queue[0])
                    queue.append(value)
                    pending_bytes += len(value)
            if not pending:
                self.caught_up = self.caught_up or await _at_end(consumer)
                continue
            at_end = await _at_end(consumer)
            if (at_end or time.monotonic() - pending_since > self.max_defer_s
                    or pending_bytes > self.max_pending_bytes):
                self.caught_up = self.caught_up or at_end
                batch, pending, pending_bytes = pending, {}, 0
                await asyncio.to_thread(self._offer_all, batch)

    def _screen(self, messages: Iterable[Any]) -> list[tuple[str, bytes]]:
        """Cheap checks of each record; only authentic-looking ones come back."""
        out: list[tuple[str, bytes]] = []
        for msg in messages:
            self.messages += 1
            try:
                if msg.key is None:
                    self.keyless += 1
                    self.rejected += 1
                    self.store.count_reject(f"<no key>@{msg.partition}:{msg.offset}", "no_key",
                                            "snapshot record without a key")
                    continue
                key = bytes(msg.key).decode("utf-8", errors="replace")
                if self.store.screen(key, msg.value) is not None:
                    self.rejected += 1
                    continue
                out.append((key, bytes(msg.value)))
            except Exception as exc:  # noqa: BLE001 - one record never stops the feed
                self.rejected += 1
                self.store.count_reject(f"@{msg.partition}:{msg.offset}", "internal_error",
                                        f"{type(exc).__name__}: {exc}")
        return out

    def _offer_all(self, latest: dict[str, deque[bytes]]) -> None:
        """Offer each key's newest value; fall back to older ones while they are refused."""
        for key, values in latest.items():
            for value in reversed(values):
                try:
                    outcome = self.store.submit(key, value)
                except Exception as exc:  # noqa: BLE001 - the store should never raise
                    outcome = "rejected:" + self.store.count_reject(
                        key, "internal_error", f"{type(exc).__name__}: {exc}")
                self.offered += 1
                if not outcome.startswith("rejected:"):
                    break
                self.rejected += 1


async def _at_end(consumer: AIOKafkaConsumer) -> bool:
    """True when every assigned partition's position has reached its high watermark."""
    assigned = consumer.assignment()
    if not assigned:
        return False
    for tp in assigned:
        high = consumer.highwater(tp)
        if high is None or await consumer.position(tp) < high:
            return False
    return True


async def _close(consumer: AIOKafkaConsumer) -> None:
    try:
        await consumer.stop()
    except Exception as exc:  # noqa: BLE001 - closing must not mask the original error
        log.debug("closing the snapshot consumer failed: %s", exc)


def load_snapshot_dir(path: str | Path, store: ModelStore) -> int:
    """Offer every snapshot file under ``path`` (a local checkpoint); return how many loaded.

    Files that do not decode are skipped with a warning.  Keys are built from the
    state (``<model>/<replica>``; the file stem when the state names no replica).
    Local files are trusted as far as their origin goes (no signature), but their
    spec, sizes and numbers are checked like any snapshot's.
    """
    root = Path(path)
    if not root.is_dir():
        return 0
    loaded = 0
    limits = store.policy.limits
    for file in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            if file.stat().st_size > limits.max_payload_bytes:
                raise snapshots.SnapshotError("file too large", "too_large")
            payload = file.read_bytes()
            state = snapshots.decode(payload, limits=limits)
            name = state["spec"]["name"]
        except (OSError, snapshots.SnapshotError, KeyError, TypeError) as exc:
            log.warning("skipping snapshot file %s: %s", file, exc)
            continue
        replica = str(state.get("replica") or file.stem)
        key = f"{name}/{replica}"
        if store.offer_state(key, state, crc=zlib.crc32(payload), size=len(payload)):
            loaded += 1
    return loaded


class FeedCollector(Collector):
    """Prometheus view of snapshot rejections and of the feed's and broker's health.

    - ``streamlearn_snapshots_rejected_total{reason}``: refused snapshot records,
    - ``streamlearn_broker_up``: 1 while the broker answers the feed's probes
      (absent without a feed),
    - ``streamlearn_snapshot_feed_up``: 1 while the feed task runs,
    - ``streamlearn_snapshot_feed_resets_total``: topic resets detected,
    - ``streamlearn_snapshot_feed_errors_total``: broker errors seen by the feed.
    """

    def __init__(self, store: ModelStore, feed: Callable[[], SnapshotFeed | None]) -> None:
        self.store = store
        self.feed = feed

    def describe(self) -> Iterable[Metric]:
        """Metric names, so the registry can refuse duplicates."""
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        """Current values."""
        return self._families(self.feed())

    def _families(self, feed: SnapshotFeed | None) -> list[Metric]:
        rejected = CounterMetricFamily(
            "streamlearn_snapshots_rejected",
            "Snapshot records refused (forged, unsigned, oversized, malformed...), by reason.",
            labels=["reason"])
        for reason, n in sorted(dict(self.store.stats.rejected_by_reason).items()):
            rejected.add_metric([reason], float(n))
        up = GaugeMetricFamily("streamlearn_broker_up",
                               "1 while the broker answers the snapshot feed's probes.")
        feed_up = GaugeMetricFamily("streamlearn_snapshot_feed_up",
                                    "1 while the snapshot feed task runs.")
        resets = CounterMetricFamily("streamlearn_snapshot_feed_resets",
                                     "Topic resets (offsets moved backwards) detected.")
        errors = CounterMetricFamily("streamlearn_snapshot_feed_errors",
                                     "Broker errors seen by the snapshot feed.")
        if feed is not None:
            up.add_metric([], 1.0 if feed.broker_up else 0.0)
            feed_up.add_metric([], 1.0 if feed.alive else 0.0)
            resets.add_metric([], float(feed.resets))
            errors.add_metric([], float(feed.errors))
        return [rejected, up, feed_up, resets, errors]
