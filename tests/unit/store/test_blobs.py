"""The local blob store: atomic writes, fsync'd unless the caller says the blob can be made again."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from service.store.blobs import LocalBlobStore


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


@pytest.mark.parametrize("durable", [True, False])
def test_put_replaces_whole_blob_and_leaves_no_temp_file(tmp_path: Path, durable: bool) -> None:
    store = LocalBlobStore(tmp_path)
    store.put_bytes("jobs/j1/prepared", b"first version", durable=durable)
    store.put_bytes("jobs/j1/prepared", b"second", durable=durable)
    assert store.read_bytes("jobs/j1/prepared") == b"second"
    assert sorted(p.name for p in (tmp_path / "jobs" / "j1").iterdir()) == ["prepared"]


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What each fsync made durable: a file (by its final name, once renamed) or a directory."""
    calls: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return calls


def test_only_durable_writes_are_fsynced(tmp_path: Path, fsyncs: list[int]) -> None:
    store = LocalBlobStore(tmp_path)
    store.put_file("instances/a.dcm", io.BytesIO(b"dicom"))
    store.put_bytes("results/b", b"result")
    before = len(fsyncs)
    assert before >= 2
    store.put_bytes("jobs/j1/prepared", b"inputs", durable=False)
    store.put_file("jobs/j1/other", io.BytesIO(b"inputs"), durable=False)
    assert len(fsyncs) == before
    assert store.read_bytes("jobs/j1/prepared") == b"inputs"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fd paths from /proc")
def test_a_durable_blob_has_its_data_its_name_and_its_new_folders_fsynced(tmp_path: Path, fsynced: list[str]) -> None:
    root = tmp_path.resolve()
    store = LocalBlobStore(root)
    store.put_bytes("instances/1.2.3/1.2.3.4/1.2.3.4.5.dcm", b"dicom")
    series = root / "instances" / "1.2.3" / "1.2.3.4"
    # the new folders' entries top-down, then the data (in its temporary file), then its name in the series folder
    assert fsynced[:3] == [str(root), str(root / "instances"), str(root / "instances" / "1.2.3")]
    assert Path(fsynced[3]).parent == series and Path(fsynced[3]).name.startswith(".tmp-")
    assert fsynced[4:] == [str(series)]
    fsynced.clear()
    store.put_bytes("instances/1.2.3/1.2.3.4/1.2.3.4.6.dcm", b"dicom")  # the folders exist: file and name only
    assert len(fsynced) == 2 and fsynced[1] == str(series)


def test_failed_write_leaves_the_old_blob(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    store.put_bytes("k", b"old", durable=False)

    class Broken(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise OSError("disk gone")

    with pytest.raises(OSError):
        store.put_file("k", Broken(), durable=False)
    assert store.read_bytes("k") == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["k"]


def test_key_cannot_escape_the_store(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    with pytest.raises(ValueError, match="escapes"):
        store.put_bytes("../outside", b"x", durable=False)
