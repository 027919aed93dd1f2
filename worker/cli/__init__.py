"""The `hub-worker` command line (`python -m worker` too): `main(argv)` returns the exit code.

`main.py` builds the parser and finds the servers; `run.py` is `run` (with the
embedded servers and `running.py`'s lock on HUB_DATA_DIR), `admin.py` `migrate` and
`accounts`, `ops.py` the operator commands (`publish.py`, `alerts.py`,
`detections.py`, `deadletters.py`, `status.py`) and `schemas.py` `schemas`.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """`hub-worker ARGV…`; returns the exit code."""
    # Imported here, not above: `python -m worker.cli.ops` (or `.schemas`) imports this
    # package first, and must not find the module it runs imported already.
    from worker.cli.main import main as hub_worker

    return hub_worker(argv)
