"""STARTTLS with X.509 certificates made for the test, against libnbd (nbdinfo and the Python bindings)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nbd
import pytest

from tests.conftest import ServerProcess, Upgradable
from tests.integration.rawclient import Opt, RawClient, Rep, info_request, option_bytes

pytestmark = [
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make certificates"),
    pytest.mark.bindings,  # libnbd's Python bindings: run again by tests/in_current
]

MiB = 1024 * 1024


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


def _authority(folder: Path, name: str) -> None:
    """A self-signed CA: NAME-cert.pem and NAME-key.pem."""
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", f"{name}-key.pem", "-out", f"{name}-cert.pem", cwd=folder,
    )  # fmt: skip


def _issue(folder: Path, ca: str, name: str, extensions: str) -> None:
    """NAME-cert.pem / NAME-key.pem, signed by the CA called ``ca``."""
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
             "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", cwd=folder)  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem", "-CAkey", f"{ca}-key.pem",
        "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}-cert.pem", cwd=folder,
    )  # fmt: skip


def _client_dir(pki: Path, name: str, ca: str = "ca", cert: str | None = None) -> Path:
    """A folder as libnbd's tls-certificates wants it: ca-cert.pem, and client-cert/key.pem if ``cert``."""
    folder = pki / name
    folder.mkdir()
    shutil.copy(pki / f"{ca}-cert.pem", folder / "ca-cert.pem")
    if cert is not None:
        shutil.copy(pki / f"{cert}-cert.pem", folder / "client-cert.pem")
        shutil.copy(pki / f"{cert}-key.pem", folder / "client-key.pem")
    return folder


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    _authority(folder, "ca")
    _authority(folder, "rogue")  # a CA the server does not trust
    _issue(folder, "ca", "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _issue(folder, "ca", "alice", "extendedKeyUsage=clientAuth\n")
    _issue(folder, "rogue", "mallory", "extendedKeyUsage=clientAuth\n")
    _client_dir(folder, "anonymous")
    _client_dir(folder, "alice-dir", cert="alice")
    _client_dir(folder, "mallory-dir", cert="mallory")
    return folder


def tls_args(pki: Path, mode: str = "require", ca: bool = False) -> list[str]:
    args = ["--tls", mode, "--tls-certificate", str(pki / "server-cert.pem"), "--tls-key", str(pki / "server-key.pem")]
    return [*args, "--tls-ca", str(pki / "ca-cert.pem")] if ca else args


def tls_handle(server, certificates: Path, name: str = "") -> nbd.NBD:
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(certificates))
    h.set_export_name(name)
    h.connect_tcp(server.host, str(server.port))
    return h


@pytest.mark.clients
def test_data_flows_only_inside_tls(start_server, image, pki):
    server = start_server(image, *tls_args(pki))
    h = tls_handle(server, pki / "anonymous")
    try:
        assert h.get_tls_negotiated()
        data = bytes(range(256)) * 4096
        h.pwrite(data, MiB)
        h.flush()
        assert h.pread(len(data), MiB) == data
    finally:
        h.shutdown()
    assert image.read_bytes()[MiB : MiB + len(data)] == data
    assert server.logged("TLS on"), server.log_text()

    plain = nbd.NBD()
    with pytest.raises(nbd.Error):
        plain.connect_tcp(server.host, str(server.port))  # libnbd without TLS: the server says TLS_REQD

    result = subprocess.run(
        ["nbdinfo", "--size", f"nbds://{server.host}:{server.port}/?tls-certificates={pki / 'anonymous'}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == image.stat().st_size


def test_forced_tls_tells_a_clear_client_nothing(start_server, image, pki):
    server = start_server(image, "--description", "secret things", *tls_args(pki))
    with RawClient(server.host, server.port) as c:
        c.handshake().expect_only_errors(Rep.ERR_TLS_REQD, hidden=(b"secret",))
    with RawClient(server.host, server.port) as c:
        c.handshake()
        c.send(option_bytes(Opt.STARTTLS) + option_bytes(Opt.GO, info_request("")))  # GO in the clear, behind it
        reply = c.read_option_reply()
        assert (reply.option, reply.type) == (Opt.STARTTLS, Rep.ACK)
        assert c.wait_closed()  # never taken as if it had come through TLS
    assert server.logged("bytes sent in the clear after STARTTLS"), server.log_text()


def test_selective_tls_guards_one_export(start_server, image, tmp_path, pki):
    other = tmp_path / "secret.img"
    other.write_bytes(b"\x5a" * MiB)
    server = start_server(image, "--export", f"name=secret,path={other},tls=require", *tls_args(pki, "on"))
    plain = nbd.NBD()
    plain.connect_uri(server.uri())  # the default export needs no TLS
    assert not plain.get_tls_negotiated()
    plain.shutdown()
    refused = nbd.NBD()
    refused.set_export_name("secret")
    with pytest.raises(nbd.Error, match="TLS"):
        refused.connect_tcp(server.host, str(server.port))
    h = tls_handle(server, pki / "anonymous", "secret")
    try:
        assert h.get_tls_negotiated()
        assert h.pread(4096, 0) == b"\x5a" * 4096
    finally:
        h.shutdown()


def test_client_certificates_are_checked_against_the_ca(start_server, image, pki):
    server = start_server(image, *tls_args(pki, ca=True))
    for folder in ("anonymous", "mallory-dir"):  # no certificate; one from a CA the server does not trust
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(pki / folder))
        with pytest.raises(nbd.Error):
            h.connect_tcp(server.host, str(server.port))
    h = tls_handle(server, pki / "alice-dir")
    try:
        assert h.pread(4096, 0) == bytes(4096)
    finally:
        h.shutdown()
    assert server.logged("TLS on, client 'alice'"), server.log_text()
    assert server.logged("TLS handshake failed", count=2), server.log_text()
    assert sum("TLS handshake failed" in line for line in server.log) == 2


def test_bad_tls_settings_are_refused_with_a_clear_message(start_server, image, tmp_path, pki):
    from nbdserver.cli import main

    with pytest.raises(SystemExit):
        main(["serve", str(image), "--tls", "require"])  # no certificate
    missing = tls_args(pki)
    missing[missing.index("--tls-key") + 1] = str(tmp_path / "nope.pem")
    result = subprocess.run(
        [sys.executable, "-m", "nbdserver", "serve", str(image), "--listen", "127.0.0.1:0", "--no-metrics", *missing],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "tls: cannot load" in result.stderr and "nope.pem" in result.stderr


def test_an_upgrade_closes_tls_connections_and_hands_over_the_others(tmp_path, image, pki):
    """TLS session keys cannot leave the process: those connections are finished and closed at an
    upgrade, the plain ones go on, and a client in the handshake is closed too."""
    server = ServerProcess([str(image), "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", *tls_args(pki, "on")])
    u = Upgradable(server.wait_ready())
    try:
        secure = tls_handle(server, pki / "anonymous")
        secure.pwrite(b"t" * 4096, 0)
        plain = nbd.NBD()
        plain.connect_uri(server.uri())
        haggling = RawClient(server.host, server.port)
        haggling.handshake()
        u.upgrade()
        assert plain.pread(4096, 0) == b"t" * 4096  # handed over
        with pytest.raises(nbd.Error):
            secure.pread(4096, 0)  # closed by the old server, once its requests were answered
        assert haggling.wait_closed()
        again = tls_handle(server, pki / "anonymous")  # TLS clients reconnect to the successor
        assert again.pread(4096, 0) == b"t" * 4096
        again.shutdown()
        plain.shutdown()
    finally:
        u.stop()
