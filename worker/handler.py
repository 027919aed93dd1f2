"""Inbound messages, start to finish: decode, apply in one transaction, settle.

A lane hands over what one fetch returned, in stream order. The ack policy:
- applied, duplicate, ignored, conflict, late: ack after the transaction committed;
- can never be applied (a dead-letter reason): the dead letter is stored and
  announced in that same transaction, then the message is `term`inated so the
  server does not redeliver it;
- PostgreSQL unreachable: raise `LaneLost`; the lane gives the messages back
  and the next owner of the lane gets them again, in order;
- any other failure: the batch is retried one message at a time, each in
  place with backoff (not `nak`, which would let later events of the same
  session overtake it); a message that fails HANDLER_ATTEMPTS times is
  dead-lettered as `handler_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass

import structlog
from nats.aio.msg import Msg

from worker import db, outbound
from worker.bus import NATS_ERRORS
from worker.constants import HANDLER_ATTEMPTS, HANDLER_RETRY_BASE_SECONDS, HANDLER_RETRY_MAX_SECONDS
from worker.db import Connection
from worker.domain import LIFECYCLES, DeadLetterError, DeadLetterReason, retry_delay
from worker.effects import apply_batch
from worker.intake import Intake, decode
from worker.metrics import Metrics
from worker.subjects import as_published

log = structlog.get_logger("worker.handler")


class LaneLost(Exception):
    """The lane's database connection (and with it the lane's lock) is gone."""


@dataclass(frozen=True)
class Handled:
    outcome: str
    reason: str | None = None


@dataclass
class _Message:
    msg: Msg
    subject: str  # as published
    kind: str  # metric label: lifecycle, "signal" or "unknown"
    intake: Intake | None = None
    rejected: DeadLetterError | None = None


class MessageHandler:
    def __init__(self, prefix: str, metrics: Metrics) -> None:
        self.prefix = prefix
        self.metrics = metrics

    async def handle_batch(self, conn: Connection, msgs: list[Msg]) -> list[Handled]:
        """Handle fetched messages in order; raises LaneLost when the database is gone."""
        started = time.perf_counter()
        messages = [self._decode(msg) for msg in msgs]
        try:
            outcomes = await self._commit(conn, messages)
        except db.CONNECTION_ERRORS as err:
            self._requeued(messages, started)
            raise LaneLost(str(err)) from err
        except Exception as err:
            if conn.is_closed():
                self._requeued(messages, started)
                raise LaneLost(str(err)) from err
            log.warning(
                "batch.retried_singly",
                action="batch.split",
                messages=len(messages),
                error=f"{type(err).__name__}: {err}",
            )
            alone = [await self._handle_alone(conn, message, started) for message in messages]
            self._log_batch(msgs, alone, started)
            return alone
        for message, handled in zip(messages, outcomes, strict=True):
            await self._settle(message, handled, started)
        self._log_batch(msgs, outcomes, started)
        return outcomes

    async def _handle_alone(self, conn: Connection, message: _Message, started: float) -> Handled:
        """One message in its own transaction, retried in place until it gives up."""
        attempt = 0
        while True:
            attempt += 1
            try:
                (handled,) = await self._commit(conn, [message])
                break
            except db.CONNECTION_ERRORS as err:
                self._requeued([message], started)
                raise LaneLost(str(err)) from err
            except Exception as err:
                if conn.is_closed():
                    self._requeued([message], started)
                    raise LaneLost(str(err)) from err
                delay = retry_delay(attempt, HANDLER_RETRY_BASE_SECONDS, HANDLER_RETRY_MAX_SECONDS)
                if attempt >= HANDLER_ATTEMPTS and message.intake is not None:
                    # Give up applying it: dead-letter it instead (right away;
                    # should even that fail, it is retried with the backoff).
                    message.intake = None
                    message.rejected = DeadLetterError(
                        DeadLetterReason.HANDLER_ERROR,
                        f"applying the event failed {attempt} times, last with "
                        f"{type(err).__name__}: {err}",
                    )
                    continue
                self.metrics.events.labels(message.kind, "retried").inc()
                log.warning(
                    "event.retry",
                    action="event.retry",
                    subject=message.subject,
                    attempt=attempt,
                    error=f"{type(err).__name__}: {err}",
                    retry_in=delay,
                )
                with contextlib.suppress(*NATS_ERRORS):
                    await message.msg.in_progress()
                await asyncio.sleep(delay)
        await self._settle(message, handled, started)
        return handled

    async def _commit(self, conn: Connection, messages: list[_Message]) -> list[Handled]:
        """Apply the messages and write their dead letters, all in one transaction."""
        intakes = [m.intake for m in messages if m.intake is not None]
        async with conn.transaction():
            plan = await apply_batch(conn, self.prefix, intakes) if intakes else None
            outcomes = iter(plan.outcomes if plan else [])
            handled: list[Handled] = []
            for message in messages:
                rejected = message.rejected
                if message.intake is not None:
                    outcome = next(outcomes)
                    if not isinstance(outcome, DeadLetterError):
                        handled.append(Handled(outcome))
                        continue
                    rejected = outcome
                assert rejected is not None
                await self._dead_letter(conn, message, rejected)
                handled.append(Handled("dead_lettered", rejected.reason.value))
        return handled

    def _decode(self, msg: Msg) -> _Message:
        subject = as_published(self.prefix, msg.subject)
        message = _Message(msg, subject, _kind_of(subject))
        if msg.metadata.num_delivered > 1:
            self.metrics.redeliveries.inc()
        try:
            message.intake = decode(self.prefix, subject, msg.data)
        except DeadLetterError as rejected:
            message.rejected = rejected
        except Exception as err:  # a surprise in decoding is a dead letter, not a dead lane
            message.rejected = DeadLetterError(
                DeadLetterReason.INVALID_EVENT,
                f"the event could not be decoded: {type(err).__name__}: {err}",
            )
        return message

    async def _dead_letter(
        self, conn: Connection, message: _Message, rejected: DeadLetterError
    ) -> None:
        msg, meta = message.msg, message.msg.metadata
        deliveries = meta.num_delivered
        if rejected.reason is DeadLetterReason.HANDLER_ERROR:
            deliveries = max(deliveries, HANDLER_ATTEMPTS)
        letter = await db.insert_dead_letter(
            conn,
            subject=message.subject,
            headers=dict(msg.headers) if msg.headers else None,
            payload=msg.data,
            reason=rejected.reason.value,
            error=rejected.error,
            deliveries=deliveries,
            stream_position=f"{meta.stream}:{meta.sequence.stream}:{meta.timestamp.isoformat()}",
        )
        if letter is None:
            return  # a redelivery of a message dead-lettered before
        await db.enqueue_outbox(
            conn,
            [
                outbound.dead_lettered(
                    self.prefix,
                    dead_letter_id=letter.id,
                    occurred_at=letter.created_at,
                    causation_id=message.intake.event.event_id if message.intake else None,
                    reason=rejected.reason.value,
                    error=rejected.error,
                    subject=message.subject,
                    deliveries=deliveries,
                    payload=msg.data,
                )
            ],
        )

    async def _settle(self, message: _Message, handled: Handled, started: float) -> None:
        # An ack lost here is harmless: the message comes back and the ledger
        # (or the dead letter's stream position) recognises it.
        try:
            if handled.outcome == "dead_lettered":
                await message.msg.term()
            else:
                await message.msg.ack()
        except NATS_ERRORS as err:
            log.warning(
                "nats.ack_failed", action="event.settle", error=str(err) or type(err).__name__
            )
        self.metrics.events.labels(message.kind, handled.outcome).inc()
        self.metrics.handling_seconds.observe(time.perf_counter() - started)
        if handled.reason:
            self.metrics.dead_letters.labels(handled.reason).inc()
        self._log(message, handled.outcome, started, handled.reason)

    def _requeued(self, messages: list[_Message], started: float) -> None:
        for message in messages:
            self.metrics.events.labels(message.kind, "requeued").inc()
            self._log(message, "requeued", started)

    def _log_batch(self, msgs: list[Msg], outcomes: list[Handled], started: float) -> None:
        """One INFO line per fetched batch: its size, lane, duration and outcomes."""
        log.info(
            "batch",
            action="batch.handled",
            lane=msgs[0].metadata.consumer if msgs else None,
            messages=len(msgs),
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            outcomes=dict(Counter(h.outcome for h in outcomes)),
        )

    def _log(
        self, message: _Message, outcome: str, started: float, reason: str | None = None
    ) -> None:
        """The canonical line of one message: DEBUG when it was simply applied (the
        batch's INFO line counts it), INFO for anything else, WARNING for a dead letter."""
        if outcome == "applied":
            if not log.is_enabled_for(logging.DEBUG):
                return  # nor build the line (Msg.metadata parses the reply subject)
            emit = log.debug
        elif outcome == "dead_lettered":
            emit = log.warning
        else:
            emit = log.info
        event = message.intake.event if message.intake else None
        meta = message.msg.metadata
        emit(
            "event",
            action="event.handled",
            outcome=outcome,
            subject=message.subject,
            eventId=str(event.event_id) if event else None,
            sessionId=event.session_id if event else None,
            deliveries=meta.num_delivered,
            stream_seq=meta.sequence.stream,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            **({"reason": reason} if reason else {}),
        )


def _kind_of(subject: str) -> str:
    """The metric label of an event: its lifecycle, `signal`, or `unknown`."""
    tokens = subject.split(".")
    if len(tokens) >= 2 and tokens[-2] == "signal":
        return "signal"
    return tokens[-1] if tokens[-1] in LIFECYCLES else "unknown"
