"""Serving under load, on loopback, with wrk: /predict with and without learning, the
learn+serve figure and model freshness, against a minimal FastAPI+pydantic app.

Starts the whole system on 127.0.0.1 (embedded Tansu broker, one worker, the API with one
serving process) plus the baseline app (``minimal_app.py``), and measures with Debian's
``wrk`` (``apt-get install -y wrk``; an outside load generator in C, so the client costs
little of the server's CPU):

1. ``POST /models/fraud/predict`` with one event and with 1,000 instances, at 1, 8 and 64
   connections, for streamlearn and the baseline, first with learning idle, then while a
   producer sends the demo's 3,000 events/s and the worker learns them; each cell three
   times, the two apps interleaved, medians; with each server's CPU time per request;
2. the learn+serve figure: producer rates in a sweep (the last one unthrottled), three wrk
   runs at 8 connections on single-event /predict per rate (medians); events/s the worker
   learned meanwhile; the figure is the highest learned rate whose median p99 is within
   each ``--bound-ms``;
3. freshness: probe events with a unique category value and label 1 go into the input
   topic at the demo's rate; the bench polls /predict with each probe next to a control
   event (another unseen value) and records the first time their scores differ, i.e. the
   first served prediction from a model that has learned the probe.  Poll period 5 ms.

With two or more CPUs, the API and the baseline run on CPU 0 (taskset-style affinity) and
everything else (wrk, worker, broker, producer) on the others, so both apps get one core.
Every run is bounded (``--duration`` seconds each, about 8 minutes in all by default);
every process started here is stopped by PID at the end.

    python load_tests/bench_serve.py [--duration 5] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

HERE = Path(__file__).resolve().parent
MODEL = "fraud"
TOPIC = "transactions"
PREDICT = f"/models/{MODEL}/predict"
DEMO_RATE = 3000

LUA = r"""
local bodies = {}
local n = 0
local i = 0
function init(args)
  for line in io.lines(args[1]) do
    n = n + 1
    bodies[n] = line
  end
  i = math.random(n) - 1
end
function request()
  i = i % n + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, bodies[i])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f,"non2xx":%d,"socket_errors":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, e.status,
    e.connect + e.read + e.write + e.timeout))
end
"""

CONFIG = """
[kafka]
partitions = 4

[worker]
batch_within_s = 0.2
snapshot_interval_s = {snapshot_interval}
snapshot_dir = "{tmp}/snapshots"
log_level = "WARNING"

[api]
host = "127.0.0.1"
port = {port}
workers = 1

[[model]]
name = "fraud"
topic = "transactions"
id_field = "event_id"
label = "is_fraud"
task = "binary"
numeric = ["amount", "hour", "distance_km", "card_age_days", "tx_last_hour"]
categorical = ["merchant_category", "country", "channel"]
hash_bits = 18
batch_size = 256
device = "cpu"
"""


# -- processes -------------------------------------------------------------------


def cpu_sets() -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, everything-else CPUs), or (None, None) on one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


class Procs:
    """Children started here, stopped by PID (SIGINT, then SIGKILL) in reverse order."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str],
              cpus: set[int] | None) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - kept open for the child
        proc = subprocess.Popen(argv, env=env, cwd=self.tmp, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
        if cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(proc.pid, cpus)
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None and proc.returncode not in (0, -2, -15):
                tail = (self.tmp / f"{name}.log").read_text(errors="replace")[-1500:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    def close(self) -> None:
        for _, proc in reversed(self.procs):
            self.stop(proc)


async def wait_ready(base: str, path: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=2.0) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(path)).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{base}{path} was not ready within {timeout:.0f} s")


async def learned(base: str) -> int:
    async with httpx.AsyncClient(base_url=base, timeout=5.0) as client:
        return int((await client.get(f"/models/{MODEL}")).json()["events_learned"])


def producer_argv(rate: float | None, seed: int) -> list[str]:
    argv = [sys.executable, "-m", "streamlearn", "produce", "--seed", str(seed)]
    return argv + (["--rate", str(rate)] if rate else [])


# -- wrk -------------------------------------------------------------------------------


def wrk(url: str, bodies: Path, script: Path, connections: int, duration: float,
        cpus: set[int] | None) -> dict[str, float]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "10s",
            "-s", str(script), url, "--", str(bodies)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                         preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary: {out.stdout[-800:]} {out.stderr[-800:]}")
    r = json.loads(line[len("WRKJSON "):])
    return {"rps": r["requests"] / (r["duration_us"] / 1e6), "p50_ms": r["p50_us"] / 1e3,
            "p90_ms": r["p90_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3,
            "max_ms": r["max_us"] / 1e3, "requests": r["requests"],
            "errors": r["non2xx"] + r["socket_errors"]}


def write_bodies(tmp: Path, events: list[dict[str, Any]]) -> dict[str, Path]:
    single = tmp / "single.jsonl"
    single.write_bytes(b"\n".join(orjson.dumps({"features": e}) for e in events[:256]) + b"\n")
    batch = tmp / "batch.jsonl"
    batch.write_bytes(b"\n".join(
        orjson.dumps({"instances": events[k * 1000:(k + 1) * 1000]}) for k in range(4)) + b"\n")
    return {"single": single, "1000": batch}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(app: str, pid: int, url: str, path: Path, script: Path, c: int,
             duration: float, cpus: set[int] | None) -> dict[str, float]:
    """One wrk run, plus the server's CPU time per request (robust to other load)."""
    c0 = cpu_seconds(pid)
    r = wrk(url, path, script, c, duration, cpus)
    r["cpu_us_per_request"] = (cpu_seconds(pid) - c0) / max(1, r["requests"]) * 1e6
    return r


def matrix(apps: dict[str, tuple[str, int]], bodies: dict[str, Path], script: Path,
           connections: list[int], duration: float, cpus: set[int] | None,
           procs: Procs, repeats: int) -> dict[str, dict[str, Any]]:
    """Each cell ``repeats`` times, the apps interleaved (A B A B ...) so that both meet
    the same bursts of other work; every figure is the median of its runs."""
    rows: dict[str, dict[str, Any]] = {}
    for kind, path in bodies.items():
        for c in connections:
            runs: dict[str, list[dict[str, float]]] = {app: [] for app in apps}
            for _ in range(repeats):
                for app, (base, pid) in apps.items():
                    procs.check()
                    wrk(base + PREDICT, path, script, c, 1, cpus)  # connections, caches
                    runs[app].append(measured(app, pid, base + PREDICT, path, script, c,
                                              duration, cpus))
            for app, got in runs.items():
                r: dict[str, Any] = {k: float(np.median([x[k] for x in got])) for k in got[0]}
                r["rps_runs"] = [round(x["rps"]) for x in got]
                r["errors"] = sum(x["errors"] for x in got)
                rows[f"{app}|{kind}|{c}"] = r
                print(f"  {app:12} {kind:>6} c={c:<3} {r['rps']:9,.0f} req/s  p50 "
                      f"{r['p50_ms']:7.2f}  p90 {r['p90_ms']:7.2f}  p99 {r['p99_ms']:7.2f} ms"
                      f"  cpu {r['cpu_us_per_request']:7.1f} us/req  errors {r['errors']:.0f}"
                      f"  (median of {len(got)}: {r['rps_runs']} req/s)", flush=True)
    return rows


# -- freshness -------------------------------------------------------------------------


async def freshness(bootstrap: str, base: str, n_probes: int, period: float,
                    timeout: float = 10.0) -> dict[str, Any]:
    """Production -> first served prediction of a model that learned it (see module doc)."""
    from aiokafka import AIOKafkaProducer

    tag = f"{random.getrandbits(40):x}"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1)
    await producer.start()
    sent: dict[int, float] = {}
    seen: dict[int, float] = {}
    body_of = {k: [{"merchant_category": f"probe-{tag}-{k}"},
                   {"merchant_category": f"control-{tag}-{k}"}] for k in range(n_probes)}

    async def send_probes() -> None:
        for k in range(n_probes):
            event = {"event_id": f"probe-{tag}-{k}", "merchant_category": f"probe-{tag}-{k}",
                     "is_fraud": 1}
            t = time.perf_counter()
            await producer.send_and_wait(TOPIC, orjson.dumps(event), key=f"p{k}".encode())
            sent[k] = t
            await asyncio.sleep(period)

    async def poll() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=5.0) as client:
            deadline = None
            while len(seen) < n_probes:
                waiting = [k for k in sent if k not in seen]
                if len(sent) == n_probes:
                    deadline = deadline or time.perf_counter() + timeout
                    if time.perf_counter() > deadline:
                        return
                if waiting:
                    instances = [e for k in waiting for e in body_of[k]]
                    r = await client.post(PREDICT, json={"instances": instances})
                    now = time.perf_counter()
                    p = r.json()["predictions"]
                    for j, k in enumerate(waiting):
                        if p[2 * j] != p[2 * j + 1]:
                            seen[k] = now
                await asyncio.sleep(0.005)

    try:
        await asyncio.gather(send_probes(), poll())
    finally:
        await producer.stop()
    lags = np.array([seen[k] - sent[k] for k in seen])
    out: dict[str, Any] = {"probes": n_probes, "seen": len(seen)}
    if len(lags):
        out.update(p50_s=float(np.percentile(lags, 50)), p99_s=float(np.percentile(lags, 99)),
                   max_s=float(lags.max()))
    return out


# -- the run -------------------------------------------------------------------------


@contextlib.contextmanager
def system(tmp: Path, cpus: tuple[set[int] | None, set[int] | None],
           snapshot_interval: float = 0.25) -> Iterator[dict[str, Any]]:
    from streamlearn.broker import EmbeddedBroker, free_port

    server_cpus, other_cpus = cpus
    port, base_port = free_port(), free_port()
    config = tmp / "streamlearn.toml"
    config.write_text(CONFIG.format(tmp=tmp, port=port, snapshot_interval=snapshot_interval))
    broker = EmbeddedBroker().start()
    if other_cpus and broker.proc is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(broker.proc.pid, other_cpus)
    env = {**os.environ, "STREAMLEARN_CONFIG": str(config),
           "STREAMLEARN_KAFKA__BOOTSTRAP": broker.bootstrap,
           "STREAMLEARN_KAFKA__FAST_JOIN": "true"}
    procs = Procs(tmp)
    try:
        procs.start("worker", [sys.executable, "-m", "streamlearn", "worker"], env, other_cpus)
        api = procs.start("api", [sys.executable, "-m", "streamlearn", "api"], env,
                          server_cpus)
        baseline = procs.start("baseline", [sys.executable, str(HERE / "minimal_app.py"),
                                            "--port", str(base_port)], env, server_cpus)
        yield {"env": env, "procs": procs, "bootstrap": broker.bootstrap,
               "api": f"http://127.0.0.1:{port}", "baseline": f"http://127.0.0.1:{base_port}",
               "pids": {"streamlearn": api.pid, "fastapi-min": baseline.pid}}
    finally:
        procs.close()
        broker.stop()


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0915 - one linear script
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, default=3,
                        help="wrk runs per cell and per learn+serve rate (medians)")
    parser.add_argument("--connections", default="1,8,64")
    parser.add_argument("--rates", default="3000,10000,20000,30000,0",
                        help="learn+serve producer rates, events/s (0: unthrottled)")
    parser.add_argument("--bound-ms", default="2,5,10",
                        help="/predict p99 bounds of the learn+serve figure (comma-separated)")
    parser.add_argument("--snapshot-interval", type=float, default=0.25,
                        help="worker.snapshot_interval_s (default 0.25, the demo's)")
    parser.add_argument("--probes", type=int, default=60)
    parser.add_argument("--quick", action="store_true",
                        help="1 s runs, 8 connections, two rates, 20 probes (a smoke run)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--parts", default="idle,learning,freshness,sweep",
                        help="which parts to run (comma-separated)")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench_serve needs wrk: apt-get install -y wrk", file=sys.stderr)
        return 2
    connections = [int(c) for c in args.connections.split(",")]
    bounds = [float(b) for b in args.bound_ms.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    duration, probes, repeats = args.duration, args.probes, args.repeats
    if args.quick:
        duration, connections, rates, probes, repeats = 1.0, [8], [DEMO_RATE, 0.0], 20, 1
    if not (0.5 <= duration <= 60 and all(1 <= c <= 512 for c in connections)
            and 1 <= probes <= 1000 and 1 <= repeats <= 9):
        parser.error("--duration in 0.5..60, connections in 1..512, --probes in 1..1000, "
                     "--repeats in 1..9")
    cpus = cpu_sets()
    results: dict[str, Any] = {"cpus": os.cpu_count(), "pinned": cpus[0] is not None,
                               "duration_s": duration}
    from streamlearn.synthetic import FraudStream

    events = FraudStream(seed=7).take(4000)
    for e in events:
        e.pop("is_fraud", None)
    with tempfile.TemporaryDirectory(prefix="streamlearn-bench-serve-") as tmp_name:
        tmp = Path(tmp_name)
        script = tmp / "post.lua"
        script.write_text(LUA)
        bodies = write_bodies(tmp, events)
        with system(tmp, cpus, args.snapshot_interval) as sys_:
            procs: Procs = sys_["procs"]
            env, api = sys_["env"], sys_["api"]
            pids = sys_["pids"]
            apps = {"streamlearn": (api, pids["streamlearn"]),
                    "fastapi-min": (sys_["baseline"], pids["fastapi-min"])}
            print("warming up: 30,000 events learned, then the API serves a model", flush=True)
            warm = procs.start("warm-producer", producer_argv(None, 1)
                               + ["--count", "30000"], env, cpus[1])
            warm.wait(120)
            asyncio.run(wait_ready(api, "/readyz"))
            asyncio.run(wait_ready(sys_["baseline"], "/healthz"))
            deadline = time.monotonic() + 120
            while asyncio.run(learned(api)) < 29_000 and time.monotonic() < deadline:
                time.sleep(0.5)

            parts = set(args.parts.split(","))
            # Both servers' first requests pay for imports, numba's cached kernels and
            # allocator growth: run each body against each app before measuring anything.
            for base, _ in apps.values():
                for path in bodies.values():
                    wrk(base + PREDICT, path, script, 8, 2, cpus[1])
            if "idle" in parts:
                print("\n1a. /predict, learning idle", flush=True)
                results["idle"] = matrix(apps, bodies, script, connections, duration, cpus[1],
                                         procs, repeats)

            print(f"\n1b. /predict while the worker learns {DEMO_RATE:,} events/s", flush=True)
            producer = procs.start("producer", producer_argv(DEMO_RATE, 2), env, cpus[1])
            time.sleep(3.0)
            if "learning" in parts:
                n0, t0 = asyncio.run(learned(api)), time.monotonic()
                results["learning"] = matrix(apps, bodies, script, connections, duration,
                                             cpus[1], procs, repeats)
                results["learning_events_per_s"] = (asyncio.run(learned(api)) - n0) / (
                    time.monotonic() - t0)
                print(f"  (the worker learned {results['learning_events_per_s']:,.0f} "
                      "events/s meanwhile)", flush=True)
            if "freshness" in parts:
                print(f"\n3. freshness at {DEMO_RATE:,} events/s ({probes} probes)", flush=True)
                results["freshness"] = asyncio.run(
                    freshness(sys_["bootstrap"], api, probes, 0.25))
                print(f"  {results['freshness']}", flush=True)
            procs.stop(producer)

            print(f"\n2. learn+serve: /predict single at 8 connections, p99 bounds "
                  f"{bounds} ms", flush=True)
            sweep = []
            for i, rate in enumerate(rates if "sweep" in parts else []):
                producer = procs.start(f"producer-{i}", producer_argv(rate or None, 10 + i),
                                       env, cpus[1])
                time.sleep(3.0)
                n0, t0 = asyncio.run(learned(api)), time.monotonic()
                # Three wrk runs per rate, the median of each figure: one burst of other
                # work on these cores should not decide a rate's p99.
                runs = [measured("streamlearn", pids["streamlearn"], api + PREDICT,
                                 bodies["single"], script, 8, duration, cpus[1])
                        for _ in range(repeats)]
                r = {k: float(np.median([x[k] for x in runs])) for k in runs[0]}
                r["p99_ms_runs"] = [x["p99_ms"] for x in runs]
                r["errors"] = sum(x["errors"] for x in runs)
                r["learned_per_s"] = (asyncio.run(learned(api)) - n0) / (time.monotonic() - t0)
                r["rate"] = rate
                procs.stop(producer)
                sweep.append(r)
                print(f"  producer {'unthrottled' if not rate else f'{rate:,.0f}/s':>12}: "
                      f"learned {r['learned_per_s']:9,.0f} events/s | /predict "
                      f"{r['rps']:7,.0f} req/s p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms "
                      f"(median of {repeats}; p99s {[round(x, 2) for x in r['p99_ms_runs']]})",
                      flush=True)
                time.sleep(2.0)  # let a backlog drain before the next rate
            results["sweep"] = sweep
            results["learn_serve"] = [
                {"bound_ms": bound, "events_per_s": max(
                    (r["learned_per_s"] for r in sweep if r["p99_ms"] <= bound), default=None)}
                for bound in bounds] if sweep else []
    summarize(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def summarize(results: dict[str, Any]) -> None:
    print("\nsummary (ratios against the minimal FastAPI+pydantic app, same run)")
    for phase in ("idle", "learning"):
        rows = results.get(phase, {})
        for key, r in rows.items():
            app, kind, c = key.split("|")
            if app != "streamlearn":
                continue
            b = rows.get(f"fastapi-min|{kind}|{c}")
            ratio = r["rps"] / b["rps"] if b else float("nan")
            print(f"  {phase:8} {kind:>6} c={c:<3} {r['rps']:9,.0f} req/s ({ratio:4.2f}x "
                  f"baseline {b['rps'] if b else float('nan'):8,.0f}) p50 {r['p50_ms']:.2f} "
                  f"p99 {r['p99_ms']:.2f} ms")
    for ls in results.get("learn_serve", []):
        print(f"  learn+serve: {ls['events_per_s'] or 0:,.0f} events/s learned with /predict "
              f"p99 <= {ls['bound_ms']:g} ms (8 connections)")
    fr = results.get("freshness")
    if fr:
        print(f"  freshness: p50 {fr.get('p50_s', float('nan')):.3f} s, p99 "
              f"{fr.get('p99_s', float('nan')):.3f} s ({fr['seen']}/{fr['probes']} probes seen)")


if __name__ == "__main__":
    sys.exit(main())
