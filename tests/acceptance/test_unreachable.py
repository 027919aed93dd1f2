"""Servers that do not answer: the worker waits, stops when asked, and never prints secrets."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import pytest

from tests.support import start_hub_worker, wait_until
from worker.embedded import free_port

pytestmark = pytest.mark.integration

SECRETS = ("s3cret-pw", "s3cret-nats")
# Lines of the server's `.unreachable` event to wait for: the database's is logged at
# every failed attempt (a few of them are retries); NATS's after each
# CONNECT_NOTICE_SECONDS of waiting, so its first says the worker waited already.
RETRIES_SEEN = {"postgres": 3, "nats": 1}
# The contract promises no delay for these lines; the worker first starts (imports,
# migrations) and on a loaded machine that takes long: a deadline, not a wait.
UNREACHABLE_WITHIN_SECONDS = 60.0


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
    assert process.stdout is not None
    stdout = process.stdout
    lines: list[str] = []

    async def collect() -> None:
        while line := await stdout.readline():
            lines.append(line.decode())

    collecting = asyncio.create_task(collect())
    event = f"{'database' if down == 'postgres' else 'nats'}.unreachable"

    async def waited_out() -> bool:
        logged = [_event_of(line) for line in lines]
        return logged.count(event) >= RETRIES_SEEN[down] or process.returncode is not None

    try:
        await wait_until(waited_out, within=UNREACHABLE_WITHIN_SECONDS, what=event)
        assert process.returncode is None, f"the worker gave up: {''.join(lines)}"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        readiness = await reader.read()
        writer.close()
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(collecting, process.wait()), timeout=20)
        except TimeoutError:
            raise AssertionError(f"no stop 20 s after SIGTERM: {''.join(lines)}") from None
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        collecting.cancel()
    assert process.returncode == 0
    assert time.monotonic() - stopped_at < 10
    assert b" 503 " in readiness.split(b"\r\n", 1)[0]
    text = "".join(lines) + readiness.decode()
    assert f'"event": "{event}"' in text
    for secret in SECRETS:
        assert secret not in text, f"{secret} leaked"


def _event_of(line: str) -> object:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry.get("event") if isinstance(entry, dict) else None
