"""Helpers of the end-to-end tests: wait on the API, and show the services' logs on failure.

(A plain module beside the tests, which import it by name: pytest puts this folder on
``sys.path``.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest


def log_tail(stack: dict[str, str], names: tuple[str, ...] = ("worker", "api"),
             chars: int = 3000) -> str:
    """The end of each service's log in ``stack["dir"]`` (the ones that exist)."""
    logs = [Path(stack["dir"], f"{n}.log") for n in names]
    return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-chars:]
                     for p in logs if p.exists())


def wait_json(client: httpx.Client, stack: dict[str, str], path: str,
              predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0,
              poll: float = 0.1) -> dict[str, Any]:
    """GET ``path`` until its JSON satisfies ``predicate`` (an eventual wait, not a timing
    test); fail with the last answer and the logs after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            r = client.get(path)
            if r.status_code == 200:
                body = r.json()
                if predicate(body):
                    return body
        except httpx.HTTPError:
            pass
        time.sleep(poll)
    pytest.fail(f"timed out waiting on {path}; last answer {body}\n{log_tail(stack)}")
