"""Finding 7 of issue 13: transport hygiene. A server serves HTTPS with ``--tls-cert`` and
``--tls-key`` (uvicorn's TLS); the client checks it against ``--ca``; the client's token
comes from ``CRDT_MERGE_TOKEN`` or ``--token-file`` so it need not be on the command line
(where ``ps`` shows it). A self-signed certificate is made here with ``cryptography``, and
everything runs through real processes.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from crdt_merge.replica import Replica
from tests.server.http_helpers import PYTHON, REPO, ServerProcess, contribute, join, new_project

WRITER = "writer-token-0123456789"


def self_signed(folder: Path, name: str = "127.0.0.1") -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(name))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("CRDT_MERGE_TOKEN",
                                                                 "CRDT_MERGE_CA")}
    return subprocess.run([PYTHON, "-m", "crdt_merge", *args],
                          env={**environ, **(env or {})}, cwd=REPO, capture_output=True,
                          text=True, timeout=180)


def test_https_with_ca_and_a_token_off_the_command_line(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    a = new_project(tmp_path / "a")
    contribute(a, 1)
    b = join(tmp_path / "b", a.genesis_bytes(), "beta")
    root = a.state_root()
    a.close()
    b.close()
    (tmp_path / "tokens").write_text(f"beta contribute {WRITER}\n")
    server = ServerProcess(tmp_path / "a", "--token-file", str(tmp_path / "tokens"),
                           "--tls-cert", str(cert), "--tls-key", str(key), ca=str(cert))
    server.wait_ready()
    try:
        assert server.url.startswith("https://127.0.0.1:")
        # no CA: the self-signed certificate is refused, nothing moves
        done = cli("sync", str(tmp_path / "b"), server.url, env={"CRDT_MERGE_TOKEN": WRITER})
        assert done.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in done.stderr + done.stdout
        # plain http to the TLS port fails as well
        plain = server.url.replace("https://", "http://")
        assert cli("sync", str(tmp_path / "b"), plain,
                   env={"CRDT_MERGE_TOKEN": WRITER}).returncode != 0
        # no token at all: refused by the server
        assert cli("sync", str(tmp_path / "b"), server.url, "--ca", str(cert)).returncode != 0
        # the token from the environment, the CA from --ca
        done = cli("sync", str(tmp_path / "b"), server.url, "--ca", str(cert),
                   env={"CRDT_MERGE_TOKEN": WRITER})
        assert done.returncode == 0, done.stderr
        assert WRITER not in " ".join(done.args)
        with Replica.open(tmp_path / "b") as again:
            assert again.state_root() == root
        # the token from a file, the CA from CRDT_MERGE_CA
        (tmp_path / "token").write_text(WRITER + "\n")
        done = cli("sync", str(tmp_path / "b"), server.url, "--token-file",
                   str(tmp_path / "token"), env={"CRDT_MERGE_CA": str(cert)})
        assert done.returncode == 0, done.stderr
    finally:
        server.stop()


def test_serve_needs_both_tls_files(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path)
    new_project(tmp_path / "a").close()
    done = cli("serve", str(tmp_path / "a"), "--port", "0", "--tls-cert", str(cert))
    assert done.returncode != 0 and "tls" in done.stderr.lower()
