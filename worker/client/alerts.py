"""Following the hub's alerts: `subscribe` and the `Alerts` it returns."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from datetime import datetime
from types import TracebackType
from typing import Annotated, Literal, Self
from uuid import uuid4

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import Field, TypeAdapter, ValidationError

from worker.client.spoke import as_jetstream
from worker.domain import SEVERITIES, Severity
from worker.events import DeadLetterEvent, DetectionEscalatedEvent, DetectionEvent, MappingEvent
from worker.retry import Backoff
from worker.subjects import (
    ID_PATTERN,
    KIND_PATTERN,
    deadletter_capture,
    detection_capture,
    detection_subject,
    is_id,
    is_kind,
    mapping_capture,
    mapping_subject,
    out_stream,
)

# Alerts: messages per pull, and how long one pull waits on the server, seconds.
FETCH_BATCH = 100
FETCH_WAIT_SECONDS = 5.0
# An ephemeral alerts consumer left behind by a client that died is removed
# by the server after this long, seconds.
EPHEMERAL_INACTIVE_SECONDS = 60.0
# A follower whose pulls fail (NATS away, the consumer gone) retries after a
# doubling pause up to this long, seconds, and binds afresh (recreating a
# consumer that vanished) after this many failures in a row.
FOLLOW_RETRY_BASE_SECONDS = 0.4
FOLLOW_RETRY_MAX_SECONDS = 5.0
REPAIR_AFTER = 3

AlertEvent = DetectionEvent | DetectionEscalatedEvent | MappingEvent | DeadLetterEvent
_ALERT: TypeAdapter[AlertEvent] = TypeAdapter(Annotated[AlertEvent, Field(discriminator="type")])
AlertHandler = Callable[[AlertEvent], Awaitable[object] | object]


def alert_filters(
    prefix: str,
    severities: Iterable[str] = (),
    kinds: Iterable[str] = (),
    sessions: Iterable[str] = (),
    include_mappings: bool = False,
    include_deadletters: bool = False,
) -> list[str]:
    """The consumer's filter subjects: `P.detection.*.{severity}.{kind}` for every pair
    (a wildcard where none is given), plus `P.mapping.*.{session}` (or `P.mapping.>`),
    plus `P.deadletter.>`."""
    sevs = sorted(set(severities))
    for severity in sevs:
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be high, medium or low, got {severity!r}")
    tokens = sorted({k.lower() for k in kinds})
    for token in tokens:
        if not is_kind(token):
            raise ValueError(f"kind must match {KIND_PATTERN}, got {token!r}")
    ids = sorted(set(sessions))
    for session_id in ids:
        if not is_id(session_id):
            raise ValueError(f"session id must match {ID_PATTERN}, got {session_id!r}")
    if not sevs and not tokens:
        filters = [detection_capture(prefix)]
    else:
        filters = [
            detection_subject(prefix, "*", severity, kind)
            for severity, kind in itertools.product(sevs or ["*"], tokens or ["*"])
        ]
    if include_mappings:
        filters += [mapping_subject(prefix, "*", s) for s in ids] or [mapping_capture(prefix)]
    if include_deadletters:
        filters.append(deadletter_capture(prefix))
    return filters


def _session_of(event: AlertEvent) -> str | None:
    if isinstance(event, MappingEvent):
        return event.mapping.session_id
    if isinstance(event, DeadLetterEvent):
        return None  # a dead letter may not even have a readable session
    return event.detection.session_id


class Alerts:
    """Detection (mapping, dead-letter) events from the hub's `HUB_OUT`; see `subscribe`."""

    def __init__(
        self,
        nc_or_js: NATS | JetStreamContext,
        *,
        prefix: str = "hub",
        durable: str | None = None,
        severities: Iterable[Severity] = (),
        kinds: Iterable[str] = (),
        sessions: Iterable[str] = (),
        include_mappings: bool = False,
        include_deadletters: bool = False,
        since: datetime | Literal["all"] | None = None,
    ) -> None:
        if durable is not None and not is_id(durable):
            raise ValueError(f"durable name must match {ID_PATTERN}, got {durable!r}")
        self.js = as_jetstream(nc_or_js)
        self.prefix = prefix
        self.stream = out_stream(prefix)
        self.durable = durable
        self.sessions = frozenset(sessions)
        self.filters = alert_filters(
            prefix, severities, kinds, self.sessions, include_mappings, include_deadletters
        )
        if isinstance(since, datetime) and since.tzinfo is None:
            raise ValueError("since must be a timezone-aware datetime")
        self.since = since
        self._consumer: str | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._events: AsyncGenerator[AlertEvent, None] | None = None
        # Fetched and not handed out yet; the one handed out and not acked yet.
        self._fetched: list[Msg] = []
        self._in_hand: Msg | None = None
        # The stream sequence after the last alert handed out: where a consumer
        # that vanished (deleted, or lost with a NATS server's store) is recreated.
        self._resume_at: int | None = None
        self._entered = False
        self._closing = False
        self._closed = False

    def __aiter__(self) -> AsyncIterator[AlertEvent]:
        if self._events is None:
            self._events = self._follow()
        return self._events

    async def __aenter__(self) -> Self:
        """Create the consumer now: whatever is published after this is seen."""
        await self._open()
        self._entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Left normally (`break` included): the event in hand was handled. Left by an
        # exception: it was not, and goes back to the consumer.
        await self.close(ack_in_hand=exc is None)

    async def close(self, ack_in_hand: bool = True) -> None:
        """Stop: ack the event in hand (or hand it back with `ack_in_hand=False`),
        hand back the ones fetched but not yielded, and delete an ephemeral consumer
        (a durable one keeps its place)."""
        self._closing = True
        if self._events is not None:
            await self._events.aclose()
        await self._finish(ack_in_hand)

    async def handle(self, handler: AlertHandler) -> None:
        """Call `handler(event)` for every alert, in stream order, until cancelled.

        An alert is acked when its handler returns (an `async def` is awaited). When
        the handler raises, the alert is handed back unacked and `handle` raises
        what it raised: a durable consumer delivers that alert again, to the next
        `handle` or the next process that follows under the same name::

            async def page(event: AlertEvent) -> None:
                await pager.send(event)   # raises: the alert is delivered again

            async with subscribe(nc, durable="pager", severities=["high"]) as alerts:
                await alerts.handle(page)
        """
        try:
            while True:
                msg, event = await self._next()
                try:
                    result = handler(event)
                    if inspect.isawaitable(result):
                        await result
                except BaseException:
                    await _quietly(msg.nak())
                    raise
                await _quietly(msg.ack())
        finally:
            if not self._entered:
                await self.close(ack_in_hand=False)

    def _config(self) -> ConsumerConfig:
        if self.since == "all":
            policy, start = DeliverPolicy.ALL, None
        elif isinstance(self.since, datetime):
            policy, start = DeliverPolicy.BY_START_TIME, self.since
        else:
            policy, start = DeliverPolicy.NEW, None
        one = len(self.filters) == 1
        return ConsumerConfig(
            name=self.durable,
            durable_name=self.durable,
            deliver_policy=policy,
            opt_start_time=start,
            ack_policy=AckPolicy.EXPLICIT,
            filter_subject=self.filters[0] if one else None,
            filter_subjects=None if one else list(self.filters),
            inactive_threshold=None if self.durable else EPHEMERAL_INACTIVE_SECONDS,
        )

    async def _open(self) -> JetStreamContext.PullSubscription:
        if self._closed:
            raise RuntimeError("this subscription is closed")
        if self._sub is None:
            try:
                name = await self._ensure_consumer()
                self._sub = await self.js.pull_subscribe_bind(name, self.stream)
            except BaseException:
                # Cancelled or refused half-way: leave no ephemeral consumer behind.
                await self._release()
                raise
        return self._sub

    async def _release(self) -> None:
        sub, self._sub = self._sub, None
        consumer, self._consumer = self._consumer, None
        # Best effort: with the connection gone the server cleans up on its own.
        if sub is not None:
            await _quietly(sub.unsubscribe())
        if self.durable is None and consumer is not None:
            await _quietly(self.js.delete_consumer(self.stream, consumer))

    async def _finish(self, ack_in_hand: bool) -> None:
        # Best effort: with the connection gone the server redelivers after its ack wait.
        in_hand, self._in_hand = self._in_hand, None
        if in_hand is not None:
            await _quietly(in_hand.ack() if ack_in_hand else in_hand.nak())
        fetched, self._fetched = self._fetched, []
        for msg in fetched:
            await _quietly(msg.nak())
        await self._release()
        self._closed = True

    async def _ensure_consumer(self) -> str:
        config = self._config()
        if self._resume_at is not None:
            # Recreating a consumer that vanished: from just after the last alert seen.
            config = config.evolve(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self._resume_at,
                opt_start_time=None,
            )
        if self.durable is None:
            # Named before it exists, so that `_release` deletes it even if we are
            # cancelled while the server creates it.
            self._consumer = f"alerts-{uuid4().hex}"
            await self.js.add_consumer(self.stream, config.evolve(name=self._consumer))
            return self._consumer
        self._consumer = self.durable
        try:
            info = await self.js.consumer_info(self.stream, self.durable)
        except nats.js.errors.NotFoundError:
            await self.js.add_consumer(self.stream, config)
            return self.durable
        # An existing durable keeps its place. New filters apply from just after the last
        # event it acked: updating a consumer's filters in place would skip whatever the
        # server had already scanned past under the old ones.
        current = info.config
        have = set(
            current.filter_subjects or ([current.filter_subject] if current.filter_subject else [])
        )
        if have != set(self.filters):
            floor = info.ack_floor.stream_seq if info.ack_floor else 0
            await self.js.delete_consumer(self.stream, self.durable)
            await self.js.add_consumer(
                self.stream,
                config.evolve(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=floor + 1,
                    opt_start_time=None,
                ),
            )
        return self.durable

    async def _repair(self) -> None:
        """Bind afresh, recreating the consumer if it is gone."""
        sub, self._sub = self._sub, None
        if sub is not None:
            await _quietly(sub.unsubscribe())
        self._fetched = []  # their acks would not reach a consumer recreated anew
        await self._open()

    async def _fetch(self) -> list[Msg]:
        """The next fetched messages, waiting through whatever a pull may meet: an
        empty or status-only answer (a stale `408` from an earlier pull), a timeout,
        a reconnect, a consumer that vanished. Raises only when the connection is
        closed for good (or the caller is cancelled)."""
        backoff = Backoff(FOLLOW_RETRY_BASE_SECONDS, FOLLOW_RETRY_MAX_SECONDS, limit=REPAIR_AFTER)
        while True:
            try:
                sub = self._sub if self._sub is not None else await self._open()
                fetched = await sub.fetch(FETCH_BATCH, timeout=FETCH_WAIT_SECONDS)
            except TimeoutError:  # nats-py raises both its own and the builtin one
                continue
            except nats.errors.ConnectionClosedError:
                raise
            except (nats.errors.Error, nats.js.errors.Error, OSError) as err:
                if self.js._nc.is_closed:
                    raise
                await backoff.sleep(backoff.failed())
                if isinstance(err, nats.js.errors.NotFoundError) or backoff.exhausted:
                    with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, OSError):
                        await self._repair()
                continue
            backoff.succeeded()
            if fetched:
                return fetched

    async def _next(self) -> tuple[Msg, AlertEvent]:
        """The next alert this subscriber wants, with its message (to ack or nak)."""
        while True:
            if not self._fetched:
                self._fetched = await self._fetch()
            msg = self._fetched.pop(0)
            try:
                event = _ALERT.validate_json(msg.data)
            except ValidationError:
                await _quietly(msg.ack())  # not an alert (another writer's message): skip it
                continue
            with contextlib.suppress(ValueError, AttributeError, nats.errors.Error):
                self._resume_at = msg.metadata.sequence.stream + 1
            session = _session_of(event)
            if self.sessions and session is not None and session not in self.sessions:
                await _quietly(msg.ack())
                continue
            return msg, event

    async def _follow(self) -> AsyncGenerator[AlertEvent, None]:
        try:
            while True:
                msg, event = await self._next()
                self._in_hand = msg
                yield event
                # Asked for the next one: this one was handled.
                self._in_hand = None
                await _quietly(msg.ack())
        finally:
            if not self._closing:
                # The loop was left without `close()` (a plain `async for` ended by
                # `break` or an error, or the generator collected): the event in
                # hand may not have been handled, so it goes back to the consumer.
                await self._finish(ack_in_hand=False)


async def _quietly(action: Awaitable[object]) -> None:
    with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError):
        await action


def subscribe(
    nc_or_js: NATS | JetStreamContext,
    prefix: str = "hub",
    *,
    durable: str | None = None,
    severities: Iterable[Severity] = (),
    kinds: Iterable[str] = (),
    sessions: Iterable[str] = (),
    include_mappings: bool = False,
    include_deadletters: bool = False,
    since: datetime | Literal["all"] | None = None,
) -> Alerts:
    """Follow the hub's detection events (and mapping events with `include_mappings`,
    dead-letter announcements with `include_deadletters`).

    A pull consumer on `HUB_OUT` (`{PREFIX}_OUT`) filtered by `severities`
    (high/medium/low) and `kinds` (`model_degradation`, case folded); `sessions`
    are filtered here, after fetching. Delivers `DetectionEvent`,
    `DetectionEscalatedEvent`, `MappingEvent` or `DeadLetterEvent` in stream order.

    - `durable="name"`: the consumer outlives the subscriber, so one that was
      offline catches up where it stopped. `since` only matters when it is
      created; changed filters apply from just after the last event it acked.
      Two subscribers under one durable name share (split) its events: give
      each follower its own name.
    - `durable=None`: an ephemeral consumer, deleted when the subscriber closes.
    - `since`: `None` delivers what is published from now on, `"all"` the whole
      stream, a datetime what was published from then on.

    The follower waits through empty pulls, timeouts and NATS reconnects (give
    the connection `max_reconnect_attempts=-1`); it ends only when the
    connection is closed or it is cancelled.

    Two ways to take the events, both acking an event only once it was handled:

    - `await alerts.handle(handler)`: the handler is called for each event and
      the event acked when it returns; one that raises leaves it unacked (see
      `Alerts.handle`).
    - `async for event in alerts` inside `async with`: an event is acked when the
      loop asks for the next one, or when `async with` is left normally (`break`
      included). Left by an exception, the event in hand is handed back, so a
      durable consumer delivers it again. (A plain `async for` without `async with`
      hands the event in hand back whenever the loop is left.)

    Entering `async with` creates the consumer at once (so nothing published
    afterwards is missed) and leaving it closes everything::

        async with subscribe(nc, "hub", durable="escalations", severities=["high"]) as alerts:
            async for event in alerts:
                if isinstance(event, DetectionEscalatedEvent):
                    print("worse:", event.previous_severity, "->", event.detection.severity)
    """
    return Alerts(
        nc_or_js,
        prefix=prefix,
        durable=durable,
        severities=severities,
        kinds=kinds,
        sessions=sessions,
        include_mappings=include_mappings,
        include_deadletters=include_deadletters,
        since=since,
    )
