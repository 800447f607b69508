"""STOW-RS client: push Part 10 objects to a DICOMweb server in one multipart/related request (PS3.18 10.5).

How answers are classified:

- 200 (and any other 2xx): delivered. 202 with a FailedSOPSequence (some stored, some refused) and 409 (none stored):
  DeliveryRejected naming each refused SOP Instance UID and its FailureReason; 202 without one (warnings only):
  delivered. A FailedSOPSequence under any status is a refusal, unless every FailureReason in it is a temporary one
  (A7xx Out of Resources, 0110 Processing Failure): then TransientError;
- 408 Request Timeout, 429 Too Many Requests, any 5xx, connection errors and timeouts: TransientError;
- any other 4xx (400, 401, 403, 404, 413, 415, ...) and 3xx (a redirect: configure the final URL): DeliveryRejected.
"""

from __future__ import annotations

import json
import logging
import ssl
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from service.destinations import DeliveryRejected, RefusedInstance, describe_refused, is_transient_status
from service.errors import ConfigurationError, TransientError

log = logging.getLogger(__name__)

# PS3.18 F.2 DICOM JSON tags of the Store Instances Response Module
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"

_RETRYABLE_CLIENT_ERRORS = (408, 429)


def _first_value(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    if isinstance(element, dict) and isinstance(element.get("Value"), list) and element["Value"]:
        return element["Value"][0]
    return None


def failed_instances(body: bytes) -> list[RefusedInstance]:
    """The FailedSOPSequence of a PS3.18 JSON store response; empty when there is none or the body is not JSON."""
    try:
        document = json.loads(body) if body else None
    except ValueError:
        return []
    if not isinstance(document, dict):
        return []
    sequence = document.get(FAILED_SOP_SEQUENCE)
    items = sequence.get("Value") if isinstance(sequence, dict) else None
    refused = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        uid = _first_value(item, REFERENCED_SOP_INSTANCE_UID)
        reason = _first_value(item, FAILURE_REASON)
        refused.append(RefusedInstance(str(uid) if uid else None, int(reason) if isinstance(reason, int) else 0x0110))
    return refused


def multipart_related(objects: Sequence[bytes]) -> tuple[bytes, str]:
    """The request body and its Content-Type: one application/dicom part per object."""
    boundary = f"clinfer-{uuid.uuid4().hex}"
    chunks = []
    for data in objects:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


@dataclass(frozen=True)
class StowDestination:
    """A DICOMweb server we STOW-RS to.

    Attributes:
        name: the configured name, used in messages.
        url: the DICOMweb service base, without ``/studies``: the request goes to ``POST {url}/studies``. For clinfer
            itself that is ``http://host:8000/dicomweb``; for Orthanc ``http://host:8042/dicom-web``.
        bearer_token: sent as ``Authorization: Bearer ...`` when set; never written to messages or logs.
        timeout: seconds for connecting and for each read and write.
        verify: check the server's TLS certificate against the system CAs (True), a PEM CA bundle (its path),
            or not at all (False: only for tests).
    """

    name: str
    url: str
    bearer_token: str | None = None
    timeout: float = 30.0
    verify: bool | str = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("'name' must be a non-empty str")
        try:
            parsed = httpx.URL(self.url)
        except (httpx.InvalidURL, TypeError) as e:
            raise ValueError(f"'url' must be an http(s) URL, not {self.url!r}") from e
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"'url' must be an http(s) URL with a host, not {self.url!r}")
        if parsed.userinfo:
            raise ValueError("'url' must not carry credentials; use 'bearer_token'")
        if parsed.path.rstrip("/").endswith("/studies"):
            raise ValueError(f"'url' is the DICOMweb base; '/studies' is appended to it: {self.url!r}")
        if not isinstance(self.timeout, int | float) or not self.timeout > 0:
            raise ValueError(f"'timeout' must be a positive number of seconds, not {self.timeout!r}")

    @property
    def kind(self) -> str:
        return "stow"

    @property
    def studies_url(self) -> str:
        return self.url.rstrip("/") + "/studies"

    @property
    def _peer(self) -> str:
        return f"STOW-RS destination {self.name!r} ({self.studies_url})"

    def _verify(self) -> bool | ssl.SSLContext:
        if not isinstance(self.verify, str):
            return self.verify
        try:
            return ssl.create_default_context(cafile=self.verify)
        except (OSError, ssl.SSLError) as e:
            raise ConfigurationError(f"CA bundle for {self._peer} could not be loaded: {e}") from e

    def send(self, objects: Sequence[bytes]) -> None:
        """POST every object in one STOW-RS request.

        Args:
            objects: DICOM Part 10 files.

        Raises:
            TransientError: connection error, timeout, HTTP 5xx, 408 or 429; try again later.
            DeliveryRejected: HTTP 3xx or 4xx, or a FailedSOPSequence in the response.
            ConfigurationError: the CA bundle in ``verify`` cannot be loaded.
        """
        if not objects:
            return
        body, content_type = multipart_related(objects)
        headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
        if self.bearer_token:
            headers["Authorization"] = f"Bearer {self.bearer_token}"
        try:
            with httpx.Client(timeout=self.timeout, verify=self._verify(), follow_redirects=False) as client:
                response = client.post(self.studies_url, content=body, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError) as e:
            raise TransientError(f"{self._peer} could not be reached: {type(e).__name__}: {e}") from e
        except httpx.TimeoutException as e:  # a read or write timeout: connected, the request (partly) sent
            raise TransientError(
                f"{self._peer} was sent the request but did not answer within {self.timeout:g} s "
                f"({type(e).__name__}); it may have stored the objects, and they are sent again"
            ) from e
        except httpx.TransportError as e:  # the connection broke, or the answer was not HTTP
            raise TransientError(f"{self._peer}: the exchange failed: {type(e).__name__}: {e}") from e
        status = response.status_code
        refused = failed_instances(response.content)
        if refused and all(is_transient_status(r.status) for r in refused):
            raise TransientError(
                f"{self._peer} could not store {len(refused)} of {len(objects)} instances now (HTTP {status}): "
                f"{describe_refused(refused)}"
            )
        if refused:
            raise DeliveryRejected(
                f"{self._peer} refused {len(refused)} of {len(objects)} instances (HTTP {status}): "
                f"{describe_refused(refused)}",
                destination=self.name,
                refused=refused,
            )
        if status >= 500 or status in _RETRYABLE_CLIENT_ERRORS:
            raise TransientError(f"{self._peer} answered HTTP {status}; try again later")
        if not 200 <= status < 300:
            raise DeliveryRejected(f"{self._peer} refused the request: HTTP {status}", destination=self.name)
        if status == 202:
            log.warning("destination %s stored %d objects with warnings (HTTP 202)", self.name, len(objects))
        log.info("STOW-RS of %d objects to destination %s done (HTTP %d)", len(objects), self.name, status)
