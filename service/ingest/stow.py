"""multipart/related (RFC 2387) as STOW-RS sends it: parse a request body that was spooled to disk."""

from __future__ import annotations

import mmap
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from service.errors import InvalidInput, UnsupportedMediaType

_PARAM = re.compile(r';\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


@dataclass(frozen=True)
class ContentType:
    media_type: str
    params: dict[str, str]


def parse_content_type(header: str) -> ContentType:
    media_type, _, rest = header.partition(";")
    params: dict[str, str] = {}
    for match in _PARAM.finditer(";" + rest):
        value = match.group(2)
        if value.startswith('"') and value.endswith('"'):
            value = value[1:-1].replace('\\"', '"')
        params[match.group(1).lower()] = value
    return ContentType(media_type.strip().lower(), params)


def related_boundary(header: str | None, *, expected_type: str = "application/dicom") -> bytes:
    """Check a STOW-RS request's Content-Type and return its boundary.

    Raises:
        UnsupportedMediaType: not multipart/related, or a ``type`` other than ``expected_type``.
        InvalidInput: no boundary.
    """
    if not header:
        raise UnsupportedMediaType('Content-Type is required: multipart/related; type="application/dicom"')
    content_type = parse_content_type(header)
    if content_type.media_type != "multipart/related":
        raise UnsupportedMediaType(f"Content-Type must be multipart/related, not {content_type.media_type}")
    declared = content_type.params.get("type", expected_type).lower()
    if declared != expected_type:
        raise UnsupportedMediaType(f"multipart/related type {declared!r} is not supported; use {expected_type!r}")
    boundary = content_type.params.get("boundary")
    if not boundary or len(boundary) > 70:
        raise InvalidInput("multipart/related needs a boundary parameter of 1 to 70 characters")
    return boundary.encode("latin-1")


@dataclass(frozen=True)
class Part:
    index: int
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return parse_content_type(self.headers.get("content-type", "application/octet-stream")).media_type


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n"):
        if not line.strip():
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise InvalidInput(f"malformed part header line: {line[:80]!r}")
        headers[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
    return headers


def iter_parts(body: BinaryIO, boundary: bytes, *, max_parts: int) -> Iterator[Part]:
    """Yield the parts of a multipart body held in a real file (memory-mapped, not read whole, one part's bytes at a
    time). The whole body's framing is checked before the first part is yielded, so that a request whose framing
    is broken (a truncated upload) is refused before any of its parts is stored.

    Raises:
        InvalidInput: no opening or closing delimiter, a malformed part header, or more than ``max_parts`` parts.
    """
    body.seek(0, 2)
    if body.tell() == 0:
        raise InvalidInput("empty request body")
    with mmap.mmap(body.fileno(), 0, access=mmap.ACCESS_READ) as data:
        delimiter = b"--" + boundary
        start = data.find(delimiter)
        if start < 0 or (start > 0 and data[start - 2 : start] != b"\r\n"):
            if start != 0:
                raise InvalidInput("multipart body does not contain its boundary")
        position = start + len(delimiter)
        index = 0
        spans: list[tuple[int, dict[str, str], int, int]] = []
        while True:
            if data[position : position + 2] == b"--":
                break
            line_end = data.find(b"\r\n", position)
            if line_end < 0:
                raise InvalidInput("multipart body ends inside a delimiter line")
            header_end = data.find(b"\r\n\r\n", line_end)
            if header_end < 0:
                # a part with no headers at all starts directly with the blank line
                raise InvalidInput(f"part {index + 1}: headers are not terminated")
            next_delimiter = data.find(b"\r\n" + delimiter, header_end + 4)
            if next_delimiter < 0:
                raise InvalidInput("multipart body has no closing delimiter (truncated upload?)")
            index += 1
            if index > max_parts:
                raise InvalidInput(f"more than {max_parts} parts in one request")
            spans.append((index, _parse_headers(data[line_end + 2 : header_end]), header_end + 4, next_delimiter))
            position = next_delimiter + 2 + len(delimiter)
        if not spans:
            raise InvalidInput("multipart body has no parts")
        for index, headers, body_start, body_end in spans:
            yield Part(index=index, headers=headers, body=data[body_start:body_end])
