#!/usr/bin/env python3
"""Copy what changed, as a checkpoint's dirty bitmap says, from an NBD export into a file.

    incremental.py URI BITMAP TARGET

URI is a checkpoint of nbdserver's, ``nbd://HOST/EXPORT@NAME``, and BITMAP its name: only the
extents ``qemu:dirty-bitmap:BITMAP`` reports dirty are read and written into TARGET at the same
offsets (TARGET is made, sparse, at the export's size if missing).  The first checkpoint's bitmap
is all dirty, so the first run is a full copy; each later one into the same TARGET brings it to
that checkpoint.  Prints how many bytes were copied.  Needs libnbd's Python bindings
(python3-libnbd).
"""

from __future__ import annotations

import os
import sys

import nbd

CHUNK = 64 << 20  # bytes asked about per BLOCK_STATUS
READ = 8 << 20  # bytes read at once (servers take at most 32 MiB)
DIRTY = 1


def dirty_extents(h: nbd.NBD, context: str, size: int):
    """(offset, length) of every dirty extent, in order."""
    offset = 0
    while offset < size:
        found: list[int] = []

        def got(meta: str, at: int, entries: list[int], err: int, found: list[int] = found) -> int:
            if meta == context:
                found.extend(entries)
            return 0

        h.block_status(min(CHUNK, size - offset), offset, got)
        if not found:
            raise RuntimeError(f"the server reported nothing for {context}")
        for length, flags in zip(found[::2], found[1::2], strict=True):
            if flags & DIRTY:
                yield offset, length
            offset += length


def copy(uri: str, bitmap: str, target: str) -> int:
    context = f"qemu:dirty-bitmap:{bitmap}"
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    try:
        if not h.can_meta_context(context):
            raise RuntimeError(f"{uri} has no bitmap {bitmap!r}")
        size = h.get_size()
        copied = 0
        fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            for offset, length in dirty_extents(h, context, size):
                for at in range(offset, offset + length, READ):
                    data = h.pread(min(READ, offset + length - at), at)
                    os.pwrite(fd, data, at)
                    copied += len(data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return copied
    finally:
        h.shutdown()


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        copied = copy(*sys.argv[1:])
    except (nbd.Error, RuntimeError, OSError) as exc:
        print(f"incremental.py: {exc}", file=sys.stderr)
        return 1
    print(f"{copied} bytes copied")
    return 0


if __name__ == "__main__":
    sys.exit(main())
