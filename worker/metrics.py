"""Prometheus metrics of one worker process (exposed on /metrics).

Each Worker owns its registry, so several workers in one process (the tests)
do not share counters. Units are in the names, as Prometheus expects.
"""

from __future__ import annotations

import contextlib
from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from worker import __version__
from worker.constants import OUTBOX_BACKLOG_COUNTED

# Handling latency of one inbound message, seconds.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000)


def version() -> str:
    """The installed distribution's version (the package's own when not installed)."""
    try:
        return metadata.version("hub-worker")
    except metadata.PackageNotFoundError:
        return __version__


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # process_* (CPU, memory, open files) and python_* (GC, interpreter): the
        # default registry has them, a registry of one's own must ask.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build_info = Gauge(
            "hub_worker_build_info",
            "Always 1; `version` is the hub-worker release this process runs "
            "(python_info has the interpreter's).",
            ["version"],
            registry=r,
        )
        self.build_info.labels(version()).set(1)
        self.events = Counter(
            "hub_worker_events",
            "Inbound messages handled, by event kind and outcome "
            "(applied, duplicate, ignored, conflict, late, dead_lettered, requeued, retried).",
            ["kind", "outcome"],
            registry=r,
        )
        self.handling_seconds = Histogram(
            "hub_worker_event_handling_seconds",
            "Time from taking an inbound message to settling it (ack or term), seconds.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "hub_worker_fetch_batch_size_messages",
            "Messages returned by one pull fetch.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_groups = Counter(
            "hub_worker_batch_groups",
            "Transactions that applied the batches of several lanes together (group commit), "
            "by outcome: committed, or split (failed, or not committed within "
            "GROUP_ALONE_AFTER_SECONDS: each lane then applied its batch alone).",
            ["outcome"],
            registry=r,
        )
        self.redeliveries = Counter(
            "hub_worker_redeliveries",
            "Inbound messages received more than once from JetStream.",
            registry=r,
        )
        self.dead_letters = Counter(
            "hub_worker_dead_letters", "Messages dead-lettered, by reason.", ["reason"], registry=r
        )
        self.unstored = Counter(
            "hub_worker_unstored_messages",
            "Inbound messages whose dead letter could not be stored even in its last-resort "
            "form: logged in full (dead_letter.unstored) and terminated.",
            registry=r,
        )
        # Per lane, reported only by the lane's current owner (a series goes
        # when this worker stops owning the lane): a sum over replicas counts
        # each lane once.
        self.consumer_pending = Gauge(
            "hub_worker_consumer_pending_messages",
            "Messages not yet delivered, per lane consumer (from consumer info); "
            "reported by the lane's owner only.",
            ["consumer"],
            registry=r,
        )
        self.consumer_ack_pending = Gauge(
            "hub_worker_consumer_ack_pending_messages",
            "Messages delivered but not yet acked, per lane consumer (from consumer info); "
            "reported by the lane's owner only.",
            ["consumer"],
            registry=r,
        )
        self.lane_pending = Gauge(
            "hub_worker_lane_pending_messages",
            "Messages of the lane not yet applied (not delivered, or delivered and not "
            "acked); reported by the lane's owner only.",
            ["lane"],
            registry=r,
        )
        self.lane_lag = Gauge(
            "hub_worker_lane_lag_seconds",
            "Inbound lag: age of the lane's oldest message not yet applied, seconds "
            "(0 when none waits); reported by the lane's owner only.",
            ["lane"],
            registry=r,
        )
        self.lane_idle = Gauge(
            "hub_worker_lane_idle_seconds",
            "Seconds the lane has had messages waiting without advancing (no message "
            "settled), 0 when none waits; past LANE_STUCK_AFTER_SECONDS /readyz fails. "
            "Reported by the lane's owner only.",
            ["lane"],
            registry=r,
        )
        self.outbox_backlog = Gauge(
            "hub_worker_outbox_backlog_rows",
            f"Outbound events not yet published (past {OUTBOX_BACKLOG_COUNTED:,}, an upper bound"
            " from the ids).",
            registry=r,
        )
        self.outbox_oldest_age = Gauge(
            "hub_worker_outbox_oldest_age_seconds",
            "Age of the next outbound event to publish (the oldest by id), seconds (0 when none).",
            registry=r,
        )
        self.publish_seconds = Histogram(
            "hub_worker_outbox_publish_seconds",
            "Time for JetStream to acknowledge a window of outbound events, seconds.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.published = Counter(
            "hub_worker_outbound_published",
            "Outbound events published by this worker's relay, by type.",
            ["type"],
            registry=r,
        )
        self.publish_failures = Counter(
            "hub_worker_outbox_publish_failures",
            "Outbound publishes that failed, by reason (timeout, no_stream, unavailable, "
            "disconnected: retried; max_payload, too_large, rejected, not_captured: set aside).",
            ["reason"],
            registry=r,
        )
        self.set_aside = Counter(
            "hub_worker_outbox_set_aside",
            "Outbox rows JetStream refused for good, moved to the outbox_set_aside table, "
            "by type and reason.",
            ["type", "reason"],
            registry=r,
        )
        self.relay_stalled = Gauge(
            "hub_worker_relay_stalled_seconds",
            "How long the oldest outbox row has stayed the same, seconds (0 when the outbox "
            "is empty): the relay is not moving while this grows.",
            registry=r,
        )
        self.out_stream_missing = Gauge(
            "hub_worker_outbound_stream_missing",
            "1 when the outbound stream (PU_OUT) was found missing at the last sample, else 0.",
            registry=r,
        )
        self.sweeps = Counter(
            "hub_worker_stall_sweeps", "Stall sweeps run by this worker.", registry=r
        )
        self.lanes_owned = Gauge(
            "hub_worker_lanes_owned", "Inbound lanes this worker owns right now.", registry=r
        )
        self.db_connections = Gauge(
            "hub_worker_db_connections_in_use",
            "PostgreSQL connections in use, by role (lanes, commands).",
            ["role"],
            registry=r,
        )

    def report_lane(
        self, lane: str, *, pending: int, ack_pending: int, lag: float, idle: float
    ) -> None:
        self.consumer_pending.labels(lane).set(pending)
        self.consumer_ack_pending.labels(lane).set(ack_pending)
        self.lane_pending.labels(lane).set(pending + ack_pending)
        self.lane_lag.labels(lane).set(lag)
        self.lane_idle.labels(lane).set(idle)

    def forget_lane(self, lane: str) -> None:
        """This worker no longer owns `lane`: its series go (its next owner reports it)."""
        for gauge in (
            self.consumer_pending,
            self.consumer_ack_pending,
            self.lane_pending,
            self.lane_lag,
            self.lane_idle,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(lane)

    def render(self) -> bytes:
        return generate_latest(self.registry)
