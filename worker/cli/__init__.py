"""The `hub-worker` command line (`python -m worker` too): `main(argv)` returns the exit code.

`main.py` builds the parser and finds the servers; `run.py` is `run` (with the
embedded servers and `running.py`'s lock on HUB_DATA_DIR), `admin.py` `migrate` and
`accounts`, `ops.py` the operator commands (`publish.py`, `alerts.py`,
`detections.py`, `deadletters.py`, `status.py`) and `schemas.py` `schemas`.
"""

from worker.cli.main import main

__all__ = ["main"]
