"""One client connection: an asyncio ``BufferedProtocol`` around the sans-I/O protocol core.

Bytes arrive in a staging buffer (or, for the rest of a large WRITE payload,
straight into that request's own buffer), are cut into requests with the
protocol core, and handed to the export's request queue.  Replies completed
while one receive is handled (requests done in place), or else in one
event-loop tick, leave together in one ``writelines``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Iterable
from time import monotonic
from typing import TYPE_CHECKING, Any, Protocol

from ..block import Request
from ..config import client_ip
from ..protocol import (
    Aborted,
    Error,
    ExportCatalog,
    Negotiated,
    ProtocolViolation,
    RequestHeader,
    ServerHandshake,
    StartTls,
    TlsMode,
    Transmission,
    error_from_errno,
)
from ..protocol.constants import (
    BASE_ALLOCATION,
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_READ,
    CMD_WRITE,
    FLAG_DF,
    FLAG_REQ_ONE,
    AllocationState,
)
from ..protocol.replies import Buffer
from ..protocol.transmission import encode_request_header
from . import counts
from .bitmaps import status_reply, track
from .gathering import Gathering, clear_mark
from .journal import Replied, Taken, Writer, open_journal
from .staging import DIRECT_RECEIVE_MIN, STAGING_SIZE, Staging
from .tls import peer_subject

if TYPE_CHECKING:
    from ..config import ServerConfig
    from ..stats import ServerStats
    from .export import Export
    from .polling import BusyPoll

log = logging.getLogger(__name__)

TLS_HANDSHAKE_TIMEOUT = 30.0  # seconds
MAX_INFLIGHT_REQUESTS = 4096
# After a WRITE with a payload this large, the next receive takes a header alone, so that the
# payload behind it goes straight into its block: 128 KiB ones, 1.12-1.27x the MiB/s of copying them
# out of the staging buffer; 64 KiB ones, 0.89x (a second receive costs more than the copy saves).
HEADER_ALONE_MIN = 2 * DIRECT_RECEIVE_MIN
LOOPBACK_SEND_BUFFER = 512 * 1024  # SO_SNDBUF for a client on this machine; the kernel doubles it: 1 MiB
_HOLE_FLAGS = AllocationState.HOLE | AllocationState.ZERO


def _tune_tcp(sock: socket.socket, address: str) -> None:
    """No Nagle delay on replies; keepalive probes that find a vanished peer in about two minutes;
    a fixed send buffer for a client on this machine."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if client_ip(address).is_loopback:
        # With the send buffer the kernel grows to its limit (tcp_wmem, 4 MiB), a 1 MiB READ reply
        # leaves in one burst that loopback delivers partly out of order: spurious retransmissions,
        # and 1M reads at two thirds of the speed (fs/bench).  Loopback has no bandwidth-delay
        # product for a large buffer to cover; elsewhere the kernel's own tuning stays.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LOOPBACK_SEND_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class Transport(Protocol):
    """What a connection uses of its transport.  uvloop's transports are not subclasses of
    asyncio's, so it is named by what it does (and compiled code checks nothing more)."""

    def write(self, data: Buffer) -> None: ...
    def writelines(self, data: Iterable[Buffer]) -> None: ...
    def get_write_buffer_size(self) -> int: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class Host(Protocol):
    """What a connection needs of the server that accepted it (``server.Server``): the
    connection knows it through this alone, so that only the server imports the other."""

    config: ServerConfig
    exports: dict[str, Export]
    stats: ServerStats
    busy_poll: BusyPoll
    tls_mode: TlsMode
    tls_context: ssl.SSLContext | None

    def admit(self, connection: Connection) -> bool:
        """Take a new connection, unless the server is full (then it is counted: close it)."""

    def catalog_for(self, address: str | None) -> ExportCatalog:
        """The exports a client at ``address`` (None: a Unix socket) may see."""

    def turn_away(self, connection: Connection, reason: str, why: str) -> None:
        """Count and log a connection closed without a protocol violation."""

    def connection_made(self, connection: Connection, how: str = "connected") -> None: ...

    def connection_lost(self, connection: Connection) -> None: ...

    def journaled(self, connection: Connection) -> None:
        """The connection is in the transmission phase with a journal (``connection.journal``)."""


class Connection(asyncio.BufferedProtocol):
    def __init__(
        self, server: Host, resume: tuple[Negotiated, bytes] | None = None, resend: bytes = b"", tag: int = -1
    ) -> None:
        """``resume``: a connection taken over from a predecessor, with the terms it negotiated there
        and the bytes received there but not taken (see process/handover.py); ``resend``: what of the
        predecessor's replies the client is still to receive, sent first (a crashed predecessor's,
        see journal.py).  ``tag``: what the process that passed the connection here calls it."""
        self.server = server
        self._resume = resume
        self._resend = resend
        self.tag = tag
        self.journal: Writer | None = None  # what a replacement would need, should this process die
        self._crowded = False  # the journal's log is too full to take more requests (as it last said)
        self._journal_taken: Taken | None = None  # its calls per request, looked up once
        self._journal_reply: Replied | None = None
        self._handing_over = False  # taking no new request: the connection is being handed over
        self.handed_over = False  # the successor has it
        self.peer = "?"
        self.export: Export | None = None
        self._transport: Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._staging = Staging()
        self._handshake: ServerHandshake | None = None  # made once the peer is known
        self._timer: asyncio.TimerHandle | None = None  # the handshake's deadline, then the idle check
        self._tx: Transmission | None = None
        # The WRITE whose payload is arriving, and where it goes.
        self._payload_request: Request | None = None
        self._payload: memoryview | None = None
        self._payload_got = 0
        self._direct = False  # the last get_buffer() handed out the payload buffer itself
        self._large_writes = False  # the last request was a WRITE of HEADER_ALONE_MIN or more
        self._gathering: Gathering | None = None  # a deep queue's requests gather before a receive
        self._poll: BusyPoll | None = server.busy_poll  # None: this connection's export is not polled for
        self._taken = 0  # requests taken by the current receive
        # A refused WRITE: its payload is read and dropped, then the error is sent.
        self._discard_left = 0
        self._refused: tuple[RequestHeader, Error, str, int] | None = None  # and its journal slot
        self._out: list[Buffer] = []
        self._flush_scheduled = False
        self._received_at = 0.0  # time.monotonic() of the last bytes received
        self._in_flight = 0
        self._in_flight_bytes = 0
        self._max_in_flight_bytes = server.config.max_inflight_bytes
        self._reply_bytes = 0  # READ data queued in _out, not yet handed to the transport
        # READ blocks handed to the transport, with how many bytes it had been handed up to them:
        # once that many have left (handed minus still buffered), the block is free again.
        self._sent_blocks: deque[tuple[int, memoryview]] = deque()
        self._handed = 0  # bytes given to the transport so far
        self._unsent = 0  # bytes the transport held after the last write to it
        self._unsent_blocks: list[memoryview] = []  # READ blocks of the replies in _out
        self._reading_paused = False  # no new request is taken
        self._transport_paused = False  # no bytes are received
        self._consuming = False
        self._receiving = False  # within buffer_updated(), which flushes what it completes
        self._writing_paused = False
        self._disconnecting = False
        self.closed = asyncio.Event()
        self._tls_task: asyncio.Task[None] | None = None  # the TLS handshake after STARTTLS

    # asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
        self._transport = transport
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) else None
        sock = transport.get_extra_info("socket")
        if sock is not None and address is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            _tune_tcp(sock, address)
        self.peer = f"{address}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        if self._resume is not None:
            negotiated, pending = self._resume
            self._resume = None
            self.server.connection_made(self, "taken over")
            resend, self._resend = self._resend, b""
            try:
                self._start_transmission(negotiated, pending, resend)  # the client is in the middle of those
            except ProtocolViolation as exc:  # in the bytes taken over
                self._violation(exc)
            if self.export is not None and self.export.config.read_only:
                self.refuse_writes()  # made read-only since the client was told otherwise
            return
        if not self.server.admit(self):
            transport.abort()
            return
        catalog = self.server.catalog_for(address)
        refusal = ""
        if not any(True for _ in catalog) and self.server.exports:
            refusal = "no export is open to this client's address"
            self.server.turn_away(self, "not_allowed", refusal)
        self._handshake = ServerHandshake(catalog, self.server.tls_mode, refusal)
        transport.write(self._handshake.data_to_send())
        self._timer = self._loop.call_later(self.server.config.handshake_timeout, self._handshake_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
        if self._gathering is not None:
            self._gathering.close()
        if self._tx is not None:
            self.export.queue.submitters -= 1  # type: ignore[union-attr]
        self._out.clear()
        self._abandon_payload()  # it refers back to us through its callback: free it now
        if self.journal is not None:
            self.journal.close()
            self.journal, self._crowded = None, False
            self._journal_taken = self._journal_reply = None
        self.server.connection_lost(self)
        self.closed.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        payload, staging = self._payload, self._staging
        direct = payload is not None and staging.filled == 0 and len(payload) - self._payload_got >= DIRECT_RECEIVE_MIN
        self._direct = direct
        if self.journal is not None:
            self.journal.receiving(direct)
        if payload is not None and direct:
            return payload[self._payload_got :]
        if payload is None and self._large_writes and self._tx is not None:
            return staging.window(self._tx.header_size)  # the next header alone: its payload goes in place
        return staging.window()

    def buffer_updated(self, nbytes: int) -> None:
        self._received_at = now = monotonic()  # the arrival time of every request this completes
        if self._poll is not None:
            self._poll.arrived(now)
        try:
            if self._direct:
                self._payload_got += nbytes
                if self.journal is not None and self._payload_request is not None:
                    self.journal.received(self._payload_request.slot, self._payload_got)
                if self._payload is not None and self._payload_got == len(self._payload):
                    self._payload_complete()
                return
            full = self._staging.received(nbytes)
            if self._handshake is not None:
                self._consume_handshake()
                return
            self._receiving = True
            self._taken = 0
            try:
                self._consume()
            finally:
                self._receiving = False
            if self._gathering is not None:
                partial = self._payload is not None or self._staging.filled > 0 or self._discard_left > 0
                self._gathering.taken(self._in_flight, nbytes, self._taken, now, partial)
            if self._out:
                self._flush()  # the replies of requests done in place leave now, not a tick later
            self._staging.adapt(full)
        except ProtocolViolation as exc:
            self._violation(exc)
        except Exception:  # a bug must cost this connection only
            log.exception("%s: internal error, disconnecting", self.peer)
            self._hard_disconnect()

    def eof_received(self) -> bool:
        """The client shut down its side: answer what is in flight (it may still read), then close."""
        if self._tx is None:
            return False
        self._abandon_payload()
        self._begin_disconnect()
        return True

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop taking requests from it.
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._give_back_sent()
        self._update_reading()

    # Handshake ---------------------------------------------------------------------

    def _consume_handshake(self) -> None:
        assert self._handshake is not None and self._transport is not None
        handshake = self._handshake
        data = self._staging.take()
        try:
            events = handshake.receive_data(data)
        except ProtocolViolation:
            self._transport.write(handshake.data_to_send())
            raise
        out = handshake.data_to_send()
        negotiated = [event for event in events if isinstance(event, Negotiated)]
        if out and not negotiated:
            self._transport.write(out)
        for event in events:
            if isinstance(event, Aborted):
                self._transport.close()
            elif isinstance(event, StartTls):
                self._tls_task = self._loop.create_task(self._start_tls())
        if negotiated:
            # The end of the handshake leaves as the first reply of the transmission phase: once
            # the client has it, the connection must survive this process (see _send_first).
            self._start_transmission(negotiated[0], handshake.trailing_data, out)

    async def _start_tls(self) -> None:
        """Run the TLS handshake over the connection (STARTTLS's ACK is on its way), then go on
        haggling inside it.  A failed handshake closes this connection only."""
        transport, handshake = self._transport, self._handshake
        assert transport is not None and handshake is not None and self.server.tls_context is not None
        try:
            tls_transport = await self._loop.start_tls(
                transport,  # type: ignore[arg-type]
                self,
                self.server.tls_context,
                server_side=True,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.warning("%s: TLS handshake failed: %s", self.peer, exc)
            self.server.stats.protocol_errors["tls_handshake"] += 1
            transport.abort()
            return
        if tls_transport is None or self._transport is None:
            return  # the client left meanwhile
        self._transport = tls_transport  # type: ignore[assignment]  # it has all a Transport has
        subject = peer_subject(tls_transport.get_extra_info("ssl_object"))
        log.info("%s: TLS on%s", self.peer, f", client {subject!r}" if subject else "")
        handshake.tls_started()

    def _handshake_expired(self) -> None:
        self._timer = None
        if self._handshake is not None and self._transport is not None:
            timeout = self.server.config.handshake_timeout
            self.server.turn_away(self, "handshake_timeout", f"no export chosen within {timeout:g} s")
            self._transport.abort()

    def _check_idle(self) -> None:
        """Close the connection once it has had nothing in flight and sent nothing for the idle timeout."""
        self._timer = None
        if self._transport is None or self._disconnecting:
            return
        timeout = self.server.config.idle_timeout
        quiet = monotonic() - self._received_at
        if self._in_flight or quiet < timeout:
            self._timer = self._loop.call_later(max(timeout - quiet, 1.0), self._check_idle)
            return
        self.server.turn_away(self, "idle_timeout", f"no request for {quiet:.0f} s")
        self._begin_disconnect()

    def _start_transmission(self, negotiated: Negotiated, trailing: bytes, first: bytes = b"") -> None:
        """``trailing``: bytes received behind the handshake (or, taken over, not taken yet);
        ``first``: bytes to send before any reply (see _send_first)."""
        self._handshake = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.server.config.idle_timeout:
            self._timer = self._loop.call_later(self.server.config.idle_timeout, self._check_idle)
        export = self.server.exports.get(negotiated.export.name)
        if export is None:  # removed through the control socket while this client haggled
            log.info("%s: export %r was removed: disconnecting", self.peer, negotiated.export.name)
            self._hard_disconnect()
            return
        self._tx = Transmission(negotiated)
        self.export = export
        self.export.queue.submitters += 1
        if not export.polled:
            self._poll = None
        # Room for what came behind the handshake (or, taken over, every byte not yet taken).
        self._staging = self._open_journal(trailing) or Staging(STAGING_SIZE, trailing)
        log.info("%s: export %r, %s", self.peer, self.export.name, self._tx.form)
        sock = self._transport.get_extra_info("socket") if self._transport is not None else None
        if self._tls_task is None and sock is not None and counts.is_tcp(sock):
            if self.server.config.gather:
                self._gathering = Gathering(sock, self._loop, self.server.stats)
            else:
                clear_mark(sock)  # a crashed predecessor that gathered may have left one
        if self.journal is not None:
            self.server.journaled(self)
        if first:
            self._send_first(first)
        self._consume()

    def _send_first(self, data: bytes) -> None:
        """Send what the client must receive before any reply: the end of the handshake, or the
        replies a dead predecessor had not written.  Journaled, they go as a reply from the arena,
        so that a crash before the kernel has them all sends the rest again."""
        transport, export = self._transport, self.export
        if self.journal is None or export is None:
            if transport is not None:
                transport.write(data)
            return
        block = export.pool.take(len(data))
        view = block[: len(data)]
        view[:] = data
        self._unsent_blocks.append(block)  # given back once sent
        self._send([view])

    def _open_journal(self, staged: bytes) -> Staging | None:
        """Journal this connection, where the server's memory outlives this process and the kernel
        counts the connection's bytes (TCP; not TLS, whose keys die with the process)."""
        transport, export = self._transport, self.export
        sock = transport.get_extra_info("socket") if transport is not None else None
        if self.tag < 0 or export is None or export.pool.arena is None or self._tls_task is not None:
            return None
        if not counts.is_tcp(sock):
            return None
        assert transport is not None and sock is not None
        read, written = counts.bytes_read(sock), counts.bytes_written(sock)
        assert read is not None and written is not None
        out_base = written + transport.get_write_buffer_size()
        journal = open_journal(export.pool, self.tag, read - len(staged), out_base, len(staged))
        self.journal = journal
        self._journal_taken, self._journal_reply = journal.taken, journal.reply
        return Staging(STAGING_SIZE, staged, journal.halves, journal)

    # Transmission: requests in --------------------------------------------------------

    def _consume(self) -> None:
        """Cut the staged bytes into requests and payloads; keep what is not taken yet.

        While reading is paused, no new request is taken: bytes already received
        wait in the staging buffer until the pause ends.
        """
        self._consuming = True
        queue = self.export.queue  # type: ignore[union-attr]
        queue.start_plug()  # the requests of one receive merge with each other at once
        try:
            self._consume_staged()
        finally:
            self._consuming = False
            queue.finish_plug()

    def _consume_staged(self) -> None:
        staging = self._staging
        view, end, pos = staging.view, staging.filled, 0
        budget = self.export.budget  # type: ignore[union-attr]
        tx = self._tx
        assert tx is not None
        header_size = tx.header_size
        journal = self.journal
        while pos < end and not self._disconnecting:
            if self._payload is not None:
                n = min(end - pos, len(self._payload) - self._payload_got)
                staging.copy_out(self._payload, self._payload_got, pos, n)
                self._payload_got += n
                pos += n
                if journal is not None:
                    journal.consumed(pos)
                if self._payload_got == len(self._payload):
                    self._payload_complete()
            elif self._discard_left:
                n = min(end - pos, self._discard_left)
                self._discard_left -= n
                pos += n
                if journal is not None:
                    journal.consumed(pos)
                if not self._discard_left:
                    self._refuse_now()
            elif self._reading_paused or budget.exhausted:
                self._update_reading()  # pause (if not yet) until the export's budget frees
                break
            elif end - pos >= header_size:
                header = tx.parse_header(view, pos)
                taken = header_size + tx.filter_length(header)
                if end - pos < taken:
                    break  # a block status filter comes with its header: wait for the rest
                if taken > header_size:
                    tx.take_filter(header, view, pos + header_size)
                pos += self._on_header(header, pos, taken, end)
            else:
                break
        staging.keep(end if self._disconnecting else pos)

    def _on_header(self, header: RequestHeader, at: int, taken: int, end: int) -> int:
        """A request header (``taken`` bytes with its filter, at ``at`` of the staging buffer, which
        holds ``end`` bytes).  Returns the bytes consumed: the header's, and its payload's if the
        staging buffer held all of it (the common small WRITE, taken in one step)."""
        tx, journal = self._tx, self.journal
        assert tx is not None
        payload = tx.payload_length(header)
        if header.command == CMD_DISC:
            if journal is not None:
                journal.consumed(at + taken)
                journal.disconnecting()
            self._begin_disconnect()
            return taken
        error, message = tx.check(header)
        if error:
            slot = journal.taken(self._staging.view, at, taken, payload, None, 0) if journal is not None else -1
            self._refused = (header, error, message, slot)
            self._discard_left = payload
            if not payload:
                self._refuse_now()
            return taken
        sparse = header.command == CMD_READ and tx.structured_replies and not header.flags & FLAG_DF
        request = Request(
            header.command, header.flags, header.cookie, header.offset, header.length, self._request_done, sparse=sparse
        )
        self._in_flight += 1
        self._taken += 1
        if header.command in (CMD_READ, CMD_WRITE):
            self._charge(header.length)
        if self._over_limits(fresh=False):
            self._update_reading()
        self._large_writes = payload >= HEADER_ALONE_MIN
        copied = 0
        if payload:
            assert self.export is not None
            request.block = self.export.pool.take(payload)
            request.buffer = request.block[:payload]
            start = at + taken
            if end - start >= payload:  # all staged: copied now, and taken with the header
                self._staging.copy_out(request.buffer, 0, start, payload)
                copied = payload
            else:
                self._payload_request, self._payload, self._payload_got = request, request.buffer, 0
        elif header.command == CMD_WRITE:
            request.buffer = bytearray()
        if header.contexts is not None:
            request.contexts = header.contexts
        journal_taken = self._journal_taken
        if journal_taken is not None:
            request.slot = journal_taken(self._staging.view, at, taken, payload, request.block, copied)
        if payload == copied:
            self._submit(request)
        return taken + copied

    def _payload_complete(self) -> None:
        request = self._payload_request
        assert request is not None
        self._payload_request, self._payload, self._payload_got, self._direct = None, None, 0, False
        self._submit(request)
        if self._reading_paused:
            self._pause_transport()  # held off while the payload arrived

    def _submit(self, request: Request) -> None:
        export = self.export
        assert export is not None
        request.arrival = self._received_at
        if export.bitmaps.active and not export.queue.holding:  # else marked as it is released
            track(export.bitmaps, request)  # before the request can be answered
        export.queue.submit(request)

    def _refuse_now(self) -> None:
        assert self._refused is not None and self._tx is not None
        header, error, message, slot = self._refused
        self._refused = None
        log.debug("%s: refused %s: %s", self.peer, header, message)
        self.server.stats.refused[self.export.name, error.name] += 1  # type: ignore[union-attr]
        self._send(self._tx.replies.error(header.cookie, header.offset, error, message), slot=slot)

    # Transmission: replies out ---------------------------------------------------------

    def _request_done(self, request: Request) -> None:
        self._in_flight -= 1
        if request.command in (CMD_READ, CMD_WRITE):
            self._uncharge(request.length)
        block, request.block = request.block, None
        sending = self._transport is not None and request.command == CMD_READ and not request.errno
        if sending and request.extents and all(hole for _, hole in request.extents):
            sending = False  # hole chunks only: the reply holds nothing of the block
        if block is not None:
            if sending:
                self._unsent_blocks.append(block)  # given back once the transport has sent its reply
            else:
                self.export.pool.give(block)  # type: ignore[union-attr]
        if self._transport is None:
            return  # the client is gone; the I/O itself was still carried out
        # (Given back above and taken again only after this, a WRITE's block is still whole for the
        # journal until its reply is logged.)
        self._send(self._encode_reply(request), request.length if sending else 0, request, block)  # resumes reading
        if self._disconnecting and not self._in_flight:
            self._close_after_flush()

    def _encode_reply(self, request: Request) -> list[Buffer]:
        tx = self._tx
        assert tx is not None
        replies = tx.replies
        if request.errno:
            return replies.error(request.cookie, request.offset, error_from_errno(request.errno), request.message)
        if request.command == CMD_READ:
            data = request.buffer if request.buffer is not None else b""
            return replies.read(request.cookie, request.offset, data, request.extents)
        if request.command == CMD_BLOCK_STATUS:
            extents = request.extents or [(request.length, False)]
            if request.flags & FLAG_REQ_ONE:
                extents = extents[:1]
            contexts = tx.meta_contexts
            if len(contexts) == 1 and contexts.get(1) == BASE_ALLOCATION:  # a filter can name no other
                return replies.block_status(request.cookie, request.offset, 1, extents, _HOLE_FLAGS)
            return status_reply(replies, request, tx.meta_contexts, extents, self.export.bitmaps)  # type: ignore[union-attr]
        return replies.ok(request.cookie, request.offset)

    def _send(
        self,
        buffers: list[Buffer],
        data_bytes: int = 0,
        request: Request | None = None,
        block: memoryview | None = None,
        slot: int = -1,
    ) -> None:
        """Queue a reply (to ``request`` with its ``block``, or to the request in journal ``slot``)."""
        journal_reply = self._journal_reply
        if journal_reply is not None:
            if request is not None:
                self._crowded = journal_reply(request.slot, buffers, request.buffer, block)
            else:
                self._crowded = journal_reply(slot, buffers, None, None)
        self._out.extend(buffers)
        self._reply_bytes += data_bytes
        if not self._flush_scheduled and not self._receiving:  # buffer_updated() flushes after receiving
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send the replies of this tick, then see whether reading may resume."""
        self._flush_scheduled = False
        self._write_out()
        self._update_reading()

    def _write_out(self) -> None:
        transport = self._transport
        if self._out and transport is not None:
            transport.writelines(self._out)
            if not self._gather() and self._poll is not None:
                self._poll.replied()
            for buffer in self._out:  # (not sum(map(...)): compiled, a loop is ~90 ns cheaper)
                self._handed += len(buffer)
            for block in self._unsent_blocks:
                self._sent_blocks.append((self._handed, block))
            self._unsent = unsent = transport.get_write_buffer_size()
            self._give_back_sent(unsent)
            self._journal_written(unsent)  # its log keeps what the kernel lacks: small, and in the cache
        self._out = []
        self._unsent_blocks = []
        self._reply_bytes = 0  # now counted in the transport's write buffer

    def _gather(self) -> bool:
        """Whether the client's next requests gather in the socket before a receive (gathering.py):
        then no quick answer to these replies is due, and polling for one would be wasted."""
        gathering = self._gathering
        if gathering is None or self._in_flight or self._payload is not None or self._handing_over:
            return False
        return gathering.idle()

    def _give_back_sent(self, unsent: int = -1) -> None:
        """Return to the pool the READ blocks whose replies have left the transport (which holds
        ``unsent`` bytes; -1: ask it)."""
        if not self._sent_blocks or self._transport is None:
            return
        left = self._handed - (unsent if unsent >= 0 else self._transport.get_write_buffer_size())
        give, sent = self.export.pool.give, self._sent_blocks  # type: ignore[union-attr]
        while sent and sent[0][0] <= left:
            give(sent.popleft()[1])

    # Flow control and shutdown ---------------------------------------------------------

    def _over_limits(self, fresh: bool = True) -> bool:
        """Too much in flight or unsent on this connection (the export's budget is asked apart).
        Not ``fresh``: the transport's unsent bytes as they were after the last write to it, no
        fewer than now (they only drain until the next): a request taken is checked for the price of
        a few loads, and a pause it calls for is checked again afresh."""
        transport = self._transport
        held = self._in_flight_bytes + self._reply_bytes
        if transport is not None:
            held += transport.get_write_buffer_size() if fresh else self._unsent
        return held > self._max_in_flight_bytes or self._in_flight >= MAX_INFLIGHT_REQUESTS or self._journal_crowded()

    def _journal_crowded(self) -> bool:
        """The journal's log of replies not yet known to be written is full enough to stop taking
        requests (a client that reads no replies)."""
        if self._crowded and not self._out:
            self._journal_written()
        return self._crowded

    def _journal_written(self, unsent: int = -1) -> None:
        """Tell the journal how much of the replies handed to the transport (which holds ``unsent``
        bytes; -1: ask it) the kernel has."""
        journal, transport = self.journal, self._transport
        if journal is not None and transport is not None:
            if unsent < 0:
                unsent = transport.get_write_buffer_size()
            self._crowded = journal.written(journal.out - unsent)

    def _update_reading(self) -> None:
        """Pause reading while too much is in flight or unsent; on resuming, first take what is staged."""
        transport = self._transport
        if transport is None or self._disconnecting:
            return
        pause = self._writing_paused or self._handing_over or self._over_limits()
        budget = self.export.budget if self.export is not None else None
        if budget is not None and budget.exhausted:
            pause = True
            budget.wait(self._update_reading)  # the export's other connections hold it
        if pause:
            self._reading_paused = True
            self._pause_transport()
            return
        if not self._reading_paused:
            return
        self._reading_paused = False
        if self._staging.filled and self._tx is not None and not self._consuming:
            try:
                self._consume()
            except ProtocolViolation as exc:
                self._violation(exc)
                return
            if self._reading_paused or self._transport is None:
                return  # paused again by what was staged
        if self._transport_paused:
            self._transport_paused = False
            transport.resume_reading()

    def _pause_transport(self) -> None:
        """Stop receiving, except the rest of a WRITE payload: its buffer exists already, and
        holding it back could leave connections each waiting for another's payload to finish."""
        if not self._transport_paused and self._payload is None and self._transport is not None:
            self._transport.pause_reading()
            self._transport_paused = True

    def _begin_disconnect(self) -> None:
        """Stop reading; close once every request in flight has been answered."""
        if self._disconnecting or self._transport is None:
            return
        self._disconnecting = True
        self._reading_paused = True
        self._pause_transport()
        if not self._in_flight:
            self._close_after_flush()

    def _close_after_flush(self) -> None:
        self._write_out()
        if self._transport is not None:
            self._transport.close()

    def _violation(self, exc: ProtocolViolation) -> None:
        log.warning("%s: protocol violation, disconnecting: %s", self.peer, exc)
        self.server.stats.protocol_errors[exc.kind] += 1
        self._hard_disconnect()

    def _hard_disconnect(self) -> None:
        self._disconnecting = True
        self._close_after_flush()

    # Handover (the protocol is in handover.py) ------------------------------------------

    @property
    def negotiated(self) -> Negotiated | None:
        """The terms of the transmission phase; None before it, or over TLS (which cannot be handed over)."""
        if self._tx is None or self._disconnecting or self._transport is None or self._tls_task is not None:
            return None
        return self._tx.negotiated

    @property
    def in_flight(self) -> int:
        """Requests taken and not yet answered (the control socket's status shows them)."""
        return self._in_flight

    @property
    def transport_socket(self) -> socket.socket | None:
        return self._transport.get_extra_info("socket") if self._transport is not None else None

    def quiesce(self) -> None:
        """Take no new request (nor the rest of a WRITE payload); those taken are answered."""
        self._handing_over = True
        if self._gathering is not None:
            self._gathering.stop()  # the successor reads this socket as its requests come
        if self._transport is not None and not self._transport_paused:
            self._transport.pause_reading()
            self._transport_paused = True

    def quiet(self) -> bool:
        """Quiesced, nothing in flight but a WRITE whose payload is partly here, every reply sent out."""
        transport = self._transport
        taken = self._in_flight - (self._payload_request is not None)
        return (
            transport is not None
            and not taken
            and not self._out
            and not self._discard_left
            and self._refused is None
            and transport.get_write_buffer_size() == 0
        )

    def pending(self) -> bytes:
        """The bytes received and not taken, as the client sent them: a WRITE whose payload is partly
        here goes back to its header."""
        parts = []
        request = self._payload_request
        if request is not None and self._payload is not None:
            extended = self._tx is not None and self._tx.extended
            header = (request.flags, request.command, request.cookie, request.offset, request.length)
            parts.append(encode_request_header(*header, extended))
            parts.append(bytes(self._payload[: self._payload_got]))
        parts.append(self._staging.unconsumed())
        return b"".join(parts)

    def resume(self) -> None:
        """The handover failed: take requests again."""
        self._handing_over = False
        self._update_reading()

    def let_go(self) -> None:
        """The successor has this connection: close our descriptor without a word to the client
        (the socket lives on in the successor, so the client sees no end)."""
        self._abandon_payload()
        self.handed_over = True
        self._disconnecting = True
        if self._transport is not None:
            self._transport.abort()

    def refuse_writes(self) -> None:
        """The export became read-only: writes from now on get EPERM (those in flight complete)."""
        if self._tx is not None:
            self._tx.refuse_writes()

    def shutdown(self) -> None:
        """Server shutdown: answer what is in flight, then close."""
        if self._handshake is not None:
            self._hard_disconnect()
            return
        self._abandon_payload()
        self._begin_disconnect()

    def _abandon_payload(self) -> None:
        """Drop a WRITE whose payload will not arrive now; it was never acknowledged."""
        request = self._payload_request
        if request is not None:
            self._payload_request, self._payload, self._payload_got, self._direct = None, None, 0, False
            self._in_flight -= 1
            self._uncharge(request.length)

    def _charge(self, nbytes: int) -> None:
        """Count READ/WRITE bytes in flight, against this connection's limit and the export's."""
        self._in_flight_bytes += nbytes
        self.export.budget.charge(nbytes)  # type: ignore[union-attr]

    def _uncharge(self, nbytes: int) -> None:
        self._in_flight_bytes -= nbytes
        self.export.budget.release(nbytes)  # type: ignore[union-attr]
