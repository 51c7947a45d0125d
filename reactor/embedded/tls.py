"""A throwaway PKI for the stand-ins: a CA, a server certificate it signs for 127.0.0.1 and
localhost, and an impostor certificate it does not — made with the openssl command line, for
tests and fault scenarios that need TLS to succeed or to fail verification."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TestPki:
    ca: Path  # the CA certificate a client trusts (SMTP_CA_FILE)
    cert: Path  # the server's certificate, signed by the CA
    key: Path
    impostor_cert: Path  # a self-signed certificate for the same names: fails verification
    impostor_key: Path


def make_test_pki(directory: Path) -> TestPki:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    san = "subjectAltName=IP:127.0.0.1,DNS:localhost"

    def self_signed(name: str, subject: str, *extra: str) -> None:
        openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", subject,
            *extra, "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.pem"),
        )  # fmt: skip

    self_signed("ca", "/CN=reactor test CA")
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"),
    )  # fmt: skip
    (d / "san.ext").write_text(san + "\n")
    openssl(
        "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"),
        "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
        "-extfile", str(d / "san.ext"), "-out", str(d / "server.pem"),
    )  # fmt: skip
    self_signed("impostor", "/CN=localhost", "-addext", san)
    return TestPki(
        ca=d / "ca.pem",
        cert=d / "server.pem",
        key=d / "server.key",
        impostor_cert=d / "impostor.pem",
        impostor_key=d / "impostor.key",
    )
