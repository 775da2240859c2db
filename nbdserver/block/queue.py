"""The per-export request queue, shared by every connection of the export.

Requests enter with :meth:`RequestQueue.submit` and leave through their
``on_done`` callback.  Each request is issued to the engine as soon as it
arrives; the queue keeps count of what is in flight so that shutdown can drain.
"""

from __future__ import annotations

import asyncio
import errno
import logging

from ..backing import Engine
from ..protocol import Command, CommandFlag
from .request import Request

log = logging.getLogger(__name__)


class RequestQueue:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def submit(self, request: Request) -> None:
        task = asyncio.get_running_loop().create_task(self._execute(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait until every submitted request has completed."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def _execute(self, request: Request) -> None:
        try:
            if request.length or request.command == Command.FLUSH:
                await self._dispatch(request)
        except OSError as exc:
            request.fail(exc.errno or errno.EIO, exc.strerror or str(exc))
        except Exception as exc:  # a bug must cost one request, not the server
            log.exception("request %r failed", request)
            request.fail(errno.EIO, f"internal error: {exc}")
        request.on_done(request)

    async def _dispatch(self, request: Request) -> None:
        engine, command, offset, length = self.engine, request.command, request.offset, request.length
        fua = bool(request.flags & CommandFlag.FUA)
        if command == Command.READ:
            request.buffer = bytearray(length)
            if request.sparse:
                request.extents = await engine.read_sparse(offset, request.buffer)
            else:
                await engine.readv(offset, [request.buffer])
        elif command == Command.WRITE:
            assert request.buffer is not None
            await engine.writev(offset, [request.buffer], dsync=fua)
        elif command == Command.FLUSH:
            await engine.flush()
        elif command == Command.TRIM:
            await engine.discard(offset, length, dsync=fua)
        elif command == Command.WRITE_ZEROES:
            await engine.write_zeroes(
                offset,
                length,
                may_trim=not request.flags & CommandFlag.NO_HOLE,
                fast_only=bool(request.flags & CommandFlag.FAST_ZERO),
                dsync=fua,
            )
        elif command == Command.CACHE:
            await engine.cache(offset, length)
        elif command == Command.BLOCK_STATUS:
            request.extents = await engine.extents(offset, length)
        else:
            raise OSError(errno.EINVAL, f"command {command} is not an I/O command")
