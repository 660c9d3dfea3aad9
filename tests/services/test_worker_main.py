"""The worker process's start-up helpers."""

import sys

import pytest

from streamlearn.services.worker.main import limit_malloc_arenas


def test_an_explicit_malloc_arena_max_is_left_to_glibc(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_arenas_are_capped_on_glibc(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_malloc_arenas(2) is True


def test_an_unusable_snapshot_dir_stops_the_worker_with_a_clear_error(tmp_path, capsys):
    """Defect 9 at start-up: the replica id is claimed in the snapshot dir first, so a dir
    that cannot be created (here: under a file) exits with code 3 and a message, before any
    broker starts, instead of a traceback."""
    from streamlearn.services.worker.main import run
    from streamlearn.settings import load_settings

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    settings = load_settings(
        model=[{"name": "m", "topic": "t", "numeric": ["x"]}],
        worker={"snapshot_dir": str(blocker / "snapshots")},
    )
    assert run(settings) == 3
    err = capsys.readouterr().err
    assert "snapshot directory" in err and "a-file" in err
