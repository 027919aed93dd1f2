"""A tiny client of the raw NATS text protocol, for sending what nats-py refuses to send.

nats-py (and nats.js) encode subjects and headers from `str` and check them; the
NATS server is far less strict. This client speaks the protocol over asyncio
streams with raw bytes everywhere: subjects, reply subjects, the header block
(built by the caller, so it may hold NUL, control bytes, invalid UTF-8 or an
inline status line) and the payload. It subscribes to one reply inbox so that a
publish to a JetStream subject can wait for the stream's ack and so know the
server stored the message.

Protocol: https://docs.nats.io/reference/reference-protocols/nats-protocol
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

CRLF = b"\r\n"
HEADER_VERSION = b"NATS/1.0"
CONNECT_OPTIONS = {
    "verbose": False,
    "pedantic": False,
    "headers": True,
    "no_responders": True,
    "protocol": 1,
    "lang": "python-raw",
    "version": "0",
}


class RawNatsError(Exception):
    """The server answered -ERR, or closed the connection."""


@dataclass(frozen=True)
class Message:
    """A MSG or HMSG as received: every part raw."""

    subject: bytes
    reply: bytes | None
    headers: bytes | None  # the whole header block, "NATS/1.0...\r\n\r\n"
    payload: bytes

    @property
    def status(self) -> bytes | None:
        """The inline status of the header block ("503" for no responders), if any."""
        if self.headers is None:
            return None
        first = self.headers.split(CRLF, 1)[0]
        parts = first.split(b" ", 2)
        return parts[1] if len(parts) > 1 and parts[1] else None


@dataclass(frozen=True)
class Ack:
    """A JetStream publish ack: stored (`stream`, `seq`) or refused (`error`)."""

    stream: str | None = None
    seq: int | None = None
    duplicate: bool = False
    error: dict[str, Any] | None = None

    @property
    def stored(self) -> bool:
        return self.error is None and self.seq is not None


def header_block(pairs: Iterable[tuple[bytes, bytes]] = (), status: bytes | None = None) -> bytes:
    """`NATS/1.0[ status]\\r\\n` + `name: value\\r\\n`... + `\\r\\n`, bytes taken as given."""
    first = HEADER_VERSION + (b" " + status if status else b"")
    lines = b"".join(name + b": " + value + CRLF for name, value in pairs)
    return first + CRLF + lines + CRLF


@dataclass
class RawNats:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    info: dict[str, Any]
    errors: list[bytes] = field(default_factory=list)
    _inbox: bytes = b""
    _next_sid: int = 1
    _next_reply: int = 1
    _pongs: list[asyncio.Future[None]] = field(default_factory=list)
    _replies: dict[bytes, asyncio.Future[Message]] = field(default_factory=dict)
    _subscriptions: dict[int, asyncio.Queue[Message]] = field(default_factory=dict)
    _read_task: asyncio.Task[None] | None = None
    _closed: BaseException | None = None

    # --- connection --------------------------------------------------------------

    @classmethod
    async def connect(cls, url: str, within: float = 5.0) -> RawNats:
        """Connect to the first server of a nats:// URL (no TLS, no auth)."""
        parts = urlsplit(url.split(",")[0])
        host, port = parts.hostname or "127.0.0.1", parts.port or 4222
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(host, port)
            line = await reader.readuntil(CRLF)
            if not line.startswith(b"INFO "):
                writer.close()
                raise RawNatsError(f"expected INFO, got {line[:80]!r}")
            info: dict[str, Any] = json.loads(line[5:])
            client = cls(reader, writer, info)
            writer.write(b"CONNECT " + json.dumps(CONNECT_OPTIONS).encode() + CRLF)
            client._read_task = asyncio.create_task(client._read_loop(), name="rawnats-reader")
            await client.ping()
            client._inbox = b"_INBOX.raw" + os.urandom(8).hex().encode()
            await client._sub_raw(client._inbox + b".*", sid=0)
            await client.ping()
        return client

    @property
    def max_payload(self) -> int:
        """The server's limit on header block plus payload, from its INFO."""
        return int(self.info["max_payload"])

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def close(self) -> None:
        if self._read_task is not None:
            self._read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._read_task
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    async def __aenter__(self) -> RawNats:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- protocol operations ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed is not None:
            raise RawNatsError(f"connection closed: {self._closed}; {self.errors!r}")

    async def _send(self, data: bytes) -> None:
        self._check_open()
        self.writer.write(data)
        try:
            await self.writer.drain()
        except ConnectionError as err:
            self._fail(err)
            raise RawNatsError(f"connection lost: {err}; {self.errors!r}") from err

    async def ping(self, within: float = 5.0) -> None:
        """PING, and wait for the PONG: everything sent before has been processed."""
        self._check_open()
        pong: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs.append(pong)
        await self._send(b"PING" + CRLF)
        async with asyncio.timeout(within):
            await pong

    async def pub(
        self,
        subject: bytes,
        payload: bytes,
        headers: bytes | None = None,
        reply: bytes | None = None,
    ) -> None:
        """PUB, or HPUB when `headers` (a whole block, see `header_block`) is given."""
        self._check_open()
        reply_part = b" " + reply if reply else b""
        if headers is None:
            command = b"PUB " + subject + reply_part + b" %d" % len(payload) + CRLF
        else:
            total = len(headers) + len(payload)
            command = (
                b"HPUB " + subject + reply_part + b" %d %d" % (len(headers), total) + CRLF + headers
            )
        await self._send(command + payload + CRLF)

    async def sub(self, subject: bytes) -> tuple[int, asyncio.Queue[Message]]:
        sid = self._next_sid
        self._next_sid += 1
        return sid, await self._sub_raw(subject, sid)

    async def _sub_raw(self, subject: bytes, sid: int) -> asyncio.Queue[Message]:
        self._check_open()
        queue: asyncio.Queue[Message] = asyncio.Queue()
        self._subscriptions[sid] = queue
        await self._send(b"SUB " + subject + b" %d" % sid + CRLF)
        return queue

    async def unsub(self, sid: int) -> None:
        self._check_open()
        self._subscriptions.pop(sid, None)
        await self._send(b"UNSUB %d" % sid + CRLF)

    async def request(
        self,
        subject: bytes,
        payload: bytes,
        headers: bytes | None = None,
        within: float = 5.0,
    ) -> Message:
        """Publish with a reply subject of our inbox and wait for the one reply.

        A PING right after the publish makes an -ERR about it (which comes instead
        of any reply) raise RawNatsError at once rather than a timeout.
        """
        reply = self._inbox + b".%d" % self._next_reply
        self._next_reply += 1
        answer: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._replies[reply] = answer
        errors_before = len(self.errors)
        try:
            await self.pub(subject, payload, headers=headers, reply=reply)
            try:
                await self.ping(within=within)
            except RawNatsError as err:
                raise RawNatsError(
                    f"server refused the publish: {self.errors[errors_before:]!r}"
                ) from err
            if len(self.errors) > errors_before:
                raise RawNatsError(f"server refused the publish: {self.errors[errors_before:]!r}")
            async with asyncio.timeout(within):
                return await answer
        finally:
            self._replies.pop(reply, None)

    async def publish_stored(
        self,
        subject: bytes,
        payload: bytes,
        headers: bytes | None = None,
        within: float = 5.0,
    ) -> Ack:
        """Publish to a JetStream subject and return the stream's ack (or its refusal).

        A reply that is a status (503: no stream captures the subject) becomes an
        Ack with an `error` too; a server -ERR on the publish raises RawNatsError.
        """
        reply = await self.request(subject, payload, headers=headers, within=within)
        if reply.status is not None:
            return Ack(error={"status": reply.status.decode(errors="replace")})
        document = json.loads(reply.payload)
        if "error" in document:
            return Ack(error=document["error"])
        return Ack(
            stream=document.get("stream"),
            seq=document.get("seq"),
            duplicate=bool(document.get("duplicate", False)),
        )

    # --- reading ---------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                line = (await self.reader.readuntil(CRLF))[:-2]
                op, _, rest = line.partition(b" ")
                op = op.upper()
                if op == b"PING":
                    self.writer.write(b"PONG" + CRLF)
                elif op == b"PONG":
                    if self._pongs:
                        pong = self._pongs.pop(0)
                        if not pong.done():
                            pong.set_result(None)
                elif op in (b"MSG", b"HMSG"):
                    await self._read_message(op, [a for a in rest.split(b" ") if a])
                elif op == b"-ERR":
                    self.errors.append(rest)
                elif op in (b"+OK", b"INFO"):
                    pass
                else:
                    raise RawNatsError(f"unexpected from server: {line[:80]!r}")
        except (asyncio.IncompleteReadError, ConnectionError, RawNatsError) as err:
            self._fail(err)
        except asyncio.CancelledError:
            self._fail(RawNatsError("closed"))
            raise

    async def _read_message(self, op: bytes, args: list[bytes]) -> None:
        if op == b"MSG":
            # MSG <subject> <sid> [reply-to] <#bytes>
            subject, sid, *middle, size = args
            header_size, total = 0, int(size)
        else:
            # HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>
            subject, sid, *middle, hsize, tsize = args
            header_size, total = int(hsize), int(tsize)
        data = await self.reader.readexactly(total + 2)
        headers = data[:header_size] if op == b"HMSG" else None
        message = Message(subject, middle[0] if middle else None, headers, data[header_size:total])
        answer = self._replies.get(subject)
        if answer is not None and not answer.done():
            answer.set_result(message)
            return
        queue = self._subscriptions.get(int(sid))
        if queue is not None:
            queue.put_nowait(message)

    def _fail(self, err: BaseException) -> None:
        if self._closed is None:
            self._closed = err
        waiting: list[asyncio.Future[Any]] = [*self._pongs, *self._replies.values()]
        self._pongs.clear()
        for future in waiting:
            if not future.done():
                future.set_exception(RawNatsError(f"connection closed: {err}; {self.errors!r}"))
                # Whoever awaits it still gets the error; nobody waiting is fine too.
                future.exception()
