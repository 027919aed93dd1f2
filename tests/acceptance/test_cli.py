"""The command line as a user runs it: `hub-worker run` on embedded servers, bad settings."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from uuid import uuid4

import asyncpg
import nats
import pytest

from tests.support import now_iso

pytestmark = pytest.mark.integration


async def read_urls(process: asyncio.subprocess.Process) -> tuple[str, str]:
    """The URLs `hub-worker run` prints for spokes and for psql."""
    nats_url = database_url = None
    assert process.stdout is not None
    while not (nats_url and database_url):
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=60)).decode()
        if not line:
            break
        if match := re.search(r"embedded NATS\s+(nats://\S+)", line):
            nats_url = match.group(1)
        if match := re.search(r"embedded PostgreSQL\s+(postgresql://\S+)", line):
            database_url = match.group(1)
    assert nats_url, "hub-worker run must print the NATS URL"
    assert database_url, "hub-worker run must print the PostgreSQL URL"
    return nats_url, database_url


async def test_run_on_embedded_servers_turns_a_signal_into_a_detection(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env |= {"HUB_DATA_DIR": str(tmp_path / "hub"), "HUB_HTTP_ADDR": "", "HUB_LOG_FORMAT": "json"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "run",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        nats_url, database_url = await read_urls(process)
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        alerts = await nc.subscribe("hub.detection.opened.>")
        # The worker creates the stream once it is up: publish when it exists.
        for _ in range(200):
            try:
                await js.stream_info("HUB_EVENTS")
                break
            except nats.js.errors.NotFoundError:
                await asyncio.sleep(0.05)
        event_id = str(uuid4())
        body = {
            "eventId": event_id,
            "occurredAt": now_iso(),
            "spokeId": "laptop",
            "sessionId": "sess-1",
            "severity": "high",
            "details": {"errors": 42},
        }
        await js.publish(
            "hub.spoke.laptop.session.sess-1.signal.high_error_count",
            json.dumps(body).encode(),
            headers={"Nats-Msg-Id": event_id},
        )
        alert = await alerts.next_msg(timeout=30)
        assert alert.subject == "hub.detection.opened.high.high_error_count"
        assert json.loads(alert.data)["causationId"] == event_id
        conn = await asyncpg.connect(database_url)
        try:
            row = await conn.fetchrow("SELECT anomaly_type, severity FROM detections")
        finally:
            await conn.close()
        assert row is not None
        assert (row["anomaly_type"], row["severity"]) == ("HIGH_ERROR_COUNT", "high")
        await nc.close()
    finally:
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), timeout=60) == 0


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HUB_STALL_AFTER_SECONDS", "soon"),
        ("HUB_SUBJECT_PREFIX", "a b"),
        ("HUB_LOG_FORMAT", "xml"),
        ("HUB_NATS_URL", "localhost:4222"),
    ],
)
def test_a_bad_setting_is_named_and_exits_2(variable: str, value: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")} | {variable: value}
    result = subprocess.run(
        [sys.executable, "-m", "worker", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert variable in result.stderr
    assert "Traceback" not in result.stderr
