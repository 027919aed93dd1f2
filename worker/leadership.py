"""Run a duty on exactly one worker at a time, handing it over when that worker dies.

The leader holds a session-level advisory lock on a connection of its own;
when that connection dies (crash, kill, network), PostgreSQL releases the lock
and another worker's next try takes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from worker import db
from worker.constants import LEADER_RETRY_SECONDS, RECONNECT_BASE_SECONDS, RECONNECT_MAX_SECONDS
from worker.retry import Backoff, pause

log = structlog.get_logger("worker.leadership")

Duty = Callable[[db.Connection, asyncio.Event], Awaitable[None]]


async def lead(
    role: str,
    dsn: str,
    lock_namespace: int,
    lock_key: int,
    duty: Duty,
    stopping: asyncio.Event,
    application_name: str | None = None,
) -> None:
    """Try to lead `role` until `stopping`; while leading, run `duty(conn, stopping)`.

    `application_name` tags the leader's connection (default `hub-worker:<role>`): the
    worker gives it its lane manager's tag, so that a peer that finds the worker
    silent ends this connection with its lanes' (`LaneManager.application_name`),
    and with it the leadership of a hung worker.

    The duty returns when `stopping` is set (after finishing its work). Whatever
    it raises (the database gone, a statement timed out behind an operator's
    lock, a bug) is logged, the connection and with it the leadership let go,
    and leadership sought again after a backoff: a duty never stops the worker.
    """
    backoff = Backoff(RECONNECT_BASE_SECONDS, RECONNECT_MAX_SECONDS, stopping=stopping)
    while not stopping.is_set():
        conn: db.Connection | None = None
        try:
            conn = await db.connect(
                dsn, application_name=application_name or f"hub-worker:{role}", by_keys=True
            )
            while not stopping.is_set():
                if await db.try_lock(conn, lock_namespace, lock_key):
                    log.info("leader.elected", action="leader.elected", role=role)
                    await duty(conn, stopping)
                    backoff.succeeded()
                    await db.unlock(conn, lock_namespace, lock_key)
                    break
                await pause(stopping, LEADER_RETRY_SECONDS)
        except Exception as err:
            delay = backoff.failed()
            if isinstance(err, db.CONNECTION_ERRORS + db.TRANSIENT_ERRORS):
                log.warning(
                    "leader.lost", action="leader.lost", role=role, error=str(err), retry_in=delay
                )
            else:
                log.error(
                    "leader.duty_failed",
                    action="leader.failed",
                    role=role,
                    error=f"{type(err).__name__}: {err}",
                    retry_in=delay,
                    exc_info=True,
                )
            await backoff.sleep(delay)
        finally:
            if conn is not None:
                await close_quietly(conn)


async def close_quietly(conn: db.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), timeout=2)
    except db.CONNECTION_ERRORS:
        conn.terminate()
