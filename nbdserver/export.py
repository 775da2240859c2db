"""An export at run time: its backing, engine, request queue, and what the protocol says of it."""

from __future__ import annotations

import logging

from .backing import Backing, ThreadPoolEngine
from .block import RequestQueue
from .config import ExportConfig, ServerConfig
from .protocol import ExportInfo
from .protocol import TransmissionFlag as TF

log = logging.getLogger(__name__)

_WRITABLE = (
    TF.HAS_FLAGS
    | TF.SEND_FLUSH
    | TF.SEND_FUA
    | TF.SEND_TRIM
    | TF.SEND_WRITE_ZEROES
    | TF.SEND_FAST_ZERO
    | TF.SEND_CACHE
    | TF.CAN_MULTI_CONN  # one page cache and one queue serve all connections
)
_READ_ONLY = TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_CACHE | TF.CAN_MULTI_CONN


class Export:
    def __init__(self, config: ExportConfig, server: ServerConfig) -> None:
        self.config = config
        self.backing = Backing(config.path, read_only=config.read_only, create_size=config.create_size)
        self.engine = ThreadPoolEngine(self.backing, server.workers)
        self.queue = RequestQueue(self.engine, merge=server.merge, limits=server.merge_limits)
        self.info = ExportInfo(
            name=config.name,
            size=self.backing.size,
            flags=_READ_ONLY if config.read_only else _WRITABLE,
            description=config.description,
            min_block=1,
            preferred_block=4096,
        )

    @property
    def name(self) -> str:
        return self.config.name

    async def close(self) -> None:
        """Finish in-flight requests, make written data durable, release the backing."""
        await self.queue.drain()
        if not self.config.read_only:
            await self.engine.flush()
        self.engine.close()
        log.info("export %r: %s", self.name, self.queue.stats.summary())
