"""Connecting to NATS: credentials and TLS, waiting out a server that is not there yet,
and noticing what makes a connection unusable (a refused permission, a closed one)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS

from worker.config import NatsAuth
from worker.constants import RECONNECT_BASE_SECONDS, RECONNECT_MAX_SECONDS
from worker.retry import Backoff
from worker.wire import WireClient

log = structlog.get_logger("worker.connection")

# While a first connection to NATS is still being tried, a log line this often, seconds.
CONNECT_NOTICE_SECONDS = 5.0
# How long a cancelled connect may take to end before it is cancelled again, seconds.
CANCEL_AGAIN_SECONDS = 0.5


class Stopped(Exception):
    """A stop was asked for while waiting for a server to answer."""


class ConnectionUnusable(Exception):
    """NATS refused the worker a permission, or closed the connection for good.

    Waiting does not mend either: the server's configuration must change, so the
    worker stops with the server's reason for its supervisor to report.
    """


# Errors that mean "NATS is not answering right now": wait and try again.
NATS_ERRORS: tuple[type[Exception], ...] = (
    nats.errors.Error,
    nats.js.errors.Error,
    asyncio.TimeoutError,
    ConnectionError,
    OSError,
)


def connect_options(auth: NatsAuth) -> dict[str, Any]:
    """`nats.connect` keyword arguments for the configured credentials and TLS.

    Credentials in a URL (`nats://user:pass@host`, `nats://token@host`) still
    work: nats-py reads them from there when none are given here.
    """
    options: dict[str, Any] = {"inbox_prefix": auth.inbox_prefix}
    if auth.user is not None:
        options |= {"user": auth.user, "password": auth.password}
    if auth.token is not None:
        options["token"] = auth.token
    if auth.nkey_seed_file is not None:
        options["nkeys_seed"] = str(auth.nkey_seed_file)
    if auth.creds_file is not None:
        options["user_credentials"] = str(auth.creds_file)
    if auth.tls:
        # Verifies the server against the given CA (else the system's) and
        # its name against the URL's host, as a browser would.
        context = ssl.create_default_context(
            cafile=str(auth.tls_ca_file) if auth.tls_ca_file else None
        )
        if auth.tls_cert_file is not None:
            context.load_cert_chain(
                str(auth.tls_cert_file),
                str(auth.tls_key_file) if auth.tls_key_file else None,
            )
        options["tls"] = context
    return options


async def _connect(**options: Any) -> NATS:
    """`nats.connect` with the client that reads any bytes the server forwards."""
    nc = WireClient()
    await nc.connect(**options)
    return nc


async def connect(
    auth: NatsAuth,
    urls: list[str],
    name: str = "hub-worker",
    stopping: asyncio.Event | None = None,
) -> tuple[NATS, ConnectionWatch]:
    """Connect, waiting out an unreachable server with backoff instead of failing.

    Raises Stopped when `stopping` is set while it waits, ConnectionUnusable when
    the server refuses what waiting does not mend.
    """
    backoff = Backoff(RECONNECT_BASE_SECONDS, RECONNECT_MAX_SECONDS, stopping=stopping)
    while True:
        # Per attempt: a failed attempt's connection may report itself closed.
        watch = ConnectionWatch()
        connecting = asyncio.ensure_future(
            _connect(
                servers=urls,
                name=name,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                connect_timeout=5,
                allow_reconnect=True,
                error_cb=watch.on_error,
                disconnected_cb=_log_disconnected,
                reconnected_cb=_log_reconnected,
                closed_cb=watch.on_closed,
                **connect_options(auth),
            )
        )
        try:
            # nats-py may keep trying inside connect: say so now and then,
            # and do not make a stop wait for it.
            stop = asyncio.ensure_future(
                stopping.wait() if stopping is not None else asyncio.Event().wait()
            )
            refused = asyncio.ensure_future(watch.refused.wait())
            waited = 0.0
            while not connecting.done() and not stop.done():
                await asyncio.wait(
                    {connecting, stop, refused},
                    timeout=CONNECT_NOTICE_SECONDS,
                    return_when="FIRST_COMPLETED",
                )
                if refused.done() and not connecting.done():
                    stop.cancel()
                    connecting.cancel()
                    raise ConnectionUnusable(watch.reason)
                waited += CONNECT_NOTICE_SECONDS
                if not connecting.done() and not stop.done():
                    # A server that refuses our credentials or our client
                    # certificate is not unreachable: say which, so the operator
                    # looks at those.
                    last = watch.last_error
                    denied = last is not None and any(
                        word in last.lower() for word in ("authorization", "certificate")
                    )
                    log.warning(
                        "nats.refused" if denied else "nats.unreachable",
                        action="nats.connect",
                        waited_seconds=waited,
                        last_error=last,
                    )
            stop.cancel()
            refused.cancel()
            if not connecting.done():
                await _cancel(connecting)
                raise Stopped
            nc = await connecting
            return nc, watch
        except NATS_ERRORS as err:
            delay = backoff.failed()
            log.warning("nats.unreachable", action="nats.connect", error=str(err), retry_in=delay)
            await backoff.sleep(delay)
            if stopping is not None and stopping.is_set():
                raise Stopped from err


async def _cancel(connecting: asyncio.Future[NATS]) -> None:
    """Cancel nats-py's connect and wait until it has ended.

    One cancel can be lost: on Python 3.11, `asyncio.wait_for` (around each of
    nats-py's connection attempts) returns the attempt's outcome instead when the
    attempt ends just as the cancel arrives, and nats-py, refused, goes on to the
    next attempt, for ever: a SIGTERM while waiting for NATS then never stopped the
    worker. So it is cancelled again until it ends.
    """
    while not connecting.done():
        connecting.cancel()
        await asyncio.wait({connecting}, timeout=CANCEL_AGAIN_SECONDS)
    with contextlib.suppress(asyncio.CancelledError, *NATS_ERRORS):
        await connecting


class ConnectionWatch:
    """Logs what nats-py reports about a connection and notices what makes it unusable.

    A refused permission does not close the connection (nats-py reports it to
    error_cb), but what needed it (a subscription, the replies to requests)
    never works, and retrying would hide the cause behind timeouts. A server
    certificate that fails verification leaves nats-py's connect hanging (its
    close after the failed handshake never finishes). Both are configuration,
    not weather: `refused` is set, and the worker stops with the reason.
    """

    def __init__(self) -> None:
        self.unusable = asyncio.Event()
        self.refused = asyncio.Event()
        self.reason: str | None = None
        self.last_error: str | None = None

    async def on_error(self, err: Exception) -> None:
        message = str(err) or type(err).__name__
        self.last_error = message
        if "permissions violation" in message.lower():
            log.error("nats.permission_denied", action="nats.error", error=message)
            self._refuse(f"NATS refused a permission: {message}")
        elif isinstance(err, ssl.SSLCertVerificationError):
            log.error("nats.tls_refused", action="nats.error", error=message)
            self._refuse(f"TLS: the NATS server's certificate was not accepted: {message}")
        else:
            log.warning("nats.error", action="nats.error", error=message)

    async def on_closed(self) -> None:
        self._set("NATS closed the connection")

    def _refuse(self, reason: str) -> None:
        self._set(reason)
        self.refused.set()

    def _set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.unusable.set()


async def _log_disconnected() -> None:
    log.warning("nats.disconnected", action="nats.disconnected")


async def _log_reconnected() -> None:
    log.info("nats.reconnected", action="nats.reconnected")
