"""uvicorn's httptools protocol, answering fast-path predict requests in the parser callback.

For every request uvicorn builds a ``RequestResponseCycle``, an ``asyncio.Event`` and an
asyncio task, runs the ASGI app in it and writes the status line and headers, then the
body, in two ``write`` calls.  For a small ``POST /models/{name}/predict`` that the fast
path (``fast.py``) can answer, :class:`FastHttpToolsProtocol` does not start the task:
once the body is complete (still inside ``data_received``) it asks the fast path for the
answer and writes the whole response in one call, then runs uvicorn's own end-of-response
bookkeeping (keep-alive timer, pipelined requests).  A request the fast path declines
gets its task then, with the body already buffered, and so reaches the FastAPI route
exactly as before.  Only bodies that cannot pause reading (at most uvicorn's high-water
mark) and requests without ``Expect: 100-continue`` are held back.

This leans on uvicorn internals (``_start_asgi_task``, the cycle's fields), so
:func:`protocol_class` checks for them and falls back to uvicorn's protocol when they are
missing; ``tests/services/test_api_http.py`` runs a real server over keep-alive,
pipelined, HTTP/1.0 and declined requests.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

try:
    from uvicorn.protocols.http import httptools_impl as _impl
except ImportError:  # pragma: no cover - uvicorn without httptools
    _impl = None  # type: ignore[assignment]

_CONTENT_TYPE = b"content-type: application/json\r\n"


def _compatible() -> bool:
    if _impl is None:
        return False
    proto = getattr(_impl, "HttpToolsProtocol", None)
    cycle = getattr(_impl, "RequestResponseCycle", None)
    return (proto is not None and cycle is not None
            and hasattr(proto, "_start_asgi_task") and hasattr(proto, "on_message_complete")
            and hasattr(_impl, "STATUS_LINE") and hasattr(_impl, "HIGH_WATER_LIMIT"))


if _compatible():
    class FastHttpToolsProtocol(_impl.HttpToolsProtocol):  # type: ignore[misc,name-defined]
        """``HttpToolsProtocol`` with the fast predict path in the parser callback."""

        _deferred: Any = None

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            fast = getattr(self.app, "fast", None)
            # Not when uvicorn substituted another app (a 503 past limit_concurrency).
            if (fast is not None and app is self.app and cycle is self.cycle
                    and cycle.more_body and not cycle.body
                    and not cycle.waiting_for_100_continue):
                found = fast.eligible(cycle.scope)
                if found is not None and 0 <= found[3] <= _impl.HIGH_WATER_LIMIT:
                    self._deferred = (cycle, app)  # answered in on_message_complete
                    return
            super()._start_asgi_task(cycle, app)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            deferred, self._deferred = self._deferred, None
            if deferred is None:
                return
            cycle, app = deferred
            if cycle is not self.cycle or cycle.response_complete or cycle.disconnected:
                return
            try:
                raw = self.app.fast.answer_now(cycle.scope, bytes(cycle.body))
            except Exception:  # noqa: BLE001 - never here; the route answers instead
                log.exception("fast predict path failed")
                raw = None
            if raw is None:
                super()._start_asgi_task(cycle, app)
                return
            content = [_impl.STATUS_LINE[200]]
            for name, value in self.server_state.default_headers:
                content.extend((name, b": ", value, b"\r\n"))
            content.extend((b"content-length: ", str(len(raw)).encode(), b"\r\n", _CONTENT_TYPE))
            if not cycle.keep_alive:
                content.append(b"connection: close\r\n")
            content.extend((b"\r\n", raw))
            cycle.response_started = cycle.response_complete = True
            self.transport.write(b"".join(content))
            cycle.message_event.set()
            if not cycle.keep_alive:
                self.transport.close()
            cycle.on_response()  # keep-alive timer, the next pipelined request
else:  # pragma: no cover
    FastHttpToolsProtocol = None  # type: ignore[assignment,misc]


def protocol_class() -> Any:
    """What ``uvicorn.Config(http=...)`` should use: our protocol, or uvicorn's choice."""
    return FastHttpToolsProtocol if FastHttpToolsProtocol is not None else "auto"
