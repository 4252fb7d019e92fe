"""SMPP over TLS to a carrier: verified against the carrier's CA, and refused
when the certificate does not check out."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from router.config import RouteEntry, RoutesConfig
from router.sim import SimConfig
from tests.esme import connect


def self_signed(tmp: Path, name: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


async def test_carrier_over_tls_verified_and_wrong_ca_refused(
    stack_factory: Any, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path, "carrier")
    other_ca, _ = self_signed(tmp_path, "someone-else")
    sims = {
        "secure": SimConfig(port=0, tls_cert=cert, tls_key=key, dlr_delay=0.05),
        "impostor": SimConfig(port=0, tls_cert=cert, tls_key=key),
    }
    routes = RoutesConfig(
        default=[RouteEntry("secure")], countries={"DK": [RouteEntry("impostor")]}
    )
    stack = await stack_factory(
        sims=sims,
        routes=routes,
        carrier_kw={
            "secure": {"tls": True, "tls_ca": cert},
            # Trusts another CA: the handshake must fail, the session stays down.
            "impostor": {"tls": True, "tls_ca": other_ca},
        },
        bound=False,  # the impostor must stay down
    )
    engine = stack.router.engine
    assert engine.carriers["secure"].up
    assert not engine.carriers["impostor"].up
    esme, _ = await connect(stack.smpp_port)
    try:
        r = await esme.submit("+14155552671", "over tls")
        assert r.status == 0
        for _ in range(100):
            if esme.receipts:
                break
            await asyncio.sleep(0.05)
        assert stack.sims["secure"].received[0].payload == b"over tls"
        assert esme.receipts
        assert stack.sims["impostor"].stats.binds == 0
    finally:
        esme.close()
