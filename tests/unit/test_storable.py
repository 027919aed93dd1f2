"""Readable forms of any bytes, and the exact bytes beside them (worker.storable)."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from worker.storable import ascii_only, header_block, readable, readable_text, stored_forms

_ESCAPE = re.compile(rb"\\x([0-9a-f]{2})")


def _unescape(text: str) -> bytes:
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8"))


@given(st.binary(max_size=200))
def test_a_readable_form_is_storable_and_gives_the_bytes_back(raw: bytes) -> None:
    text = readable(raw)
    assert "\x00" not in text
    text.encode("utf-8")  # no lone surrogates: PostgreSQL text takes it
    exact = text.encode("utf-8") == raw
    assert exact or _unescape(text) == raw


@given(st.text(max_size=100).filter(lambda t: "\x00" not in t and "\\" not in t))
def test_utf8_without_nul_is_its_own_readable_form(text: str) -> None:
    raw = text.encode("utf-8", "surrogatepass")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return
    assert readable(raw) == text


def test_examples() -> None:
    assert readable(b"hub.spoke.a.session.b.started") == "hub.spoke.a.session.b.started"
    assert readable(b"hub.\xff\xfe.x") == "hub.\\xff\\xfe.x"
    assert readable(b"a\x00b") == "a\\x00b"
    assert readable(b"a\\b\x00") == "a\\x5cb\\x00"  # the backslash too, once escaping
    assert readable("é".encode()) == "é"


def test_stored_forms_keep_bytes_only_where_the_text_is_not_exact() -> None:
    plain = stored_forms(b"hub.x", {b"X-Trace": b"abc"})
    assert (plain.subject_bytes, plain.headers_bytes) == (None, None)
    odd = stored_forms(b"hub.\xff", {b"X-Trace": b"a\x00b", b"N\xe9": b"ok"})
    assert odd.subject == "hub.\\xff"
    assert odd.subject_bytes == b"hub.\xff"
    assert odd.headers == {"X-Trace": "a\\x00b", "N\\xe9": "ok"}
    assert odd.headers_bytes == b"NATS/1.0\r\nX-Trace: a\x00b\r\nN\xe9: ok\r\n\r\n"


def test_header_block_is_the_nats_wire_form() -> None:
    assert header_block({b"A": b"1"}) == b"NATS/1.0\r\nA: 1\r\n\r\n"


@given(st.text(max_size=100))
def test_ascii_only_is_printable_ascii_without_nul(text: str) -> None:
    out = ascii_only(text)
    assert out.isascii()
    assert "\x00" not in out


@given(st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode)))
def test_readable_text_is_readable_of_the_bytes_a_wire_text_came_from(data: bytes) -> None:
    # What worker.wire hands over: the bytes decoded with surrogateescape.
    text = data.decode("utf-8", "surrogateescape")
    assert readable_text(text) == readable(data)


def test_readable_text_spells_out_nul_and_bytes_that_are_not_utf8() -> None:
    assert readable_text("a.b") == "a.b"
    assert readable_text("a\x00b") == "a\\x00b"
    assert readable_text(b"a\xffb".decode("utf-8", "surrogateescape")) == "a\\xffb"
