"""Commands over NATS request/reply (contract section 7).

Every worker serves them in one queue group, so they keep being answered
while any worker is up. A reply is sent only after the change committed.
"""

from __future__ import annotations

import contextlib
import time

import asyncpg
import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from worker import db, outbound
from worker.bus import Bus
from worker.connection import NATS_ERRORS
from worker.events import CommandError, ResolveReply, ResolveRequest, validation_problems
from worker.subjects import resolve_command_subject

log = structlog.get_logger("worker.commands")

QUEUE_GROUP = "hub-worker"
# A reply subject that is not UTF-8 (worker.wire) cannot be published to.
_REPLY_ERRORS: tuple[type[Exception], ...] = (*NATS_ERRORS, UnicodeEncodeError)


class Refused(Exception):
    def __init__(self, error: CommandError) -> None:
        super().__init__(error.message)
        self.error = error


def _refuse(code: str, message: str) -> Refused:
    return Refused(CommandError.model_validate({"code": code, "message": message}))


class ResolveCommand:
    def __init__(self, prefix: str, bus: Bus, pool: db.Pool) -> None:
        self.prefix = prefix
        self.bus = bus
        self.pool = pool
        self.subscription: Subscription | None = None

    async def start(self) -> None:
        self.subscription = await self.bus.nc.subscribe(
            resolve_command_subject(self.prefix), queue=QUEUE_GROUP, cb=self._on_request
        )

    async def stop(self) -> None:
        if self.subscription is not None:
            with contextlib.suppress(*NATS_ERRORS):
                await self.subscription.drain()  # type: ignore[no-untyped-call]  # nats-py lacks the annotation
            self.subscription = None

    async def _on_request(self, msg: Msg) -> None:
        started = time.perf_counter()
        reply = await self.resolve(msg.data)
        outcome = "resolved" if reply.ok else (reply.error.code if reply.error else "refused")
        log.info(
            "command",
            action="command.resolve",
            outcome=outcome,
            detectionId=reply.detection.id if reply.detection else None,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        if msg.reply:
            try:
                await msg.respond(reply.model_dump_json(exclude_unset=True).encode())
            except _REPLY_ERRORS as err:
                log.warning("command.reply_failed", action="command.resolve", error=str(err))

    async def resolve(self, body: bytes) -> ResolveReply:
        try:
            request = _parse(body)
            async with self.pool.acquire() as conn, conn.transaction():
                exists, resolved = await db.lock_detection(conn, request.detection_id)
                if not exists:
                    raise _refuse("not_found", f"no detection {request.detection_id!r}")
                if not await db.account_exists(conn, request.resolved_by):
                    raise _refuse("unknown_account", f"no account {request.resolved_by!r}")
                if resolved:
                    raise _refuse(
                        "already_resolved",
                        f"detection {request.detection_id!r} is already resolved",
                    )
                detection = await db.resolve_detection(
                    conn, request.detection_id, request.resolved_by, request.resolution
                )
                assert detection is not None  # the row is locked and was active
                await db.enqueue_outbox(
                    conn,
                    [outbound.detection_changed(self.prefix, "resolved", dict(detection), None)],
                )
        except Refused as refused:
            return ResolveReply(ok=False, error=refused.error)
        except db.CONNECTION_ERRORS + db.TRANSIENT_ERRORS as err:
            return _failed("unavailable", f"the database is unavailable: {err}")
        except asyncpg.DataError as err:
            # What the request holds that PostgreSQL refuses to compare or store.
            return _failed("invalid_request", f"invalid request: {err}")
        except Exception as err:
            # Every request is answered: the caller is not left to time out.
            log.error(
                "command.failed",
                action="command.resolve",
                error=f"{type(err).__name__}: {err}",
                exc_info=True,
            )
            return _failed("unavailable", f"the worker could not resolve it: {type(err).__name__}")
        return ResolveReply(ok=True, detection=detection)


def _failed(code: str, message: str) -> ResolveReply:
    return ResolveReply(ok=False, error=_refuse(code, message).error)


def _parse(body: bytes) -> ResolveRequest:
    try:
        return ResolveRequest.model_validate_json(body)
    except ValidationError as err:
        problems = validation_problems(err, 5)
        raise _refuse("invalid_request", f"invalid request: {problems}") from err
    except (ValueError, RecursionError) as err:
        raise _refuse("invalid_request", f"invalid request: {err}") from err
