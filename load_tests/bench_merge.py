"""Merge cost against model size (issue 10): ``streamlearn.replicas.merge`` of 2 shards,
and the adoption (``rebase``) a replica runs on its learner thread.

    .venv/bin/python load_tests/bench_merge.py [--bits 18 20 22] [--fm-bits 16 18 20]

Shards are fresh models with every weight perturbed (a dense worst case: a real shard's
delta is as large, whatever it touched). Prints one line per size: weights, bytes of one
shard's arrays, merge and rebase time (best of ``--repeat``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from streamlearn import replicas
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel


def shard(base: dict, rng: np.random.Generator, ship: int) -> dict:
    state = dict(base)
    state["weights"] = {k: (np.asarray(v) + rng.normal(0, 0.01, np.shape(v))).astype(np.float32)
                        for k, v in base["weights"].items()}
    state["weights"]["s2"] = np.abs(state["weights"]["s2"]) + 1.0
    if "s2v" in state["weights"]:
        state["weights"]["s2v"] = np.abs(state["weights"]["s2v"]) + 1.0
    state["n_learned"] = int(base["n_learned"]) + 1000
    state["merge"] = {"base_id": "", "ship": ship}
    return state


def bench(spec: ModelSpec, repeat: int) -> tuple[int, float, float]:
    rng = np.random.default_rng(0)
    base = OnlineModel(spec, device="cpu").to_state()
    shards = {"a": shard(base, rng, 1), "b": shard(base, rng, 1)}
    nbytes = sum(np.asarray(v).nbytes for v in shards["a"]["weights"].values())
    best_merge = best_rebase = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        merged = replicas.merge(base, shards, merged_by="a", now=0.0)
        t1 = time.perf_counter()
        replicas.rebase(shards["a"], merged, "a", {1: shards["a"]}, base)
        t2 = time.perf_counter()
        best_merge, best_rebase = min(best_merge, t1 - t0), min(best_rebase, t2 - t1)
    return nbytes, best_merge, best_rebase


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bits", type=int, nargs="*", default=[18, 20, 22])
    ap.add_argument("--fm-bits", type=int, nargs="*", default=[16, 18, 20])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"{'model':<22}{'weights':>10}{'MiB/shard':>11}{'merge 2 ms':>12}{'rebase ms':>11}")
    rows = [("ftrl linear", b, ModelSpec(name="m", topic="t", numeric=("x",),
                                         categorical=("c",), hash_bits=b)) for b in args.bits]
    rows += [("ftrl fm k=8", b, ModelSpec(name="m", topic="t", numeric=("x",),
                                          categorical=("c",), task="ranking", hash_bits=b))
             for b in args.fm_bits]
    for label, bits, spec in rows:
        nbytes, merge_s, rebase_s = bench(spec, args.repeat)
        print(f"{label + f' 2^{bits}':<22}{spec.n_weights:>10}{nbytes / 2**20:>11.1f}"
              f"{merge_s * 1000:>12.1f}{rebase_s * 1000:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
