"""The lanes of the inbound stream: one durable consumer per partition, and one for
what the partition transform left alone, each with its advisory lock key."""

from __future__ import annotations

from dataclasses import dataclass

from worker.locks import LANE_KEY_BASE
from worker.subjects import inbound_capture, partition_filter


@dataclass(frozen=True)
class Lane:
    """One ordered slice of the inbound stream: a durable consumer owned by one worker at a time.

    `key` is the lane's advisory lock id within the worker's lock namespace.
    """

    key: int
    durable: str
    filter_subject: str


def lanes(prefix: str, partitions: int) -> list[Lane]:
    """The lanes of a stream with `partitions` partitions.

    Lane `hub-worker` reads what the transform did not touch (subjects that
    match no inbound row; everything when the stream is not partitioned);
    `hub-worker-p{n}` reads partition n.
    """
    unpartitioned = Lane(LANE_KEY_BASE, "hub-worker", inbound_capture(prefix))
    return [unpartitioned] + [
        Lane(LANE_KEY_BASE + 1 + n, f"hub-worker-p{n}", partition_filter(prefix, n))
        for n in range(partitions)
    ]
