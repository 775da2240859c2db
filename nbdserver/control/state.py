"""What changes made through the control socket survive: exports added and removed at run time
(snapshots among the exports added).

They are kept as one JSON file in the state directory (``--state-dir``), written atomically (a
temporary file, fsync, rename, fsync of the directory), and applied over the configuration at
start and at each reload.  Without a state directory they are kept in memory only, and handed to
the successor of an upgrade in its environment (ENV), so that it serves the same exports.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..backing.file import fsync_directory
from ..config import ConfigError, ExportConfig, ServerConfig, parse_networks

FILE = "exports.json"
ENV = "NBDSERVER_CONTROL_STATE"  # the predecessor's changes, for a successor (an upgrade)
VERSION = 1


@dataclass
class Changes:
    """Exports added (by name, as the control socket added them) and removed at run time."""

    added: dict[str, ExportConfig] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)

    def apply(self, config: ServerConfig) -> ServerConfig:
        """``config`` with the changes over it: removed exports gone, added ones added (replacing
        a configured one of the same name)."""
        gone = set(self.removed) | set(self.added)
        exports = [e for e in config.exports if e.name not in gone] + [replace(e) for e in self.added.values()]
        default = config.default_export if config.default_export not in self.removed else None
        return replace(config, exports=exports, default_export=default)

    def add(self, export: ExportConfig) -> None:
        self.added[export.name] = replace(export)
        if export.name in self.removed:
            self.removed.remove(export.name)

    def remove(self, name: str) -> None:
        if self.added.pop(name, None) is None and name not in self.removed:
            self.removed.append(name)  # not added at run time: the configuration's

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "added": [_export_json(e) for e in self.added.values()],
            "removed": list(self.removed),
        }

    @classmethod
    def from_json(cls, data: Any) -> Changes:
        """ConfigError if ``data`` is not what to_json writes."""
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ConfigError(f"not a state of version {VERSION}")
        try:
            added = [_export(item) for item in data["added"]]
            removed = [str(name) for name in data["removed"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad state: {exc}") from None
        return cls({e.name: e for e in added}, removed)


def _export_json(export: ExportConfig) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": export.name,
        "path": str(export.path),
        "read-only": export.read_only,
        "size": export.create_size,
        "cache": export.cache,
        "description": export.description,
    }
    if export.snapshot_of is not None:  # and as guarded as the export it copies
        data["snapshot-of"] = export.snapshot_of
        data["tls"] = export.tls
        data["allow"] = None if export.allow is None else [str(n) for n in export.allow]
    return data


def _export(data: dict[str, Any]) -> ExportConfig:
    return ExportConfig(
        name=str(data["name"]),
        path=Path(data["path"]),
        read_only=bool(data.get("read-only", False)),
        create_size=None if data.get("size") is None else int(data["size"]),
        cache=str(data.get("cache", "buffered")),
        description=str(data.get("description", "")),
        snapshot_of=None if data.get("snapshot-of") is None else str(data["snapshot-of"]),
        tls=None if data.get("tls") is None else str(data["tls"]),
        allow=None if data.get("allow") is None else parse_networks("+".join(data["allow"])),
    )


def initial(state_dir: Path | None, environ: dict[str, str] | os._Environ[str] = os.environ) -> Changes:
    """The changes to start with: a predecessor's (an upgrade), else the state directory's, else none.
    ConfigError naming the file if it cannot be read."""
    handed = environ.pop(ENV, "")
    if handed:
        return Changes.from_json(json.loads(handed))
    if state_dir is None:
        return Changes()
    path = state_dir / FILE
    try:
        return Changes.from_json(json.loads(path.read_bytes()))
    except FileNotFoundError:
        return Changes()
    except (OSError, ValueError, ConfigError) as exc:
        raise ConfigError(f"{path}: cannot read the state kept there: {exc}") from None


def for_successor(changes: Changes) -> dict[str, str]:
    """The environment that hands ``changes`` to a successor."""
    return {ENV: json.dumps(changes.to_json())}


def save(state_dir: Path, changes: Changes) -> None:
    """Write the state atomically: a crash leaves the old file or the new one, never a mix."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / FILE
    temporary = state_dir / f".{FILE}.{os.getpid()}.tmp"
    data = json.dumps(changes.to_json(), indent=2).encode() + b"\n"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(state_dir)  # the rename itself
