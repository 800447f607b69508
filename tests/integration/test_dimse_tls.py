"""The clinfer DICOM listener over TLS, against dcmtk's echoscu and storescu and our own C-STORE SCU."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from service.config import Settings
from service.destinations.dimse import DimseDestination, TlsClientConfig
from service.dimse import scp
from service.errors import ConfigurationError, TransientError
from service.flows.runtime import Runtime, build_runtime
from service.store.tables import AuditEvent, Instance
from tests.conftest import dcmtk_tool, dimse_listener, free_port, make_settings
from tests.factories import dx_instance


@dataclass(frozen=True)
class Credential:
    key: Path
    cert: Path


@dataclass(frozen=True)
class Pki:
    """A throwaway CA, a server certificate for localhost / 127.0.0.1 and a client certificate it signed, plus a
    client certificate from another CA."""

    ca: Path
    server: Credential
    client: Credential
    stranger: Credential
    stranger_ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _certificate(
    subject: str, key: rsa.RSAPrivateKey, issuer: x509.Name, issuer_key: rsa.RSAPrivateKey, *, usage: str | None
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if usage is None:  # a CA
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        if usage == "server":
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _ca(directory: Path, name: str) -> tuple[Path, x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = _certificate(name, key, _name(name), key, usage=None)
    path = directory / f"{name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def _issue(directory: Path, name: str, ca: tuple[Path, x509.Certificate, rsa.RSAPrivateKey], usage: str) -> Credential:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = _certificate(name, key, ca[1].subject, ca[2], usage=usage)
    credential = Credential(directory / f"{name}.key", directory / f"{name}.crt")
    _write_key(key, credential.key)
    credential.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return credential


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "test-ca")
    other_ca = _ca(directory, "other-ca")
    return Pki(
        ca=ca[0],
        server=_issue(directory, "server", ca, "server"),
        client=_issue(directory, "client", ca, "client"),
        stranger=_issue(directory, "stranger", other_ca, "client"),
        stranger_ca=other_ca[0],
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_listener(tmp_path: Path, pki: Pki, *, require_client_certificate: bool) -> Iterator[Runtime]:
    settings: Settings = make_settings(
        tmp_path,
        dimse_port=free_port(),
        dimse_allowed_calling_ae_titles=["MODALITY1"],
        dimse_tls_cert=pki.server.cert,
        dimse_tls_key=pki.server.key,
        dimse_tls_ca=pki.ca if require_client_certificate else None,
    )
    with dimse_listener(settings) as runtime:
        yield runtime


@pytest.fixture
def tls_listener(tmp_path: Path, pki: Pki) -> Iterator[Runtime]:
    yield from _tls_listener(tmp_path, pki, require_client_certificate=False)


@pytest.fixture
def mutual_tls_listener(tmp_path: Path, pki: Pki) -> Iterator[Runtime]:
    yield from _tls_listener(tmp_path, pki, require_client_certificate=True)


def _dcmtk(
    tool: str, port: int, *options: str, files: tuple[str, ...] = (), timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    command = [dcmtk_tool(tool), "-v", "-aet", "MODALITY1", "-aec", "CLINFER", *options, "127.0.0.1", str(port), *files]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _tls_args(pki: Pki, credential: Credential | None) -> list[str]:
    """dcmtk's TLS options: our CA to verify the listener with, and a client certificate (or none: +tla)."""
    identity = ["+tla"] if credential is None else ["+tls", str(credential.key), str(credential.cert)]
    return [*identity, "+cf", str(pki.ca)]


def _instances(runtime: Runtime) -> int:
    with runtime.sessions() as session:
        return int(session.scalar(select(func.count(Instance.id))) or 0)


def test_echoscu_over_tls_succeeds_and_plain_tcp_fails(tls_listener: Runtime, pki: Pki) -> None:
    port = tls_listener.settings.dimse_port
    echo = _dcmtk("echoscu", port, *_tls_args(pki, pki.client))
    assert echo.returncode == 0, echo.stdout + echo.stderr
    anonymous = _dcmtk("echoscu", port, *_tls_args(pki, None))
    assert anonymous.returncode == 0, "without dimse_tls_ca no client certificate is asked for"
    plain = _dcmtk("echoscu", port)
    assert plain.returncode != 0, plain.stdout + plain.stderr


def test_storescu_over_tls_stores_an_instance(tls_listener: Runtime, pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "img.dcm"
    path.write_bytes(dx_instance(size=128))
    store = _dcmtk("storescu", tls_listener.settings.dimse_port, *_tls_args(pki, pki.client), files=(str(path),))
    assert store.returncode == 0, store.stdout + store.stderr
    assert _instances(tls_listener) == 1


def test_a_silent_connection_does_not_block_the_tls_listener(tls_listener: Runtime, pki: Pki) -> None:
    port = tls_listener.settings.dimse_port
    with socket.create_connection(("127.0.0.1", port)):  # connects, never says hello
        # pynetdicom alone would handshake in its accept loop and wait for this one forever
        echo = _dcmtk("echoscu", port, *_tls_args(pki, pki.client), timeout=15)
        assert echo.returncode == 0, echo.stdout + echo.stderr


def test_mutual_tls_refuses_clients_without_a_certificate_from_our_ca(mutual_tls_listener: Runtime, pki: Pki) -> None:
    port = mutual_tls_listener.settings.dimse_port
    trusted = _dcmtk("echoscu", port, *_tls_args(pki, pki.client))
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    anonymous = _dcmtk("echoscu", port, *_tls_args(pki, None))
    assert anonymous.returncode != 0, anonymous.stdout + anonymous.stderr
    stranger = _dcmtk("echoscu", port, *_tls_args(pki, pki.stranger))
    assert stranger.returncode != 0, stranger.stdout + stranger.stderr
    plain = _dcmtk("echoscu", port)
    assert plain.returncode != 0
    deadline = time.monotonic() + 5  # audited from the connection's thread, after the peer has gone
    refusals: list[AuditEvent] = []
    while len(refusals) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
        with mutual_tls_listener.sessions() as session:
            refusals = list(session.scalars(select(AuditEvent).where(AuditEvent.event_type == "dimse.tls-refused")))
    assert len(refusals) == 3, [r.detail for r in refusals]
    assert {(r.outcome, r.source_address) for r in refusals} == {("4", "127.0.0.1")}
    reasons = {r.detail["reason"] for r in refusals}
    assert {"PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_VERIFY_FAILED"} <= reasons, reasons


def _our_scu(runtime: Runtime, tls: TlsClientConfig | None) -> DimseDestination:
    return DimseDestination(
        name="clinfer-tls",
        host="127.0.0.1",
        port=runtime.settings.dimse_port,
        called_ae_title="CLINFER",
        calling_ae_title="MODALITY1",
        timeout=10,
        tls=tls,
    )


def test_our_scu_pushes_to_our_listener_over_mutual_tls(mutual_tls_listener: Runtime, pki: Pki) -> None:
    study_uid = generate_uid()
    objects = [dx_instance(study_uid=study_uid, seed=i, size=128, instance_number=i + 1) for i in range(2)]
    tls = TlsClientConfig(ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key)
    _our_scu(mutual_tls_listener, tls).send(objects)
    assert _instances(mutual_tls_listener) == 2
    with pytest.raises(TransientError, match="could not be reached"):
        _our_scu(mutual_tls_listener, TlsClientConfig(ca_file=pki.ca)).send(objects)  # no client certificate
    with pytest.raises(TransientError, match="could not be reached"):
        _our_scu(mutual_tls_listener, TlsClientConfig(ca_file=pki.stranger_ca)).send(objects)  # server not trusted
    with pytest.raises(TransientError, match="could not be reached"):
        _our_scu(mutual_tls_listener, None).send(objects)


def test_unreadable_tls_files_refuse_to_start(tmp_path: Path, pki: Pki) -> None:
    settings = make_settings(tmp_path, dimse_port=free_port(), dimse_tls_cert=pki.server.cert, dimse_tls_key=pki.ca)
    with pytest.raises(ConfigurationError, match="TLS files"):
        scp.start(build_runtime(settings), block=False)
