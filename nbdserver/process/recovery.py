"""Crash recovery: a serving process dies, and its clients see a pause, not an error.

A worker process serves its connections with their request buffers and journals in an arena, a
memory file its primary made and keeps (block/buffers.py, serving/journal.py).  The primary also
keeps a copy of each connection's socket, and learns from the worker which connections are in
the transmission phase with a journal, on which terms, and where in the arena the journal is.

When the worker dies, whatever the cause and whatever it was doing, the primary starts its
replacement and passes it the dead worker's arena and each journaled connection:

    primary                                    replacement worker
    arena + fd (the dead worker's)      ──▶    maps it to read
    recover {id, was, terms, record} + fd ──▶  per connection: the kernel's counts of the bytes read
                                               and written, and the journal, give what to send again
                                               and what to receive again (journal.recover)
                                        ◀──    resuming {id, requests, resent}   before it goes on
                                               from there (or ended {id}: closed)
    recovered                           ──▶    the arena is let go
                                        ◀──    recovered {resumed, closed}

Connections that were still in the handshake, TLS connections (their keys died with the worker),
Unix socket connections (the kernel counts nothing for them) and connections whose journal cannot
be trusted are closed: never served from a wrong state.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket

from ..block.buffers import ARENA_SIZE
from ..serving import counts
from ..serving.journal import JournalError, Recovered, recover
from ..serving.server import Server
from .handover import ConnectionTerms, adopt
from .keeper import close

log = logging.getLogger(__name__)


class Recovery:
    """In a replacement: the dead process's arena, and what became of its connections."""

    def __init__(self, fd: int) -> None:
        try:
            self._memory = mmap.mmap(fd, ARENA_SIZE, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._view = memoryview(self._memory)
        self.resumed = self.closed = 0

    def read(self, terms: ConnectionTerms, record: int, was: int, sock: socket.socket) -> Recovered | None:
        """What to do for one connection of the dead process (which called it ``was``); None, the
        connection closed, if that cannot be told right."""
        try:
            read, written = counts.bytes_read(sock), counts.bytes_written(sock)
            if read is None or written is None:
                raise JournalError("the kernel counts no bytes of a Unix socket")
            return recover(self._view, record, was, read, written, terms.extended_headers)
        except (JournalError, OSError) as exc:
            log.warning("%s: closed, not taken over after a crash: %s", terms.peer, exc)
            close(sock)  # for good: the primary's copy must not keep the client waiting
            self.closed += 1
            return None

    async def resume(
        self, server: Server, terms: ConnectionTerms, sock: socket.socket, tag: int, recovered: Recovered
    ) -> bool:
        """Go on with the connection, here called ``tag``, as ``recovered`` says; False if it cannot
        be served here (closed)."""
        coroutine = adopt(server, terms, sock, recovered.pending, tag, recovered.resend)
        if coroutine is None:
            self.closed += 1
            return False
        await coroutine
        self.resumed += 1
        log.info(
            "%s: taken over after a crash: %d request(s) taken again, %d byte(s) of replies sent again",
            terms.peer,
            recovered.requests,
            len(recovered.resend),
        )
        return True

    def close(self) -> None:
        self._view.release()
        self._memory.close()
