"""WADO-RS rendered resource (PS3.18 8.3.5, 10.4) on the embedded default: PNG or JPEG by Accept, the query
parameters, errors in the API's shape, access checks and the audit of the read; our heatmap renders, our SR
(no pixels) is refused cleanly."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.uid import generate_uid

from service.flows.runtime import Runtime
from service.store import audit
from tests.conftest import Tokens, serve_over_http
from tests.e2e.test_dicom_results import _analyzed_study
from tests.e2e.test_embedded_spine import post_study
from tests.factories import dx_instance, image_instance

RAMP = np.repeat(np.arange(1024, dtype=np.uint16)[:, None], 16, axis=1)


def _stowed(client: TestClient, tokens: Tokens, data: bytes) -> str:
    response = post_study(client, tokens, [data])
    assert response.status_code == 200, response.text
    item = response.json()["00081199"]["Value"][0]
    return str(item["00081190"]["Value"][0]).split("/dicomweb", 1)[1]  # the instance's WADO-RS path


def _ramp(client: TestClient, tokens: Tokens, **kwargs: object) -> str:
    return "/dicomweb" + _stowed(client, tokens, image_instance(RAMP, **kwargs))  # type: ignore[arg-type]


def test_png_by_default_with_the_objects_window(client: TestClient, tokens: Tokens) -> None:
    path = _ramp(client, tokens, rescale=(2.0, -100.0), window=(500.0, 401.0))
    response = client.get(path + "/rendered", headers=tokens.header("clinician"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["cache-control"] == "no-store"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.size == (16, 1024) and image.mode == "L"
    column = np.asarray(image)[:, 0].astype(np.int16)
    modality = RAMP[:, 0] * 2.0 - 100.0
    expected = np.rint(np.clip((modality - 499.5) / 400.0 + 0.5, 0, 1) * 255)
    assert np.abs(column - expected).max() <= 1


def test_window_viewport_and_jpeg_by_accept(client: TestClient, tokens: Tokens) -> None:
    path = _ramp(client, tokens)
    clinician = tokens.header("clinician")
    windowed = client.get(path + "/rendered", params={"window": "100,51,linear"}, headers=clinician)
    assert windowed.status_code == 200, windowed.text
    column = np.asarray(Image.open(io.BytesIO(windowed.content)))[:, 0]
    assert column[74] == 0 and column[126] == 255 and 0 < column[100] < 255

    fitted = client.get(path + "/rendered", params={"viewport": "64,64"}, headers=clinician)
    assert Image.open(io.BytesIO(fitted.content)).size == (1, 64)  # 16 x 1024 into 64 x 64
    fitted = client.get(path + "/rendered", params={"viewport": "8,"}, headers=clinician)
    assert Image.open(io.BytesIO(fitted.content)).size == (8, 512)

    jpeg = client.get(path + "/rendered", headers={"Accept": "image/jpeg", **clinician})
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(jpeg.content)).format == "JPEG"
    preferred = client.get(
        path + "/rendered", params={"quality": "50"}, headers={"Accept": "image/png;q=0.5, image/jpeg", **clinician}
    )
    assert preferred.headers["content-type"] == "image/jpeg"
    for accept in ("image/*", "*/*", "image/png, image/jpeg", "text/html, image/png;q=0.1"):
        answer = client.get(path + "/rendered", headers={"Accept": accept, **clinician})
        assert answer.headers["content-type"] == "image/png", accept


def test_monochrome1_is_inverted(client: TestClient, tokens: Tokens) -> None:
    clinician = tokens.header("clinician")
    two = client.get(_ramp(client, tokens, window=(512, 1024)) + "/rendered", headers=clinician)
    one = client.get(
        _ramp(client, tokens, window=(512, 1024), photometric="MONOCHROME1") + "/rendered", headers=clinician
    )
    pixels_two = np.asarray(Image.open(io.BytesIO(two.content))).astype(np.int16)
    pixels_one = np.asarray(Image.open(io.BytesIO(one.content))).astype(np.int16)
    assert np.array_equal(pixels_one, 255 - pixels_two)


@pytest.mark.parametrize(
    "params",
    [
        {"window": "40,400,log"},
        {"window": "40"},
        {"window": "40,0,linear"},
        {"viewport": "0,10"},
        {"viewport": "5000,5000"},
        {"viewport": "10,10,0,0,5,5"},
        {"quality": "0"},
        # found in review: non-ASCII digits (a 500 before), windows whose float32 arithmetic overflows (NaN pixels)
        {"viewport": "²,5"},
        {"quality": "¹⁰"},
        {"window": "1,1e-300,sigmoid"},
        {"window": "0,1e-45,linear-exact"},
        {"window": "1e308,1e308"},
    ],
)
def test_bad_query_values_are_400(client: TestClient, tokens: Tokens, params: dict[str, str]) -> None:
    path = _ramp(client, tokens)
    response = client.get(path + "/rendered", params=params, headers=tokens.header("clinician"))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid"
    assert next(iter(params)) in response.json()["error"]["message"]


def test_unsupported_parameters_are_ignored_and_named(client: TestClient, tokens: Tokens) -> None:
    path = _ramp(client, tokens)
    response = client.get(path + "/rendered", params={"annotation": "patient"}, headers=tokens.header("clinician"))
    assert response.status_code == 200
    assert "annotation" in response.headers["warning"] and response.headers["warning"].startswith("299 ")


def test_parameter_names_that_cannot_go_in_a_header_are_counted_not_quoted(
    client: TestClient, runtime: Runtime, tokens: Tokens
) -> None:
    """Found in review: an unsupported parameter's name was quoted in the Warning header as it came, so a
    non-Latin-1 name was a 500 and a CR LF or NUL in it made the server drop the connection (over uvicorn)."""
    path = _ramp(client, tokens) + "/rendered"
    clinician = tokens.header("clinician")
    with serve_over_http(runtime) as base, httpx.Client(base_url=base, timeout=30) as http:
        for query in ("?%E4%B8%AD=1&annotation=x", "?x%0d%0aSet-Cookie:%20a%3Db=1", "?x%00=1"):
            response = http.get(path + query, headers=clinician)
            assert response.status_code == 200, (query, response.text)
            assert "set-cookie" not in response.headers
            assert "1 other(s)" in response.headers["warning"], response.headers["warning"]
        named = http.get(path + "?%E4%B8%AD=1&annotation=x", headers=clinician).headers["warning"]
        assert named.endswith('annotation, 1 other(s)"'), named


def test_an_accept_without_png_or_jpeg_is_406(client: TestClient, tokens: Tokens) -> None:
    path = _ramp(client, tokens)
    for accept in ("image/gif", "application/dicom", "image/png;q=0, image/jpeg;q=0"):
        response = client.get(path + "/rendered", headers={"Accept": accept, **tokens.header("clinician")})
        assert response.status_code == 406, accept
        assert response.json()["error"]["code"] == "not-acceptable"
        assert "image/png" in response.json()["error"]["message"]


def test_unknown_instances_are_404(client: TestClient, tokens: Tokens) -> None:
    path = _ramp(client, tokens)
    study, series, sop = path.split("/")[3], path.split("/")[5], path.split("/")[7]
    clinician = tokens.header("clinician")
    for wrong in (
        f"/dicomweb/studies/{study}/series/{series}/instances/{generate_uid()}",
        f"/dicomweb/studies/{study}/series/{generate_uid()}/instances/{sop}",
        f"/dicomweb/studies/{generate_uid()}/series/{series}/instances/{sop}",
    ):
        response = client.get(wrong + "/rendered", headers=clinician)
        assert response.status_code == 404, wrong
        assert response.json()["error"]["code"] == "not-found"


def test_access_is_checked_and_the_read_audited(client: TestClient, tokens: Tokens, runtime: Runtime) -> None:
    path = "/dicomweb" + _stowed(client, tokens, dx_instance(size=256))
    unauthenticated = client.get(path + "/rendered")
    assert unauthenticated.status_code == 401 and unauthenticated.json()["error"]["code"] == "unauthenticated"
    forbidden = client.get(path + "/rendered", headers=tokens.header("ingest"))  # PACS/EHR systems read nothing
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"

    response = client.get(path + "/rendered", headers=tokens.header("clinician"))
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.content)).size == (256, 256)
    with runtime.sessions() as session:
        events = audit.list_events(session=session, event_type="dicom.retrieve", limit=100)
        denied = audit.list_events(session=session, event_type="access.denied", limit=100)
    [event] = [e for e in events if (e.detail or {}).get("rendered")]
    assert event.action == "R" and event.outcome == audit.SUCCESS and event.actor_role == "clinician"
    assert event.detail["sop_instance_uid"] == path.rsplit("/", 1)[1]
    assert event.detail["rendered"] == "image/png"
    assert event.entity_ref == "study:" + path.split("/")[3]
    assert any(e.entity_ref.endswith("/rendered") for e in denied)


def test_the_heatmap_renders_and_the_sr_is_refused(client: TestClient, tokens: Tokens) -> None:
    _, report = _analyzed_study(client, tokens)
    clinician = tokens.header("clinician")
    heatmap = client.get(report["dicom"]["heatmap"]["wado_rs"] + "/rendered", headers=clinician)
    assert heatmap.status_code == 200, heatmap.text
    image = Image.open(io.BytesIO(heatmap.content))
    assert image.mode == "RGB" and min(image.size) > 64
    pixels = np.asarray(image).astype(np.int16)
    assert np.abs(pixels[..., 0] - pixels[..., 2]).max() > 32, "the colour overlay is there"

    sr = client.get(report["dicom"]["sr"]["wado_rs"] + "/rendered", headers=clinician)
    assert sr.status_code == 406, sr.text
    message = sr.json()["error"]["message"]
    assert "no pixel data" in message and report["dicom"]["sr"]["sop_instance_uid"] in message


def test_one_frame_of_a_multi_frame_instance(client: TestClient, tokens: Tokens) -> None:
    """Found in review: only the first frame could be rendered, while the models read the middle one, so the
    viewer showed a multi-frame study's heatmap over another frame than the one the model read."""
    dataset = pydicom.dcmread(io.BytesIO(image_instance(np.zeros((8, 8), dtype=np.uint16), window=(128, 256))))
    frames = np.stack([np.full((8, 8), value, dtype=np.uint16) for value in (0, 128, 255)])
    dataset.NumberOfFrames = 3
    dataset.PixelData = frames.tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    path = "/dicomweb" + _stowed(client, tokens, buffer.getvalue())
    clinician = tokens.header("clinician")
    shown = [
        int(np.asarray(Image.open(io.BytesIO(client.get(url, headers=clinician).content))).mean())
        for url in (
            f"{path}/rendered",
            f"{path}/frames/1/rendered",
            f"{path}/frames/2/rendered",
            f"{path}/frames/3/rendered",
        )
    ]
    assert shown[0] == shown[1] == 0 and 120 < shown[2] < 136 and shown[3] == 255, shown
    assert client.get(f"{path}/frames/4/rendered", headers=clinician).status_code == 404
    for bad in ("0", "1,2", "²"):
        response = client.get(f"{path}/frames/{bad}/rendered", headers=clinician)
        assert response.status_code == 400 and "frame" in response.json()["error"]["message"], bad
