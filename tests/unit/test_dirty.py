"""Dirty bitmaps (block/dirty.py): marks, extents, what is trusted after which end, the
qemu:dirty-bitmap contexts the handshake offers for them, and block status replies that carry them
(serving/bitmaps.py)."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

import pytest

from nbdserver.block import Request, dirty
from nbdserver.block.dirty import DIRTY, BitmapError, DirtyBitmap, ExportBitmaps
from nbdserver.protocol import ExportCatalog, ExportInfo, ServerHandshake
from nbdserver.protocol.constants import BASE_ALLOCATION, Command, Option, OptionReply, ReplyFlag
from nbdserver.protocol.constants import TransmissionFlag as TF
from nbdserver.protocol.replies import CompactReplies, ExtendedReplies
from nbdserver.serving.bitmaps import status_reply

from .test_handshake import contexts, go_disk, send, start, types
from .wire import meta_request, option

K = 1024
SIZE = 1 << 20
G = 64 * K


def make(tmp_path: Path, granularity: int = G, size: int = SIZE) -> DirtyBitmap:
    return DirtyBitmap.create(tmp_path, "b", granularity, size)


def test_a_new_bitmap_is_clean_and_trusted(tmp_path):
    bitmap = make(tmp_path)
    assert bitmap.trusted and bitmap.extents(0, SIZE) == [(SIZE, 0)] and bitmap.dirty_bytes() == 0
    assert [p.name for p in tmp_path.iterdir()] == ["b.bitmap"]  # no temporary file left
    bitmap.close()


def test_marks_cover_every_granule_touched_and_no_other(tmp_path):
    bitmap = make(tmp_path)
    bitmap.mark(G + 10, 1)  # one byte: its granule
    bitmap.mark(4 * G - 1, 2)  # across a boundary: both granules
    bitmap.mark(SIZE - 1, 100)  # past the end: the last granule only
    assert bitmap.extents(0, SIZE) == [
        (G, 0),
        (G, DIRTY),
        (G, 0),
        (2 * G, DIRTY),
        (SIZE - 6 * G, 0),
        (G, DIRTY),
    ]
    assert bitmap.extents(G + 5, 10) == [(10, DIRTY)]  # clipped to the request
    assert bitmap.extents(0, SIZE, limit=2) == [(G, 0), (G, DIRTY)]
    assert bitmap.dirty_bytes() == 4 * G
    bitmap.clear()
    assert bitmap.extents(0, SIZE) == [(SIZE, 0)]
    bitmap.close()


def test_a_mark_is_seen_by_another_mapping_of_the_file(tmp_path):
    """Each worker process maps the file: what one marks, the others report."""
    one = make(tmp_path)
    other = DirtyBitmap.open(tmp_path / "b.bitmap", SIZE)
    one.mark(3 * G, G)
    assert other.extents(2 * G, 3 * G) == [(G, 0), (G, DIRTY), (G, 0)]
    other.clear()
    assert one.extents(0, SIZE) == [(SIZE, 0)]
    one.close()
    other.close()


def test_only_the_last_user_marks_it_clean(tmp_path):
    one = make(tmp_path)
    other = DirtyBitmap.open(tmp_path / "b.bitmap", SIZE)
    one.close()
    assert header_byte(tmp_path, dirty._CLEAN) == 0  # still in use by the other
    other.close()
    assert header_byte(tmp_path, dirty._CLEAN) == 1


def test_left_open_by_this_boot_is_trusted(tmp_path):
    """A process that died while the machine ran: its marks are in the page cache."""
    bitmap = make(tmp_path)
    bitmap.mark(0, 1)
    abandon(bitmap)
    again = DirtyBitmap.open(tmp_path / "b.bitmap", SIZE)
    assert again.trusted and again.extents(0, G) == [(G, DIRTY)]
    again.close()


def test_left_open_by_another_boot_is_not_trusted_until_cleared(tmp_path, caplog):
    """The machine stopped with the bitmap open: marks may not have reached the disk."""
    bitmap = make(tmp_path)
    abandon(bitmap)
    write_boot_id(tmp_path, bytes(range(16)))
    again = DirtyBitmap.open(tmp_path / "b.bitmap", SIZE)
    assert not again.trusted and again.extents(G, 2 * G) == [(2 * G, DIRTY)] and again.dirty_bytes() == SIZE
    assert "marks may be lost" in caplog.text
    again.close()
    assert not DirtyBitmap.open(tmp_path / "b.bitmap", SIZE).trusted  # a clean close does not make it so
    third = DirtyBitmap.open(tmp_path / "b.bitmap", SIZE)
    third.clear()
    assert third.trusted and third.extents(0, SIZE) == [(SIZE, 0)]
    third.close()


def test_closed_cleanly_before_a_reboot_is_trusted(tmp_path):
    bitmap = make(tmp_path)
    bitmap.mark(0, 1)
    bitmap.close()
    write_boot_id(tmp_path, bytes(range(16)))
    again = DirtyBitmap.open(tmp_path / "b.bitmap", SIZE)
    assert again.trusted and again.extents(0, G) == [(G, DIRTY)]
    again.close()


def test_an_export_of_another_size_is_not_trusted_until_cleared(tmp_path, caplog):
    make(tmp_path).close()
    grown = DirtyBitmap.open(tmp_path / "b.bitmap", 4 * SIZE)
    assert not grown.trusted and grown.extents(0, 4 * SIZE) == [(4 * SIZE, DIRTY)]
    assert "kept for 1048576 bytes, the export has 4194304" in caplog.text
    grown.clear()
    grown.mark(4 * SIZE - 1, 1)
    assert grown.extents(0, 4 * SIZE) == [(4 * SIZE - G, 0), (G, DIRTY)]
    grown.close()


def test_two_processes_closing_at_once_leave_it_clean(tmp_path):
    """The first to look finds the other still has it open and gives up; the other, looking next,
    must not find the first's lock."""
    make(tmp_path).close()
    first = DirtyBitmap.open(tmp_path / "b.bitmap", SIZE)  # two opens: two locks, as two processes
    second = DirtyBitmap.open(tmp_path / "b.bitmap", SIZE)
    assert header_byte(tmp_path, dirty._CLEAN) == 0
    assert not first._last_user()
    second.close()
    assert header_byte(tmp_path, dirty._CLEAN) == 1
    first.close()
    assert header_byte(tmp_path, dirty._CLEAN) == 1


@pytest.mark.parametrize("granularity", [0, 2048, 4096 + 1, 96 * K, 128 * 1024 * 1024])
def test_bad_granularity(tmp_path, granularity):
    with pytest.raises(BitmapError, match="power of two from 4 KiB to 64 MiB"):
        make(tmp_path, granularity)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "x" * 129, "sp ace"])
def test_bad_name(tmp_path, name):
    with pytest.raises(BitmapError, match="bad bitmap name"):
        DirtyBitmap.create(tmp_path, name, G, SIZE)


def test_a_duplicate_is_refused_and_the_first_kept(tmp_path):
    bitmaps = ExportBitmaps(tmp_path, SIZE)
    bitmaps.add("b", G).mark(0, 1)
    with pytest.raises(BitmapError, match="exists already"):
        bitmaps.add("b", G)
    with pytest.raises(BitmapError, match="exists already"):  # made by another process meanwhile
        DirtyBitmap.create(tmp_path, "b", G, SIZE)
    assert bitmaps.get("b").extents(0, G) == [(G, DIRTY)]
    bitmaps.close()


def test_a_full_disk_leaves_nothing_behind(tmp_path, monkeypatch):
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(BitmapError, match="no space left"):
        make(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_without_a_state_directory_bitmaps_are_refused():
    bitmaps = ExportBitmaps(None, SIZE)
    with pytest.raises(BitmapError, match="--state-dir"):
        bitmaps.add("b", G)
    with pytest.raises(BitmapError, match="--state-dir"):
        bitmaps.load(("b",))


def test_load_opens_new_files_and_closes_removed_ones(tmp_path):
    primary, worker = ExportBitmaps(tmp_path, SIZE), ExportBitmaps(tmp_path, SIZE)
    primary.load(("configured",))
    worker.load()
    assert set(worker.by_name) == {"configured"} and worker.active
    primary.add("later", 4 * K)
    worker.load()
    assert set(worker.by_name) == {"configured", "later"}
    primary.remove("configured")
    worker.load()
    assert set(worker.by_name) == {"later"}
    worker.mark(5 * K, 1)
    assert primary.get("later").extents(0, 8 * K) == [(4 * K, 0), (4 * K, DIRTY)]
    primary.close()
    worker.close()


def abandon(bitmap: DirtyBitmap) -> None:
    """As a process that dies: its mapping and descriptor go without a clean close."""
    bitmap._map.close()
    fcntl.flock(bitmap._fd, fcntl.LOCK_UN)
    os.close(bitmap._fd)


def header_byte(where: Path, at: int) -> int:
    return (where / "b.bitmap").read_bytes()[at]


def write_boot_id(where: Path, boot: bytes) -> None:
    with open(where / "b.bitmap", "r+b") as f:
        f.seek(dirty._BOOT)
        f.write(struct.pack("16s", boot))


# The handshake's contexts -------------------------------------------------------------------

BITMAPPED = ExportInfo("disk", SIZE, TF.HAS_FLAGS, bitmaps=("a", "b"))


def structured() -> ServerHandshake:
    hs = start(catalog=ExportCatalog([BITMAPPED]))
    send(hs, option(Option.STRUCTURED_REPLY))
    return hs


@pytest.mark.parametrize(
    ("queries", "listed"),
    [
        ((), [BASE_ALLOCATION, "qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"]),
        (("qemu:",), ["qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"]),
        (("qemu:dirty-bitmap:",), ["qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"]),
        (("qemu:dirty-bitmap:b", "base:"), ["qemu:dirty-bitmap:b", BASE_ALLOCATION]),
        (("qemu:dirty-bitmap:zz", "qemu:allocation-depth"), []),
    ],
)
def test_list_meta_context_names_the_bitmaps(queries, listed):
    replies, _ = send(structured(), option(Option.LIST_META_CONTEXT, meta_request("disk", *queries)))
    assert contexts(replies) == [(0, name) for name in listed]
    assert types(replies)[-1] == OptionReply.ACK


def test_set_meta_context_takes_whole_names_each_with_its_id():
    hs = structured()
    queries = ("qemu:dirty-bitmap:b", "qemu:", BASE_ALLOCATION, "qemu:dirty-bitmap:b", "qemu:dirty-bitmap:zz")
    replies, _ = send(hs, option(Option.SET_META_CONTEXT, meta_request("disk", *queries)))
    assert contexts(replies) == [(1, "qemu:dirty-bitmap:b"), (2, BASE_ALLOCATION)]
    assert go_disk(hs).meta_contexts == {1: "qemu:dirty-bitmap:b", 2: BASE_ALLOCATION}


# Block status replies of several contexts ---------------------------------------------------


@pytest.mark.parametrize("extended", [False, True])
@pytest.mark.parametrize("named", [None, (2,), (2, 1)])
def test_a_reply_has_a_chunk_per_context_and_only_the_last_is_done(tmp_path, extended, named):
    bitmaps = ExportBitmaps(tmp_path, SIZE)
    bitmaps.add("b", G).mark(G, 1)
    request = Request(Command.BLOCK_STATUS, 0, 7, 0, 4 * G, lambda r: None)
    request.contexts = named
    replies = ExtendedReplies() if extended else CompactReplies(True)
    negotiated = {1: BASE_ALLOCATION, 2: "qemu:dirty-bitmap:b"}
    chunks = status_reply(replies, request, negotiated, [(4 * G, True)], bitmaps)
    header = struct.Struct(">IHHQQQII" if extended else ">IHHQII")
    parsed = [header.unpack_from(bytes(chunk)) for chunk in chunks]
    ids = list(named or (1, 2))
    assert [p[-2] if extended else p[-1] for p in parsed] == ids
    assert [p[1] for p in parsed] == [0] * (len(ids) - 1) + [ReplyFlag.DONE]
    descriptors = {}
    for chunk, context_id in zip(chunks, ids, strict=True):
        body = bytes(chunk)[header.size :]
        form = ">QQ" if extended else ">II"
        descriptors[context_id] = list(struct.iter_unpack(form, body))
    assert descriptors[2] == [(G, 0), (G, DIRTY), (2 * G, 0)]
    if 1 in descriptors:
        assert descriptors[1] == [(4 * G, 3)]  # a hole that reads as zeroes
    bitmaps.close()
