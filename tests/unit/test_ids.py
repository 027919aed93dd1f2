"""Ids the hub makes: version-7 UUIDs, their creation time first, then random bits."""

from __future__ import annotations

import time
import uuid

from worker import ids


def test_ids_are_version_7_and_never_repeat() -> None:
    made = [ids.uuid7() for _ in range(5000)]
    assert len(set(made)) == len(made)
    assert {u.version for u in made} == {7}
    assert {u.variant for u in made} == {uuid.RFC_4122}


def test_an_id_starts_with_the_unix_time_in_milliseconds_it_was_made_at() -> None:
    before = time.time_ns() // 1_000_000
    made = ids.uuid7()
    after = time.time_ns() // 1_000_000
    assert before <= made.int >> 80 <= after


def test_ids_made_a_millisecond_apart_sort_in_the_order_made() -> None:
    # What keeps the ledger's and detections' indexes appending: the order of
    # the ids, as PostgreSQL's uuid (bytes) and text (hex) sort them.
    made = []
    for _ in range(50):
        made.append(ids.uuid7())
        time.sleep(0.0011)
    assert sorted(made, key=lambda u: u.bytes) == made
    assert sorted(made, key=str) == made


def test_the_random_part_varies_within_a_millisecond() -> None:
    # 74 random bits: 12 after the version, 62 after the variant.
    made = [ids.uuid7() for _ in range(200)]
    assert len({u.int >> 64 & 0xFFF for u in made}) > 100
    assert len({u.int & (1 << 62) - 1 for u in made}) == 200
