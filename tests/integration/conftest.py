"""Worker and API processes for the end-to-end tests, on the session's real broker."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from streamlearn.broker import free_port

Services = Callable[..., AbstractContextManager[dict[str, str]]]


@contextmanager
def _services(tmp: Path, config: str, bootstrap: str, env: dict[str, str] | None = None,
              names: tuple[str, ...] = ("worker", "api")) -> Iterator[dict[str, str]]:
    """Write ``config`` into ``tmp`` and run ``streamlearn <name>`` for each name, logging
    to ``tmp/<name>.log``; yield ``{"base", "bootstrap", "dir"}``; stop them by PID."""
    (tmp / "streamlearn.toml").write_text(config)
    port = free_port()
    full_env = {
        **os.environ,
        "STREAMLEARN_CONFIG": str(tmp / "streamlearn.toml"),
        "STREAMLEARN_KAFKA__BOOTSTRAP": bootstrap,
        "STREAMLEARN_KAFKA__FAST_JOIN": "true",
        "STREAMLEARN_WORKER__SNAPSHOT_DIR": str(tmp / "snapshots"),
        "STREAMLEARN_API__PORT": str(port),
        **(env or {}),
    }
    logs = {name: open(tmp / f"{name}.log", "wb") for name in names}
    procs = [subprocess.Popen([sys.executable, "-m", "streamlearn", name], env=full_env,
                              stdout=logs[name], stderr=subprocess.STDOUT)
             for name in names]
    try:
        yield {"base": f"http://127.0.0.1:{port}", "bootstrap": bootstrap, "dir": str(tmp)}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for fh in logs.values():
            fh.close()


@pytest.fixture(scope="session")
def services() -> Services:
    """``with services(tmp, CONFIG, broker, {env...}) as stack:`` a worker and an API."""
    return _services
