"""Benchmark single-event ``POST /models/{name}/predict`` against ``GET /healthz``.

Self-contained: trains a model on the seeded synthetic fraud stream, writes its
snapshot to a temporary directory, starts the API under uvicorn in a child
process on 127.0.0.1 (a free port), sends a bounded number of requests with
bounded concurrency (a minimal keep-alive asyncio client by default, or httpx),
prints latency percentiles and throughput for both endpoints (healthz is the
no-work baseline of the same stack), then stops the child it started and removes the directory.

    python load_tests/bench_predict.py [--requests 5000] [--concurrency 8] [--client raw|httpx]

Client and server share this machine, so absolute figures include the client's
own cost; the predict/healthz ratio is the portable number.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "fraud"


# -- server (child process) ----------------------------------------------------


def serve(snapshot: Path, port: int) -> None:
    """Child mode: serve one snapshot on 127.0.0.1:port until terminated."""
    from types import SimpleNamespace

    import uvicorn

    from streamlearn.services.api.http import protocol_class
    from streamlearn.services.api.main import UVICORN_OPTIONS, create_app
    from streamlearn.serving import ModelStore

    store = ModelStore()
    if not store.offer(f"{MODEL}/bench", snapshot.read_bytes()):
        raise SystemExit(f"could not load {snapshot}: {store.stats.last_error}")
    settings = SimpleNamespace(
        kafka=SimpleNamespace(bootstrap=""),
        api=SimpleNamespace(host="127.0.0.1", port=port, max_instances=1000),
    )
    app = create_app(settings, store)
    app.state.freeze_gc = True  # as streamlearn api does
    uvicorn.run(app, **(UVICORN_OPTIONS | {"log_level": "warning"}), host="127.0.0.1", port=port,
                http=protocol_class())


# -- model ---------------------------------------------------------------------


def build_snapshot(path: Path, n_events: int, hash_bits: int, *, shipped: bool = False,
                   ) -> tuple[int, list[dict[str, Any]]]:
    """Train the demo fraud model; write its snapshot; return (bytes, request events).
    ``shipped``: the fraud model of ./streamlearn.toml (entity aggregates and all), on the
    demo's stream."""
    import dataclasses

    from streamlearn import snapshots
    from streamlearn.config import ModelSpec
    from streamlearn.models import OnlineModel
    from streamlearn.pipeline import ModelRunner
    from streamlearn.settings import load_settings
    from streamlearn.synthetic import FraudStream

    spec = ModelSpec(
        name=MODEL, topic="transactions", label="is_fraud",
        numeric=("amount", "hour", "distance_km", "card_age_days", "tx_last_hour"),
        categorical=("merchant_category", "country", "channel"), hash_bits=hash_bits,
    )
    fraud = 0.0
    if shipped:
        spec = dataclasses.replace(load_settings("streamlearn.toml").specs[0], name=MODEL)
        fraud = 0.15
    model = OnlineModel(spec, device="cpu")
    stream = FraudStream(seed=0, entity_fraud=fraud)
    events = stream.take(n_events)
    for start in range(0, n_events, spec.batch_size):
        batch, _ = model.vectorizer.transform_many(events[start : start + spec.batch_size])
        model.process(batch)
    payload = snapshots.encode(ModelRunner(model).snapshot_state("bench"))
    snapshots.save(path, payload)
    queries = FraudStream(seed=1, entity_fraud=fraud).take(2048)
    for q in queries:
        q.pop("is_fraud", None)
    return len(payload), queries


# -- client --------------------------------------------------------------------


class RawClient:
    """Minimal HTTP/1.1 keep-alive client on asyncio streams (one connection).

    httpx's async client costs about 3 ms of client CPU per request here and
    saturates near 400 req/s, which would hide the server; this one costs tens
    of microseconds, so the figures describe the API.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes | None) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        headers = await self.reader.readuntil(b"\r\n\r\n")
        status = int(headers[9:12])
        length = 0
        for line in headers.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def load(base: str, method: str, path: str, bodies: list[Any] | None, n: int,
               concurrency: int, client: str = "raw") -> dict[str, float]:
    """Send ``n`` requests with at most ``concurrency`` in flight; return figures."""
    import httpx
    import orjson

    latencies = np.empty(n)
    errors = 0
    next_i = 0
    raw_bodies = None if bodies is None else [orjson.dumps(b) for b in bodies]
    url = httpx.URL(base)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30.0) as hx:

        async def worker() -> None:
            nonlocal next_i, errors
            raw = RawClient(url.host, url.port or 80) if client == "raw" else None
            try:
                while next_i < n:
                    i = next_i
                    next_i += 1
                    t0 = time.perf_counter()
                    if raw is not None:
                        body = None if raw_bodies is None else raw_bodies[i % len(raw_bodies)]
                        status = await raw.request(method, path, body)
                    else:
                        js = None if bodies is None else bodies[i % len(bodies)]
                        status = (await hx.request(method, path, json=js)).status_code
                    latencies[i] = time.perf_counter() - t0
                    if status != 200:
                        errors += 1
            finally:
                if raw is not None:
                    await raw.close()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99]) * 1e3
    return {"n": n, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "rps": n / wall,
            "errors": errors}


async def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the API exited early with code {proc.returncode}")
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the API was not ready within {timeout}s")


async def server_side_mean_ms(base: str) -> float | None:
    """Mean in-handler predict time from the API's own histogram."""
    import httpx

    async with httpx.AsyncClient(base_url=base) as client:
        text = (await client.get("/metrics")).text
    values = {}
    for line in text.splitlines():
        for key in ("_sum", "_count"):
            prefix = f'streamlearn_prediction_latency_seconds{key}{{model="{MODEL}"}}'
            if line.startswith(prefix):
                values[key] = float(line.split()[-1])
    if values.get("_count"):
        return 1e3 * values["_sum"] / values["_count"]
    return None


async def bench(base: str, proc: subprocess.Popen[bytes], queries: list[dict[str, Any]],
                n: int, concurrency: int, client: str) -> dict[str, dict[str, float]]:
    await wait_ready(base, proc)
    predict = f"/models/{MODEL}/predict"
    bodies = [{"features": q} for q in queries]
    warm = min(500, n)
    await load(base, "GET", "/healthz", None, warm, concurrency, client)
    await load(base, "POST", predict, bodies, warm, concurrency, client)
    results = {
        "GET /healthz": await load(base, "GET", "/healthz", None, n, concurrency, client),
        f"POST {predict}": await load(base, "POST", predict, bodies, n, concurrency, client),
    }
    results["server"] = {"mean_ms": await server_side_mean_ms(base) or float("nan")}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="requests per endpoint")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--train-events", type=int, default=20_000)
    parser.add_argument("--hash-bits", type=int, default=18)
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw",
                        help="raw: asyncio keep-alive client (default); httpx: AsyncClient")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port)
        return 0
    if not 1 <= args.requests <= 1_000_000 or not 1 <= args.concurrency <= 1024:
        parser.error("--requests must be in 1..1e6 and --concurrency in 1..1024")

    from streamlearn.broker import free_port

    with tempfile.TemporaryDirectory(prefix="streamlearn-bench-") as tmp:
        snap = Path(tmp) / "fraud.snap"
        size, queries = build_snapshot(snap, args.train_events, args.hash_bits)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = open(Path(tmp) / "api.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", str(snap), "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            results = asyncio.run(
                bench(base, proc, queries, args.requests, args.concurrency, args.client))
        except BaseException:
            log.flush()
            sys.stderr.write((Path(tmp) / "api.log").read_text(errors="replace")[-2000:])
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            log.close()

    print(f"model: {MODEL}, hash_bits={args.hash_bits}, snapshot {size / 1024:.0f} KiB; "
          f"{args.requests} requests per endpoint, concurrency {args.concurrency}, "
          f"{args.client} client, "
          f"{os.cpu_count()} CPUs shared by client and server")
    print(f"{'endpoint':32} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'req/s':>8} {'errors':>7}")
    rows = {k: v for k, v in results.items() if k != "server"}
    for name, r in rows.items():
        print(f"{name:32} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f} {r['p99_ms']:8.2f} "
              f"{r['rps']:8.0f} {int(r['errors']):7d}")
    health, predict = rows["GET /healthz"], rows[f"POST /models/{MODEL}/predict"]
    print(f"predict/healthz: p50 x{predict['p50_ms'] / health['p50_ms']:.2f}, "
          f"p99 x{predict['p99_ms'] / health['p99_ms']:.2f}, "
          f"throughput x{predict['rps'] / health['rps']:.2f}")
    print(f"server-side mean time in /predict handler: {results['server']['mean_ms']:.3f} ms")
    return 1 if predict["errors"] or health["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
