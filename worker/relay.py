"""The outbox relay: publishes committed outbound events to PU_OUT, in change order.

One worker at a time relays (leadership), so no row is published by two
workers at once. Rows are read in id order and published in windows: a
`repeated` event followed by another of its detection is skipped (they may
coalesce, contract section 5), and a window holds consecutive rows of distinct aggregates (a detection, a mapping),
all sent at once on one connection (so they are stored in that order) with
their acks awaited together. A row that fails is retried before anything
after it of its aggregate is sent, because the window ends where an
aggregate repeats: events of one detection or mapping keep their order even
when a publish fails. Rows are deleted only after their ack; a crash between
ack and delete republishes with the same Nats-Msg-Id, which the stream's
duplicate window drops.

A row JetStream refuses for a reason of its own (see `classify`) is set aside
(moved to `outbox_set_aside` with the reason) instead of being retried in front
of everything else; later rows, of its aggregate too, are published as usual.
A publish that finds no stream makes the relay ensure the streams (recreating
PU_OUT) and try again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
import structlog

from worker import db
from worker.bus import Bus
from worker.connection import NATS_ERRORS
from worker.constants import (
    RECONNECT_MAX_SECONDS,
    RELAY_BATCH,
    RELAY_POLL_SECONDS,
    RELAY_RETRY_BASE_SECONDS,
    RELAY_WINDOW,
)
from worker.metrics import Metrics
from worker.retry import Backoff
from worker.subjects import captured_by, detection_change_filter

log = structlog.get_logger("worker.relay")

NOTIFY_CHANNEL = "hub_worker_outbox"
# Most backend pids of this process's lanes remembered (see OutboxRelay.wake).
LOCAL_BACKENDS_KEPT = 256


class OutboxRelay:
    def __init__(self, bus: Bus, prefix: str, metrics: Metrics) -> None:
        self.bus = bus
        self.prefix = prefix
        self.metrics = metrics
        self.published = 0
        # Set by a NOTIFY, or directly by this process's lanes (`wake`).
        self._wake = asyncio.Event()
        # Backends whose commits wake the relay in-process: their NOTIFYs, which
        # arrive just after, would only make it read an emptied outbox again.
        self._local_backends: set[int] = set()

    def __repr__(self) -> str:
        return f"<OutboxRelay published={self.published}>"

    def wake(self, backend_pid: int) -> None:
        """Outbox rows were committed by this process's connection to `backend_pid`:
        look now (harmless when not leading)."""
        if backend_pid not in self._local_backends:
            if len(self._local_backends) >= LOCAL_BACKENDS_KEPT:
                self._local_backends.clear()  # lanes reconnected many times: forget old pids
            self._local_backends.add(backend_pid)
        self._wake.set()

    async def duty(self, conn: db.Connection, stopping: asyncio.Event) -> None:
        """Relay until `stopping`, then flush what is left and return."""
        wake = self._wake

        def on_notify(_conn: object, pid: int, *_: object) -> None:
            # A pid reused by another process's backend only delays that
            # process's rows until the next poll (RELAY_POLL_SECONDS).
            if pid not in self._local_backends:
                wake.set()

        # Losing a delete in a crash only republishes an event with the same
        # Nats-Msg-Id, so the relay's own commits need not wait for the disk.
        await db.relax_durability(conn)
        await conn.add_listener(NOTIFY_CHANNEL, on_notify)
        # NATS not taking publishes (a missing or full stream, a reconnect): wait it out,
        # from a second on: each attempt is a window of publishes and a log line.
        refused = Backoff(RELAY_RETRY_BASE_SECONDS, RECONNECT_MAX_SECONDS, stopping=stopping)
        # A stop wakes the relay too, so that it waits on `wake` alone: a commit's
        # wake resumes it in the loop's next turn, where two tasks waiting on the two
        # events, made each cycle, took three turns.
        stopper = asyncio.create_task(stopping.wait())
        stopper.add_done_callback(lambda _: wake.set())
        try:
            while not stopping.is_set():
                wake.clear()
                if not await self.drain(conn):
                    await refused.sleep(refused.failed())
                    continue
                refused.succeeded()
                # Polling covers a lost notification (e.g. across a reconnect).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RELAY_POLL_SECONDS):
                        await wake.wait()
            await self.drain(conn)
        finally:
            stopper.cancel()
            if not conn.is_closed():
                await conn.remove_listener(NOTIFY_CHANNEL, on_notify)

    def _type_of(self, subject: str) -> str:
        """`detection.opened`, `mapping.completed`, `deadletter`... from an outbound subject."""
        tokens = subject[len(self.prefix) + 1 :].split(".")
        return tokens[0] if tokens[0] == "deadletter" else ".".join(tokens[:2])

    async def drain(self, conn: db.Connection) -> bool:
        """Publish pending rows until none is left; False if NATS refused one for now."""
        repaired = False
        while True:
            pending = await db.pending_outbox(conn, RELAY_BATCH)
            if not pending:
                return True
            superseded = _superseded(pending, self.prefix)
            done = [r.id for r in pending if r.id in superseded]
            aside: list[db.SetAside] = []
            failed: list[tuple[db.PendingOutbound, Refusal]] = []
            try:
                for window in _windows([r for r in pending if r.id not in superseded]):
                    outcome = await self._publish(window)
                    done.extend(outcome.published)
                    failed = outcome.failed
                    if any(refusal.reason == NO_STREAM for _, refusal in failed):
                        aside.extend(await self._without_stream(failed))
                        failed = [(r, f) for r, f in failed if r.id not in {a.id for a in aside}]
                    aside.extend(self._set_aside(row, refusal) for row, refusal in outcome.refused)
                    if failed:
                        break
            finally:
                await db.delete_outbox(conn, done)
                await db.set_aside_outbox(conn, aside)
                self.published += len(done) - len(superseded)
            if failed:
                if not repaired and any(f.reason == NO_STREAM for _, f in failed):
                    # The streams were ensured just now: try once more at once.
                    repaired = True
                    continue
                return False
            if len(pending) < RELAY_BATCH:
                # The read saw every row committed before it. A row committed
                # since wakes the relay again (`wake` or its NOTIFY, both after
                # the commit, so after `duty` cleared the wake): reading again
                # now would cost a round trip per cycle to find the outbox empty.
                return True

    async def _publish(self, window: list[db.PendingOutbound]) -> _Outcome:
        """Send a window at once; which rows JetStream acknowledged, refused, or not yet."""
        started = time.perf_counter()
        results = await self.bus.publish_window(
            [(r.subject, r.payload, str(r.event_id)) for r in window]
        )
        self.metrics.publish_seconds.observe(time.perf_counter() - started)
        outcome = _Outcome()
        # Counted once per type and window: a labelled counter's lookup and lock per
        # row were a few per cent of a drain's worker time.
        published: Counter[str] = Counter()
        for row, error in zip(window, results, strict=True):
            if error is None:
                published[self._type_of(row.subject)] += 1
                outcome.published.append(row.id)
                continue
            refusal = classify(error)
            self.metrics.publish_failures.labels(refusal.reason).inc()
            (outcome.refused if refusal.permanent else outcome.failed).append((row, refusal))
        for kind, count in published.items():
            self.metrics.published.labels(kind).inc(count)
        if outcome.failed:
            # Once per window, not once per row: a window can hold 500 rows.
            reasons = Counter(refusal.reason for _, refusal in outcome.failed)
            log.warning(
                "relay.publish_failed",
                action="relay.publish",
                failed=len(outcome.failed),
                window=len(window),
                reasons=dict(reasons),
                errors={r.reason: r.error for _, r in reversed(outcome.failed)},
            )
        return outcome

    async def _without_stream(
        self, failed: list[tuple[db.PendingOutbound, Refusal]]
    ) -> list[db.SetAside]:
        """Ensure the streams after a publish found none; set aside what no stream captures.

        PU_OUT deleted while running is recreated here (the lanes do the same for
        PU_EVENTS). A row whose subject PU_OUT does not capture would find no stream
        whatever we do: it is refused for good.
        """
        try:
            await self.bus.ensure_streams()
            subjects = await self.bus.out_stream_subjects()
        except NATS_ERRORS as err:
            log.warning("relay.streams_not_ensured", action="stream.ensure", error=str(err))
            return []
        if subjects is None:
            return []
        return [
            self._set_aside(row, Refusal(NOT_CAPTURED, True, f"no stream captures {row.subject}"))
            for row, refusal in failed
            if refusal.reason == NO_STREAM and not captured_by(subjects, row.subject)
        ]

    def _set_aside(self, row: db.PendingOutbound, refusal: Refusal) -> db.SetAside:
        kind = self._type_of(row.subject)
        self.metrics.set_aside.labels(kind, refusal.reason).inc()
        log.error(
            "relay.set_aside",
            action="relay.set_aside",
            reason=refusal.reason,
            error=refusal.error,
            outbox_id=row.id,
            outbound_event_id=str(row.event_id),
            subject=row.subject,
            type=kind,
            payload_bytes=len(row.payload),
            table="outbox_set_aside",
        )
        return db.SetAside(row.id, refusal.reason, refusal.error)


# Short reasons of a failed publish (the label of hub_worker_outbox_publish_failures
# and of hub_worker_outbox_set_aside, the `reason` of outbox_set_aside).
MAX_PAYLOAD = "max_payload"  # bigger than the server's max_payload: never sent
TOO_LARGE = "too_large"  # the stream's max_msg_size, or its header limit
REJECTED = "rejected"  # another JetStream 400 reply, or a subject no publish may carry
NOT_CAPTURED = "not_captured"  # no stream captures the subject
NO_STREAM = "no_stream"  # no responders: the stream is missing or has no leader
TIMEOUT = "timeout"
UNAVAILABLE = "unavailable"  # a JetStream error reply not about the message (stream full...)
DISCONNECTED = "disconnected"

# JetStream error codes of a message over the stream's max_msg_size or header limit.
_SIZE_ERR_CODES = {10054, 10097}


@dataclass(frozen=True)
class Refusal:
    """Why one publish failed; `permanent` when retrying the same row cannot succeed."""

    reason: str
    permanent: bool
    error: str


def classify(error: BaseException) -> Refusal:
    """Permanent: refused for a reason of the row itself; transient: anything else.

    A row is refused for good when the client will not send it (bigger than the
    server's max_payload with its header, or a subject or id that would break the
    protocol line) or JetStream answers 400, which for a publish is about
    the message (its size, its headers). Timeouts, no responders (the stream is
    missing, or electing a leader), 503 and 500 replies (a full stream, storage
    trouble) and connection errors are the server's state: waited out. "No stream
    captures the subject" is found by the relay itself once it ensured the streams.
    """
    text = str(error) or type(error).__name__
    if isinstance(error, nats.errors.MaxPayloadError):
        return Refusal(MAX_PAYLOAD, True, text)
    if isinstance(error, nats.errors.BadSubjectError | nats.errors.BadHeaderError):
        # Not framed (worker.wire.publication): its subject or id would break the line.
        return Refusal(REJECTED, True, text)
    if isinstance(error, nats.js.errors.APIError):
        text = error.description or text
        if error.err_code in _SIZE_ERR_CODES:
            return Refusal(TOO_LARGE, True, text)
        if error.code == 400:
            return Refusal(REJECTED, True, text)
        return Refusal(UNAVAILABLE, False, text)
    if isinstance(error, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        return Refusal(NO_STREAM, False, text)
    if isinstance(error, TimeoutError | nats.errors.TimeoutError):
        return Refusal(TIMEOUT, False, text)
    return Refusal(DISCONNECTED, False, text)


@dataclass
class _Outcome:
    published: list[int] = field(default_factory=list)
    refused: list[tuple[db.PendingOutbound, Refusal]] = field(default_factory=list)
    failed: list[tuple[db.PendingOutbound, Refusal]] = field(default_factory=list)


def _superseded(rows: list[db.PendingOutbound], prefix: str) -> set[int]:
    """`repeated` events followed, in these rows, by another `repeated` of their detection.

    Contract section 5 lets repeated events coalesce (occurrenceCount is a
    gauge): the later one carries everything the earlier one said.
    """
    repeated = detection_change_filter(prefix, "repeated")
    dropped: set[int] = set()
    last_repeated: dict[str, int] = {}
    for row in rows:
        earlier = last_repeated.pop(row.aggregate, None)
        if row.subject.startswith(repeated):
            if earlier is not None:
                dropped.add(earlier)
            last_repeated[row.aggregate] = row.id
    return dropped


def _windows(rows: list[db.PendingOutbound]) -> list[list[db.PendingOutbound]]:
    """The rows in rounds: each aggregate's first row, then each one's second, ...

    A window never holds two events of one aggregate, and an aggregate's next
    event goes in a later window than its last, so a failed publish is never
    overtaken by a later event of its aggregate (the contract orders events per
    detection or mapping, not across them). Cutting the rows into consecutive
    runs of distinct aggregates instead gave ~25 rows a window in a drain, a
    round trip through a busy event loop every 25 rows (docs/performance.md).
    A round longer than RELAY_WINDOW is sent as several windows.
    """
    rounds: list[list[db.PendingOutbound]] = []
    earlier: Counter[str] = Counter()
    for row in rows:
        n = earlier[row.aggregate]
        earlier[row.aggregate] += 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(row)
    return [
        one_round[at : at + RELAY_WINDOW]
        for one_round in rounds
        for at in range(0, len(one_round), RELAY_WINDOW)
    ]
