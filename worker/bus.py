"""The worker's JetStream side: its streams, the lanes' consumers, publishing windows.

Connecting (credentials, TLS, waiting for the server) is `worker.connection`; the
lanes themselves are `worker.partitions`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import re
from datetime import UTC, datetime
from typing import Any

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    StorageType,
    StreamConfig,
    SubjectTransform,
)

from worker.config import Settings
from worker.connection import NATS_ERRORS, ConnectionUnusable, ConnectionWatch, connect
from worker.constants import (
    ACK_WAIT_SECONDS,
    DUPLICATE_WINDOW_SECONDS,
    FETCH_WAIT_SECONDS,
    MAX_ACK_PENDING,
    PUBLISH_ACK_TIMEOUT_SECONDS,
    PULL_AHEAD_MIN,
    PULL_EXPIRES_SECONDS,
    PULL_EXPIRY_GRACE_SECONDS,
    PULL_MAX_BYTES,
)
from worker.partitions import Lane
from worker.subjects import (
    inbound_capture,
    outbound_captures,
    partition_transform,
    partitions_of,
)
from worker.wire import publication, send_publications

log = structlog.get_logger("worker.bus")

PullSubscription = JetStreamContext.PullSubscription
# The 409s with which nats-server ends a request that has max_bytes, besides
# the 408 of one that expired: each says what it leaves unserved.
_ENDED = frozenset({"Batch Completed", "Message Size Exceeds MaxBytes"})
_UNSERVED = "Nats-Pending-Messages"

# What the lanes' consumers are made with; one made with another (by an older
# version, before `all`) is recreated at its ack floor by `ensure_consumer`.
LANE_ACK_POLICY = AckPolicy.ALL
# A stored message's ack as nats-server writes it; any other reply is parsed as JSON.
_PLAIN_ACK = re.compile(
    rb'\{"stream":"[^"\\]*",(?:"domain":"[^"\\]*",)?"seq":\d+(?:,"duplicate": ?true)?\}'
)


@dataclasses.dataclass(frozen=True)
class Position:
    """A lane's consumer as a new owner takes it over."""

    next_delivery: int  # the consumer's next delivery number
    # The consumer acks all up to a message (AckPolicy.ALL): one ack per batch.
    # False for a consumer with explicit acks, which an older worker may still
    # make during a rolling upgrade: then every message is acked.
    acks_all: bool


class StandingPull:
    """A lane's pull requests, kept open ahead of it, as nats.go's `Consume` does.

    A pull per batch costs a round trip before the first message and, at a
    trickle, a request and a status per batch on the server. Here requests
    for `ahead` messages (2 x batch_max, at least PULL_AHEAD_MIN) stay open,
    each expiring after PULL_EXPIRES_SECONDS and bringing PULL_MAX_BYTES at
    most; `take` tops them up once half are taken, so the next batch is
    already in the client when a transaction ends. What the lane holds,
    buffered or still to come, never exceeds `ahead`.

    The server hands messages out round robin over the open requests and,
    since every request has max_bytes, ends each with a status: a 409 "Batch
    Completed" once served in full, a 408 at expiry, a 409 at its byte
    budget, each saying in Nats-Pending-Messages what it leaves unserved;
    another 409 when it drops them (consumer deleted, leadership change,
    shutdown). So the model keeps the total still owed and the expiry of each
    open request; it cannot tell which request a message served, nor needs to.
    It errs toward asking again: a status without the count, any other 409,
    a reconnect (a killed server cannot say its requests are gone) or a
    request past its expiry retires them all. Over-asking is harmless: the
    consumer's max_ack_pending bounds what it delivers. A 503 (no responders:
    the consumer or stream is gone) and any other error status are raised as
    nats-py's `fetch` raises them, for the lane's backoff and repair, once
    the messages taken before it are returned.

    Reads nats-py's pending queue directly (nats-py 2.16): `next_msg` creates
    a task and a timer per message.
    """

    def __init__(self, subscription: PullSubscription, batch_max: int) -> None:
        sub = subscription._sub
        assert sub is not None
        self._subscription = subscription
        self._sub = sub
        self._queue = sub._pending_queue
        self._ahead = max(2 * batch_max, PULL_AHEAD_MIN)
        # When each open request is past its expiry (monotonic), oldest first.
        self._requests: collections.deque[float] = collections.deque()
        self._owed = 0  # messages asked for and not yet taken
        self._reconnects = subscription._nc.stats["reconnects"]
        self._closed = False
        # An error status, raised once the messages taken before it are handled.
        self._failure: Exception | None = None

    @property
    def outstanding(self) -> int:
        """Messages asked for and not yet taken (buffered here, or still to come),
        as far as the model knows: what the standing pull holds the lane to."""
        return self._owed

    async def take(self, most: int) -> list[Msg]:
        """Up to `most` messages: those that are here, or the first to come.

        Waits at most FETCH_WAIT_SECONDS for one, then raises TimeoutError.
        """
        if self._closed:
            raise nats.errors.BadSubscriptionError("the lane's pull is closed")
        loop = asyncio.get_running_loop()
        give_up = loop.time() + FETCH_WAIT_SECONDS
        taken: list[Msg] = []
        while True:
            while len(taken) < most and not self._queue.empty() and self._failure is None:
                self._accept(self._queue.get_nowait(), taken)
            if taken:
                if self._failure is None:
                    # Ask for what follows now: it flows in while the lane works.
                    await self._top_up()
                return taken
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure
            await self._top_up()
            now = loop.time()
            if now >= give_up:
                raise TimeoutError
            wake = min(give_up, self._requests[0]) if self._requests else give_up
            try:
                async with asyncio.timeout_at(wake):
                    msg = await self._queue.get()
            except TimeoutError:
                continue
            self._accept(msg, taken)

    def _accept(self, msg: Msg, taken: list[Msg]) -> None:
        self._sub._pending_size -= len(msg.data)
        self._queue.task_done()
        status = JetStreamContext.is_status_msg(msg)
        if not status:
            taken.append(msg)
            self._owed = max(0, self._owed - 1)
            return
        headers = msg.headers or {}
        unserved = headers.get(_UNSERVED, "")
        if status == "408" or headers.get("Description") in _ENDED:
            # One request ended; which one does not matter, as the oldest
            # expires first and counts only its expiry.
            if self._requests and unserved.isdigit():
                self._requests.popleft()
                self._owed = max(0, self._owed - int(unserved))
            else:
                self._forget()
        elif status == "409":  # dropped by the server: all may be
            self._forget()
        elif status in ("100", "404"):  # a heartbeat; nothing (no_wait)
            pass
        else:  # 503 no responders, 400...: the lane's consumer cannot serve
            self._forget()
            self._failure = nats.js.errors.APIError.from_msg(msg)

    def _forget(self) -> None:
        """Take every request for gone: the next top-up asks for all of `ahead`."""
        self._requests.clear()
        self._owed = 0

    async def _top_up(self) -> None:
        nc = self._subscription._nc
        now = asyncio.get_running_loop().time()
        if nc.stats["reconnects"] != self._reconnects:
            # The server may have lost the requests with the connection.
            self._reconnects = nc.stats["reconnects"]
            self._forget()
        if self._requests and self._requests[0] <= now:
            self._forget()  # expired and its 408 lost
        outstanding = self.outstanding
        if outstanding > self._ahead // 2:
            return
        batch = self._ahead - outstanding
        request = json.dumps(
            {
                "batch": batch,
                "expires": int(PULL_EXPIRES_SECONDS * 1_000_000_000),
                # Bytes, as well as messages, are what a lane holds ahead: a
                # spoke's 1 MiB messages would otherwise fill the buffer past
                # nats-py's limit, whose drops would rewind the lane over and
                # over. One message as large as the server allows always fits.
                "max_bytes": max(PULL_MAX_BYTES, 2 * nc.max_payload),
            }
        ).encode()
        await nc.publish(self._subscription._nms, request, self._subscription._deliver)
        self._requests.append(now + PULL_EXPIRES_SECONDS + PULL_EXPIRY_GRACE_SECONDS)
        self._owed += batch

    async def close(self) -> None:
        """Give back what is buffered and stop receiving; requests left die with the inbox."""
        if self._closed:
            return
        self._closed = True
        while not self._queue.empty():
            msg = self._queue.get_nowait()
            self._sub._pending_size -= len(msg.data)
            self._queue.task_done()
            if not JetStreamContext.is_status_msg(msg):
                with contextlib.suppress(*NATS_ERRORS):
                    await msg.nak()
        self._forget()
        with contextlib.suppress(*NATS_ERRORS):
            await self._subscription.unsubscribe()


def age_seconds(stored: datetime | None) -> float:
    """Seconds since `stored` by this worker's clock, 0 for None (nothing waits)."""
    if stored is None:
        return 0.0
    return max(0.0, (datetime.now(UTC) - stored).total_seconds())


class Bus:
    """A NATS connection with JetStream, reconnecting forever on its own."""

    def __init__(self, nc: NATS, settings: Settings, watch: ConnectionWatch | None = None) -> None:
        self.nc = nc
        self._watch = watch or ConnectionWatch()
        self.js = nc.jetstream(timeout=PUBLISH_ACK_TIMEOUT_SECONDS)
        self.settings = settings
        # Acks of publish_window, matched by the last token of their inbox.
        self._acks: Subscription | None = None
        self._ack_prefix = ""
        self._ack_counter = 0
        self._ack_futures: dict[str, asyncio.Future[None]] = {}

    @classmethod
    async def connect(
        cls,
        settings: Settings,
        urls: list[str],
        name: str = "hub-worker",
        stopping: asyncio.Event | None = None,
    ) -> Bus:
        """Connect, waiting out an unreachable server (see `worker.connection.connect`)."""
        nc, watch = await connect(settings.nats_auth, urls, name, stopping)
        return cls(nc, settings, watch)

    async def ensure_streams(self) -> int:
        """Create PU_EVENTS and PU_OUT when missing; returns the inbound partition count.

        Existing streams keep their data. Their retention and replicas follow
        the configuration (HUB_STREAM_MAX_AGE_SECONDS, HUB_STREAM_REPLICAS), but
        the partition count of an existing PU_EVENTS is read from its transform,
        because moving a session to another partition while its events are in
        flight would break its order.
        """
        s = self.settings
        max_age = float(s.stream_max_age_seconds)
        try:
            info = await self.js.stream_info(s.events_stream)
            await self._reconcile(info.config)
            transform = info.config.subject_transform
            partitions = partitions_of(transform.dest if transform else None)
            if partitions != s.partitions:
                log.info(
                    "stream.partitions",
                    action="stream.ensure",
                    stream=s.events_stream,
                    partitions=partitions,
                    configured=s.partitions,
                )
        except nats.js.errors.NotFoundError:
            source, destination = partition_transform(s.subject_prefix, s.partitions)
            await self.js.add_stream(
                StreamConfig(
                    name=s.events_stream,
                    subjects=[inbound_capture(s.subject_prefix)],
                    storage=StorageType.FILE,
                    max_age=max_age,
                    max_msg_size=-1,
                    duplicate_window=DUPLICATE_WINDOW_SECONDS,
                    num_replicas=s.stream_replicas,
                    subject_transform=SubjectTransform(src=source, dest=destination),
                )
            )
            partitions = s.partitions
            log.info("stream.created", action="stream.ensure", stream=s.events_stream)
        try:
            await self._reconcile((await self.js.stream_info(s.out_stream)).config)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(
                StreamConfig(
                    name=s.out_stream,
                    subjects=outbound_captures(s.subject_prefix),
                    storage=StorageType.FILE,
                    max_age=max_age,
                    duplicate_window=DUPLICATE_WINDOW_SECONDS,
                    num_replicas=s.stream_replicas,
                )
            )
            log.info("stream.created", action="stream.ensure", stream=s.out_stream)
        return partitions

    async def _reconcile(self, config: StreamConfig) -> None:
        """Bring an existing stream's max age and replicas to the configured ones.

        A change the server refuses (more replicas than it has servers, say) is
        logged and left: the stream still works as it is.
        """
        max_age = float(self.settings.stream_max_age_seconds)
        replicas = self.settings.stream_replicas
        current = {"max_age": config.max_age, "num_replicas": config.num_replicas}
        wanted = {"max_age": max_age, "num_replicas": replicas}
        if current == wanted:
            return
        try:
            await self.js.update_stream(
                dataclasses.replace(config, max_age=max_age, num_replicas=replicas)
            )
        except nats.js.errors.APIError as err:
            log.warning(
                "stream.update_refused",
                action="stream.ensure",
                stream=config.name,
                current=current,
                configured=wanted,
                error=err.description or str(err),
            )
            return
        log.info(
            "stream.updated", action="stream.ensure", stream=config.name, was=current, now=wanted
        )

    def _consumer_config(self, lane: Lane, start_sequence: int | None = None) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=lane.durable,
            filter_subject=lane.filter_subject,
            # A lane applies in stream order, so one ack of a batch's last message
            # settles the batch (dead letters are terminated each before it).
            ack_policy=LANE_ACK_POLICY,
            ack_wait=ACK_WAIT_SECONDS,
            # Unlimited on the server: a cap there would drop messages silently
            # during a long outage. The worker itself gives up after
            # HANDLER_ATTEMPTS and dead-letters instead.
            max_deliver=-1,
            max_ack_pending=MAX_ACK_PENDING,
            deliver_policy=(
                DeliverPolicy.ALL if start_sequence is None else DeliverPolicy.BY_START_SEQUENCE
            ),
            opt_start_seq=start_sequence,
            num_replicas=self.settings.stream_replicas,
        )

    async def ensure_consumer(self, lane: Lane) -> None:
        """Create the lane's consumer when missing; reconcile one whose config cannot work.

        A consumer with another filter or ack policy (made by hand, or by an
        older version) would feed the lane the wrong messages or lose acks: it
        is recreated from its ack floor, keeping its position.
        """
        stream = self.settings.events_stream
        try:
            info = await self.js.consumer_info(stream, lane.durable)
        except nats.js.errors.NotFoundError:
            await self.js.add_consumer(stream, self._consumer_config(lane))
            log.info("consumer.created", action="consumer.ensure", consumer=lane.durable)
            return
        config = info.config
        if config.filter_subject == lane.filter_subject and config.ack_policy == LANE_ACK_POLICY:
            return
        start = await self._recreate_at_ack_floor(lane, info)
        log.warning(
            "consumer.reconciled",
            action="consumer.ensure",
            consumer=lane.durable,
            had_filter=config.filter_subject,
            had_ack_policy=str(config.ack_policy),
            from_sequence=start,
        )

    async def consumer_info(self, lane: Lane) -> ConsumerInfo:
        info: ConsumerInfo = await self.js.consumer_info(self.settings.events_stream, lane.durable)
        return info

    async def take_over(self, lane: Lane) -> Position:
        """Make the lane's consumer deliver in stream order from its ack floor;
        returns its next delivery number and ack policy.

        A previous owner that died holding unacked messages would have them
        redelivered only after the ack wait, behind newer ones: the session
        order would break. Recreating the consumer at the ack floor delivers
        them first; what was already applied is recognised by the ledger.
        """
        stream = self.settings.events_stream
        try:
            info = await self.js.consumer_info(stream, lane.durable)
        except nats.js.errors.NotFoundError:
            await self.ensure_consumer(lane)
            return Position(1, LANE_ACK_POLICY == AckPolicy.ALL)
        acks_all = info.config.ack_policy == AckPolicy.ALL
        if not info.num_ack_pending:
            return Position((info.delivered.consumer_seq if info.delivered else 0) + 1, acks_all)
        start = await self._recreate_at_ack_floor(lane, info)
        log.info(
            "consumer.rewound",
            action="consumer.take_over",
            consumer=lane.durable,
            from_sequence=start,
            unacked=info.num_ack_pending,
        )
        return Position(1, acks_all)

    async def _recreate_at_ack_floor(self, lane: Lane, info: ConsumerInfo) -> int:
        """Replace the lane's consumer by one that starts just after its ack floor;
        returns that first stream sequence."""
        start = (info.ack_floor.stream_seq if info.ack_floor else 0) + 1
        stream = self.settings.events_stream
        await self.js.delete_consumer(stream, lane.durable)
        await self.js.add_consumer(stream, self._consumer_config(lane, start_sequence=start))
        return start

    async def backlog_age(self, lanes: list[Lane]) -> float:
        """Seconds since the oldest inbound message not yet acked was stored (0: no backlog)."""
        oldest: datetime | None = None
        for lane in lanes:
            first = await self.oldest_unacked(lane)
            if first is not None and (oldest is None or first < oldest):
                oldest = first
        return age_seconds(oldest)

    async def oldest_unacked(self, lane: Lane, info: ConsumerInfo | None = None) -> datetime | None:
        """When the lane's oldest message not yet acked was stored (None: nothing waits).

        `info`: the lane's consumer info, when the caller has it already.
        """
        stream = self.settings.events_stream
        if info is None:
            info = await self.js.consumer_info(stream, lane.durable)
        if not info.num_pending and not info.num_ack_pending:
            return None
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        try:
            first = await self.js.get_msg(
                stream, seq=floor + 1, subject=lane.filter_subject, next=True
            )
        except nats.js.errors.NotFoundError:
            return None
        return first.time

    async def pull(self, lane: Lane, batch_max: int) -> StandingPull:
        """Bind to the lane's consumer, with pull requests kept open ahead of the lane."""
        subscription = await self.js.pull_subscribe_bind(lane.durable, self.settings.events_stream)
        return StandingPull(subscription, batch_max)

    async def out_stream_subjects(self) -> list[str] | None:
        """What PU_OUT captures, or None when the stream does not exist."""
        try:
            info = await self.js.stream_info(self.settings.out_stream)
        except nats.js.errors.NotFoundError:
            return None
        return list(info.config.subjects or [])

    async def publish_window(
        self, messages: list[tuple[str, bytes, str]]
    ) -> list[Exception | None]:
        """Publish (subject, payload, msg_id) in this order, then await all their acks.

        The messages leave on one connection in the order given, as one write
        (`wire.send_publications`), so the stream stores them in that order; each
        result is None (acked) or why not. A message that cannot be framed (see
        `wire.publication`) fails alone; the connection refusing the write fails
        them all. The acks come back on one inbox subscription of our own:
        nats-py's publish_async yields to the event loop once per message, which
        on a busy loop costs more than the publishing itself.
        """
        if self._acks is None:
            self._ack_prefix = self.nc.new_inbox()
            self._acks = await self.nc.subscribe(f"{self._ack_prefix}.*", cb=self._on_ack)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[None]] = []
        sent: dict[str, asyncio.Future[None]] = {}
        frames: list[bytes] = []
        max_payload = self.nc.max_payload
        for subject, payload, msg_id in messages:
            future: asyncio.Future[None] = loop.create_future()
            futures.append(future)
            self._ack_counter += 1
            token = str(self._ack_counter)
            try:
                frames.append(
                    publication(
                        subject, f"{self._ack_prefix}.{token}", msg_id, payload, max_payload
                    )
                )
            except nats.errors.Error as err:  # this message alone: the others still go
                future.set_exception(err)
                continue
            sent[token] = future
        try:
            if frames:
                self._ack_futures.update(sent)
                await send_publications(self.nc, frames)
        except NATS_ERRORS as err:
            # The connection will not take them (closed, reconnecting, full buffer).
            for token, future in sent.items():
                del self._ack_futures[token]
                future.set_exception(err)
            sent = {}
        if sent:
            _, late = await asyncio.wait(sent.values(), timeout=PUBLISH_ACK_TIMEOUT_SECONDS)
            for token, future in sent.items():
                if future in late:
                    del self._ack_futures[token]
                    future.set_exception(TimeoutError("no ack from JetStream in time"))
        results: list[Exception | None] = []
        for future in futures:
            error = future.exception()
            results.append(error if isinstance(error, Exception) else None)
        return results

    async def _on_ack(self, msg: Msg) -> None:
        future = self._ack_futures.pop(msg.subject.rsplit(".", 1)[1], None)
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        if _PLAIN_ACK.fullmatch(msg.data):
            # Most acks: a fifth of the CPU of parsing them.
            future.set_result(None)
            return
        try:
            reply = json.loads(msg.data)
        except ValueError as err:
            future.set_exception(err)
            return
        if "error" in reply:
            future.set_exception(api_error(reply["error"]))
        else:
            future.set_result(None)

    def raise_if_unusable(self) -> None:
        if self._watch.reason is not None:
            raise ConnectionUnusable(self._watch.reason)

    async def until_unusable(self, stopping: asyncio.Event) -> None:
        """Return when `stopping` is set; raise ConnectionUnusable if that comes first."""
        unusable = asyncio.ensure_future(self._watch.unusable.wait())
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({unusable, stop}, return_when="FIRST_COMPLETED")
        finally:
            unusable.cancel()
            stop.cancel()
        if not stopping.is_set():
            self.raise_if_unusable()

    async def close(self) -> None:
        if self.nc.is_closed:
            return
        try:
            await asyncio.wait_for(self.nc.drain(), timeout=5)
        except NATS_ERRORS:
            await self.nc.close()


def api_error(error: Any) -> nats.js.errors.APIError:
    """The error of a JetStream API reply (`{"code", "err_code", "description"}`).

    nats-py's `APIError.from_error` raises the error instead of returning it;
    raised inside an ack callback, it left the publish waiting for its timeout
    with the server's reason lost.
    """
    try:
        nats.js.errors.APIError.from_error(error)
    except nats.js.errors.APIError as err:
        return err
    except (KeyError, TypeError):  # not the shape nats-py expects
        pass
    return nats.js.errors.APIError(description=str(error))
