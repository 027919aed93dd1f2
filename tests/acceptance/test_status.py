"""`hub-worker status` against a running hub: two worker processes, then none."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import pytest

from tests.acceptance.test_cli_ops import cli, finish, start_cli
from tests.support import Hub, wait_until
from worker.client import Spoke

pytestmark = pytest.mark.integration


async def status_json(hub: Hub) -> dict[str, Any]:
    run = await cli(hub, "status", "--json")
    assert (run.code, run.err) == (0, ""), run.err
    document: dict[str, Any] = run.json
    return document


async def test_status_json_shows_two_replicas_sharing_the_hub(hub: Hub) -> None:
    processes = [hub.spawn_worker_process(), hub.spawn_worker_process()]
    await hub.wait_ready()
    pids = {str(p.process.pid) for p in processes}
    spoke = Spoke(hub.nc, "sp1", prefix=hub.prefix)
    await spoke.heartbeat("s1")
    await spoke.signal("s1", "model_degradation", "high")
    await hub.publish_raw(hub.subject("sp1", "s2", "heartbeat"), b"not json")
    await hub.settle()

    latest: dict[str, Any] = {}

    async def shared() -> bool:
        nonlocal latest
        latest = await status_json(hub)
        owners = [lane["owner"] for lane in latest["lanes"]]
        # Fair share: 5 lanes over 2 workers is 3 and 2, once the rebalance settled.
        shares = sorted(owners.count(owner) for owner in set(owners))
        return (
            None not in owners
            and shares == [2, 3]
            and None not in latest["leaders"].values()
            and len(latest["workers"]) == 2
        )

    await wait_until(shared, within=60, what="both workers to share the lanes, every duty led")
    doc = latest
    assert doc["prefix"] == hub.prefix
    assert doc["streamExists"] is True
    assert [lane["lane"] for lane in doc["lanes"]] == ["hub-worker"] + [
        f"hub-worker-p{n}" for n in range(hub.settings.partitions)
    ]
    # Each owner is one of the two processes, named host:pid.
    assert {w.rpartition(":")[2] for w in doc["workers"]} == pids
    for lane in doc["lanes"]:
        assert lane["owner"] in doc["workers"]
        assert (lane["pending"], lane["unacked"], lane["oldestUnappliedSeconds"]) == (0, 0, None)
    assert set(doc["leaders"]) == {"relay", "sweep", "janitor"}
    assert set(doc["leaders"].values()) <= set(doc["workers"])
    assert doc["backlog"] == 0
    assert doc["outbox"] == {"rows": 0, "oldestSeconds": None}
    assert doc["deadLetters"] == {
        "windowSeconds": 3600,
        "total": 1,
        "byReason": {"invalid_json": 1},
    }
    assert doc["detections"] == {"active": 1, "bySeverity": {"high": 1, "medium": 0, "low": 0}}

    text = await cli(hub, "status")
    assert (text.code, text.err) == (0, "")
    assert text.lines()[0].startswith(f"hub {hub.prefix} · 2 workers · ")
    assert "LANE" in text.out
    assert "OLDEST UNAPPLIED" in text.out
    assert "dead letters  1 (invalid_json 1) in the last hour" in text.out
    assert "detections    1 (high 1) active" in text.out
    for process in processes:
        assert process.terminate() == 0


async def test_status_without_workers_shows_the_backlog_waiting(hub: Hub) -> None:
    process = hub.spawn_worker_process()
    await hub.wait_ready()
    assert process.terminate() == 0
    spoke = Spoke(hub.nc, "sp1", prefix=hub.prefix)
    for _ in range(3):
        await spoke.heartbeat("s1")
    await asyncio.sleep(1.2)

    doc = await status_json(hub)
    assert doc["workers"] == []
    assert doc["leaders"] == {"relay": None, "sweep": None, "janitor": None}
    waiting = [lane for lane in doc["lanes"] if lane["pending"]]
    [lane] = waiting  # one session: one partition
    assert lane["owner"] is None
    assert lane["pending"] == 3
    assert lane["oldestUnappliedSeconds"] >= 1.0
    assert doc["backlog"] == 3
    text = await cli(hub, "status")
    assert "NONE" in text.out
    assert "leaders       relay NONE  sweep NONE  janitor NONE" in text.out


async def test_status_before_any_worker_says_the_stream_is_missing(hub: Hub) -> None:
    doc = await status_json(hub)
    assert doc["streamExists"] is False
    assert doc["lanes"] == []
    text = await cli(hub, "status")
    assert f"stream {hub.settings.events_stream} does not exist" in text.out


async def test_status_watch_refreshes_until_interrupted(hub: Hub) -> None:
    await hub.start_worker()
    process = await start_cli(hub, "status", "--watch", "0.2", "--json")
    assert process.stdout is not None
    first = json.loads(await asyncio.wait_for(process.stdout.readline(), timeout=30))
    second = json.loads(await asyncio.wait_for(process.stdout.readline(), timeout=30))
    assert first["at"] < second["at"]
    process.send_signal(signal.SIGINT)
    run = await finish(process)
    assert run.code == 0


async def test_status_says_when_nats_is_not_there(hub: Hub) -> None:
    run = await cli(hub, "status", HUB_NATS_URL="nats://127.0.0.1:1")
    assert run.code == 1
    assert run.err.startswith("hub-worker status: cannot reach NATS"), run.err
