"""Pulse reaches the broker over TLS (mqtts://): the broker's certificate is checked
against PULSE_MQTT_CA_FILE and its name against the URL's host, or Pulse does not
connect. The devices here use the broker's plain listener; Pulse its TLS one."""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pulse.config import Settings
from pulse.mqtt.link import BrokerUrl
from tests.mqtt.broker import Device, Mosquitto, closing
from tests.mqtt.support import DEVICES, rows, until_rows, wait_subscribed
from tests.support import running_server, until

CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def authority(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclasses.dataclass
class Pki:
    ca: Path  # the CA that signed the broker's certificate
    other_ca: Path  # a CA that did not
    chain: Path
    key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, and the broker's certificate from it, for the name localhost only."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, ca = authority("Pulse test CA")
    _, other = authority("Another CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(folder / "ca.pem", folder / "other-ca.pem", folder / "broker.pem", folder / "key.pem")
    pki.ca.write_bytes(pem(ca))
    pki.other_ca.write_bytes(pem(other))
    pki.chain.write_bytes(pem(cert))
    pki.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pki.key.chmod(0o600)
    return pki


@pytest.fixture
async def broker(mosquitto_binary: None, tmp_path: Path, pki: Pki) -> AsyncIterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto", tls=(pki.chain, pki.key))
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


def over_tls(settings: Settings, broker: Mosquitto, url: str, ca_file: Path) -> Settings:
    return dataclasses.replace(
        settings,
        mqtt_url=url,
        mqtt_ca_file=str(ca_file),
        mqtt_client_id=f"pulse-test-{broker.port}",
    )


async def test_readings_come_through_a_broker_reached_over_tls(
    settings: Settings,
    broker: Mosquitto,
    pki: Pki,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
) -> None:
    served = over_tls(settings, broker, broker.tls_url("localhost"), pki.ca)
    admin = {"Authorization": f"Bearer {make_token('t1', ('tenant-admin',))}"}
    async with (
        running_server(served) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        await wait_subscribed(http)
        # The device's broker credentials are made over the TLS connection.
        created = await http.post(DEVICES, json={"device_id": "dev-1"}, headers=admin)
        assert created.status_code == 201, created.text
        device = Device(broker, "t1/dev-1", created.json()["provision_token"])
        with closing(device):
            assert not (await device.connect()).is_failure
            reason = await device.publish("pulse/t1/dev-1/telemetry", b'{"metrics": {"v": 1}}')
            assert not reason.is_failure
            await until_rows(pool, 1)
    assert await rows(pool) == [{"device_id": "dev-1", "seq": None, "metrics": '{"v": 1}'}]


@pytest.mark.parametrize(
    ("host", "trusted", "refusal"),
    [
        ("localhost", False, "certificate verify failed"),  # signed by a CA not trusted
        ("127.0.0.1", True, "IP address mismatch"),  # the certificate is for localhost
    ],
)
async def test_a_broker_that_fails_the_checks_is_not_used(
    settings: Settings,
    broker: Mosquitto,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    host: str,
    trusted: bool,
    refusal: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="pulse.mqtt.link")
    served = over_tls(settings, broker, broker.tls_url(host), pki.ca if trusted else pki.other_ca)
    async with (
        running_server(served) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        await until(lambda: any(refusal in r.getMessage() for r in caplog.records))
        mqtt = (await http.get("/api/v1/telemetry/stream/status")).json()["mqtt"]
        assert mqtt["connected"] is False


def test_an_mqtts_url_means_tls_on_8883_by_default(pki: Pki) -> None:
    plain = BrokerUrl.parse("mqtt://admin:pw@broker")
    assert (plain.port, plain.tls) == (1883, None)
    secure = BrokerUrl.parse("mqtts://admin:pw@broker", str(pki.ca))
    assert secure.port == 8883 and secure.tls is not None
    assert secure.tls.check_hostname
    with pytest.raises(ValueError, match="PULSE_MQTT_CA_FILE"):
        BrokerUrl.parse("mqtts://admin:pw@broker", str(pki.ca.parent / "missing.pem"))
