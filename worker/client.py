"""A small Python client of the hub: publish as a spoke, follow alerts.

`Spoke` publishes a spoke's session events (contract section 3), validated by
the same models the worker uses, with the `eventId` as `Nats-Msg-Id`, and waits
for JetStream's ack. `subscribe` follows the detection (and, on request,
mapping and dead-letter) events the worker publishes (section 5) through a
JetStream pull consumer on `HUB_OUT`, as typed models, acking each one only
once it was handled.

Publishing::

    async def main() -> None:
        async with await Spoke.connect("nats://127.0.0.1:4222", "laptop") as spoke:
            await spoke.session_spawned("sess-42", parent_session_id="coord-1", task="refactor")
            await spoke.signal("sess-42", "high_error_count", "high", details={"errors": 42})
            await spoke.session_completed("sess-42", reason="done")

Following high-severity alerts, catching up after being offline; an alert is
acked when `page` returns, and delivered again when it raises::

    async def page(event: AlertEvent) -> None:
        print(event.type, event.detection.anomaly_type, event.detection.session_id)

    async def main() -> None:
        nc = await nats.connect("nats://127.0.0.1:4222", max_reconnect_attempts=-1)
        async with subscribe(nc, durable="pager", severities=["high"]) as alerts:
            await alerts.handle(page)
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import re
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
)
from datetime import UTC, datetime
from types import TracebackType
from typing import Annotated, Any, Literal, Self, TypeVar
from uuid import UUID, uuid4

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import Field, TypeAdapter, ValidationError

from worker.config import stream_token
from worker.constants import MAX_EVENT_BYTES
from worker.domain import Lifecycle, Severity
from worker.events import (
    DeadLetterEvent,
    DetectionEscalatedEvent,
    DetectionEvent,
    EndedEvent,
    LifecycleEvent,
    MappingEvent,
    SignalEvent,
    SpawnedEvent,
)

__all__ = [
    "AlertEvent",
    "AlertHandler",
    "Alerts",
    "Spoke",
    "alert_filters",
    "out_stream",
    "publishable_headers",
    "stream_token",
    "subscribe",
]

_KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_SEVERITIES: tuple[Severity, ...] = ("high", "medium", "low")
# How long a publish waits for the stream's ack, seconds.
PUBLISH_TIMEOUT_SECONDS = 5.0
# Alerts: messages per pull, and how long one pull waits on the server, seconds.
FETCH_BATCH = 100
FETCH_WAIT_SECONDS = 5.0
# An ephemeral alerts consumer left behind by a client that died is removed
# by the server after this long, seconds.
EPHEMERAL_INACTIVE_SECONDS = 60.0
# A follower whose pulls fail (NATS away, the consumer gone) retries after a
# doubling pause up to this long, seconds, and binds afresh (recreating a
# consumer that vanished) after this many failures in a row.
FOLLOW_RETRY_MAX_SECONDS = 5.0
REPAIR_AFTER = 3

# Headers JetStream acts on at publish time: never copied onto a republished message.
_JETSTREAM_PUBLISH_HEADERS = ("nats-expected-", "nats-rollup", "nats-ttl", "nats-msg-id")

_E = TypeVar("_E", bound=LifecycleEvent | SpawnedEvent | EndedEvent | SignalEvent)


def out_stream(prefix: str) -> str:
    """The outbound stream of a hub: `HUB_OUT` for the prefix `hub`."""
    return f"{stream_token(prefix)}_OUT"


def _jetstream(nc_or_js: NATS | JetStreamContext) -> JetStreamContext:
    return nc_or_js if isinstance(nc_or_js, JetStreamContext) else nc_or_js.jetstream()


def publishable_headers(headers: Mapping[str, str] | None, msg_id: str) -> dict[str, str]:
    """Headers for republishing a stored message: JetStream's publish-time headers
    (expectations, rollups, TTLs, the old `Nats-Msg-Id`) dropped, a new `Nats-Msg-Id` set."""
    kept = {
        k: v
        for k, v in (headers or {}).items()
        if not k.lower().startswith(_JETSTREAM_PUBLISH_HEADERS)
    }
    return {**kept, "Nats-Msg-Id": msg_id}


# --- publishing as a spoke -------------------------------------------------------


class Spoke:
    """Publishes one spoke's session events to the hub.

    Every method validates the body with the worker's own models before it
    leaves (a `pydantic.ValidationError` or `ValueError` otherwise), fills
    `eventId` (a new uuid4 unless given) and `occurredAt` (now, UTC, unless
    given), sends the eventId as header `Nats-Msg-Id`, waits for JetStream's
    ack and returns the event as published::

        spoke = Spoke(nc, "laptop", prefix="hub")      # an open connection
        event = await spoke.heartbeat("sess-42")
        print(event.event_id)

    Publishing the same event again (same `event_id`) is safe: the stream's
    duplicate window and then the worker's ledger apply it once.
    """

    def __init__(
        self, nc_or_js: NATS | JetStreamContext, spoke_id: str, prefix: str = "hub"
    ) -> None:
        if not _ID_RE.fullmatch(spoke_id):
            raise ValueError(f"spoke id must match [A-Za-z0-9_-]{{1,128}}, got {spoke_id!r}")
        self.js = _jetstream(nc_or_js)
        self.spoke_id = spoke_id
        self.prefix = prefix
        self._owned: NATS | None = None

    @classmethod
    async def connect(
        cls, url: str | list[str], spoke_id: str, prefix: str = "hub", **options: Any
    ) -> Spoke:
        """Connect to NATS (`options` go to `nats.connect`); `close()` closes that connection.

        ::

            spoke = await Spoke.connect("nats://127.0.0.1:4222", "laptop")
            try:
                await spoke.session_started("sess-42")
            finally:
                await spoke.close()
        """
        nc = await nats.connect(servers=url, **options)
        spoke = cls(nc, spoke_id, prefix)
        spoke._owned = nc
        return spoke

    async def close(self) -> None:
        """Close the connection `connect` opened (a connection passed in is left open)."""
        if self._owned is not None and not self._owned.is_closed:
            await self._owned.drain()
        self._owned = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- lifecycle events --

    async def session_spawned(
        self,
        session_id: str,
        *,
        parent_session_id: str | None = None,
        workspace_id: str | None = None,
        task_id: str | None = None,
        task: str | None = None,
        metadata: dict[str, Any] | None = None,
        event_id: UUID | None = None,
        occurred_at: datetime | None = None,
    ) -> SpawnedEvent:
        """A session was spawned (creates its mapping)::

        await spoke.session_spawned("sess-42", parent_session_id="coord-1", task="refactor")
        """
        return await self._publish(
            SpawnedEvent,
            "spawned",
            session_id,
            {
                "parent_session_id": parent_session_id,
                "workspace_id": workspace_id,
                "task_id": task_id,
                "task": task,
            },
            metadata,
            event_id,
            occurred_at,
        )

    async def session_started(
        self,
        session_id: str,
        *,
        metadata: dict[str, Any] | None = None,
        event_id: UUID | None = None,
        occurred_at: datetime | None = None,
    ) -> LifecycleEvent:
        """The session started working: `await spoke.session_started("sess-42")`."""
        return await self._lifecycle("started", session_id, metadata, event_id, occurred_at)

    async def heartbeat(
        self,
        session_id: str,
        *,
        metadata: dict[str, Any] | None = None,
        event_id: UUID | None = None,
        occurred_at: datetime | None = None,
    ) -> LifecycleEvent:
        """The session is alive (keeps stall detection away): `await spoke.heartbeat("sess-42")`."""
        return await self._lifecycle("heartbeat", session_id, metadata, event_id, occurred_at)

    async def session_completed(
        self,
        session_id: str,
        reason: str | None = None,
        *,
        metadata: dict[str, Any] | None = None,
        event_id: UUID | None = None,
        occurred_at: datetime | None = None,
    ) -> EndedEvent:
        """The session ended well: `await spoke.session_completed("sess-42", reason="done")`."""
        return await self._ended("completed", session_id, reason, metadata, event_id, occurred_at)

    async def session_failed(
        self,
        session_id: str,
        reason: str | None = None,
        *,
        metadata: dict[str, Any] | None = None,
        event_id: UUID | None = None,
        occurred_at: datetime | None = None,
    ) -> EndedEvent:
        """The session failed: `await spoke.session_failed("sess-42", reason="OOM")`."""
        return await self._ended("failed", session_id, reason, metadata, event_id, occurred_at)

    async def session_aborted(
        self,
        session_id: str,
        reason: str | None = None,
        *,
        metadata: dict[str, Any] | None = None,
        event_id: UUID | None = None,
        occurred_at: datetime | None = None,
    ) -> EndedEvent:
        """The session was stopped: `await spoke.session_aborted("sess-42", reason="cancelled")`."""
        return await self._ended("aborted", session_id, reason, metadata, event_id, occurred_at)

    async def session_archived(
        self,
        session_id: str,
        *,
        metadata: dict[str, Any] | None = None,
        event_id: UUID | None = None,
        occurred_at: datetime | None = None,
    ) -> LifecycleEvent:
        """The session is closed for good (resolves its detections):
        `await spoke.session_archived("sess-42")`."""
        return await self._lifecycle("archived", session_id, metadata, event_id, occurred_at)

    async def lifecycle(
        self,
        lifecycle: Lifecycle,
        session_id: str,
        *,
        metadata: dict[str, Any] | None = None,
        event_id: UUID | None = None,
        occurred_at: datetime | None = None,
        **fields: Any,
    ) -> LifecycleEvent | SpawnedEvent | EndedEvent:
        """Any lifecycle event by name, with its own keys as `fields` (snake_case)::

        await spoke.lifecycle("failed", "sess-42", reason="OOM")
        """
        model: type[LifecycleEvent] | type[SpawnedEvent] | type[EndedEvent]
        if lifecycle == "spawned":
            model = SpawnedEvent
        elif lifecycle in ("completed", "failed", "aborted"):
            model = EndedEvent
        else:
            model = LifecycleEvent
        return await self._publish(
            model, lifecycle, session_id, fields, metadata, event_id, occurred_at
        )

    # -- signals --

    async def signal(
        self,
        session_id: str,
        kind: str,
        severity: Severity,
        details: dict[str, Any] | None = None,
        fingerprint: str | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        event_id: UUID | None = None,
        occurred_at: datetime | None = None,
    ) -> SignalEvent:
        """A heuristic signal; `kind` like `model_degradation` (upper case is folded)::

        await spoke.signal("sess-42", "model_degradation", "high", details={"score": 0.2})
        """
        token = kind.lower()
        if not _KIND_RE.fullmatch(token):
            raise ValueError(f"signal kind must match [a-z][a-z0-9_]{{0,63}}, got {kind!r}")
        return await self._publish(
            SignalEvent,
            f"signal.{token}",
            session_id,
            {"severity": severity, "details": details, "fingerprint": fingerprint},
            metadata,
            event_id,
            occurred_at,
        )

    # -- internals --

    async def _lifecycle(
        self,
        lifecycle: Literal["started", "heartbeat", "archived"],
        session_id: str,
        metadata: dict[str, Any] | None,
        event_id: UUID | None,
        occurred_at: datetime | None,
    ) -> LifecycleEvent:
        return await self._publish(
            LifecycleEvent, lifecycle, session_id, {}, metadata, event_id, occurred_at
        )

    async def _ended(
        self,
        lifecycle: Literal["completed", "failed", "aborted"],
        session_id: str,
        reason: str | None,
        metadata: dict[str, Any] | None,
        event_id: UUID | None,
        occurred_at: datetime | None,
    ) -> EndedEvent:
        return await self._publish(
            EndedEvent, lifecycle, session_id, {"reason": reason}, metadata, event_id, occurred_at
        )

    async def _publish(
        self,
        model: type[_E],
        tail: str,
        session_id: str,
        fields: Mapping[str, Any],
        metadata: dict[str, Any] | None,
        event_id: UUID | None,
        occurred_at: datetime | None,
    ) -> _E:
        event = model.model_validate(
            {
                **fields,
                "event_id": event_id or uuid4(),
                "occurred_at": occurred_at or datetime.now(UTC),
                "spoke_id": self.spoke_id,
                "session_id": session_id,
                "metadata": metadata,
            }
        )
        assert isinstance(event, model)
        body = event.model_dump(mode="json", exclude_none=True)
        # RFC 3339 with a numeric offset (`+00:00`), as the contract's examples write it.
        body["occurredAt"] = event.occurred_at.isoformat()
        try:
            payload = json.dumps(
                body, ensure_ascii=False, allow_nan=False, separators=(",", ":")
            ).encode()
        except ValueError as err:
            raise ValueError(f"the event is not valid JSON: {err}") from None
        if len(payload) > MAX_EVENT_BYTES:
            raise ValueError(
                f"the event is {len(payload)} bytes, over the hub's limit of {MAX_EVENT_BYTES}"
            )
        subject = f"{self.prefix}.spoke.{self.spoke_id}.session.{session_id}.{tail}"
        await self.js.publish(
            subject,
            payload,
            timeout=PUBLISH_TIMEOUT_SECONDS,
            headers={"Nats-Msg-Id": str(event.event_id)},
        )
        return event


# --- following alerts -------------------------------------------------------------

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
        if severity not in _SEVERITIES:
            raise ValueError(f"severity must be high, medium or low, got {severity!r}")
    tokens = sorted({k.lower() for k in kinds})
    for token in tokens:
        if not _KIND_RE.fullmatch(token):
            raise ValueError(f"kind must match [a-z][a-z0-9_]{{0,63}}, got {token!r}")
    ids = sorted(set(sessions))
    for session_id in ids:
        if not _ID_RE.fullmatch(session_id):
            raise ValueError(f"session id must match [A-Za-z0-9_-]{{1,128}}, got {session_id!r}")
    if not sevs and not tokens:
        filters = [f"{prefix}.detection.>"]
    else:
        filters = [
            f"{prefix}.detection.*.{severity}.{kind}"
            for severity, kind in itertools.product(sevs or ["*"], tokens or ["*"])
        ]
    if include_mappings:
        filters += [f"{prefix}.mapping.*.{s}" for s in ids] or [f"{prefix}.mapping.>"]
    if include_deadletters:
        filters.append(f"{prefix}.deadletter.>")
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
        if durable is not None and not _ID_RE.fullmatch(durable):
            raise ValueError(f"durable name must match [A-Za-z0-9_-]{{1,128}}, got {durable!r}")
        self.js = _jetstream(nc_or_js)
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
        failures = 0
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
                failures += 1
                await asyncio.sleep(min(FOLLOW_RETRY_MAX_SECONDS, 0.2 * 2**failures))
                if isinstance(err, nats.js.errors.NotFoundError) or failures >= REPAIR_AFTER:
                    with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, OSError):
                        await self._repair()
                continue
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
