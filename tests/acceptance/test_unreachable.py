"""Servers that do not answer: the worker waits, stops when asked, and never prints secrets."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from tests.support import start_hub_worker
from worker.embedded import free_port

pytestmark = pytest.mark.integration

SECRETS = ("s3cret-pw", "s3cret-nats")


@pytest.mark.parametrize("down", ["postgres", "nats"])
async def test_waits_for_servers_stops_on_sigterm_and_leaks_no_credentials(
    down: str, tmp_path: Path, database_url: str, nats_url: str
) -> None:
    port = free_port()
    env = {
        "HUB_DATABASE_URL": f"postgresql://hub:{SECRETS[0]}@127.0.0.1:{free_port()}/hub"
        if down == "postgres"
        else database_url,
        "HUB_NATS_URL": f"nats://alice:{SECRETS[1]}@127.0.0.1:{free_port()}"
        if down == "nats"
        else nats_url,
        "HUB_HTTP_ADDR": f"127.0.0.1:{port}",
        "HUB_LOG_FORMAT": "json",
    }
    process = await start_hub_worker("run", env=env, cwd=tmp_path)
    await asyncio.sleep(6)  # a few retries
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    readiness = await reader.read()
    writer.close()
    stopped_at = time.monotonic()
    process.send_signal(signal.SIGTERM)
    output, _ = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode == 0
    assert time.monotonic() - stopped_at < 10
    assert b" 503 " in readiness.split(b"\r\n", 1)[0]
    text = output.decode() + readiness.decode()
    assert f'"event": "{"database" if down == "postgres" else "nats"}.unreachable"' in text
    for secret in SECRETS:
        assert secret not in text, f"{secret} leaked"
