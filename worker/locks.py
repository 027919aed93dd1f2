"""Advisory lock ids: who leads, who owns which lane, how many workers are alive.

Two-int advisory locks in a namespace derived from the subject prefix. One
database serves one hub (its tables have no prefix column); the namespace only
keeps a hub's locks apart from other applications' advisory locks.
"""

from __future__ import annotations

import zlib

# Keys within a namespace.
RELAY_LEADER = 1
SWEEP_LEADER = 2
MAINTENANCE_LEADER = 3
# Lane keys start here; below are the leader roles (worker.partitions.lanes).
LANE_KEY_BASE = 100
MEMBER_KEY_BASE = 1000


def namespace(prefix: str) -> int:
    """A stable positive int4 per subject prefix."""
    return zlib.crc32(f"hub-worker:{prefix}".encode()) & 0x7FFFFFFF
