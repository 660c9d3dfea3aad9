"""End-to-end worker throughput on a fresh embedded broker, with baselines from the same run.

What it does, in one process tree that it cleans up (children stopped by PID):

1. starts Tansu and pre-loads a JSON backlog (one event per message) and a backlog of
   batch records (``streamlearn.batch_format``), both from the seeded synthetic stream;
2. measures two baselines on the JSON backlog: the raw ``aiokafka`` ``getmany`` +
   ``orjson`` into NumPy ceiling, and a minimal one-by-one Faust agent (a subprocess);
3. runs the real worker (``python -m streamlearn worker`` with ``STREAMLEARN_CONFIG``
   pointing at a temporary TOML) once per backlog and reads its snapshots on
   ``streamlearn.models``: events/s from the first to the last event learned (the
   snapshot telemetry's ``first_at``/``last_at``/``consumed``), start -> first event
   seconds, worker RSS at the first event and at the end, the worst event-loop lag, the
   worker's CPU per event by thread (from ``/proc``, between two snapshots), and whether
   the group's committed offsets reached the end of every partition;
4. ``--aggregates`` adds the JSON worker with three aggregates over three windows (issue
   11's target: >= 0.7x of its rate without them); ``--pairs N`` runs the two N times,
   alternately, and prints the median ratio;
5. ``--soak SECONDS`` instead feeds a fresh worker live and samples worker and broker RSS.

JSON events are keyed by card and sent to their key's partition, as ``streamlearn
produce`` does (a card's aggregates live with one partition).

Examples::

    python load_tests/bench_worker.py                        # 300k JSON, 5M in batch records
    python load_tests/bench_worker.py --json 500000 --batch 0 --profile /tmp/prof
    python load_tests/bench_worker.py --json 600000 --batch 0 --no-baselines --aggregates --pairs 4
    python load_tests/bench_worker.py --soak 300 --soak-rate 20000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import TopicPartition

from streamlearn import snapshots
from streamlearn.batch_format import FeatureDecoder, decode_batch, encode_columns
from streamlearn.broker import EmbeddedBroker
from streamlearn.config import ModelSpec
from streamlearn.services.producer import synthetic_columns
from streamlearn.synthetic import FraudStream

NUMERIC = ("amount", "hour", "distance_km", "card_age_days", "tx_last_hour")
CATEGORICAL = ("merchant_category", "country", "channel")
MODELS_TOPIC = "streamlearn.models"
REPLICA = "bench"
MAX_REQUEST = 16 * 1024 * 1024


# -- helpers ---------------------------------------------------------------------------------


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of a process in MiB (Linux), None once it is gone."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return None


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of a process (Linux), by thread id."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
                out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM,
                 wait: float = 15.0) -> None:
    """Stop one child we started, by its PID, and reap it."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


async def create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def bulk_producer(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    """A started producer with room for large batches and records, stopped on exit."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5,
                                max_batch_size=1024 * 1024, max_request_size=MAX_REQUEST)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def preload_json(bootstrap: str, topic: str, n: int, partitions: int, seed: int) -> None:
    """``n`` JSON events keyed by card, each on its key's partition (Kafka's default
    partitioner, as ``streamlearn produce`` sends them: a card's aggregates live on one
    partition), in producer batches (fast path)."""
    partitioner, every = DefaultPartitioner(), list(range(partitions))
    async with bulk_producer(bootstrap) as producer:
        stream, sent, futures = FraudStream(seed=seed), 0, []
        batches = [producer.create_batch() for _ in every]
        while sent < n:
            events = stream.take(min(8192, n - sent))
            for event in events:
                key = str(event["card_id"]).encode()
                part = partitioner(key, every, every)
                value = orjson.dumps(event)
                if batches[part].append(key=key, value=value, timestamp=None) is None:
                    futures.append(await producer.send_batch(batches[part], topic,
                                                             partition=part))
                    batches[part] = producer.create_batch()
                    batches[part].append(key=key, value=value, timestamp=None)
            sent += len(events)
        for part in every:
            futures.append(await producer.send_batch(batches[part], topic, partition=part))
        await asyncio.gather(*futures)


async def preload_batches(bootstrap: str, topic: str, n: int, rows: int, partitions: int,
                          seed: int) -> int:
    """``n`` events in batch records of ``rows`` events; returns the number of records."""
    async with bulk_producer(bootstrap) as producer:
        stream, sent, records, futures = FraudStream(seed=seed), 0, 0, []
        while sent < n:
            k = min(rows, n - sent)
            payload = encode_columns(synthetic_columns(stream, k))
            futures.append(await producer.send(topic, payload, partition=records % partitions))
            sent += k
            records += 1
        await asyncio.gather(*futures)
        return records


# -- baselines -------------------------------------------------------------------------------


async def raw_consume(bootstrap: str, topic: str, n: int, *, batch: bool) -> dict[str, float]:
    """The aiokafka ceiling: getmany + orjson (or batch decode) into NumPy, no Faust."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"bench-raw-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest", enable_auto_commit=False, session_timeout_ms=6000,
        heartbeat_interval_ms=1000, max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    spec = ModelSpec(name="raw", topic=topic, label="is_fraud", numeric=NUMERIC,
                     categorical=CATEGORICAL)
    decoder = FeatureDecoder(spec)
    t_start = time.time()
    await consumer.start()
    got, t0, loads = 0, 0.0, orjson.loads
    try:
        while got < n:
            recs = await consumer.getmany(timeout_ms=1000, max_records=8192)
            for msgs in recs.values():
                if not t0:
                    t0 = time.time()
                if batch:
                    for m in msgs:
                        got += len(decoder.features(decode_batch(m.value)))
                else:
                    events = [loads(m.value) for m in msgs]
                    np.array([[e.get(f) for f in NUMERIC] for e in events], dtype=np.float64)
                    got += len(events)
        t1 = time.time()
    finally:
        await consumer.stop()
    return {"events": got, "rate": got / (t1 - t0), "first_s": t0 - t_start}


def model_ceiling(batch_size: int, seconds: float = 3.0, rows: int = 4096) -> dict[str, float]:
    """The worker's learning call alone: ``OnlineModel.process_many`` on decoded records of
    ``rows`` events, one learning step per ``batch_size`` (no Kafka, no decoding)."""
    from streamlearn.models import OnlineModel
    from streamlearn.pipeline import ModelRunner

    spec = ModelSpec(name="ceiling", topic="t", label="is_fraud", numeric=NUMERIC,
                     categorical=CATEGORICAL, hash_bits=18, batch_size=batch_size)
    runner = ModelRunner(OnlineModel(spec, device="cpu"), emit_predictions=False)
    batch = FeatureDecoder(spec).decode(encode_columns(synthetic_columns(FraudStream(seed=9),
                                                                        65536)))
    records = [batch.take(np.arange(lo, min(lo + rows, len(batch))))
               for lo in range(0, len(batch), rows)]
    model = runner.model
    model.process_many(records[0], batch_size)  # kernel cache and river's import: not timed
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for record in records:
            model.process_many(record, batch_size)
        n += len(batch)
    return {"events": n, "rate": n / (time.perf_counter() - t0)}


def format_comparison(rows: int = 4096, repeat: int = 50) -> None:
    """Columnar batch records against msgpack, encode and decode to model inputs (no Kafka)."""
    import msgpack

    from streamlearn.batch_format import Categorical
    from streamlearn.features import Vectorizer

    spec = ModelSpec(name="fmt", topic="t", label="is_fraud", numeric=NUMERIC,
                     categorical=CATEGORICAL, hash_bits=18)
    cols = synthetic_columns(FraudStream(seed=3), rows)
    decoder, vec = FeatureDecoder(spec), Vectorizer(spec)
    plain = {k: (v.tolist() if isinstance(v, np.ndarray)
                 else [v.values[c] for c in np.asarray(v.codes)]) for k, v in cols.items()
             if k in (*NUMERIC, *CATEGORICAL, "is_fraud", "event_id")}

    def from_msgpack_lists(payload: bytes) -> Any:
        d = msgpack.unpackb(payload)
        numeric = np.array([d[k] for k in NUMERIC], dtype=np.float64).T
        hashed = np.array([[vec.slot(k, v) for v in d[k]] for k in CATEGORICAL]).T
        return numeric, hashed, np.array(d["is_fraud"], dtype=np.float32), d["event_id"]

    def from_msgpack_raw(payload: bytes) -> Any:
        d = msgpack.unpackb(payload)
        numeric = np.stack([np.frombuffer(d[k], dtype=np.float64) for k in NUMERIC], axis=1)
        hashed = np.stack([np.array([vec.slot(k, v) for v in d[k]["values"]])[
            np.frombuffer(d[k]["codes"], dtype=np.int8)] for k in CATEGORICAL], axis=1)
        return numeric, hashed, np.frombuffer(d["is_fraud"], dtype=np.float32)

    raw = {k: (v.tobytes() if isinstance(v, np.ndarray) else
               {"codes": np.asarray(v.codes, dtype=np.int8).tobytes(), "values": list(v.values)})
           for k, v in cols.items() if isinstance(v, np.ndarray | Categorical)}
    cases = [
        ("columnar batch record (this format)", lambda: encode_columns(cols), decoder.decode),
        ("msgpack, one list per column", lambda: msgpack.packb(plain), from_msgpack_lists),
        ("msgpack, raw column bytes", lambda: msgpack.packb(raw), from_msgpack_raw),
    ]
    print(f"format comparison, {rows} rows per message:")
    for name, enc, dec in cases:
        payload = enc()
        t0 = time.perf_counter()
        for _ in range(repeat):
            enc()
        t1 = time.perf_counter()
        for _ in range(repeat):
            dec(payload)
        t2 = time.perf_counter()
        print(f"  {name:38s} {len(payload) / rows:6.1f} B/row  encode "
              f"{rows * repeat / (t1 - t0):>12,.0f} rows/s  decode to model inputs "
              f"{rows * repeat / (t2 - t1):>12,.0f} rows/s")


FAUST_ONE = '''
import json, os, sys, time, uuid, orjson, faust
from faust.worker import Worker
bootstrap, topic, n, partitions = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
app = faust.App(f"bench-faust-{uuid.uuid4().hex[:8]}", broker=f"kafka://{bootstrap}",
                store="memory://", web_enabled=False, topic_partitions=partitions,
                consumer_auto_offset_reset="earliest", stream_wait_empty=False,
                broker_session_timeout=2.0, broker_heartbeat_interval=0.5,
                broker_rebalance_timeout=4.0)
state = {"n": 0, "t0": 0.0}
t_start = time.time()
@app.agent(app.topic(topic, value_serializer="raw", key_serializer="raw"))
async def one_by_one(stream):
    async for value in stream:
        orjson.loads(value)
        if not state["t0"]:
            state["t0"] = time.time()
        state["n"] += 1
        if state["n"] >= n:
            t1 = time.time()
            print("RESULT " + json.dumps({"events": state["n"],
                  "rate": state["n"] / (t1 - state["t0"]), "first_s": state["t0"] - t_start}),
                  flush=True)
            os._exit(0)
Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False).execute_from_commandline()
'''


def faust_one_by_one(bootstrap: str, topic: str, n: int, partitions: int, timeout: float,
                     workdir: Path) -> dict[str, float] | None:
    """A minimal Faust agent iterating JSON events one by one (subprocess)."""
    proc = subprocess.Popen([sys.executable, "-c", FAUST_ONE, bootstrap, topic, str(n),
                             str(partitions)], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        return None
    for line in out.splitlines():  # Faust's worker writes terminal escapes first
        if "RESULT " in line:
            return json.loads(line.split("RESULT ", 1)[1])  # type: ignore[no-any-return]
    return None


# -- the real worker -------------------------------------------------------------------------


#: ``--aggregates``: three aggregates over three windows (issue 11's target), per card and
#: per merchant, on the synthetic stream's fields.
AGGREGATES = """
[[model.aggregate]]
entity = "card_id"
field = "amount"
windows = ["1m", "10m", "1h"]
stats = ["count", "sum", "mean"]
[[model.aggregate]]
entity = "card_id"
field = "distance_km"
windows = ["1m", "10m", "1h"]
stats = ["count", "sum", "mean"]
[[model.aggregate]]
entity = "merchant_id"
field = "amount"
windows = ["1m", "10m", "1h"]
stats = ["count", "sum", "mean"]
"""


def worker_config(path: Path, *, model: str, topic: str, partitions: int, batch_size: int,
                  emit: bool, snapshot_dir: Path, aggregates: bool = False) -> None:
    path.write_text(f"""
[kafka]
partitions = {partitions}
[worker]
app_id = "bench-{model}-{uuid.uuid4().hex[:8]}"
replica_id = "{REPLICA}"
snapshot_dir = "{snapshot_dir}"
emit_predictions = {str(emit).lower()}
batch_within_s = 0.2
log_level = "INFO"
[[model]]
name = "{model}"
topic = "{topic}"
label = "is_fraud"
numeric = {json.dumps(list(NUMERIC))}
categorical = {json.dumps(list(CATEGORICAL))}
hash_bits = 18
batch_size = {batch_size}
""" + (AGGREGATES if aggregates else ""))


class _Metadata(Exception):  # noqa: N818 - a carrier, not an error
    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = meta


def _metadata(payload: bytes) -> dict[str, Any]:
    """A snapshot's metadata (telemetry, health; arrays left undecoded): this process
    shares the cores with the worker, and inflating every 2 MB aggregate snapshot would
    take their time from it (16 ms each, measured)."""
    def stop(meta: dict[str, Any]) -> None:
        raise _Metadata(meta)

    try:
        snapshots.decode(payload, vet=stop)
    except _Metadata as got:
        return got.meta
    raise AssertionError("decode read the arrays before vetting them")  # pragma: no cover


class SnapshotWatch:
    """Follow one model's snapshots on ``streamlearn.models`` (from the start of the topic)."""

    def __init__(self, bootstrap: str, model: str) -> None:
        self.bootstrap = bootstrap
        self.key = f"{model}/{REPLICA}".encode()
        self.latest: dict[str, Any] | None = None
        self.count = 0
        self.bytes = 0
        self.lag_ms = 0.0
        self.lags: list[float] = []

    async def __aenter__(self) -> SnapshotWatch:
        self.consumer = AIOKafkaConsumer(MODELS_TOPIC, bootstrap_servers=self.bootstrap,
                                         auto_offset_reset="earliest", enable_auto_commit=False,
                                         max_partition_fetch_bytes=MAX_REQUEST)
        await self.consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def poll(self, timeout_ms: int = 200) -> None:
        recs = await self.consumer.getmany(timeout_ms=timeout_ms)
        for msgs in recs.values():
            for m in msgs:
                if m.key != self.key:
                    continue
                state = _metadata(m.value)
                self.latest = state
                self.count += 1
                self.bytes += len(m.value)
                lag = float((state.get("worker") or {}).get("loop_lag_max_ms", 0.0))
                self.lags.append(lag)
                self.lag_ms = max(self.lag_ms, lag)

    @property
    def telemetry(self) -> dict[str, Any]:
        return (self.latest or {}).get("telemetry", {})


async def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    """The worker group's committed offsets, summed over the topic's partitions.

    Compared with the number of messages pre-loaded (offsets start at 0 without gaps
    there): Tansu 0.6 answers ListOffsets(latest) with values below the real end.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        return sum([await consumer.committed(TopicPartition(topic, p)) or 0
                    for p in range(partitions)])
    finally:
        await consumer.stop()


async def run_worker(bootstrap: str, *, model: str, topic: str, events: int, messages: int,
                     partitions: int, batch_size: int, emit: bool, timeout: float,
                     workdir: Path, profile: Path | None,
                     aggregates: bool = False) -> dict[str, Any]:
    """Start the real worker on a pre-loaded topic; measure it from its snapshots."""
    cfg = workdir / f"{model}.toml"
    worker_config(cfg, model=model, topic=topic, partitions=partitions, batch_size=batch_size,
                  emit=emit, snapshot_dir=workdir / f"snap-{model}", aggregates=aggregates)
    group = re.search(r'app_id = "([^"]+)"', cfg.read_text()).group(1)  # type: ignore[union-attr]
    env = {**os.environ, "STREAMLEARN_CONFIG": str(cfg), "STREAMLEARN_KAFKA__BOOTSTRAP": bootstrap,
           "STREAMLEARN_KAFKA__FAST_JOIN": "true"}
    log = open(workdir / f"{model}.log", "wb")  # noqa: SIM115 - closed in finally
    result: dict[str, Any] = {"model": model, "events": events}
    async with SnapshotWatch(bootstrap, model) as watch:
        await watch.poll(100)  # nothing yet: the topic starts empty per model key
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
        t_spawn = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "streamlearn", "worker"], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        spy = None
        rss_start = rss_peak = None
        cpu_start: tuple[int, dict[int, float]] | None = None
        cpu_end: tuple[int, dict[int, float]] | None = None
        try:
            if profile is not None:
                spy = subprocess.Popen(
                    ["py-spy", "record", "-r", "400", "-f", "raw", "--threads", "--pid",
                     str(proc.pid), "-o", str(profile / f"{model}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {proc.returncode}; see {log.name}")
                await watch.poll()
                rss = rss_mb(proc.pid)
                rss_peak = max(rss_peak or 0.0, rss or 0.0)
                consumed = int(watch.telemetry.get("consumed", 0))
                if consumed and rss_start is None:
                    rss_start = rss
                    cpu_start = (consumed, thread_cpu_s(proc.pid))
                if consumed >= events:
                    cpu_end = (consumed, thread_cpu_s(proc.pid))
                    break
            t = watch.telemetry
            consumed = int(t.get("consumed", 0))
            if cpu_start is not None and cpu_end is not None and cpu_end[0] > cpu_start[0]:
                # CPU per event between two snapshots, by thread (busiest first): steadier
                # than a rate on shared cores, and it says which thread pays.
                n = cpu_end[0] - cpu_start[0]
                used = sorted((cpu_end[1][k] - cpu_start[1].get(k, 0.0) for k in cpu_end[1]),
                              reverse=True)
                result["cpu_us_per_event"] = sum(used) / n * 1e6
                result["thread_cpu_us_per_event"] = [round(u / n * 1e6, 2) for u in used[:4]]
            span = float(t.get("last_at", 0.0)) - float(t.get("first_at", 0.0))
            result.update(
                consumed=consumed, learned=int(t.get("learned", 0)),
                deadlettered=int(t.get("deadlettered", 0)),
                rate=consumed / span if span > 0 else 0.0,
                first_event_s=float(t.get("first_at", 0.0)) - t_spawn if consumed else None,
                last_event_s=float(t.get("last_at", 0.0)) - t_spawn if consumed else None,
                rss_start_mb=rss_start, rss_end_mb=rss_mb(proc.pid), rss_peak_mb=rss_peak,
                loop_lag_max_ms=watch.lag_ms, loop_lags_ms=watch.lags, snapshots=watch.count,
                snapshot_kb=watch.bytes / max(watch.count, 1) / 1024,
                complete=consumed >= events,
            )
            result["messages"] = messages
            for _ in range(10):  # Faust commits acked offsets every ~2.8 s
                await asyncio.sleep(1.0)
                result["committed"] = await committed_offsets(bootstrap, group, topic,
                                                              partitions)
                if result["committed"] >= messages:
                    break
        finally:
            if spy is not None:
                stop_process(spy, signal.SIGINT)
            stop_process(proc)
            log.close()
    text = (workdir / f"{model}.log").read_text(errors="replace")
    ready = re.search(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\].*\[\^Worker\]: Ready", text)
    if ready:
        stamp = time.mktime(time.strptime(ready.group(1), "%Y-%m-%d %H:%M:%S"))
        result["ready_s"] = stamp + int(ready.group(2)) / 1000 - t_spawn
    drift = re.search(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\].*importing river's drift "
                      r"detectors \((.*)\)", text)
    if drift:
        stamp = time.mktime(time.strptime(drift.group(1), "%Y-%m-%d %H:%M:%S"))
        result["drift_import_s"] = stamp + int(drift.group(2)) / 1000 - t_spawn
        result["drift_import_why"] = drift.group(3)
    result["rebalances"] = max(0, text.count("(Re-)joining group") - 1)
    result["warnings"] = [line[:160] for line in text.splitlines()
                          if "WARNING" in line or "ERROR" in line][:5]
    return result


# -- profile summary -------------------------------------------------------------------------


#: Where a sample's time goes: start-up if its stack imports, idle if its innermost frame
#: waits (select, an empty executor queue), else the first category whose pattern is in
#: the stack (this order).
IDLE_LEAVES = ("EpollSelector.select", "_worker (", "Condition.wait", "Event.wait")
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("snapshots (capture, encode, save)", ("snapshot_state", "snapshots.py")),
    ("learning: OnlineModel.process", ("OnlineModel.process",)),
    ("decode+vectorize: JSON", ("JsonDecoder",)),
    ("decode: batch records", ("FeatureDecoder", "batch_format.py")),
    ("prediction records + producer", ("_prediction_records", "Outputs.send", "producer/",
                                       "encode_columns")),
    ("pipeline glue (handle_blocks, chunks)", ("ModelRunner",)),
    ("bundling scheduler", ("BundlingScheduler", "_bundle_record")),
    ("Faust commits (gap/ack bookkeeping)", ("Consumer.commit", "Consumer._commit_handler",
                                             "Consumer.force_commit", "Event.ack")),
    ("socket reads/writes (asyncio streams)", ("asyncio/streams.py", "selector_events.py")),
    ("aiokafka fetch + record parsing", ("aiokafka/consumer", "AIOKafkaConsumerThread",
                                         "aiokafka/conn", "aiokafka/client")),
    ("Faust per-message (drain, conductor, stream)", ("faust/", "mode/")),
)


def summarize_profile(path: Path, top: int = 20) -> str:
    """Shares by category and by function (self) from a py-spy ``raw`` (collapsed) file."""
    own: collections.Counter[str] = collections.Counter()
    cats: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        threads[re.sub(r"\s*\(\d+\)", "", frames[0])] += n
        names = [re.sub(r" \((?:.*site-packages/)?(.*?):\d+\)$", r" (\1)", f) for f in frames[1:]]
        if names:
            own[names[-1]] += n
        if any(p in stack for p in ("_find_and_load", "warm_up", "import_module",
                                    "_load_runners", "getFrameInfo")):
            cats["start-up (imports, JIT cache, warm-up)"] += n
        elif names and names[-1].startswith(IDLE_LEAVES):
            cats["idle (select, empty queues; no GIL)"] += n
        else:
            cats[next((c for c, pats in CATEGORIES if any(p in stack for p in pats)),
                      "other")] += n
    if not total:
        return f"{path}: no samples"
    lines = [f"{path.name}: {total} samples (all threads; py-spy names threads by first use)"]
    lines += [f"  {100 * n / total:5.1f}%  thread {t}" for t, n in threads.most_common(6)]
    busy = total - sum(n for c, n in cats.items() if c.startswith(("start-up", "idle")))
    lines.append("  -- by category (share of all samples | of busy streaming samples)")
    lines += [f"  {100 * n / total:5.1f}% | "
              + ("  -  " if c.startswith(("start-up", "idle")) else f"{100 * n / busy:4.1f}%")
              + f"  {c}" for c, n in cats.most_common()]
    lines.append("  -- self time by function")
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines)


# -- soak ------------------------------------------------------------------------------------


async def soak(broker: EmbeddedBroker, args: argparse.Namespace, workdir: Path) -> None:
    """Feed a fresh worker live for ``args.soak`` seconds; print worker and broker RSS."""
    from streamlearn.services.producer import produce

    bootstrap, topic, model = broker.bootstrap, "bench.soak", "fraud_soak"
    await create_topics(bootstrap, [topic], args.partitions)
    cfg = workdir / f"{model}.toml"
    worker_config(cfg, model=model, topic=topic, partitions=args.partitions,
                  batch_size=args.model_batch_size, emit=not args.no_predictions,
                  snapshot_dir=workdir / f"snap-{model}")
    env = {**os.environ, "STREAMLEARN_CONFIG": str(cfg),
           "STREAMLEARN_KAFKA__BOOTSTRAP": bootstrap, "STREAMLEARN_KAFKA__FAST_JOIN": "true"}
    log = open(workdir / f"{model}.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([sys.executable, "-m", "streamlearn", "worker"], env=env,
                            stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    stop = asyncio.Event()
    feed = asyncio.create_task(produce(bootstrap, topic, rate=args.soak_rate, stop=stop,
                                       fmt=args.soak_format, batch_rows=args.batch_rows))
    samples: list[tuple[float, float | None, float | None, int]] = []
    try:
        async with SnapshotWatch(bootstrap, model) as watch:
            t0 = time.monotonic()
            next_sample = t0
            while time.monotonic() - t0 < args.soak:
                await watch.poll(500)
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {proc.returncode}; see {log.name}")
                if feed.done():
                    feed.result()
                if time.monotonic() >= next_sample:
                    samples.append((time.monotonic() - t0, rss_mb(proc.pid),
                                    broker.rss_bytes() / 2**20 if broker.rss_bytes() else None,
                                    int(watch.telemetry.get("consumed", 0))))
                    s = samples[-1]
                    print(f"  soak t={s[0]:5.0f}s worker RSS {s[1] or 0:7.1f} MiB  broker RSS "
                          f"{s[2] or 0:8.1f} MiB  consumed {s[3]:,}", flush=True)
                    next_sample += max(5.0, args.soak / 30)
            stop.set()
            await feed
            steady_lag = max(watch.lags[1:], default=0.0)
            half = [s for s in samples if s[0] >= args.soak / 2 and s[1]]
            if len(half) >= 2:
                slope = (half[-1][1] - half[0][1]) / ((half[-1][0] - half[0][0]) / 60)  # type: ignore[operator]
                print(f"soak: worker RSS slope over the second half {slope:+.2f} MiB/min; "
                      f"snapshots {watch.count} of {watch.bytes / max(watch.count, 1) / 1024:.0f} "
                      f"KiB ({watch.bytes / args.soak / 1024:.1f} KiB/s into a broker that never "
                      f"compacts); max loop lag {steady_lag:.0f} ms (start-up "
                      f"{(watch.lags or [0.0])[0]:.0f} ms)")
    finally:
        stop.set()
        if not feed.done():
            feed.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feed
        stop_process(proc)
        log.close()


# -- main ------------------------------------------------------------------------------------


def fmt_rate(x: float | None) -> str:
    return "n/a" if not x else f"{x:,.0f} ev/s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=int, default=300_000, help="JSON events to pre-load (0: skip)")
    p.add_argument("--batch", type=int, default=5_000_000,
                   help="events to pre-load in batch records (0: skip)")
    p.add_argument("--batch-rows", type=int, default=4096, help="events per batch record")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--model-batch-size", type=int, default=256,
                   help="the spec's mini-batch size (default 256, the documented default)")
    p.add_argument("--baseline-events", type=int, default=100_000,
                   help="JSON events the one-by-one Faust baseline reads (it is slow)")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--no-predictions", action="store_true", help="emit_predictions = false")
    p.add_argument("--timeout", type=float, default=120.0, help="per worker run, seconds")
    p.add_argument("--profile", type=Path, default=None,
                   help="py-spy the worker runs into this folder and print a summary")
    p.add_argument("--soak", type=float, default=0.0,
                   help="instead: feed a worker live for SECONDS and sample RSS")
    p.add_argument("--soak-rate", type=float, default=20_000.0, help="events/s in the soak")
    p.add_argument("--soak-format", choices=("json", "batch"), default="json")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--aggregates", action="store_true",
                   help="also run the JSON worker with three aggregates over three windows "
                        "(issue 11: >= 0.7x of its rate without, same run)")
    p.add_argument("--pairs", type=int, default=1,
                   help="with --aggregates: run the JSON worker without and with them this "
                        "many times, alternately, and report the median ratio")
    p.add_argument("--format-only", action="store_true",
                   help="only compare batch-record encodings (no broker)")
    args = p.parse_args(argv)
    if args.format_only:
        format_comparison(args.batch_rows)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp, EmbeddedBroker() as broker:
        workdir, bootstrap = Path(tmp), broker.bootstrap
        print(f"broker {bootstrap} (Tansu, memory), "
              f"RSS {(broker.rss_bytes() or 0) / 2**20:.0f} MiB")
        if args.soak:
            asyncio.run(soak(broker, args, workdir))
            return 0
        topics = [t for t, n in (("bench.json", args.json), ("bench.batch", args.batch)) if n]
        asyncio.run(create_topics(bootstrap, topics, args.partitions))
        results: dict[str, Any] = {}
        if args.json:
            t = time.monotonic()
            asyncio.run(preload_json(bootstrap, "bench.json", args.json, args.partitions,
                                     args.seed))
            print(f"pre-loaded {args.json:,} JSON events in {time.monotonic() - t:.1f}s")
        n_rec = 0
        if args.batch:
            t = time.monotonic()
            n_rec = asyncio.run(preload_batches(bootstrap, "bench.batch", args.batch,
                                                args.batch_rows, args.partitions, args.seed))
            print(f"pre-loaded {args.batch:,} events in {n_rec:,} batch records of "
                  f"{args.batch_rows} in {time.monotonic() - t:.1f}s")
        if not args.no_baselines and args.json:
            results["raw_json"] = asyncio.run(raw_consume(bootstrap, "bench.json", args.json,
                                                          batch=False))
            print(f"baseline raw aiokafka+orjson->NumPy: {fmt_rate(results['raw_json']['rate'])}")
            n = min(args.baseline_events, args.json)
            results["faust_one"] = faust_one_by_one(bootstrap, "bench.json", n, args.partitions,
                                                    timeout=args.timeout, workdir=workdir)
            print(f"baseline one-by-one Faust agent ({n:,} events): "
                  f"{fmt_rate((results['faust_one'] or {}).get('rate'))}")
        if not args.no_baselines and args.batch:
            results["raw_batch"] = asyncio.run(raw_consume(bootstrap, "bench.batch", args.batch,
                                                           batch=True))
            print(f"baseline raw aiokafka+batch decode: {fmt_rate(results['raw_batch']['rate'])}")
            results["model"] = model_ceiling(args.model_batch_size, rows=args.batch_rows)
            print(f"baseline OnlineModel.process_many alone ({args.batch_rows}-event records, "
                  "batch_size "
                  f"{args.model_batch_size}): "
                  f"{fmt_rate(results['model']['rate'])}")
        json_runs = [("json", "bench.json", args.json, args.json)]
        if args.aggregates:  # alternated, so that the machine's mood falls on both alike
            json_runs = [("json", "bench.json", args.json, args.json),
                         ("json_aggregates", "bench.json", args.json, args.json)] * args.pairs
        runs = [*json_runs, ("batch", "bench.batch", args.batch, n_rec)]
        seen: collections.Counter[str] = collections.Counter()
        for kind, topic, n, msgs in runs:
            if not n:
                continue
            seen[kind] += 1
            model = f"fraud_{kind}" + (f"_{seen[kind]}" if seen[kind] > 1 else "")
            r = asyncio.run(run_worker(
                bootstrap, model=model, topic=topic, events=n, messages=msgs,
                partitions=args.partitions, batch_size=args.model_batch_size,
                emit=not args.no_predictions, timeout=args.timeout, workdir=workdir,
                profile=args.profile, aggregates=kind.endswith("aggregates")))
            results[f"worker_{kind}"] = r
            results.setdefault(f"runs_{kind}", []).append(r)
            print(f"worker {kind}: {fmt_rate(r.get('rate'))} over {r.get('consumed', 0):,} "
                  f"events (complete={r.get('complete')})", flush=True)
        print(f"broker RSS at the end {(broker.rss_bytes() or 0) / 2**20:.0f} MiB")
        report(results, args)
        if args.profile:
            for f in sorted(args.profile.glob("fraud_*.txt")):
                print(summarize_profile(f))
    return 0


def _lag(r: dict[str, Any]) -> str:
    """Worst event-loop lag while streaming, and in the first snapshot period (start-up)."""
    lags = r.get("loop_lags_ms") or [0.0]
    steady = max(lags[1:], default=0.0)
    return f"{steady:.0f} ms (start-up {lags[0]:.0f} ms)"


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    print("\n== streamlearn worker, same run ==")
    print(f"model batch_size {args.model_batch_size}, {args.partitions} partitions, "
          f"predictions {'off' if args.no_predictions else 'on'}")
    raw, one = results.get("raw_json"), results.get("faust_one")
    for kind in ("json", "json_aggregates", "batch"):
        r = results.get(f"worker_{kind}")
        if not r:
            continue
        if kind == "json_aggregates":
            base = (results.get("worker_json") or {}).get("rate") or 0.0
            rate = r.get("rate") or 0.0
            print(f"json + 3 aggregates x 3 windows: {fmt_rate(rate)}, "
                  f"{rate / base if base else 0:.2f}x of the JSON worker without them; "
                  f"snapshots x {r.get('snapshot_kb', 0):.0f} KiB")
            cpu = (results.get("worker_json") or {}).get("cpu_us_per_event")
            if cpu and r.get("cpu_us_per_event"):
                print(f"       worker CPU {r['cpu_us_per_event']:.2f} us/event (threads "
                      f"{r['thread_cpu_us_per_event']}) against {cpu:.2f} without them: "
                      f"{cpu / r['cpu_us_per_event']:.2f}x as many events per CPU second")
            pairs = list(zip(results.get("runs_json", []), results.get("runs_json_aggregates", []),
                             strict=False))
            if len(pairs) > 1:
                rates = [b.get("rate", 0.0) / a["rate"] for a, b in pairs if a.get("rate")]
                cpus = [a["cpu_us_per_event"] / b["cpu_us_per_event"] for a, b in pairs
                        if a.get("cpu_us_per_event") and b.get("cpu_us_per_event")]
                print(f"       {len(pairs)} alternated pairs: rate ratio median "
                      f"{statistics.median(rates):.2f}x ({', '.join(f'{x:.2f}' for x in rates)})"
                      + (f"; events per CPU second median {statistics.median(cpus):.2f}x"
                         if cpus else ""))
            continue
        rate = r.get("rate") or 0.0
        first = r.get("first_event_s")
        print(f"{kind:5s}: {fmt_rate(rate):>16s}  start->first event "
              f"{'n/a' if first is None else f'{first:.2f}s'}"
              f" (Faust ready {r.get('ready_s') or 0:.2f}s)"
              f"  RSS {r.get('rss_start_mb') or 0:.0f} -> {r.get('rss_end_mb') or 0:.0f} MiB"
              f" (peak {r.get('rss_peak_mb') or 0:.0f})  loop lag max {_lag(r)}"
              f"  committed {r.get('committed', 0):,}/{r.get('messages', 0):,} msgs"
              f"  dead {r.get('deadlettered', 0)}  snapshots {r.get('snapshots', 0)}"
              f" x {r.get('snapshot_kb', 0):.0f} KiB")
        if r.get("cpu_us_per_event"):
            print(f"       worker CPU {r['cpu_us_per_event']:.2f} us/event "
                  f"(busiest threads {r['thread_cpu_us_per_event']})")
        if r.get("drift_import_s") is not None:
            print(f"       river's drift detectors: import started at "
                  f"{r['drift_import_s']:.2f}s ({r['drift_import_why']}); "
                  f"last event learned at {r.get('last_event_s') or 0:.2f}s")
        if r.get("rebalances") or r.get("warnings"):
            print(f"       rebalances {r.get('rebalances')}; log: {r.get('warnings')}")
        if kind == "json" and raw:
            print(f"       raw aiokafka+orjson ceiling {fmt_rate(raw['rate'])}: worker at "
                  f"{rate / raw['rate']:.2f}x of it")
        if kind == "json" and one:
            print(f"       one-by-one Faust agent {fmt_rate(one['rate'])}: worker at "
                  f"{rate / one['rate']:.1f}x of it (start->first event {one['first_s']:.2f}s)")
        if kind == "batch" and results.get("raw_batch"):
            rb = results["raw_batch"]["rate"]
            print(f"       raw aiokafka+batch decode ceiling {fmt_rate(rb)}: worker at "
                  f"{rate / rb:.2f}x of it")
            if results.get("model"):
                rm = results["model"]["rate"]
                print(f"       OnlineModel.process_many alone {fmt_rate(rm)}: worker at "
                      f"{rate / rm:.2f}x of it")
            if one:
                print(f"       one-by-one Faust agent on JSON {fmt_rate(one['rate'])}: batch "
                      f"worker at {rate / one['rate']:.0f}x of it")


if __name__ == "__main__":
    sys.exit(main())
