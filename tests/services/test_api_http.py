"""The uvicorn protocol that answers fast-path predicts in the parser callback (http.py),
on a real server over real sockets: keep-alive, pipelining, HTTP/1.0, declined bodies and
``Expect: 100-continue`` get what uvicorn's own protocol gives."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import uvicorn

from streamlearn import snapshots
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.services.api.http import FastHttpToolsProtocol, protocol_class
from streamlearn.services.api.main import UVICORN_OPTIONS, bind_socket, create_app
from streamlearn.serving import ModelStore
from streamlearn.synthetic import FraudStream

pytestmark = pytest.mark.skipif(FastHttpToolsProtocol is None,
                                reason="this uvicorn has no compatible httptools protocol")

SPEC = ModelSpec(name="fraud", topic="transactions", label="is_fraud",
                 numeric=("amount", "hour"), categorical=("country",), hash_bits=8)
EVENT = {"amount": 12.5, "hour": 3.0, "country": "FR"}


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, Any, ModelStore]]:
    model = OnlineModel(SPEC, device="cpu")
    batch, _ = model.vectorizer.transform_many(FraudStream(seed=1).take(512))
    model.process(batch)
    store = ModelStore()
    assert store.offer("fraud/r1", snapshots.encode(model.to_state() | {"replica": "r1"}))
    settings = SimpleNamespace(kafka=SimpleNamespace(bootstrap=""),
                               api=SimpleNamespace(host="127.0.0.1", port=0, max_instances=10))
    app = create_app(settings, store)
    sock = bind_socket("127.0.0.1", 0)
    config = uvicorn.Config(app, **(UVICORN_OPTIONS | {"log_level": "warning"}),
                            http=protocol_class())
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    try:
        yield sock.getsockname()[1], app, store
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


def request(body: bytes, *, version: str = "1.1", extra: str = "",
            path: str = "/models/fraud/predict") -> bytes:
    head = (f"POST {path} HTTP/{version}\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n")
    return head.encode() + body


def read_response(f: Any) -> tuple[int, dict[str, str], bytes]:
    status_line = f.readline()
    if not status_line:
        raise EOFError
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, value = line.decode().split(":", 1)
        headers[name.strip().lower()] = value.strip()
    if status == 100:
        return status, headers, b""
    return status, headers, f.read(int(headers["content-length"]))


def connect(port: int) -> tuple[socket.socket, Any]:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    return conn, conn.makefile("rb")


def test_keep_alive_requests_are_answered_on_the_fast_path(server: Any) -> None:
    port, app, store = server
    stats = app.state.fast_predict
    before = stats.answered
    conn, f = connect(port)
    with conn:
        for _ in range(3):
            conn.sendall(request(orjson.dumps({"features": EVENT})))
            status, headers, body = read_response(f)
            assert status == 200
            assert headers["content-type"] == "application/json" and "date" in headers
            assert "connection" not in headers and "server" not in headers
            out = orjson.loads(body)
            expected = store.get("fraud").model.predict_events([EVENT]).tolist()  # type: ignore[union-attr]
            assert out["predictions"] == expected and out["score"] == expected[0]
            assert list(out) == ["model", "version", "merged_version", "snapshot_age_s",
                                     "predictions", "score"]
    assert stats.answered == before + 3


def test_pipelined_requests_keep_their_order_through_both_paths(server: Any) -> None:
    port, app, _ = server
    stats = app.state.fast_predict
    answered, declined = stats.answered, stats.declined
    conn, f = connect(port)
    with conn:
        conn.sendall(request(orjson.dumps({"features": EVENT}))
                     + request(b'{"features": {"amount": "lots"}}')
                     + request(orjson.dumps({"instances": [EVENT, EVENT]}))
                     + request(orjson.dumps({"features": EVENT}), path="/models/nope/predict"))
        got = [read_response(f) for _ in range(4)]
    assert [g[0] for g in got] == [200, 422, 200, 404]
    assert "amount" in orjson.loads(got[1][2])["detail"][0]["msg"]
    assert len(orjson.loads(got[2][2])["predictions"]) == 2
    # The 422 was declined once (by the protocol) and answered by the route, not retried.
    assert (stats.answered, stats.declined) == (answered + 2, declined + 1)


def test_http_1_0_gets_connection_close(server: Any) -> None:
    port, _, _ = server
    conn, f = connect(port)
    with conn:
        conn.sendall(request(orjson.dumps({"features": EVENT}), version="1.0"))
        status, headers, body = read_response(f)
        assert status == 200 and headers["connection"] == "close"
        assert orjson.loads(body)["model"] == "fraud"
        assert f.read() == b""  # the server closed the connection


def test_expect_100_continue_takes_uvicorns_path(server: Any) -> None:
    port, app, _ = server
    answered = app.state.fast_predict.answered
    conn, f = connect(port)
    with conn:
        body = orjson.dumps({"features": EVENT})
        head, _, _ = request(body, extra="Expect: 100-continue\r\n").partition(b"\r\n\r\n")
        conn.sendall(head + b"\r\n\r\n")
        status, _, _ = read_response(f)
        assert status == 100
        conn.sendall(body)
        status, _, out = read_response(f)
        assert status == 200 and orjson.loads(out)["model"] == "fraud"
    # Neither fast path takes it (uvicorn sends the 100 when the app first reads): the route.
    assert app.state.fast_predict.answered == answered


def test_a_body_split_across_packets_is_answered(server: Any) -> None:
    port, _, _ = server
    conn, f = connect(port)
    with conn:
        raw = request(orjson.dumps({"features": EVENT}))
        for i in range(0, len(raw), 7):
            conn.sendall(raw[i:i + 7])
            time.sleep(0.001)
        status, _, body = read_response(f)
        assert status == 200 and "score" in orjson.loads(body)
