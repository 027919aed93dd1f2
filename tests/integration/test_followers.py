"""Alert followers that never die and never lose an alert (worker/client/alerts.py `Alerts`).

A stale `408` status (an earlier pull's expiry arriving late) makes nats-py's fetch
return no message; a handler that raises leaves its alert unacked; a NATS restart is
ridden out.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from tests.support import Hub, open_hub
from worker.client import AlertEvent, Alerts, Spoke, subscribe
from worker.client.alerts import FETCH_WAIT_SECONDS
from worker.config import Settings
from worker.embedded import EmbeddedNats
from worker.events import DeadLetterEvent, DetectionEvent

pytestmark = pytest.mark.integration


def session_of(event: AlertEvent) -> str:
    assert isinstance(event, DetectionEvent), event
    return event.detection.session_id


async def stale_408s(hub: Hub, alerts: Alerts) -> None:
    """What nats-py meets when an earlier pull's expiry arrives after the pull gave up:
    a status-only message on the subscription's inbox, twice, a second apart."""
    assert alerts._sub is not None
    inbox = alerts._sub._deliver
    for _ in range(2):
        await hub.nc.publish(inbox, b"", headers={"Status": "408", "Description": "Timeout"})
        await hub.nc.flush()
        await asyncio.sleep(1)
    # The fetch under way ends empty when the server's own 408 for it comes.
    await asyncio.sleep(FETCH_WAIT_SECONDS + 1)


async def test_a_follower_waits_through_stale_408s(hub: Hub) -> None:
    await hub.start_worker()
    spoke = Spoke(hub.nc, "sp1", prefix=hub.prefix)
    async with subscribe(hub.nc, hub.prefix) as alerts:
        iterating = asyncio.create_task(anext(aiter(alerts)))
        await asyncio.sleep(0.3)  # its pull is waiting on the server
        await stale_408s(hub, alerts)
        assert not iterating.done(), iterating  # not died of an empty fetch
        await spoke.signal("s1", "model_degradation", "high")
        event = await asyncio.wait_for(iterating, timeout=20)
        assert session_of(event) == "s1"

    # The same through `handle`.
    seen: list[AlertEvent] = []
    got = asyncio.Event()

    def note(event: AlertEvent) -> None:
        seen.append(event)
        got.set()

    async with subscribe(hub.nc, hub.prefix) as alerts:
        handling = asyncio.create_task(alerts.handle(note))
        await asyncio.sleep(0.3)
        await stale_408s(hub, alerts)
        assert not handling.done(), handling
        await spoke.signal("s2", "model_degradation", "high")
        await asyncio.wait_for(got.wait(), timeout=20)
        handling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handling
    assert [session_of(e) for e in seen] == ["s2"]


class PagerDown(Exception):
    pass


async def test_a_durable_follower_whose_handler_raises_gets_the_alert_again(hub: Hub) -> None:
    await hub.start_worker()
    spoke = Spoke(hub.nc, "sp1", prefix=hub.prefix)
    calls: list[str] = []

    async def page(event: AlertEvent) -> None:
        calls.append(session_of(event))
        if len(calls) == 1:
            raise PagerDown

    # `handle`: the handler raised, `handle` raises it, the alert stays unacked.
    async def handle_once() -> None:
        async with subscribe(hub.nc, hub.prefix, durable="pager-handle") as alerts:
            await spoke.signal("s1", "model_degradation", "high")
            await asyncio.wait_for(alerts.handle(page), timeout=20)

    with pytest.raises(PagerDown):
        await handle_once()
    done = asyncio.Event()

    async def page_again(event: AlertEvent) -> None:
        await page(event)
        done.set()

    async with subscribe(hub.nc, hub.prefix, durable="pager-handle") as alerts:
        handling = asyncio.create_task(alerts.handle(page_again))
        await asyncio.wait_for(done.wait(), timeout=20)
        handling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handling
    assert calls == ["s1", "s1"]

    # `async for` inside `async with`: an exception in the loop's body hands the event back.
    async def loop_once() -> None:
        async with subscribe(hub.nc, hub.prefix, durable="pager-loop") as alerts:
            await spoke.signal("s2", "model_degradation", "high")
            async for event in alerts:
                assert session_of(event) == "s2"
                raise PagerDown

    with pytest.raises(PagerDown):
        await loop_once()
    async with subscribe(hub.nc, hub.prefix, durable="pager-loop") as alerts:
        event = await asyncio.wait_for(anext(aiter(alerts)), timeout=20)
        assert session_of(event) == "s2"
        # A normal exit acks it: the next follower under the name does not see it again.
    async with subscribe(hub.nc, hub.prefix, durable="pager-loop") as alerts:
        await spoke.signal("s3", "model_degradation", "high")
        event = await asyncio.wait_for(anext(aiter(alerts)), timeout=20)
        assert session_of(event) == "s3"


async def test_a_follower_can_follow_dead_letters(hub: Hub) -> None:
    await hub.start_worker()
    async with subscribe(hub.nc, hub.prefix, include_deadletters=True) as alerts:
        await hub.publish_raw(hub.subject("sp1", "s1", "heartbeat"), b"not json")
        event = await asyncio.wait_for(anext(aiter(alerts)), timeout=20)
    assert isinstance(event, DeadLetterEvent)
    assert event.subject == hub.subject("sp1", "s1", "heartbeat")
    assert event.dead_letter_id is not None


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hub-worker-follower-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("durable", [None, "pager-restart"])
async def test_a_follower_resumes_after_a_nats_restart(
    durable: str | None, settings: Settings, database_url: str, scratch: Path, tmp_path: Path
) -> None:
    server = EmbeddedNats(scratch / "nats")
    url = server.start()
    try:
        async with open_hub(settings, database_url, url, tmp_path) as hub:
            await hub.start_worker()
            follower = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
            spoke = Spoke(hub.nc, "sp1", prefix=hub.prefix)
            try:
                async with subscribe(follower, hub.prefix, durable=durable) as alerts:
                    await spoke.signal("before", "model_degradation", "high")
                    first = await asyncio.wait_for(anext(aiter(alerts)), timeout=20)
                    assert session_of(first) == "before"
                    waiting = asyncio.create_task(anext(aiter(alerts)))

                    server.stop()
                    await asyncio.sleep(2)
                    assert not waiting.done(), waiting
                    server.start()  # same port, same store

                    for _ in range(100):
                        try:
                            await spoke.signal("after", "model_degradation", "high")
                            break
                        except (TimeoutError, nats.errors.Error):
                            await asyncio.sleep(0.2)
                    second = await asyncio.wait_for(waiting, timeout=60)
                    assert session_of(second) == "after"
            finally:
                await follower.close()
    finally:
        server.stop()
