"""QIDO-RS (search) and WADO-RS (retrieve) over what we store, in DICOM JSON and multipart/related."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from service.api.deps import RuntimeDep, audit_search, require
from service.errors import InvalidInput, NotAcceptable, NotFound
from service.flows.runtime import Runtime
from service.ingest.stow import parse_content_type
from service.results import rendered
from service.schemas import Principal
from service.store import audit, clinical, fhir_store, studies
from service.store.tables import Instance, Series, Study

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])

DICOM_JSON = "application/dicom+json"
SearchDep = Annotated[Principal, Depends(require("ImagingStudy", "s"))]
ReadDep = Annotated[Principal, Depends(require("ImagingStudy", "r"))]


def _element(vr: str, value: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": [value]} if value not in (None, "") else {"vr": vr}


def _da(value: dt.date | None) -> str | None:
    return value.strftime("%Y%m%d") if value else None


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/dicomweb"


def study_attributes(session: Any, study: Study, base: str) -> dict[str, Any]:
    series = studies.series_of(session=session, study=study)
    modalities = sorted({s.modality for s, _ in series if s.modality})
    return {
        "00080020": _element("DA", _da(study.study_date)),
        "00080030": _element("TM", study.study_time),
        "00080050": _element("SH", study.accession_number),
        "00080061": {"vr": "CS", "Value": modalities} if modalities else {"vr": "CS"},
        "00081030": _element("LO", study.description),
        "00081190": _element("UR", f"{base}/studies/{study.study_instance_uid}"),
        "00100020": _element("LO", study.dicom_patient_id),
        "00100021": _element("LO", study.issuer_of_patient_id),
        "0020000D": _element("UI", study.study_instance_uid),
        "00201206": _element("IS", len(series)),
        "00201208": _element("IS", sum(count for _, count in series)),
    }


def series_attributes(series: Series, count: int, study_uid: str, base: str) -> dict[str, Any]:
    return {
        "00080060": _element("CS", series.modality),
        "0008103E": _element("LO", series.series_description),
        "00081190": _element("UR", f"{base}/studies/{study_uid}/series/{series.series_instance_uid}"),
        "00180015": _element("CS", series.body_part_examined),
        "0020000D": _element("UI", study_uid),
        "0020000E": _element("UI", series.series_instance_uid),
        "00200011": _element("IS", series.series_number),
        "00201209": _element("IS", count),
    }


def instance_attributes(instance: Instance, series_uid: str, study_uid: str, base: str) -> dict[str, Any]:
    return {
        "00080016": _element("UI", instance.sop_class_uid),
        "00080018": _element("UI", instance.sop_instance_uid),
        "00081190": _element(
            "UR", f"{base}/studies/{study_uid}/series/{series_uid}/instances/{instance.sop_instance_uid}"
        ),
        "0020000D": _element("UI", study_uid),
        "0020000E": _element("UI", series_uid),
        "00200013": _element("IS", instance.instance_number),
        "00280008": _element("IS", instance.number_of_frames),
        "00280010": _element("US", instance.rows),
        "00280011": _element("US", instance.columns),
    }


def _date_range(value: str | None) -> tuple[dt.date | None, dt.date | None]:
    if not value:
        return None, None
    try:
        if "-" in value:
            start, _, end = value.partition("-")
            return (
                dt.datetime.strptime(start, "%Y%m%d").date() if start else None,
                dt.datetime.strptime(end, "%Y%m%d").date() if end else None,
            )
        day = dt.datetime.strptime(value, "%Y%m%d").date()
        return day, day
    except ValueError as e:
        raise InvalidInput(f"StudyDate {value!r} must be YYYYMMDD or a range YYYYMMDD-YYYYMMDD") from e


# the query parameters each QIDO-RS level matches on or pages with; any other is ignored, and said so
_STUDY_QUERY = frozenset(
    {"StudyInstanceUID", "PatientID", "AccessionNumber", "StudyDate", "ModalitiesInStudy", "limit", "offset"}
)


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def unsupported_warning(request: Request, supported: frozenset[str], text: str) -> str | None:
    """A ``Warning: 299`` value naming the query parameters not in ``supported`` (None when there are none). A name
    is quoted back only when it is plain (letters, digits, ``_.-``): anything else (control characters, non-Latin-1
    text) cannot go in a header, and is counted instead."""
    ignored = {name for name in request.query_params if name not in supported}
    if not ignored:
        return None
    plain = sorted(name for name in ignored if _PLAIN_NAME.fullmatch(name))
    others = len(ignored) - len(plain)
    names = ", ".join(plain)[:200] + (f"{', ' if plain else ''}{others} other(s)" if others else "")
    return f'299 clinfer "{text}: {names}"'


def _answer(results: list[dict[str, Any]], request: Request, supported: frozenset[str] = frozenset()) -> Response:
    """The matches (204 when none). Query keys this level does not match on are ignored, as PS3.18 8.3.4.1 lets
    a server do, and named in a ``Warning: 299`` header, as it requires: a search is never silently wider than
    the one asked for."""
    warning = unsupported_warning(request, supported, "The fields in the query were not supported")
    headers = {"Warning": warning} if warning else None
    if not results:
        return Response(status_code=204, headers=headers)
    return JSONResponse(results, media_type=DICOM_JSON, headers=headers)


def _audit_search(
    runtime: Runtime,
    session: Any,
    principal: Principal,
    level: str,
    query: dict[str, Any],
    results: int,
    found: list[Study],
) -> None:
    audit_search(
        session,
        principal,
        event_type="dicom.search",
        entity_type="ImagingStudy",
        entity_ref=f"qido:{level}",
        found=found,
        detail={"query": {k: v for k, v in query.items() if v is not None}, "results": results},
    )


@router.get("/studies", summary="QIDO-RS: search for studies")
def search_studies(
    request: Request,
    runtime: RuntimeDep,
    principal: SearchDep,
    study_instance_uid: Annotated[str | None, Query(alias="StudyInstanceUID")] = None,
    patient_id: Annotated[str | None, Query(alias="PatientID")] = None,
    accession_number: Annotated[str | None, Query(alias="AccessionNumber")] = None,
    study_date: Annotated[str | None, Query(alias="StudyDate")] = None,
    modalities_in_study: Annotated[str | None, Query(alias="ModalitiesInStudy")] = None,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=fhir_store.MAX_OFFSET),  # as a FHIR search's _offset
) -> Response:
    date_from, date_to = _date_range(study_date)
    base = _base(request)
    with runtime.sessions.begin() as session:
        found = studies.search(
            session=session,
            study_instance_uid=study_instance_uid,
            patient_id=patient_id,
            accession_number=accession_number,
            date_from=date_from,
            date_to=date_to,
            modality=modalities_in_study,
            limit=limit,
            offset=offset,
        )
        results = [study_attributes(session, s, base) for s in found]
        _audit_search(
            runtime,
            session,
            principal,
            "studies",
            {
                "StudyInstanceUID": study_instance_uid,
                "PatientID": patient_id,
                "AccessionNumber": accession_number,
                "StudyDate": study_date,
                "ModalitiesInStudy": modalities_in_study,
            },
            len(results),
            found,
        )
    return _answer(results, request, _STUDY_QUERY)


@router.get("/studies/{study_instance_uid}/series", summary="QIDO-RS: the series of a study")
def search_series(study_instance_uid: str, request: Request, runtime: RuntimeDep, principal: SearchDep) -> Response:
    base = _base(request)
    with runtime.sessions.begin() as session:
        study = studies.get_or_raise(session=session, study_instance_uid=study_instance_uid)
        results = [
            series_attributes(s, n, study_instance_uid, base)
            for s, n in studies.series_of(session=session, study=study)
        ]
        _audit_search(
            runtime, session, principal, "series", {"StudyInstanceUID": study_instance_uid}, len(results), [study]
        )
    return _answer(results, request)


@router.get(
    "/studies/{study_instance_uid}/series/{series_instance_uid}/instances", summary="QIDO-RS: the instances of a series"
)
def search_instances(
    study_instance_uid: str, series_instance_uid: str, request: Request, runtime: RuntimeDep, principal: SearchDep
) -> Response:
    base = _base(request)
    with runtime.sessions.begin() as session:
        study = studies.get_or_raise(session=session, study_instance_uid=study_instance_uid)
        series = studies.get_series(session=session, study=study, series_instance_uid=series_instance_uid)
        if series is None:
            raise NotFound(f"series {series_instance_uid} not found in study {study_instance_uid}")
        results = [
            instance_attributes(i, series_instance_uid, study_instance_uid, base)
            for i in studies.instances_of_series(session=session, series=series)
        ]
        _audit_search(
            runtime,
            session,
            principal,
            "instances",
            {"StudyInstanceUID": study_instance_uid, "SeriesInstanceUID": series_instance_uid},
            len(results),
            [study],
        )
    return _answer(results, request)


def _multipart(runtime: Runtime, blob_keys: list[str]) -> StreamingResponse:
    boundary = uuid.uuid4().hex

    def body() -> Iterator[bytes]:
        for key in blob_keys:  # one object in memory at a time
            yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            yield runtime.blobs.read_bytes(key)
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return StreamingResponse(body(), media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')


def _check_accept(accept: str | None) -> None:
    """WADO-RS answers multipart/related; type="application/dicom" (each instance as stored, in its own transfer
    syntax). An Accept that admits none of that is refused (406), rather than answered with what it did not ask for.

    Raises:
        NotAcceptable: no media range of ``accept`` matches.
    """
    if not accept:
        return
    for media_range in accept.split(","):
        content_type = parse_content_type(media_range)
        if _quality(content_type.params.get("q")) <= 0:  # "not this one"
            continue
        if content_type.media_type in ("*/*", "multipart/*"):
            return
        wanted = content_type.params.get("type", "application/dicom").lower()
        if content_type.media_type == "multipart/related" and wanted in ("application/dicom", "application/*", "*/*"):
            return
    raise NotAcceptable(
        f"Accept {accept[:120]!r} admits nothing this server sends here: it answers "
        'multipart/related; type="application/dicom" (each instance in the transfer syntax it was stored in)'
    )


def _quality(text: str | None) -> float:
    """A media range's q (RFC 9110 12.4.2); 1 when absent or not a number."""
    try:
        return float(text) if text is not None else 1.0
    except ValueError:
        return 1.0


def _retrieve(
    runtime: Runtime,
    principal: Principal,
    study_uid: str,
    series_uid: str | None,
    sop_uid: str | None,
    accept: str | None = None,
) -> StreamingResponse:
    _check_accept(accept)
    with runtime.sessions.begin() as session:
        study = studies.get_or_raise(session=session, study_instance_uid=study_uid)
        pairs = studies.instances_of(session=session, study=study)
        selected = [
            i
            for s, i in pairs
            if (series_uid is None or s.series_instance_uid == series_uid)
            and (sop_uid is None or i.sop_instance_uid == sop_uid)
        ]
        if not selected:
            raise NotFound("no stored instance matches " + "/".join(x for x in (study_uid, series_uid, sop_uid) if x))
        audit.append(
            session=session,
            principal=principal,
            event_type="dicom.retrieve",
            action="R",
            entity_type="ImagingStudy",
            entity_ref=f"study:{study_uid}",
            patient_ref=clinical.patient_reference(session=session, patient_id=study.patient_id),
            detail={"series": series_uid, "sop_instance_uid": sop_uid, "instances": len(selected)},
        )
        keys = [i.blob_key for i in selected]
    return _multipart(runtime, keys)


@router.get("/studies/{study_instance_uid}", summary="WADO-RS: retrieve a study")
def retrieve_study(
    study_instance_uid: str, request: Request, runtime: RuntimeDep, principal: ReadDep
) -> StreamingResponse:
    return _retrieve(runtime, principal, study_instance_uid, None, None, request.headers.get("accept"))


@router.get("/studies/{study_instance_uid}/series/{series_instance_uid}", summary="WADO-RS: retrieve a series")
def retrieve_series(
    study_instance_uid: str, series_instance_uid: str, request: Request, runtime: RuntimeDep, principal: ReadDep
) -> StreamingResponse:
    return _retrieve(runtime, principal, study_instance_uid, series_instance_uid, None, request.headers.get("accept"))


@router.get(
    "/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop_instance_uid}",
    summary="WADO-RS: retrieve an instance",
)
def retrieve_instance(
    study_instance_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    request: Request,
    runtime: RuntimeDep,
    principal: ReadDep,
) -> StreamingResponse:
    accept = request.headers.get("accept")
    return _retrieve(runtime, principal, study_instance_uid, series_instance_uid, sop_instance_uid, accept)


# the query parameters of a rendered resource we honour; others (annotation, charset, iccprofile) are ignored, and said
_RENDERED_QUERY = frozenset({"window", "viewport", "quality"})


def rendered_media_type(accept: str | None) -> str:
    """The media type to render to: the acceptable one of PNG and JPEG with the highest q (PNG on a tie, and for
    a missing Accept, ``*/*`` or ``image/*``).

    Raises:
        NotAcceptable: ``accept`` admits neither.
    """
    if not accept:
        return rendered.PNG
    best: tuple[float, int, str] | None = None
    for media_range in accept.split(","):
        content_type = parse_content_type(media_range)
        q = _quality(content_type.params.get("q"))
        if q <= 0:
            continue
        for preference, media_type in enumerate(rendered.MEDIA_TYPES):
            if content_type.media_type in (media_type, "image/*", "*/*"):
                candidate = (q, -preference, media_type)
                best = candidate if best is None or candidate > best else best
    if best is None:
        raise NotAcceptable(
            f"Accept {accept[:120]!r} admits nothing this server renders: it renders image/png (the default) and"
            " image/jpeg"
        )
    return best[2]


WindowQuery = Annotated[str | None, Query(description="center,width,function (linear, linear-exact, sigmoid)")]
ViewportQuery = Annotated[str | None, Query(description="vw,vh: fit inside, keeping the aspect ratio")]
QualityQuery = Annotated[str | None, Query(description="JPEG quality, 1 to 100")]
_RENDERED_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {rendered.PNG: {}, rendered.JPEG: {}}, "description": "the frame as an image"}
}


@router.get(
    "/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop_instance_uid}/rendered",
    summary="WADO-RS: an instance rendered as PNG or JPEG (its first frame)",
    response_class=Response,
    responses=_RENDERED_RESPONSES,
)
def retrieve_rendered_instance(
    study_instance_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    request: Request,
    runtime: RuntimeDep,
    principal: ReadDep,
    window: WindowQuery = None,
    viewport: ViewportQuery = None,
    quality: QualityQuery = None,
) -> Response:
    """The first frame as a viewer shows it (PS3.18 8.3.5, 10.4): VOI from ``window`` or the object's own,
    MONOCHROME1 inverted, colour as it is. The read is audited as a WADO-RS retrieve, once it succeeds."""
    uids = (study_instance_uid, series_instance_uid, sop_instance_uid)
    return _rendered(runtime, principal, request, uids, 1, window, viewport, quality)


@router.get(
    "/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop_instance_uid}/frames/{frame}/rendered",
    summary="WADO-RS: one frame of an instance rendered as PNG or JPEG",
    response_class=Response,
    responses=_RENDERED_RESPONSES,
)
def retrieve_rendered_frame(
    study_instance_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    frame: str,
    request: Request,
    runtime: RuntimeDep,
    principal: ReadDep,
    window: WindowQuery = None,
    viewport: ViewportQuery = None,
    quality: QualityQuery = None,
) -> Response:
    """One frame (1-based, one at a time), rendered as the instance is."""
    if not re.fullmatch(r"[0-9]{1,6}", frame) or int(frame) < 1:
        raise InvalidInput(f"frame {frame[:40]!r} must be one frame number, from 1 (one frame at a time)")
    uids = (study_instance_uid, series_instance_uid, sop_instance_uid)
    return _rendered(runtime, principal, request, uids, int(frame), window, viewport, quality)


def _rendered(
    runtime: Runtime,
    principal: Principal,
    request: Request,
    uids: tuple[str, str, str],
    frame: int,
    window: str | None,
    viewport: str | None,
    quality: str | None,
) -> Response:
    study_instance_uid, series_instance_uid, sop_instance_uid = uids
    media_type = rendered_media_type(request.headers.get("accept"))
    voi = rendered.parse_window(window) if window is not None else None
    fit = rendered.parse_viewport(viewport) if viewport is not None else None
    jpeg_quality = rendered.parse_quality(quality) if quality is not None else rendered.DEFAULT_JPEG_QUALITY
    with runtime.sessions.begin() as session:
        study = studies.get_or_raise(session=session, study_instance_uid=study_instance_uid)
        instance = studies.get_instance(session=session, sop_instance_uid=sop_instance_uid)
        if (
            instance is None
            or instance.series.study_id != study.id
            or instance.series.series_instance_uid != series_instance_uid
        ):
            raise NotFound(f"no stored instance {study_instance_uid}/{series_instance_uid}/{sop_instance_uid}")
        frames = instance.number_of_frames or 1
        if frame > frames:
            raise NotFound(f"instance {sop_instance_uid} has {frames} frame(s), not a frame {frame}")
        blob_key = instance.blob_key
        patient_ref = clinical.patient_reference(session=session, patient_id=study.patient_id)
    image = rendered.render(
        runtime.blobs.read_bytes(blob_key),
        max_pixels=runtime.settings.max_decoded_pixels,
        media_type=media_type,
        window=voi,
        viewport=fit,
        quality=jpeg_quality,
        frame=frame - 1,
    )
    headers = {"Cache-Control": "no-store"}  # a patient's image: kept in no cache, the browser's included
    warning = unsupported_warning(request, _RENDERED_QUERY, "The query parameters were not supported")
    if warning:
        headers["Warning"] = warning
    with runtime.sessions.begin() as session:
        audit.append(
            session=session,
            principal=principal,
            event_type="dicom.retrieve",
            action="R",
            entity_type="ImagingStudy",
            entity_ref=f"study:{study_instance_uid}",
            patient_ref=patient_ref,
            detail={
                "series": series_instance_uid,
                "sop_instance_uid": sop_instance_uid,
                "instances": 1,
                "frame": frame,
                "rendered": media_type,
            },
        )
    return Response(image, media_type=media_type, headers=headers)
