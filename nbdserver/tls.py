"""TLS for NBD_OPT_STARTTLS: the policy of each export and the server's SSL context.

The handshake (sans-I/O) decides what a connection may do before and after
STARTTLS; the connection upgrades its transport with ``loop.start_tls`` using
the context made here from X.509 files.
"""

from __future__ import annotations

import enum
import ssl
from dataclasses import dataclass
from pathlib import Path


class TlsMode(enum.Enum):
    """``off``: no TLS.  ``on``: clients choose.  ``require``: nothing but STARTTLS in the clear."""

    OFF = "off"
    ON = "on"
    REQUIRE = "require"


TLS_MODES = tuple(mode.value for mode in TlsMode)


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


def peer_subject(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """The client certificate's common name, for the log; "" without one."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""
