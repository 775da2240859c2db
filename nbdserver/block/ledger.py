"""How much each backing file was written since its last flush, counted by every process writing it.

A flush is done in place only when little is left to write back (backing/file.py).  With
worker processes, the writes to one file arrive at several of them (a kernel client spreads
its requests over its connections, and the connections over the workers), and a flush in one
must count the others' writes too.  So the counts live in memory the primary shares with its
workers: a table with a row per backing file, and in each row the bytes written by each process
(one counter per worker, written by that worker only, as its writes complete) and, once a flush
is done, the total at its start (written by whichever flushed).  A flush still under way counts
for nothing: one that comes meanwhile would wait for its writeback.  Aligned 8-byte words are
read and written whole, and the one race left (two flushes storing their totals at once) can only
leave a count too large.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

ROWS = 256  # backing files a server can count for; those beyond are counted by each process alone
_USED, _DEV, _INO, _FLUSHED = range(4)  # a row's first words; a counter per process follows
_HEAD = 4


def _size(slots: int) -> int:
    return ROWS * (_HEAD + slots) * 8


def shared_memory(slots: int) -> int:
    """Memory for a table that ``slots`` workers share: the primary passes them the descriptor."""
    fd = os.memfd_create("nbd-ledger", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, _size(slots))
    except BaseException:
        os.close(fd)
        raise
    return fd


class Ledger:
    """The table, as one process maps it."""

    def __init__(self, slots: int = 1, slot: int = 0, fd: int | None = None) -> None:
        """A table for ``slots`` processes, of which this one is ``slot``.  ``fd``: the shared
        memory (see :func:`shared_memory`) or None for a process of its own."""
        self.slots, self.slot, self.fd = slots, slot, fd
        self._memory = mmap.mmap(-1 if fd is None else fd, _size(slots))
        self._words = memoryview(self._memory).cast("Q")

    def account(self, fd: int) -> Account:
        """The row of the file open as ``fd``: the same in every process that opens it."""
        st = os.fstat(fd)
        dev, ino = (st.st_rdev, 0) if stat.S_ISBLK(st.st_mode) else (st.st_dev, st.st_ino)
        words, width = self._words, _HEAD + self.slots
        with self._locked():
            free = None
            for base in range(0, ROWS * width, width):
                if not words[base + _USED]:
                    free = base if free is None else free
                elif words[base + _DEV] == dev and words[base + _INO] == ino:
                    return Account(words, base, self.slots, self.slot)
            if free is None:
                log.warning(
                    "more than %d backing files since the server started: flushes of this one count "
                    "only this process's writes to it",
                    ROWS,
                )
                return Account.private()
            words[free + _DEV], words[free + _INO], words[free + _USED] = dev, ino, 1
            return Account(words, free, self.slots, self.slot)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Rows are taken one process at a time (POSIX locks are held per process)."""
        if self.fd is None:
            yield
            return
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)


class Account:
    """One backing file's row, as one process sees it."""

    def __init__(self, words: memoryview, base: int, slots: int, slot: int) -> None:
        self._words = words
        self._flushed = base + _FLUSHED
        self._first = base + _HEAD
        self._end = self._first + slots
        self._own = self._first + slot

    @classmethod
    def private(cls) -> Account:
        """An account no other process sees: for a queue on its own (tests), and for files beyond
        the table."""
        return cls(memoryview(bytearray((_HEAD + 1) * 8)).cast("Q"), 0, 1, 0)

    def wrote(self, nbytes: int) -> None:
        self._words[self._own] += nbytes

    def total(self) -> int:
        """Every process's writes to the file so far."""
        return sum(self._words[self._first : self._end])

    def unflushed(self, total: int) -> int:
        """Of ``total``, what no flush that is done was to write back."""
        return total - self._words[self._flushed]

    def flushed(self, total: int) -> None:
        """A flush is done that started when :meth:`total` was ``total``."""
        if total > self._words[self._flushed]:
            self._words[self._flushed] = total
