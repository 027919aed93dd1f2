"""Running it in production: probes, metrics, graceful stop, self-healing (issue 5)."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig, SubjectTransform
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from tests.integration.test_workers import assert_tables_match, publish_all
from tests.support import Hub, open_hub, wait_until
from tests.support.workload import expect, generate
from worker import db
from worker.config import Settings
from worker.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from worker.subjects import partition_transform

pytestmark = pytest.mark.integration


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


async def probe(port: int, path: str) -> tuple[int, dict[str, Any] | str]:
    status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}{path}")
    if path == "/metrics":
        return status, body.decode()
    return status, json.loads(body)


def samples(metrics_text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hub-worker-ops-"))
    # Enterable by the embedded PostgreSQL's system user (as root), so its data stays here.
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_metrics_parse_and_move(hub: Hub) -> None:
    port = free_port()
    await hub.start_worker(http_addr=f"127.0.0.1:{port}")
    status, text = await probe(port, "/metrics")
    assert status == 200
    assert isinstance(text, str)
    before = samples(text)
    assert ("hub_worker_lanes_owned", ()) in before

    for n in range(7):
        await hub.send("sp1", f"s{n}", "signal.model_degradation", severity="high")
    await hub.publish_raw(hub.subject("sp1", "s1", "heartbeat"), b"not json")
    await hub.settle()
    await asyncio.sleep(2.5)  # one sampling period for the gauges

    _, text = await probe(port, "/metrics")
    assert isinstance(text, str)
    after = samples(text)
    assert after[("hub_worker_events_total", (("kind", "signal"), ("outcome", "applied")))] == 7
    assert after[("hub_worker_dead_letters_total", (("reason", "invalid_json"),))] == 1
    assert after[("hub_worker_outbound_published_total", (("type", "detection.opened"),))] == 7
    assert after[("hub_worker_event_handling_seconds_count", ())] == 8
    assert after[("hub_worker_outbox_backlog_rows", ())] == 0
    assert after[("hub_worker_lanes_owned", ())] == hub.settings.partitions + 1
    pending = [
        v for (name, _), v in after.items() if name == "hub_worker_consumer_pending_messages"
    ]
    assert len(pending) == hub.settings.partitions + 1


async def test_readyz_follows_postgres_and_the_backlog_is_processed(
    settings: Settings, nats_url: str, scratch: Path, tmp_path: Path
) -> None:
    postgres = EmbeddedPostgres(scratch / "postgres", options={"max_connections": "200"})
    dsn = postgres.start()
    port = free_port()
    try:
        stream = generate(sessions=60, seed=9)
        async with open_hub(settings, dsn, nats_url, tmp_path) as hub:
            await hub.start_worker(http_addr=f"127.0.0.1:{port}")

            async def ready() -> bool:
                return (await probe(port, "/readyz"))[0] == 200

            await wait_until(ready, what="/readyz 200")
            status, body = await probe(port, "/healthz")
            assert status == 200
            assert body == {"alive": True, "checks": {"loops": "ok"}}

            await hub.db.close()
            postgres.stop(mode="immediate")

            async def postgres_down() -> bool:
                status, body = await probe(port, "/readyz")
                return (
                    status == 503 and isinstance(body, dict) and body["checks"]["postgres"] != "ok"
                )

            await wait_until(postgres_down, within=10, what="/readyz 503 naming postgres")
            _, body = await probe(port, "/readyz")
            assert isinstance(body, dict)
            assert body["ready"] is False
            assert "127.0.0.1" not in json.dumps(body), "no configuration in probe bodies"
            await publish_all(hub, stream)  # the backlog waits in the stream
            assert (await probe(port, "/healthz"))[0] == 200, "alive while not ready"

            postgres.start()
            hub.db = await db.connect(dsn)
            await wait_until(ready, within=30, what="/readyz 200 again")
            await hub.settle(within=60)
            await assert_tables_match(hub, expect(stream))
    finally:
        postgres.stop(mode="immediate")


async def test_readyz_follows_nats(
    settings: Settings, database_url: str, scratch: Path, tmp_path: Path
) -> None:
    nats_server = EmbeddedNats(scratch / "nats")
    url = nats_server.start()
    port = free_port()
    try:
        async with open_hub(settings, database_url, url, tmp_path) as hub:
            await hub.start_worker(http_addr=f"127.0.0.1:{port}")

            async def readiness_is(expected: int) -> bool:
                return (await probe(port, "/readyz"))[0] == expected

            await wait_until(lambda: readiness_is(200), what="/readyz 200")
            nats_server.stop()
            await wait_until(lambda: readiness_is(503), within=10, what="/readyz 503")
            _, body = await probe(port, "/readyz")
            assert isinstance(body, dict)
            assert body["checks"]["nats"] != "ok"
            nats_server.start()
            await wait_until(lambda: readiness_is(200), within=30, what="/readyz 200 again")
            await hub.send("sp1", "s1", "signal.model_degradation", severity="low")
            await hub.settle()
            assert await hub.value("SELECT count(*) FROM detections") == 1
    finally:
        nats_server.stop()


async def test_consumers_deleted_under_a_running_worker_are_recreated(hub: Hub) -> None:
    await hub.start_worker()
    stream = generate(sessions=60, seed=13)
    await publish_all(hub, stream[: len(stream) // 2])
    await hub.settle()
    for info in await hub.js.consumers_info(hub.settings.events_stream):
        await hub.js.delete_consumer(hub.settings.events_stream, info.name)
    await publish_all(hub, stream[len(stream) // 2 :])

    async def consumers_back() -> bool:
        infos = await hub.js.consumers_info(hub.settings.events_stream)
        return len(infos) == hub.settings.partitions + 1

    await wait_until(consumers_back, within=30, what="the consumers to be recreated")
    await hub.settle(within=60)
    await assert_tables_match(hub, expect(stream))


async def test_a_consumer_with_the_wrong_filter_is_reconciled_at_start(hub: Hub) -> None:
    # The stream exists already, and someone made hub-worker-p0 by hand reading everything.
    source, destination = partition_transform(hub.prefix, hub.settings.partitions)
    await hub.js.add_stream(
        StreamConfig(
            name=hub.settings.events_stream,
            subjects=[f"{hub.prefix}.spoke.>"],
            subject_transform=SubjectTransform(src=source, dest=destination),
        )
    )
    await hub.js.add_consumer(
        hub.settings.events_stream,
        ConsumerConfig(
            durable_name="hub-worker-p0",
            filter_subject=f"{hub.prefix}.>",
            ack_policy=AckPolicy.EXPLICIT,
        ),
    )
    await hub.start_worker()
    info = await hub.js.consumer_info(hub.settings.events_stream, "hub-worker-p0")
    assert info.config.filter_subject == f"{hub.prefix}.part.0.>"
    assert info.config.ack_policy == AckPolicy.ALL
    for n in range(8):
        await hub.send("sp1", f"s{n}", "spawned")
        await hub.send("sp1", f"s{n}", "completed")
    await hub.settle()
    assert await hub.value("SELECT count(*) FROM mappings WHERE status = 'completed'") == 8


async def test_stream_retention_follows_the_configuration_at_start(hub: Hub) -> None:
    """A changed HUB_STREAM_MAX_AGE_SECONDS reaches existing streams at the next start;
    a replica count the server cannot give is logged and the worker runs on."""
    await hub.start_worker(stream_max_age_seconds=3600)
    await hub.stop_workers()
    for stream in (hub.settings.events_stream, hub.settings.out_stream):
        assert (await hub.js.stream_info(stream)).config.max_age == 3600

    with capture_logs() as logged:
        await hub.start_worker(stream_max_age_seconds=7200, stream_replicas=3)  # one server

        async def started() -> bool:
            return any(e["event"] == "worker.started" for e in logged)

        await wait_until(started, within=20)
    for stream in (hub.settings.events_stream, hub.settings.out_stream):
        config = (await hub.js.stream_info(stream)).config
        assert (config.max_age, config.num_replicas) == (3600, 1)
    refused = {e["stream"] for e in logged if e["event"] == "stream.update_refused"}
    assert refused == {hub.settings.events_stream, hub.settings.out_stream}
    await hub.send("sp1", "s1", "spawned")
    await hub.settle()
    await hub.stop_workers()

    with capture_logs() as logged:
        await hub.start_worker(stream_max_age_seconds=7200)
        await wait_until(started, within=20)
    for stream in (hub.settings.events_stream, hub.settings.out_stream):
        config = (await hub.js.stream_info(stream)).config
        assert (config.max_age, config.num_replicas) == (7200, 1)
    # The data stayed: the session's event is still in the inbound stream.
    assert (await hub.js.stream_info(hub.settings.events_stream)).state.messages == 1


async def test_sigterm_during_a_steady_stream_exits_0_within_grace_and_nothing_is_lost(
    hub: Hub,
) -> None:
    stream = generate(sessions=250, seed=31)
    worker = hub.spawn_worker_process()
    await hub.wait_ready()
    publisher = asyncio.create_task(publish_all(hub, stream))

    async def busy() -> bool:
        return int(await hub.value("SELECT count(*) FROM processed_events")) > len(stream) // 5

    await wait_until(busy, what="the worker to be busy")
    stopped_at = time.monotonic()
    assert await asyncio.to_thread(worker.terminate, 30) == 0
    took = time.monotonic() - stopped_at
    assert took < hub.settings.shutdown_grace_seconds
    await publisher

    restarted = hub.spawn_worker_process()
    await hub.settle(within=90)
    await assert_tables_match(hub, expect(stream))
    assert await hub.value("SELECT count(*) FROM processed_events") == len(stream)
    assert restarted.terminate() == 0
