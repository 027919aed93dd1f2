"""What arrives from NATS, byte for byte: a narrow adaptation of nats-py's client.

The NATS server forwards any bytes a publisher put in a subject token or a
header; nats-py 2.16 assumes well-formed ones. Three places of its reader are
replaced here, each keeping its behaviour for well-formed messages:

- `_build_message` decodes the subject and reply with `strict` UTF-8; one
  subject token that is not UTF-8 raises inside the read loop, which then ends
  without reconnecting: every subscription of the connection goes silent, and
  after a restart the same stored message stops it again. Here they are decoded
  with `surrogateescape`, so `raw(msg.subject)` gives the exact bytes back.
  (No upstream issue found for subjects as of nats-py 2.16; for headers see
  nats-io/nats.py#491 and #924, which made values decode with `replace`.)
- `_parse_header_lines` decodes values with `replace` (lossy) and drops names
  that are not ASCII; here both keep their bytes through `surrogateescape`.
  `_process_headers` decodes an inline status line strictly; a line that is not
  UTF-8 is read as ordinary header lines instead of raising.
- nats-py's protocol parser splits a `MSG`/`HMSG` line on `\\s`, which takes
  a vertical tab or form feed inside a subject token for a separator; the
  line then never parses and the reader waits for good. The protocol
  separates fields with space or tab only (as the server's parser does):
  `_PROTOCOL_LINES` replace the two expressions, for every nats-py client in
  the process (they are module globals of `nats.protocol.parser`).
- A message a consumer delivers from a stream (its reply is a `$JS.ACK.`
  subject) never carries a status of the server, but a publisher may have put a
  `Status` header on it (`Status: 404`, or an inline `NATS/1.0 408` line). nats-py
  reads that header as the server's answer to the pull: it drops the message, or
  raises for other codes, and the lane would wait for it forever. Such a header
  is withheld from `headers` (`is_status_msg` reads it there) and kept in
  `WireMsg.withheld_headers`, so the message is handled and stored like any other.

`delivery` reads the two numbers of a delivery's reply subject that every message
needs, without the datetime and dataclasses of nats-py's `Msg.metadata`.

What leaves: `publication` frames one JetStream publish (an `HPUB` with its
`Nats-Msg-Id`) and `send_publications` hands a window of them to the connection
as one write. nats-py's `publish` does the same one message at a time, at about
four times the CPU (its header loop, checks and a flush kick per message: a
tenth of a drain's worker time went to the relay's publishes). Two checks are
the server's own rather than nats-py's: a subject, reply or header value may not
hold a space, tab, CR or LF (one would end the control line and let the rest be
read as protocol), and the header block counts toward `max_payload` with the
body. nats-py compares the body alone, so a body a few bytes under the limit
went out and the server closed the connection (`Maximum Payload Violation`):
the worker stopped, and after a restart the same row stopped it again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import nats.errors
import nats.protocol.parser
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError
from nats.js.api import Header

# Replies of messages that a JetStream consumer delivers from its stream.
_STREAM_DELIVERY = b"$JS.ACK."
_NATS_HEADER_LINE = b"NATS/1.0"
_CRLF = b"\r\n"

# `MSG <subject> <sid> [reply-to] <#bytes>` and `HMSG ... <#header bytes> <#bytes>`,
# fields separated by spaces or tabs only, as the NATS protocol has them.
_FIELD = rb"([^ \t\r\n]+)"
_GAP = rb"[ \t]+"
_PROTOCOL_LINES = {
    "MSG_RE": re.compile(
        rb"\AMSG" + _GAP + _FIELD + _GAP + _FIELD + _GAP + rb"(" + _FIELD + _GAP + rb")?(\d+)\r\n"
    ),
    "HMSG_RE": re.compile(
        rb"\AHMSG" + _GAP + _FIELD + _GAP + _FIELD + _GAP + rb"(" + _FIELD + _GAP + rb")?"
        rb"(\d+)" + _GAP + rb"(\d+)\r\n"
    ),
}
for _name, _expression in _PROTOCOL_LINES.items():
    setattr(nats.protocol.parser, _name, _expression)

# What ends a field of a control line, or a header line.
_PROTOCOL_GAPS = re.compile(r"[ \t\r\n]")


class Delivery(NamedTuple):
    """What a lane reads of every message's reply subject."""

    consumer_sequence: int  # `Msg.metadata.sequence.consumer`
    deliveries: int  # `Msg.metadata.num_delivered`


def delivery(msg: Msg) -> Delivery:
    """`msg.metadata`'s consumer sequence and number of deliveries, read from the reply
    subject as nats-py reads them: `$JS.ACK.<stream>.<consumer>.<delivered>.<stream
    seq>.<consumer seq>.<timestamp>.<pending>` (9 tokens), or with the domain and
    account hash after `ACK` (11 tokens, or more: a random token at the end).

    Raises NotJSMessageError where nats-py does (no reply, another form), ValueError
    where one of these two tokens is not a number. Unlike `Msg.metadata`, the other
    numbers (stream sequence, timestamp, pending), which the server writes, are not
    parsed, nor a datetime built: a dead letter and a log line read those from
    `msg.metadata` (tests/unit/test_wire.py compares the two).
    """
    if not msg.reply:
        raise NotJSMessageError
    tokens = msg.reply.split(".")
    if len(tokens) < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
        raise NotJSMessageError
    if len(tokens) == 9:
        return Delivery(int(tokens[6]), int(tokens[4]))
    if len(tokens) >= 11:
        return Delivery(int(tokens[8]), int(tokens[6]))
    raise NotJSMessageError


def raw(text: str) -> bytes:
    """The bytes a text decoded here came from."""
    return text.encode("utf-8", "surrogateescape")


@dataclass
class WireMsg(Msg):
    """A message with the headers nats-py would have misread kept aside."""

    withheld_headers: dict[str, str] | None = None

    def published_headers(self) -> dict[str, str] | None:
        """Every header as the publisher sent it (names and values through `raw`)."""
        if not self.withheld_headers:
            return self.headers
        return {**(self.headers or {}), **self.withheld_headers}


class WireClient(Client):
    """nats-py's client, reading every byte sequence the server forwards."""

    msg_class: type[Msg] = WireMsg

    def _build_message(
        self,
        sid: int,
        subject: bytes,
        reply: bytes,
        data: bytes,
        headers: dict[str, str] | None,
    ) -> WireMsg:
        withheld = None
        if headers and reply.startswith(_STREAM_DELIVERY) and Header.STATUS in headers:
            # In place: nats-py goes on reading this same dict for control messages.
            withheld = {Header.STATUS.value: headers.pop(Header.STATUS)}
        return WireMsg(
            subject=subject.decode("utf-8", "surrogateescape"),
            reply=reply.decode("utf-8", "surrogateescape"),
            data=data,
            headers=headers or None,
            _client=self,
            _sid=sid,
            withheld_headers=withheld,
        )

    @staticmethod
    def _parse_header_lines(raw_block: bytes) -> dict[str, str]:
        headers: dict[str, str] = {}
        for line in raw_block.split(_CRLF):
            name, colon, value = line.partition(b":")
            if not colon:
                continue
            key = name.strip().decode("utf-8", "surrogateescape")
            # Empty, or whitespace inside (`str.split` splits where `isspace` is true).
            if len(key.split()) != 1:
                continue
            headers[key] = value.strip().decode("utf-8", "surrogateescape")
        return headers

    async def _process_headers(self, headers: Any) -> dict[str, str] | None:
        try:
            return await super()._process_headers(headers)
        except UnicodeDecodeError:
            # Only a status line can raise: the server's own are ASCII, so this
            # one came from a publisher. Its lines are read as plain headers.
            block = bytes(headers)
            first_line_end = block.find(_CRLF)
            if not block.startswith(_NATS_HEADER_LINE) or first_line_end < 0:
                return None
            return self._parse_header_lines(block[first_line_end + len(_CRLF) :]) or None


def publication(subject: str, reply: str, msg_id: str, payload: bytes, max_payload: int) -> bytes:
    """One `HPUB` of `payload` to `subject` with `Nats-Msg-Id: msg_id`, its ack to `reply`.

    Raises BadSubjectError for a subject or reply that would not be one field of the
    control line (empty, or holding a space, tab, CR or LF), BadHeaderError for such
    a message id, MaxPayloadError when the header block and the payload together
    exceed the server's `max_payload` (the server would close the connection).
    """
    if not subject or _PROTOCOL_GAPS.search(subject) or _PROTOCOL_GAPS.search(reply):
        raise nats.errors.BadSubjectError
    if not msg_id or _PROTOCOL_GAPS.search(msg_id):
        raise nats.errors.BadHeaderError(msg_id)
    header = b"NATS/1.0\r\nNats-Msg-Id: " + msg_id.encode() + b"\r\n\r\n"
    size = len(header) + len(payload)
    if size > max_payload:
        raise nats.errors.MaxPayloadError
    return b"HPUB %b %b %d %d\r\n%b%b\r\n" % (
        subject.encode(),
        reply.encode(),
        len(header),
        size,
        header,
        payload,
    )


async def send_publications(nc: Client, frames: list[bytes]) -> None:
    """Queue `publication`s on `nc` as one write, in this order, and kick its flusher.

    All or nothing: raises what nats-py's `publish` raises for the connection's state
    (closed, draining, or disconnected with no room in the reconnect buffer), and
    then none of them was sent. Uses nats-py 2.16's `_send_command`, the call its
    `publish` ends in.
    """
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise nats.errors.ConnectionDrainingError
    command = b"".join(frames)
    if not nc.is_connected and (
        nc._max_pending_size <= 0 or len(command) + nc._pending_data_size > nc._max_pending_size
    ):
        raise nats.errors.OutboundBufferLimitError
    nc.stats["out_msgs"] += len(frames)
    nc.stats["out_bytes"] += len(command)
    await nc._send_command(command)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()
