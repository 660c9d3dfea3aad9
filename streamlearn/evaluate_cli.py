"""Arguments and driver of ``streamlearn evaluate`` (kept apart so ``cli.py`` stays small).

Importing this module is cheap: pyarrow, matplotlib and aiokafka load only when the
command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Replay a CSV or Parquet file (or a Kafka topic) through the worker's learning path,
test-then-train, in order: every row is scored by the model as it stands, then learned
from. Prints prequential metrics over the whole stream and per window, and rows/s.

The model spec comes from the config (-c FILE, --model NAME; default the first model),
or from flags alone when --numeric/--categorical are given:

  streamlearn evaluate data.csv --numeric amount,hour --categorical country --label is_fraud
  streamlearn evaluate data.parquet --model fraud --compare learning_rate=0.1 --plot auc.png
  streamlearn evaluate --topic transactions --bootstrap kafka:9092 --json out.json
  streamlearn evaluate data.csv --model fraud --label-delay 3600 --compare aggregates=

A spec with entity aggregates ([[model.aggregate]]) also reads the event time, the
aggregated fields and the entity fields; --label-delay reads the event time.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``evaluate`` subcommand's options."""
    p.add_argument("file", nargs="?", help="CSV or Parquet file to replay (or --topic)")
    src = p.add_argument_group("Kafka topic (instead of a file)")
    src.add_argument("--topic", default="", help="replay this topic up to its end at start")
    src.add_argument("--bootstrap", default="", help="host:port (default: kafka.bootstrap)")
    start = src.add_mutually_exclusive_group()
    start.add_argument("--from-beginning", action="store_true",
                       help="start every partition at its beginning (the default)")
    start.add_argument("--offsets", default="", metavar="P:O,...",
                       help="start offsets per partition; the others start at the beginning")
    spec = p.add_argument_group("model spec")
    spec.add_argument("--model", default="", metavar="NAME",
                      help="the config's model of this name (default: the first, or the "
                           "one reading --topic)")
    spec.add_argument("--numeric", default=None, metavar="A,B",
                      help="numeric fields; with --categorical, the spec comes from flags "
                           "alone (the config is not read); '*': every other column of a "
                           "numeric type in the file")
    spec.add_argument("--categorical", default=None, metavar="C,D",
                      help="categorical fields; '*': every other column of another type")
    spec.add_argument("--exclude", default="", metavar="A,B",
                      help="columns that '*' leaves out (ids, fields that give the label away)")
    spec.add_argument("--label", default="", help="label column")
    spec.add_argument("--task", default="", choices=("", "binary", "regression", "ranking"))
    spec.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override any model setting, e.g. --set learning_rate=0.1 "
                           "(repeatable)")
    spec.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE[,...]",
                      help="also replay the spec with these changes, side by side "
                           "(repeatable: one column each)")
    spec.add_argument("--positive", default=None, metavar="VALUE",
                      help="label value that means positive, for a two-valued text label")
    spec.add_argument("--label-delay", type=float, default=None, metavar="SECONDS",
                      help="score each row on arrival and learn its label only once the "
                           "stream's event time (the spec's time_field) reaches the row's "
                           "time plus SECONDS, as the worker does with <model>.labels")
    out = p.add_argument_group("output")
    out.add_argument("--window", type=int, default=None, metavar="N",
                     help="rows per metrics window (default: the spec's rolling_window)")
    out.add_argument("--json", default="", metavar="OUT", help="write every figure as JSON")
    out.add_argument("--plot", default="", metavar="OUT.png|OUT.html",
                     help="draw the per-window metrics (PNG, or an HTML page with SVG)")
    out.add_argument("--limit", type=int, default=None, metavar="N", help="stop after N rows")
    out.add_argument("--shuffles", type=int, default=None, metavar="K",
                     help="a file whose rows have no order of their own: replay K seeded "
                          "shuffles (fresh models each) and print each spec's mean +- "
                          "standard error, and its paired difference to the first spec "
                          "(reads the whole file into memory)")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the command; a bad file, column or setting prints one line and returns 2."""
    from streamlearn.evaluate import EvaluateError

    try:
        return _run(args)
    except EvaluateError as exc:
        print(f"streamlearn evaluate: {exc}", file=sys.stderr)
        return 2


def _spec(args: argparse.Namespace) -> Any:
    from streamlearn.evaluate import EvaluateError, spec_with
    from streamlearn.settings import load_settings

    changes = [f"{k}={v}" for k, v in (("task", args.task), ("label", args.label)) if v]
    for key, value in _fields(args).items():
        changes.append(f"{key}={value}")
    changes += args.set
    from_flags = args.numeric is not None or args.categorical is not None
    specs = [] if from_flags else load_settings(args.config).specs
    if not specs:
        source = args.topic or (Path(args.file).name if args.file else "evaluate")
        base = {"name": args.model or "model", "topic": args.topic or source}
        try:
            return spec_with(base, changes)
        except EvaluateError as exc:
            if "needs at least one numeric or categorical field" in str(exc):
                raise EvaluateError(
                    "no model spec: name the features (--numeric a,b --categorical c "
                    "--label y [--task regression]) or use a config with a [[model]] "
                    "table (-c FILE)") from None
            raise
    if args.model:
        chosen = [s for s in specs if s.name == args.model]
        if not chosen:
            raise EvaluateError(f"--model {args.model}: no such model in the config "
                                f"(it has {', '.join(s.name for s in specs)})")
    else:
        chosen = [s for s in specs if args.topic and s.topic == args.topic] or specs
    return spec_with(chosen[0].to_dict(), changes)


def _fields(args: argparse.Namespace) -> dict[str, str]:
    """``--numeric``/``--categorical`` as given, ``*`` replaced by the file's other columns
    of that kind (not the label, not ``--exclude``, not the other flag's columns)."""
    from streamlearn.config import ModelSpec
    from streamlearn.evaluate import EvaluateError, TableFile

    given = {k: getattr(args, k) for k in ("numeric", "categorical")
             if getattr(args, k) is not None}
    if "*" not in given.values():
        if args.exclude:
            raise EvaluateError("--exclude applies to --numeric '*' or --categorical '*'")
        return given
    if not args.file:
        raise EvaluateError("'*' takes the columns of a file: give a CSV or Parquet file")
    kinds = TableFile(args.file, {}).kinds()
    excluded = {c.strip() for c in args.exclude.split(",") if c.strip()}
    unknown = sorted(excluded - set(kinds))
    if unknown:
        raise EvaluateError(f"--exclude {unknown[0]}: no such column in {args.file}")
    named = {c.strip() for v in given.values() if v != "*" for c in v.split(",")}
    sets = dict(a.split("=", 1) for a in args.set if "=" in a)
    defaults = {f.name: f.default for f in dataclasses.fields(ModelSpec)}
    taken = excluded | named | {args.label or defaults["label"],
                                sets.get("id_field", defaults["id_field"])}
    for key, value in given.items():
        if value == "*":
            given[key] = ",".join(c for c, kind in kinds.items()
                                  if kind == key and c not in taken)
    return given


def _bar(args: argparse.Namespace, desc: str, unit: str, total: float | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B"
                else 1000, desc=desc, file=sys.stderr, delay=0.5, leave=False,
                dynamic_ncols=True, disable=args.quiet or not sys.stderr.isatty())


def _run(args: argparse.Namespace) -> int:
    from streamlearn.evaluate import (
        ArrowDecoder,
        EvaluateError,
        MessageDecoder,
        Replay,
        TableFile,
        format_report,
        make_variants,
        needed_columns,
    )

    if bool(args.file) == bool(args.topic):
        raise EvaluateError("give a CSV or Parquet file, or --topic NAME (one of them)")
    if args.limit is not None and args.limit < 1:
        raise EvaluateError(f"--limit must be at least 1, got {args.limit}")
    spec = _spec(args)
    if args.shuffles is not None:
        return _run_shuffles(args, spec)
    source = args.file or f"topic {args.topic}"
    if args.file:
        delayed = args.label_delay is not None
        variants = make_variants(spec, args.compare,
                                 lambda s: ArrowDecoder(s, positive=args.positive,
                                                        source=args.file, times=delayed))
        table = TableFile(args.file, needed_columns((v.spec for v in variants),
                                                    times=delayed))
    else:
        variants = make_variants(spec, args.compare, MessageDecoder)
    replay = Replay(variants, window=args.window, limit=args.limit, source=source,
                    positive=args.positive, label_delay=args.label_delay)
    interrupted = False
    try:
        if args.file:
            _, total, unit = table.progress()
            with _bar(args, Path(args.file).name, unit, total) as bar:
                rows = 0
                for chunk in table:
                    rows += replay.feed(chunk)
                    done, _, _ = table.progress()
                    bar.set_postfix_str(f"{rows:,} rows", refresh=False)
                    bar.update(done - bar.n)
                    if replay.done:
                        break
        else:
            _replay_topic(args, replay)
    except KeyboardInterrupt:
        interrupted = True
    report = replay.finish()
    if report.rows == 0:
        raise EvaluateError(f"{source}: no rows to evaluate")
    written = []
    if args.json:
        Path(args.json).write_bytes(report.to_json())
        written.append(args.json)
    if args.plot:
        from streamlearn.evaluate_plot import write_plot

        write_plot(report, args.plot)
        written.append(args.plot)
    try:
        print(format_report(report), flush=True)
    except BrokenPipeError:  # `| head`: the files are written; silence the exit flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if interrupted:
        print("interrupted: the figures cover the rows replayed so far", file=sys.stderr)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 130 if interrupted else 0


def _run_shuffles(args: argparse.Namespace, spec: Any) -> int:
    """``--shuffles K``: decode the file once, in its order, then replay K shuffles."""
    import numpy as np

    from streamlearn.evaluate import (
        ArrowDecoder,
        EvaluateError,
        TableFile,
        make_variants,
        needed_columns,
    )
    from streamlearn.evaluate_orders import check_shuffles, format_orders, replay_orders
    from streamlearn.features import concat_batches

    refused = [flag for flag, given in (
        ("--topic (a topic's order is the stream's)", args.topic),
        ("--label-delay (it needs the rows in event time)", args.label_delay is not None),
        ("--plot (there is no one stream to draw)", args.plot),
        ("--window (the figures cover each whole order)", args.window is not None),
    ) if given]
    if refused:
        raise EvaluateError(f"--shuffles cannot be used with {refused[0]}")
    check_shuffles(args.shuffles)
    variants = make_variants(spec, args.compare,
                             lambda s: ArrowDecoder(s, positive=args.positive, source=args.file))
    if any(v.spec.aggregates for v in variants):
        raise EvaluateError("--shuffles cannot replay entity aggregates: they need the rows "
                            "in event time")
    table = TableFile(args.file, needed_columns(v.spec for v in variants))
    parts: list[list[Any]] = [[] for _ in variants]
    rows = 0
    _, total, unit = table.progress()
    with _bar(args, f"read {Path(args.file).name}", unit, total) as bar:
        for chunk in table:
            for variant, got in zip(variants, parts, strict=True):
                got.append(variant.decoder.decode(chunk))
            rows += len(parts[0][-1])
            bar.update(table.progress()[0] - bar.n)
            if args.limit is not None and rows >= args.limit:
                break
    if rows == 0:
        raise EvaluateError(f"{args.file}: no rows to evaluate")
    n = rows if args.limit is None else min(rows, args.limit)
    batches = [concat_batches(got).take(np.arange(n)) for got in parts]
    with _bar(args, "shuffles", "order", args.shuffles) as bar:
        report = replay_orders(variants, batches, args.shuffles, source=args.file,
                               progress=lambda done: bar.update(done - bar.n))
    if args.json:
        Path(args.json).write_bytes(report.to_json())
    print(format_orders(report), flush=True)
    if args.json:
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _replay_topic(args: argparse.Namespace, replay: Any) -> None:
    import asyncio

    from streamlearn.evaluate import EvaluateError
    from streamlearn.services.evaluate_topic import parse_offsets, replay_topic
    from streamlearn.settings import load_settings

    offsets = parse_offsets(args.offsets) if args.offsets else None
    bootstrap = args.bootstrap or load_settings(args.config).kafka.bootstrap
    if not bootstrap:
        raise EvaluateError(
            "--topic needs a running broker: pass --bootstrap host:port or set "
            "STREAMLEARN_KAFKA__BOOTSTRAP (kafka.bootstrap is empty, and a fresh embedded "
            "broker would have nothing to replay)")
    with _bar(args, args.topic, "msg", None) as bar:
        def progress(done: int, total: int, rows: int) -> None:
            bar.total = total
            bar.set_postfix_str(f"{rows:,} rows", refresh=False)
            bar.update(done - bar.n)

        asyncio.run(replay_topic(bootstrap, args.topic, replay, offsets=offsets,
                                 progress=progress))
