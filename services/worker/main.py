"""``streamlearn worker``: run the Faust worker, with an embedded broker if none is configured."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

from streamlearn.broker import EmbeddedBroker
from streamlearn.logs import NOISY_KAFKA_LOGGERS, limit_loggers
from streamlearn.settings import Settings


def _quiet_debug_logging(level: str) -> None:
    """Make disabled debug calls cost one comparison.

    aiokafka and mode call ``log.debug``/``log.dev`` per fetch and per message;
    ``logging.disable`` short-circuits them before any logger-hierarchy walk.
    """
    numeric = logging.getLevelName(level.upper())
    if isinstance(numeric, int) and numeric > logging.DEBUG:
        logging.disable(logging.DEBUG)


#: glibc malloc arenas for the worker (glibc's default is 8 per core).
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt parameter number, from glibc's malloc.h


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas, as ``MALLOC_ARENA_MAX`` would; True if applied.

    With the default, the learner, snapshot and Kafka threads each grow an arena of
    their own, and freed blocks scattered across them are not returned: in a 5-minute
    soak at 15,000 events/s (``bench_worker.py --soak``) the worker's RSS crept up by
    ~4 MiB/min; with two arenas one soak ended where it began, later ones still crept
    by ~2-4 MiB/min (README, Performance).  Must run before the threads start; an
    explicit ``MALLOC_ARENA_MAX`` wins, and other C libraries are left alone.
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):  # musl and others: no mallopt
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))


def run(settings: Settings) -> int:
    """Run until SIGINT/SIGTERM; return the exit code."""
    from faust.worker import Worker

    from streamlearn.services.worker import merging
    from streamlearn.services.worker.app import build_app

    limit_malloc_arenas()
    if not settings.specs:
        print("streamlearn worker: no [[model]] configured: nothing to consume", file=sys.stderr)
        return 2
    try:  # claims this replica's id in the snapshot dir now: an unusable dir fails fast
        merging.replica_id(settings)
    except OSError as exc:
        print(f"streamlearn worker: the snapshot directory {settings.worker.snapshot_dir!r} "
              f"is not usable ({exc}); checkpoints need a writable directory", file=sys.stderr)
        return 3
    broker = None
    bootstrap = settings.kafka.bootstrap
    if not bootstrap:
        broker = EmbeddedBroker(port=settings.kafka.embedded_port).start()
        bootstrap = broker.bootstrap
        print(f"embedded broker on {bootstrap}", file=sys.stderr, flush=True)
    app, runtime = build_app(settings, bootstrap)
    # The model stack (numba, the kernel cache, restore, warm-up) takes about a second of
    # CPU; load it while Faust starts and joins the group (mostly waiting on the broker).
    # Started after the app is built, so it does not slow Faust's own set-up.  River's
    # drift detectors (scipy, scikit-learn) load later, off the path to the first event.
    runtime.begin_loading()
    worker = Worker(app, loglevel=settings.worker.log_level, quiet=True, redirect_stdouts=False)
    logging.getLogger("streamlearn").setLevel(settings.worker.log_level)
    _quiet_debug_logging(settings.worker.log_level)
    # A broker outage makes aiokafka and Faust log every retry (~78 lines/s measured):
    # one line per message template per 30 s, with a count of the ones it stands for.
    limit_loggers((*NOISY_KAFKA_LOGGERS, "faust"), interval_s=30.0)
    code = 0
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        if broker is not None:
            broker.stop()
    return runtime.exit_code or code
