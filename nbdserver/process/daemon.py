"""The server's life as a process: start, notify, watch, reload, stop.

``run`` opens the exports, listens (on inherited sockets under socket
activation), tells the service manager it is ready, pings its watchdog from
the event loop, reloads on SIGHUP and shuts down cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from time import monotonic

from .. import build
from ..backing.librbd import RbdError
from ..config import CONTROL_FD_NAME, ConfigError, ServerConfig
from ..control.commands import Context
from ..control.listener import ControlServer
from ..control.state import Changes
from ..serving.server import Server, remove_socket
from . import fdstore, handover, keeper, pidfile
from .systemd import Notifier, inherited_fds, listening_sockets, set_log_level
from .workers import WorkerError, WorkerPool, pool_of

log = logging.getLogger("nbdserver")


async def run(
    config: ServerConfig, reread: Callable[[], ServerConfig] | None = None, changes: Changes | None = None
) -> int:
    """Serve until SIGTERM or SIGINT; 0 after a clean shutdown, 1 if the server cannot start (2 if
    the configuration cannot work: an RBD image that cannot be opened, say).

    ``reread`` gives the configuration anew (file and command line) for SIGHUP; ``changes``: the
    exports added and removed through the control socket, applied to both already.
    """
    log.info("%s", build.describe())
    _raise_descriptor_limit()
    channel = handover.inherited_channel()  # started by a predecessor to take over from it
    # The service manager's variables, for a successor (the notifier takes them out of the environment).
    successor_env = {k: os.environ[k] for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC") if k in os.environ}
    notifier = Notifier()
    try:
        count = config.worker_processes
        server = Server(config, workers=WorkerPool(config, count) if count else None)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    if count < config.asked_processes:
        log.info(
            "an RBD image is exported: one worker process serves every connection (not %d), "
            "so that one process alone writes the image",
            config.asked_processes,
        )
    pool = pool_of(server)
    if pool is not None and fdstore.capacity() and notifier.enabled:
        pool.keeper = keeper.Keeper(notifier)  # a crash of this process costs the clients a pause
    # Handlers first: a signal that arrives while starting (or right after "ready:") is not lost.
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _Reload(server, notifier, reread).start)
    control = None
    if config.control is not None:
        control = ControlServer(config.control, Context(server, changes or Changes(), config.state_dir))
    upgrade = _Upgrade(server, notifier, successor_env, stop, pool.keeper if pool is not None else None, control)
    loop.add_signal_handler(signal.SIGUSR2, upgrade.start)
    try:
        stored, named = fdstore.split(inherited_fds())
        kept, stored = keeper.split(stored)
        sockets = listening_sockets(named)
        server.open_exports()
        if not server.exports:
            log.warning("no exports yet: add them to the configuration file, or with nbdserver ctl export add")
        if channel is None and not stored and not kept:  # a first start, not a continuation
            for export in server.exports.values():
                export.refuse_if_locked()
    except OSError as exc:
        log.error("cannot open export: %s", exc)
        return 2 if isinstance(exc, RbdError) else 1  # 2: as for a configuration that cannot work
    try:
        await server.start_workers()
    except WorkerError as exc:
        log.error("%s", exc)
        await server.shutdown()
        return 1
    if control is not None and channel is None:  # (a successor takes its predecessor's)
        try:
            control.bind()
        except OSError as exc:  # as for an address in use
            log.error("cannot listen on the control socket: %s", exc)
            _close_kept(kept)
            fdstore.forget(notifier, [*stored, *kept])
            await server.shutdown()
            return 1
    try:
        inherited = await _inheritance(channel, stored)
        if inherited is None:
            await server.start(sockets)
        else:
            await _resume(server, sockets, inherited)
    except (OSError, handover.HandoverError) as exc:
        log.error("cannot %s: %s", "take over" if channel is not None else "listen", exc)
        _close_kept(kept)  # (a restart's state, if any, is closed by the store: see fdstore.py)
        if control is not None:
            await control.close()
        await server.shutdown()
        return 1
    finally:
        fdstore.forget(notifier, [*stored, *kept])  # ours now: taken over, or closed
    if control is not None and channel is not None:
        try:
            _control_socket(control, inherited)
        except OSError as exc:
            log.error("no control socket: %s", exc)  # the clients taken over are served on
            control = upgrade.control = None
    if kept and inherited is not None:  # copies of what a restart's state holds: served from it
        for _, fd in kept:
            os.close(fd)
    elif kept and pool is not None:
        _recover_kept(pool, kept)
    elif kept:
        log.warning("the previous process died: the connections it kept are closed (no worker processes here)")
        _close_kept(kept)
    if pool is None:  # this process serves: the locks of --rbd-exclusive are taken now
        for export in server.exports.values():
            export.take_lock()
    if control is not None:
        await control.serve()
    elif inherited is not None and CONTROL_FD_NAME in inherited.extras:
        _drop_control_socket(inherited.extras[CONTROL_FD_NAME])
    upgrade.serving()
    server.on_change = lambda: notifier.notify(f"STATUS={server.status()}")
    notifier.notify("READY=1", f"STATUS={server.status()}")
    if config.pid_file is not None:
        pidfile.write(config.pid_file)
    watchdog = _Watchdog(loop, notifier) if notifier.watchdog_interval else None
    await stop.wait()
    log.info("shutting down")
    await upgrade.settle()  # an upgrade under way ends first: handed over, or taken back
    if not upgrade.done and fdstore.capacity() and notifier.enabled:
        if pool is not None and pool.keeper is not None:
            # The store keeps a descriptor once: our copies kept for a crash go first (they would
            # hold the sockets the restart's state names), and nothing is kept for a crash again.
            pool.keeper.drop_all()
        await fdstore.store(server, notifier, listeners=not sockets)  # for a restart; a stop closes them
    notifier.notify("STOPPING=1", "STATUS=finishing requests in flight")
    if control is not None:
        await control.close()  # the commands under way first: they may be changing exports
    await server.shutdown()
    if watchdog is not None:
        watchdog.cancel()
    if config.pid_file is not None and not upgrade.done:  # (the successor's, if it was handed over)
        pidfile.remove(config.pid_file)
    notifier.close()
    return 0


def _control_socket(control: ControlServer, inherited: handover.Inheritance | None) -> None:
    """The predecessor's control socket (an upgrade: its file never went away), else a new one
    (OSError if another server listens there).  One at another path than ours is let go."""
    handed = inherited.extras.pop(CONTROL_FD_NAME, None) if inherited is not None else None
    if handed is not None and handed[0] == str(control.path):
        control.adopt(*handed)
        return
    if handed is not None:
        _drop_control_socket(handed)
    control.bind()


def _drop_control_socket(handed: tuple[str, socket.socket]) -> None:
    """A predecessor's control socket we do not take (no --control here, or another path)."""
    path, sock = handed
    sock.close()
    remove_socket(path)
    log.info("control socket %s closed: not configured here", path)


def _recover_kept(pool: WorkerPool, kept: list[tuple[str, int]]) -> None:
    """The connections a dead predecessor kept in the store, to the workers (keeper.py)."""
    arenas = keeper.inherit(kept)
    connections = sum(len(arena.connections) for arena in arenas)
    log.warning("the previous process died: taking over %d connection(s) it kept in the fd store", connections)
    pool.recover_kept(arenas, _started())


def _close_kept(kept: list[tuple[str, int]]) -> None:
    for name, fd in kept:
        if name.startswith(keeper.CONNECTION):
            keeper.close(socket.socket(fileno=fd))
        else:
            os.close(fd)


def _started() -> float:
    """When this process started, on time.monotonic()'s clock (the recovery pause counts from it)."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # starttime: clock ticks after boot
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return monotonic() - max(0.0, age)


def _raise_descriptor_limit() -> None:
    """The soft limit on open files up to the hard one: the primary holds a copy of every
    connection its workers serve (so that a worker's crash costs them a pause), beside its own
    descriptors, and a shell's soft limit of 1024 would cap the connections below max_connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20  # the kernel's nr_open, by default
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, exc)


class _Watchdog:
    """WATCHDOG=1 every half timeout, from the event loop: a stuck loop stops the pings."""

    def __init__(self, loop: asyncio.AbstractEventLoop, notifier: Notifier) -> None:
        self._loop, self._notifier = loop, notifier
        assert notifier.watchdog_interval is not None
        self._interval = notifier.watchdog_interval
        self._handle = loop.call_soon(self._ping)

    def _ping(self) -> None:
        self._notifier.notify("WATCHDOG=1")
        self._handle = self._loop.call_later(self._interval, self._ping)

    def cancel(self) -> None:
        self._handle.cancel()


async def _inheritance(channel: socket.socket | None, stored: list[tuple[str, int]]) -> handover.Inheritance | None:
    """What a predecessor left us: handed over on SIGUSR2, or kept in the fd store across a restart."""
    if channel is not None:
        return await handover.take_over(channel)  # fails the start: the predecessor serves on
    if not stored:
        return None
    try:
        return fdstore.unpack(stored)
    except handover.HandoverError as exc:  # the predecessor is gone: its connections end, we start afresh
        log.error("%s: those connections are closed", exc)
        return None


async def _resume(server: Server, sockets: list[tuple[str, socket.socket]], inherited: handover.Inheritance) -> None:
    """Start as a successor: the sockets, then the connections."""
    await server.start([*sockets, *inherited.listeners], inherited.owned_paths)
    resumed = await handover.resume(server, inherited)
    server.stats.handover_pause = monotonic() - inherited.quiesced_at
    log.info("took over %d connection(s); requests waited %.3f s", resumed, server.stats.handover_pause)


class _Upgrade:
    """SIGUSR2: hand everything to a successor started from our command line, then exit."""

    def __init__(
        self,
        server: Server,
        notifier: Notifier,
        env: dict[str, str],
        stop: asyncio.Event,
        kept: keeper.Keeper | None,
        control: ControlServer | None,
    ) -> None:
        self._server, self._notifier, self._env, self._stop = server, notifier, env, stop
        self._kept = kept
        self.control = control
        self._task: asyncio.Task[None] | None = None
        self._serving = False
        self._asked = False  # SIGUSR2 came while starting: upgrade once serving
        self.done = False  # the successor has everything: exit without storing anything

    def start(self) -> None:
        if not self._serving:
            log.info("SIGUSR2 while starting: upgrading once serving")
            self._asked = True
            return
        if self._task is not None and not self._task.done():
            log.warning("SIGUSR2: an upgrade is under way already")
            return
        if self._stop.is_set():  # a stop came first: no successor is started into it
            log.warning("SIGUSR2 while stopping: no upgrade")
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def settle(self) -> None:
        if self._task is not None:
            await self._task

    def _before_go(self, pid: int) -> None:
        """The successor has everything: what the store keeps for our crash is let go while we are
        the main process (only it may change the store), and the service manager told who is now."""
        if self._kept is not None:
            self._kept.drop_all()
        self._notifier.notify(f"MAINPID={pid}")
        if self._server.config.pid_file is not None:
            pidfile.write(self._server.config.pid_file, pid)

    def serving(self) -> None:
        self._serving = True
        if self._asked:
            self.start()

    async def _run(self) -> None:
        log.info("SIGUSR2: upgrading: starting the successor")
        self._notifier.notify("STATUS=upgrading: starting the successor")
        control = self.control
        # No export changes through the control socket meanwhile: the successor starts with those
        # made so far (in its environment), and takes the control socket.
        async with control.changing if control is not None else contextlib.nullcontext():
            env = {**self._env, **(control.successor_env() if control is not None else {})}
            extras = [control] if control is not None else []
            handed = await handover.hand_over(self._server, env, self._before_go, extras)
        if handed:
            self.done = True
            self._stop.set()
        else:
            self._notifier.notify(f"STATUS={self._server.status()}")


class _Reload:
    """SIGHUP: apply what can change while serving; log what could not.  One at a time: a SIGHUP
    during a reload (an RBD image may take the cluster's timeout to open) reloads again after it."""

    def __init__(self, server: Server, notifier: Notifier, reread: Callable[[], ServerConfig] | None) -> None:
        self._server, self._notifier, self._reread = server, notifier, reread
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        task = asyncio.get_running_loop().create_task(self._run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        async with self._lock:
            await _reload(self._server, self._notifier, self._reread)


async def _reload(server: Server, notifier: Notifier, reread: Callable[[], ServerConfig] | None) -> None:
    if reread is None:
        log.warning("SIGHUP: nothing to reload (no --config file)")
        return
    notifier.notify("RELOADING=1")
    log.info("SIGHUP: reloading the configuration")
    try:
        new = reread()
        set_log_level(new.log_level)
        changed, refused = await server.reload(new)
    except ConfigError as exc:
        log.error("reload failed, configuration unchanged: %s", exc)
    else:
        log.info("reloaded: %s", "; ".join(["log level " + new.log_level, *changed]))
        for message in refused:
            log.warning("not reloaded: %s", message)
    notifier.notify("READY=1", f"STATUS={server.status()}")
