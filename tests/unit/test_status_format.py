"""Pure parts of `hub-worker status`: naming a lock's holder, ages."""

from __future__ import annotations

import os
import socket

import pytest

from worker import db
from worker.cli.status import age


def test_an_application_name_carries_the_process_and_fits_postgres() -> None:
    name = db.tagged("hub-worker:hub-worker-p63")
    assert name.startswith("hub-worker:hub-worker-p63@")
    assert name.endswith(f":{os.getpid()}")
    assert len(name.encode()) <= 63
    assert db.process_of(name) == name.rpartition("@")[2]


def test_a_long_host_name_is_shortened_not_the_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "h" * 80)
    name = db.tagged("hub-worker:relay")
    assert len(name.encode()) == 63
    assert name.endswith(f":{os.getpid()}")
    assert db.process_of(name) == name.rpartition("@")[2]


@pytest.mark.parametrize("name", [None, "", "psql", "hub-worker:relay"])
def test_an_untagged_application_name_names_no_process(name: str | None) -> None:
    assert db.process_of(name) is None


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (None, "-"),
        (0.42, "0.4s"),
        (42.9, "42s"),
        (185, "3m05s"),
        (7800, "2h10m"),
        (273600, "3d04h"),
    ],
)
def test_ages_are_short(seconds: float | None, shown: str) -> None:
    assert age(seconds) == shown
