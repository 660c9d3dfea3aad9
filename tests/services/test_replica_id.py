"""Replica ids (issue 10): stable across restarts, distinct on a shared snapshot volume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from streamlearn.services.worker import merging
from streamlearn.settings import load_settings

CLAIM = """
import sys, time
from streamlearn.services.worker.merging import replica_id
from streamlearn.settings import load_settings
print(replica_id(load_settings(worker={"snapshot_dir": sys.argv[1]})), flush=True)
time.sleep(float(sys.argv[2]))
"""


def _start(folder: Path, hold: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CLAIM, str(folder), str(hold)],
                            stdout=subprocess.PIPE, text=True)


def test_configured_id_wins(tmp_path: Path) -> None:
    s = load_settings(worker={"snapshot_dir": str(tmp_path), "replica_id": "named"})
    assert merging.replica_id(s) == "named"
    assert not list(tmp_path.glob("replica-id*"))


def test_ids_persist_and_replicas_sharing_a_volume_get_distinct_ones(tmp_path: Path) -> None:
    first = _start(tmp_path, 0)
    a = first.stdout.readline().strip()
    first.wait(30)
    again = _start(tmp_path, 0)  # a restart (any hostname) takes its id back
    assert again.stdout.readline().strip() == a
    again.wait(30)
    holder = _start(tmp_path, 5)  # two live replicas on one snapshot directory
    b = holder.stdout.readline().strip()
    other = _start(tmp_path, 0)
    c = other.stdout.readline().strip()
    other.wait(30)
    holder.wait(30)
    assert b == a and c != a and c.startswith("r-")
    assert sorted(p.name for p in tmp_path.glob("replica-id.*")) == sorted(
        [f"replica-id.{a}", f"replica-id.{c}"])
