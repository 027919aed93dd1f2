"""Forms of arbitrary bytes that PostgreSQL text and jsonb can store, pure.

Text and jsonb refuse U+0000 and anything that is not UTF-8 (nor can a lone
surrogate, which is how `worker.wire` carries such bytes in a `str`, be
encoded). A dead letter keeps a readable form in its text columns and, when
that form is not exact, the bytes beside it (migration 0005).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# What text and jsonb refuse in a str: U+0000, and lone surrogates (no UTF-8).
UNSTORABLE_TEXT = re.compile("[\x00\ud800-\udfff]")
# What a readable form must spell out: NUL, and the backslash itself so that
# an escape in the readable form is never mistaken for one in the original.
_SPELLED_OUT = re.compile(r"[\x00\\]")


def readable(raw: bytes) -> str:
    """`raw` as text; when it is not UTF-8 or holds NUL, such bytes and backslashes as \\xNN."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        if "\x00" not in text:
            return text  # the common case: exact, and storable as it is
    parts: list[str] = []
    while raw:
        try:
            parts.append(_spell_out(raw.decode("utf-8")))
            break
        except UnicodeDecodeError as err:
            parts.append(_spell_out(raw[: err.start].decode("utf-8")))
            parts.extend(f"\\x{byte:02x}" for byte in raw[err.start : err.end])
            raw = raw[err.end :]
    return "".join(parts)


def readable_text(text: str) -> str:
    """`readable` of the bytes a text decoded with surrogateescape came from (worker.wire);
    an ASCII text without NUL, any subject a client library sends, is its own."""
    if text.isascii() and "\x00" not in text:
        return text
    return readable(text.encode("utf-8", "surrogateescape"))


def _spell_out(text: str) -> str:
    return _SPELLED_OUT.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def ascii_only(text: str) -> str:
    """`text` with everything outside printable ASCII escaped: storable by any column."""
    return text.encode("ascii", "backslashreplace").decode("ascii").replace("\x00", "\\x00")


@dataclass(frozen=True)
class StoredForms:
    """A message's subject and headers as a dead letter stores them."""

    subject: str
    subject_bytes: bytes | None  # None when `subject` is exact
    headers: dict[str, str] | None
    headers_bytes: bytes | None  # None when `headers` is exact


def stored_forms(subject: bytes, headers: dict[bytes, bytes] | None) -> StoredForms:
    """Readable forms of a subject and headers, with their bytes where those differ."""
    readable_subject = readable(subject)
    readable_headers = None
    headers_bytes = None
    if headers:
        forms = [(readable(k), readable(v)) for k, v in headers.items()]
        readable_headers = dict(forms)
        exact = len(readable_headers) == len(headers) and all(
            name.encode() == k and value.encode() == v
            for (name, value), (k, v) in zip(forms, headers.items(), strict=True)
        )
        if not exact:
            headers_bytes = header_block(headers)
    return StoredForms(
        readable_subject,
        None if readable_subject.encode() == subject else subject,
        readable_headers,
        headers_bytes,
    )


def header_block(headers: dict[bytes, bytes]) -> bytes:
    """Headers in the NATS wire form, as a publisher would send them."""
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers.items())
    return b"NATS/1.0\r\n" + lines + b"\r\n"
