"""An export held for a snapshot, on a real file through the thread engine: requests that arrive
while it is held wait, the file stays as the answered requests left it, and on release each write
marks the bitmaps as they are then (a checkpoint may have switched them meanwhile)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nbdserver.block import Request
from nbdserver.block.buffers import BufferPool
from nbdserver.block.dirty import DIRTY, SUFFIX, DirtyBitmap
from nbdserver.block.ledger import Ledger
from nbdserver.config import ExportConfig, ServerConfig
from nbdserver.protocol import Command
from nbdserver.serving.bitmaps import track
from nbdserver.serving.export import Export

SIZE = 1 << 20
G = 4096


def write(offset: int, fill: bytes, done: list[Request], cookie: int) -> Request:
    return Request(Command.WRITE, 0, cookie, offset, G, done.append, bytearray(fill * G))


def open_export(tmp_path: Path) -> tuple[Export, Path]:
    """An export of a zeroed file through the thread engine, with a state directory (in a loop)."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SIZE))
    config = ExportConfig("disk", image)
    server = ServerConfig(exports=[config], state_dir=tmp_path / "state", engine="threads")
    return Export(config, server, BufferPool(), Ledger()), image


def test_requests_held_wait_and_mark_the_bitmaps_of_their_release(tmp_path: Path) -> None:
    async def scenario() -> None:
        export, image = open_export(tmp_path)
        try:
            export.bitmaps.start_tracking("monday", G)
            done: list[Request] = []
            first = write(0, b"a", done, 1)
            track(export.bitmaps, first)  # as a connection does, before submitting
            export.queue.submit(first)
            await export.hold()  # the write taken before the hold has completed
            assert [r.cookie for r in done] == [1] and image.read_bytes()[:G] == b"a" * G
            assert export.queue.holding
            held = write(8 * G, b"b", done, 2)
            export.queue.submit(held)  # a connection does not mark while held
            await asyncio.sleep(0.1)
            assert [r.cookie for r in done] == [1]
            assert image.read_bytes()[8 * G : 9 * G] == bytes(G)  # not written: the snapshot's moment
            into = tmp_path / "state" / "frozen"
            export.bitmaps.freeze_tracking(into, "monday")
            tuesday = export.bitmaps.start_tracking("tuesday", G)
            export.release()
            await export.queue.drain()
            assert [r.cookie for r in done] == [1, 2] and done[1].errno == 0
            assert image.read_bytes()[8 * G : 9 * G] == b"b" * G
            assert tuesday.extents(0, SIZE) == [(8 * G, 0), (G, DIRTY), (SIZE - 9 * G, 0)]
            assert tuesday.checkpoint and not tuesday.frozen
            frozen = DirtyBitmap.open(into / ("monday" + SUFFIX), SIZE)
            try:  # what was written before the checkpoint, not the write held across it
                assert frozen.frozen and not frozen.checkpoint
                assert frozen.extents(0, SIZE) == [(G, DIRTY), (SIZE - G, 0)]
            finally:
                frozen.close()
            assert "monday" not in export.bitmaps.by_name
        finally:
            await export.close()

    asyncio.run(scenario())


def test_a_first_checkpoint_freezes_everything_dirty(tmp_path: Path) -> None:
    """No bitmap tracked the writes before it: a backup from it must copy everything."""

    async def scenario() -> None:
        export, _ = open_export(tmp_path)
        try:
            assert export.bitmaps.tracking() is None
            export.bitmaps.freeze_tracking(tmp_path / "frozen", "first")
            frozen = DirtyBitmap.open(tmp_path / "frozen" / ("first" + SUFFIX), SIZE)
            try:
                assert frozen.frozen and frozen.extents(0, SIZE) == [(SIZE, DIRTY)]
            finally:
                frozen.close()
        finally:
            await export.close()

    asyncio.run(scenario())
