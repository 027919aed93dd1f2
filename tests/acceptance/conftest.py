"""Fixtures of the command-line tests."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.embedded import SHARED_DIR


@pytest.fixture(autouse=True)
def _remove_relocated_postgres(tmp_path: Path) -> Iterator[None]:
    """As root, `hub-worker run` under pytest's private basetemp keeps its PostgreSQL data
    under /var/tmp (worker/embedded.py), named in a LOCATION file: removed with the test."""
    yield
    for location in tmp_path.rglob("LOCATION"):
        match = re.search(
            rf"{re.escape(str(SHARED_DIR))}/hub-worker-postgres-[0-9a-f]+", location.read_text()
        )
        if match:
            shutil.rmtree(match.group(0), ignore_errors=True)
