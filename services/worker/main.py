"""``streamlearn worker``: run the Faust worker, with an embedded broker if none is configured."""

from __future__ import annotations

import logging
import sys

from streamlearn.broker import EmbeddedBroker
from streamlearn.settings import Settings


def run(settings: Settings) -> int:
    """Run until SIGINT/SIGTERM; return the exit code."""
    from faust.worker import Worker
    from streamlearn.services.worker.app import build_app

    broker = None
    bootstrap = settings.kafka.bootstrap
    if not bootstrap:
        broker = EmbeddedBroker(port=settings.kafka.embedded_port).start()
        bootstrap = broker.bootstrap
        print(f"embedded broker on {bootstrap}", file=sys.stderr, flush=True)
    app, runtime = build_app(settings, bootstrap)
    worker = Worker(app, loglevel=settings.worker.log_level, quiet=True, redirect_stdouts=False)
    logging.getLogger("streamlearn").setLevel(settings.worker.log_level)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        if broker is not None:
            broker.stop()
    return 0
