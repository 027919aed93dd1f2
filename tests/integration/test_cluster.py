"""A three-node JetStream cluster: the stream leader dies mid-stream, nothing is lost (issue 7)."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import pytest

from tests.integration.test_workers import (
    assert_outbound_matches_tables,
    assert_tables_match,
    publish_all,
)
from tests.support import open_hub, wait_until
from tests.support.workload import expect, generate
from worker.config import Settings
from worker.embedded import EmbeddedNats, free_port

pytestmark = pytest.mark.integration

NODES = 3


@pytest.fixture
def cluster() -> Iterator[list[EmbeddedNats]]:
    root = Path(tempfile.mkdtemp(prefix="hub-worker-cluster-"))
    route_ports = [free_port() for _ in range(NODES)]
    routes = ",".join(f"nats://127.0.0.1:{p}" for p in route_ports)
    servers = [
        EmbeddedNats(
            root / f"n{n}",
            extra_args=[
                "--server_name",
                f"n{n}",
                "--cluster_name",
                "hub",
                "--cluster",
                f"nats://127.0.0.1:{route_ports[n]}",
                "--routes",
                routes,
            ],
        )
        for n in range(NODES)
    ]
    for server in servers:
        server.start()
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_stream_leader_dies_mid_stream_and_rejoins(
    summary: Callable[[str], None],
    cluster: list[EmbeddedNats],
    settings: Settings,
    database_url: str,
    tmp_path: Path,
) -> None:
    urls = ",".join(s.url for s in cluster)
    settings = dataclasses.replace(settings, stream_replicas=NODES)
    probe = await nats.connect(urls.split(","))
    js = probe.jetstream()

    async def jetstream_ready() -> bool:
        try:
            await js.account_info()
            return True
        except nats.errors.Error:
            return False

    await wait_until(jetstream_ready, within=30, what="the JetStream cluster to elect a leader")
    await probe.close()

    stream = generate(sessions=200, seed=41)
    async with open_hub(settings, database_url, urls, tmp_path) as hub:
        await hub.start_worker()
        info = await hub.js.stream_info(settings.events_stream)
        assert info.config.num_replicas == NODES
        await publish_all(hub, stream[: len(stream) // 2])

        leader_name = info.cluster.leader if info.cluster else None
        leader = next(s for s in cluster if s.extra_args[1] == leader_name)
        leader.stop()
        await publish_all(hub, stream[len(stream) // 2 :])
        await hub.settle(within=120)
        await assert_tables_match(hub, expect(stream))
        await assert_outbound_matches_tables(hub, await hub.outbound())

        moved = await hub.js.stream_info(settings.events_stream)
        assert moved.cluster is not None
        assert moved.cluster.leader != leader_name

        leader.start()

        async def rejoined() -> bool:
            now = await hub.js.stream_info(settings.events_stream)
            replicas = {r.name: r for r in (now.cluster.replicas or [])} if now.cluster else {}
            peer = replicas.get(leader_name or "")
            return peer is not None and bool(peer.current)

        await wait_until(rejoined, within=60, what=f"{leader_name} to rejoin the stream")
        summary(
            f"cluster: {len(stream)} events, stream leader {leader_name} stopped after "
            f"{len(stream) // 2}; new leader {moved.cluster.leader}; {leader_name} rejoined"
        )
