"""An export at run time: its backing, engine, request queue, and what the protocol says of it."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from ..backing import Backing, Engine, Store, open_engine
from ..backing.librbd import RbdEngine, RbdImage
from ..backing.rbdlock import ExclusiveLock, refuse_if_held
from ..block import RequestQueue
from ..block.buffers import PAGE_SIZE, BufferPool, ByteBudget
from ..block.dirty import ExportBitmaps, directory
from ..block.ledger import Account, Ledger
from ..config import ConfigError, ExportConfig, ServerConfig
from ..protocol import ExportInfo
from ..protocol import TransmissionFlag as TF
from ..stats import ExportSnapshot
from .bitmaps import track
from .cloning import Ask, Gate

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


MAX_HAZARD_GRANULE = 1 << 20


class Export:
    def __init__(
        self,
        config: ExportConfig,
        server: ServerConfig,
        pool: BufferPool,
        ledger: Ledger,
        budget: ByteBudget | None = None,
        image: RbdImage | None = None,
        make_bitmaps: bool = True,
    ) -> None:
        """``ledger``: where the writes to its backing file are counted (by every process serving it);
        ``image``: its RBD image, opened already (else it is opened here); ``make_bitmaps``: make the
        dirty bitmaps configured that are missing (the primary does, before its workers start: a
        worker opens what is kept, so that one started after a bitmap was removed does not make it
        again)."""
        self.config = config
        self.pool = pool
        # Its own in-flight budget, within the server's (``budget``).
        self.budget = ByteBudget(config.max_inflight_bytes or server.max_export_inflight_bytes, budget)
        self.backing, self.engine, written = _open(config, server, ledger, image)
        backing = self.backing
        # Direct and page-cache I/O meet on whole pages: order requests that share one.
        granule = min(max(PAGE_SIZE, backing.offset_align), MAX_HAZARD_GRANULE) if backing.direct else 1
        self.queue = RequestQueue(
            self.engine,
            merge=server.merge,
            limits=server.merge_limits,
            pool=pool,
            hazard_granule=granule,
            written=written,
        )
        self.info = ExportInfo(
            name=config.name,
            size=backing.size,
            flags=_READ_ONLY if config.read_only else _WRITABLE,
            description=config.description,
            # Any alignment works (in direct mode, unaligned transfers take the page cache),
            # so the minimum is 1 and the preferred size says what is fast.
            min_block=1,
            preferred_block=max(4096, backing.offset_align),
            tls_required=config.tls_required(server),
        )
        self._gate: Gate | None = None  # while a snapshot's file is cloned
        # Busy polling spares a wake-up of a few microseconds; an RBD request waits milliseconds
        # for the cluster, so its connections do not poll: the windows would burn the CPU that
        # librbd's threads and the cluster's daemons need, and save nothing that shows.
        self.polled = config.rbd is None
        # Marked by every WRITE, WRITE_ZEROES and TRIM (serving/bitmaps.py).
        if config.rbd is not None:
            self.bitmaps = ExportBitmaps(None, backing.size, "dirty bitmaps are for files and block devices")
        elif server.state_dir is None:
            self.bitmaps = ExportBitmaps(None, backing.size)
        else:
            self.bitmaps = ExportBitmaps(directory(server.state_dir, config.name), backing.size)
        try:
            self.load_bitmaps(make_bitmaps)
        except BaseException:
            self.bitmaps.close()
            self.engine.close()
            raise

    def load_bitmaps(self, make: bool = False) -> None:
        """Open the bitmaps kept for the export (``make``: making those configured), close those
        removed; what handshakes offer follows.  BitmapError if one cannot be made or opened."""
        self.bitmaps.load(self.config.dirty_bitmaps if make else ())
        self.bitmaps_changed()

    def bitmaps_changed(self) -> None:
        self.info = replace(self.info, bitmaps=tuple(sorted(self.bitmaps.by_name)))

    @property
    def name(self) -> str:
        return self.config.name

    def set_read_only(self, read_only: bool) -> None:
        """Change what new connections are told; raises ConfigError where the backing cannot follow."""
        if not read_only and self.backing.read_only:
            raise ConfigError(f"export {self.name!r} was opened read-only: making it writable needs a restart")
        self.config.read_only = read_only
        self.info = replace(self.info, flags=_READ_ONLY if read_only else _WRITABLE)

    @property
    def holder(self) -> str:
        """Who holds the backing's lock for this process (an RBD image: its cluster address), for a
        replacement to fence should this process die; "" where nothing is locked."""
        return self.backing.holder if isinstance(self.backing, RbdImage) else ""

    async def fence(self, holder: str) -> None:
        """The process that served this export as ``holder`` died: take the backing's lock from it
        now (an RBD image's clients would otherwise wait until the cluster notices, some 30 s)."""
        if isinstance(self.backing, RbdImage) and holder:
            await asyncio.get_running_loop().run_in_executor(None, self.backing.fence, holder)

    @property
    def _lock(self) -> ExclusiveLock | None:
        """The lock ``--rbd-exclusive`` takes for good; None for any other export."""
        return self.engine.lock if isinstance(self.engine, RbdEngine) else None

    def take_lock(self) -> None:
        """This process serves the export: take its backing's lock for good, if configured so
        (``--rbd-exclusive``), in the background; its I/O waits for it."""
        if self._lock is not None:
            self._lock.take()

    def refuse_if_locked(self) -> None:
        """At a server's first start: RbdError if another holds the lock this export is to take."""
        if self._lock is not None:
            refuse_if_held(self._lock.image)

    def release_lock(self) -> None:
        """A successor serves the export now: let the lock go (blocking, briefly)."""
        if self._lock is not None:
            self._lock.release()

    def snapshot(self) -> ExportSnapshot:
        """Its counters as /metrics shows them (the counters themselves, not copies)."""
        return ExportSnapshot(
            self.info.size,
            self.queue.stats,
            self.queue.in_flight,
            self.budget.used,
            engine=self.engine.name,
            backing=str(self.backing.path),
        )

    async def hold(self) -> None:
        """Hold new requests and wait for those taken to complete (see RequestQueue.hold)."""
        await self.queue.hold()

    def release(self) -> None:
        """Carry out the requests held.  Each write marks the bitmaps again: those it marked when it
        arrived may have been frozen onto a checkpoint meanwhile, and it lands after it."""
        held = self.queue.release()
        if not held:
            return
        self.queue.start_plug()
        try:
            for request in held:
                if self.bitmaps.active:
                    track(self.bitmaps, request)
                self.queue.submit(request)
        finally:
            self.queue.finish_plug()

    # A snapshot's file cloned while serving (cloning.py) ---------------------------------------

    def start_gate(self, count: int, ask: Ask) -> None:
        """From now on (within a hold), writes wait for the clone of the granules they change."""
        self._gate = Gate(count, ask, self.queue.submit)
        self.queue.gate = self._gate.admit

    def gate_progress(self, frontier: int, beyond: list[int]) -> None:
        if self._gate is not None:
            self._gate.cloned(frontier, beyond)

    def open_gate(self) -> None:
        """The clone is over: what waits goes on, and nothing waits from now on."""
        gate, self._gate = self._gate, None
        self.queue.gate = None
        if gate is not None:
            gate.open()
            if gate.waited:
                log.info("export %r: %d writes waited for the clone of a snapshot", self.name, gate.waited)

    async def close(self) -> None:
        """Finish in-flight requests, make written data durable, release the backing."""
        self.open_gate()
        self.release()
        await self.queue.drain()
        if not self.backing.read_only:  # it may have been written before a reload made it read-only
            await self.engine.flush()
        self.engine.close()
        self.bitmaps.close()  # after the flush: marked clean only once the data is written
        log.info("export %r: %s", self.name, self.queue.stats.summary())


def open_image(config: ExportConfig, server: ServerConfig) -> RbdImage:
    """The RBD image an export names (blocking: up to the RBD timeout per step)."""
    assert config.rbd is not None
    return RbdImage(
        config.rbd,
        read_only=config.read_only,
        conf=config.rbd_conf or server.rbd_conf,
        client_id=config.rbd_id or server.rbd_id,
        timeout=server.rbd_timeout,
    )


def _open(
    config: ExportConfig, server: ServerConfig, ledger: Ledger, image: RbdImage | None
) -> tuple[Store, Engine, Account | None]:
    """What the export serves, its engine, and where the writes to it are counted (None: by this
    process alone)."""
    if config.rbd is not None:
        # One process writes an RBD image (config.py: worker_processes): its writes are counted here.
        image = image or open_image(config, server)
        try:
            engine = RbdEngine(image)
        except BaseException:
            image.close()
            raise
        exclusive = config.rbd_exclusive if config.rbd_exclusive is not None else server.rbd_exclusive
        if exclusive and not config.read_only:
            engine.lock = ExclusiveLock(image)
        if server.engine != "auto":
            log.info("export %r: an RBD image: served by librbd, not engine %s", config.name, server.engine)
        return image, engine, None
    backing = Backing(
        config.path, read_only=config.read_only, create_size=config.create_size, direct=config.cache == "direct"
    )
    try:
        written = ledger.account(backing.fd)
        return backing, open_engine(server.engine, backing, server.workers), written
    except BaseException:
        backing.close()
        raise
