"""Ids: time-ordered UUIDs (version 7, RFC 9562) for what the hub creates.

Events the spoke client and `hub-worker publish` send, and the detections and
outbound events the worker makes. A version-7 UUID starts with its creation time
in milliseconds, so ids made one after another sort one after another: the
ledger's primary key (`processed_events.event_id`) and `detections.id` take
each new id at the right edge of their index instead of on a random page.
With random (version-4) ids, every insert into a large index touches a page of
its own, which PostgreSQL must read, dirty and, the first time after each
checkpoint, write whole into the WAL; that was most of what a large ledger
added to the cost per event (docs/performance.md). The worker accepts any UUID
from a spoke: this is what a hub gets when its spokes use the client.

74 bits of each id are random, from the kernel (`os.urandom`, as uuid4's), one
read per id: 0.8 µs on the development machine against 0.6 for slices of a pooled
read, and nothing shared between the threads a client may call it from.
"""

from __future__ import annotations

import os
import time
from uuid import UUID

_RANDOM_A = (1 << 12) - 1  # 12 random bits after the version
_RANDOM_B = (1 << 62) - 1  # 62 random bits after the variant
_VERSION_7 = 7 << 76
_VARIANT_RFC = 0b10 << 62


def uuid7() -> UUID:
    """A new version-7 UUID: Unix time in milliseconds (48 bits), then random bits."""
    bits = int.from_bytes(os.urandom(10), "big")
    millis = time.time_ns() // 1_000_000
    return UUID(
        int=(millis << 80)
        | _VERSION_7
        | (bits & _RANDOM_A) << 64
        | _VARIANT_RFC
        | (bits >> 12) & _RANDOM_B
    )
