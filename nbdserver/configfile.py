"""The TOML configuration file (``/etc/nbdserver/nbdserver.toml`` by convention).

Keys are spelled like the command-line flags::

    listen = ["127.0.0.1:10809", "unix:/run/nbdserver/nbd.sock"]
    default-export = "disk"
    log-level = "info"
    engine = "auto"                   # auto, threads or uring
    max-inflight = "256M"
    tls = "require"                   # off, on or require
    tls-certificate = "server-cert.pem"
    tls-key = "server-key.pem"
    tls-ca = "ca-cert.pem"            # clients must present a certificate signed by it
    control = "/run/nbdserver/control"  # the control socket of nbdserver ctl
    state-dir = "/var/lib/nbdserver"  # exports added and removed through it, kept across restarts
    pid-file = "/run/nbdserver/nbdserver.pid"  # the main process's PID, once it serves

    [metrics]
    listen = "127.0.0.1:10810"        # or: enabled = false

    [[export]]
    name = "disk"
    path = "/var/lib/nbdserver/disk.img"
    size = "1G"                       # create a sparse image if missing
    cache = "direct"
    max-export-inflight = "128M"
    tls = "require"                   # selective TLS: only this export needs it

    [[export]]
    name = "ceph"
    path = "rbd:rbd/vm1"              # a Ceph RBD image: rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE
    rbd-conf = "/etc/ceph/ceph.conf"  # its cluster (default: as librados finds it; also a server key)
    rbd-id = "nbd"                    # the cephx user (default admin; also a server key)

Every error names the file, the key and what is wrong with it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .backing import ENGINES
from .backing.librbd import PREFIX as RBD_PREFIX
from .config import (
    CACHE_MODES,
    LOG_LEVELS,
    TLS_MODES,
    ConfigError,
    ExportConfig,
    Network,
    ServerConfig,
    parse_listener,
    parse_mode,
    parse_networks,
    parse_processes,
    parse_size,
)

DEFAULT_PATH = Path("/etc/nbdserver/nbdserver.toml")


def load(path: Path) -> ServerConfig:
    """Read and check a configuration file; raises ConfigError naming the file and the key."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        config = from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for export in config.exports:  # relative to the file, not to wherever the server was started
        if not str(export.path).startswith(RBD_PREFIX):  # an RBD image's name is no file's
            export.path = path.parent / export.path
        if export.rbd_conf is not None:
            export.rbd_conf = path.parent / export.rbd_conf
    for name in ("tls_certificate", "tls_key", "tls_ca", "rbd_conf", "control", "state_dir", "pid_file"):
        if (value := getattr(config, name)) is not None:
            setattr(config, name, path.parent / value)
    return config


def from_dict(data: dict[str, Any]) -> ServerConfig:
    config = ServerConfig(exports=[])
    for key, value in data.items():
        if key == "export":
            config.exports = [_export(f"export[{i}]", item) for i, item in enumerate(_array_of_tables(key, value))]
        elif key == "metrics":
            config.metrics = _metrics(_table(key, value))
        elif key in _SERVER_KEYS:
            name, parse = _SERVER_KEYS[key]
            setattr(config, name, parse(key, value))
        else:
            raise ConfigError(_unknown(key, [*_SERVER_KEYS, "metrics", "export"]))
    return config


def _export(where: str, table: dict[str, Any]) -> ExportConfig:
    fields: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _EXPORT_KEYS:
            raise ConfigError(_unknown(f"{where}.{key}", _EXPORT_KEYS))
        name, parse = _EXPORT_KEYS[key]
        fields[name] = parse(f"{where}.{key}", value)
    if "path" not in fields:
        raise ConfigError(f"{where}: path is missing")
    fields.setdefault("name", "")
    return ExportConfig(**fields)


def _metrics(table: dict[str, Any]):
    enabled, listener = True, ServerConfig.metrics
    for key, value in table.items():
        if key == "enabled":
            enabled = _bool(f"metrics.{key}", value)
        elif key == "listen":
            listener = _listener(f"metrics.{key}", value)
        else:
            raise ConfigError(_unknown(f"metrics.{key}", ["enabled", "listen"]))
    return listener if enabled else None


# Value parsers: (key as shown in messages, value) -> value --------------------------------------


def _table(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table ([{key}]), got {_kind(value)}")
    return value


def _array_of_tables(key: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ConfigError(f"{key}: expected tables ([[{key}]]), got {_kind(value)}")
    return value


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {_kind(value)}")
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {_kind(value)}")
    return value


def _int(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {_kind(value)}")
    return value


def _processes(key: str, value: Any) -> int:
    """ "auto" or a number of worker processes."""
    try:
        return parse_processes(value if isinstance(value, str) else str(_int(key, value)))
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _size(key: str, value: Any) -> int:
    """Bytes, as an integer or a string such as "512M" or "1GiB"."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"{key}: a size cannot be negative")
        return value
    try:
        return parse_size(_str(key, value))
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _listener(key: str, value: Any):
    try:
        return parse_listener(_str(key, value))
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _items(key: str, value: Any, what: str) -> list[tuple[str, Any]]:
    """A list (or one string standing for a list of one), each item with its key for messages."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of {what}, got {_kind(value)}")
    return [(f"{key}[{i}]", item) for i, item in enumerate(value)]


def _listeners(key: str, value: Any):
    return [_listener(item_key, item) for item_key, item in _items(key, value, "addresses")]


def _names(key: str, value: Any) -> tuple[str, ...]:
    return tuple(_str(item_key, item) for item_key, item in _items(key, value, "names"))


def _networks(key: str, value: Any):
    networks: list[Network] = []
    for item_key, item in _items(key, value, "networks"):
        try:
            networks += parse_networks(_str(item_key, item))
        except ConfigError as exc:
            raise ConfigError(f"{item_key}: {exc}") from None
    return tuple(networks)


def _seconds(key: str, value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{key}: expected a number of seconds, got {_kind(value)}")
    return float(value)


def _mode(key: str, value: Any) -> int:
    try:
        return parse_mode(_str(key, value))
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc} (a string: TOML has no octal numbers but 0o660)") from None


def _one_of(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def parse(key: str, value: Any) -> str:
        text = _str(key, value)
        if text not in choices:
            raise ConfigError(f"{key}: {text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _path(key: str, value: Any) -> Path:
    text = _str(key, value)
    if not text:
        raise ConfigError(f"{key}: empty path")
    return Path(text)


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def _unknown(key: str, known) -> str:
    return f"{key}: unknown key (known: {', '.join(known)})"


# Keys: (field of ServerConfig or ExportConfig, parser).
_SERVER_KEYS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "listen": ("listeners", _listeners),
    "default-export": ("default_export", _str),
    "log-level": ("log_level", _one_of(LOG_LEVELS)),
    "engine": ("engine", _one_of(ENGINES)),
    "workers": ("workers", _int),
    "processes": ("processes", _processes),
    "merge": ("merge", _bool),
    "max-submission-bytes": ("max_submission_bytes", _size),
    "max-segments": ("max_segments", _int),
    "max-inflight": ("max_inflight_bytes", _size),
    "max-export-inflight": ("max_export_inflight_bytes", _size),
    "buffer-pool": ("buffer_pool_bytes", _size),
    "tls": ("tls", _one_of(TLS_MODES)),
    "tls-certificate": ("tls_certificate", _path),
    "tls-key": ("tls_key", _path),
    "tls-ca": ("tls_ca", _path),
    "allow": ("allow", _networks),
    "unix-socket-mode": ("unix_socket_mode", _mode),
    "max-connections": ("max_connections", _int),
    "max-server-inflight": ("max_server_inflight_bytes", _size),
    "handshake-timeout": ("handshake_timeout", _seconds),
    "idle-timeout": ("idle_timeout", _seconds),
    "busy-poll": ("busy_poll_us", _int),
    "gather": ("gather", _bool),
    "worker-timeout": ("worker_timeout", _seconds),
    "rbd-conf": ("rbd_conf", _path),
    "rbd-id": ("rbd_id", _str),
    "rbd-timeout": ("rbd_timeout", _seconds),
    "rbd-exclusive": ("rbd_exclusive", _bool),
    "control": ("control", _path),
    "state-dir": ("state_dir", _path),
    "pid-file": ("pid_file", _path),
}
_EXPORT_KEYS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "name": ("name", _str),
    "path": ("path", _path),
    "description": ("description", _str),
    "read-only": ("read_only", _bool),
    "size": ("create_size", _size),
    "cache": ("cache", _one_of(CACHE_MODES)),
    "max-export-inflight": ("max_inflight_bytes", _size),
    "tls": ("tls", _one_of(TLS_MODES)),
    "allow": ("allow", _networks),
    "rbd-conf": ("rbd_conf", _path),
    "rbd-id": ("rbd_id", _str),
    "rbd-exclusive": ("rbd_exclusive", _bool),
    "dirty-bitmap": ("dirty_bitmaps", _names),
}
