from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings


def test_embedded_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    assert settings.effective_database_url.startswith("sqlite:///")
    assert settings.embedded_worker
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    monkeypatch.setenv("CLINFER_PORT", "9100")
    monkeypatch.setenv("CLINFER_BROKER_URL", "redis://127.0.0.1:6379/0")
    from_env = Settings()
    assert from_env.port == 9100 and not from_env.embedded_worker


def test_refuses_auth_off_on_a_public_bind() -> None:
    with pytest.raises(ValidationError, match="loopback"):
        Settings(auth_enabled=False, host="0.0.0.0")
    assert not Settings(auth_enabled=False, host="127.0.0.1").auth_enabled


def test_cli_refuses_to_start_with_unsafe_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.cli import main
    from service.config import get_settings

    monkeypatch.setenv("CLINFER_AUTH_ENABLED", "false")
    monkeypatch.setenv("CLINFER_HOST", "0.0.0.0")
    get_settings.cache_clear()
    with pytest.raises(SystemExit) as exit_info:
        main(["serve"])
    assert exit_info.value.code == 2
