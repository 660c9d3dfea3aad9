"""Where a ``POST /models/{name}/predict`` request spends its time, without a network.

Builds the demo fraud snapshot (as ``bench_predict.py`` does), creates the app and calls it
as an ASGI function in a loop, so the figures are the app's own per-request cost (routing,
validation, scoring, encoding, middleware), not the HTTP server's or a client's.

    python load_tests/profile_predict.py [--requests 5000] [--instances 1] [--profile]

``--profile`` runs pyinstrument (bench extra) over the loop and prints its tree.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import MODEL, build_snapshot  # noqa: E402


def make_app(snapshot: Path, fast: bool = True) -> Any:
    from streamlearn.services.api.main import create_app
    from streamlearn.serving import ModelStore

    store = ModelStore()
    if not store.offer(f"{MODEL}/bench", snapshot.read_bytes()):
        raise SystemExit(f"could not load {snapshot}: {store.stats.last_error}")
    settings = SimpleNamespace(kafka=SimpleNamespace(bootstrap=""),
                               api=SimpleNamespace(host="127.0.0.1", port=0, max_instances=1000,
                                                   fast_predict=fast))
    return create_app(settings, store)


async def call(app: Any, path: str, body: bytes, query: bytes = b"") -> tuple[int, bytes]:
    """One POST through the ASGI app, without a server or client; returns (status, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
             "root_path": "", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 1),
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    sent = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


async def loop(app: Any, bodies: list[bytes], n: int) -> float:
    path = f"/models/{MODEL}/predict"
    t0 = time.perf_counter()
    for i in range(n):
        status, out = await call(app, path, bodies[i % len(bodies)])
        if status != 200:
            raise SystemExit(f"status {status}: {out[:300]!r}")
    return (time.perf_counter() - t0) / n


async def lifespan_run(app: Any, bodies: list[bytes], n: int, profile: bool) -> float:
    async with app.router.lifespan_context(app):
        await loop(app, bodies, min(n, 500))  # warm-up (numba, caches)
        if not profile:
            return await loop(app, bodies, n)
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0002, async_mode="disabled")
        profiler.start()
        per = await loop(app, bodies, n)
        profiler.stop()
        print(profiler.output_text(unicode=True, color=False, show_all=False))
        return per


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--instances", type=int, default=1, help="0: single 'features' body")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--compare", action="store_true",
                        help="also time the FastAPI route alone (api.fast_predict = false)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="streamlearn-profile-") as tmp:
        snap = Path(tmp) / "fraud.snap"
        _, queries = build_snapshot(snap, 20_000, 18)
        app = make_app(snap)
        slow_app = make_app(snap, fast=False) if args.compare else None
    if args.instances <= 1:
        bodies = [orjson.dumps({"features": q}) for q in queries]
    else:
        k = args.instances
        bodies = [orjson.dumps({"instances": [queries[(i * k + j) % len(queries)]
                                              for j in range(k)]}) for i in range(8)]
    per = asyncio.run(lifespan_run(app, bodies, args.requests, args.profile))
    print(f"{args.requests} requests, {max(args.instances, 1)} instance(s) each: "
          f"{per * 1e6:.1f} µs per request in the app (no server, no client)")
    if slow_app is not None:
        slow = asyncio.run(lifespan_run(slow_app, bodies, args.requests, False))
        print(f"the FastAPI route alone (api.fast_predict = false): {slow * 1e6:.1f} µs "
              f"per request; fast path x{slow / per:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
