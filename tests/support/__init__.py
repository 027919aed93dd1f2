"""Test helpers: a hub under test (servers, a worker, a spoke publishing) and its observations."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import asyncpg
import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from worker import db
from worker.app import Worker
from worker.config import Settings
from worker.subjects import inbound_subject

ROOT = Path(__file__).resolve().parents[2]
SETTLE_TIMEOUT_SECONDS = 30.0
# What Worker.readiness() answers when all is well.
READY = {
    "nats": "ok",
    "consumer": "ok",
    "lanes": "ok",
    "postgres": "ok",
    "relay": "ok",
    "out_stream": "ok",
}


async def start_hub_worker(
    *argv: str, env: dict[str, str], cwd: Path
) -> asyncio.subprocess.Process:
    """`hub-worker ARGV` as a subprocess with `env` and none of the caller's HUB_*
    variables, logging JSON; stdout and stderr arrive together on `stdout`."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        *argv,
        env=inherited | {"HUB_LOG_FORMAT": "json"} | env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


async def wait_until(
    check: Callable[[], Awaitable[bool]], within: float = SETTLE_TIMEOUT_SECONDS, what: str = ""
) -> None:
    deadline = time.monotonic() + within
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what or check}")
        await asyncio.sleep(0.05)


@dataclass
class Outbound:
    subject: str
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    log_path: Path

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def terminate(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Hub:
    """One isolated hub: its own database and its own subject prefix on shared servers."""

    settings: Settings
    database_url: str
    nats_url: str
    nc: NATS
    js: JetStreamContext
    db: asyncpg.Connection
    tmp: Path
    workers: list[tuple[asyncio.Task[None], asyncio.Event]] = field(default_factory=list)
    processes: list[WorkerProcess] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return self.settings.subject_prefix

    # --- workers -------------------------------------------------------------

    async def start_worker(self, **overrides: Any) -> Worker:
        """A worker in this process (same event loop), stopped at teardown."""
        settings = Settings(**{**self.settings.__dict__, **overrides})
        worker = Worker(settings, self.database_url, self.nats_url.split(","))
        stopping = asyncio.Event()
        task = asyncio.create_task(worker.run(stopping))
        self.workers.append((task, stopping))
        await self.wait_ready()
        return worker

    async def stop_workers(self) -> None:
        for _, stopping in self.workers:
            stopping.set()
        for task, _ in self.workers:
            await asyncio.wait_for(task, timeout=30)
        self.workers.clear()

    def env(self) -> dict[str, str]:
        s = self.settings
        return {
            **os.environ,
            "HUB_NATS_URL": self.nats_url,
            "HUB_DATABASE_URL": self.database_url,
            "HUB_SUBJECT_PREFIX": s.subject_prefix,
            "HUB_STALL_AFTER_SECONDS": str(s.stall_after_seconds),
            "HUB_SWEEP_INTERVAL_SECONDS": str(s.sweep_interval_seconds),
            "HUB_PARTITIONS": str(s.partitions),
            "HUB_BATCH_MAX": str(s.batch_max),
            "HUB_HTTP_ADDR": "",
            "HUB_LOG_FORMAT": "json",
            # Every message's own line, which tests read (an applied one is DEBUG).
            "HUB_LOG_LEVEL": "debug",
            "HUB_DATA_DIR": str(self.tmp / "data"),
        }

    def spawn_worker_process(self) -> WorkerProcess:
        """`hub-worker run` as a real child process (for SIGKILL and multi-process tests)."""
        log_path = self.tmp / f"worker-{len(self.processes)}-{uuid4().hex[:6]}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "worker", "run"],
                env=self.env(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
            )
        handle = WorkerProcess(process, log_path)
        self.processes.append(handle)
        return handle

    async def wait_ready(self) -> None:
        """Until every lane consumer exists."""

        async def consumers_exist() -> bool:
            try:
                infos = await self.js.consumers_info(self.settings.events_stream)
            except nats.js.errors.NotFoundError:
                return False
            return len(infos) == self.settings.partitions + 1

        await wait_until(consumers_exist, what="the worker's consumers")

    # --- publishing as a spoke -------------------------------------------------

    def subject(self, spoke: str, session: str, what: str) -> str:
        return inbound_subject(self.prefix, spoke, session, what)

    def event(self, spoke: str, session: str, **fields: Any) -> dict[str, Any]:
        return {
            "eventId": str(uuid4()),
            "occurredAt": now_iso(),
            "spokeId": spoke,
            "sessionId": session,
            **fields,
        }

    async def publish_raw(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> None:
        """Publish as a spoke does: retry when no ack comes (a stream leader being
        elected); the same Nats-Msg-Id makes a retry of a stored message a no-op."""
        for attempt in range(10):
            try:
                await self.js.publish(subject, data, headers=headers, timeout=2)
                return
            except nats.errors.Error:  # no ack, no responders, reconnecting...
                if attempt == 9:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))

    async def send(self, spoke: str, session: str, what: str, **fields: Any) -> dict[str, Any]:
        """Publish a lifecycle event (`what` = "spawned"...) or a signal (`what` = "signal.kind")."""
        body = self.event(spoke, session, **fields)
        await self.publish_raw(
            self.subject(spoke, session, what),
            json.dumps(body).encode(),
            {"Nats-Msg-Id": body["eventId"]},
        )
        return body

    async def resend(self, spoke: str, session: str, what: str, body: dict[str, Any]) -> None:
        """Publish the same event again, with a header that defeats JetStream's dedup window
        so that the worker itself must recognise the eventId."""
        await self.publish_raw(
            self.subject(spoke, session, what),
            json.dumps(body).encode(),
            {"Nats-Msg-Id": f"{body['eventId']}-{uuid4().hex[:6]}"},
        )

    # --- observing -------------------------------------------------------------

    async def quiet(self) -> bool:
        infos = await self.js.consumers_info(self.settings.events_stream)
        if any(i.num_pending or i.num_ack_pending for i in infos):
            return False
        return await self.db.fetchval("SELECT count(*) FROM outbox") == 0

    async def settled(self) -> bool:
        # nats-server counts a stored message into a filtered consumer's
        # num_pending asynchronously, a moment after the publish ack: quiet
        # twice, a little apart, means really quiet.
        if not await self.quiet():
            return False
        await asyncio.sleep(0.1)
        return await self.quiet()

    async def settle(self, within: float = SETTLE_TIMEOUT_SECONDS) -> None:
        """Until every inbound message is acked and every outbound event published."""
        await wait_until(self.settled, within=within, what="the hub to settle")

    async def outbound(self, filter_subject: str | None = None) -> list[Outbound]:
        """Everything in PU_OUT so far, in stream order."""
        info = await self.js.stream_info(self.settings.out_stream)
        total = info.state.messages
        if total == 0:
            return []
        sub = await self.js.pull_subscribe(
            filter_subject or f"{self.prefix}.>",
            stream=self.settings.out_stream,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30),
        )
        found: list[Outbound] = []
        # A clustered stream's new consumer may have no leader yet (a node just died):
        # its fetches answer 503 until one is elected.
        electing = time.monotonic() + SETTLE_TIMEOUT_SECONDS
        try:
            while True:
                try:
                    batch = await sub.fetch(500, timeout=0.5)
                except TimeoutError:  # nats-py raises either its own or asyncio's
                    break
                except nats.js.errors.ServiceUnavailableError:
                    if time.monotonic() > electing:
                        raise
                    await asyncio.sleep(0.2)
                    continue
                for msg in batch:
                    found.append(
                        Outbound(msg.subject, json.loads(msg.data), dict(msg.headers or {}))
                    )
                    await msg.ack()
        finally:
            await sub.unsubscribe()
        return found

    async def outbound_in_sequence(self) -> list[Outbound]:
        """Everything in PU_OUT, in stream order, read by sequence (no consumer involved)."""
        info = await self.js.stream_info(self.settings.out_stream)
        if not info.state.messages:
            return []
        found = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await self.js.get_msg(self.settings.out_stream, seq)
            assert msg.subject is not None
            assert msg.data is not None
            found.append(Outbound(msg.subject, json.loads(msg.data), dict(msg.headers or {})))
        return found

    async def rows(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.db.fetch(sql, *args)]

    async def value(self, sql: str, *args: Any) -> Any:
        return await self.db.fetchval(sql, *args)


@asynccontextmanager
async def open_hub(
    settings: Settings, database_url: str, nats_url: str, tmp: Path
) -> AsyncIterator[Hub]:
    """A hub on given servers; its workers are stopped and its streams deleted afterwards."""
    nc = await nats.connect(nats_url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = nc.jetstream()
    conn = await db.connect(database_url, application_name="tests")
    hub = Hub(settings, database_url, nats_url, nc, js, conn, tmp)
    try:
        yield hub
    finally:
        await hub.stop_workers()
        for process in hub.processes:
            process.kill()
        await hub.db.close()  # the test may have replaced it
        for stream in (settings.events_stream, settings.out_stream):
            with contextlib.suppress(nats.errors.Error):
                await js.delete_stream(stream)
        await nc.close()
