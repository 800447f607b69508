from __future__ import annotations

import datetime as dt
from pathlib import Path

import jwt
import pytest

from service.api.auth import ROLE_SCOPES, authenticate, authorize, ensure_dev_key, mint_token, scope_allows
from service.config import Settings
from service.errors import Forbidden, Unauthenticated


def test_scopes_follow_smart_v2() -> None:
    granted = frozenset({"user/DiagnosticReport.rs", "system/Observation.cu"})
    assert scope_allows(granted, "DiagnosticReport", "r")
    assert scope_allows(granted, "DiagnosticReport", "s")
    assert not scope_allows(granted, "DiagnosticReport", "c")
    assert scope_allows(granted, "Observation", "u")
    assert not scope_allows(granted, "Observation", "r")
    assert scope_allows(frozenset({"system/*.r"}), "Patient", "r")
    assert not scope_allows(frozenset({"garbage"}), "Patient", "r")


def test_roles_separate_ingest_from_reading() -> None:
    ingest = frozenset(ROLE_SCOPES["ingest"])
    clinician = frozenset(ROLE_SCOPES["clinician"])
    assert scope_allows(ingest, "ImagingStudy", "c") and not scope_allows(ingest, "DiagnosticReport", "r")
    assert scope_allows(clinician, "DiagnosticReport", "r") and not scope_allows(clinician, "ImagingStudy", "c")
    assert not scope_allows(clinician, "AuditEvent", "r")


def test_minted_token_round_trip_and_rejections(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    principal = authenticate(settings, f"Bearer {mint_token(settings, role='clinician')}", source_address="10.0.0.1")
    assert principal.role == "clinician" and principal.subject == "clinician-dev"
    authorize(principal, "DiagnosticReport", "r")
    with pytest.raises(Forbidden):
        authorize(principal, "ImagingStudy", "c")
    with pytest.raises(Unauthenticated):
        authenticate(settings, None, source_address=None)
    with pytest.raises(Unauthenticated):
        authenticate(settings, "Basic abc", source_address=None)
    expired = mint_token(settings, role="admin", ttl_seconds=-10)
    with pytest.raises(Unauthenticated, match="expired"):
        authenticate(settings, f"Bearer {expired}", source_address=None)
    key = ensure_dev_key(settings.effective_dev_key_path)
    wrong_audience = jwt.encode(
        {
            "iss": settings.auth_issuer,
            "aud": "someone-else",
            "sub": "x",
            "exp": dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5),
        },
        key,
        algorithm="ES256",
    )
    with pytest.raises(Unauthenticated, match="(?i)audience"):
        authenticate(settings, f"Bearer {wrong_audience}", source_address=None)
    unsigned = jwt.encode(
        {
            "iss": settings.auth_issuer,
            "aud": settings.auth_audience,
            "sub": "x",
            "exp": dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5),
        },
        None,
        algorithm="none",
    )
    with pytest.raises(Unauthenticated):
        authenticate(settings, f"Bearer {unsigned}", source_address=None)


def test_dev_key_is_private(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    ensure_dev_key(path)
    assert path.stat().st_mode & 0o077 == 0


def test_a_verified_token_is_checked_once_and_still_expires(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.api import auth

    settings = Settings(state_dir=tmp_path)
    token = mint_token(settings, role="ingest", ttl_seconds=600)
    decoded = []
    real_decode = jwt.decode

    def counting_decode(*args: object, **kwargs: object) -> object:
        decoded.append(1)
        return real_decode(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(auth.jwt, "decode", counting_decode)
    first = authenticate(settings, f"Bearer {token}", source_address="10.0.0.1")
    second = authenticate(settings, f"Bearer {token}", source_address="10.0.0.2")
    assert len(decoded) == 1, "the same token's signature is checked once"
    assert (first.subject, first.scopes, second.source_address) == (second.subject, second.scopes, "10.0.0.2")
    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(Unauthenticated):
        authenticate(settings, f"Bearer {tampered}", source_address=None)
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    monkeypatch.setattr(auth, "_now", lambda: exp + 1.0)  # the cache's clock passes the token's expiry
    monkeypatch.setattr(auth.jwt, "decode", lambda *a, **k: (_ for _ in ()).throw(jwt.ExpiredSignatureError("expired")))
    with pytest.raises(Unauthenticated, match="expired"):
        authenticate(settings, f"Bearer {token}", source_address=None)


def test_a_cached_token_is_verified_again_after_the_cache_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.api import auth

    settings = Settings(state_dir=tmp_path)
    token = mint_token(settings, role="ingest", ttl_seconds=3600)
    authenticate(settings, f"Bearer {token}", source_address=None)
    started = auth._now()
    monkeypatch.setattr(auth, "_now", lambda: started + auth.VERIFIED_TOKEN_SECONDS + 1)
    decoded = []
    real_decode = jwt.decode
    monkeypatch.setattr(auth.jwt, "decode", lambda *a, **k: decoded.append(1) or real_decode(*a, **k))
    authenticate(settings, f"Bearer {token}", source_address=None)
    assert decoded == [1]


def test_only_a_token_verified_lately_is_admitted_without_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.api import auth

    settings = Settings(state_dir=tmp_path)
    token = mint_token(settings, role="clinician", ttl_seconds=600)
    assert auth.authenticate_verified(settings, f"Bearer {token}", source_address=None) is None, "never verified"
    for header in (None, "", "Basic abc", "Bearer  "):
        with pytest.raises(Unauthenticated):
            auth.authenticate_verified(settings, header, source_address=None)
    verified = authenticate(settings, f"Bearer {token}", source_address="10.0.0.1")
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    monkeypatch.setattr(auth.jwt, "decode", lambda *a, **k: pytest.fail("a verified token is not decoded again"))
    cached = auth.authenticate_verified(settings, f"bearer {token}", source_address="10.0.0.2")
    assert cached is not None
    assert (cached.subject, cached.role, cached.scopes) == (verified.subject, verified.role, verified.scopes)
    assert cached.source_address == "10.0.0.2"
    monkeypatch.setattr(auth, "_now", lambda: exp)  # expired: to be verified again (and refused)
    assert auth.authenticate_verified(settings, f"Bearer {token}", source_address=None) is None
    anonymous = auth.authenticate_verified(Settings(state_dir=tmp_path, auth_enabled=False), None, source_address=None)
    assert anonymous is not None and anonymous.role == "admin"


def _signed(settings: Settings, **claims: object) -> str:
    now = dt.datetime.now(dt.UTC)
    return jwt.encode(
        {
            "iss": settings.auth_issuer,
            "aud": settings.auth_audience,
            "sub": "odd-scopes",
            "exp": now + dt.timedelta(minutes=5),
            **claims,
        },
        ensure_dev_key(settings.effective_dev_key_path),
        algorithm="ES256",
    )


def test_a_signed_token_whose_scopes_cannot_be_read_is_unauthenticated(tmp_path: Path) -> None:
    """Found in review: a validly signed token whose ``scope`` claim was not a string (a number) raised a
    TypeError, a 500. It is refused as any other invalid token, every time (it is not kept as verified)."""
    settings = Settings(state_dir=tmp_path)
    for odd in (123, {"a": 1}, ["user/Patient.rs", 7], True):
        token = _signed(settings, scope=odd)
        for _ in range(2):
            with pytest.raises(Unauthenticated, match="scope claim"):
                authenticate(settings, f"Bearer {token}", source_address=None)
    listed = authenticate(settings, f"Bearer {_signed(settings, scp=['user/Patient.rs'])}", source_address=None)
    assert listed.scopes == frozenset({"user/Patient.rs"})  # scp as a list of strings (some issuers' form)
