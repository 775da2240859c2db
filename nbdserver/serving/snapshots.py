"""Snapshots and checkpoints: a copy of an export's file as it was at one request boundary, served
read-only as ``EXPORT@NAME``.

The boundary: every process serving the export holds the requests that arrive and waits for those
it took to complete (RequestQueue.hold), so the file is as the answered requests left it.  Within
that hold a checkpoint also moves the bitmap that tracked the writes since the previous checkpoint
onto the snapshot, frozen, and starts a new one named after this checkpoint, opened by every
process before a held write goes on (each then marks it).  Then the requests go on, and the file
is cloned while they do (cloning.py): a write waits only for the clone of what it changes.  The
hold, and the clone, are measured and logged.

The snapshot's file lies beside the export's (``FILE@NAME``), on the same filesystem as reflinks
require; its bitmap in the state directory, as any export's.

A worker process that died while the export was held or cloned is replaced by one that knows
nothing of it: the snapshot is discarded and the command fails (it can be tried again); a
checkpoint's new bitmap that some process may not have opened reports everything dirty (never
less).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from time import monotonic

from ..backing import Backing, reflink
from ..block.dirty import DEFAULT_GRANULARITY, BitmapError, check_name, directory
from ..config import ConfigError, ExportConfig
from .cloning import Cloner
from .export import Export
from .server import Server

log = logging.getLogger(__name__)

SEPARATOR = "@"
HOLD_TIMEOUT = 10.0  # seconds for the requests in flight to complete before a snapshot gives up
NO_STATE_DIR = "snapshots are kept in the state directory: start the server with --state-dir"


class NotServed(ConfigError):
    """The snapshot was made and kept, but could not be served now (a restart serves it)."""

    def __init__(self, message: str, config: ExportConfig) -> None:
        super().__init__(message)
        self.config = config


@dataclass
class Made:
    config: ExportConfig  # the snapshot's export
    paused: float  # seconds the export's requests were held, at the boundary
    cloned: float  # seconds the file took to clone, while served
    longest: float  # seconds of the longest clone call (a write waits for one, at most, once asked)
    warning: str = ""  # something the operator should know: the checkpoint was made anyway


def export_name(export: str, name: str) -> str:
    return f"{export}{SEPARATOR}{name}"


def file_of(backing: Path, name: str) -> Path:
    return backing.with_name(f"{backing.name}{SEPARATOR}{name}")


def snapshots_of(server: Server, export: str | None = None) -> list[Export]:
    """The snapshots served, of ``export`` or of every export."""
    return [
        e
        for e in server.exports.values()
        if e.config.snapshot_of is not None and (export is None or e.config.snapshot_of == export)
    ]


async def make(server: Server, export: str, name: str, checkpoint: bool = False) -> Made:
    """Snapshot ``export`` as ``name`` (with ``checkpoint``: and switch its bitmaps) and serve it.
    ConfigError if it cannot be made (nothing is left of it then); NotServed if made but not served."""
    parent = _snapshottable(server, export, name, checkpoint)
    config = ExportConfig(
        name=export_name(export, name),
        path=file_of(parent.config.path, name),
        read_only=True,
        description=f"snapshot {name} of {export}",
        cache=parent.config.cache,
        tls=parent.config.tls,  # the same data: no more reachable than its export
        allow=parent.config.allow,
        snapshot_of=export,
    )
    source = parent.backing
    assert isinstance(source, Backing)  # not an RBD image: refused above
    loop = asyncio.get_running_loop()
    what = "checkpoint" if checkpoint else "snapshot"
    try:  # made now, to learn before the hold whether the filesystem can clone
        target = await loop.run_in_executor(None, reflink.Target, source.fd, parent.config.path, config.path)
    except reflink.ReflinkError as exc:
        raise ConfigError(f"{what} {name!r} of export {export!r} not made: {exc.strerror}") from None
    try:
        warning, pause, cloner = await _copy(server, parent, target, name, config.name, checkpoint)
    except BaseException:
        await loop.run_in_executor(None, target.discard)
        raise
    made = Made(config, pause.seconds, cloner.seconds, cloner.longest, warning)
    log.info(
        "export %r: %s %r made as %s: requests held %.1f ms, cloned in %.0f ms (%d calls, the longest %.1f ms)",
        export,
        what,
        name,
        config.path,
        made.paused * 1e3,
        made.cloned * 1e3,
        cloner.calls,
        made.longest * 1e3,
    )
    if warning:
        log.warning("export %r: checkpoint %r: %s", export, name, warning)
    try:
        await server.add_export(config)
    except (ConfigError, OSError) as exc:
        why = f"{what} {name!r} made as {config.path} but not served ({exc}): a restart serves it"
        raise NotServed(why, config) from None
    return made


async def _copy(
    server: Server, parent: Export, target: reflink.Target, name: str, snapshot: str, checkpoint: bool
) -> tuple[str, _Pause, Cloner]:
    """Fix the snapshot at a request boundary (and switch the bitmaps there, for a checkpoint), then
    clone the file while serving; returns the warning of the switch, the pause, the cloner.
    ConfigError if the copy failed (a checkpoint's bitmaps are then as if it had not been made,
    but for the export's tracking bitmap, which is gone: the next checkpoint's is all dirty)."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, reflink.write_back, target.source_fd)  # the clones' own is then short
    cloner = Cloner(target, partial(server.clone_progress, parent.name))
    server.cloners[parent.name] = cloner  # the gates ask it for granules from the release on
    warning = ""
    switched = False
    try:
        async with _held(server, parent, cloner) as pause:
            pause.check()
            if checkpoint:
                warning = await _switch_bitmaps(server, parent, name, snapshot)
                switched = True
        log.info(
            "export %r: %s %r fixed at a request boundary (requests held %.1f ms); cloning %d bytes",
            parent.name,
            "checkpoint" if checkpoint else "snapshot",
            name,
            pause.seconds * 1e3,
            target.size,
        )
        try:
            await cloner.run()
        finally:
            del server.cloners[parent.name]
            server.end_clone(parent.name)
        pause.check()
        await loop.run_in_executor(None, target.publish)
    except BaseException as exc:
        server.cloners.pop(parent.name, None)
        if switched:
            await _abandon_checkpoint(server, parent, name, snapshot)
        if isinstance(exc, reflink.ReflinkError):
            what = "checkpoint" if checkpoint else "snapshot"
            raise ConfigError(f"{what} {name!r} of export {parent.name!r} not made: {exc.strerror}") from None
        raise
    return warning, pause, cloner


async def _abandon_checkpoint(server: Server, parent: Export, name: str, snapshot: str) -> None:
    """The copy failed after the bitmaps were switched: the frozen bitmap goes with the snapshot,
    and so does the new tracking bitmap (a checkpoint of that name may be tried again)."""
    if name in parent.bitmaps.by_name:
        parent.bitmaps.remove(name)
        try:
            await server.bitmaps_changed(parent)
        except ConfigError as exc:
            log.error("export %r: %s", parent.name, exc)
    if server.config.state_dir is not None:
        shutil.rmtree(directory(server.config.state_dir, snapshot), ignore_errors=True)
    log.warning("export %r: checkpoint %r abandoned: the next checkpoint's bitmap is all dirty", parent.name, name)


def _snapshottable(server: Server, export: str, name: str, checkpoint: bool) -> Export:
    parent = server.exports.get(export)
    if parent is None:
        raise ConfigError(f"no export {export!r}")
    check_name(name)
    if parent.config.snapshot_of is not None:
        raise ConfigError(f"export {export!r} is a snapshot already")
    if parent.config.rbd is not None:
        raise ConfigError(f"export {export!r} is an RBD image: snapshot it with rbd snap create")
    if server.config.state_dir is None:
        raise ConfigError(NO_STATE_DIR)
    if export_name(export, name) in server.exports:
        raise ConfigError(f"export {export!r} has a snapshot {name!r} already")
    if checkpoint and parent.config.read_only:
        raise ConfigError(f"export {export!r} is read-only: it has no writes to track between checkpoints")
    if checkpoint and name in parent.bitmaps.by_name:
        raise ConfigError(f"export {export!r} has a bitmap {name!r} already")
    return parent


async def _switch_bitmaps(server: Server, parent: Export, name: str, snapshot: str) -> str:
    """Within the hold: freeze the tracking bitmap onto the snapshot, start a new one, have every
    process open it.  Returns a warning, if the new bitmap cannot be relied upon."""
    assert server.config.state_dir is not None
    bitmaps = parent.bitmaps
    tracking = bitmaps.tracking()
    granularity = tracking.granularity if tracking is not None else DEFAULT_GRANULARITY
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, bitmaps.freeze_tracking, directory(server.config.state_dir, snapshot), name)
    warning = ""
    try:
        new = await loop.run_in_executor(None, bitmaps.start_tracking, name, granularity)
    except BitmapError as exc:
        new = None
        warning = f"no bitmap tracks the writes from it on ({exc}): the next checkpoint's bitmap is all dirty"
    try:
        await server.bitmaps_changed(parent)
    except ConfigError as exc:
        if new is not None:
            new.distrust()  # some process may not mark it
        warning = f"{exc}: bitmap {name!r} reports everything dirty"
    return warning


class _Pause:
    """How long the requests were held, and whether a worker died meanwhile."""

    def __init__(self, server: Server) -> None:
        self._workers = server.workers
        self._lost = self._workers.lost if self._workers is not None else 0
        self.started = monotonic()
        self.seconds = 0.0

    def check(self) -> None:
        """ConfigError if a worker died since the hold began (its replacement knows nothing of it)."""
        if self._workers is not None and self._workers.lost != self._lost:
            raise ConfigError("a worker process died while the snapshot was made: try again")


@contextlib.asynccontextmanager
async def _held(server: Server, export: Export, cloner: Cloner) -> AsyncIterator[_Pause]:
    """Hold the export's requests in every process (ConfigError if they do not complete in time);
    on leaving without an error, put a gate in front of each queue before the requests go on."""
    pause = _Pause(server)
    gated = 0
    try:
        problems = []
        try:
            await asyncio.wait_for(export.hold(), HOLD_TIMEOUT)
        except TimeoutError:
            problems.append(f"the requests in flight did not complete in {HOLD_TIMEOUT:.0f} s")
        if server.workers is not None:
            problems += await server.workers.hold_export(export.name, HOLD_TIMEOUT)
        if problems:
            raise ConfigError(f"export {export.name!r} not held: {'; '.join(problems)}")
        yield pause
        export.start_gate(cloner.count, cloner.ask)
        gated = cloner.count
    finally:
        export.release()
        if server.workers is not None:
            await server.workers.release_export(export.name, gated)
        pause.seconds = monotonic() - pause.started


async def remove(server: Server, export: str, name: str, force: bool) -> int:
    """Stop serving a snapshot (refused while it has clients, unless ``force``), then delete its
    file and bitmaps.  Returns the clients disconnected."""
    snapshot = server.exports.get(export_name(export, name))
    if snapshot is None or snapshot.config.snapshot_of != export:
        raise ConfigError(f"export {export!r} has no snapshot {name!r}")
    path = snapshot.config.path
    closed = await server.remove_export(snapshot.name, force)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, _delete, server, snapshot.name, path)
    log.info("export %r: snapshot %r removed (%s)", export, name, path)
    return closed


def _delete(server: Server, snapshot: str, path: Path) -> None:
    path.unlink(missing_ok=True)
    if server.config.state_dir is not None:
        shutil.rmtree(directory(server.config.state_dir, snapshot), ignore_errors=True)
