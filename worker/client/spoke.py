"""Publishing as a spoke: `Spoke`, and the headers of a republished message."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self, TypeVar
from uuid import UUID

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from worker.constants import MAX_EVENT_BYTES
from worker.domain import Lifecycle, Severity
from worker.events import EndedEvent, LifecycleEvent, SignalEvent, SpawnedEvent, lifecycle_model
from worker.ids import uuid7
from worker.subjects import ID_PATTERN, KIND_PATTERN, inbound_subject, is_id, is_kind, signal_event

# How long a publish waits for the stream's ack, seconds.
PUBLISH_TIMEOUT_SECONDS = 5.0

# Headers JetStream acts on at publish time: never copied onto a republished message.
_JETSTREAM_PUBLISH_HEADERS = ("nats-expected-", "nats-rollup", "nats-ttl", "nats-msg-id")

_E = TypeVar("_E", bound=LifecycleEvent | SpawnedEvent | EndedEvent | SignalEvent)


def as_jetstream(nc_or_js: NATS | JetStreamContext) -> JetStreamContext:
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
    `eventId` (a new time-ordered UUID, version 7, unless given) and
    `occurredAt` (now, UTC, unless given), sends the eventId as header
    `Nats-Msg-Id`, waits for JetStream's ack and returns the event as published::

        spoke = Spoke(nc, "laptop", prefix="hub")      # an open connection
        event = await spoke.heartbeat("sess-42")
        print(event.event_id)

    Publishing the same event again (same `event_id`) is safe: the stream's
    duplicate window and then the worker's ledger apply it once.
    """

    def __init__(
        self, nc_or_js: NATS | JetStreamContext, spoke_id: str, prefix: str = "hub"
    ) -> None:
        if not is_id(spoke_id):
            raise ValueError(f"spoke id must match {ID_PATTERN}, got {spoke_id!r}")
        self.js = as_jetstream(nc_or_js)
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
        return await self._publish(
            lifecycle_model(lifecycle),
            lifecycle,
            session_id,
            fields,
            metadata,
            event_id,
            occurred_at,
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
        if not is_kind(token):
            raise ValueError(f"signal kind must match {KIND_PATTERN}, got {kind!r}")
        return await self._publish(
            SignalEvent,
            signal_event(token),
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
                "event_id": event_id or uuid7(),
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
        subject = inbound_subject(self.prefix, self.spoke_id, session_id, tail)
        await self.js.publish(
            subject,
            payload,
            timeout=PUBLISH_TIMEOUT_SECONDS,
            headers={"Nats-Msg-Id": str(event.event_id)},
        )
        return event
