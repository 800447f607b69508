"""DICOMweb (PS3.18) STOW-RS: store instances (QIDO-RS and WADO-RS are in dicomweb_query)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from service.api.deps import RuntimeDep, require
from service.errors import PayloadTooLarge
from service.flows import ingest as ingest_flow
from service.ingest import stow
from service.schemas import Principal

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])

DICOM_JSON = "application/dicom+json"

IngestDep = Annotated[Principal, Depends(require("ImagingStudy", "c"))]


def _element(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


def _retrieve_url(base: str, study: str, series: str | None = None, sop: str | None = None) -> str:
    url = f"{base}/dicomweb/studies/{study}"
    if series and sop:
        url += f"/series/{series}/instances/{sop}"
    return url


def stow_response(outcome: ingest_flow.StoreOutcome, *, base: str, study_instance_uid: str | None) -> dict[str, Any]:
    """The PS3.18 Store Instances Response Module in DICOM JSON."""
    body: dict[str, Any] = {}
    target = study_instance_uid or (outcome.stored[0].study_instance_uid if outcome.stored else None)
    if target:
        body["00081190"] = _element("UR", _retrieve_url(base, target))
    if outcome.failed:
        items = []
        for failed in outcome.failed:
            item: dict[str, Any] = {"00081197": _element("US", failed.failure_reason)}
            if failed.sop_class_uid:
                item["00081150"] = _element("UI", failed.sop_class_uid)
            if failed.sop_instance_uid:
                item["00081155"] = _element("UI", failed.sop_instance_uid)
            item["00000902"] = _element("LO", f"part {failed.part}: {failed.message}"[:64])
            items.append(item)
        body["00081198"] = _element("SQ", *items)
    if outcome.stored:
        body["00081199"] = _element(
            "SQ",
            *[
                {
                    "00081150": _element("UI", s.sop_class_uid),
                    "00081155": _element("UI", s.sop_instance_uid),
                    "00081190": _element(
                        "UR", _retrieve_url(base, s.study_instance_uid, s.series_instance_uid, s.sop_instance_uid)
                    ),
                }
                for s in outcome.stored
            ],
        )
    return body


async def _spool_body(request: Request, limit: int) -> Any:
    """Stream the request body to a temporary file (never whole in memory), enforcing the upload limit."""
    spooled = tempfile.TemporaryFile()
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")
            spooled.write(chunk)
        spooled.flush()
    except BaseException:
        spooled.close()
        raise
    return spooled


async def _stow(request: Request, runtime: RuntimeDep, principal: Principal, study_uid: str | None) -> JSONResponse:
    boundary = stow.related_boundary(request.headers.get("content-type"))
    body = await _spool_body(request, runtime.settings.max_upload_bytes)
    try:

        def parts() -> Iterator[tuple[int, bytes | str]]:
            # one part in memory at a time: the body stays on disk, memory-mapped
            for part in stow.iter_parts(body, boundary, max_parts=runtime.settings.max_instances_per_request):
                if part.content_type != "application/dicom":
                    yield part.index, f"part content type {part.content_type} is not application/dicom"
                else:
                    yield part.index, bytes(part.body)

        def store() -> ingest_flow.StoreOutcome:
            return ingest_flow.store_instances(
                runtime, parts(), principal=principal, protocol="stow-rs", study_instance_uid=study_uid
            )

        outcome = await run_in_threadpool(store)
    finally:
        body.close()
    base = str(request.base_url).rstrip("/")
    if not outcome.failed:
        status = 200
    elif outcome.stored:
        status = 202
    else:
        status = 409
    return JSONResponse(
        stow_response(outcome, base=base, study_instance_uid=study_uid), status_code=status, media_type=DICOM_JSON
    )


@router.post("/studies", summary="STOW-RS: store instances")
async def store_instances(request: Request, runtime: RuntimeDep, principal: IngestDep) -> JSONResponse:
    return await _stow(request, runtime, principal, None)


@router.post("/studies/{study_instance_uid}", summary="STOW-RS: store instances of one study")
async def store_study_instances(
    study_instance_uid: str, request: Request, runtime: RuntimeDep, principal: IngestDep
) -> JSONResponse:
    return await _stow(request, runtime, principal, study_instance_uid)
