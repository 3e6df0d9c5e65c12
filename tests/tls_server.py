"""A TLS server on 127.0.0.1 that answers each name (SNI) with the certificate a test chose, signed by a
CA the test makes; and a listener that accepts connections and never says a word. For hearth's
certificate check, which is pointed here with --connect-to and trusts the CA through SSL_CERT_FILE.

`pytest_plugins = ["tests.tls_server"]` gives the session fixture `tls_server`.
"""
from __future__ import annotations

import datetime
import socket
import ssl
import threading
from pathlib import Path
from typing import Optional

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _key():
    return ec.generate_private_key(ec.SECP256R1())


class Authority:
    """A CA, and certificates it (or nobody: self-signed) issues, written as PEM files in `directory`."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name("hearth test CA")).issuer_name(_name("hearth test CA"))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
                     .sign(self.key, hashes.SHA256()))
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, label: str, names: list[str], not_after: datetime.datetime, self_signed: bool = False) -> ssl.SSLContext:
        key = _key()
        issuer, signer = (_name(names[0]), key) if self_signed else (self.cert.subject, self.key)
        builder = (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(not_after - datetime.timedelta(days=90)).not_valid_after(not_after)
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        if not self_signed:
            builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                            critical=False)
        cert = builder.sign(signer, hashes.SHA256())
        cert_file, key_file = self.directory / f"{label}.pem", self.directory / f"{label}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        return context


class TlsServer:
    """Serves `default` to every name, or `by_name[name]`; each connection gets a handshake and is closed."""

    def __init__(self, default: ssl.SSLContext):
        self.default = default
        self.by_name: dict[str, ssl.SSLContext] = {}
        self.seen: list[Optional[str]] = []  # the SNI of each handshake
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.sni_callback = self._pick
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers: a handshake that hangs
        self.silent_port = self.silent.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()
        threading.Thread(target=self._hold, daemon=True).start()

    def _pick(self, tls: ssl.SSLObject, name: Optional[str], _context) -> None:
        self.seen.append(name)
        tls.context = self.by_name.get(name, self.default)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handshake, args=(conn,), daemon=True).start()

    def _handshake(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)  # until the client closes
        except (OSError, ssl.SSLError):
            pass

    def _hold(self) -> None:
        while True:
            try:
                conn, _ = self.silent.accept()
            except OSError:
                return
            self.held.append(conn)

    def stop(self) -> None:
        for sock in (self.sock, self.silent, *self.held):
            sock.close()


@pytest.fixture(scope="session")
def tls_server(tmp_path_factory):
    """Every public name of both stages with a certificate of the test CA, valid 60 days and an hour more;
    the CA's file is `tls_server.authority.ca_file`."""
    from infra.apps import routed_hosts

    authority = Authority(tmp_path_factory.mktemp("tls"))
    now = datetime.datetime.now(datetime.timezone.utc)
    server = TlsServer(authority.issue("estate", routed_hosts(), now + datetime.timedelta(days=60, hours=1)))
    server.authority = authority
    try:
        yield server
    finally:
        server.stop()
