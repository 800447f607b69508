from __future__ import annotations

import tempfile

import pytest

from service.errors import InvalidInput, UnsupportedMediaType
from service.ingest.stow import iter_parts, related_boundary


def _file(data: bytes) -> tempfile._TemporaryFileWrapper:  # type: ignore[type-arg]
    f = tempfile.TemporaryFile()
    f.write(data)
    f.flush()
    return f  # type: ignore[return-value]


def test_boundary_from_content_type() -> None:
    assert related_boundary('multipart/related; type="application/dicom"; boundary="a b"') == b"a b"
    assert related_boundary("Multipart/Related; boundary=xyz; type=application/dicom") == b"xyz"
    with pytest.raises(UnsupportedMediaType):
        related_boundary("application/dicom")
    with pytest.raises(UnsupportedMediaType):
        related_boundary('multipart/related; type="application/dicom+xml"; boundary=x')
    with pytest.raises(InvalidInput):
        related_boundary('multipart/related; type="application/dicom"')


def test_parts_keep_binary_bodies_exactly() -> None:
    payloads = [b"\r\n--not-the-boundary\r\n\x00\xff", b"", b"DICM" * 1000]
    body = b"preamble ignored\r\n"
    for p in payloads:
        body += b"--BOUND\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
    body += b"--BOUND--\r\nepilogue"
    parts = list(iter_parts(_file(body), b"BOUND", max_parts=10))
    assert [p.body for p in parts] == payloads
    assert [p.index for p in parts] == [1, 2, 3]
    assert all(p.content_type == "application/dicom" for p in parts)


def test_truncated_and_oversized_bodies() -> None:
    with pytest.raises(InvalidInput, match="closing delimiter"):
        list(iter_parts(_file(b"--B\r\nContent-Type: application/dicom\r\n\r\nabc"), b"B", max_parts=10))
    many = b"".join(b"--B\r\n\r\nx\r\n" for _ in range(3)) + b"--B--"
    with pytest.raises(InvalidInput, match="more than 2 parts"):
        list(iter_parts(_file(many), b"B", max_parts=2))
    with pytest.raises(InvalidInput, match="boundary"):
        list(iter_parts(_file(b"no delimiters here"), b"B", max_parts=2))


@pytest.mark.parametrize(
    "tail",
    [
        b"--B\r\nContent-Type: application/dicom\r\n\r\ntrunc",  # the upload cut short
        b"--B\r\nbad header line\r\n\r\nx\r\n--B--",
    ],
    ids=["truncated", "bad-header"],
)
def test_a_broken_body_is_refused_before_any_part_is_yielded(tail: bytes) -> None:
    """Before, the parts ahead of the broken one were yielded (and stored) before the error: a request answered
    400 whose first objects were nevertheless kept."""
    body = b"--B\r\nContent-Type: application/dicom\r\n\r\nfirst\r\n" + tail
    parts = iter_parts(_file(body), b"B", max_parts=10)
    with pytest.raises(InvalidInput):
        next(parts)


def test_a_body_without_parts_is_refused() -> None:
    with pytest.raises(InvalidInput, match="no parts"):
        list(iter_parts(_file(b"--B--\r\n"), b"B", max_parts=10))
