"""The Faust worker: one agent per model spec, plus snapshot and flush timers.

Everything numerical happens in ``streamlearn.pipeline.ModelRunner``; this module moves
bytes between Kafka and the runners and keeps Faust's per-message machinery off the hot
path.  Figures below are py-spy profiles and ``load_tests/bench_worker.py`` runs on this
project's 2-core machine (shared, so absolute rates move by +-20% between runs).

Where the time went: Faust's per-message pipeline
-------------------------------------------------
Faust hands every Kafka record to streams one at a time, and that costs ~100-200 us of
Python per message here, whatever the agent does with it:

- ``Consumer._drain_messages`` awaits ``Service.wait_first(callback(message),
  suspend_flow.wait())`` per message: two ``ensure_future`` tasks and an
  ``asyncio.wait`` (~20% of a no-op agent's CPU);
- ``Conductor.on_message``: flow-control and producer-buffer checks, decoding into an
  ``Event``, ``queue.put`` (~13%);
- the stream iterator and the ``take_events`` buffer (``_c_aiter``, ``Channel.__anext__``,
  ``add_to_buffer``; ~15%), per-event sensors (``Monitor.on_stream_event_in/out``,
  ``on_message_in``) and per-event acks under ``ack_lock`` (~5-8%);
- ``to_message`` and ``track_tp_end_offset`` in ``Consumer.getmany``.

A one-by-one agent ran at 3-4k events/s in the same runs (the issue measured 12k on a
quieter machine), the old ``take_events`` worker at ~3.5k with learning ~5% of the
profile, and public settings alone (sensors off, ``broker_max_poll_records``,
``stream_buffer_maxsize``, ``consumer_max_fetch_size``, ``noack_take``) moved a no-op
agent by 10-30% only: the cost is per message.

The largest step Faust's public API allows: fewer, fatter messages
-------------------------------------------------------------------
- :func:`bundling_scheduler` is a ``ConsumerScheduler`` (a documented Faust class
  setting) that hands Faust *one* message per run of consecutive records of a partition:
  a :class:`Bundle` of their values and offsets, carried by a record at the run's last
  offset.  Faust registers the skipped offsets as a gap (its mechanism for compacted
  topics and transaction markers) and commits past them only once that message is
  acked, and the agent acks it only after its events are in the model.  Two quirks of
  Faust 0.15's gap bookkeeping shape the details: a read offset of 0 counts as "none"
  (so the run after offset 0 starts with a single record), and a gap includes the acked
  offset itself, so one commit advances a partition by one bundle only (so the feeder
  commits with ``app.commit`` once per bundle it acks).
  ``tests/services/test_worker_pipeline.py`` replays that arithmetic with Faust's own
  ``_add_gap``/``_new_offset``: never past an unacked bundle, caught up after one commit
  per bundle, and stuck without the offset-0 rule.
- Batch records (``streamlearn.batch_format``) also remove the per-event costs that
  bundling leaves: aiokafka's per-record parsing, JSON parsing and the dict walk.
- Learning runs on one thread per model (:class:`Feeder`), so Faust's fetching and the
  sending of outputs overlap decoding and learning; model state is only touched on that
  thread (snapshots are captured there too), and acks follow, in order, once a job's
  effects are in the model.
- ``gc.freeze()`` after start-up: full collections of the ~1M objects the model stack
  imports stopped every thread for ~150 ms every few seconds (the loop-lag spikes).

Where the time goes now (busy samples, streaming; start-up and idle excluded)
-----------------------------------------------------------------------------
JSON (~40k events/s, 10x the one-by-one agent, 0.45x the raw aiokafka+orjson ceiling):
decode and vectorize 36% (``orjson`` itself about a third of it), aiokafka's fetch and
per-record parsing 18%, prediction records and their producer 11%, socket I/O 10%,
learning 6%, Faust per bundle 6%, bundling 4%, Faust's commit bookkeeping 4%, snapshots
3%.  All of it shares one GIL, so the sum is the bound; more throughput on JSON means
more replicas (one process per core), the scale-out the design already has.

Batch records: learning used to run as ``OnlineModel.process`` per 256-row mini-batch,
~50 us of Python each under the GIL, so learning and consuming added up on one core
(0.46x of ``process`` alone, 0.24x of the raw aiokafka+decode ceiling in one run).
``OnlineModel.process_many`` now learns a whole bundle or batch record in one compiled
``nogil`` call (:mod:`streamlearn.models.fused`), so the learner thread and the event
loop overlap on two cores: in one run the worker reached 1.22x of ``process`` alone and
0.51x of the raw ceiling.  The other busy samples of a py-spy run, all under the GIL:
socket reads 21%, batch decoding 15%, aiokafka 10%, prediction records 10%, Faust 6%
(learning, mostly GIL-free now, 34%).

Start-up: Faust's group join on Tansu (~1 s with the short session below) overlaps the
load of the model stack on a thread (imports, restore, numba's kernel cache), started by
:meth:`WorkerRuntime.begin_loading` as soon as the app is built: Faust runs app tasks
only once it is ready, and loading there had put ~0.8 s after Faust's ready (measured
from the worker's log); now the first event follows Faust's ready by ~0.1 s.
``river.drift`` used to be part of that load and its critical path (spawn -> first event
~4 s, Faust ready at ~2.8 s): it pulls scipy.stats, scikit-learn and pandas (~2 s of
CPU), for the concept-drift detector alone.  Now the drift monitors queue their batch
losses and replay them in order once river is in (same drift points), and the worker
imports it on a daemon thread only once it has caught up with its backlog (or after
``DRIFT_IMPORT_DELAY_S``), so that it slows neither the first event nor a catch-up.
:class:`PromptTableManager` drops Faust's fixed 1 s wait for tables that this worker
does not have.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import gc
import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import faust
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from faust.tables.manager import TableManager
from faust.transport.utils import DefaultSchedulingStrategy
from faust.types import TP, EventT

from streamlearn import replicas, snapshots
from streamlearn.config import ModelSpec
from streamlearn.drift.concept import defer_detector_import, load_detectors_in_background
from streamlearn.logs import RateLimitedLog
from streamlearn.services.worker import merging, observe, restore
from streamlearn.services.worker.outputs import Backoff, Outputs, declare_topics
from streamlearn.settings import Settings

if TYPE_CHECKING:  # the model stack (numba kernels) loads on a thread while Faust starts
    from streamlearn.pipeline import Block, ModelRunner, Outcome

log = logging.getLogger("streamlearn.worker")
#: Repeated conditions (dead letters, an outage, a failing checkpoint): one line per key
#: per interval, with the count of the lines it stood for.
limited = RateLimitedLog(log, interval_s=10.0)

#: Most records and bytes one bundle carries: bounds the work behind one ack.
BUNDLE_MAX_RECORDS = 4096
BUNDLE_MAX_BYTES = 4 * 1024 * 1024
#: Faust's per-topic queue holds bundles, so a few already buffer ~30k events (or 30 MB).
STREAM_BUFFER_BUNDLES = 8
#: A job for the learning thread is flushed at ``batch_size`` messages or this many bytes
#: (a batch record of a few hundred rows is worth a flush on its own).
FLUSH_BYTES = 64 * 1024
#: Jobs queued ahead of the learning thread before the agent stops pulling bundles.
MAX_JOBS_AHEAD = 2
#: Longest a shutdown waits for queued learning before it gives up on it.
SHUTDOWN_DRAIN_S = 10.0
#: Longest the import of river's drift detectors waits for the worker to catch up.
DRIFT_IMPORT_DELAY_S = 30.0
#: Idle time after which the worker counts as caught up (a fetch can stall ~0.5 s at start).
CAUGHT_UP_IDLE_S = 2.0
#: How long a delivery may stay unacknowledged before the worker checks the topics exist.
DELIVERY_CHECK_S = 2.0
#: Shortest interval between two declarations of the worker's topics after start.
REDECLARE_EVERY_S = 5.0
#: Cyclic-GC thresholds while streaming (CPython's default is 700, 10, 10).
GC_THRESHOLDS = (20_000, 20, 20)


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
        "web_enabled": False,
        "topic_partitions": settings.kafka.partitions,
        "consumer_auto_offset_reset": "earliest",
        "producer_linger": 0.005,
        "stream_wait_empty": False,
        "ConsumerScheduler": bundling_scheduler(frozenset(s.topic for s in settings.specs)),
        "broker_max_poll_records": 2 * BUNDLE_MAX_RECORDS,
        "consumer_max_fetch_size": BUNDLE_MAX_BYTES,
        "stream_buffer_maxsize": STREAM_BUFFER_BUNDLES,
        "TableManager": PromptTableManager,
    }
    if session:
        opts["broker_session_timeout"] = session
        opts["broker_rebalance_timeout"] = session * 2
    if heartbeat:
        opts["broker_heartbeat_interval"] = heartbeat
    credentials = faust_credentials(settings)
    if credentials is not None:
        opts["broker_credentials"] = credentials
    return opts


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


def snapshot_path(snapshot_dir: str, model: str, replica: str) -> Path:
    """Local checkpoint file of one model shard (survives a full broker restart)."""
    return Path(snapshot_dir) / f"{model}--{replica}.snap"


def restore_runner(spec: ModelSpec, settings: Settings,
                   latest: dict[str, bytes] | None = None, *, replica: str | None = None,
                   restored: dict[str, dict[str, Any]] | None = None) -> ModelRunner:
    """Resume from the newest matching snapshot: the local checkpoint, or one on the models
    topic (``latest``, from :func:`restore.read_latest`) when that is newer; else fresh.
    The state resumed from goes to ``restored[spec.name]`` (its merge lineage)."""
    from streamlearn.models import OnlineModel
    from streamlearn.pipeline import ModelRunner, Telemetry

    replica = replica or merging.replica_id(settings)
    path = snapshot_path(settings.worker.snapshot_dir, spec.name, replica)
    emit = settings.worker.emit_predictions
    local = None
    if path.exists():
        try:
            local = restore.Candidate(str(path), replica, snapshots.load(path))
        except (OSError, ValueError) as exc:
            log.error("ignoring unreadable checkpoint %s: %s", path, exc)
    remote = restore.topic_candidates(
        spec.name, latest or {}, lambda payload, key: decode_snapshot(settings, spec, payload,
                                                                      key))
    # A sibling that merges shares its learning through <model>/@merged: warm-start from
    # that (or fresh), never from the sibling's shard, whose delta the merge counts already.
    remote = [c for c in remote if c.replica in (replica, replicas.MERGED)
              or not replicas.meta(c.state)]
    tried: set[int] = set()
    while True:
        pool = [c for c in remote if id(c) not in tried]
        use_local = local if local is not None and id(local) not in tried else None
        best = restore.choose(use_local, pool, replica)
        if best is None:
            break
        tried.add(id(best))
        try:
            model = OnlineModel.from_state(best.state, device=spec.device)
        except (KeyError, TypeError, ValueError) as exc:
            log.error("ignoring snapshot from %s: %s", best.source, exc)
            continue
        if model.spec != spec:
            log.warning("snapshot from %s has another spec; not restoring it", best.source)
            continue
        log.warning("restored %s v%d (%d events learned) from %s", spec.name, model.version,
                    model.n_learned, best.source)
        if restored is not None:
            restored[spec.name] = dict(best.state, replica=best.replica)
        return ModelRunner(model, Telemetry.from_dict(best.state.get("telemetry", {})), emit)
    return ModelRunner(OnlineModel(spec), emit_predictions=emit)


def decode_snapshot(settings: Settings, spec: ModelSpec, payload: bytes,
                    kafka_key: str) -> dict[str, Any]:
    """A snapshot of ``spec`` from the models topic: size-bounded by the spec before
    anything is allocated, and signed under ``kafka.snapshot_key`` when one is set (or
    when ``api.require_signed_snapshots`` says so), as the API requires."""
    from streamlearn.serving import state_limits

    key = settings.kafka.snapshot_key
    required = settings.api.require_signed_snapshots
    if required is None:
        required = bool(key.get_secret_value())
    return snapshots.decode(payload, key=key, context=kafka_key, require_signature=required,
                            limits=state_limits(spec))


def warm_up(runner: ModelRunner) -> None:
    """Load the model's compiled kernels now (~0.3 s from numba's cache), not on event one.

    A tiny twin of the model (same task, optimizer and device; 2 hashed slots) calls the
    same kernel signatures without touching the real model or allocating its weights.
    """
    from streamlearn.models import OnlineModel

    spec = dataclasses.replace(runner.model.spec, hash_bits=1)
    scratch = OnlineModel(spec, device=runner.model.backend.name)
    batch, _ = scratch.vectorizer.transform_many([{spec.label: 1}])
    scratch.process_many(batch)


def as_block(event: EventT) -> Block:
    """The Faust event's records as a pipeline block (a bundle, or one plain message)."""
    from streamlearn.pipeline import Block

    msg, value = event.message, event.value
    if isinstance(value, Bundle):
        return Block(msg.topic, msg.partition, value.offsets, value.values)
    return Block(msg.topic, msg.partition, [msg.offset], [value])


class Unreleased(NamedTuple):
    """A learned job waiting for its checkpoint and the delivery of its outputs."""

    seq: int
    job: list[tuple[EventT, Block]]
    out: Outcome
    futures: list[asyncio.Future[Any]]
    nbytes: int


def _nbytes(event: EventT) -> int:
    value = event.value
    return value.nbytes if isinstance(value, Bundle) else len(value or b"")


class Feeder:
    """Mini-batches of bundles, learned in order on one thread, acked once checkpointed.

    Two stages joined by small queues, so the learning thread never waits on the
    network: ``run`` hands job N+1 to the thread while ``_finish`` sends job N's
    outputs.  A job's events are acked (so Faust commits them) only once a saved
    snapshot includes the job: after a crash the replica restores that snapshot and
    Kafka redelivers everything after it, so no event is lost and at most one
    snapshot interval is learned twice.
    """

    def __init__(self, runtime: WorkerRuntime, spec: ModelSpec, runner: ModelRunner) -> None:
        self.runtime = runtime
        self.spec = spec
        self.runner = runner
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"learn-{spec.name}")
        self.pending: list[tuple[EventT, Block]] = []
        self.pending_msgs = 0
        self.pending_bytes = 0
        self.pending_since = 0.0
        self.last_add = 0.0
        self.jobs: asyncio.Queue[list[tuple[EventT, Block]]] = asyncio.Queue(MAX_JOBS_AHEAD)
        self.learned: asyncio.Queue[tuple[int, list[tuple[EventT, Block]], Outcome]] = (
            asyncio.Queue(MAX_JOBS_AHEAD))
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.learned_seq = 0  # jobs in the model; written and read on the learner thread
        self.checkpointed_seq = 0  # jobs covered by the newest saved snapshot
        # Learned jobs whose outputs are queued, waiting for a checkpoint to be acked.
        self.unreleased: collections.deque[Unreleased] = collections.deque()
        self._release_lock = asyncio.Lock()
        # Input bytes consumed but not yet acked: bounded, so that a checkpoint that keeps
        # failing (or an outage) stops consumption instead of growing memory.
        self.held_bytes = 0
        self.next_offset: dict[tuple[str, int], int] = {}
        self.max_held_bytes = int(runtime.settings.worker.max_unacked_mb * 1024 * 1024)
        self._released = asyncio.Event()

    async def add(self, event: EventT) -> None:
        """Buffer one Faust event; hand a job to the learner when the batch is full."""
        block = as_block(event)
        value = event.value
        self.last_add = time.monotonic()
        telemetry = self.runner.telemetry
        if not telemetry.first_at:  # consumed now; learned once its mini-batch fills
            telemetry.first_at = time.time()
        nbytes = value.nbytes if isinstance(value, Bundle) else len(value or b"")
        tp = (block.topic, block.partition)
        if block.offsets and block.offsets[0] < self.next_offset.get(tp, 0):
            # Offsets went back: a redelivery after a rebalance, or a broker that lost its
            # data (an embedded broker restarted).  In the second case the output topics
            # are gone, and Tansu acks records sent to a missing topic without keeping
            # them (measured): make sure they exist before this block's outputs go out.
            limited.warning(("rewind", tp), "%s partition %d went back from offset %d to %d; "
                            "checking the worker's topics", block.topic, block.partition,
                            self.next_offset[tp], block.offsets[0])
            await self.runtime.ensure_topics(force=True)
        if block.offsets:
            self.next_offset[tp] = block.offsets[-1] + 1
        while self.held_bytes >= self.max_held_bytes and (self.unreleased or self.in_flight):
            # Back-pressure: Faust stops fetching while this agent waits.
            self._released.clear()
            await self._released.wait()
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.append((event, block))
        self.pending_msgs += len(block.values)
        self.pending_bytes += nbytes
        self.held_bytes += nbytes
        if self.pending_msgs >= self.spec.batch_size or self.pending_bytes >= FLUSH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        """Queue whatever is buffered (waits while the learner is ``MAX_JOBS_AHEAD`` behind)."""
        if not self.pending:
            return
        job, self.pending = self.pending, []
        self.pending_msgs = self.pending_bytes = 0
        self.in_flight += 1
        self.idle.clear()
        await self.jobs.put(job)

    def caught_up(self, quiet_s: float) -> bool:
        """Past the first message, nothing queued or learning, and none new for ``quiet_s``."""
        return (self.last_add > 0.0 and self.idle.is_set()
                and time.monotonic() - self.last_add >= quiet_s)

    async def flush_stale(self, within: float) -> None:
        """Timer side of ``take(max_, within=)``: flush a partial batch once it is old."""
        if self.pending and time.monotonic() - self.pending_since >= within:
            await self.flush()

    async def run(self) -> None:
        """Learn jobs in order on the learner thread; their outputs go to ``_finish``."""
        loop = asyncio.get_running_loop()
        finisher = asyncio.ensure_future(self._finish())
        try:
            while True:
                job = await self.jobs.get()
                blocks = [block for _, block in job]
                try:
                    seq, out = await loop.run_in_executor(self.executor, self._learn, blocks)
                except Exception:  # noqa: BLE001 - never ack it; Kafka redelivers
                    log.exception("learning a job of %d messages failed; not acking it",
                                  sum(len(b.values) for b in blocks))
                    await self.runtime.app.crash(RuntimeError(f"learner of {self.spec.name} "
                                                              "failed"))
                    return
                await self.learned.put((seq, job, out))
        finally:
            finisher.cancel()

    def _learn(self, blocks: list[Block]) -> tuple[int, Outcome]:
        """On the learner thread: learn one job and number it, in model order."""
        out = self.runner.handle_blocks(blocks)
        self.learned_seq += 1
        return self.learned_seq, out

    async def _finish(self) -> None:
        """Send a learned job's outputs; its acks wait for a checkpoint (``release``)."""
        while True:
            seq, job, out = await self.learned.get()
            futures = await self._send(out)
            nbytes = sum(_nbytes(event) for event, _ in job)
            self.unreleased.append(Unreleased(seq, job, out, futures, nbytes))
            await self.release()
            self.in_flight -= 1
            if not self.in_flight and not self.pending:
                self.idle.set()

    async def _send(self, out: Outcome) -> list[asyncio.Future[Any]]:
        """Queue a job's outputs, retrying with jittered back-off while the broker is away."""
        backoff = Backoff()
        while True:
            try:
                futures = await self.runtime.send_outcome(self.spec, out)
            except KafkaError as exc:
                self.runtime.output_failed(exc)
                await asyncio.sleep(backoff.next())
                await self.runtime.ensure_topics()
                continue
            return futures

    async def _delivered(self, entry: Unreleased) -> None:
        """Wait until the broker has acknowledged every output of ``entry``.

        A failed delivery sends the job's outputs again (at least once: some records
        may then appear twice on the output topics, none is missing).
        """
        backoff = Backoff()
        while True:
            _, pending = await asyncio.wait(entry.futures, timeout=DELIVERY_CHECK_S)
            if pending:  # still retrying inside aiokafka: a broker that restarted empty
                await self.runtime.ensure_topics()  # answers NotLeader until they exist
                continue
            errors = [f.exception() or RuntimeError("delivery cancelled") for f in entry.futures
                      if f.cancelled() or f.exception() is not None]
            if not errors:
                if backoff.failures:
                    self.runtime.output_recovered()
                return
            self.runtime.output_failed(errors[0])
            await asyncio.sleep(backoff.next())
            entry.futures[:] = await self._send(entry.out)

    async def release(self, checkpointed: int | None = None) -> None:
        """Ack and commit, in order, every job that a saved snapshot includes.

        A job is acked only once its prediction records and dead letters are on the
        broker, so a committed input offset never lacks its outputs.
        """
        if checkpointed is not None:
            self.checkpointed_seq = max(self.checkpointed_seq, checkpointed)
        async with self._release_lock:
            while self.unreleased and self.unreleased[0].seq <= self.checkpointed_seq:
                entry = self.unreleased[0]
                await self._delivered(entry)
                self.unreleased.popleft()
                for event, _ in entry.job:
                    event.ack()
                self.held_bytes -= entry.nbytes
                self._released.set()
                await self.runtime.commit(self.spec.topic, len(entry.job))

    async def state(self, replica: str, lineage: merging.Lineage | None = None,
                    partitions: list[int] | None = None) -> tuple[dict[str, Any], int]:
        """A snapshot state captured on the learner thread, with the jobs it includes
        (tagged there with its merge lineage: the base it is relative to, its ship number)."""
        loop = asyncio.get_running_loop()

        def capture() -> tuple[dict[str, Any], int]:
            state = self.runner.snapshot_state(replica)
            if lineage is not None:
                lineage.tag(state, partitions or [])
            return state, self.learned_seq

        return await loop.run_in_executor(self.executor, capture)


class CheckpointFailure(RuntimeError):
    """Local checkpoints failed for longer than ``worker.checkpoint_failure_exit_s``."""


class WorkerRuntime:
    """Runners, topics and snapshot publishing for one worker process."""

    #: Process exit code requested by the runtime (0: none); ``main.run`` returns it.
    exit_code = 0

    def __init__(self, app: faust.App, settings: Settings, bootstrap: str) -> None:
        self.app = app
        self.settings = settings
        self.bootstrap = bootstrap
        self.outputs = Outputs(bootstrap, settings.kafka.client_kwargs())
        self.ready = asyncio.Event()
        self.replica = merging.replica_id(settings)
        self.runners: dict[str, ModelRunner] = {}
        # Data-parallel training (streamlearn.replicas): each model's merge lineage, the
        # models-topic feed of every replica's shard, and the adopt/merge loop.
        self.lineages: dict[str, merging.Lineage] = {}
        self.shard_feed = merging.ShardFeed(self)
        self.merge_loop = merging.MergeLoop(self, self.shard_feed)
        self._published_at: dict[str, float] = {}
        self.feeders: dict[str, Feeder] = {}
        self._published: dict[str, tuple[int, int]] = {}
        self._snapshot_lock = asyncio.Lock()
        self._snapshot_task: asyncio.Future[int] | None = None
        self.loop_lag_max = 0.0
        # Health, shipped in each snapshot's ``worker`` entry and logged (rate-limited).
        self.output_failures = 0
        self.outage_since: float | None = None
        self.checkpoint_failures = 0
        self.checkpoint_failing_since: float | None = None
        self._declared_at = 0.0
        self._drift_import_started = False
        self._loading: concurrent.futures.Future[dict[str, ModelRunner]] | None = None
        for spec in settings.specs:
            self._register_agent(spec)

        app.task(self.start)
        app.task(self.watch_loop_lag)
        app.task(self._follow_shards)
        app.task(self.merge_loop.run)
        app.task(lambda: observe.watch_commands(self))  # admin drift actions (issue 12)
        self.rates = observe.RateMeter()
        app.on_before_shutdown.connect(self.on_shutdown)
        within = settings.worker.batch_within_s

        async def flush_tick() -> None:
            for feeder in self.feeders.values():
                await feeder.flush_stale(within)
            if (not self._drift_import_started and self.feeders
                    and all(f.caught_up(CAUGHT_UP_IDLE_S) for f in self.feeders.values())):
                self.load_drift_detectors("caught up")

        async def snapshot_tick() -> None:  # Faust passes the app to one-argument timers
            # In the background: the state is captured between two learning jobs, which
            # may take longer than the timer's interval under a backlog.
            if self._snapshot_task is None or self._snapshot_task.done():
                self._snapshot_task = asyncio.ensure_future(self.publish_snapshots())
                self._snapshot_task.add_done_callback(_log_failure)

        app.timer(min(within / 2, 0.1), on_leader=False)(flush_tick)
        app.timer(settings.worker.snapshot_interval_s, on_leader=False)(snapshot_tick)

    def topic_configs(self) -> dict[str, dict[str, str]]:
        """Every topic the worker reads or writes, with its configuration."""
        k = self.settings.kafka
        topics: dict[str, dict[str, str]] = {k.models_topic: {"cleanup.policy": "compact"},
                                             k.deadletter_topic: {}, k.commands_topic: {}}
        for spec in self.settings.specs:
            topics[spec.topic] = {}
            topics[f"{spec.name}.predictions"] = {}
        return topics

    def begin_loading(self) -> None:
        """Load models on a thread now, while Faust starts and joins the group.

        Faust runs ``start`` (an app task) only once the worker is ready, so loading
        there put the restore and the kernel-cache load (~0.8 s measured) after
        Faust's ready; ``streamlearn worker`` calls this right after building the app.
        """
        if self._loading is not None:
            return
        # river.drift (scipy, scikit-learn: ~2 s of CPU, under the GIL) serves only the
        # concept-drift monitors, which queue their losses until it is in.  Import it once
        # the worker has caught up (``flush_tick``), or after a delay, so that it
        # slows neither the first event nor the draining of a backlog.
        defer_detector_import()
        future: concurrent.futures.Future[dict[str, ModelRunner]] = concurrent.futures.Future()

        def load() -> None:
            try:
                future.set_result(self._load_runners())
            except BaseException as exc:  # noqa: BLE001 - re-raised by start()
                future.set_exception(exc)

        threading.Thread(target=load, name="load-models", daemon=True).start()
        self._loading = future

    async def start(self) -> None:
        """Await the models, declare topics and start the producer; then agents may run."""
        started = time.monotonic()
        self.begin_loading()
        assert self._loading is not None
        asyncio.get_running_loop().call_later(DRIFT_IMPORT_DELAY_S, self.load_drift_detectors,
                                              f"{DRIFT_IMPORT_DELAY_S:.0f} s after start")
        runners, _, _ = await asyncio.gather(
            asyncio.wrap_future(self._loading),
            declare_topics(self.bootstrap, self.topic_configs(), self.settings.kafka.partitions,
                           self.settings.kafka.client_kwargs()),
            self.outputs.start(),  # the producer finds the topics' metadata when it sends
        )
        for spec in self.settings.specs:
            self.runners[spec.name] = runners[spec.name]
            self.feeders[spec.name] = Feeder(self, spec, runners[spec.name])
        # Everything imported so far (numba, Faust, the model stack) is permanent; frozen,
        # it leaves the cyclic GC's full collections, which took ~150 ms of stop-the-world
        # every few seconds of streaming here.  Decoded events are acyclic and die by
        # refcount, so young collections are rarer too (+~7%).  river.drift usually ends
        # its background import after this and stays unfrozen (measured: ~73k GC-tracked
        # objects, on top of ~156k for the rest of the stack).
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        self.ready.set()
        log.info("models and outputs ready %.2f s after Faust started the worker's tasks",
                 time.monotonic() - started)

    def load_drift_detectors(self, reason: str) -> None:
        """Start the background import of river's drift detectors (once)."""
        if not self._drift_import_started:
            self._drift_import_started = True
            log.info("importing river's drift detectors (%s)", reason)
            load_detectors_in_background()

    def _load_runners(self) -> dict[str, ModelRunner]:
        latest: dict[str, bytes] = {}
        if self.settings.worker.restore_from_topic:
            k = self.settings.kafka
            latest = restore.read_latest_blocking(self.bootstrap, k.models_topic,
                                                  [s.name for s in self.settings.specs],
                                                  k.client_kwargs())
        restored: dict[str, dict[str, Any]] = {}
        runners = {spec.name: restore_runner(spec, self.settings, latest, replica=self.replica,
                                             restored=restored)
                   for spec in self.settings.specs}
        from streamlearn.models import OnlineModel

        for spec in self.settings.specs:
            fresh = OnlineModel(spec, device="cpu").to_state()
            state = restored.get(spec.name)
            self.lineages[spec.name] = (merging.Lineage(base=fresh) if state is None else
                                        merging.Lineage.restored(state, self.replica, fresh))
        for runner in runners.values():
            warm_up(runner)
        return runners

    async def _follow_shards(self) -> None:
        await self.ready.wait()  # the models topic is declared by then
        await self.shard_feed.run()

    def partitions(self, topic: str) -> list[int]:
        """Partitions of ``topic`` assigned to this replica now."""
        try:
            return sorted(tp.partition for tp in self.app.consumer.assignment()
                          if tp.topic == topic)
        except Exception:  # noqa: BLE001 - no consumer yet (start-up, shutdown)
            return []

    async def watch_loop_lag(self) -> None:
        """Record how late the event loop wakes up (a blocked loop stalls consumption)."""
        period = 0.05
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(period)
            self.loop_lag_max = max(self.loop_lag_max, time.monotonic() - t0 - period)

    async def on_shutdown(self, app: faust.App, **_: object) -> None:
        """Let queued jobs finish (bounded), take a last snapshot, then flush outputs."""
        if not self.ready.is_set():
            return

        async def drain() -> None:
            for feeder in self.feeders.values():
                await feeder.flush()
                await feeder.idle.wait()

        try:
            await asyncio.wait_for(drain(), timeout=SHUTDOWN_DRAIN_S)
        except TimeoutError:
            log.warning("shutdown: still learning after %.0f s; the last events stay "
                        "uncommitted and will be read again", SHUTDOWN_DRAIN_S)
        if self._snapshot_task is not None:
            await asyncio.wait([self._snapshot_task], timeout=SHUTDOWN_DRAIN_S)
        try:  # bounded: the broker may be gone
            await asyncio.wait_for(self.publish_snapshots(), timeout=SHUTDOWN_DRAIN_S)
        except TimeoutError:
            log.warning("shutdown: last snapshot not published within %.0f s", SHUTDOWN_DRAIN_S)
        try:  # hand the last shard over: a merge counts it before this replica leaves
            await asyncio.wait_for(self.merge_loop.retire(
                min(SHUTDOWN_DRAIN_S, 2 * self.settings.worker.merge_interval_s + 2.0)),
                timeout=SHUTDOWN_DRAIN_S)
        except TimeoutError:
            log.warning("shutdown: last shard not merged within %.0f s", SHUTDOWN_DRAIN_S)
        await self.outputs.stop()

    def _register_agent(self, spec: ModelSpec) -> None:
        app = self.app
        topic = app.topic(spec.topic, value_serializer="raw", key_serializer="raw")

        async def learn(stream: faust.StreamT[bytes]) -> None:
            await self.ready.wait()
            feeder = self.feeders[spec.name]
            learner = asyncio.ensure_future(feeder.run())
            try:
                async for event in stream.noack().events():
                    await feeder.add(event)
            finally:
                learner.cancel()

        learn.__name__ = f"learn_{spec.name}"
        app.agent(topic, name=f"streamlearn.learn.{spec.name}")(learn)

    async def commit(self, topic: str, bundles: int) -> None:
        """Commit what was just acked: Faust advances a partition one bundle per commit."""
        for _ in range(bundles):
            if not await self.app.commit({topic}):
                break

    async def send_outcome(self, spec: ModelSpec, out: Outcome) -> list[asyncio.Future[Any]]:
        """Queue predictions, then dead letters, of one learned job; their delivery futures."""
        futures = await self.outputs.send_many(f"{spec.name}.predictions", out.predictions)
        deadletter = self.settings.kafka.deadletter_topic
        for dead in out.dead:
            rec = dead.record
            limited.warning(("deadletter", spec.name, dead.reason[:40]),
                            "dead-lettered %s partition %d offset %d: %s", rec.topic,
                            rec.partition, rec.offset, dead.reason[:200], model=spec.name,
                            topic=rec.topic, partition=rec.partition, offset=rec.offset)
            futures.append(await self.outputs.send(deadletter, spec.name.encode(),
                                                   dead.encode(spec.name)))
        return futures

    async def ensure_topics(self, *, force: bool = False) -> None:
        """Declare missing topics again (at most every ``REDECLARE_EVERY_S``).

        An embedded broker that restarted has lost every topic, and Tansu does not
        create one on produce: the sends retry until the topics exist again.
        """
        now = time.monotonic()
        if not force and now - self._declared_at < REDECLARE_EVERY_S:
            return
        self._declared_at = now
        k = self.settings.kafka
        try:
            await asyncio.wait_for(declare_topics(self.bootstrap, self.topic_configs(),
                                                  k.partitions, k.client_kwargs()),
                                   timeout=REDECLARE_EVERY_S)
        except (KafkaError, OSError, TimeoutError) as exc:
            limited.warning("declare", "could not declare topics (%s: %s)",
                            type(exc).__name__, exc)

    def output_failed(self, exc: BaseException) -> None:
        """Count a failed send or delivery; one log line per interval while it lasts."""
        self.output_failures += 1
        if self.outage_since is None:
            self.outage_since = time.monotonic()
        limited.warning("outputs", "broker unavailable for outputs for %.1f s (%s: %s); "
                        "retrying with back-off, input not acked meanwhile",
                        time.monotonic() - self.outage_since, type(exc).__name__, exc,
                        failures=self.output_failures)

    def output_recovered(self) -> None:
        """The broker acknowledged outputs again after failures."""
        if self.outage_since is not None:
            log.warning("outputs recovered after %.1f s", time.monotonic() - self.outage_since)
            self.outage_since = None
            limited.reset("outputs")

    def health(self) -> dict[str, Any]:
        """The ``worker`` entry of a snapshot: loop lag, output and checkpoint failures."""
        now = time.monotonic()
        return {
            "loop_lag_max_ms": round(self.loop_lag_max * 1000, 2),
            "output_failures": self.output_failures,
            "outage_s": 0.0 if self.outage_since is None else round(now - self.outage_since, 1),
            "checkpoint_failures": self.checkpoint_failures,
        }

    def checkpoint_failed(self, name: str, exc: BaseException) -> None:
        """Log a failed local checkpoint; past ``checkpoint_failure_exit_s``, stop the worker.

        Without checkpoints nothing is acked or committed, so running on would learn
        unprotected (and hold every unacked event): exiting lets a supervisor restart
        the worker, or a person fix the snapshot directory.
        """
        now = time.monotonic()
        self.checkpoint_failures += 1
        if self.checkpoint_failing_since is None:
            self.checkpoint_failing_since = now
        failing = now - self.checkpoint_failing_since
        limit = self.settings.worker.checkpoint_failure_exit_s
        limited.error(("checkpoint", name), "checkpoint of %s to %s failing for %.1f s (%s: "
                      "%s); nothing is committed meanwhile; the worker exits after %.0f s",
                      name, self.settings.worker.snapshot_dir, failing, type(exc).__name__,
                      exc, limit, failures=self.checkpoint_failures)
        if failing >= limit and not self.app.should_stop:
            log.critical("checkpoints of %s failed for %.1f s (limit "
                         "worker.checkpoint_failure_exit_s = %.0f s): exiting", name, failing,
                         limit)
            self.exit_code = 3
            asyncio.ensure_future(self.app.crash(CheckpointFailure(
                f"checkpoints of {name} failing for {failing:.0f} s: {exc}")))

    async def publish_snapshots(self, *, force: bool = False) -> int:
        """Publish and checkpoint each model whose weights or counters moved since last time.

        The state is captured on the model's learner thread (``to_state`` copies the
        arrays there) and encoded on another, so the event loop only awaits.
        """
        sent = 0
        async with self._snapshot_lock:
            for name, runner in self.runners.items():
                mark = (runner.model.version, runner.telemetry.messages)
                # Unchanged shards are re-sent as a heartbeat: a shard not refreshed within
                # worker.stale_after_s leaves the merge.
                beat = self.settings.worker.stale_after_s / 3
                if (not force and self._published.get(name) == mark
                        and time.monotonic() - self._published_at.get(name, 0.0) < beat):
                    continue
                feeder = self.feeders[name]
                state, covered = await feeder.state(self.replica, self.lineages.get(name),
                                                    self.partitions(feeder.spec.topic))
                state["worker"] = self.health()
                state["observed"] = observe.observed(self, feeder, state, self.rates)
                self.loop_lag_max = 0.0
                payload = await asyncio.to_thread(snapshots.encode, state)
                path = snapshot_path(self.settings.worker.snapshot_dir, name, self.replica)
                try:  # the local checkpoint is what a restart restores: it comes first
                    await asyncio.to_thread(snapshots.save, path, payload)
                except OSError as exc:
                    self.checkpoint_failed(name, exc)
                    continue
                if self.checkpoint_failing_since is not None:
                    log.warning("checkpoint of %s to %s works again", name, path)
                    self.checkpoint_failing_since = None
                    limited.reset(("checkpoint", name))
                key = f"{name}/{self.replica}".encode()
                try:  # for the API; a broker outage must not stop local checkpoints
                    signed = snapshots.sign(payload, self.settings.kafka.snapshot_key, context=key)
                    await self.outputs.send(self.settings.kafka.models_topic, key, signed)
                except KafkaError as exc:
                    self.output_failed(exc)
                    continue
                await feeder.release(covered)  # only now may Kafka forget these events
                self._published[name] = (int(state["version"]), state["telemetry"]["messages"])
                self._published_at[name] = time.monotonic()
                sent += 1
        return sent


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("snapshot publishing failed", exc_info=task.exception())


def build_app(settings: Settings, bootstrap: str) -> tuple[faust.App, WorkerRuntime]:
    """A Faust app with one learning agent per model spec."""
    app = faust.App(settings.worker.app_id, **faust_settings(settings, bootstrap))
    runtime = WorkerRuntime(app, settings, bootstrap)
    return app, runtime
