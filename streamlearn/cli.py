"""``streamlearn`` command line: demo, broker, worker, api, produce, evaluate."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from streamlearn.settings import DEFAULT_CONFIG, SettingsError, load_settings


def _settings(args: argparse.Namespace):  # noqa: ANN202 - Settings, imported lazily
    return load_settings(args.config)


def config_path(args: argparse.Namespace) -> Path:
    """The config file this command reads, absolute (it may not exist)."""
    return Path(args.config or os.environ.get("STREAMLEARN_CONFIG") or DEFAULT_CONFIG).resolve()


def _no_models(args: argparse.Namespace, command: str) -> str:
    path = config_path(args)
    found = "" if path.exists() else " (no such file)"
    return (f"streamlearn {command}: no [[model]] configured; read config {path}{found} "
            "and STREAMLEARN_* environment variables. Pass -c FILE or set STREAMLEARN_CONFIG "
            "to a file with at least one [[model]] table.")


def cmd_broker(args: argparse.Namespace) -> int:
    """Run the embedded broker alone until Ctrl-C."""
    from streamlearn.broker import EmbeddedBroker

    with EmbeddedBroker(port=args.port) as broker:
        pid = broker.proc.pid if broker.proc else None
        print(f"Tansu broker on {broker.bootstrap} (memory storage, pid {pid})")
        print(f"  export STREAMLEARN_KAFKA__BOOTSTRAP={broker.bootstrap}")
        print("  export STREAMLEARN_KAFKA__FAST_JOIN=true")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                if broker.proc is None or broker.proc.poll() is not None:
                    print("broker exited", file=sys.stderr)
                    return 1
        except KeyboardInterrupt:
            pass
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run the Faust worker."""
    from streamlearn.services.worker.main import run

    settings = _settings(args)
    if not settings.specs:  # a worker without models would consume nothing, silently
        print(_no_models(args, "worker"), file=sys.stderr)
        return 2
    return run(settings)


def cmd_api(args: argparse.Namespace) -> int:
    """Serve the HTTP API."""
    import asyncio

    from streamlearn.services.api.main import serve

    try:
        asyncio.run(serve(_settings(args)))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    """Send synthetic transactions."""
    from streamlearn.services.producer import run

    settings = _settings(args)
    bootstrap = args.bootstrap or settings.kafka.bootstrap
    if not bootstrap:
        print(
            "produce needs a broker: --bootstrap host:port or STREAMLEARN_KAFKA__BOOTSTRAP",
            file=sys.stderr,
        )
        return 2
    topic = args.topic or (settings.specs[0].topic if settings.specs else "transactions")
    labels = None
    if args.label_delay is not None:
        from streamlearn.services.producer import DelayedLabels

        spec = next((s for s in settings.specs if s.topic == topic), None)
        if spec is None:
            print(f"produce --label-delay: no [[model]] reads topic {topic!r}; its spec names "
                  "the labels topic (<model>.labels), the id field and the label field",
                  file=sys.stderr)
            return 2
        if args.format != "json":
            print("produce --label-delay needs --format json (labels keyed like their "
                  "events)", file=sys.stderr)
            return 2
        try:
            labels = DelayedLabels(spec.labels_topic, spec.id_field, spec.label,
                                   args.label_delay, args.unlabelled_fraction, seed=args.seed)
        except ValueError as exc:
            print(f"produce: {exc}", file=sys.stderr)
            return 2
    elif args.unlabelled_fraction:
        print("produce --unlabelled-fraction goes with --label-delay", file=sys.stderr)
        return 2
    if not 0.0 <= args.entity_fraud <= 1.0:
        print(f"produce --entity-fraud must be in [0, 1], got {args.entity_fraud}",
              file=sys.stderr)
        return 2
    return run(bootstrap, topic, args.count, args.rate, args.seed, args.format, args.batch_rows,
               settings.kafka.client_kwargs(), drift_at=args.drift_at, labels=labels,
               entity_fraud=args.entity_fraud)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Replay a file or topic through the learning path, test-then-train."""
    from streamlearn.evaluate_cli import run

    return run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    """Broker, worker, API and producer in one command."""
    from streamlearn.services.demo import run

    settings = _settings(args)
    if not settings.specs:
        print(_no_models(args, "demo"), file=sys.stderr)
        return 2
    path = config_path(args)
    return run(settings, rate=args.rate, duration=args.duration,
               config=path if path.exists() else None, recycle_mb=args.recycle_broker_mb,
               label_delay=args.label_delay, unlabelled_fraction=args.unlabelled_fraction)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    p = argparse.ArgumentParser(prog="streamlearn", description=__doc__)
    p.add_argument(
        "-c",
        "--config",
        default=os.environ.get("STREAMLEARN_CONFIG"),
        help="TOML config file (default: $STREAMLEARN_CONFIG or ./streamlearn.toml)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="embedded broker + worker + API + synthetic producer")
    demo.add_argument("--rate", type=float, default=3000.0, help="events/s (default 3000)")
    demo.add_argument("--duration", type=float, default=None, help="stop after N seconds")
    demo.add_argument(
        "--recycle-broker-mb", type=float, default=512.0,
        help="restart the embedded broker empty past this RSS, to bound its memory "
        "(default 512; 0: never)",
    )
    demo.add_argument(
        "--label-delay", type=float, default=5.0, metavar="SECONDS",
        help="labels reach <model>.labels this long after their events (default 5; "
        "-1: labels on the events)")
    demo.add_argument(
        "--unlabelled-fraction", type=float, default=0.05, metavar="F",
        help="fraction of events never labelled (default 0.05)")
    demo.set_defaults(func=cmd_demo)
    broker = sub.add_parser("broker", help="run the embedded Tansu broker alone")
    broker.add_argument("--port", type=int, default=9092)
    broker.set_defaults(func=cmd_broker)
    sub.add_parser("worker", help="run the Faust learning worker").set_defaults(func=cmd_worker)
    sub.add_parser("api", help="serve the HTTP API").set_defaults(func=cmd_api)
    produce = sub.add_parser("produce", help="send synthetic card transactions")
    produce.add_argument("--bootstrap", default="", help="host:port (default: from settings)")
    produce.add_argument("--topic", default="", help="default: the first model's topic")
    produce.add_argument(
        "--count", type=int, default=None, help="events to send (default: forever)"
    )
    produce.add_argument(
        "--rate", type=float, default=None, help="events/s (default: as fast as possible)"
    )
    produce.add_argument("--seed", type=int, default=0)
    produce.add_argument(
        "--format", choices=("json", "batch"), default="json",
        help="json: one event per message; batch: columnar batch records (default json)",
    )
    produce.add_argument(
        "--batch-rows", type=int, default=4096, help="events per batch record (default 4096)"
    )
    produce.add_argument(
        "--drift-at", type=int, default=None, metavar="N",
        help="after N events, change the fraud pattern and triple the amounts (drift demo)")
    produce.add_argument(
        "--label-delay", type=float, default=None, metavar="SECONDS",
        help="send events without their label, and each label on <model>.labels SECONDS "
        "later (wall clock), keyed like its event (json format)")
    produce.add_argument(
        "--unlabelled-fraction", type=float, default=0.0, metavar="F",
        help="with --label-delay: this fraction of events is never labelled (default 0)")
    produce.add_argument(
        "--entity-fraud", type=float, default=0.15, metavar="F",
        help="share of the fraud in patterns only entity aggregates catch: card-testing "
        "bursts, cards used far from their usual country (default 0.15, as in the demo; "
        "0: the plain stream)")
    produce.set_defaults(func=cmd_produce)
    from streamlearn.evaluate_cli import DESCRIPTION, add_arguments

    evaluate = sub.add_parser(
        "evaluate", help="replay a CSV/Parquet file or a topic, test-then-train, with metrics",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        return int(args.func(args))
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
