"""The operator commands (worker/cli/) end to end, through real NATS and PostgreSQL.

Most run as a process, `python -m worker.cli.ops …` (the same parser and dispatch that
`hub-worker` registers), next to a worker running in the test's event loop; a few call
`register` and `dispatch` in-process on a fresh parser, as `hub-worker` does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest

from tests.support import Hub, wait_until
from worker import db
from worker.cli import ops
from worker.cli.alerts import alert_line
from worker.cli.common import Endpoints
from worker.client import Spoke
from worker.events import DetectionEscalatedEvent

pytestmark = pytest.mark.integration

# The eventId `publish` prints when it made one: time-ordered (version 7).
MADE_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)

    def lines(self) -> list[str]:
        return self.out.splitlines()


async def start_cli(hub: Hub, *argv: str, **env: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli.ops",
        *argv,
        env={**hub.env(), **env},
        cwd=hub.tmp,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process, within: float = 60) -> Run:
    out, err = await asyncio.wait_for(process.communicate(), timeout=within)
    assert process.returncode is not None
    run = Run(process.returncode, out.decode(), err.decode())
    assert "Traceback" not in run.err, run.err
    return run


async def cli(hub: Hub, *argv: str, **env: str) -> Run:
    """`hub-worker ARGV…` against the hub's servers, as a process."""
    return await finish(await start_cli(hub, *argv, **env))


def one_sentence(run: Run, command: str) -> str:
    """The error: one line on stderr naming the command."""
    lines = run.err.splitlines()
    assert len(lines) == 1, run.err
    assert lines[0].startswith(f"hub-worker {command}: "), run.err
    return lines[0]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hub-worker")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ops.register(commands)
    return parser


# --- help and usage ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["publish"],
        ["publish", "signal"],
        ["alerts"],
        ["detections"],
        ["resolve"],
        ["deadletters"],
        ["deadletters", "replay"],
    ],
)
def test_every_command_has_help_with_examples(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parser().parse_args([*argv, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: hub-worker {' '.join(argv)}" in text
    if argv != ["publish", "signal"]:
        assert "examples:" in text
        assert f"hub-worker {argv[0]}" in text.split("examples:")[1]


def test_replay_help_says_replaying_is_safe(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["deadletters", "replay", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Nats-Msg-Id deadletter-ID-replay-N" in text
    assert "does not publish it twice" in text
    assert "recognises an eventId it already applied" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["publish", "--spoke", "a", "--session", "b", "signal", "k", "--severity", "urgent"],
        [
            "publish",
            "--spoke",
            "a",
            "--session",
            "b",
            "signal",
            "k",
            "--severity",
            "high",
            "--details",
            "[1]",
        ],
        ["publish", "--spoke", "a", "--session", "b", "--metadata", "{", "heartbeat"],
        ["publish", "--spoke", "a", "--session", "b", "--event-id", "nope", "heartbeat"],
        [
            "publish",
            "--spoke",
            "a",
            "--session",
            "b",
            "--occurred-at",
            "2026-01-01T00:00:00",
            "heartbeat",
        ],
        ["alerts", "--since", "yesterday"],
        ["alerts", "--severity", "urgent"],
        ["alerts", "--count", "0"],
        ["resolve", "d1", "--by", "x", "--resolution", "auto_resolved"],
        ["resolve", "d1", "--resolution", "fixed"],
        ["deadletters", "--reason", "bad_luck"],
        ["deadletters", "replay"],
        ["deadletters", "replay", "seven"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(argv)
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


# --- in-process: register + dispatch, as hub-worker wires them ---------------------------


async def test_dispatch_in_process(hub: Hub, capsys: pytest.CaptureFixture[str]) -> None:
    endpoints = Endpoints(hub.database_url, [hub.nats_url])

    args = parser().parse_args(["publish", "--spoke", "sp1", "--session", "s1", "heartbeat"])
    assert await ops.dispatch(args, hub.settings, endpoints) == 1  # no stream yet
    assert "has `hub-worker run` created" in capsys.readouterr().err

    await hub.start_worker()
    assert await ops.dispatch(args, hub.settings, endpoints) == 0
    event_ids = [line for line in capsys.readouterr().out.splitlines() if MADE_ID.match(line)]
    assert len(event_ids) == 1
    await hub.settle()
    assert await hub.value("SELECT event_id FROM processed_events") == UUID(event_ids[0])
    await hub.stop_workers()  # its logs would mix with the output below
    capsys.readouterr()

    args = parser().parse_args(["deadletters", "--json"])
    assert await ops.dispatch(args, hub.settings, endpoints) == 0
    assert json.loads(capsys.readouterr().out) == []

    missing = parser().parse_args(["publish", "--session", "s1", "heartbeat"])
    assert await ops.dispatch(missing, hub.settings, endpoints) == 2
    assert capsys.readouterr().err == "hub-worker publish: --spoke is required\n"

    assert await ops.dispatch(argparse.Namespace(), hub.settings, endpoints) == 2


# --- publish -------------------------------------------------------------------------------


async def test_publish_every_event_kind(hub: Hub) -> None:
    await hub.start_worker()
    fixed_id = str(uuid4())
    # Not so long ago that the stall sweep would open a SESSION_STALL for it.
    a_while_ago = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    spoke = ["--spoke", "sp1"]
    runs = [
        await cli(hub, "publish", *spoke, "--session", "coord", "spawned", "--task", "coordinate"),
        await cli(
            hub,
            "publish",
            *spoke,
            "--session",
            "s1",
            "--metadata",
            '{"model": "m-1"}',
            "spawned",
            "--parent",
            "coord",
            "--workspace",
            "ws1",
            "--task-id",
            "t1",
            "--task",
            "fix the build",
        ),
        # The common options may also follow the event name.
        await cli(hub, "publish", "started", *spoke, "--session", "s1"),
        await cli(hub, "publish", *spoke, "--session", "s1", "heartbeat"),
        await cli(
            hub,
            "publish",
            *spoke,
            "--session",
            "s1",
            "signal",
            "model_degradation",
            "--severity",
            "high",
            "--details",
            '{"score": 0.1}',
            "--fingerprint",
            "gpt",
        ),
        await cli(hub, "publish", *spoke, "--session", "s1", "completed", "--reason", "done"),
        await cli(hub, "publish", *spoke, "--session", "s1", "archived"),
        await cli(hub, "publish", *spoke, "--session", "s2", "failed", "--reason", "OOM"),
        await cli(hub, "publish", *spoke, "--session", "s3", "aborted", "--reason", "stop"),
        await cli(
            hub,
            "publish",
            *spoke,
            "--session",
            "s4",
            "--event-id",
            fixed_id,
            "--occurred-at",
            a_while_ago.isoformat(),
            "heartbeat",
        ),
    ]
    for run in runs[:-1]:
        assert (run.code, run.err) == (0, ""), run
        assert MADE_ID.match(run.out.strip()), run.out
    assert (runs[-1].code, runs[-1].err, runs[-1].out.strip()) == (0, "", fixed_id)
    await hub.settle()

    applied = {str(r["event_id"]) for r in await hub.rows("SELECT event_id FROM processed_events")}
    assert applied == {run.out.strip() for run in runs}
    statuses = {r["id"]: r["status"] for r in await hub.rows("SELECT id, status FROM sessions")}
    assert statuses == {
        "coord": "active",
        "s1": "completed",
        "s2": "failed",
        "s3": "aborted",
        "s4": "active",
    }
    assert await hub.value("SELECT last_activity_at FROM sessions WHERE id = 's4'") == a_while_ago
    mapping = (await hub.rows("SELECT * FROM mappings WHERE session_id = 's1'"))[0]
    assert mapping["parent_session_id"] == "coord"
    assert (mapping["workspace_id"], mapping["task_id"]) == ("ws1", "t1")
    assert (mapping["task"], mapping["metadata"]) == ("fix the build", {"model": "m-1"})
    [detection] = await hub.rows("SELECT * FROM detections")
    assert (detection["anomaly_type"], detection["severity"]) == ("MODEL_DEGRADATION", "high")
    assert detection["details"] == {"score": 0.1}
    assert detection["resolution"] == "auto_resolved"  # archived


async def test_publish_refuses_what_the_worker_would_dead_letter(hub: Hub) -> None:
    await hub.start_worker()
    no_spoke = await cli(hub, "publish", "--session", "s1", "heartbeat")
    assert no_spoke.code == 2
    assert one_sentence(no_spoke, "publish") == "hub-worker publish: --spoke is required"

    bad_session = await cli(hub, "publish", "--spoke", "sp1", "--session", "a b", "heartbeat")
    assert bad_session.code == 2
    assert "invalid event: session_id" in one_sentence(bad_session, "publish")

    bad_kind = await cli(
        hub,
        "publish",
        "--spoke",
        "sp1",
        "--session",
        "s1",
        "signal",
        "Bad-Kind",
        "--severity",
        "low",
    )
    assert bad_kind.code == 2
    assert "signal kind" in one_sentence(bad_kind, "publish")

    too_long = await cli(
        hub, "publish", "--spoke", "sp1", "--session", "s1", "spawned", "--task", "t" * 300
    )
    assert too_long.code == 2
    one_sentence(too_long, "publish")
    assert (await hub.js.stream_info(hub.settings.events_stream)).state.messages == 0


async def test_unreachable_servers_exit_1_in_one_sentence(hub: Hub) -> None:
    nats_down = await cli(
        hub,
        "publish",
        "--spoke",
        "sp1",
        "--session",
        "s1",
        "heartbeat",
        HUB_NATS_URL="nats://operator:s3cret@127.0.0.1:1",
    )
    assert nats_down.code == 1
    line = one_sentence(nats_down, "publish")
    assert "cannot reach NATS at nats://127.0.0.1:1" in line
    assert "s3cret" not in line

    db_down = await cli(hub, "detections", HUB_DATABASE_URL="postgresql://127.0.0.1:1/hub")
    assert db_down.code == 1
    assert "cannot reach the database" in one_sentence(db_down, "detections")

    no_worker = await cli(hub, "resolve", "d1", "--by", "ops", "--resolution", "fixed")
    assert no_worker.code == 1
    assert "no worker answers" in one_sentence(no_worker, "resolve")

    no_stream = await cli(hub, "alerts")
    assert no_stream.code == 1
    assert "does not exist" in one_sentence(no_stream, "alerts")


# --- alerts ------------------------------------------------------------------------------


async def publish_signals(hub: Hub) -> list[dict[str, Any]]:
    """A few detections and mappings; returns every outbound body, in stream order."""
    spoke = Spoke(hub.nc, "sp1", prefix=hub.prefix)
    await spoke.session_spawned("s1")
    await spoke.signal("s1", "model_degradation", "high")
    await spoke.signal("s1", "high_error_count", "low")
    await hub.settle()  # s1's events first in the stream, then s2's
    await spoke.signal("s2", "model_degradation", "medium")
    await spoke.signal("s2", "model_degradation", "high")  # escalated
    await spoke.signal("s2", "model_degradation", "high")  # repeated
    await hub.settle()
    return [e.body for e in await hub.outbound_in_sequence()]


def ids_where(bodies: list[dict[str, Any]], **wanted: str) -> list[str]:
    def keep(body: dict[str, Any]) -> bool:
        if "detection" not in body:
            return wanted.get("mapping_session") == body["mapping"]["sessionId"]
        d = body["detection"]
        return all(
            d[key] == value
            for key, value in wanted.items()
            if key in ("severity", "sessionId", "anomalyType")
        )

    return [b["eventId"] for b in bodies if keep(b)]


async def test_alerts_replays_and_filters(hub: Hub) -> None:
    await hub.start_worker()
    bodies = await publish_signals(hub)

    high = ids_where(bodies, severity="high")
    run = await cli(
        hub, "alerts", "--since", "all", "--severity", "high", "--json", "--count", str(len(high))
    )
    assert run.code == 0, run.err
    assert [json.loads(line)["eventId"] for line in run.lines()] == high

    s2_degradation = ids_where(bodies, sessionId="s2", anomalyType="MODEL_DEGRADATION")
    run = await cli(
        hub,
        "alerts",
        "--since",
        "10m",
        "--kind",
        "MODEL_DEGRADATION",
        "--session",
        "s2",
        "--json",
        "--count",
        str(len(s2_degradation)),
    )
    assert run.code == 0, run.err
    events = [json.loads(line) for line in run.lines()]
    assert [e["eventId"] for e in events] == s2_degradation
    assert [e["type"] for e in events][:2] == ["detection.opened", "detection.escalated"]

    with_mapping = ids_where(bodies, sessionId="s1", mapping_session="s1")
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    run = await cli(
        hub,
        "alerts",
        "--since",
        since,
        "--session",
        "s1",
        "--mappings",
        "--severity",
        "high,low",
        "--json",
        "--count",
        str(len(with_mapping)),
    )
    assert run.code == 0, run.err
    assert [json.loads(line)["eventId"] for line in run.lines()] == with_mapping
    assert json.loads(run.lines()[0])["type"] == "mapping.active"

    # Readable lines (no colours: stdout is not a terminal).
    run = await cli(hub, "alerts", "--since", "all", "--mappings", "--count", "4")
    assert run.code == 0, run.err
    mapping_line, opened, low, medium = run.lines()
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d MAPPING +active +session=s1 spoke=sp1 id=\S+", mapping_line
    )
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d OPENED +high +MODEL_DEGRADATION  session=s1 count=1 id=\S+", opened
    ), opened
    assert "OPENED     low    HIGH_ERROR_COUNT  session=s1 count=1" in low
    assert "\x1b[" not in run.out
    assert "session=s2" in medium


async def test_alerts_follows_live_and_a_durable_one_catches_up(hub: Hub) -> None:
    await hub.start_worker()
    spoke = Spoke(hub.nc, "sp1", prefix=hub.prefix)

    async def consumers() -> set[str]:
        return {c.name for c in await hub.js.consumers_info(hub.settings.out_stream)}

    live = await start_cli(
        hub, "alerts", "--severity", "high", "--count", "2", "--json", "--durable", "pager"
    )

    async def pager_exists() -> bool:
        return "pager" in await consumers()

    await wait_until(pager_exists, what="the alerts consumer")
    first = await spoke.signal("s1", "model_degradation", "high")
    await spoke.signal("s1", "high_error_count", "low")  # not shown
    second = await spoke.signal("s2", "tool_loop", "high")
    run = await finish(live)
    assert run.code == 0, run.err
    causes = {json.loads(line)["causationId"] for line in run.lines()}
    assert causes == {str(first.event_id), str(second.event_id)}

    # While `pager` is not running:
    third = await spoke.signal("s3", "tool_loop", "high")
    await hub.settle()
    run = await cli(
        hub, "alerts", "--severity", "high", "--count", "1", "--json", "--durable", "pager"
    )
    assert run.code == 0, run.err
    assert json.loads(run.out)["causationId"] == str(third.event_id)


async def test_alerts_stops_on_sigint_with_exit_0(hub: Hub) -> None:
    await hub.start_worker()
    process = await start_cli(hub, "alerts")

    async def following() -> bool:
        infos = await hub.js.consumers_info(hub.settings.out_stream)
        return any(c.name.startswith("alerts-") for c in infos)

    await wait_until(following, what="the alerts consumer")
    process.send_signal(2)  # SIGINT
    run = await finish(process)
    assert (run.code, run.out, run.err) == (0, "", "")
    assert not await following()  # the ephemeral consumer was deleted


# --- detections -----------------------------------------------------------------------------


async def test_detections_lists_active_and_recent(hub: Hub) -> None:
    await hub.start_worker()
    spoke = Spoke(hub.nc, "sp1", prefix=hub.prefix)
    await spoke.signal("s1", "high_error_count", "low")
    await spoke.signal("s1", "model_degradation", "high")
    await spoke.signal("s2", "model_degradation", "medium")
    await spoke.session_archived("s2")
    await hub.settle()
    await hub.stop_workers()
    active = {
        r["anomaly_type"]: r["id"]
        for r in await hub.rows("SELECT id, anomaly_type FROM detections WHERE session_id = 's1'")
    }

    run = await cli(hub, "detections")
    assert (run.code, run.err) == (0, "")
    header, *rows = run.lines()
    assert header.split() == ["ID", "SEVERITY", "TYPE", "SESSION", "COUNT", "OPENED", "UPDATED"]
    assert [r.split()[:5] for r in rows] == [
        [active["MODEL_DEGRADATION"], "high", "MODEL_DEGRADATION", "s1", "1"],
        [active["HIGH_ERROR_COUNT"], "low", "HIGH_ERROR_COUNT", "s1", "1"],
    ]
    # Aligned: every column starts at the same place on every line.
    assert len({line.index(" s1 ") for line in rows}) == 1
    assert header.index("SESSION") == rows[0].index(" s1 ") + 1

    listed = (await cli(hub, "detections", "--json")).json
    assert [d["id"] for d in listed] == [active["MODEL_DEGRADATION"], active["HIGH_ERROR_COUNT"]]
    assert listed[0]["anomalyType"] == "MODEL_DEGRADATION"
    assert listed[0]["resolvedAt"] is None

    assert len((await cli(hub, "detections", "--all", "--json")).json) == 3
    assert len((await cli(hub, "detections", "--limit", "1", "--json")).json) == 1

    none = await cli(hub, "detections", "--session", "s2")
    assert (none.code, none.err) == (0, "")
    assert none.out == "no active detections for session s2\n"

    resolved = await cli(hub, "detections", "--all", "--session", "s2")
    header, row = resolved.lines()
    assert header.split()[-3:] == ["RESOLVED", "RESOLUTION", "BY"]
    assert row.split()[-2:] == ["auto_resolved", "-"]


# --- resolve ------------------------------------------------------------------------------


async def test_resolve_and_its_refusals(hub: Hub) -> None:
    await hub.start_worker()
    await db.upsert_account(hub.db, "ops-alice", "Alice")
    spoke = Spoke(hub.nc, "sp1", prefix=hub.prefix)
    await spoke.signal("s1", "model_degradation", "high")
    await spoke.signal("s2", "tool_loop", "low")
    await hub.settle()
    ids = {
        r["session_id"]: r["id"] for r in await hub.rows("SELECT id, session_id FROM detections")
    }

    done = await cli(hub, "resolve", ids["s1"], "--by", "ops-alice", "--resolution", "fixed")
    assert (done.code, done.err) == (0, "")
    assert done.out.startswith(
        f"resolved {ids['s1']}: MODEL_DEGRADATION high session=s1 count=1 resolution=fixed "
        "by=ops-alice at "
    )
    row = (await hub.rows("SELECT * FROM detections WHERE id = $1", ids["s1"]))[0]
    assert (row["resolution"], row["resolved_by"]) == ("fixed", "ops-alice")

    as_json = await cli(
        hub, "resolve", ids["s2"], "--by", "ops-alice", "--resolution", "dismissed", "--json"
    )
    assert as_json.code == 0
    assert as_json.json["id"] == ids["s2"]
    assert as_json.json["resolution"] == "dismissed"

    refusals = [
        ((ids["s1"], "ops-alice"), "already_resolved"),
        (("no-such-detection", "ops-alice"), "not_found"),
        ((ids["s1"], "nobody"), "unknown_account"),
        (("", "ops-alice"), "invalid_request"),
    ]
    for (detection_id, account), code in refusals:
        run = await cli(hub, "resolve", detection_id, "--by", account, "--resolution", "fixed")
        assert run.code == 3, (code, run)
        assert run.out == ""
        assert one_sentence(run, "resolve").startswith(f"hub-worker resolve: {code}: ")

    await hub.settle()
    resolved = [
        e
        for e in await hub.outbound_in_sequence()
        if e.subject.startswith(f"{hub.prefix}.detection.resolved.")
    ]
    assert {e.body["detection"]["id"] for e in resolved} == {ids["s1"], ids["s2"]}


async def test_resolve_asks_again_after_a_timeout(hub: Hub) -> None:
    requests: list[bytes] = []

    async def slow_then_refusing(msg: Any) -> None:
        requests.append(msg.data)
        if len(requests) > 1:
            reply = {"ok": False, "error": {"code": "already_resolved", "message": "resolved"}}
            await msg.respond(json.dumps(reply).encode())

    sub = await hub.nc.subscribe(f"{hub.prefix}.cmd.detection.resolve", cb=slow_then_refusing)
    await hub.nc.flush()
    try:
        run = await cli(hub, "resolve", "d1", "--by", "ops", "--resolution", "fixed")
    finally:
        await sub.unsubscribe()
    assert len(requests) == 2
    assert json.loads(requests[0]) == {
        "detectionId": "d1",
        "resolvedBy": "ops",
        "resolution": "fixed",
    }
    assert run.code == 3
    assert "an earlier attempt timed out" in one_sentence(run, "resolve")


# --- dead letters ------------------------------------------------------------------------------


async def test_dead_letters_list_and_replay(hub: Hub) -> None:
    await hub.start_worker()
    owner = Spoke(hub.nc, "sp1", prefix=hub.prefix)
    other = Spoke(hub.nc, "sp2", prefix=hub.prefix)
    await owner.heartbeat("s1")
    await hub.settle()
    signal = await other.signal("s1", "model_degradation", "high")  # s1 is sp1's
    await hub.settle()
    garbage_subject = hub.subject("sp1", "s9", "heartbeat")
    await hub.publish_raw(garbage_subject, b"garbage", {"X-Trace": "abc"})
    await hub.settle()

    listed = await cli(hub, "deadletters")
    assert (listed.code, listed.err) == (0, "")
    header, *rows = listed.lines()
    assert header.split() == ["ID", "CREATED", "REASON", "SUBJECT", "REPLAYED", "ERROR"]
    assert len(rows) == 2
    assert "invalid_json" in rows[0]  # newest first
    assert "spoke_mismatch" in rows[1]

    [letter] = (await cli(hub, "deadletters", "--reason", "spoke_mismatch", "--json")).json
    assert letter["subject"] == f"{hub.prefix}.spoke.sp2.session.s1.signal.model_degradation"
    assert json.loads(base64.b64decode(letter["payloadBase64"]))["eventId"] == str(signal.event_id)
    assert letter["headers"]["Nats-Msg-Id"] == str(signal.event_id)
    assert (letter["replayCount"], letter["replayedAt"]) == (0, None)
    assert await hub.value("SELECT count(*) FROM detections") == 0

    # The operator fixes the cause: s1 really is sp2's.
    await hub.db.execute("INSERT INTO spokes (id) VALUES ('sp2') ON CONFLICT DO NOTHING")
    await hub.db.execute("UPDATE sessions SET spoke_id = 'sp2' WHERE id = 's1'")
    replayed = await cli(hub, "deadletters", "replay", str(letter["id"]))
    assert (replayed.code, replayed.err) == (0, "")
    assert replayed.out.startswith(
        f"replayed dead letter {letter['id']} (spoke_mismatch) to {letter['subject']} as "
    )
    await hub.settle()

    assert await hub.value(
        "SELECT count(*) FROM processed_events WHERE event_id = $1", signal.event_id
    )
    detection = (await hub.rows("SELECT * FROM detections"))[0]
    assert (detection["session_id"], detection["anomaly_type"]) == ("s1", "MODEL_DEGRADATION")
    assert detection["occurrence_count"] == 1
    row = (await hub.rows("SELECT * FROM dead_letters WHERE id = $1", letter["id"]))[0]
    assert row["replay_count"] == 1
    assert row["replayed_at"] is not None
    assert await hub.value("SELECT count(*) FROM dead_letters") == 2  # no new letter

    # The republished message: same bytes and headers, a new Nats-Msg-Id.
    info = await hub.js.stream_info(hub.settings.events_stream)
    stored = await hub.js.get_msg(hub.settings.events_stream, info.state.last_seq)
    assert stored.data == base64.b64decode(letter["payloadBase64"])
    assert stored.headers is not None
    assert stored.headers["Nats-Msg-Id"] not in (str(signal.event_id), None)
    assert stored.headers["Hub-Replay-Of"] == str(letter["id"])

    # Replaying again is harmless: the worker recognises the eventId.
    again = await cli(hub, "deadletters", "replay", str(letter["id"]), "999999")
    assert again.code == 3
    assert "replay 2" in again.out
    assert one_sentence(again, "deadletters") == (
        "hub-worker deadletters: no dead letter with id 999999"
    )
    await hub.settle()
    assert await hub.value("SELECT occurrence_count FROM detections") == 1
    assert await hub.value("SELECT count(*) FROM dead_letters") == 2
    after = (await cli(hub, "deadletters", "--reason", "spoke_mismatch")).lines()
    assert after[1].split()[5] == "2x"

    # A letter whose cause is not fixed comes back as a new one, headers and all.
    [garbage] = (await cli(hub, "deadletters", "--reason", "invalid_json", "--json")).json
    assert (await cli(hub, "deadletters", "replay", str(garbage["id"]))).code == 0
    await hub.settle()
    letters = (await cli(hub, "deadletters", "--reason", "invalid_json", "--json")).json
    assert len(letters) == 2
    newest = letters[0]
    assert newest["subject"] == garbage_subject
    assert base64.b64decode(newest["payloadBase64"]) == b"garbage"
    assert newest["headers"]["X-Trace"] == "abc"
    assert newest["headers"]["Hub-Replay-Of"] == str(garbage["id"])

    assert (await cli(hub, "deadletters", "replay", "999999")).code == 3


def test_alert_lines_color_the_severity_on_a_terminal() -> None:
    detection = {
        "id": "d-1",
        "sessionId": "s1",
        "anomalyType": "MODEL_DEGRADATION",
        "severity": "high",
        "details": None,
        "dedupKey": "k",
        "occurrenceCount": 3,
        "createdAt": "2026-11-27T10:00:00+00:00",
        "updatedAt": "2026-11-27T10:00:00+00:00",
        "resolvedAt": None,
        "resolvedBy": None,
        "resolution": None,
    }
    event = DetectionEscalatedEvent.model_validate(
        {
            "eventId": str(uuid4()),
            "occurredAt": "2026-11-27T10:00:00+00:00",
            "causationId": None,
            "type": "detection.escalated",
            "previousSeverity": "low",
            "detection": detection,
        }
    )
    plain = alert_line(event)
    assert re.fullmatch(
        r"(2026-11-2\d )?\d\d:\d\d:\d\d ESCALATED  high   MODEL_DEGRADATION  "
        r"session=s1 count=3 from=low id=d-1",
        plain,
    ), plain
    colored = alert_line(event, color=True)
    assert "\x1b[1;31mhigh  \x1b[0m" in colored
    assert re.sub(r"\x1b\[[0-9;]*m", "", colored) == plain


async def out_max_msg_size(hub: Hub, size: int) -> None:
    """PU_OUT's largest message: what makes the relay set an event aside, and its fix."""
    config = (await hub.js.stream_info(hub.settings.out_stream)).config
    config.max_msg_size = size
    await hub.js.update_stream(config)


async def test_outbox_lists_what_was_set_aside_and_republishes_what_is_still_current(
    hub: Hub,
) -> None:
    await hub.start_worker()
    spoke = Spoke(hub.nc, "sp1", prefix=hub.prefix)
    await spoke.heartbeat("s1")
    await spoke.heartbeat("s2")
    await hub.settle()
    assert (await cli(hub, "outbox")).err == "no outbound events set aside\n"

    # PU_OUT takes 2 KB at most for now: both detections' `opened` events go aside.
    await out_max_msg_size(hub, 2048)
    big = {"log": "x" * 4096}
    await spoke.signal("s1", "model_degradation", "high", big)
    await spoke.signal("s2", "high_error_count", "low", big)
    await wait_until(
        lambda: hub.value("SELECT count(*) = 2 FROM outbox_set_aside"), what="two rows set aside"
    )
    # s2's detection changes after: its `repeated` event (small details) is published.
    await spoke.signal("s2", "high_error_count", "low", {"log": "short"})
    await hub.settle()

    listed = await cli(hub, "outbox")
    assert (listed.code, listed.err) == (0, "")
    header, *lines = listed.lines()
    assert header.split() == [
        "ID",
        "SET",
        "ASIDE",
        "REASON",
        "SUBJECT",
        "BYTES",
        "STANDING",
        "REPUBLISHED",
        "ERROR",
    ]
    rows = (await cli(hub, "outbox", "list", "--json")).json
    # The two sessions' lanes commit in either order.
    s1_opened, s2_opened = sorted(rows, key=lambda r: "high_error_count" in r["subject"])
    assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)
    assert [(r["reason"], r["standing"], r["republishedAt"]) for r in (s1_opened, s2_opened)] == [
        ("too_large", "current", None),
        ("too_large", "superseded", None),
    ]
    assert sorted(w for line in lines for w in line.split() if w in ("current", "superseded")) == [
        "current",
        "superseded",
    ]
    assert json.loads(base64.b64decode(s1_opened["payloadBase64"]))["detection"]["details"] == big

    # The cause fixed, s1's event goes out with its own eventId; s2's is refused: its
    # subscribers have seen the newer state, two occurrences.
    await out_max_msg_size(hub, -1)
    republished = await cli(
        hub, "outbox", "republish", str(s1_opened["id"]), str(s2_opened["id"]), "999999"
    )
    assert republished.code == 3
    assert republished.out.startswith(f"republished outbox row {s1_opened['id']} (too_large)")
    assert "published outbox row" in republished.out.splitlines()[-1]
    refusals = republished.err.splitlines()
    assert refusals == [
        f"hub-worker outbox: outbox row {s2_opened['id']} is superseded: its "
        f"{s2_opened['aggregate']} changed since, and subscribers were sent the newer state",
        "hub-worker outbox: no outbox row set aside with id 999999",
    ]
    opened = await hub.outbound(f"{hub.prefix}.detection.opened.>")
    assert [(o.body["eventId"], o.body["detection"]["details"]) for o in opened] == [
        (s1_opened["eventId"], big)
    ]
    assert await hub.value("SELECT count(*) FROM outbox") == 0

    # Once only; the table says when.
    again = await cli(hub, "outbox", "republish", str(s1_opened["id"]))
    assert again.code == 3
    assert f"outbox row {s1_opened['id']} was republished at " in again.err
    after = {r["id"]: r["republishedAt"] for r in (await cli(hub, "outbox", "--json")).json}
    assert after[s2_opened["id"]] is None
    assert after[s1_opened["id"]] is not None


async def test_a_republished_event_refused_again_is_set_aside_again(hub: Hub) -> None:
    await hub.start_worker()
    spoke = Spoke(hub.nc, "sp1", prefix=hub.prefix)
    await out_max_msg_size(hub, 2048)
    await spoke.signal("s1", "model_degradation", "high", {"log": "x" * 4096})
    await wait_until(
        lambda: hub.value("SELECT count(*) = 1 FROM outbox_set_aside"), what="a row set aside"
    )
    [row] = (await cli(hub, "outbox", "--json")).json
    # The cause not fixed: the relay refuses it again, and it is a new row.
    republished = await cli(hub, "outbox", "republish", str(row["id"]))
    assert republished.code == 1
    [new] = [r for r in (await cli(hub, "outbox", "--json")).json if r["id"] != row["id"]]
    assert (new["eventId"], new["reason"], new["standing"]) == (
        row["eventId"],
        "too_large",
        "current",
    )
    assert republished.err == (
        f"hub-worker outbox: outbox row {new['id']} (was {row['id']}) was set aside again: "
        f"too_large ({new['error']})\n"
    )
