"""worker.wire reads every byte sequence the server forwards (no server needed here)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.msg import Msg
from nats.errors import BadHeaderError, BadSubjectError, MaxPayloadError, NotJSMessageError
from nats.protocol.command import hpub_cmd
from nats.protocol.parser import Parser

from worker.wire import WireClient, WireMsg, delivery, publication, raw


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


# --- delivery: the reply subject's numbers, as Msg.metadata reads them ---------------

_TOKEN = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters=".*> \t\r\n"),
    min_size=1,
    max_size=12,
)
_NUMBER = st.integers(min_value=0, max_value=2**64 - 1)
# Nanoseconds since the epoch that Python's datetime can hold (nats-py builds one).
_NANOS = st.integers(min_value=0, max_value=250_000_000_000 * 10**9)


def _msg(reply: str) -> Msg:
    return Msg(_client=None, subject="x", reply=reply)  # type: ignore[arg-type]


@st.composite
def _replies(draw: st.DrawFn) -> str:
    """A reply subject in one of the forms JetStream writes."""
    numbers = [str(draw(_NUMBER)) for _ in range(3)]
    tail = [str(draw(_NANOS)), str(draw(_NUMBER))]
    names = [draw(_TOKEN), draw(_TOKEN)]
    if draw(st.booleans()):  # without domain and account hash
        return ".".join(["$JS", "ACK", *names, *numbers, *tail])
    domain = draw(st.just("_") | _TOKEN)
    extra = draw(st.lists(_TOKEN, max_size=2))  # the random token, or none
    return ".".join(["$JS", "ACK", domain, draw(_TOKEN), *names, *numbers, *tail, *extra])


@given(_replies())
def test_delivery_reads_what_msg_metadata_reads(reply: str) -> None:
    meta = _msg(reply).metadata
    assert delivery(_msg(reply)) == (meta.sequence.consumer, meta.num_delivered)


_SOME_TOKENS = st.lists(
    _TOKEN | _NUMBER.map(str) | st.sampled_from(["$JS", "ACK", "", "-1", "+2", " 3", "4_0"]),
    max_size=14,
).map(".".join)


@given(_SOME_TOKENS | _SOME_TOKENS.map("$JS.ACK.".__add__) | st.text(max_size=40))
def test_delivery_refuses_where_msg_metadata_refuses(reply: str) -> None:
    # nats-py also parses the other numbers (and a datetime of the timestamp), which
    # the server writes: a reply where only those are not numbers is refused by
    # Msg.metadata alone. Otherwise both give the same, or both refuse alike.
    try:
        meta = _msg(reply).metadata
    except NotJSMessageError:
        with pytest.raises(NotJSMessageError):
            delivery(_msg(reply))
        return
    except (ValueError, OverflowError, OSError):
        meta = None
    try:
        got = delivery(_msg(reply))
    except ValueError:
        assert meta is None
        return
    if meta is not None:
        assert got == (meta.sequence.consumer, meta.num_delivered)


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "$JS.ACK",
        "$JS.ACK.s.c.1.2.3.4",  # 8 tokens
        "$JS.ACK.d.h.s.c.1.2.3.4",  # 10 tokens
        "$JS.NAK.s.c.1.2.3.4.5",
        "_INBOX.abc.1.2.3.4.5.6.7",
    ],
)
def test_delivery_refuses_a_reply_that_is_not_a_deliverys(reply: str) -> None:
    with pytest.raises(NotJSMessageError):
        _msg(reply).metadata  # noqa: B018
    with pytest.raises(NotJSMessageError):
        delivery(_msg(reply))


def test_delivery_reads_both_forms() -> None:
    assert delivery(_msg("$JS.ACK.IN.lane-3.2.1001.17.1733100000123456789.40")) == (17, 2)
    assert delivery(_msg("$JS.ACK._.AH.IN.lane-3.1.1001.18.1733100000123456789.39.r4nd")) == (
        18,
        1,
    )
    assert delivery(_msg("$JS.ACK.hub.AH.IN.lane-3.5.1001.19.1733100000123456789.38")) == (19, 5)


_TOKEN = st.text(
    st.characters(blacklist_characters=" \t\r\n.", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=20,
)


@given(
    subject=st.lists(_TOKEN, min_size=1, max_size=6).map(".".join),
    msg_id=_TOKEN,
    payload=st.binary(max_size=200),
)
def test_a_publication_is_framed_as_nats_py_frames_a_publish(
    subject: str, msg_id: str, payload: bytes
) -> None:
    header = b"NATS/1.0\r\nNats-Msg-Id: " + msg_id.encode() + b"\r\n\r\n"
    framed = publication(subject, "_INBOX.a.1", msg_id, payload, 1 << 20)
    assert framed == hpub_cmd(subject, "_INBOX.a.1", header, payload)


@pytest.mark.parametrize("gap", [" ", "\t", "\r", "\n"])
def test_a_field_that_would_end_the_control_line_is_refused(gap: str) -> None:
    with pytest.raises(BadSubjectError):
        publication(f"hub.mapping{gap}x", "_INBOX.a.1", "id", b"{}", 1 << 20)
    with pytest.raises(BadSubjectError):
        publication("hub.mapping.x", f"_INBOX{gap}a.1", "id", b"{}", 1 << 20)
    with pytest.raises(BadHeaderError):
        publication("hub.mapping.x", "_INBOX.a.1", f"id{gap}PUB x 1", b"{}", 1 << 20)
    with pytest.raises(BadSubjectError):
        publication("", "_INBOX.a.1", "id", b"{}", 1 << 20)


def test_the_header_block_counts_toward_max_payload() -> None:
    header = len(b"NATS/1.0\r\nNats-Msg-Id: id\r\n\r\n")
    assert publication("hub.x", "_INBOX.a.1", "id", b"x" * (100 - header), 100)
    with pytest.raises(MaxPayloadError):
        publication("hub.x", "_INBOX.a.1", "id", b"x" * (101 - header), 100)
