"""worker.wire reads every byte sequence the server forwards (no server needed here)."""

from __future__ import annotations

import pytest
from nats.protocol.parser import Parser

from worker.wire import WireClient, WireMsg, raw


class _Recorder:
    """Stands in for the client the parser hands complete messages to."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes, bytes, bytes | None]] = []

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        self.messages.append((subject, reply, data, headers))


@pytest.mark.parametrize("odd", [b"\x0b", b"\x0c", b"\x00", b"\xff\xfe", b"\x1b[0m"])
async def test_the_parser_splits_protocol_lines_on_space_and_tab_only(odd: bytes) -> None:
    subject = b"hub.spoke.a.session.s" + odd + b"1.started"
    recorder = _Recorder()
    parser = Parser(recorder)
    await parser.parse(b"MSG " + subject + b" 7 $JS.ACK.x 2\r\nhi\r\n")
    await parser.parse(b"HMSG " + subject + b"\t7 12 14\r\nNATS/1.0\r\n\r\nhi\r\n")
    assert recorder.messages == [
        (subject, b"$JS.ACK.x", b"hi", None),
        (subject, b"", b"hi", b"NATS/1.0\r\n\r\n"),
    ]


def _build(reply: bytes, headers: dict[str, str] | None) -> WireMsg:
    return WireClient()._build_message(1, b"hub.\xff.x", reply, b"{}", headers)


def test_a_subject_that_is_not_utf8_comes_back_byte_for_byte() -> None:
    msg = _build(b"", None)
    assert raw(msg.subject) == b"hub.\xff.x"


def test_a_status_header_on_a_stored_message_is_withheld_from_nats_py() -> None:
    headers = {"Status": "404", "X-Trace": "abc"}
    msg = _build(b"$JS.ACK.S.C.1.2.3.4.0", headers)
    assert msg.headers == {"X-Trace": "abc"}
    assert headers == {"X-Trace": "abc"}  # the dict nats-py goes on reading, too
    assert msg.published_headers() == {"X-Trace": "abc", "Status": "404"}


def test_the_servers_own_status_messages_keep_their_status() -> None:
    msg = _build(b"", {"Status": "408", "Description": "Request Timeout"})
    assert msg.headers == {"Status": "408", "Description": "Request Timeout"}


def test_header_names_and_values_keep_their_bytes() -> None:
    parsed = WireClient._parse_header_lines(b"X-A: v\x00\xff\r\nN\xe9: ok\r\nno colon\r\n")
    assert {raw(k): raw(v) for k, v in parsed.items()} == {b"X-A": b"v\x00\xff", b"N\xe9": b"ok"}


async def test_an_inline_status_line_that_is_not_utf8_is_read_as_plain_headers() -> None:
    parsed = await WireClient()._process_headers(b"NATS/1.0 40\xff4 x\r\nX-A: 1\r\n\r\n")
    assert parsed == {"X-A": "1"}
