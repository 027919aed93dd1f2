"""Subjects in and out (contract sections 3 and 5) and the partition transform."""

from __future__ import annotations

import re

import pytest

from worker.domain import Lifecycle
from worker.subjects import (
    Route,
    as_published,
    detection_subject,
    mapping_subject,
    parse_inbound,
    partition_filter,
    partition_transform,
    partitions_of,
)

PREFIXES = ["hub", "t-42", "org.hub", "a_b.c-d.e"]
ALL_LIFECYCLES = ["spawned", "started", "heartbeat", "completed", "failed", "aborted", "archived"]


# --- parse_inbound: what matches ---------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("lifecycle", ALL_LIFECYCLES)
def test_every_lifecycle_subject_parses(prefix: str, lifecycle: Lifecycle) -> None:
    subject = f"{prefix}.spoke.spoke-1.session.sess_1.{lifecycle}"
    assert parse_inbound(prefix, subject) == Route("spoke-1", "sess_1", lifecycle=lifecycle)


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    "kind",
    [
        "model_degradation",
        "high_error_count",
        "session_stall",
        "a",
        "x9",
        "a" + "b" * 63,  # 64 characters, the longest allowed
        "spawned",  # a lifecycle name is still a fine signal kind
        "signal",
    ],
)
def test_every_signal_subject_parses(prefix: str, kind: str) -> None:
    subject = f"{prefix}.spoke.spoke-1.session.sess_1.signal.{kind}"
    route = parse_inbound(prefix, subject)
    assert route == Route("spoke-1", "sess_1", signal_kind=kind)
    assert route is not None
    assert route.lifecycle is None


@pytest.mark.parametrize(
    "identifier",
    ["a", "Z", "0", "-", "_", "A-z_09", "a" * 128, "-leading-dash", "UPPER_lower-123"],
)
def test_ids_of_the_allowed_alphabet_and_length_parse(identifier: str) -> None:
    subject = f"hub.spoke.{identifier}.session.{identifier}.started"
    assert parse_inbound("hub", subject) == Route(identifier, identifier, lifecycle="started")


# --- parse_inbound: what does not --------------------------------------------

BAD_IDS = [
    "",  # empty token
    "a" * 129,
    "sp$1",
    "sp:1",
    "sp@1",
    "sp+1",
    "sp/1",
    "*",
    ">",
    "sp 1",
    "é",
    "ñame",
    "sp\t1",
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_spoke_id_matches_nothing(bad: str) -> None:
    assert parse_inbound("hub", f"hub.spoke.{bad}.session.s1.started") is None
    assert parse_inbound("hub", f"hub.spoke.{bad}.session.s1.signal.k") is None


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_session_id_matches_nothing(bad: str) -> None:
    assert parse_inbound("hub", f"hub.spoke.sp1.session.{bad}.started") is None
    assert parse_inbound("hub", f"hub.spoke.sp1.session.{bad}.signal.k") is None


@pytest.mark.parametrize(
    "subject",
    [
        "hub.spoke.sp1.session.s1\n.started",
        "hub.spoke.sp1\n.session.s1.started",
        "hub.spoke.sp1.session.s1.signal.kind\n",
    ],
)
def test_token_with_trailing_newline_matches_nothing(subject: str) -> None:
    assert parse_inbound("hub", subject) is None


@pytest.mark.parametrize(
    "kind",
    [
        "",
        "Model",
        "MODEL_DEGRADATION",
        "1abc",
        "_abc",
        "abc-def",
        "abc$",
        "a" + "b" * 64,  # 65 characters
        "modelä",
        "*",
        ">",
    ],
)
def test_bad_signal_kind_matches_nothing(kind: str) -> None:
    assert parse_inbound("hub", f"hub.spoke.sp1.session.s1.signal.{kind}") is None


@pytest.mark.parametrize(
    "subject",
    [
        # extra tokens
        "hub.spoke.sp1.session.s1.started.extra",
        "hub.spoke.sp1.session.s1.signal.model_degradation.extra",
        "hub.spoke.sp1.session.s1.started.",
        # missing tokens
        "hub.spoke.sp1.session.s1",
        "hub.spoke.sp1.session.s1.",
        "hub.spoke.sp1.session.s1.signal",
        "hub.spoke.sp1.session",
        "hub.spoke.sp1.started",
        "hub.spoke.sp1",
        "hub.spoke",
        "hub.spoke.",
        "hub",
        "",
        # wrong structure
        "hub.spoke.sp1.sessions.s1.started",
        "hub.spoke.sp1.SESSION.s1.started",
        "hub.spokes.sp1.session.s1.started",
        "hub.spoke.sp1.session.s1.finished",
        "hub.spoke.sp1.session.s1.STARTED",
        "hub.spoke.sp1.session.s1.Started",
        "hub.spoke.sp1.session.s1.signals.model_degradation",
        "hub.spoke.sp1.session.s1.heartbeat.signal",
        # wrong prefix
        "other.spoke.sp1.session.s1.started",
        "hubx.spoke.sp1.session.s1.started",
        "HUB.spoke.sp1.session.s1.started",
        "org.hub.spoke.sp1.session.s1.started",
        ".hub.spoke.sp1.session.s1.started",
        # the stored (partitioned) form is not a published subject
        "hub.part.3.spoke.sp1.session.s1.started",
        # outbound subjects are not inbound
        "hub.detection.opened.high.model_degradation",
        "hub.mapping.active.s1",
    ],
)
def test_subject_outside_the_contract_matches_nothing(subject: str) -> None:
    assert parse_inbound("hub", subject) is None


@pytest.mark.parametrize(
    ("prefix", "subject"),
    [
        ("org.hub", "hub.spoke.sp1.session.s1.started"),
        ("org.hub", "org.spoke.sp1.session.s1.started"),
        ("t-42", "t-4.spoke.sp1.session.s1.started"),
        ("t-42", "t-420.spoke.sp1.session.s1.started"),
        ("t-42", "t_42.spoke.sp1.session.s1.started"),
    ],
)
def test_subject_under_another_prefix_matches_nothing(prefix: str, subject: str) -> None:
    assert parse_inbound(prefix, subject) is None


# --- partitions ------------------------------------------------------------


def _apply_transform(source: str, destination: str, subject: str, partition: int) -> str:
    """What the server stores for `subject`, with the partition function's result given."""
    src, subj = source.split("."), subject.split(".")
    wildcards: list[str] = []
    for i, token in enumerate(src):
        if token == "*":
            wildcards.append(subj[i])
        elif token == ">":
            rest = ".".join(subj[i:])
            break
        else:
            assert token == subj[i]
    out = re.sub(r"\{\{\s*partition\([^)]*\)\s*\}\}", str(partition), destination)
    out = re.sub(r"\{\{\s*wildcard\((\d+)\)\s*\}\}", lambda m: wildcards[int(m.group(1)) - 1], out)
    assert out.endswith(".>")
    return out[:-1] + rest


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("partitions", [1, 2, 8, 64])
def test_partition_count_roundtrips_through_the_transform(prefix: str, partitions: int) -> None:
    _, destination = partition_transform(prefix, partitions)
    assert partitions_of(destination) == partitions


@pytest.mark.parametrize("prefix", PREFIXES)
def test_transform_captures_every_inbound_subject(prefix: str) -> None:
    source, _ = partition_transform(prefix, 8)
    assert source == f"{prefix}.spoke.*.session.*.>"


def test_transform_partitions_by_session_id() -> None:
    # Wildcard 2 of the source is the sessionId: all events of one session share a lane.
    source, destination = partition_transform("hub", 8)
    assert [i for i, t in enumerate(source.split(".")) if t == "*"] == [2, 4]
    assert re.search(r"\{\{\s*partition\(\s*8\s*,\s*2\s*\)\s*\}\}", destination)


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    "tail",
    [
        "spoke.sp-1.session.s_1.completed",
        "spoke.sp-1.session.s_1.signal.model_degradation",
    ],
)
def test_stored_subject_maps_back_to_the_published_one(prefix: str, tail: str) -> None:
    published = f"{prefix}.{tail}"
    source, destination = partition_transform(prefix, 8)
    stored = _apply_transform(source, destination, published, 5)
    assert stored != published
    assert parse_inbound(prefix, stored) is None  # outside P.spoke.>
    filter_subject = partition_filter(prefix, 5)
    assert filter_subject.endswith(".>")
    assert stored.startswith(filter_subject[:-1])
    assert not stored.startswith(partition_filter(prefix, 4)[:-1])
    assert as_published(prefix, stored) == published
    assert parse_inbound(prefix, as_published(prefix, stored)) is not None


@pytest.mark.parametrize("destination", [None, "", "hub.other.>", "hub.{{wildcard(1)}}.>"])
def test_stream_without_partition_function_has_no_partitions(destination: str | None) -> None:
    assert partitions_of(destination) == 0


# --- as_published ----------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "stored", "published"),
    [
        ("hub", "hub.part.0.spoke.a.session.b.started", "hub.spoke.a.session.b.started"),
        (
            "hub",
            "hub.part.63.spoke.a.session.b.signal.model_degradation",
            "hub.spoke.a.session.b.signal.model_degradation",
        ),
        ("t-42", "t-42.part.7.spoke.a.session.b.archived", "t-42.spoke.a.session.b.archived"),
        (
            "org.hub",
            "org.hub.part.12.spoke.a.session.b.failed",
            "org.hub.spoke.a.session.b.failed",
        ),
    ],
)
def test_as_published_strips_the_partition_tokens(prefix: str, stored: str, published: str) -> None:
    assert as_published(prefix, stored) == published


@pytest.mark.parametrize(
    ("prefix", "subject"),
    [
        ("hub", "hub.spoke.a.session.b.started"),
        ("hub", "hub.spoke.part.session.b.started"),
        ("hub", "other.part.3.spoke.a.session.b.started"),
        ("hub", "hub.partition.3.spoke.a.session.b.started"),
        ("hub", "hub.detection.opened.high.x"),
        ("org.hub", "hub.part.3.spoke.a.session.b.started"),
        ("t-42", "t-4.part.3.spoke.a.session.b.started"),
    ],
)
def test_as_published_leaves_other_subjects_alone(prefix: str, subject: str) -> None:
    assert as_published(prefix, subject) == subject


# --- outbound subjects -------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "change", "severity", "anomaly_type", "expected"),
    [
        (
            "hub",
            "opened",
            "high",
            "MODEL_DEGRADATION",
            "hub.detection.opened.high.model_degradation",
        ),
        (
            "hub",
            "repeated",
            "low",
            "HIGH_ERROR_COUNT",
            "hub.detection.repeated.low.high_error_count",
        ),
        ("t-42", "escalated", "medium", "X1", "t-42.detection.escalated.medium.x1"),
        (
            "org.hub",
            "resolved",
            "medium",
            "SESSION_STALL",
            "org.hub.detection.resolved.medium.session_stall",
        ),
    ],
)
def test_detection_subject_lowercases_the_kind(
    prefix: str, change: str, severity: str, anomaly_type: str, expected: str
) -> None:
    assert detection_subject(prefix, change, severity, anomaly_type) == expected


@pytest.mark.parametrize(
    ("prefix", "status", "session_id", "expected"),
    [
        ("hub", "active", "sess-1", "hub.mapping.active.sess-1"),
        ("hub", "completed", "S_2", "hub.mapping.completed.S_2"),
        ("t-42", "aborted", "x", "t-42.mapping.aborted.x"),
        ("org.hub", "failed", "y", "org.hub.mapping.failed.y"),
    ],
)
def test_mapping_subject_names_status_and_session(
    prefix: str, status: str, session_id: str, expected: str
) -> None:
    assert mapping_subject(prefix, status, session_id) == expected
