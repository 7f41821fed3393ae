"""A private CA and the certificates a test needs, made with openssl: a server certificate for
127.0.0.1 and a client certificate, each signed by the CA (nothing is trusted system-wide); and
socat terminating TLS with them in front of a plain port."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.servers import free_port, wait_for
from tests.support.tier import require_e2e


@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_client_cert: str  # signed by another CA: a server that checks clients refuses it
    other_client_key: str

    def redis_client_options(self) -> dict[str, str]:
        """redis-py's TLS options (celery's broker_use_ssl on Redis) for the client certificate."""
        return {"ssl_ca_certs": self.ca, "ssl_certfile": self.client_cert, "ssl_keyfile": self.client_key,
                "ssl_cert_reqs": "required"}

    def amqp_client_options(self) -> dict[str, str]:
        """py-amqp's TLS options (celery's broker_use_ssl on RabbitMQ) for the client certificate."""
        return {"ca_certs": self.ca, "certfile": self.client_cert, "keyfile": self.client_key,
                "cert_reqs": "required"}


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ca(where: Path, name: str) -> tuple[str, str]:
    cert, key = str(where / f"{name}.pem"), str(where / f"{name}.key")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", key, "-out", cert,
             "-subj", f"/CN={name}")
    return cert, key


def _issue(where: Path, name: str, ca: tuple[str, str], extensions: str) -> tuple[str, str]:
    cert, key, csr, ext = (str(where / f"{name}{suffix}") for suffix in (".pem", ".key", ".csr", ".ext"))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    Path(ext).write_text(extensions)
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial", "-days", "1",
             "-out", cert, "-extfile", ext)
    return cert, key


def make_pki(where: Path) -> Pki:
    where.mkdir(parents=True, exist_ok=True)
    ca = _ca(where, "sidecar-test-ca")
    server = _issue(where, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                         "extendedKeyUsage=serverAuth\n")
    client = _issue(where, "client", ca, "extendedKeyUsage=clientAuth\n")
    other = _issue(where, "stranger", _ca(where, "another-ca"), "extendedKeyUsage=clientAuth\n")
    return Pki(ca=ca[0], server_cert=server[0], server_key=server[1], client_cert=client[0], client_key=client[1],
               other_client_cert=other[0], other_client_key=other[1])


@contextlib.contextmanager
def tls_relay(pki: Pki, target_port: int, verify_clients: bool = True) -> Iterator[int]:
    """socat terminating TLS (the server certificate; with ``verify_clients``, only a client
    certificate from the CA gets through) in front of a plain loopback port. Yields its port."""
    require_e2e("socat")
    port = free_port()
    verify = f"cafile={pki.ca},verify=1" if verify_clients else "verify=0"
    process = subprocess.Popen(
        ["socat", f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={pki.server_cert},"
                  f"key={pki.server_key},{verify}", f"TCP:127.0.0.1:{target_port}"], stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _accepts(port), timeout=10, what="socat's TLS listener")
        yield port
    finally:
        process.terminate()
        process.wait(10)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
