"""Which `hub-worker run` runs on a data directory, and where its embedded servers listen.

`run` holds an exclusive `flock` on `HUB_DATA_DIR/run.lock` for its whole life
(the kernel drops it when the process dies, however it dies) and records its
servers in `HUB_DATA_DIR/hub.json`. The other commands read that file when no URL
is configured, and trust it only while the lock is held. The file stays after
`run` ends, so that the next `run` prefers the same ports and finds a server a
crash left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

LOCK_FILE = "run.lock"
STATE_FILE = "hub.json"


@dataclass
class HubState:
    """What `hub.json` says: the `run` process and its embedded servers."""

    pid: int | None = None
    nats_url: str | None = None
    database_url: str | None = None
    nats_port: int | None = None
    postgres_port: int | None = None
    nats_pid: int | None = None
    postgres_data_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        parts = [f"pid {self.pid}"] if self.pid else []
        parts += [f"NATS {self.nats_url}"] if self.nats_url else []
        parts += [f"PostgreSQL {self.database_url}"] if self.database_url else []
        return ", ".join(parts)


def read_state(data_dir: Path) -> HubState:
    """The recorded state, or an empty one (no file, or one this version cannot read)."""
    try:
        raw = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return HubState()
    if not isinstance(raw, dict):
        return HubState()
    known = {k for k in HubState.__dataclass_fields__ if k != "extra"}
    return HubState(**{k: v for k, v in raw.items() if k in known})


def write_state(data_dir: Path, state: HubState) -> None:
    """Replace `hub.json` at once (readers never see half a file)."""
    path = data_dir / STATE_FILE
    staging = path.with_name(f".{STATE_FILE}.{os.getpid()}")
    body = {k: v for k, v in asdict(state).items() if k != "extra"}
    staging.write_text(json.dumps(body, indent=2) + "\n")
    staging.replace(path)


class AlreadyRunning(Exception):
    """Another `run` holds the data directory; the message names it."""


class RunLock:
    """The exclusive lock of one `run` on a data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._file: IO[bytes] | None = None

    def acquire(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        handle = (self.data_dir / LOCK_FILE).open("a+b")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            state = read_state(self.data_dir)
            held = f" ({state.describe()})" if state.describe() else ""
            raise AlreadyRunning(
                f"a hub is already running on {self.data_dir.resolve()}{held}: stop it first, "
                "or give this one another HUB_DATA_DIR"
            ) from None
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def is_running(data_dir: Path) -> bool:
    """Whether a `run` holds the data directory's lock right now."""
    try:
        handle = (data_dir / LOCK_FILE).open("rb")
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def running_hub(data_dir: Path) -> HubState | None:
    """The state of the `run` holding `data_dir`, or None when none is running there."""
    if not is_running(data_dir):
        return None
    state = read_state(data_dir)
    return state if state.pid else None


def stop_leftover_nats(state: HubState, store_dir: Path) -> bool:
    """Stop a nats-server a crashed `run` left on `store_dir` (only when the recorded pid
    is still a nats-server of that directory). Returns whether one was stopped."""
    pid = state.nats_pid
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if not cmdline[0].endswith(b"nats-server") or str(store_dir).encode() not in cmdline:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True
