"""Configuration of a server: its exports, listeners and limits."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .backing import DEFAULT_WORKERS, ENGINES
from .backing.file import IOV_MAX
from .backing.librbd import DEFAULT_TIMEOUT as DEFAULT_RBD_TIMEOUT
from .backing.librbd import RbdName, rbd_name
from .block.merge import MAX_SEGMENTS, MAX_SUBMISSION_BYTES, MergeLimits
from .protocol.constants import NBD_DEFAULT_PORT

DEFAULT_WINDOW_US = 100  # microseconds the event loop polls after a request arrives (serving/polling.py)
METRICS_FD_NAME = "metrics"  # an inherited socket of this name serves /metrics; the others serve NBD
CONTROL_FD_NAME = "control"  # the control socket, as an upgrade hands it to the successor
DEFAULT_CONTROL = Path("/run/nbdserver/control")  # where nbdserver ctl looks by default (the packaged unit's)


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which and why."""


CACHE_MODES = ("buffered", "direct")  # through the page cache, or O_DIRECT
TLS_MODES = ("off", "on", "require")  # values of TlsMode
MAX_PROCESSES = 256
MAX_BUSY_POLL_US = 10_000
AUTO_PROCESSES = 0  # one worker process per CPU this process may run on, at most AUTO_PROCESSES_MAX
AUTO_PROCESSES_MAX = 8
LOG_LEVELS = ("debug", "info", "warning", "error")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A TCP peer's address as the socket gives it, an IPv4 client on a dual-stack socket as IPv4."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # a link-local address may carry a zone
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # shown as ::ffff:a.b.c.d
    return ip


@dataclass
class ExportConfig:
    name: str
    path: Path
    read_only: bool = False
    description: str = ""
    create_size: int | None = None  # create a sparse image of this size if ``path`` is missing
    cache: str = "buffered"  # one of CACHE_MODES
    max_inflight_bytes: int | None = None  # across the export's connections; None: the server's default
    tls: str | None = None  # "require": reachable only through TLS; None: as the server says
    allow: tuple[Network, ...] | None = None  # TCP clients it serves; None: as the server says
    rbd_conf: Path | None = None  # an RBD image's cluster: this ceph.conf; None: as the server says
    rbd_id: str | None = None  # the cephx user it connects as; None: as the server says
    rbd_exclusive: bool | None = None  # take the image's lock for good; None: as the server says
    dirty_bitmaps: tuple[str, ...] = ()  # dirty bitmaps made at start if missing (kept in the state directory)
    snapshot_of: str | None = None  # a snapshot (serving/snapshots.py) of this export, read-only

    @property
    def rbd(self) -> RbdName | None:
        """The Ceph RBD image it serves (a path ``rbd:POOL/IMAGE``), or None: a file.
        ConfigError if the path starts with ``rbd:`` but names no image."""
        try:
            return rbd_name(str(self.path))
        except ValueError as exc:
            raise ConfigError(f"export {self.name!r}: {exc}") from None

    def tls_required(self, server: ServerConfig) -> bool:
        return (self.tls or server.tls) == "require"

    def allows(self, server: ServerConfig, address: str | None) -> bool:
        """May a client at ``address`` (None: over a Unix socket, which its file mode guards) use it?"""
        networks = self.allow if self.allow is not None else server.allow
        if networks is None or address is None:
            return True
        ip = client_ip(address)
        return any(ip in network for network in networks)


@dataclass(frozen=True)
class Listener:
    """A TCP address (``host``, ``port``) or a Unix socket (``path``)."""

    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    def __str__(self) -> str:
        if self.is_unix:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


DEFAULT_LISTENER = Listener("127.0.0.1", NBD_DEFAULT_PORT)
DEFAULT_METRICS = Listener("127.0.0.1", NBD_DEFAULT_PORT + 1)  # /metrics over HTTP


@dataclass
class ServerConfig:
    exports: list[ExportConfig]
    listeners: list[Listener] = field(default_factory=lambda: [DEFAULT_LISTENER])
    default_export: str | None = None  # what the empty export name selects; the first export if unset
    metrics: Listener | None = DEFAULT_METRICS  # where /metrics is served; None: nowhere
    engine: str = "auto"  # one of ENGINES
    workers: int = DEFAULT_WORKERS
    processes: int = AUTO_PROCESSES  # processes serving connections; 1: all in this one (process/workers.py)
    max_inflight_bytes: int = 256 * 1024 * 1024  # per connection; reading pauses above it
    max_export_inflight_bytes: int = 512 * 1024 * 1024  # across an export's connections
    buffer_pool_bytes: int = 64 * 1024 * 1024  # idle request buffers kept for reuse
    merge: bool = True  # plug and merge adjacent requests into one submission
    log_level: str = "info"  # one of LOG_LEVELS
    max_submission_bytes: int = MAX_SUBMISSION_BYTES
    max_segments: int = MAX_SEGMENTS
    tls: str = "off"  # one of TLS_MODES: STARTTLS refused, offered, or required for everything
    tls_certificate: Path | None = None  # PEM: the server's certificate (chain)
    tls_key: Path | None = None  # PEM: its private key
    tls_ca: Path | None = None  # PEM: with it, clients must present a certificate it signed
    allow: tuple[Network, ...] | None = None  # TCP clients served by exports without their own list
    unix_socket_mode: int = 0o660  # of the Unix sockets the server creates
    max_connections: int = 1024  # open at once; more are closed at once
    max_server_inflight_bytes: int = 1024 * 1024 * 1024  # across every export
    handshake_timeout: float = 30.0  # seconds from accept to the end of option haggling
    idle_timeout: float = 0.0  # seconds without a request before a connection is closed; 0: never
    busy_poll_us: int = DEFAULT_WINDOW_US  # the event loop polls this long after a request arrives (polling.py)
    gather: bool = True  # a deep queue's requests gather in the socket before a receive (gathering.py)
    worker_timeout: float = 30.0  # seconds a worker process may leave a ping unanswered before it is replaced; 0: never
    rbd_conf: Path | None = None  # the ceph.conf of RBD exports without their own; None: librados's search
    rbd_id: str | None = None  # the cephx user of RBD exports without their own; None: admin
    rbd_timeout: float = DEFAULT_RBD_TIMEOUT  # seconds to connect, open, or have a request answered
    rbd_exclusive: bool = False  # RBD exports take their images' exclusive locks for good
    control: Path | None = None  # the control socket (nbdserver ctl); None: none
    state_dir: Path | None = None  # where changes made through it are kept across restarts; None: nowhere
    pid_file: Path | None = None  # the main process's PID, written once it serves; None: none

    @property
    def asked_processes(self) -> int:
        """How many worker processes the configuration asks for (0: none, this one serves).  Left
        to itself, the server runs one per CPU, and one on a single CPU too: a worker that dies
        costs its clients a pause (process/recovery.py), where this process's death would end them."""
        if self.processes != AUTO_PROCESSES:
            return self.processes if self.processes > 1 else 0
        return min(len(os.sched_getaffinity(0)), AUTO_PROCESSES_MAX)

    @property
    def worker_processes(self) -> int:
        """How many worker processes serve connections (0: this one serves them itself): as asked,
        but one at most with an RBD export, so that one process alone writes each image (with
        exclusive-lock, two writers would pass the lock back and forth at every write)."""
        asked = self.asked_processes
        return min(asked, 1) if self.has_rbd else asked

    @property
    def has_rbd(self) -> bool:
        return any(export.rbd is not None for export in self.exports)

    @property
    def merge_limits(self) -> MergeLimits:
        return MergeLimits(max_bytes=self.max_submission_bytes, max_segments=self.max_segments)

    def _validate_bitmaps(self, export: ExportConfig) -> None:
        if not export.dirty_bitmaps:
            return
        if self.state_dir is None:
            raise ConfigError(f"export {export.name!r}: dirty bitmaps are kept in the state directory: give one")
        if export.read_only:
            raise ConfigError(f"export {export.name!r}: a read-only export has no writes to track in a dirty bitmap")
        if export.rbd is not None:
            raise ConfigError(f"export {export.name!r}: dirty bitmaps are for files and block devices, not RBD images")

    def validate(self) -> None:
        if not self.exports and self.control is None:  # (with a control socket, they may come through it)
            raise ConfigError("no exports: give a backing file or --export")
        names = [e.name for e in self.exports]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"export name(s) defined twice: {', '.join(map(repr, dupes))}")
        for export in self.exports:
            if len(export.name.encode()) > 4096 or len(export.description.encode()) > 4096:
                raise ConfigError(f"export {export.name!r}: name and description must be at most 4096 bytes")
            if export.cache not in CACHE_MODES:
                raise ConfigError(
                    f"export {export.name!r}: cache mode {export.cache!r} is not one of {', '.join(CACHE_MODES)}"
                )
            self._validate_rbd(export)
            self._validate_bitmaps(export)
        self._validate_tls()
        if self.engine not in ENGINES:
            raise ConfigError(f"engine {self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.default_export is not None and self.default_export not in names:
            raise ConfigError(f"default export {self.default_export!r} is not defined")
        if not self.listeners:
            raise ConfigError("no listeners")
        if self.metrics is not None and self.metrics.is_unix:
            raise ConfigError("metrics are served over TCP: give HOST:PORT")
        if self.workers < 1:
            raise ConfigError("workers must be at least 1")
        if not 0 <= self.processes <= MAX_PROCESSES:
            raise ConfigError(f"processes must be auto or from 1 to {MAX_PROCESSES}")
        if self.max_submission_bytes < 4096:
            raise ConfigError("max submission bytes must be at least 4096")
        if self.max_connections < 1:
            raise ConfigError("max connections must be at least 1")
        if self.handshake_timeout <= 0 or self.idle_timeout < 0:
            raise ConfigError("the handshake timeout must be positive and the idle timeout not negative")
        if self.worker_timeout < 0:
            raise ConfigError("the worker timeout must not be negative (0: never)")
        if not 0 <= self.busy_poll_us <= MAX_BUSY_POLL_US:
            raise ConfigError(f"busy poll must be from 0 (off) to {MAX_BUSY_POLL_US} microseconds")
        if not 0 <= self.unix_socket_mode <= 0o777:
            raise ConfigError(f"unix socket mode {self.unix_socket_mode:o} is not a file mode")
        if self.max_inflight_bytes < 1 or self.max_export_inflight_bytes < 1 or self.max_server_inflight_bytes < 1:
            raise ConfigError("in-flight limits must be at least 1 byte")  # a request above them still runs, alone
        if not 1 <= self.max_segments <= IOV_MAX:
            raise ConfigError(f"max segments must be between 1 and {IOV_MAX} (IOV_MAX)")
        if self.rbd_timeout <= 0:
            raise ConfigError("the RBD timeout must be positive")

    def _validate_rbd(self, export: ExportConfig) -> None:
        if export.rbd is None:
            if export.rbd_conf is not None or export.rbd_id is not None or export.rbd_exclusive is not None:
                raise ConfigError(
                    f"export {export.name!r}: rbd-conf, rbd-id and rbd-exclusive are for RBD images (path=rbd:...)"
                )
            return
        if export.create_size is not None:
            raise ConfigError(
                f"export {export.name!r}: a size creates files, not RBD images: create it with "
                f"rbd create --size SIZE {str(export.path).removeprefix('rbd:')}"
            )
        for user in (export.rbd_id, self.rbd_id):
            if user is not None and (not user or user == "client." or any(c.isspace() for c in user)):
                raise ConfigError(f"export {export.name!r}: bad cephx user {user!r}")

    def _validate_tls(self) -> None:
        if self.tls not in TLS_MODES:
            raise ConfigError(f"tls {self.tls!r} is not one of {', '.join(TLS_MODES)}")
        if self.tls != "off" and (self.tls_certificate is None or self.tls_key is None):
            raise ConfigError(f"tls = {self.tls!r} needs a TLS certificate and key")
        if self.tls == "off" and self.tls_ca is not None:
            raise ConfigError("a TLS CA is given but tls is off")
        for export in self.exports:
            if export.tls is None:
                continue
            if export.tls not in TLS_MODES:
                raise ConfigError(f"export {export.name!r}: tls {export.tls!r} is not one of {', '.join(TLS_MODES)}")
            if export.tls == "require" and self.tls == "off":
                raise ConfigError(f"export {export.name!r}: tls = 'require' needs the server's tls on")
            if export.tls != "require" and self.tls == "require":
                raise ConfigError(
                    f"export {export.name!r}: tls = {export.tls!r}, but the server requires TLS for every export"
                )


_SIZE = re.compile(r"^\s*(\d+)\s*([kmgtpe]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'1G', '512MiB', '4096' -> bytes (binary multiples)."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"bad size {text!r}: expected a number with an optional K, M, G, T, P or E suffix")
    number, unit = int(match.group(1)), match.group(2).lower()
    return number << (10 * " kmgtpe".index(unit)) if unit else number


def parse_processes(text: str) -> int:
    """``auto`` or a number of worker processes."""
    if text.strip() == "auto":
        return AUTO_PROCESSES
    try:
        count = int(text)
    except ValueError:
        raise ConfigError(f"processes: {text!r} is not auto or a number") from None
    if count < 1:
        raise ConfigError(f"processes must be auto or from 1 to {MAX_PROCESSES}")
    return count


def parse_networks(text: str) -> tuple[Network, ...]:
    """'10.0.0.0/8+192.168.1.7+::1' -> networks (an address alone is a network of one)."""
    networks = []
    for item in text.split("+"):
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"bad network {item!r}: expected an address or ADDRESS/PREFIX") from None
    return tuple(networks)


def parse_mode(text: str) -> int:
    """'0660' -> 0o660."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise ConfigError(f"bad file mode {text!r}: expected octal digits such as 0660") from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"bad file mode {text!r}: expected at most 0777")
    return mode


def parse_listener(text: str) -> Listener:
    """'HOST:PORT', '[V6HOST]:PORT' or 'unix:PATH'."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ConfigError("unix: listener needs a path")
        return Listener(path=path)
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not match:
        raise ConfigError(f"bad listen address {text!r}: expected HOST:PORT, [IPV6]:PORT or unix:PATH")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ConfigError(f"bad port {port} in {text!r}")
    return Listener(host, port)


def parse_export(text: str) -> ExportConfig:
    """``name=NAME,path=PATH[,read-only][,size=SIZE][,cache=MODE][,tls=MODE][,allow=NET+NET]
    [,rbd-conf=FILE][,rbd-id=USER][,rbd-exclusive][,dirty-bitmap=NAME...][,description=TEXT]``; PATH may
    be ``rbd:POOL/IMAGE``; ``dirty-bitmap`` may be given more than once.

    ``description`` takes the rest of the text, commas included, so it comes last.
    """
    fields: dict[str, str] = {}
    bitmaps: list[str] = []
    rest = text
    while rest:
        if rest.startswith("description="):
            fields["description"] = rest[len("description=") :]
            break
        item, _, rest = rest.partition(",")
        key, eq, value = item.partition("=")
        if key in ("read-only", "ro", "rbd-exclusive") and not eq:
            fields["read-only" if key == "ro" else key] = "1"
        elif key == "dirty-bitmap" and value:
            bitmaps.append(value)
        elif key in ("name", "path", "size", "cache", "tls", "allow", "rbd-conf", "rbd-id") and eq:
            fields[key] = value
        else:
            raise ConfigError(f"bad export option {item!r} in {text!r}")
    if "path" not in fields:
        raise ConfigError(f"export {text!r} has no path=")
    return ExportConfig(
        name=fields.get("name", ""),
        path=Path(fields["path"]),
        read_only="read-only" in fields,
        description=fields.get("description", ""),
        create_size=parse_size(fields["size"]) if "size" in fields else None,
        cache=fields.get("cache", "buffered"),
        tls=fields.get("tls"),
        allow=parse_networks(fields["allow"]) if "allow" in fields else None,
        rbd_conf=Path(fields["rbd-conf"]) if "rbd-conf" in fields else None,
        rbd_id=fields.get("rbd-id"),
        rbd_exclusive=True if "rbd-exclusive" in fields else None,
        dirty_bitmaps=tuple(bitmaps),
    )
