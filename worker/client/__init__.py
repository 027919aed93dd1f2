"""A small Python client of the hub: publish as a spoke, follow alerts.

`Spoke` publishes a spoke's session events (contract section 3), validated by
the same models the worker uses, with the `eventId` as `Nats-Msg-Id`, and waits
for JetStream's ack. `subscribe` follows the detection (and, on request,
mapping and dead-letter) events the worker publishes (section 5) through a
JetStream pull consumer on `HUB_OUT`, as typed models, acking each one only
once it was handled.

Publishing::

    async def main() -> None:
        async with await Spoke.connect("nats://127.0.0.1:4222", "laptop") as spoke:
            await spoke.session_spawned("sess-42", parent_session_id="coord-1", task="refactor")
            await spoke.signal("sess-42", "high_error_count", "high", details={"errors": 42})
            await spoke.session_completed("sess-42", reason="done")

Following high-severity alerts, catching up after being offline; an alert is
acked when `page` returns, and delivered again when it raises::

    async def page(event: AlertEvent) -> None:
        print(event.type, event.detection.anomaly_type, event.detection.session_id)

    async def main() -> None:
        nc = await nats.connect("nats://127.0.0.1:4222", max_reconnect_attempts=-1)
        async with subscribe(nc, durable="pager", severities=["high"]) as alerts:
            await alerts.handle(page)
"""

from worker.client.alerts import AlertEvent, AlertHandler, Alerts, alert_filters, subscribe
from worker.client.spoke import Spoke, publishable_headers
from worker.subjects import out_stream, stream_token

__all__ = [
    "AlertEvent",
    "AlertHandler",
    "Alerts",
    "Spoke",
    "alert_filters",
    "out_stream",
    "publishable_headers",
    "stream_token",
    "subscribe",
]
