"""The control socket's commands: what each does to the server, and what it answers.

A command is a coroutine taking the control's context and the request's arguments and returning
the reply's fields; CommandError is its refusal.  COMMANDS names them; those in CHANGES change the
server, so they run one at a time (and not during an upgrade), are logged with who asked, and
are kept in the state directory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backing.librbd import PREFIX as RBD_PREFIX
from ..block.dirty import DEFAULT_GRANULARITY, DirtyBitmap
from ..config import CACHE_MODES, ConfigError, ExportConfig
from ..serving import snapshots
from ..serving.export import Export
from ..serving.server import Server
from . import state

log = logging.getLogger(__name__)


class CommandError(Exception):
    """The command is refused or failed; the message says why, for the client."""


@dataclass
class Context:
    """What the commands act on."""

    server: Server
    changes: state.Changes
    state_dir: Path | None


Command = Callable[[Context, dict[str, Any]], Awaitable[dict[str, Any]]]


async def status(context: Context, args: dict[str, Any]) -> dict[str, Any]:
    """The exports and the connections, as /metrics gets them (every worker process asked)."""
    server = context.server
    if server.workers is not None:
        await server.workers.refresh()
    snapshot = server.snapshot()
    exports = []
    for name, export in server.exports.items():
        counted = snapshot.exports.get(name)
        exports.append(
            {
                "name": name,
                "size": export.info.size,
                "backing": str(export.config.path),
                "engine": counted.engine if counted is not None else export.engine.name,
                "read_only": export.config.read_only,
                "connections": counted.connections if counted is not None else 0,
                "bitmaps": [_bitmap_json(name, b) for _, b in sorted(export.bitmaps.by_name.items())],
            }
        )
    clients = sorted(snapshot.clients, key=lambda c: (str(c.get("export")), str(c.get("peer"))))
    return {"exports": exports, "connections": clients, "negotiating": snapshot.negotiating}


async def export_add(context: Context, args: dict[str, Any]) -> dict[str, Any]:
    """Open a new export in every process, as --export would have; kept in the state directory."""
    config = _export_config(args)
    try:
        await context.server.add_export(config)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        why = f"{exc.filename}: {exc.strerror}" if exc.strerror and exc.filename else str(exc)
        raise CommandError(f"export {config.name!r} not added: {why}") from None
    context.changes.add(config)
    await _keep(context, f"export {config.name!r} is served until a restart")
    return {"message": f"export {config.name!r} added", "export": config.name}


async def export_remove(context: Context, args: dict[str, Any]) -> dict[str, Any]:
    """Close an export in every process; refused while it has clients, unless ``force``."""
    name = _arg(args, "name", str)
    force = _arg(args, "force", bool, False)
    export = context.server.exports.get(name)
    if export is not None and export.config.snapshot_of is not None:
        parent, snapshot = export.config.snapshot_of, name[len(export.config.snapshot_of) + 1 :]
        raise CommandError(f"export {name!r} is a snapshot: nbdserver ctl snapshot remove {parent} {snapshot}")
    try:
        closed = await context.server.remove_export(name, force)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    context.changes.remove(name)
    await _keep(context, f"export {name!r} is served again after a restart")
    return {"message": f"export {name!r} removed ({closed} client(s) disconnected)", "disconnected": closed}


async def snapshot_add(context: Context, args: dict[str, Any]) -> dict[str, Any]:
    """A read-only copy of the export at one request boundary, served as EXPORT@NAME."""
    return await _snapshot(context, args, checkpoint=False)


async def checkpoint(context: Context, args: dict[str, Any]) -> dict[str, Any]:
    """A snapshot, the bitmap of what changed since the previous checkpoint frozen onto it, and a
    new bitmap tracking from it on: the backup primitive."""
    return await _snapshot(context, args, checkpoint=True)


async def _snapshot(context: Context, args: dict[str, Any], checkpoint: bool) -> dict[str, Any]:
    export, name = _arg(args, "export", str), _arg(args, "name", str)
    what = "checkpoint" if checkpoint else "snapshot"
    try:
        made = await snapshots.make(context.server, export, name, checkpoint)
    except snapshots.NotServed as exc:
        context.changes.add(exc.config)  # on disk: served after a restart
        await _keep(context, "not served after a restart either")
        raise CommandError(str(exc)) from None
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    context.changes.add(made.config)
    await _keep(context, f"{made.config.path} is not served after a restart")
    message = f"{what} {name!r} of export {export!r} served as {made.config.name!r} ({made.config.path})"
    return {
        "message": message + (f"; warning: {made.warning}" if made.warning else ""),
        "snapshot": _snapshot_json(context.server.exports[made.config.name]),
        "paused_ms": round(made.paused * 1e3, 3),  # requests held, at the boundary
        "cloned_ms": round(made.cloned * 1e3, 3),  # the file cloned, while served
        "longest_clone_ms": round(made.longest * 1e3, 3),  # the longest a write could wait once asked for
        "warning": made.warning,
    }


async def snapshot_remove(context: Context, args: dict[str, Any]) -> dict[str, Any]:
    """Stop serving a snapshot (or checkpoint) and delete it; refused while it has clients unless
    ``force``."""
    export, name = _arg(args, "export", str), _arg(args, "name", str)
    force = _arg(args, "force", bool, False)
    try:
        closed = await snapshots.remove(context.server, export, name, force)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    context.changes.remove(snapshots.export_name(export, name))
    await _keep(context, "it is served again after a restart, if its file is there")
    message = f"snapshot {name!r} of export {export!r} removed ({closed} client(s) disconnected)"
    return {"message": message, "disconnected": closed}


async def snapshot_list(context: Context, args: dict[str, Any]) -> dict[str, Any]:
    export = _arg(args, "export", str, None)
    if export is not None and export not in context.server.exports:
        raise CommandError(f"no export {export!r}")
    listed = [_snapshot_json(e) for e in snapshots.snapshots_of(context.server, export)]
    return {"snapshots": sorted(listed, key=lambda s: (s["export"], s["name"]))}


def _snapshot_json(snapshot: Export) -> dict[str, Any]:
    parent = snapshot.config.snapshot_of or ""
    bitmaps = snapshot.bitmaps.by_name
    return {
        "export": parent,
        "name": snapshot.name[len(parent) + len(snapshots.SEPARATOR) :],
        "served_as": snapshot.name,
        "path": str(snapshot.config.path),
        "size": snapshot.info.size,
        "checkpoint": bool(bitmaps),
        "bitmap": _bitmap_json(snapshot.name, next(iter(bitmaps.values()))) if bitmaps else None,
    }


async def bitmap_add(context: Context, args: dict[str, Any]) -> dict[str, Any]:
    """A dirty bitmap on an export, kept in the state directory, marked by every write that is
    answered after this command is."""
    export, name = _arg(args, "export", str), _arg(args, "name", str)
    granularity = _arg(args, "granularity", int, DEFAULT_GRANULARITY)
    try:
        bitmap = await context.server.add_bitmap(export, name, granularity)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    return {"message": f"bitmap {name!r} added to export {export!r}", "bitmap": _bitmap_json(export, bitmap)}


async def bitmap_remove(context: Context, args: dict[str, Any]) -> dict[str, Any]:
    export, name = _arg(args, "export", str), _arg(args, "name", str)
    _not_a_snapshot(context, export)
    try:
        await context.server.remove_bitmap(export, name)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    return {"message": f"bitmap {name!r} removed from export {export!r}"}


async def bitmap_clear(context: Context, args: dict[str, Any]) -> dict[str, Any]:
    """Every granule clean again (and an untrusted bitmap trusted): writes answered after this are
    marked; a write in flight meanwhile may or may not be."""
    export, name = _arg(args, "export", str), _arg(args, "name", str)
    _not_a_snapshot(context, export)
    try:
        bitmap = context.server.bitmaps_of(export).get(name)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    await asyncio.get_running_loop().run_in_executor(None, bitmap.clear)
    return {"message": f"bitmap {name!r} of export {export!r} cleared"}


def _not_a_snapshot(context: Context, export: str) -> None:
    """A checkpoint's bitmap is its record of what changed: it goes with the snapshot."""
    found = context.server.exports.get(export)
    if found is not None and found.config.snapshot_of is not None:
        raise CommandError(f"export {export!r} is a snapshot: its bitmap goes when it is removed")


async def bitmap_list(context: Context, args: dict[str, Any]) -> dict[str, Any]:
    """The bitmaps of one export, or of every one."""
    export = _arg(args, "export", str, None)
    names = [export] if export is not None else list(context.server.exports)
    if export is not None and export not in context.server.exports:
        raise CommandError(f"no export {export!r}")
    listed = [
        _bitmap_json(name, bitmap)
        for name in names
        for bitmap in sorted(context.server.exports[name].bitmaps.by_name.values(), key=lambda b: b.name)
    ]
    return {"bitmaps": listed}


def _bitmap_json(export: str, bitmap: DirtyBitmap) -> dict[str, Any]:
    return {
        "export": export,
        "name": bitmap.name,
        "granularity": bitmap.granularity,
        "size": bitmap.size,
        "dirty": bitmap.dirty_bytes(),
        "trusted": bitmap.trusted,
        "checkpoint": bitmap.checkpoint,  # tracks the writes since the checkpoint of its name
        "frozen": bitmap.frozen,  # a checkpoint's: what changed up to it
    }


async def _keep(context: Context, otherwise: str) -> None:
    """Write the changes to the state directory, off the event loop.  The change is made whatever
    comes of it: a failure is said to the client (and ``otherwise``, what it means)."""
    if context.state_dir is None:
        return
    try:
        await asyncio.get_running_loop().run_in_executor(None, state.save, context.state_dir, context.changes)
    except OSError as exc:
        log.error("cannot write the state directory %s: %s", context.state_dir, exc)
        raise CommandError(f"done, but not kept in {context.state_dir}: {exc} ({otherwise})") from None


def _export_config(args: dict[str, Any]) -> ExportConfig:
    path = _arg(args, "path", str)
    if not path.startswith(RBD_PREFIX) and not Path(path).is_absolute():
        raise CommandError(f"path {path!r} is not absolute (nbdserver ctl makes it so)")
    size = _arg(args, "size", int, None)
    if size is not None and size <= 0:
        raise CommandError("size must be positive")
    cache = _arg(args, "cache", str, "buffered")
    if cache not in CACHE_MODES:
        raise CommandError(f"cache mode {cache!r} is not one of {', '.join(CACHE_MODES)}")
    return ExportConfig(
        name=_arg(args, "name", str),
        path=Path(path),
        read_only=_arg(args, "read_only", bool, False),
        description=_arg(args, "description", str, ""),
        create_size=size,
        cache=cache,
    )


_MISSING = object()


def _arg(args: dict[str, Any], key: str, kind: type, default: Any = _MISSING) -> Any:
    """``args[key]``, which must be a ``kind`` (or None where the default is None)."""
    value = args.get(key, default)
    if value is _MISSING:
        raise CommandError(f"argument {key!r} is missing")
    if value is None and default is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CommandError(f"argument {key!r} must be a {kind.__name__}")
    return value


COMMANDS: dict[str, Command] = {
    "status": status,
    "export.add": export_add,
    "export.remove": export_remove,
    "bitmap.add": bitmap_add,
    "bitmap.remove": bitmap_remove,
    "bitmap.clear": bitmap_clear,
    "bitmap.list": bitmap_list,
    "snapshot.add": snapshot_add,
    "snapshot.remove": snapshot_remove,
    "snapshot.list": snapshot_list,
    "checkpoint": checkpoint,
}
CHANGES = frozenset(
    {
        "export.add",
        "export.remove",
        "bitmap.add",
        "bitmap.remove",
        "bitmap.clear",
        "snapshot.add",
        "snapshot.remove",
        "checkpoint",
    }
)


def describe(command: str, args: dict[str, Any]) -> str:
    """A change as the log says it."""
    shown = " ".join(f"{k}={v!r}" for k, v in sorted(args.items()))
    return f"{command} {shown}".strip()
