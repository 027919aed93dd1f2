"""A hub that stops moving says so, and a hung replica's lanes move (issue 12, finding 8).

- a lane wedged on a table lock turns /readyz not-ready, naming the lane;
- a worker process stopped with SIGSTOP keeps its connections and advisory locks:
  a peer ends them after LANE_OWNER_SILENT_SECONDS and applies its lanes, and the
  stopped one, resumed, applies nothing twice and rejoins;
- the per-lane gauges are reported by each lane's owner only (a sum over replicas
  counts each lane once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import pytest

import worker.app
from tests.integration.test_operations import probe, samples
from tests.integration.test_workers import (
    assert_outbound_matches_tables,
    assert_tables_match,
    publish_all,
)
from tests.support import READY, Hub, WorkerProcess, wait_until
from tests.support.workload import Published, expect, generate
from worker import db, schema
from worker.config import Settings
from worker.constants import LANE_OWNER_BEAT_SECONDS, LANE_OWNER_SILENT_SECONDS
from worker.embedded import free_port
from worker.locks import LANE_KEY_BASE, namespace

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # No stall sweep during these tests: the workload's timestamps are old, and its
    # expectation leaves the sweep out.
    return dataclasses.replace(settings, sweep_interval_seconds=3600)


# Outcomes of an event applied (recorded in the ledger), as opposed to a duplicate.
_RECORDED = {"applied", "ignored", "conflict", "late"}


async def lane_owners(hub: Hub) -> dict[str, set[str]]:
    """Worker id -> the lanes it holds the lock of, from the database."""
    rows = await hub.rows(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
        " AND l.classid::bigint = $1 AND l.objid::bigint BETWEEN $2 AND $3",
        namespace(hub.prefix),
        LANE_KEY_BASE,
        LANE_KEY_BASE + hub.settings.partitions,
    )
    owners: dict[str, set[str]] = {}
    for row in rows:
        # hub-worker:<role>@<worker id>@<host:pid> (the last part added by db.tagged)
        role, worker_id = row["application_name"].removeprefix("hub-worker:").split("@")[:2]
        owners.setdefault(worker_id, set()).add(role)
    return owners


def all_lanes(hub: Hub) -> set[str]:
    return {"hub-worker"} | {f"hub-worker-p{n}" for n in range(hub.settings.partitions)}


def log_events(process: WorkerProcess, event: str, after_line: int = 0) -> list[dict[str, object]]:
    found = []
    for line in process.log().splitlines()[after_line:]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == event:
            found.append(entry)
    return found


def worker_id_of(process: WorkerProcess) -> str:
    joined = log_events(process, "lanes.joined")
    assert joined, "the worker has not joined"
    return str(joined[0]["worker"])


def sessions_between(stream: list[Published], start: int, stop: int) -> list[Published]:
    """The events of sessions sess-{start}..sess-{stop - 1}, in stream order."""
    return [e for e in stream if start <= int(e.session.removeprefix("sess-")) < stop]


async def test_a_wedged_lane_turns_readyz_not_ready_naming_it(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker.app, "LANE_STUCK_AFTER_SECONDS", 3.0)
    port = free_port()
    await hub.start_worker(http_addr=f"127.0.0.1:{port}")

    async def ready() -> bool:
        return (await probe(port, "/readyz"))[0] == 200

    await wait_until(ready, what="/readyz 200")
    locker = await db.connect(hub.database_url, application_name="tests:locker")
    wedge = locker.transaction()
    await wedge.start()
    try:
        # What ALTER TABLE or VACUUM FULL takes: the lane's batch waits on it.
        await locker.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        await hub.send("sp1", "s1", "spawned")
        stored = await hub.js.get_msg(hub.settings.events_stream, seq=1)
        assert stored.subject is not None
        lane = f"hub-worker-p{stored.subject.split('.')[2]}"  # P.part.N.spoke...

        async def wedged() -> bool:
            status, body = await probe(port, "/readyz")
            return status == 503 and isinstance(body, dict) and body["checks"]["lanes"] != "ok"

        await wait_until(wedged, within=15, what="/readyz 503 naming the lane")
        _, body = await probe(port, "/readyz")
        assert isinstance(body, dict)
        said = body["checks"]["lanes"]
        assert said.startswith(f"lane {lane} has 1 messages waiting and has not advanced for ")
        others = {k: v for k, v in body["checks"].items() if k != "lanes"}
        assert others == {k: v for k, v in READY.items() if k != "lanes"}

        async def gauge(name: str) -> float:
            _, text = await probe(port, "/metrics")
            assert isinstance(text, str)
            return samples(text)[(name, (("lane", lane),))]

        async def idle_exported() -> bool:  # sampled every METRICS_SAMPLE_SECONDS
            return await gauge("hub_worker_lane_idle_seconds") >= 3

        await wait_until(idle_exported, within=5, what="the idle gauge")
        _, text = await probe(port, "/metrics")
        assert isinstance(text, str)
        gauges = samples(text)
        assert gauges[("hub_worker_lane_lag_seconds", (("lane", lane),))] >= 3
        assert gauges[("hub_worker_lane_pending_messages", (("lane", lane),))] == 1
    finally:
        await wedge.rollback()
        await locker.close()
    await wait_until(ready, within=15, what="/readyz 200 after the lock is released")
    assert await hub.value("SELECT count(*) FROM processed_events") == 1


async def test_a_stopped_replicas_lanes_move_to_the_live_one_and_nothing_is_applied_twice(
    hub: Hub, summary: Callable[[str], None]
) -> None:
    stream = generate(sessions=80, seed=41)
    before, during = sessions_between(stream, 0, 40), sessions_between(stream, 40, 80)
    first = hub.spawn_worker_process()
    await hub.wait_ready()
    second = hub.spawn_worker_process()

    async def split_between_both() -> bool:
        # Settled: both own lanes, none is still being handed over (held by both
        # in turn), each within its fair share.
        owners = await lane_owners(hub)
        share = math.ceil(len(all_lanes(hub)) / 2)
        return (
            len(owners) == 2
            and set().union(*owners.values()) == all_lanes(hub)
            and all(len(lanes) <= share for lanes in owners.values())
        )

    await wait_until(split_between_both, within=30, what="the lanes split between both")
    await publish_all(hub, before[: len(before) // 2])
    victim, survivor = first, second
    victim_id = worker_id_of(victim)
    victims_lanes = (await lane_owners(hub))[victim_id]
    assert victims_lanes

    os.kill(victim.process.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        await publish_all(hub, before[len(before) // 2 :])

        async def all_applied() -> bool:
            return await hub.value("SELECT count(*) FROM processed_events") == len(before)

        # The silence bound, the beat that may have just been missed, a claim round, work.
        bound = LANE_OWNER_SILENT_SECONDS + LANE_OWNER_BEAT_SECONDS + 15
        await wait_until(all_applied, within=bound, what="the live worker to apply everything")
        took_over_in = time.monotonic() - stopped_at
        await assert_tables_match(hub, expect(before))
        assert (await lane_owners(hub)).keys() == {worker_id_of(survivor)}
        assert log_events(survivor, "lanes.silent_worker_ended")
    finally:
        resumed_at_line = len(victim.log().splitlines())
        os.kill(victim.process.pid, signal.SIGCONT)
    # While it resumes (and finds its connections gone), more events arrive.
    await publish_all(hub, during)

    async def rejoined() -> bool:
        return len(log_events(victim, "lanes.joined")) >= 2 and victim_id in await lane_owners(hub)

    await wait_until(rejoined, within=30, what="the resumed worker to rejoin and own lanes")
    await hub.settle(within=60)
    await assert_tables_match(hub, expect(stream))
    await assert_outbound_matches_tables(hub, await hub.outbound())
    assert await hub.value("SELECT count(*) FROM processed_events") == len(stream)
    # Every lane it held ended once it resumed (most as lost: a lane idle in a fetch
    # when stopped notices only at its next round), and it committed nothing there.
    after_resume = log_events(victim, "lane.released", after_line=resumed_at_line)
    assert victims_lanes <= {str(e["lane"]) for e in after_resume}
    lost = log_events(victim, "lane.lost", after_line=resumed_at_line)
    assert lost
    assert survivor.terminate() == 0
    assert victim.terminate() == 0
    # Once only: no event recorded twice, by one worker or by both.
    recorded = Counter(
        str(e["eventId"])
        for process in (victim, survivor)
        for e in log_events(process, "event")
        if e.get("outcome") in _RECORDED
    )
    assert {event_id for event_id, n in recorded.items() if n > 1} == set()
    # And every event was recorded by one of them, except those whose COMMIT the victim
    # sent just before it was stopped: the server committed them, the reply sat unread,
    # and on resume the victim gave up on it (a group past its 1 s, a connection ended)
    # without knowing the outcome, so it logged them `requeued`; the survivor found them
    # in the ledger (`duplicate`). The count of ledger rows above says none was lost.
    published = {str(e.body["eventId"]) for e in stream}
    assert recorded.keys() <= published
    in_doubt = published - recorded.keys()
    requeued_on_resume = {
        str(e["eventId"])
        for e in log_events(victim, "event", after_line=resumed_at_line)
        if e.get("outcome") == "requeued"
    }
    found_applied = {
        str(e["eventId"]) for e in log_events(survivor, "event") if e.get("outcome") == "duplicate"
    }
    assert in_doubt <= requeued_on_resume & found_applied
    summary(
        f"liveness: SIGSTOP of a worker owning {len(victims_lanes)} of {len(all_lanes(hub))}"
        f" lanes; its backlog applied by the live worker {took_over_in:.1f}s later; resumed,"
        f" it lost {len(lost)} of them, released all and rejoined; {len(stream)} events applied"
        f" once each ({len(in_doubt)} committed as it was stopped, found in the ledger)"
    )


async def test_the_lane_gauges_are_reported_once_per_lane_across_replicas(hub: Hub) -> None:
    ports = [free_port(), free_port()]
    await hub.start_worker(http_addr=f"127.0.0.1:{ports[0]}")
    for n in range(12):
        await hub.send("sp1", f"s{n}", "spawned")

    async def first_reports_all() -> bool:
        _, text = await probe(ports[0], "/metrics")
        assert isinstance(text, str)
        lanes = {
            dict(k[1]).get("lane") for k in samples(text) if k[0].startswith("hub_worker_lane_")
        }
        return lanes == all_lanes(hub)

    # The first worker reports every lane; the lanes it hands over must leave its /metrics.
    await wait_until(first_reports_all, what="the first worker to report all lanes")
    await hub.start_worker(http_addr=f"127.0.0.1:{ports[1]}")

    async def reported() -> dict[int, dict[str, dict[str, float]]]:
        """Per worker: metric name -> lane -> the value of its series."""
        found: dict[int, dict[str, dict[str, float]]] = {}
        for port in ports:
            _, text = await probe(port, "/metrics")
            assert isinstance(text, str)
            by_name: dict[str, dict[str, float]] = {}
            for (name, labels), value in samples(text).items():
                lane = dict(labels).get("lane") or dict(labels).get("consumer")
                if name.startswith(("hub_worker_lane_", "hub_worker_consumer_")) and lane:
                    by_name.setdefault(name, {})[lane] = value
            found[port] = by_name
        return found

    names = (
        "hub_worker_lane_lag_seconds",
        "hub_worker_lane_pending_messages",
        "hub_worker_lane_idle_seconds",
        "hub_worker_consumer_pending_messages",
        "hub_worker_consumer_ack_pending_messages",
    )

    last_seen: list[object] = []  # what the last check saw, for the failure message

    async def once_per_lane(nothing_waits: bool = False) -> bool:
        owners = await lane_owners(hub)
        found = await reported()
        last_seen[:] = [owners, found]
        # The split settled: two owners, each within its fair share. A lane being
        # handed over is still locked by (and in the /metrics of) its old owner, which
        # then holds more than its share; once released, nobody reports it until its
        # next owner has claimed and sampled it, so only a settled split is checked.
        share = math.ceil(len(all_lanes(hub)) / 2)
        if len(owners) != 2 or any(len(lanes) > share for lanes in owners.values()):
            return False
        for name in names:
            per_worker = [set(found[port].get(name, {})) for port in ports]
            if not all(per_worker) or per_worker[0] & per_worker[1]:
                return False
            if per_worker[0] | per_worker[1] != all_lanes(hub):
                return False
        pending = [
            v for port in ports for v in found[port]["hub_worker_lane_pending_messages"].values()
        ]
        if nothing_waits and any(pending):
            return False  # not sampled since the hub settled yet
        # Compared as sets: sorted() orders frozensets by inclusion, so two disjoint
        # ones stay in the order given, and the owners' order is not the ports'.
        return set(map(frozenset, owners.values())) == {
            frozenset(found[port]["hub_worker_lane_lag_seconds"]) for port in ports
        }

    async def settled_once_per_lane() -> bool:
        return await once_per_lane(nothing_waits=True)

    async def wait_reported(check: Callable[[], Awaitable[bool]], what: str) -> None:
        try:
            # Generous on a loaded machine: lanes settle in seconds, sampling is every 2 s.
            await wait_until(check, within=60, what=what)
        except AssertionError as timeout:
            raise AssertionError(f"{timeout}; last seen owners, reported: {last_seen}") from None

    await wait_reported(once_per_lane, "each lane reported by its owner alone")
    await hub.settle()
    # Lanes with nothing waiting any more are still reported, by their owner alone.
    await wait_reported(settled_once_per_lane, "each idle lane reported by its owner alone")


async def test_the_runtime_role_may_end_a_silent_worker_and_spares_a_live_one(
    hub: Hub,
) -> None:
    """`end_silent_worker` under the role of sql/grants.sql: pg_terminate_backend is allowed
    on the role's own backends, the heartbeat row is readable and deletable."""
    role = f"hub_runtime_{uuid4().hex[:10]}"
    await hub.db.execute(f"CREATE ROLE {role} LOGIN")  # hex and ours: safe to inline
    try:
        await schema.grant_runtime(hub.db, role)
        as_runtime = urlunsplit(urlsplit(hub.database_url)._replace(netloc=_with_user(role, hub)))
        silent = await db.connect(as_runtime, application_name="hub-worker:hub-worker-p0@aaaa")
        live = await db.connect(as_runtime, application_name="hub-worker:hub-worker-p1@bbbb")
        peer = await db.connect(as_runtime, application_name="hub-worker:lanes@cccc")
        try:
            for worker_id in ("aaaa", "bbbb"):
                await db.beat(peer, worker_id)
            await hub.db.execute(
                "UPDATE worker_heartbeats SET beat_at = now() - interval '1 minute'"
                " WHERE worker_id = 'aaaa'"
            )
            assert await db.silent_workers(peer, 30) == ["aaaa"]
            assert await db.end_silent_worker(peer, "bbbb", 30) == 0, "a live worker is spared"
            assert await db.end_silent_worker(peer, "aaaa", 30) == 1

            async def terminated() -> bool:
                with contextlib.suppress(*db.CONNECTION_ERRORS):
                    await silent.fetchval("SELECT 1")
                return silent.is_closed()

            await wait_until(terminated, within=5, what="the silent worker's backend to end")
            assert await live.fetchval("SELECT 1") == 1
            assert await db.silent_workers(peer, 30) == []
            assert await hub.value("SELECT array_agg(worker_id) FROM worker_heartbeats") == ["bbbb"]
        finally:
            for conn in (silent, live, peer):
                conn.terminate()
    finally:
        await hub.db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await hub.db.execute(f"DROP OWNED BY {role}")
        await hub.db.execute(f"DROP ROLE {role}")


def _with_user(role: str, hub: Hub) -> str:
    parts = urlsplit(hub.database_url)
    return f"{role}@{parts.hostname}:{parts.port}"
