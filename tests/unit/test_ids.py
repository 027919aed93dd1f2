"""Ids the worker makes: version-4 UUIDs drawn from a pool of kernel random bytes."""

from __future__ import annotations

import uuid

from worker import ids


def test_ids_are_version_4_and_never_repeat_across_pool_reads() -> None:
    made = [ids.new_uuid4() for _ in range(ids._IDS_PER_READ * 3 + 7)]
    assert len(set(made)) == len(made)
    assert {u.version for u in made} == {4}
    assert {u.variant for u in made} == {uuid.RFC_4122}
