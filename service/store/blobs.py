"""Blob stores: where DICOM objects and result objects live. Rows hold keys, never bytes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol


class BlobStore(Protocol):
    def put_file(self, key: str, source: BinaryIO, *, durable: bool = True) -> None: ...
    def put_bytes(self, key: str, data: bytes, *, durable: bool = True) -> None: ...
    def read_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...


class LocalBlobStore:
    """Blobs on a local or shared filesystem; writes are atomic (temp file, fsync, rename).

    A write with ``durable=False`` skips the fsync: readers still see the whole blob or none, but after a crash of
    the machine the blob may be empty or damaged. Only for blobs that can be made again (the prepared inputs that
    the preprocess stage hands to the infer stage), never for what we acknowledged as received.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"blob key escapes the store: {key!r}")
        return path

    def put_file(self, key: str, source: BinaryIO, *, durable: bool = True) -> None:
        self._put(key, lambda out: shutil.copyfileobj(source, out, length=1024 * 1024), durable=durable)

    def put_bytes(self, key: str, data: bytes, *, durable: bool = True) -> None:
        self._put(key, lambda out: out.write(data), durable=durable)

    def _put(self, key: str, write: Callable[[BinaryIO], object], *, durable: bool) -> None:
        path = self._path(key)
        self._make_directory(path.parent, durable=durable)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
                if durable:
                    out.flush()
                    os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if durable:  # the rename is the blob's name in its directory: durable only once the directory is
            _fsync_directory(path.parent)

    def _make_directory(self, directory: Path, *, durable: bool) -> None:
        """Create ``directory`` and its missing parents; durable: each new one's entry in its parent fsync'd too
        (a new study's folders), or a crash could lose a blob whose own data and name were on disk."""
        missing = []
        ancestor = directory
        while not ancestor.is_dir():
            missing.append(ancestor)
            ancestor = ancestor.parent
        if not missing:
            return
        directory.mkdir(parents=True, exist_ok=True)
        if durable:
            for created in reversed(missing):
                _fsync_directory(created.parent)

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    """Make the entries of a directory (a blob renamed into it, a folder made in it) durable (POSIX)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
