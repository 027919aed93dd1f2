"""Hostile bytes on the wire: whatever the NATS server accepts, the hub handles (issue 12).

nats-py refuses to publish odd subjects and headers; the NATS server does not. A client
of the raw protocol (`tests/support/rawnats.py`) publishes them, and each test checks that the
valid events published after them (several sessions, every partition) are applied
exactly, that each hostile message is dead-lettered with a contract reason (contract
section 6), and that the worker's loops are alive.

What nats-server 2.15 (non-pedantic, the default) stores, found by experiment:

- subject tokens with any byte but space, tab, CR, LF and `.`: NUL, control bytes,
  DEL, 0x80-0xFF, invalid UTF-8; tokens that are a literal `*` or `>` too (those are
  not rewritten by the stream's partition transform: they reach the `P.spoke.>`
  consumer). Refused: an empty token or a trailing `.` (no stream captures it: a 503
  reply), a tab (it splits the arguments: the server closes the connection), a control
  line over 4096 bytes (`-ERR 'maximum control line exceeded'`, connection closed);
- header names and values with NUL, control bytes and invalid UTF-8, a line without
  a colon, a version line other than `NATS/1.0`, a header named `Status` (`Status:
  404`, `408`, `409`, `503`, `100`): all stored and delivered as sent. An inline status
  (`NATS/1.0 408 Request Timeout`) is stripped by JetStream: the message is stored and
  delivered with the rest of its headers, or with none;
- header block plus body up to `max_payload` (1 MiB by default) inclusive; one byte
  more is `-ERR 'Maximum Payload Violation'` and the connection is closed. Some
  JetStream headers make the stream refuse (`Nats-Expected-Stream`,
  `Nats-Expected-Last-Sequence` with a wrong value); this suite leaves `Nats-*` alone.

nats-py 2.16, reading them: a subject that is not UTF-8 raises in its read loop; header
bytes are decoded leniently (U+FFFD), names it cannot parse are dropped; a message with a
`Status` header of 404, 408 or 409 is taken for a pull status and discarded by `fetch`
(never acked: it comes back after the ack wait, forever), 100 is skipped as a heartbeat,
any other status makes `fetch` raise.

Assertions, where the contract leaves the form open: dead letters are matched to what
was sent by their `payload` (bytea, exact) and `reason`, never by the text form of their
subject or headers (the lead decides how non-UTF-8 bytes are stored there). A valid
event with odd headers is a valid event (headers play no part in section 3) and must be
applied. A valid event with a `Status` header may be applied or dead-lettered as
`invalid_event`, exactly once. A body the inbound stream refuses at publish (should it ever cap its
message size) is refused in the open and expected nowhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

import pytest
from nats.aio.msg import Msg

from tests.integration.test_workers import assert_outbound_matches_tables, assert_tables_match
from tests.support import Hub, now_iso, wait_until
from tests.support.rawnats import RawNats, RawNatsError, header_block
from tests.support.workload import Expected, Published, expect, generate
from worker.app import Worker
from worker.constants import MAX_EVENT_BYTES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

BAD_SUBJECT = frozenset({"unknown_subject", "invalid_event"})
INVALID_EVENT = frozenset({"invalid_event"})
INVALID_JSON = frozenset({"invalid_json"})
TOO_LARGE = frozenset({"too_large"})
APPLIED = "applied"  # an outcome beside the reasons: the event was applied
# How long a focused test waits for every message to be applied or dead-lettered.
ACCOUNT_WITHIN = 30.0

# Honest sessions: 12 over two spokes cover the 4 partitions of the test settings
# (checked by every focused test, the transform's hash being deterministic).
HONEST = [(spoke, f"{spoke}-{n}") for spoke in ("wa", "wb") for n in range(6)]
# Every honest session, step by step: the hostile messages go in after step 0.
HONEST_STEPS: list[tuple[str, dict[str, Any]]] = [
    ("spawned", {"task": "build", "workspaceId": "ws-1"}),
    ("started", {}),
    ("signal.model_degradation", {"severity": "low", "details": {"p95Ms": 900}}),
    ("heartbeat", {}),
    ("completed", {"reason": "done"}),
]


@dataclass(frozen=True)
class Sent:
    """One message published raw, and the outcomes it may have (reasons, or APPLIED)."""

    kind: str
    subject: bytes
    payload: bytes
    outcomes: frozenset[str]
    headers: bytes | None = None
    event_id: str | None = None  # when APPLIED is an outcome


@dataclass
class Stored:
    """What the server stored, and what it refused (with why)."""

    stored: list[Sent] = field(default_factory=list)
    refused: list[tuple[Sent, str]] = field(default_factory=list)


# --- building hostile messages ---------------------------------------------------------


def body(spoke: str, session: str, **fields: Any) -> dict[str, Any]:
    return {
        "eventId": str(uuid4()),
        "occurredAt": now_iso(),
        "spokeId": spoke,
        "sessionId": session,
        **fields,
    }


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


def subject(prefix: str, *tokens: bytes | str) -> bytes:
    return b".".join(t if isinstance(t, bytes) else t.encode() for t in (prefix, *tokens))


def msg_id() -> tuple[bytes, bytes]:
    return b"Nats-Msg-Id", str(uuid4()).encode()


def unique_junk(tag: str) -> bytes:
    """A body that is not JSON, unique so that its dead letter can be found by payload."""
    return b"\xff not json " + tag.encode() + b" " + uuid4().hex.encode()


# --- publishing and observing -----------------------------------------------------------


@pytest.fixture
async def raw(hub: Hub) -> AsyncIterator[RawNats]:
    client = await RawNats.connect(hub.nats_url)
    try:
        yield client
    finally:
        await client.close()


async def publish_all(url: str, messages: Iterable[Sent]) -> Stored:
    """Publish each and wait for the stream's ack; refusals are recorded with their text.

    The server closes the connection on some refusals: the next message gets a new one.
    """
    result = Stored()
    client = await RawNats.connect(url)
    try:
        for message in messages:
            if client.closed:
                await client.close()
                client = await RawNats.connect(url)
            try:
                ack = await client.publish_stored(message.subject, message.payload, message.headers)
            except RawNatsError as err:
                result.refused.append((message, f"server: {err}"))
                continue
            if ack.stored:
                result.stored.append(message)
            else:
                result.refused.append((message, f"stream: {ack.error}"))
    finally:
        await client.close()
    return result


async def send_step(hub: Hub, step: int, ids: list[str]) -> None:
    what, fields = HONEST_STEPS[step]
    for spoke, session in HONEST:
        sent = await hub.send(spoke, session, what, **fields)
        ids.append(sent["eventId"])


def honest_expected() -> Expected:
    expected = Expected()
    for _, session in HONEST:
        expected.sessions[session] = "completed"
        expected.mappings[session] = "completed"
        expected.detections[(session, "MODEL_DEGRADATION")] = (1, "low", False)
    return expected


async def partitions_of(hub: Hub) -> dict[str, int]:
    """Session token -> partition, from the subjects the stream stored."""
    info = await hub.js.stream_info(
        hub.settings.events_stream, subjects_filter=f"{hub.prefix}.part.>"
    )
    found: dict[str, int] = {}
    for stored in info.state.subjects or {}:
        tokens = stored.split(".")  # P.part.N.spoke.S.session.ID.…
        if len(tokens) > 6:
            found.setdefault(tokens[6], int(tokens[2]))
    return found


async def applied_ids(hub: Hub) -> set[str]:
    return {str(r["event_id"]) for r in await hub.rows("SELECT event_id FROM processed_events")}


async def letter_digests(hub: Hub) -> list[tuple[str, bytes]]:
    """(reason, sha256 of the payload) of every dead letter: the payload is bytea, exact."""
    rows = await hub.rows("SELECT reason, sha256(payload) AS digest FROM dead_letters")
    return [(r["reason"], bytes(r["digest"])) for r in rows]


def assert_accounted(
    sent: list[Sent], letters: list[tuple[str, bytes]], applied: set[str], valid: set[str]
) -> Counter[str]:
    """Every valid event applied once, every stored hostile message applied or
    dead-lettered as allowed, and no other dead letter. Returns the outcomes counted."""
    missing = valid - applied
    assert not missing, f"{len(missing)} valid events not applied, e.g. {sorted(missing)[:3]}"
    outcomes: Counter[str] = Counter()
    expected_letters: dict[bytes, list[Sent]] = defaultdict(list)
    for message in sent:
        if APPLIED in message.outcomes and message.event_id in applied:
            outcomes[APPLIED] += 1
        else:
            expected_letters[hashlib.sha256(message.payload).digest()].append(message)
    found: dict[bytes, list[str]] = defaultdict(list)
    for reason, digest in letters:
        found[digest].append(reason)
    unexpected = set(found) - set(expected_letters)
    assert not unexpected, (
        f"{sum(len(found[d]) for d in unexpected)} dead letters of payloads not sent as "
        f"hostile (valid events dead-lettered?): reasons "
        f"{Counter(r for d in unexpected for r in found[d])}"
    )
    for digest, messages in expected_letters.items():
        reasons = found.get(digest, [])
        kinds = sorted({m.kind for m in messages})
        assert len(reasons) == len(messages), (
            f"{len(messages)} message(s) of kind {kinds} sent, {len(reasons)} dead letters "
            f"({reasons}); e.g. subject {messages[0].subject[:80]!r} headers "
            f"{(messages[0].headers or b'')[:80]!r} payload {messages[0].payload[:60]!r}"
        )
        allowed = frozenset().union(*(m.outcomes for m in messages)) - {APPLIED}
        assert set(reasons) <= allowed, (
            f"kind {kinds}: dead-lettered as {reasons}, expected one of {sorted(allowed)}; "
            f"e.g. subject {messages[0].subject[:80]!r} payload {messages[0].payload[:80]!r}"
        )
        outcomes.update(reasons)
    return outcomes


async def assert_alive(hub: Hub, worker: Worker) -> None:
    assert worker.liveness() == {"loops": "ok"}
    assert all(not task.done() for task, _ in hub.workers), "the worker's run() returned"
    readiness = await worker.readiness()
    assert all(check == "ok" for check in readiness.values()), readiness


async def assert_announced(hub: Hub) -> None:
    """Every dead letter was announced on P.deadletter.{reason}: the relay moves."""
    letters = Counter(r["reason"] for r in await hub.rows("SELECT reason FROM dead_letters"))
    if not letters:
        return
    announced = await hub.js.stream_info(
        hub.settings.out_stream, subjects_filter=f"{hub.prefix}.deadletter.>"
    )
    assert announced.state.subjects == {
        f"{hub.prefix}.deadletter.{reason}": count for reason, count in letters.items()
    }


async def wait_accounted(
    hub: Hub, worker: Worker, total: int, valid: set[str], within: float
) -> tuple[list[tuple[str, bytes]], set[str]]:
    """Until `total` messages are applied or dead-lettered; says how far it got if not."""

    async def accounted() -> bool:
        done = await hub.value("SELECT count(*) FROM processed_events")
        letters = await hub.value("SELECT count(*) FROM dead_letters")
        return int(done) + int(letters) >= total

    try:
        await wait_until(accounted, within=within)
    except AssertionError:
        letters, applied = await letter_digests(hub), await applied_ids(hub)
        raise AssertionError(
            f"after {within:.0f} s, {len(applied) + len(letters)} of {total} messages handled: "
            f"valid events applied {len(valid & applied)}/{len(valid)}, dead letters "
            f"{dict(Counter(r for r, _ in letters))}; worker liveness {worker.liveness()}, "
            f"NATS connected {worker.bus is not None and worker.bus.nc.is_connected}"
        ) from None
    return await letter_digests(hub), await applied_ids(hub)


async def run_focused(
    hub: Hub, hostile: list[Sent], started: Worker | None = None, may_refuse: bool = False
) -> tuple[Worker, Stored, Counter[str]]:
    """Honest step 0, the hostile messages, honest steps 1-4; then everything must be
    accounted for, the honest sessions exact, the worker alive."""
    worker = started or await hub.start_worker()
    honest_ids: list[str] = []
    await send_step(hub, 0, honest_ids)
    published = await publish_all(hub.nats_url, hostile)
    for step in range(1, len(HONEST_STEPS)):
        await send_step(hub, step, honest_ids)
    partitions = await partitions_of(hub)
    assert {partitions[s] for _, s in HONEST} == set(range(hub.settings.partitions)), (
        "the honest sessions must cover every partition"
    )
    if not may_refuse:
        assert not published.refused, [(m.kind, why) for m, why in published.refused]
    letters, applied = await wait_accounted(
        hub, worker, len(honest_ids) + len(published.stored), set(honest_ids), ACCOUNT_WITHIN
    )
    outcomes = assert_accounted(published.stored, letters, applied, set(honest_ids))
    await hub.settle(within=20)
    await assert_tables_match(hub, honest_expected())
    await assert_announced(hub)
    await assert_alive(hub, worker)
    return worker, published, outcomes


# --- (a) a subject token that is not UTF-8 ---------------------------------------------------


async def test_a_subject_token_that_is_not_utf8_is_dead_lettered(hub: Hub) -> None:
    p = hub.prefix
    spoke, session = HONEST[0]
    _, other = HONEST[7]
    hostile = [
        Sent(
            "session token \\xff\\xfe",
            subject(p, "spoke", spoke, "session", b"\xff\xfe", "started"),
            encode(body(spoke, "x")),
            BAD_SUBJECT,
        ),
        Sent(
            "spoke token \\xc3\\x28",
            subject(p, "spoke", b"\xc3\x28", "session", session, "heartbeat"),
            encode(body("x", session)),
            BAD_SUBJECT,
        ),
        # The honest session's own token: the same partition as its valid events.
        Sent(
            "lifecycle token \\x80",
            subject(p, "spoke", spoke, "session", session, b"start\x80ed"),
            encode(body(spoke, session)),
            BAD_SUBJECT,
        ),
        Sent(
            "signal kind \\xed\\xa0\\x80 (a surrogate in UTF-8)",
            subject(p, "spoke", spoke, "session", other, "signal", b"\xed\xa0\x80"),
            encode(body(spoke, other, severity="high")),
            BAD_SUBJECT,
        ),
        Sent(
            "token \\xf8\\x88\\x80\\x80\\x80 (5-byte form)",
            subject(p, "spoke", spoke, "session", b"s\xf8\x88\x80\x80\x80", "started"),
            unique_junk("5-byte"),
            BAD_SUBJECT | INVALID_JSON,
        ),
    ]
    await run_focused(hub, hostile)


# --- (b) NUL and control bytes in a subject token ----------------------------------------------


async def test_nul_and_control_bytes_in_a_subject_token_are_dead_lettered(hub: Hub) -> None:
    p = hub.prefix
    spoke, session = HONEST[1]
    hostile = [
        Sent(
            "session token NUL",
            subject(p, "spoke", spoke, "session", b"a\x00b", "started"),
            encode(body(spoke, "a")),
            BAD_SUBJECT,
        ),
        Sent(
            "lifecycle token NUL",
            subject(p, "spoke", spoke, "session", session, b"started\x00"),
            encode(body(spoke, session)),
            BAD_SUBJECT,
        ),
        Sent(
            "spoke token NUL",
            subject(p, "spoke", b"\x00", "session", session, "completed"),
            encode(body("x", session)),
            BAD_SUBJECT,
        ),
        Sent(
            "session token \\x01",
            subject(p, "spoke", spoke, "session", b"\x01", "heartbeat"),
            encode(body(spoke, "b")),
            BAD_SUBJECT,
        ),
        Sent(
            "session token ESC",
            subject(p, "spoke", spoke, "session", b"a\x1b[2J", "heartbeat"),
            encode(body(spoke, "c")),
            BAD_SUBJECT,
        ),
        Sent(
            "session token DEL",
            subject(p, "spoke", spoke, "session", b"\x7f", "heartbeat"),
            encode(body(spoke, "d")),
            BAD_SUBJECT,
        ),
        # Stored, but left alone by the partition transform: the P.spoke.> consumer's.
        Sent(
            "session token literal *",
            subject(p, "spoke", spoke, "session", b"*", "started"),
            encode(body(spoke, "f")),
            BAD_SUBJECT,
        ),
        Sent(
            "session token literal >",
            subject(p, "spoke", spoke, "session", b">", "started"),
            encode(body(spoke, "g")),
            BAD_SUBJECT,
        ),
        Sent(
            "NUL and \\xff after the last token",
            subject(p, "spoke", spoke, "session", session, b"\x00\xff"),
            unique_junk("nul-ff"),
            BAD_SUBJECT | INVALID_JSON,
        ),
    ]
    await run_focused(hub, hostile)


async def test_a_vertical_tab_or_form_feed_in_a_subject_does_not_desync_the_reader(
    hub: Hub,
) -> None:
    """VT and FF are whitespace to nats-py's protocol regexes (`\\s` in MSG_RE/HMSG_RE)
    but not to the server: the MSG line of such a subject no longer parses, and the
    client's reader waits for a line that never comes (every request times out)."""
    p = hub.prefix
    spoke, session = HONEST[3]
    hostile = []
    for byte in (b"\x0b", b"\x0c"):
        places: list[tuple[str, tuple[bytes | str, ...]]] = [
            ("session", ("spoke", spoke, "session", b"a" + byte + b"b", "heartbeat")),
            ("spoke", ("spoke", byte, "session", session, "heartbeat")),
            ("lifecycle", ("spoke", spoke, "session", session, b"heartbeat" + byte)),
        ]
        hostile += [
            Sent(
                f"{where} token {byte!r}",
                subject(p, *tokens),
                encode(body(spoke, session)),
                BAD_SUBJECT,
            )
            for where, tokens in places
        ]
    await run_focused(hub, hostile)


# --- (c) NUL and invalid UTF-8 in headers --------------------------------------------------------


async def test_hostile_header_bytes_on_valid_and_invalid_events(hub: Hub) -> None:
    p = hub.prefix
    variants: list[tuple[str, tuple[bytes, bytes]]] = [
        ("value NUL", (b"X-Trace", b"a\x00b")),
        ("value \\xff\\xfe", (b"X-Trace", b"\xff\xfe")),
        ("value control bytes", (b"X-Trace", b"\x01\x1b[0m\x7f")),
        ("name NUL", (b"X-\x00Trace", b"v")),
        ("name \\xff", (b"X-\xffTrace", b"v")),
        ("name and value NUL, \\xc0\\x80", (b"\x00", b"\xc0\x80\x00")),
    ]
    hostile = []
    for n, (label, pair) in enumerate(variants):
        spoke, session = HONEST[n]
        valid = body(spoke, session)  # a heartbeat: the compared tables do not move
        hostile.append(
            Sent(
                f"valid event, header {label}",
                subject(p, "spoke", spoke, "session", session, "heartbeat"),
                encode(valid),
                frozenset({APPLIED}),
                header_block([(b"Nats-Msg-Id", valid["eventId"].encode()), pair]),
                event_id=valid["eventId"],
            )
        )
        invalid = {**body(spoke, session), "occurredAt": "yesterday"}
        hostile.append(
            Sent(
                f"invalid event, header {label}",
                subject(p, "spoke", spoke, "session", session, "heartbeat"),
                encode(invalid),
                INVALID_EVENT,
                header_block([msg_id(), pair]),
            )
        )
        hostile.append(
            Sent(
                f"invalid JSON, header {label}",
                subject(p, "spoke", spoke, "session", session, "started"),
                unique_junk(label),
                INVALID_JSON,
                header_block([pair]),
            )
        )
    # Odd header blocks the server stores as they are.
    spoke, session = HONEST[8]
    for label, block in [
        ("a header line without a colon", b"NATS/1.0\r\nno colon \x00 here\r\n\r\n"),
        ("another version line", b"HTTP/1.1 200 OK\r\nX: \xff\r\n\r\n"),
    ]:
        hostile.append(
            Sent(
                label,
                subject(p, "spoke", spoke, "session", session, "started"),
                unique_junk(label),
                INVALID_JSON,
                block,
            )
        )
    _, _, outcomes = await run_focused(hub, hostile)
    assert outcomes[APPLIED] == len(variants), "every valid event with odd headers is applied"


# --- (d) a Status header, as a pull consumer's status messages carry -------------------------------


async def test_a_status_header_does_not_lose_or_wedge_a_message(hub: Hub) -> None:
    """nats-py's fetch takes a message with header Status 404/408/409 for the server's
    own status and drops it (never acked, redelivered after the ack wait, forever), and
    raises on other codes."""
    p = hub.prefix
    statuses: list[tuple[str, bytes]] = [
        ("Status: 404", header_block([(b"Status", b"404")])),
        (
            "Status: 408 + Description",
            header_block([(b"Status", b"408"), (b"Description", b"Request Timeout")]),
        ),
        ("Status: 409", header_block([(b"Status", b"409"), (b"Description", b"Consumer Deleted")])),
        ("Status: 503", header_block([(b"Status", b"503")])),
        (
            "Status: 100 heartbeat",
            header_block([(b"Status", b"100"), (b"Description", b"Idle Heartbeat")]),
        ),
        ("Status: 400", header_block([(b"Status", b"400"), (b"Description", b"Bad Request")])),
        ("inline status 408", header_block(status=b"408 Request Timeout")),
        ("inline status 404 + header", header_block([(b"X-A", b"b")], status=b"404 No Messages")),
    ]
    hostile = []
    for n, (label, block) in enumerate(statuses):
        spoke, session = HONEST[n % len(HONEST)]
        on = subject(p, "spoke", spoke, "session", session, "heartbeat")
        hostile.append(Sent(f"{label}, empty body", on, b"", INVALID_JSON, block))
        hostile.append(Sent(f"{label}, junk body", on, unique_junk(label), INVALID_JSON, block))
        valid = body(spoke, session)
        hostile.append(
            Sent(
                f"{label}, a valid heartbeat",
                on,
                encode(valid),
                frozenset({APPLIED}) | INVALID_EVENT,
                block,
                event_id=valid["eventId"],
            )
        )
    await run_focused(hub, hostile)


# --- (e) a body just under the server's max_payload ------------------------------------------------


async def test_a_body_up_to_max_payload_is_dead_lettered_and_announced(
    hub: Hub, raw: RawNats
) -> None:
    p = hub.prefix
    worker = await hub.start_worker()
    announced: list[Msg] = []
    mappings: list[Msg] = []

    async def on_letter(msg: Msg) -> None:
        announced.append(msg)

    async def on_mapping(msg: Msg) -> None:
        mappings.append(msg)

    await hub.nc.subscribe(f"{p}.deadletter.>", cb=on_letter)
    await hub.nc.subscribe(f"{p}.mapping.>", cb=on_mapping)
    await hub.nc.flush()

    limit = raw.max_payload
    spoke, session = HONEST[2]

    def padded(size: int, headers: bytes = b"") -> bytes:
        start = encode({**body(spoke, session), "metadata": {"pad": ""}})
        pad = size - len(headers) - len(start)
        document = json.loads(start)
        document["metadata"]["pad"] = "x" * pad
        out = encode(document)
        assert len(out) + len(headers) == size
        return out

    block = header_block([msg_id(), (b"X-Pad", b"1")])
    on = subject(p, "spoke", spoke, "session", session, "failed")
    hostile = [
        Sent("max_payload - 16 bytes", on, padded(limit - 16), TOO_LARGE),
        Sent("headers + body = max_payload", on, padded(limit, block), TOO_LARGE, block),
        Sent("800 KB (its base64 over max_payload)", on, padded(800_000), TOO_LARGE),
        Sent("64 KiB + 1", on, padded(MAX_EVENT_BYTES + 1), TOO_LARGE),
    ]
    _, published, _ = await run_focused(hub, hostile, started=worker, may_refuse=True)
    for message, why in published.refused:
        # A stream that caps the message size refuses in the open (a JetStream error).
        assert "size" in why.lower() or "10054" in why, (message.kind, why)

    await wait_until(
        lambda: _true(len(announced) >= len(published.stored)),
        within=10,
        what="the too_large announcements",
    )
    assert Counter(m.subject for m in announced) == {
        f"{p}.deadletter.too_large": len(published.stored)
    }
    for msg in announced:
        document = json.loads(msg.data)
        assert document["reason"] == "too_large"
        assert document["subject"] == on.decode()
    # Mapping events of the honest sessions, all committed after the big messages.
    expected_mappings = {(s, status) for _, s in HONEST for status in ("active", "completed")}
    await wait_until(
        lambda: _true(_mapping_events(mappings) >= expected_mappings),
        within=10,
        what="the honest sessions' mapping events",
    )
    # And still: one more mapping event after all that.
    await hub.send("wa", "after-the-big-ones", "spawned")
    await wait_until(
        lambda: _true(("after-the-big-ones", "active") in _mapping_events(mappings)),
        within=10,
        what="a mapping event after the big bodies",
    )
    await assert_alive(hub, worker)
    print(
        f"stored {[m.kind for m in published.stored]}, "
        f"refused {[(m.kind, why) for m, why in published.refused]}"
    )


async def _true(value: bool) -> bool:
    return value


def _mapping_events(messages: list[Msg]) -> set[tuple[str, str]]:
    events = (json.loads(m.data) for m in messages)
    return {(e["mapping"]["sessionId"], e["mapping"]["status"]) for e in events}


# --- the fuzz test --------------------------------------------------------------------------------

FUZZ_SESSIONS = 250
FUZZ_HOSTILE = 1000
FUZZ_BIG_BODIES = 6  # bodies of 256 KiB up to max_payload: each is stored and announced
# Bytes a subject token can carry on the wire but no spoke id may hold (no space, tab,
# CR, LF or dot: those end the token or the control line).
TOKEN_BYTES = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F, *range(0x80, 0x100)])
# Header bytes: anything but CR and LF, which would end the line.
HEADER_BYTES = bytes(
    [*range(0x00, 0x0A), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F, *range(0x80, 0x100)]
)
BENIGN_HEADERS = (b"X-Trace", b"Traceparent", b"X-Spoke-Version", b"Content-Type", b"Accept")
# Strings a subject token cannot carry (parentSessionId must be a session id).
UNCARRIABLE = ("a.b", "a b", "a\tb", "a\nb", "a\r\nb", ".", " ")
# JSON text (not Python values) that is valid but that PostgreSQL or pydantic cannot take.
POISON_VALUES = (
    '"nul \\u0000 inside"',
    '"lone \\ud800 surrogate"',
    '"\\udfff"',
    "1e400",
    "-1e400",
)


def nested(depth: int) -> str:
    """JSON text nested `depth` deep, objects and arrays alternating."""
    opening = "".join("[" if n % 2 else '{"k":' for n in range(depth))
    closing = "".join("]" if n % 2 else "}" for n in reversed(range(depth)))
    return opening + "0" + closing


def with_raw_field(document: dict[str, Any], key: str, json_text: str) -> bytes:
    """The document's JSON with `key` set to `json_text` verbatim (placed last)."""
    start = json.dumps({k: v for k, v in document.items() if k != key})
    return (start[:-1] + f", {json.dumps(key)}: {json_text}}}").encode()


def hostile_token(rng: random.Random) -> bytes:
    core = bytes(rng.choice(TOKEN_BYTES) for _ in range(rng.randint(1, 6)))
    return rng.choice([b"", b"s", b"ok-"]) + core + rng.choice([b"", b"x", b"-1"])


def hostile_pairs(rng: random.Random) -> list[tuple[bytes, bytes]]:
    """Headers with NUL, control bytes and invalid UTF-8 in names and values (no Nats-*)."""
    pairs = []
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(BENIGN_HEADERS)
        if rng.random() < 0.3:
            name += bytes(rng.choice(HEADER_BYTES.replace(b":", b"")) for _ in range(2))
        value = bytes(rng.choice(HEADER_BYTES) for _ in range(rng.randint(0, 12)))
        pairs.append((name, value))
    return pairs


def hostile_headers(rng: random.Random) -> bytes:
    return header_block(
        [msg_id(), *hostile_pairs(rng)] if rng.random() < 0.5 else hostile_pairs(rng)
    )


def hostile_unknown_key(rng: random.Random) -> str:
    """JSON text for an unknown key: ignored whatever it holds (docs/decisions.md)."""
    return rng.choice(
        [
            *POISON_VALUES,
            nested(rng.randint(1000, 3000)),
            "9" * 5000,
            "-" + "1" * rng.randint(4301, 6000),
            '{"\\u0000": "key with NUL", "\\ud800": 1e400}',
        ]
    )


@dataclass
class Fuzz:
    rng: random.Random
    prefix: str
    max_payload: int
    big_left: int = FUZZ_BIG_BODIES

    def on(self, victim: Published, what: bytes | str | None = None) -> bytes:
        return subject(
            self.prefix, "spoke", victim.spoke, "session", victim.session, what or victim.what
        )

    def valid(self, event: Published) -> Sent:
        """A valid event of the model, sometimes with odd headers or odd unknown keys."""
        document = event.body
        headers = header_block([(b"Nats-Msg-Id", document["eventId"].encode())])
        payload = encode(document)
        kind = "valid"
        roll = self.rng.random()
        if roll < 0.15:
            kind = "valid, odd headers"
            pairs = hostile_pairs(self.rng)
            pairs.insert(
                self.rng.randint(0, len(pairs)), (b"Nats-Msg-Id", document["eventId"].encode())
            )
            headers = header_block(pairs)
        elif roll < 0.3:
            kind = "valid, odd unknown key"
            payload = with_raw_field(document, "x-future", hostile_unknown_key(self.rng))
        return Sent(
            kind, self.on(event), payload, frozenset({APPLIED}), headers, document["eventId"]
        )

    def hostile(self, victim: Published) -> Sent:
        """One hostile message, in the victim's partition when its subject allows."""
        rng = self.rng
        maker = rng.choice(
            [
                self.subject_bytes,
                self.subject_bytes,
                self.header_bytes,
                self.status,
                self.body_size,
                self.unstorable,
                self.unstorable,
                self.unstorable,
            ]
        )
        return maker(victim)

    def document(self, victim: Published, **fields: Any) -> dict[str, Any]:
        return {**body(victim.spoke, victim.session), **fields}

    def subject_bytes(self, victim: Published) -> Sent:
        rng = self.rng
        tokens: list[bytes | str] = [
            "spoke",
            victim.spoke,
            "session",
            victim.session,
            *victim.what.split("."),
        ]
        where = rng.choice([1, 3, len(tokens) - 1, len(tokens) - 1])
        tokens[where] = rng.choice([b"*", b">"]) if rng.random() < 0.05 else hostile_token(rng)
        headers = hostile_headers(rng) if rng.random() < 0.3 else None
        payload = encode(self.document(victim, severity="high"))
        return Sent("subject bytes", subject(self.prefix, *tokens), payload, BAD_SUBJECT, headers)

    def header_bytes(self, victim: Published) -> Sent:
        rng = self.rng
        if rng.random() < 0.5:
            payload, outcome = unique_junk("header bytes"), INVALID_JSON
        else:
            payload = encode(self.document(victim, eventId="not-a-uuid", severity="low"))
            outcome = INVALID_EVENT
        return Sent("header bytes", self.on(victim), payload, outcome, hostile_headers(rng))

    def status(self, victim: Published) -> Sent:
        rng = self.rng
        code = rng.choice([b"404", b"408", b"409", b"503", b"100", b"400"])
        block = (
            header_block(status=code + b" Request Timeout")
            if rng.random() < 0.2
            else header_block([(b"Status", code), (b"Description", b"No Messages")])
        )
        payload = b"" if rng.random() < 0.5 else unique_junk("status")
        return Sent("status header", self.on(victim), payload, INVALID_JSON, block)

    def body_size(self, victim: Published) -> Sent:
        rng = self.rng
        choices = ["empty", "small", "at limit", "over limit"] + (["big"] if self.big_left else [])
        size = {
            "empty": 0,
            "small": rng.randint(1, 2000),
            "at limit": MAX_EVENT_BYTES,
            "over limit": rng.randint(MAX_EVENT_BYTES + 1, 200_000),
            "big": 0,
        }[choice := rng.choice(choices)]
        if choice == "big":
            self.big_left -= 1
            size = rng.choice(
                [self.max_payload - rng.randint(0, 64), rng.randint(256 * 1024, self.max_payload)]
            )
        # Not UTF-8 from the first byte: never a JSON object by chance.
        payload = (b"\xff" + rng.randbytes(size - 1)) if size else b""
        outcome = TOO_LARGE if size > MAX_EVENT_BYTES else INVALID_JSON
        return Sent(f"body {choice}", self.on(victim), payload, outcome)

    def unstorable(self, victim: Published) -> Sent:
        """Valid JSON, a valid subject, a known field PostgreSQL or pydantic cannot take."""
        rng = self.rng
        document = self.document(victim)
        what = victim.what
        case = rng.randrange(7)
        if case == 0:
            what = rng.choice(["completed", "failed", "aborted"])
            payload = with_raw_field(document, "reason", rng.choice(POISON_VALUES[:3]))
        elif case == 1:
            what = "signal.model_degradation"
            document["severity"] = "high"
            value = rng.choice(
                [
                    *(f'{{"v": {v}}}' for v in POISON_VALUES),
                    f'{{"deep": {nested(rng.randint(1000, 3000))}}}',
                ]
            )
            payload = with_raw_field(document, "details", value)
        elif case == 2:
            payload = with_raw_field(document, "metadata", '{"\\ud800": 1, "k": "\\u0000"}')
        elif case == 3:
            document["occurredAt"] = rng.choice(
                [
                    "9999-12-31T23:59:59-01:00",
                    "0001-01-01T00:00:00+01:00",
                    "2026-01-01T00:00:00+00:60",
                    "2026-01-01T00:00:00+24:00",
                    "2026-02-30T00:00:00Z",
                ]
            )
            payload = encode(document)
        elif case == 4:
            what = "spawned"
            document["parentSessionId"] = rng.choice(UNCARRIABLE)
            payload = encode(document)
        elif case == 5:
            what = "spawned"
            payload = with_raw_field(document, "task", rng.choice(POISON_VALUES[:3]))
        else:
            what = "signal.high_error_count"
            document["severity"] = "medium"
            payload = with_raw_field(document, "fingerprint", rng.choice(POISON_VALUES[:3]))
        return Sent("unstorable JSON", self.on(victim, what), payload, INVALID_EVENT)


async def test_hostile_wire_fuzz(summary: Callable[[str], None], hub: Hub, raw: RawNats) -> None:
    seed = int(os.environ.get("HUB_TEST_FUZZ_SEED", str(random.randrange(2**32))))
    print(f"hostile-wire fuzz seed {seed} (HUB_TEST_FUZZ_SEED={seed} repeats it)")
    rng = random.Random(seed)
    worker = await hub.start_worker()
    stream = generate(sessions=FUZZ_SESSIONS, seed=seed % 1000)
    fuzz = Fuzz(rng, hub.prefix, raw.max_payload)
    messages: list[Sent] = []
    # FUZZ_HOSTILE hostile messages, each just before a valid event, in its partition.
    before = Counter(rng.randrange(len(stream)) for _ in range(FUZZ_HOSTILE))
    for position, event in enumerate(stream):
        messages.extend(fuzz.hostile(event) for _ in range(before[position]))
        messages.append(fuzz.valid(event))
    started = time.monotonic()
    published = await publish_all(hub.nats_url, messages)
    publish_seconds = time.monotonic() - started
    valid_ids = {m.event_id for m in messages if m.kind.startswith("valid") and m.event_id}
    refused_valid = [(m.kind, why) for m, why in published.refused if m.event_id in valid_ids]
    assert not refused_valid, f"seed {seed}: the server refused valid events: {refused_valid[:3]}"
    try:
        letters, applied = await wait_accounted(
            hub, worker, len(published.stored), valid_ids, within=40
        )
    except AssertionError as err:
        raise AssertionError(f"seed {seed}: {err}") from None
    outcomes = assert_accounted(published.stored, letters, applied, valid_ids)
    await hub.settle(within=20)
    assert outcomes[APPLIED] == len(valid_ids)
    assert applied == valid_ids, f"seed {seed}: the ledger holds exactly the valid events"
    await assert_tables_match(hub, expect(stream))
    outbound = [
        *await hub.outbound(f"{hub.prefix}.mapping.>"),
        *await hub.outbound(f"{hub.prefix}.detection.>"),
    ]
    await assert_outbound_matches_tables(hub, outbound)
    await assert_announced(hub)
    await assert_alive(hub, worker)
    elapsed = time.monotonic() - started

    kinds = Counter(m.kind for m in messages)
    reasons = Counter(r for r, _ in letters)
    refusals = Counter(why.split(":")[0] for _, why in published.refused)
    summary(
        f"hostile wire fuzz (seed {seed}): {len(messages)} raw-protocol messages by kind "
        f"{dict(sorted(kinds.items()))}; refused by the server {dict(refusals)}; dead letters by "
        f"reason {dict(sorted(reasons.items()))}; {len(valid_ids)} valid events of "
        f"{FUZZ_SESSIONS} sessions applied exactly; published in {publish_seconds:.1f} s, "
        f"settled and compared in {elapsed:.1f} s"
    )
