"""TLS for NBD_OPT_STARTTLS: the server's SSL context, made from its X.509 files.

The handshake (sans-I/O) decides what a connection may do before and after
STARTTLS; the connection upgrades its transport with ``loop.start_tls`` and
this context.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, ServerConfig


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the server's certificate chain and key; with ``ca``, clients must present a
    certificate signed by it."""

    certificate: Path
    key: Path
    ca: Path | None = None


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """An SSL context for the server side of STARTTLS; OSError or ssl.SSLError if a file is wrong."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.certificate, files.key)
    if files.ca is not None:
        context.load_verify_locations(cafile=files.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The server's context, None when TLS is off; ConfigError naming the files if they do not load."""
    if config.tls == "off":
        return None
    assert config.tls_certificate is not None and config.tls_key is not None  # ServerConfig.validate() saw to it
    try:
        return server_context(TlsFiles(config.tls_certificate, config.tls_key, config.tls_ca))
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(str(p) for p in (config.tls_certificate, config.tls_key, config.tls_ca) if p)
        raise ConfigError(f"tls: cannot load {files}: {exc.strerror or exc}") from None


def peer_subject(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """The client certificate's common name, for the log; "" without one."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    for rdn in (cert or {}).get("subject", ()):
        for pair in rdn:
            if pair[0] == "commonName":
                return str(pair[1])
    return ""
