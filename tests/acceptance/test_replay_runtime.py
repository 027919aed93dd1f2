"""`deadletters replay` under the runtime role: recorded before it is published, confirmed
after, and a replay retried after a failure half-way is not published twice."""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import uuid4

import pytest

from tests.acceptance.test_cli_ops import cli, one_sentence
from tests.support import Hub
from worker import schema
from worker.cli.deadletters import replay_msg_id

pytestmark = pytest.mark.integration


@pytest.fixture
async def runtime_url(hub: Hub) -> AsyncIterator[str]:
    """The hub's database as a role with exactly the rights of sql/grants.sql."""
    role = f"hub_runtime_{uuid4().hex[:10]}"
    await hub.db.execute(f'CREATE ROLE "{role}" LOGIN')
    await schema.grant_runtime(hub.db, role)
    try:
        yield hub.database_url.replace("://postgres@", f"://{role}@", 1)
    finally:
        await hub.db.execute(f'DROP OWNED BY "{role}"')
        await hub.db.execute(f'DROP ROLE "{role}"')


async def stream_last_seq(hub: Hub) -> int:
    return (await hub.js.stream_info(hub.settings.events_stream)).state.last_seq


async def test_replay_under_the_runtime_role_and_a_retry_after_a_failure(
    hub: Hub, runtime_url: str
) -> None:
    await hub.start_worker()
    subject = hub.subject("sp1", "s1", "heartbeat")
    await hub.publish_raw(subject, b"garbage")
    await hub.settle()
    letter_id = await hub.value("SELECT id FROM dead_letters")
    as_runtime = {"HUB_DATABASE_URL": runtime_url}

    replayed = await cli(hub, "deadletters", "replay", str(letter_id), **as_runtime)
    assert (replayed.code, replayed.err) == (0, "")
    assert f"Nats-Msg-Id {replay_msg_id(letter_id, 1)}, replay 1" in replayed.out
    row = (await hub.rows("SELECT * FROM dead_letters WHERE id = $1", letter_id))[0]
    assert row["replay_count"] == 1
    assert row["replayed_at"] is not None
    await hub.settle()

    # Replay 2 was published, and then the command failed before confirming it (the
    # database went away, the process was killed): begun, not confirmed.
    await hub.db.execute(
        "UPDATE dead_letters SET replay_count = 2, replayed_at = NULL WHERE id = $1", letter_id
    )
    await hub.js.publish(subject, b"garbage", headers={"Nats-Msg-Id": replay_msg_id(letter_id, 2)})
    await hub.settle()
    before = await stream_last_seq(hub)
    letters = await hub.value("SELECT count(*) FROM dead_letters")

    retried = await cli(hub, "deadletters", "replay", str(letter_id), **as_runtime)
    assert (retried.code, retried.err) == (0, "")
    assert "replay 2 (already in the stream: a retried replay)" in retried.out
    await hub.settle()
    assert await stream_last_seq(hub) == before  # not published twice
    assert await hub.value("SELECT count(*) FROM dead_letters") == letters
    row = (await hub.rows("SELECT * FROM dead_letters WHERE id = $1", letter_id))[0]
    assert (row["replay_count"], row["replayed_at"] is not None) == (2, True)

    # The next replay is a new one.
    third = await cli(hub, "deadletters", "replay", str(letter_id), **as_runtime)
    assert "replay 3" in third.out
    assert "already" not in third.out
    assert await stream_last_seq(hub) == before + 1


async def test_without_the_grant_nothing_is_published(hub: Hub, runtime_url: str) -> None:
    """The negative control: the runtime role without UPDATE on the two columns (as
    before sql/grants.sql had it) is refused before publishing, in one sentence."""
    await hub.start_worker()
    await hub.publish_raw(hub.subject("sp1", "s1", "heartbeat"), b"garbage")
    await hub.settle()
    letter_id = await hub.value("SELECT id FROM dead_letters")
    role = runtime_url.split("://", 1)[1].split("@", 1)[0]
    await hub.db.execute(f'REVOKE UPDATE ON dead_letters FROM "{role}"')
    before = await stream_last_seq(hub)

    refused = await cli(hub, "deadletters", "replay", str(letter_id), HUB_DATABASE_URL=runtime_url)
    assert refused.code == 1
    assert "nothing was published" in one_sentence(refused, "deadletters")
    assert await stream_last_seq(hub) == before
