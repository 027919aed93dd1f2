"""Lanes: ordered slices of the inbound stream, each owned by one worker at a time.

Per-session order across many workers: the stream's subject transform puts
every event of a session into one partition, each partition is read by its
own durable consumer, and each consumer is read by one worker at a time —
the one holding the lane's advisory lock, on the very connection that runs
the lane's transactions. If that connection dies the lock is gone, and so is
the ability to commit: there is no window where two workers apply events of
one lane. Within a lane, messages are applied one after another in stream
order.

Workers share the lanes fairly: each live worker (counted through member
slots, also advisory locks) owns at most ceil(lanes / workers); one that
owns more hands the surplus back after the batch in hand.

A hung owner (stopped with SIGSTOP, say) keeps its connections, hence its
locks: the kernel answers keepalives for it. So each lane manager beats in
`worker_heartbeats` from its control connection and tags every connection it
opens with its worker id; a peer that finds a beat older than
LANE_OWNER_SILENT_SECONDS terminates that worker's tagged backends, which
releases its lanes and its member slot (and the leaderships of the relay, the
sweep and the janitor, whose connections carry the same tag), and claims the
lanes as usual. The hung worker, resuming, finds its connections dead: nothing
it had in hand can commit, its lanes end with LaneLost and it rejoins.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass, field
from uuid import uuid4

import asyncpg
import nats.js.errors
import structlog
from nats.aio.msg import Msg

from worker import db
from worker.bus import Bus, StandingPull
from worker.connection import NATS_ERRORS
from worker.constants import (
    GROUP_ALONE_AFTER_SECONDS,
    LANE_CLAIM_INTERVAL_SECONDS,
    LANE_OWNER_BEAT_SECONDS,
    LANE_OWNER_SILENT_SECONDS,
    MEMBER_SLOTS,
    RECONNECT_BASE_SECONDS,
    RECONNECT_MAX_SECONDS,
    REPAIR_AFTER_FAILURES,
    TURN_WAIT_SECONDS,
)
from worker.groups import CommitGroups
from worker.handler import BatchGroups, LaneLost, MessageHandler
from worker.leadership import close_quietly
from worker.locks import MEMBER_KEY_BASE
from worker.metrics import Metrics
from worker.partitions import Lane
from worker.retry import Backoff, pause
from worker.wire import delivery

log = structlog.get_logger("worker.lanes")

# The lane's connection is gone: the lock went with it.
_LANE_ENDING_ERRORS: tuple[type[Exception], ...] = (LaneLost, *db.CONNECTION_ERRORS)


@dataclass
class Progress:
    """How an owned lane moves, from its consumer info as sampled (worker.app).

    The lane advances when its ack floor moves (a message settled, acked or
    terminated). `since` is when it last advanced or was seen with nothing
    waiting (monotonic seconds), starting at the claim.
    """

    since: float = field(default_factory=time.monotonic)
    floor: int | None = None
    waiting: int = 0

    def observe(self, floor: int, waiting: int, now: float) -> None:
        if waiting == 0 or (self.floor is not None and floor != self.floor):
            self.since = now
        self.floor, self.waiting = floor, waiting

    def idle_seconds(self, now: float) -> float:
        """Seconds messages have waited on the lane without it advancing (0: none wait)."""
        return 0.0 if self.waiting == 0 else max(0.0, now - self.since)


@dataclass
class _Owned:
    lane: Lane
    conn: db.Connection
    release: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    progress: Progress = field(default_factory=Progress)


class Turnstile:
    """Turns for the batch transactions of one worker's lanes: at most `turns` at once.

    At a steady rate every lane would otherwise apply what arrived during its
    previous batch, a few events, in a transaction of its own, all lanes at
    once, each paying its ~14 statements and commit whatever its size, and all
    of them competing for the same cores (docs/performance.md). A turn is taken
    by the leader of a group of batches (worker.groups), which the lanes
    arriving while it waits join: fewer, larger transactions, each one quicker.
    The wait is bounded (`wait_seconds`): a transaction that keeps its turn for
    long (waiting out a locked database) holds the others up for no longer than
    that, after which they go without a turn; so no message waits anywhere near
    its ack wait, and nothing can deadlock on a turn. Turns are handed over in
    arrival order. `turns` 0: no limit. A full batch takes none (worker.groups).
    """

    def __init__(self, turns: int, wait_seconds: float | None = None) -> None:
        self.turns = turns
        self.wait_seconds = TURN_WAIT_SECONDS if wait_seconds is None else wait_seconds
        self._free = turns
        self._waiting: deque[asyncio.Future[bool]] = deque()
        self.waited = 0  # turns that were not free at once
        self.skipped = 0  # waits that ran out: the lane went without its turn

    def __repr__(self) -> str:
        return (
            f"<Turnstile free={self._free}/{self.turns} waiting={len(self._waiting)}"
            f" waited={self.waited} skipped={self.skipped}>"
        )

    async def acquire(self) -> bool:
        """Wait for a turn, at most `wait_seconds`; False: none came (nor is one held)."""
        if self.turns <= 0:
            return False
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return True
        self.waited += 1
        loop = asyncio.get_running_loop()
        granted: asyncio.Future[bool] = loop.create_future()
        self._waiting.append(granted)
        timer = loop.call_later(self.wait_seconds, self._expire, granted)
        try:
            held = await granted
        except BaseException:
            # Cancelled: a turn handed over just before must not be lost with us.
            if granted.done() and not granted.cancelled() and granted.result():
                self.release()
            else:
                self._forget(granted)
            raise
        finally:
            timer.cancel()
        if not held:
            self.skipped += 1
        return held

    def _expire(self, granted: asyncio.Future[bool]) -> None:
        if not granted.done():
            granted.set_result(False)
        self._forget(granted)

    def _forget(self, granted: asyncio.Future[bool]) -> None:
        with contextlib.suppress(ValueError):
            self._waiting.remove(granted)

    def release(self) -> None:
        # Handed straight to the first waiter still waiting, so a lane arriving
        # just now cannot take it before those that waited.
        while self._waiting:
            granted = self._waiting.popleft()
            if not granted.done():
                granted.set_result(True)
                return
        self._free += 1


@dataclass(frozen=True)
class Stuck:
    durable: str
    waiting: int
    idle_seconds: float


class LaneManager:
    """Claims lanes for this worker and runs one task per owned lane."""

    def __init__(
        self,
        dsn: str,
        bus: Bus,
        handler: MessageHandler,
        lock_namespace: int,
        lanes: list[Lane],
        metrics: Metrics,
        batch_max: int,
        turns: int = 0,
    ) -> None:
        self.dsn = dsn
        self.bus = bus
        self.handler = handler
        self.namespace = lock_namespace
        self.lanes = {lane.key: lane for lane in lanes}
        self.owned: dict[int, _Owned] = {}
        self.metrics = metrics
        self.batch_max = batch_max
        # Batch transactions of this worker's lanes at once (0: no limit), each
        # applying the batches of the lanes that arrived together (worker.groups).
        self.turnstile = Turnstile(turns)
        self.groups: BatchGroups = CommitGroups(
            self.turnstile,
            Turnstile(1 if turns else 0),
            batch_max,
            GROUP_ALONE_AFTER_SECONDS,
            observe=lambda outcome: metrics.batch_groups.labels(outcome).inc(),
        )
        self.handled = 0
        # Tags every connection of this manager (application_name), so that a peer
        # can end them all should this worker stop beating.
        self.worker_id = uuid4().hex[:12]

    def __repr__(self) -> str:
        return (
            f"<LaneManager {self.worker_id} owned={sorted(self.owned)} handled={self.handled}"
            f" {self.turnstile!r} {self.groups!r}>"
        )

    def application_name(self, role: str) -> str:
        return f"hub-worker:{role}@{self.worker_id}"

    def reporting(self, key: int) -> Progress | None:
        """The lane's progress if this worker owns it and reports it, else None.

        A lane being handed over (or whose connection is gone) is not reported:
        its next owner may report it already, and a sum over replicas must
        count each lane once.
        """
        owned = self.owned.get(key)
        if owned is None or owned.release.is_set() or owned.conn.is_closed():
            return None
        return owned.progress

    def stuck(self, now: float, after_seconds: float) -> list[Stuck]:
        """Owned lanes with messages waiting that have not advanced for `after_seconds`."""
        found = []
        for key in sorted(self.owned):
            progress = self.reporting(key)
            if progress is not None and (idle := progress.idle_seconds(now)) >= after_seconds:
                found.append(Stuck(self.lanes[key].durable, progress.waiting, idle))
        return found

    async def run(self, stopping: asyncio.Event) -> None:
        backoff = Backoff(RECONNECT_BASE_SECONDS, RECONNECT_MAX_SECONDS, stopping=stopping)
        control: db.Connection | None = None
        beaten_at = round_at = time.monotonic()
        try:
            while not stopping.is_set():
                try:
                    now = time.monotonic()
                    # This loop itself was held up (a starved event loop, a slow
                    # reconnect): others may look silent only because we did not
                    # look for a while. Beat, but judge nobody this round.
                    held_up = now - round_at > LANE_OWNER_SILENT_SECONDS / 2
                    round_at = now
                    if control is None or control.is_closed():
                        control = await db.connect(
                            self.dsn, application_name=self.application_name("lanes")
                        )
                        await db.beat(control, self.worker_id)  # before any lane is ours
                        beaten_at = time.monotonic()
                        await self._join(control)
                    elif held_up or now - beaten_at >= LANE_OWNER_BEAT_SECONDS:
                        await db.beat(control, self.worker_id)
                        beaten_at = time.monotonic()
                    if not held_up:
                        await self._end_silent_workers(control)
                    await self._rebalance(control)
                    backoff.succeeded()
                except db.CONNECTION_ERRORS as err:
                    delay = backoff.failed()
                    log.warning(
                        "lanes.database_unreachable",
                        action="lanes.claim",
                        error=str(err),
                        retry_in=delay,
                    )
                    if control is not None:
                        await close_quietly(control)
                        control = None
                    await backoff.sleep(delay)
                    continue
                self._reap()
                await pause(stopping, LANE_CLAIM_INTERVAL_SECONDS)
        finally:
            for owned in self.owned.values():
                owned.release.set()
            await asyncio.gather(
                *(o.task for o in self.owned.values() if o.task), return_exceptions=True
            )
            if control is not None:
                if not control.is_closed():
                    with contextlib.suppress(*db.CONNECTION_ERRORS):
                        await db.forget_worker(control, self.worker_id)
                await close_quietly(control)

    async def _end_silent_workers(self, control: db.Connection) -> None:
        """End the lane connections of workers that stopped beating, freeing their lanes."""
        try:
            silent = await db.silent_workers(control, LANE_OWNER_SILENT_SECONDS)
            for worker_id in silent:
                if worker_id == self.worker_id:
                    continue  # we just beat: a row of ours read before that
                ended = await db.end_silent_worker(control, worker_id, LANE_OWNER_SILENT_SECONDS)
                (log.warning if ended else log.info)(
                    "lanes.silent_worker_ended",
                    action="lanes.take_over",
                    worker=worker_id,
                    backends_terminated=ended,
                    silent_after_seconds=LANE_OWNER_SILENT_SECONDS,
                )
        except asyncpg.PostgresError as err:
            if isinstance(err, db.CONNECTION_ERRORS) and not isinstance(
                err, asyncpg.InsufficientPrivilegeError
            ):
                raise
            # Not worth the lanes: a refusal here (a missing grant, say) leaves that
            # worker's lanes where they are; look again next round.
            log.warning(
                "lanes.silent_worker_not_ended",
                action="lanes.take_over",
                error=f"{type(err).__name__}: {err}",
            )

    async def _join(self, control: db.Connection) -> None:
        """Take a member slot so that other workers count this one."""
        for slot in range(MEMBER_SLOTS):
            if await db.try_lock(control, self.namespace, MEMBER_KEY_BASE + slot):
                log.info(
                    "lanes.joined",
                    action="lanes.join",
                    member_slot=slot,
                    worker=self.worker_id,
                )
                return
        log.warning("lanes.no_member_slot", action="lanes.join")

    async def _rebalance(self, control: db.Connection) -> None:
        members = await db.held_locks(
            control, self.namespace, MEMBER_KEY_BASE, MEMBER_KEY_BASE + MEMBER_SLOTS
        )
        share = math.ceil(len(self.lanes) / max(1, len(members)))
        mine = sorted(k for k, o in self.owned.items() if not o.release.is_set())
        for key in mine[share:]:
            log.info("lane.handing_over", action="lane.release", lane=self.lanes[key].durable)
            self.owned[key].release.set()
        if len(mine) >= share:
            return
        held = await db.held_locks(control, self.namespace, min(self.lanes), max(self.lanes) + 1)
        for key in sorted(set(self.lanes) - held - set(self.owned))[: share - len(mine)]:
            conn = await db.connect(
                self.dsn,
                application_name=self.application_name(self.lanes[key].durable),
                by_keys=True,
            )
            locked = False
            try:
                locked = await db.try_lock(conn, self.namespace, key)
            finally:
                if not locked:
                    await close_quietly(conn)
            if not locked:
                continue
            owned = _Owned(self.lanes[key], conn)
            owned.task = asyncio.create_task(self._run_lane(owned), name=self.lanes[key].durable)
            self.owned[key] = owned

    async def _repair(self, lane: Lane, subscription: StandingPull) -> StandingPull:
        try:
            repaired = await _rebind(self.bus, lane, subscription, self.batch_max)
        except NATS_ERRORS as err:
            log.warning(
                "lane.repair_failed", action="lane.repair", lane=lane.durable, error=str(err)
            )
            return subscription
        log.info("lane.repaired", action="lane.repair", lane=lane.durable)
        return repaired

    def _reap(self) -> None:
        for key, owned in list(self.owned.items()):
            if owned.task is not None and owned.task.done():
                del self.owned[key]
                if not owned.task.cancelled() and (err := owned.task.exception()) is not None:
                    log.error(
                        "lane.crashed",
                        action="lane.crashed",
                        lane=owned.lane.durable,
                        error=f"{type(err).__name__}: {err}",
                    )

    async def _run_lane(self, owned: _Owned) -> None:
        lane, conn = owned.lane, owned.conn
        log.info("lane.owned", action="lane.claim", lane=lane.durable)
        subscription: StandingPull | None = None
        try:
            # The consumer numbers its deliveries 1, 2, 3...: a number skipped
            # is a delivery lost on the way (a NATS restart, a reconnect), or
            # taken by a previous owner that resumed after a hang, not knowing
            # yet that its lane is gone. The server would redeliver it only
            # after the ack wait, behind what follows, so the lane rewinds
            # instead of applying out of order. Counted from the take-over on.
            position = await self.bus.take_over(lane)
            next_delivery: int | None = position.next_delivery
            subscription = await self.bus.pull(lane, self.batch_max)
            # Exhausted after REPAIR_AFTER_FAILURES: then each failure repairs the lane.
            fetching = Backoff(
                RECONNECT_BASE_SECONDS,
                RECONNECT_MAX_SECONDS,
                stopping=owned.release,
                limit=REPAIR_AFTER_FAILURES,
            )
            while not owned.release.is_set():
                if conn.is_closed():
                    # Terminated (a peer took us for hung) or cut: the lock is
                    # gone, so is the lane. Fetch nothing more from its consumer.
                    raise LaneLost("the lane's database connection is closed")
                try:
                    # The turn of the transaction is taken afterwards, by the
                    # batch's group (worker.groups), which other lanes join
                    # while it waits.
                    batch = await subscription.take(self.batch_max)
                except TimeoutError:
                    continue
                except NATS_ERRORS as err:
                    delay = fetching.failed()
                    log.warning(
                        "lane.fetch_failed",
                        action="lane.fetch",
                        lane=lane.durable,
                        error=str(err) or type(err).__name__,
                        failures=fetching.failures,
                        retry_in=delay,
                    )
                    await fetching.sleep(delay)
                    if isinstance(err, nats.js.errors.NotFoundError) or fetching.exhausted:
                        # The consumer (or the stream) was deleted under us, or
                        # fetching keeps failing: recreate what is missing and
                        # bind afresh.
                        subscription = await self._repair(lane, subscription)
                    continue
                fetching.succeeded()
                deliveries = [delivery(m).consumer_sequence for m in batch]
                expected = deliveries[0] if next_delivery is None else next_delivery
                if deliveries != list(range(expected, expected + len(batch))):
                    log.warning(
                        "lane.delivery_gap",
                        action="lane.rewind",
                        lane=lane.durable,
                        expected=expected,
                        got=deliveries[:3],
                    )
                    await _give_back(batch)
                    position = await self.bus.take_over(lane)
                    next_delivery = position.next_delivery
                    subscription = await _rebind(self.bus, lane, subscription, self.batch_max)
                    continue
                next_delivery = deliveries[-1] + 1
                self.metrics.batch_size.observe(len(batch))
                try:
                    await self.handler.handle_batch(
                        conn,
                        batch,
                        owned.release,
                        acks_all=position.acks_all,
                        groups=self.groups,
                    )
                except LaneLost:
                    await _give_back(batch)
                    raise
                self.handled += len(batch)
        except _LANE_ENDING_ERRORS as err:
            log.warning("lane.lost", action="lane.lost", lane=lane.durable, error=str(err))
        except NATS_ERRORS as err:
            log.warning("lane.nats_failed", action="lane.lost", lane=lane.durable, error=str(err))
        finally:
            # What the standing pull buffered goes back before the lock does,
            # so the next owner is not left waiting out the ack wait for it.
            if subscription is not None:
                await subscription.close()
            # Stop reporting the lane before its lock goes: then its next owner
            # is the only one to report it.
            owned.release.set()
            self.metrics.forget_lane(lane.durable)
            if not conn.is_closed():
                with contextlib.suppress(*db.CONNECTION_ERRORS):
                    await db.unlock(conn, self.namespace, lane.key)
            await close_quietly(conn)
            log.info("lane.released", action="lane.release", lane=lane.durable)


async def _rebind(bus: Bus, lane: Lane, old: StandingPull, batch_max: int) -> StandingPull:
    await old.close()
    await bus.ensure_streams()
    await bus.ensure_consumer(lane)
    return await bus.pull(lane, batch_max)


async def _give_back(batch: list[Msg]) -> None:
    """Nak fetched messages that will not be handled here, so they come back soon."""
    for msg in batch:
        # One already acked (a batch redone one by one) refuses; go on with the rest.
        with contextlib.suppress(*NATS_ERRORS):
            await msg.nak()
