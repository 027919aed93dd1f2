"""Inbound messages, start to finish: decode, apply in one transaction, settle.

A lane hands over what one fetch returned, in stream order. The ack policy:
- applied, duplicate, ignored, conflict, late: ack after the transaction committed;
- can never be applied (a dead-letter reason): the dead letter is stored and
  announced in that same transaction, then the message is `term`inated so the
  server does not redeliver it;
- PostgreSQL unreachable: raise `LaneLost`; the lane gives the messages back
  and the next owner of the lane gets them again, in order;
- a transient condition of the database (db.TRANSIENT_ERRORS: a lock or
  statement timeout, a cancel, a serialization failure or deadlock, full
  resources): the same transaction is retried in place with backoff for as
  long as it lasts, without counting against any message;
- any other failure: the batch is retried one message at a time, each in
  place with backoff (not `nak`, which would let later events of the same
  session overtake it); a message that fails HANDLER_ATTEMPTS times is
  dead-lettered as `handler_error`. Storing a dead letter has the same limit;
  then it is stored in its last-resort form (ASCII text, no headers, the
  announcement without the body), and should even that fail HANDLER_ATTEMPTS
  times the message is logged in full, counted, and terminated: nothing
  leaves the lane waiting.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import structlog
from nats.aio.msg import Msg

from worker import db, outbound
from worker.connection import NATS_ERRORS
from worker.constants import (
    DEAD_LETTER_ANNOUNCED_SHARE,
    HANDLER_ATTEMPTS,
    HANDLER_RETRY_BASE_SECONDS,
    HANDLER_RETRY_MAX_SECONDS,
    RECONNECT_BASE_SECONDS,
    RECONNECT_MAX_SECONDS,
)
from worker.db import Connection
from worker.domain import LIFECYCLES, DeadLetterError, DeadLetterReason
from worker.effects import apply_batch
from worker.groups import CommitGroups, GroupFailed
from worker.intake import Intake, decode
from worker.metrics import Metrics
from worker.retry import Backoff
from worker.storable import StoredForms, ascii_only, header_block, readable_text, stored_forms
from worker.subjects import as_published
from worker.wire import WireMsg, delivery, raw

log = structlog.get_logger("worker.handler")


class LaneLost(Exception):
    """The lane's database connection (and with it the lane's lock) is gone."""


class Released(LaneLost):
    """The lane was asked to let go while waiting out the database: its messages go back."""


@dataclass(frozen=True)
class Handled:
    outcome: str
    reason: str | None = None


@dataclass
class _Message:
    msg: Msg
    published: str  # the subject as published, as worker.wire decoded it
    subject: str  # its readable form (worker.storable): what routes and what is logged
    kind: str  # metric label: lifecycle, "signal" or "unknown"
    intake: Intake | None = None
    rejected: DeadLetterError | None = None
    # Storing its dead letter failed HANDLER_ATTEMPTS times: store the plainest form.
    last_resort: bool = False

    @cached_property
    def stored(self) -> StoredForms:
        """Subject and headers as a dead letter keeps them: only a dead letter (or its
        last log line) needs them, so a message that applies never reads its headers."""
        msg = self.msg
        headers = msg.published_headers() if isinstance(msg, WireMsg) else msg.headers
        return stored_forms(
            raw(self.published),
            {raw(k): raw(v) for k, v in headers.items()} if headers else None,
        )


# The lanes' batches applied together (worker.groups), as the lanes share them.
BatchGroups = CommitGroups[Connection, _Message, Handled]


class MessageHandler:
    """Handles a lane's batches; `max_payload` is the NATS server's, bytes.

    `outbox_written(backend_pid)` is called after a transaction that wrote outbox
    rows has committed, with the backend pid of the connection that committed it:
    the relay of this process, if it leads, wakes at once instead of waiting for
    PostgreSQL's NOTIFY to come back round (which still wakes the relay of any
    other process).
    """

    def __init__(
        self,
        prefix: str,
        metrics: Metrics,
        max_payload: int,
        outbox_written: Callable[[int], None] | None = None,
    ) -> None:
        self.prefix = prefix
        self.metrics = metrics
        self.outbox_written = outbox_written
        # However large the body, its dead letter's announcement fits.
        self.announced_bytes = int(max_payload * DEAD_LETTER_ANNOUNCED_SHARE)

    async def handle_batch(
        self,
        conn: Connection,
        msgs: list[Msg],
        release: asyncio.Event | None = None,
        *,
        acks_all: bool = False,
        groups: BatchGroups | None = None,
    ) -> list[Handled]:
        """Handle fetched messages in order; raises LaneLost when the database is gone,
        Released when `release` is set while the database is being waited out.

        `acks_all`: the consumer's ack policy is `all` and `msgs` are consecutive
        deliveries of it; then an ack of the last one settles what the batch
        applied (each dead letter is terminated first, in order: a `term` under
        that policy also settles what comes before it). A batch redone one by one
        settles each message after its own commit, as before.

        `groups`: the batch may be applied together with other lanes' batches in
        one transaction (worker.groups); should that group fail, it is applied
        alone, as without."""
        started = time.perf_counter()
        messages = [self._decode(msg) for msg in msgs]
        waiting = _database_waits(release)
        while True:
            try:
                if groups is None:
                    outcomes = await self._commit(conn, messages)
                else:
                    outcomes = await groups.apply(conn, messages, self._commit)
                break
            except GroupFailed as err:
                log.info(
                    "batch.group_split",
                    action="batch.alone",
                    messages=len(messages),
                    error=str(err),
                )
                groups = None
            except db.TRANSIENT_ERRORS as err:
                await self._wait_out(conn, messages, err, waiting, started)
            except Exception as err:
                self._raise_if_lost(conn, err, messages, started)
                log.warning(
                    "batch.retried_singly",
                    action="batch.split",
                    messages=len(messages),
                    error=_described(err),
                )
                alone = [
                    await self._handle_alone(conn, message, started, release)
                    for message in messages
                ]
                self._log_batch(msgs, alone, started)
                return alone
        last = len(messages) - 1
        for n, (message, handled) in enumerate(zip(messages, outcomes, strict=True)):
            await self._settle(message, handled, started, ack=not acks_all or n == last)
        self._count(messages, outcomes)
        self._log_batch(msgs, outcomes, started)
        return outcomes

    async def _handle_alone(
        self, conn: Connection, message: _Message, started: float, release: asyncio.Event | None
    ) -> Handled:
        """One message in its own transaction, retried in place until it gives up."""
        # Its own failures: HANDLER_ATTEMPTS, then the next way to settle it. Not cut
        # short by a release: a few seconds, and the message must be settled in order.
        attempts = Backoff(
            HANDLER_RETRY_BASE_SECONDS, HANDLER_RETRY_MAX_SECONDS, limit=HANDLER_ATTEMPTS
        )
        waiting = _database_waits(release)
        while True:
            try:
                (handled,) = await self._commit(conn, [message])
                break
            except db.TRANSIENT_ERRORS as err:
                await self._wait_out(conn, [message], err, waiting, started)
                continue
            except Exception as err:
                self._raise_if_lost(conn, err, [message], started)
                delay = attempts.failed()
                if attempts.exhausted:
                    attempts.succeeded()
                    if not self._give_up(message, err):
                        handled = Handled("unstored", "unstorable")
                        self._log_unstored(message, err)
                        break
                    continue
                self.metrics.events.labels(message.kind, "retried").inc()
                log.warning(
                    "event.retry",
                    action="event.retry",
                    subject=message.subject,
                    attempt=attempts.failures,
                    error=_described(err),
                    retry_in=delay,
                )
                with contextlib.suppress(*NATS_ERRORS):
                    await message.msg.in_progress()
                await attempts.sleep(delay)
        await self._settle(message, handled, started)
        self._count([message], [handled])
        return handled

    def _give_up(self, message: _Message, err: Exception) -> bool:
        """After HANDLER_ATTEMPTS failures, the next way to settle the message; False: none left."""
        if message.intake is not None:
            # Give up applying it: dead-letter it instead (right away).
            message.intake = None
            message.rejected = DeadLetterError(
                DeadLetterReason.HANDLER_ERROR,
                f"applying the event failed {HANDLER_ATTEMPTS} times, last with {_described(err)}",
            )
            return True
        if not message.last_resort:
            log.error(
                "dead_letter.last_resort",
                action="dead_letter.store",
                subject=message.subject,
                error=_described(err),
            )
            message.last_resort = True
            return True
        return False

    async def _wait_out(
        self,
        conn: Connection,
        messages: list[_Message],
        err: Exception,
        waiting: Backoff,
        started: float,
    ) -> None:
        """Back off before the same transaction again: the database, not the messages, failed.

        Raises Released when the lane is asked to let go meanwhile (`waiting.stopping`).
        """
        self._raise_if_lost(conn, err, messages, started)
        delay = waiting.failed()
        log.warning(
            "batch.waiting_for_database",
            action="batch.wait",
            messages=len(messages),
            waits=waiting.failures,
            error=_described(err),
            retry_in=delay,
        )
        for message in messages:
            # Keeps the server from redelivering them meanwhile (the ack wait restarts).
            with contextlib.suppress(*NATS_ERRORS):
                await message.msg.in_progress()
        await waiting.sleep(delay)
        if waiting.stopping is not None and waiting.stopping.is_set():
            self._requeued(messages, started)
            raise Released(f"released while waiting for the database: {_described(err)}")

    def _raise_if_lost(
        self, conn: Connection, err: Exception, messages: list[_Message], started: float
    ) -> None:
        if isinstance(err, db.CONNECTION_ERRORS) or conn.is_closed():
            self._requeued(messages, started)
            raise LaneLost(str(err)) from err

    async def _commit(self, conn: Connection, messages: list[_Message]) -> list[Handled]:
        """Apply the messages and write their dead letters, all in one transaction."""
        intakes = [m.intake for m in messages if m.intake is not None]
        async with conn.transaction():
            plan = await apply_batch(conn, self.prefix, intakes) if intakes else None
            outcomes = iter(plan.outcomes if plan else [])
            handled: list[Handled] = []
            wrote_outbox = bool(plan and plan.outbound)
            for message in messages:
                rejected = message.rejected
                if message.intake is not None:
                    outcome = next(outcomes)
                    if not isinstance(outcome, DeadLetterError):
                        handled.append(Handled(outcome))
                        continue
                    rejected = outcome
                assert rejected is not None
                wrote_outbox |= await self._dead_letter(conn, message, rejected)
                handled.append(Handled("dead_lettered", rejected.reason.value))
        if wrote_outbox and self.outbox_written is not None:
            self.outbox_written(conn.get_server_pid())
        return handled

    def _decode(self, msg: Msg) -> _Message:
        # Subject and headers may hold any bytes the server accepted (worker.wire).
        published = as_published(self.prefix, msg.subject)
        subject = readable_text(published)
        message = _Message(msg, published, subject, _kind_of(subject))
        if delivery(msg).deliveries > 1:
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
    ) -> bool:
        """Store the dead letter and enqueue its announcement; False if it was stored before."""
        msg, meta, stored = message.msg, message.msg.metadata, message.stored
        deliveries = meta.num_delivered
        if rejected.reason is DeadLetterReason.HANDLER_ERROR:
            deliveries = max(deliveries, HANDLER_ATTEMPTS)
        subject, headers, error = stored.subject, stored.headers, rejected.error
        subject_bytes, headers_bytes = stored.subject_bytes, stored.headers_bytes
        if message.last_resort:
            # Plain ASCII and no jsonb, what any text column takes; the bytes
            # columns hold the subject and headers exactly.
            subject, headers = ascii_only(subject), None
            error = ascii_only(f"stored in its last-resort form; {error}")
            subject_bytes = subject_bytes or stored.subject.encode()
            if headers_bytes is None and stored.headers:
                headers_bytes = header_block(
                    {k.encode(): v.encode() for k, v in stored.headers.items()}
                )
        letter = await db.insert_dead_letter(
            conn,
            subject=subject,
            headers=headers,
            payload=msg.data,
            reason=rejected.reason.value,
            error=error,
            deliveries=deliveries,
            stream_position=f"{meta.stream}:{meta.sequence.stream}:{meta.timestamp.isoformat()}",
            subject_bytes=subject_bytes,
            headers_bytes=headers_bytes,
        )
        if letter is None:
            return False  # a redelivery of a message dead-lettered before
        await db.enqueue_outbox(
            conn,
            [
                outbound.dead_lettered(
                    self.prefix,
                    dead_letter_id=letter.id,
                    occurred_at=letter.created_at,
                    causation_id=message.intake.event.event_id if message.intake else None,
                    reason=rejected.reason.value,
                    error=error,
                    subject=subject,
                    deliveries=deliveries,
                    payload=msg.data,
                    announced_bytes=0 if message.last_resort else self.announced_bytes,
                )
            ],
        )
        return True

    async def _settle(
        self, message: _Message, handled: Handled, started: float, ack: bool = True
    ) -> None:
        """Terminate a dead letter; ack anything else, unless `ack` is False (a later
        message's ack will cover it)."""
        # An ack lost here is harmless: the message comes back and the ledger
        # (or the dead letter's stream position) recognises it.
        try:
            if handled.outcome in ("dead_lettered", "unstored"):
                await message.msg.term()
            elif ack:
                await message.msg.ack()
        except NATS_ERRORS as err:
            log.warning(
                "nats.ack_failed", action="event.settle", error=str(err) or type(err).__name__
            )
        self.metrics.handling_seconds.observe(time.perf_counter() - started)
        self._log(message, handled.outcome, started, handled.reason)

    def _count(self, messages: list[_Message], outcomes: list[Handled]) -> None:
        """The settled messages in the counters: one increment per kind and outcome,
        not per message (a label lookup and a locked increment each: 2.2 µs a message,
        ~1 % of a drain's worker CPU, against 0.19 µs)."""
        events = Counter((m.kind, h.outcome) for m, h in zip(messages, outcomes, strict=True))
        for (kind, outcome), n in events.items():
            self.metrics.events.labels(kind, outcome).inc(n)
        for reason, n in Counter(h.reason for h in outcomes if h.reason).items():
            self.metrics.dead_letters.labels(reason).inc(n)

    def _log_unstored(self, message: _Message, err: Exception) -> None:
        """Nothing could store it: the log line is the last record of the message."""
        self.metrics.unstored.inc()
        meta = message.msg.metadata
        log.error(
            "dead_letter.unstored",
            action="dead_letter.store",
            subject=message.subject,
            reason=message.rejected.reason.value if message.rejected else None,
            stream_seq=meta.sequence.stream,
            headers=message.stored.headers,
            payload_base64=base64.b64encode(message.msg.data).decode("ascii"),
            error=_described(err),
        )

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


def _database_waits(release: asyncio.Event | None) -> Backoff:
    """The backoff of waiting out a transient database condition, for as long as it lasts."""
    return Backoff(RECONNECT_BASE_SECONDS, RECONNECT_MAX_SECONDS, stopping=release)


def _described(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"


def _kind_of(subject: str) -> str:
    """The metric label of an event: its lifecycle, `signal`, or `unknown`."""
    tokens = subject.rsplit(".", 2)  # only the last two matter
    if len(tokens) >= 2 and tokens[-2] == "signal":
        return "signal"
    return tokens[-1] if tokens[-1] in LIFECYCLES else "unknown"
