"""Bearer JWT authentication and SMART on FHIR v2 scope checks.

Tokens are validated against the configured issuer's JWKS in production; the embedded default keeps a local
ES256 signing key under the state directory, and ``clinfer token --role ROLE`` mints tokens with it.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from service.config import Settings
from service.errors import Forbidden, TransientError, Unauthenticated
from service.schemas import Principal

log = logging.getLogger(__name__)

ALGORITHMS = ["ES256", "RS256"]

# Roles are bundles of SMART v2 scopes (context/resource.permissions, permissions from "cruds").
ROLE_SCOPES: dict[str, tuple[str, ...]] = {
    # an EHR's or PACS's integration engine: writes the clinical inputs; it reads nothing (least privilege)
    "ingest": (
        "system/Patient.cud",
        "system/Observation.cud",
        "system/Condition.cud",
        "system/MedicationStatement.cud",
        "system/ImagingStudy.cud",
        "system/ServiceRequest.cud",
    ),
    # a clinician's app: reads inputs and results, orders AI reads
    "clinician": (
        "user/Patient.rs",
        "user/ImagingStudy.rs",
        "user/Observation.rs",
        "user/Condition.rs",
        "user/MedicationStatement.rs",
        "user/DiagnosticReport.rs",
        "user/Provenance.rs",
        "user/Device.rs",
        "user/ServiceRequest.crs",
        "user/Task.rs",
    ),
    "admin": (
        "system/AuditEvent.rs",
        "system/Device.cruds",
        "system/Provenance.rs",
        "system/Task.rus",  # u: re-send failed result pushes (POST /v1/deliveries/retry)
        "system/ServiceRequest.c",
    ),
}

_SCOPE = re.compile(r"^(patient|user|system)/([A-Za-z*]+)\.([cruds]+|\*|read|write)$")


def scope_allows(granted: frozenset[str], resource: str, permission: str) -> bool:
    """Whether any granted SMART scope covers ``permission`` (one of c r u d s) on ``resource``."""
    for scope in granted:
        match = _SCOPE.match(scope)
        if not match:
            continue
        _context, scoped_resource, permissions = match.groups()
        if scoped_resource not in (resource, "*"):
            continue
        if permissions == "*" or permission in permissions:
            return True
        if permissions == "read" and permission in "rs":  # SMART v1 spelling
            return True
        if permissions == "write" and permission in "cud":
            return True
    return False


def ensure_dev_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load the local dev signing key, creating it (mode 0600) on first use."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise Unauthenticated(f"{path} is not an EC private key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def mint_token(
    settings: Settings,
    *,
    role: str,
    subject: str | None = None,
    ttl_seconds: int = 3600,
    scopes: tuple[str, ...] | None = None,
    patient: str | None = None,
) -> str:
    """A token signed with the local dev key, carrying the role's scopes (or ``scopes``) and, for a SMART
    patient-level launch, the ``patient`` in context."""
    if role not in ROLE_SCOPES:
        raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLE_SCOPES)}")
    key = ensure_dev_key(settings.effective_dev_key_path)
    now = dt.datetime.now(dt.UTC)
    claims = {
        "iss": settings.auth_issuer,
        "aud": settings.auth_audience,
        "sub": subject or f"{role}-dev",
        "iat": now,
        "nbf": now,
        "exp": now + dt.timedelta(seconds=ttl_seconds),
        "jti": uuid.uuid4().hex,
        "scope": " ".join(scopes if scopes is not None else ROLE_SCOPES[role]),
        "clinfer_role": role,
    }
    if patient is not None:
        claims["patient"] = patient
    return jwt.encode(claims, key, algorithm="ES256")


class KeySetUnavailable(TransientError):
    """The issuer's key set could not be fetched, and none was fetched before: no token can be checked (503)."""

    code = "jwks-unavailable"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds until the key set is tried again


# The issuer's key set is fetched again once it is JWKS_REFRESH_SECONDS old (so that a key removed from it stops
# admitting tokens), and for a token whose key it lacks (the issuer rotated its keys) — never sooner than
# JWKS_RETRY_SECONDS after the last try, whether that failed or not: an issuer that is down or slow costs one
# timeout every JWKS_RETRY_SECONDS, not one per request, and tokens with made-up key ids cannot make us fetch.
JWKS_REFRESH_SECONDS = 300.0
JWKS_RETRY_SECONDS = 30.0
_JWKS_MAX_BYTES = 1024**2


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """The key set is fetched from the configured URL only (as PyJWKClient does): a redirect is a failed fetch."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _download_key_set(url: str, timeout: float) -> dict[str, jwt.PyJWK]:
    """The signing keys (by key id) of the JWKS at ``url``, read within about ``timeout`` seconds.

    Raises:
        OSError, http.client.HTTPException, ValueError, jwt.PyJWTError: unreachable, slow, an HTTP error, or a
            body that is not a JWKS with a usable signing key.
    """
    if not url.lower().startswith(("https://", "http://")):
        raise ValueError(f"the JWKS URL must be http(s), not {url[:40]!r}")
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    chunks: list[bytes] = []
    size = 0
    try:
        opened = urllib.request.build_opener(_NoRedirects()).open(request, timeout=timeout)
    except urllib.error.HTTPError as e:  # a 4xx or 5xx (a redirect refused too): a failed fetch
        e.close()
        raise
    with opened as response:
        # the socket timeout bounds each wait; the deadline bounds a body that trickles in
        while chunk := response.read1(65536):
            size += len(chunk)
            if size > _JWKS_MAX_BYTES:
                raise ValueError(f"the JWKS is larger than {_JWKS_MAX_BYTES} bytes")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the JWKS took longer than {timeout} s to read")
            chunks.append(chunk)
    document = json.loads(b"".join(chunks))
    if not isinstance(document, dict):
        raise ValueError("the JWKS is not a JSON object")
    keys = jwt.PyJWKSet.from_dict(document).keys
    signing = {key.key_id: key for key in keys if key.key_id and key.public_key_use in ("sig", None)}
    if not signing:
        raise ValueError("the JWKS has no signing key with a key id")
    return signing


class IssuerKeys:
    """The issuer's signing keys, fetched from its JWKS with a short timeout and kept.

    A refresh that fails keeps the keys fetched last (they go on verifying tokens through an outage of the
    issuer); the next try waits JWKS_RETRY_SECONDS. One fetch runs at a time, and a request whose key is at hand
    never waits for it.
    """

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched = False
        self._fetched_at = -math.inf  # time.monotonic() of the last fetch that succeeded
        self._tried_at = -math.inf  # and of the last try
        self._fetching = threading.Lock()

    def key_for(self, kid: str | None) -> Any:
        """The verification key of the token whose header names ``kid``.

        Raises:
            Unauthenticated: the key set has no such key (and it was fetched lately, or cannot be fetched now).
            KeySetUnavailable: the key set was never fetched, and cannot be now.
        """
        key = self._keys.get(kid) if kid else None
        if key is None or self._stale():
            # with a key at hand, a fetch another request runs is not waited for
            if self._fetching.acquire(blocking=key is None, timeout=self.timeout if key is None else -1):
                try:
                    if self._may_try(stale_only=key is not None):  # not tried meanwhile by the request waited for
                        self._fetch()
                finally:
                    self._fetching.release()
            key = self._keys.get(kid) if kid else None
        if key is not None:
            return key.key
        if not self._fetched:
            next_try = self._tried_at + JWKS_RETRY_SECONDS - time.monotonic()
            retry = max(1, math.ceil(next_try)) if math.isfinite(next_try) else 1
            raise KeySetUnavailable(
                "the token issuer's keys (JWKS) cannot be fetched, so no token can be checked; try again later",
                retry_after=retry,
            )
        raise Unauthenticated(
            "no signing key for this token: the token's header has no key id (kid)"
            if not kid
            else f"no signing key for this token: the issuer's key set has no key {kid[:80]!r}"
        )

    def _download_within_timeout(self) -> dict[str, jwt.PyJWK]:
        """``_download_key_set`` in a thread of its own, waited for ``timeout`` seconds in all: socket timeouts bound
        each wait only, and an issuer trickling its answer a byte at a time would hold the fetch (and the requests
        that need a key) for as long as it liked. A download given up on ends with its socket's timeouts, unused.

        Raises:
            TimeoutError: no key set within the timeout; or what the download raised.
        """
        outcome: list[dict[str, jwt.PyJWK] | BaseException] = []

        def download() -> None:
            try:
                outcome.append(_download_key_set(self.url, self.timeout))
            except BaseException as e:  # handed to the waiting request, which decides
                outcome.append(e)

        worker = threading.Thread(target=download, name="jwks-fetch", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if not outcome:
            raise TimeoutError(f"no JWKS within {self.timeout:g} s")
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def _stale(self) -> bool:
        return time.monotonic() - self._fetched_at >= JWKS_REFRESH_SECONDS

    def _may_try(self, *, stale_only: bool) -> bool:
        if stale_only and not self._stale():
            return False
        return time.monotonic() - self._tried_at >= JWKS_RETRY_SECONDS

    def _fetch(self) -> None:
        self._tried_at = time.monotonic()
        try:
            keys = self._download_within_timeout()
        except (OSError, http.client.HTTPException, ValueError, jwt.PyJWTError) as e:
            # kept: the keys fetched before (if any); told: the log, and each request that needed a new key
            log.warning(
                "the JWKS at %s could not be fetched (%s: %s); tried again in %.0f s at the soonest",
                self.url,
                type(e).__name__,
                str(e)[:200],
                JWKS_RETRY_SECONDS,
            )
            return
        self._keys = keys
        self._fetched = True
        self._fetched_at = time.monotonic()


@lru_cache(maxsize=4)
def issuer_keys(url: str, timeout: float) -> IssuerKeys:
    """The process's one ``IssuerKeys`` of each configured JWKS."""
    return IssuerKeys(url, timeout)


def _verification_key(settings: Settings, token: str) -> Any:
    if settings.auth_jwks_url:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"invalid token: {e}") from e
        keys = issuer_keys(settings.auth_jwks_url, settings.auth_jwks_timeout_seconds)
        return keys.key_for(kid if isinstance(kid, str) else None)
    return ensure_dev_key(settings.effective_dev_key_path).public_key()


# A client sends the same token with every request; its signature is checked once and its claims are kept, by
# the token's exact text, until it expires — and for at most VERIFIED_TOKEN_SECONDS, so that a key removed from
# the issuer's JWKS (or a replaced dev key) stops admitting its tokens soon.
VERIFIED_TOKEN_SECONDS = 300.0
_VERIFIED_TOKENS_MAX = 4096
_verified: OrderedDict[tuple[str, ...], tuple[float, dict[str, Any]]] = OrderedDict()
_verified_lock = threading.Lock()


def _now() -> float:
    return time.time()


def _cache_key(settings: Settings, token: str) -> tuple[str, ...]:
    return (
        token,
        settings.auth_jwks_url or str(settings.effective_dev_key_path),
        settings.auth_issuer,
        settings.auth_audience,
    )


def _cached_claims(key: tuple[str, ...]) -> dict[str, Any] | None:
    with _verified_lock:
        cached = _verified.get(key)
    if cached is not None and _now() < cached[0]:
        return cached[1]
    return None


def _verified_claims(settings: Settings, token: str) -> dict[str, Any]:
    key = _cache_key(settings, token)
    cached = _cached_claims(key)
    if cached is not None:
        return cached
    try:
        claims = jwt.decode(
            token,
            _verification_key(settings, token),
            algorithms=ALGORITHMS,
            audience=settings.auth_audience,
            issuer=settings.auth_issuer,
            options={"require": ["exp", "iss", "aud", "sub"]},
        )
    except jwt.PyJWTError as e:
        raise Unauthenticated(f"invalid token: {e}") from e
    _scopes(claims)  # a token whose scopes cannot be read is refused, and not kept
    # PyJWT admits a token while now < exp (no leeway here); the cache never admits it longer
    until = min(float(claims["exp"]), _now() + VERIFIED_TOKEN_SECONDS)
    with _verified_lock:
        _verified[key] = (until, claims)
        _verified.move_to_end(key)
        while len(_verified) > _VERIFIED_TOKENS_MAX:
            _verified.popitem(last=False)
    return claims


def _anonymous(source_address: str | None) -> Principal:
    return Principal(
        subject="anonymous",
        role="admin",
        scopes=frozenset(s for r in ROLE_SCOPES.values() for s in r),
        source_address=source_address,
    )


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("a bearer token is required")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
    return token.strip()


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    """The token's scopes: ``scope`` (RFC 8693: a space-separated string) or ``scp`` (a string or a list of them).

    Raises:
        Unauthenticated: the claim is of another type (a number, an object, a list of anything but strings).
    """
    raw = claims.get("scope") or claims.get("scp") or ""
    if isinstance(raw, str):
        return frozenset(raw.split())
    if isinstance(raw, list) and all(isinstance(scope, str) for scope in raw):
        return frozenset(raw)
    raise Unauthenticated(f"invalid token: its scope claim is a {type(raw).__name__}, not a space-separated string")


def _principal(claims: dict[str, Any], source_address: str | None) -> Principal:
    scopes = _scopes(claims)
    role = claims.get("clinfer_role")
    patient = claims.get("patient")
    return Principal(
        subject=str(claims["sub"]),
        role=role if isinstance(role, str) else None,
        scopes=scopes,
        source_address=source_address,
        patient=patient if isinstance(patient, str) else None,
    )


def authenticate(settings: Settings, authorization: str | None, *, source_address: str | None) -> Principal:
    """Validate a bearer token and return who it names.

    Raises:
        Unauthenticated: no token, malformed, bad signature, expired, wrong issuer or audience.
    """
    if not settings.auth_enabled:
        return _anonymous(source_address)
    return _principal(_verified_claims(settings, _bearer_token(authorization)), source_address)


def authenticate_verified(
    settings: Settings, authorization: str | None, *, source_address: str | None
) -> Principal | None:
    """``authenticate`` for a token whose signature was checked lately (no cryptography, no JWKS fetch: fit for
    the event loop); None when the token is yet to be verified.

    Raises:
        Unauthenticated: no token, or a malformed Authorization header.
    """
    if not settings.auth_enabled:
        return _anonymous(source_address)
    claims = _cached_claims(_cache_key(settings, _bearer_token(authorization)))
    return None if claims is None else _principal(claims, source_address)


# Why a patient/ scope does not open a resource that the FHIR API serves (there, patient/ scopes count elsewhere).
_PATIENT_SCOPES_REFUSED = {
    "AuditEvent": "the audit trail is a security officer's record of every patient, not a patient's record, and"
    " patient/ scopes do not open it",
}


def allows(principal: Principal, resource: str, permission: str, *, patient_scopes: bool = True) -> bool:
    """Whether ``authorize`` would let the principal through."""
    try:
        authorize(principal, resource, permission, patient_scopes=patient_scopes)
    except Forbidden:
        return False
    return True


def authorize(principal: Principal, resource: str, permission: str, *, patient_scopes: bool = True) -> None:
    """Raise Forbidden unless the principal's scopes cover the permission on the resource.

    Args:
        patient_scopes: whether SMART ``patient/`` scopes count. Only the FHIR API narrows what it returns to the
            token's patient (``patient_compartment``); a route that does not must not count them, or a token for
            one patient would see every patient's data there.
    """
    granted = principal.scopes
    if not patient_scopes:
        granted = frozenset(s for s in granted if not s.startswith("patient/"))
    if scope_allows(granted, resource, permission):
        return
    if not patient_scopes and scope_allows(principal.scopes, resource, permission):
        raise Forbidden(
            f"scope user/ or system/{resource}.{permission} is required: "
            + _PATIENT_SCOPES_REFUSED.get(
                resource,
                "patient/ scopes do not write: nothing holds a write to the token's patient"
                if permission in "cud"
                else "patient/ scopes are honoured on the FHIR API only, which narrows what it returns to the"
                " token's patient",
            )
        )
    raise Forbidden(f"scope {resource}.{permission} is required")


def patient_compartment(principal: Principal, resource: str, permission: str) -> str | None:
    """The one patient a principal may see of ``resource``, or None when user/system scopes allow any.

    A SMART patient/ scope only covers the patient of the token's launch context (its ``patient`` claim).

    Raises:
        Forbidden: no scope covers the permission, or a patient/ scope without a launch patient.
    """
    wide = frozenset(s for s in principal.scopes if not s.startswith("patient/"))
    if scope_allows(wide, resource, permission):
        return None
    narrow = frozenset(s for s in principal.scopes if s.startswith("patient/"))
    if not scope_allows(narrow, resource, permission):
        raise Forbidden(f"scope {resource}.{permission} is required")
    if not principal.patient:
        raise Forbidden("a patient/ scope needs the token's patient (launch context) claim")
    return principal.patient


def may_read(principal: Principal, resource: str, patient_ref: str | None) -> bool:
    """Whether the principal may read a ``resource`` about ``patient_ref`` (``Patient/<id>``) by the rules a FHIR
    read follows: a user/ or system/ scope, or a patient/ scope and the resource in the token's patient compartment.
    A write's answer carries the resource only then (an ingest system writes and reads nothing back)."""
    try:
        compartment = patient_compartment(principal, resource, "r")
    except Forbidden:
        return False
    return compartment is None or patient_ref == f"Patient/{compartment}"
