"""The clinician viewer (``/ui/``) and the operations page (``/ui/ops``): static files under service/api/ui/.

The files hold no patient data, so they are served without a token. The pages ask for one (pasted by the user,
kept in the tab's sessionStorage) and send it as ``Authorization: Bearer`` to the same APIs any client uses:
/v1, /fhir and the DICOMweb rendered resource. Every text the APIs return is written with ``textContent``.

Each response carries a strict Content-Security-Policy (no inline script or style, no framing, nothing fetched
from elsewhere), ``X-Content-Type-Options: nosniff`` and ``Referrer-Policy: no-referrer``.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from service.errors import NotFound

router = APIRouter(include_in_schema=False)

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # for browsers that predate frame-ancestors
    "Cache-Control": "no-cache",  # revalidated: a new release's files are used at once
}

# every file the pages are made of, with its media type: nothing else under the folder is served
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "ops.html": "text/html; charset=utf-8",
    "common.js": "text/javascript; charset=utf-8",
    "viewer.js": "text/javascript; charset=utf-8",
    "ops.js": "text/javascript; charset=utf-8",
    "viewer.css": "text/css; charset=utf-8",
}


@functools.cache
def _content(name: str) -> bytes:
    return (resources.files("service.api") / "ui" / name).read_bytes()


def _file(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise NotFound(f"no file {name[:80]!r} in the viewer")
    return Response(_content(name), media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=303, headers=SECURITY_HEADERS)


@router.get("/ui")
async def ui_without_slash() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=303, headers=SECURITY_HEADERS)


@router.get("/ui/")
async def viewer() -> Response:
    return _file("index.html")


@router.get("/ui/ops")
async def operations() -> Response:
    return _file("ops.html")


@router.get("/ui/static/{name}")
async def static_file(name: str) -> Response:
    return _file(name)
