"""One inbound message, start to finish: decode, apply in a transaction, ack.

The ack policy, by outcome:
- applied, duplicate, ignored, conflict, late: ack after the transaction committed;
- can never be applied (a dead-letter reason): store and announce the dead
  letter in one transaction, then `term` so the server does not redeliver;
- PostgreSQL unreachable: raise `LaneLost`; the lane gives the message back
  and the next owner of the lane gets it again, in order;
- any other failure: retry in place with backoff (not `nak`, which would let
  later events of the same session overtake it); after HANDLER_ATTEMPTS
  it is dead-lettered as `handler_error`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from uuid import UUID

import structlog
from nats.aio.msg import Msg

from worker import db, outbound
from worker.bus import NATS_ERRORS
from worker.constants import HANDLER_ATTEMPTS, HANDLER_RETRY_BASE_SECONDS, HANDLER_RETRY_MAX_SECONDS
from worker.db import Connection
from worker.domain import LIFECYCLES, DeadLetterError, DeadLetterReason, retry_delay
from worker.effects import apply_event
from worker.intake import Intake, decode
from worker.metrics import Metrics
from worker.subjects import Route, as_published

log = structlog.get_logger("worker.handler")


class LaneLost(Exception):
    """The lane's database connection (and with it the lane's lock) is gone."""


@dataclass(frozen=True)
class Handled:
    outcome: str
    reason: str | None = None


class MessageHandler:
    def __init__(self, prefix: str, metrics: Metrics) -> None:
        self.prefix = prefix
        self.metrics = metrics

    async def handle(self, conn: Connection, msg: Msg) -> Handled:
        started = time.perf_counter()
        subject = as_published(self.prefix, msg.subject)
        meta = msg.metadata
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            subject=subject, stream_seq=meta.sequence.stream, deliveries=meta.num_delivered
        )
        event_id: UUID | None = None
        kind = _kind_of(subject)
        if meta.num_delivered > 1:
            self.metrics.redeliveries.inc()
        try:
            try:
                intake = _decode(self.prefix, subject, msg.data)
                event_id = intake.event.event_id
                structlog.contextvars.bind_contextvars(
                    eventId=str(event_id), sessionId=intake.event.session_id
                )
                handled = await self._apply(conn, msg, intake)
            except DeadLetterError as rejected:
                handled = await self._dead_letter(conn, msg, subject, rejected, event_id)
        except LaneLost:
            self.metrics.events.labels(kind, "requeued").inc()
            log.warning(
                "event",
                action="event.handled",
                outcome="requeued",
                duration_ms=_ms(started),
            )
            raise
        await self._settle(msg, handled)
        self.metrics.events.labels(kind, handled.outcome).inc()
        self.metrics.handling_seconds.observe(time.perf_counter() - started)
        if handled.reason:
            self.metrics.dead_letters.labels(handled.reason).inc()
        fields = {"reason": handled.reason} if handled.reason else {}
        log.info(
            "event",
            action="event.handled",
            outcome=handled.outcome,
            duration_ms=_ms(started),
            **fields,
        )
        return handled

    async def _apply(self, conn: Connection, msg: Msg, intake: Intake) -> Handled:
        attempt = 0
        while True:
            attempt += 1
            try:
                async with conn.transaction():
                    applied = await apply_event(conn, self.prefix, intake)
                    await db.enqueue_outbox(conn, applied.outbound)
                return Handled(applied.outcome)
            except DeadLetterError:
                raise
            except db.CONNECTION_ERRORS as err:
                raise LaneLost(str(err)) from err
            except Exception as err:
                if conn.is_closed():
                    raise LaneLost(str(err)) from err
                if attempt >= HANDLER_ATTEMPTS:
                    raise DeadLetterError(
                        DeadLetterReason.HANDLER_ERROR,
                        f"applying the event failed {attempt} times, last with "
                        f"{type(err).__name__}: {err}",
                    ) from err
                delay = retry_delay(attempt, HANDLER_RETRY_BASE_SECONDS, HANDLER_RETRY_MAX_SECONDS)
                log.warning(
                    "event.retry",
                    action="event.retry",
                    attempt=attempt,
                    error=f"{type(err).__name__}: {err}",
                    retry_in=delay,
                )
                self.metrics.events.labels(_kind_of(intake.route), "retried").inc()
                await _quietly(msg.in_progress())
                await asyncio.sleep(delay)

    async def _dead_letter(
        self,
        conn: Connection,
        msg: Msg,
        subject: str,
        rejected: DeadLetterError,
        event_id: UUID | None,
    ) -> Handled:
        meta = msg.metadata
        deliveries = meta.num_delivered
        if rejected.reason is DeadLetterReason.HANDLER_ERROR:
            deliveries = max(deliveries, HANDLER_ATTEMPTS)
        position = f"{meta.stream}:{meta.sequence.stream}:{meta.timestamp.isoformat()}"
        try:
            async with conn.transaction():
                letter = await db.insert_dead_letter(
                    conn,
                    subject=subject,
                    headers=dict(msg.headers) if msg.headers else None,
                    payload=msg.data,
                    reason=rejected.reason.value,
                    error=rejected.error,
                    deliveries=deliveries,
                    stream_position=position,
                )
                if letter is not None:
                    await db.enqueue_outbox(
                        conn,
                        [
                            outbound.dead_lettered(
                                self.prefix,
                                dead_letter_id=letter.id,
                                occurred_at=letter.created_at,
                                causation_id=event_id,
                                reason=rejected.reason.value,
                                error=rejected.error,
                                subject=subject,
                                deliveries=deliveries,
                                payload=msg.data,
                            )
                        ],
                    )
        except db.CONNECTION_ERRORS as err:
            raise LaneLost(str(err)) from err
        return Handled("dead_lettered", rejected.reason.value)

    async def _settle(self, msg: Msg, handled: Handled) -> None:
        # An ack lost here is harmless: the message comes back and the ledger
        # (or the dead letter's stream position) recognises it.
        if handled.outcome == "dead_lettered":
            await _quietly(msg.term())
        else:
            await _quietly(msg.ack())


async def _quietly(action: Awaitable[None]) -> None:
    try:
        await action
    except NATS_ERRORS as err:
        log.warning("nats.ack_failed", action="event.settle", error=str(err) or type(err).__name__)


def _kind_of(subject_or_route: str | Route) -> str:
    """The metric label of an event: its lifecycle, `signal`, or `unknown`."""
    if isinstance(subject_or_route, Route):
        return "signal" if subject_or_route.signal_kind else str(subject_or_route.lifecycle)
    tokens = subject_or_route.split(".")
    if len(tokens) >= 2 and tokens[-2] == "signal":
        return "signal"
    return tokens[-1] if tokens[-1] in LIFECYCLES else "unknown"


def _decode(prefix: str, subject: str, body: bytes) -> Intake:
    """`decode`, with any surprise it raises turned into a dead letter instead of a dead lane."""
    try:
        return decode(prefix, subject, body)
    except DeadLetterError:
        raise
    except Exception as err:
        raise DeadLetterError(
            DeadLetterReason.INVALID_EVENT,
            f"the event could not be decoded: {type(err).__name__}: {err}",
        ) from err


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
