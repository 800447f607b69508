"""Every sample file shipped in the installed pydicom package, posted by STOW-RS to the embedded service.

Each is stored or refused with a FailureReason (never a 5xx), the service stays up, and every stored image the
plugins decode comes back by WADO-RS and decodes to exactly pydicom's own pixel_array with the same plugin.
The files are listed from disk; nothing is downloaded.
"""

from __future__ import annotations

import collections
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from fastapi.testclient import TestClient

from service.api.main import create_app
from service.flows.runtime import build_runtime, set_runtime
from service.ingest import dicom
from service.ingest.stow import iter_parts, related_boundary
from tests.conftest import Tokens, make_settings
from tests.factories import multipart_related

SAMPLES = Path(pydicom.data.__file__).parent / "test_files"
FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE, FAILURE_REASON = "00081198", "00081199", "00081197"


def _sample_files() -> list[Path]:
    return sorted(path for path in SAMPLES.rglob("*") if path.is_file())


def _sop_instance_uid(path: Path) -> str | None:
    try:
        uid = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).get("SOPInstanceUID")
    except Exception:
        return None
    return str(uid) if uid else None


def _rounds(paths: list[Path]) -> list[list[Path]]:
    """Files in rounds whose SOP Instance UIDs are unique: pydicom ships one object in several encodings under
    one UID (MR_small in nine), and a service refuses the second as 0x0111, so each round gets its own."""
    rounds: list[list[Path]] = []
    used: list[set[str]] = []
    for path in paths:
        uid = _sop_instance_uid(path)
        index = 0 if uid is None else next((i for i, uids in enumerate(used) if uid not in uids), len(used))
        if index == len(rounds):
            rounds.append([])
            used.append(set())
        rounds[index].append(path)
        if uid is not None:
            used[index].add(uid)
    return rounds


@contextmanager
def _service(state: Path) -> Iterator[tuple[TestClient, Tokens, int]]:
    settings = make_settings(state)
    runtime = build_runtime(settings)
    set_runtime(runtime)
    with TestClient(create_app(runtime)) as client:
        yield client, Tokens(settings), settings.max_decoded_pixels


def _reference_frame(path: Path) -> np.ndarray | None:
    """pydicom's own pixel_array, with the plugin we decode with, of the frame we decode; None if it fails."""
    try:
        ds = pydicom.dcmread(path)
        ds.pixel_array_options(decoding_plugin=dicom.decoding_plugin_for(ds.file_meta.TransferSyntaxUID))
        array = ds.pixel_array
    except Exception:
        return None
    frames = int(ds.get("NumberOfFrames") or 1)
    return array[frames // 2] if frames > 1 else array


def _retrieve(client: TestClient, tokens: Tokens, url: str) -> bytes:
    response = client.get(url, headers=tokens.header("clinician"))
    assert response.status_code == 200, response.text
    with tempfile.TemporaryFile() as body:
        body.write(response.content)
        body.flush()
        [part] = list(iter_parts(body, related_boundary(response.headers["content-type"]), max_parts=2))
        return bytes(part.body)


@dataclass
class Tally:
    files: int = 0
    stored: int = 0
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    compared: int = 0
    compared_compressed: collections.Counter[str] = field(default_factory=collections.Counter)
    refused_at_decode: int = 0

    def line(self) -> str:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.refused.items()))
        codecs = ", ".join(f"{name}: {count}" for name, count in sorted(self.compared_compressed.items()))
        return (
            f"{self.files} files: {self.stored} stored, {sum(self.refused.values())} refused ({reasons});"
            f" {self.compared} images equal to pydicom's pixel_array,"
            f" {sum(self.compared_compressed.values())} of them compressed ({codecs});"
            f" {self.refused_at_decode} that pydicom cannot decode either refused at decode"
        )


@pytest.mark.filterwarnings("ignore")  # the samples are made to provoke pydicom's warnings
def test_every_pydicom_sample_is_stored_or_refused_and_decodes_like_pydicom(tmp_path: Path) -> None:
    tally = Tally()
    for number, paths in enumerate(_rounds(_sample_files())):
        with _service(tmp_path / f"round-{number}") as (client, tokens, max_pixels):
            for path in paths:
                name = str(path.relative_to(SAMPLES))
                original = path.read_bytes()
                body, content_type = multipart_related([original])
                response = client.post(
                    "/dicomweb/studies", content=body, headers={"Content-Type": content_type, **tokens.header("ingest")}
                )
                tally.files += 1
                assert response.status_code in (200, 202, 409), f"{name}: {response.status_code} {response.text}"
                answer = response.json()
                for failed in answer.get(FAILED_SOP_SEQUENCE, {}).get("Value", []):
                    [reason] = failed[FAILURE_REASON]["Value"]
                    assert isinstance(reason, int) and reason > 0, f"{name}: {failed}"
                    tally.refused[f"0x{reason:04X}"] += 1
                stored = answer.get(REFERENCED_SOP_SEQUENCE, {}).get("Value", [])
                assert len(stored) + len(answer.get(FAILED_SOP_SEQUENCE, {}).get("Value", [])) == 1, name
                if not stored:
                    continue
                tally.stored += 1
                ds = pydicom.dcmread(path)
                if "PixelData" not in ds:
                    continue
                retrieved = _retrieve(client, tokens, stored[0]["00081190"]["Value"][0])
                assert retrieved == original, name
                reference = _reference_frame(path)
                if reference is None:
                    # pydicom cannot decode it with our plugin either: refused with a reason, never a crash
                    try:
                        dicom.decode_frame(retrieved, max_pixels=max_pixels)
                    except dicom.DicomRejected as e:
                        assert e.failure_reason in (dicom.FAILURE_CANNOT_UNDERSTAND, dicom.FAILURE_OUT_OF_RESOURCES)
                        tally.refused_at_decode += 1
                        continue
                    raise AssertionError(f"{name}: decoded what pydicom's own pixel_array cannot")
                decoded = dicom.decode_frame(retrieved, max_pixels=max_pixels)
                assert decoded.shape == reference.shape and np.array_equal(decoded, reference), name
                tally.compared += 1
                transfer_syntax = ds.file_meta.TransferSyntaxUID
                if transfer_syntax.is_compressed or transfer_syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
                    tally.compared_compressed[transfer_syntax.name] += 1
            assert client.get("/healthz").status_code == 200
    print(tally.line())
    assert tally.files == len(_sample_files()) and tally.stored + sum(tally.refused.values()) == tally.files
    assert tally.stored > 100 and sum(tally.compared_compressed.values()) >= 30
