"""The resolve command over NATS request/reply (contract section 7; issue 3)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from typing import Any

import nats.errors
import pytest

from tests.support import Hub
from worker import db

pytestmark = pytest.mark.integration


async def request(hub: Hub, body: dict[str, Any] | bytes) -> dict[str, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = await hub.nc.request(f"{hub.prefix}.cmd.detection.resolve", data, timeout=10)
    return json.loads(reply.data)  # type: ignore[no-any-return]


async def open_detection(hub: Hub) -> str:
    await hub.send("sp1", "s1", "signal.model_degradation", severity="high", details={"p95": 3})
    await hub.settle()
    detection_id = await hub.value("SELECT id FROM detections")
    assert detection_id is not None
    return str(detection_id)


async def test_resolve_commits_replies_and_publishes(hub: Hub) -> None:
    await hub.start_worker()
    await db.upsert_account(hub.db, "ops-alice", "Alice")
    detection_id = await open_detection(hub)

    reply = await request(
        hub, {"detectionId": detection_id, "resolvedBy": "ops-alice", "resolution": "fixed"}
    )
    assert reply["ok"] is True
    assert "error" not in reply
    detection = reply["detection"]
    assert detection["id"] == detection_id
    assert detection["resolvedBy"] == "ops-alice"
    assert detection["resolution"] == "fixed"
    assert detection["resolvedAt"] is not None
    # The reply came after the commit: the row says so already.
    row = (await hub.rows("SELECT * FROM detections WHERE id = $1", detection_id))[0]
    assert (row["resolved_by"], row["resolution"]) == ("ops-alice", "fixed")
    assert row["resolved_at"] is not None

    await hub.settle()
    resolved = await hub.outbound(f"{hub.prefix}.detection.resolved.>")
    assert [e.subject for e in resolved] == [
        f"{hub.prefix}.detection.resolved.high.model_degradation"
    ]
    assert resolved[0].body["causationId"] is None
    assert resolved[0].body["detection"]["resolvedBy"] == "ops-alice"


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("missing-detection", "not_found"),
        ("resolved-twice", "already_resolved"),
        ("unknown-account", "unknown_account"),
        ("not-json", "invalid_request"),
        ("missing-field", "invalid_request"),
        ("auto-resolution", "invalid_request"),
        ("number-for-string", "invalid_request"),
        ("nul-in-detection-id", "invalid_request"),
        ("nul-in-resolved-by", "invalid_request"),
        ("lone-surrogate", "invalid_request"),
    ],
)
async def test_resolve_refusals(hub: Hub, case: str, code: str) -> None:
    await hub.start_worker()
    await db.upsert_account(hub.db, "ops-alice", None)
    detection_id = await open_detection(hub)
    good = {"detectionId": detection_id, "resolvedBy": "ops-alice", "resolution": "dismissed"}
    body: dict[str, Any] | bytes = {
        "missing-detection": good | {"detectionId": "no-such-detection"},
        "resolved-twice": good,
        "unknown-account": good | {"resolvedBy": "mallory"},
        "not-json": b"resolve it please",
        "missing-field": {"detectionId": detection_id, "resolution": "fixed"},
        "auto-resolution": good | {"resolution": "auto_resolved"},
        "number-for-string": good | {"detectionId": 12},
        # PostgreSQL cannot compare text holding U+0000: the request must still be answered.
        "nul-in-detection-id": good | {"detectionId": detection_id + "\u0000"},
        "nul-in-resolved-by": good | {"resolvedBy": "ops-alice\u0000"},
        "lone-surrogate": json.dumps(good).replace("ops-alice", "ops-\\ud800").encode(),
    }[case]
    if case == "resolved-twice":
        assert (await request(hub, good))["ok"] is True

    reply = await request(hub, body)
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    assert reply["error"]["message"]
    if case != "resolved-twice":
        assert await hub.value("SELECT resolved_at FROM detections") is None


async def test_a_signal_after_a_manual_resolve_follows_the_late_news_rule(hub: Hub) -> None:
    await hub.start_worker()
    await db.upsert_account(hub.db, "ops-alice", None)
    detection_id = await open_detection(hub)
    reply = await request(
        hub, {"detectionId": detection_id, "resolvedBy": "ops-alice", "resolution": "acknowledged"}
    )
    resolved_at = await hub.value("SELECT resolved_at FROM detections")
    assert reply["ok"]

    late = (resolved_at - timedelta(seconds=1)).isoformat()
    await hub.send("sp1", "s1", "signal.model_degradation", severity="high", occurredAt=late)
    await hub.settle()
    assert await hub.rows("SELECT id, occurrence_count FROM detections") == [
        {"id": detection_id, "occurrence_count": 2}
    ]

    fresh = (resolved_at + timedelta(seconds=1)).isoformat()
    await hub.send("sp1", "s1", "signal.model_degradation", severity="low", occurredAt=fresh)
    await hub.settle()
    rows = await hub.rows(
        "SELECT id, occurrence_count, resolved_at FROM detections ORDER BY created_at"
    )
    assert len(rows) == 2
    assert rows[1]["id"] != detection_id
    assert rows[1]["resolved_at"] is None


async def test_every_worker_serves_the_command(hub: Hub) -> None:
    await db.upsert_account(hub.db, "ops-alice", None)
    first = hub.spawn_worker_process()
    second = hub.spawn_worker_process()
    await hub.wait_ready()
    for n in range(3):
        await hub.send("sp1", f"s{n}", "signal.model_degradation", severity="low")
    await hub.settle()
    ids = [r["id"] for r in await hub.rows("SELECT id FROM detections ORDER BY session_id")]

    first.kill()
    for detection_id in ids:
        body = {"detectionId": detection_id, "resolvedBy": "ops-alice", "resolution": "fixed"}
        # A request the server routed to the killed worker just before it
        # noticed the dead connection is lost: a client retries on timeout.
        for attempt in range(3):
            try:
                reply = json.loads(
                    (
                        await hub.nc.request(
                            f"{hub.prefix}.cmd.detection.resolve",
                            json.dumps(body).encode(),
                            timeout=2,
                        )
                    ).data
                )
                break
            except nats.errors.TimeoutError:
                assert attempt < 2, "the surviving worker must answer"
        assert reply["ok"] is True
    assert second.terminate() == 0


def test_accounts_cli_adds_and_lists(database_url: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "HUB_DATABASE_URL": database_url, "HUB_LOG_FORMAT": "json"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "worker", "accounts", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    added = cli("add", "ops-alice", "--name", "Alice (on call)")
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == "created account ops-alice (Alice (on call))"
    again = cli("add", "ops-alice")
    assert again.returncode == 0
    assert again.stdout.startswith("exists: account ops-alice")
    listed = cli("list")
    assert listed.stdout.split("\t")[:2] == ["ops-alice", "Alice (on call)"]
