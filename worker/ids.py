"""Random ids for what the worker creates: outbound events and detections.

`uuid.uuid4()` asks the kernel for 16 bytes every time, and a batch creates
hundreds of ids (one per outbound event): a system call each was ~2-5 % of the
worker's CPU in a drain. Here the same kernel source (`os.urandom`) is read
4 KiB at a time; each id is still a version-4 UUID of 122 random bits.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from uuid import UUID

_IDS_PER_READ = 256


def _random_ids() -> Iterator[UUID]:
    while True:
        pool = os.urandom(16 * _IDS_PER_READ)
        for start in range(0, len(pool), 16):
            yield UUID(bytes=pool[start : start + 16], version=4)


# A generator cannot hand one id out twice: used from two threads at once it
# raises ("generator already executing") instead. The worker makes ids on its
# event loop's thread only.
new_uuid4 = _random_ids().__next__
