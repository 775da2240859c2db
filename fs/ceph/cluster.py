#!/usr/bin/env python3
"""A throwaway Ceph cluster on this machine: one monitor, one OSD, a pool ``rbd``.

For tests of RBD exports against a real cluster, and for people trying them by hand.  Everything
lives in one directory: the configuration, the keyrings, the monitor's store, the OSD's data (a
sparse file holding a BlueStore, or memory with ``objectstore="memstore"``) and the daemons' logs.
The daemons listen on 127.0.0.1 only (messenger v2, one port for the monitor, picked free), use
cephx with a ``client.admin`` keyring as a real cluster does, and run as children of this process,
which stops them by PID.  No manager daemon: a monitor and an OSD are all that pools, ``rbd``
and librbd's I/O need (the manager serves statistics, ``ceph df``, ``ceph pg ...`` and the
dashboard, none of which the tests use).

    fs/ceph/cluster.py up /tmp/ceph        # start; print the conf path; Ctrl-C stops and removes

    with Cluster(Path("/tmp/ceph")) as cluster:
        cluster.create_image("disk", 1 << 30)
        subprocess.run(["rbd", "-c", str(cluster.conf_path), "info", "rbd/disk"], check=True)

The programs are Debian's ceph-mon, ceph-osd and ceph-common (tests/bootstrap installs them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

GiB = 1024**3
MON_ID = "a"
POOL = "rbd"
# Binaries the cluster is made with; a test skips when one is missing.
REQUIRED_PROGRAMS = ("ceph-mon", "ceph-osd", "monmaptool", "ceph-authtool", "ceph", "rbd", "setpriv")


class ClusterError(RuntimeError):
    """A step of starting the cluster failed; the message carries the daemons' last log lines."""


def missing_programs() -> list[str]:
    return [name for name in REQUIRED_PROGRAMS if shutil.which(name) is None]


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (the monitor binds it a moment later; a
    race lost to another process shows as the monitor exiting after its bind retries, about
    10 s, and start() tries another port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, condition: Callable[[], bool], timeout: float, interval: float = 0.25) -> None:
    """Poll until ``condition()`` holds: on a loaded 2-CPU machine the daemons' steps take from
    a fraction of a second to tens of seconds, so no fixed sleep fits both."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def config_text(
    directory: Path, fsid: str, mon_port: int, objectstore: str, osd_size: int, extra: dict[str, str]
) -> str:
    """ceph.conf for a one-monitor, one-OSD cluster on loopback whose files all stay in
    ``directory`` (nothing under /etc/ceph, /var/lib/ceph, /var/log/ceph or /run/ceph)."""
    d = directory
    return f"""\
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
# Every daemon binds its messenger and heartbeat sockets to these, never to another address.
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv4 = true
ms bind ipv6 = false
# Messenger v2 only: librbd, the rbd tool and the Python bindings speak it; v1 would add a port.
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
# Without it a fresh Pacific cluster warns (AUTH_INSECURE_GLOBAL_ID_RECLAIM_ALLOWED).
auth allow insecure global id reclaim = false
keyring = {d}/client.admin.keyring
run dir = {d}
crash dir = {d}/crash
mon cluster log file = {d}/cluster.log
# One OSD: a replica count above 1 would leave every placement group undersized.  Pacific
# refuses size 1 unless the monitor allows it, and warns about it unless told not to.
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd pool default pg num = 8
osd pool default pgp num = 8
# The autoscaler is a manager module, and there is no manager.
osd pool default pg autoscale mode = off
# One host: replicas go to OSDs, not hosts (matters only if a test raises the size).
osd crush chooseleaf type = 0
# The host's disk is shared with everything else: its free share says nothing about the cluster.
mon data avail warn = 1
mon data avail crit = 0
# No manager is started on purpose; don't turn that into a health warning after two minutes.
mon mgr mkfs grace = 31536000
# Each change of the OSD map (OSD boot, pool created, application set, ...) waits this long
# before the monitor proposes it: at the default 1 s, about ten of them made start take 12 s.
paxos propose interval = 0.1

[mon]
mon data = {d}/mon.$id
keyring = {d}/mon.$id/keyring
log file = {d}/$name.log
admin socket = {d}/$name.asok

[osd]
osd data = {d}/osd.$id
keyring = {d}/osd.$id/keyring
log file = {d}/$name.log
admin socket = {d}/$name.asok
osd objectstore = {objectstore}
# BlueStore creates its block device as a sparse file in the OSD's directory at mkfs.
bluestore block size = {osd_size}
# mkfs would read the new store back whole; a test cluster's store is checked by its use.
bluestore fsck on mkfs = false
# Closing the block device waits for its completion thread's next poll, and BlueStore opens
# and closes it about eight times between mkfs and mount: at 250 ms that was 2 s of a start.
bdev aio poll ms = 20
memstore device bytes = {osd_size}
# 4 GiB by default; the OSD trims its caches towards this.  Pacific's minimum is 896 MiB.
osd memory target = 1073741824

[global]
""" + "".join(f"{name} = {value}\n" for name, value in extra.items())


class Cluster:
    """One monitor and one OSD in ``directory`` (absent or empty; removed by stop() unless
    ``keep``), with a pool ``rbd`` ready for images once start() (or ``with``) returns."""

    def __init__(
        self,
        directory: Path,
        *,
        objectstore: str = "bluestore",
        osd_size: int = 4 * GiB,
        timeout: float = 300.0,
        keep: bool = False,
        config: dict[str, str] | None = None,
    ) -> None:
        self.directory = Path(directory).absolute()
        self.objectstore = objectstore
        self.osd_size = osd_size
        self.timeout = timeout  # for each wait; generous, for a loaded 2-CPU machine
        self.keep = keep
        # More ceph.conf options, in a last [global] section: one that [mon] or [osd] above sets
        # too keeps that section's value for that daemon.
        self.config = dict(config or {})
        self.fsid = str(uuid.uuid4())
        self.mon_port = 0
        self.osd_id = -1
        self.startup_seconds = 0.0
        self.steps: dict[str, float] = {}  # seconds each step of start() took
        self._daemons: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._owns_directory = False  # True once start() has taken an empty directory

    @property
    def conf_path(self) -> Path:
        return self.directory / "ceph.conf"

    @property
    def keyring_path(self) -> Path:
        return self.directory / "client.admin.keyring"

    # --- running the tools ------------------------------------------------------------------

    def run(self, *argv: str, timeout: float | None = None, input: bytes | None = None) -> str:
        """Run a Ceph tool against this cluster (``-c`` is added after the program name);
        its stdout, or ClusterError with its stderr.  subprocess.run kills it at the timeout."""
        command = [argv[0], "-c", str(self.conf_path), *argv[1:]]
        try:
            result = subprocess.run(
                command, input=input, capture_output=True, timeout=timeout or self.timeout, check=False
            )
        except subprocess.TimeoutExpired as error:
            raise ClusterError(f"{' '.join(command)}: no answer in {error.timeout:.0f} s") from None
        if result.returncode != 0:
            raise ClusterError(f"{' '.join(command)} exited {result.returncode}: {result.stderr.decode().strip()}")
        return result.stdout.decode()

    def ceph(self, *args: str, timeout: float | None = None) -> str:
        # --connect-timeout: without it the CLI waits forever for a monitor that is not there.
        connect = min(timeout or self.timeout, 30.0)
        return self.run("ceph", "--connect-timeout", f"{connect:g}", *args, timeout=timeout)

    def rbd(self, *args: str, timeout: float | None = None) -> str:
        return self.run("rbd", *args, timeout=timeout)

    def create_image(self, name: str, size: int, features: str | None = None) -> str:
        """Create image ``name`` of ``size`` bytes in pool ``rbd``; returns its spec, ``rbd/name``."""
        spec = f"{POOL}/{name}"
        extra = ["--image-feature", features] if features else []
        self.rbd("create", "--size", f"{size}B", *extra, spec)
        return spec

    def create_user(self, name: str, pool: str = POOL) -> str:
        """A cephx user with the caps an RBD client needs on ``pool`` (``profile rbd``: which also
        lets it blocklist a dead client whose lock it breaks), its key added to the keyring the
        configuration names; returns its entity, ``client.NAME``."""
        entity = f"client.{name}"
        key = self.ceph("auth", "get-or-create", entity, "mon", "profile rbd", "osd", f"profile rbd pool={pool}")
        with open(self.keyring_path, "a") as keyring:
            keyring.write(key if key.endswith("\n") else key + "\n")
        return entity

    # --- starting ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the cluster; on any failure stop what was started and raise."""
        try:
            began = time.monotonic()
            self._prepare_directory()
            self._step("keys", self._make_keys)
            self._step("monitor", self._start_monitor)
            self._step("osd mkfs", self._make_osd)
            self._step("osd up", self._start_osd)
            self._step("pool", self._make_pool)
            self.startup_seconds = time.monotonic() - began
        except BaseException as error:
            message = self._log_tails() if isinstance(error, ClusterError) else ""
            self.stop()
            if message:
                raise ClusterError(f"{error}\n{message}") from error
            raise

    def _step(self, name: str, action: Callable[[], None]) -> None:
        began = time.monotonic()
        action()
        self.steps[name] = time.monotonic() - began

    def _prepare_directory(self) -> None:
        # stop() removes the directory: refuse one that holds anything this class did not make,
        # and remove nothing if refused.
        if self.directory.exists() and any(self.directory.iterdir()):
            raise ClusterError(f"{self.directory} is not empty")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._owns_directory = True
        (self.directory / "crash").mkdir()

    def _make_keys(self) -> None:
        # The monitor's keyring holds its own key and client.admin's: the monitor is seeded with
        # every key it knows at mkfs.  Caps are those of a cluster's usual admin.
        mon_keyring = self.directory / "mon.keyring"
        self._tool("ceph-authtool", "--create-keyring", str(mon_keyring), "--gen-key", "-n", "mon.",
                   "--cap", "mon", "allow *")  # fmt: skip
        self._tool("ceph-authtool", "--create-keyring", str(self.keyring_path), "--gen-key", "-n", "client.admin",
                   "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *",
                   "--cap", "mds", "allow *")  # fmt: skip
        self._tool("ceph-authtool", str(mon_keyring), "--import-keyring", str(self.keyring_path))

    def _tool(self, *argv: str) -> None:
        """A tool run without the cluster's conf (keyrings and monmaps are files, no cluster)."""
        result = subprocess.run(argv, capture_output=True, timeout=self.timeout, check=False)
        if result.returncode != 0:
            raise ClusterError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.decode().strip()}")

    def _start_monitor(self) -> None:
        # The port is in the monmap and the conf, so a port taken meanwhile means a new mkfs.
        for attempt in range(3):
            self.mon_port = free_port()
            self.conf_path.write_text(
                config_text(self.directory, self.fsid, self.mon_port, self.objectstore, self.osd_size, self.config)
            )
            mon_data = self.directory / f"mon.{MON_ID}"
            shutil.rmtree(mon_data, ignore_errors=True)
            monmap = self.directory / "monmap"
            self._tool("monmaptool", "--create", "--clobber", "--fsid", self.fsid,
                       "--addv", MON_ID, f"[v2:127.0.0.1:{self.mon_port}]", str(monmap))  # fmt: skip
            self._tool("ceph-mon", "-c", str(self.conf_path), "--mkfs", "-i", MON_ID, "--monmap", str(monmap),
                       "--keyring", str(self.directory / "mon.keyring"))  # fmt: skip
            mon = self._spawn(f"mon.{MON_ID}", "ceph-mon", "-i", MON_ID)
            if self._wait_monitor(mon):
                return
            self._reap(mon)
            if attempt == 2:
                raise ClusterError("the monitor exited at start three times")

    def _wait_monitor(self, mon: subprocess.Popen[bytes]) -> bool:
        """True once the monitor answers with a quorum; False if it exited (port taken)."""

        def answered() -> bool:
            if mon.poll() is not None:
                return True
            try:
                # Short: what answers on the port may be another program that took it first.
                self.ceph("quorum_status", timeout=10)
            except ClusterError:
                return False
            return True

        wait_for("the monitor to answer", answered, self.timeout)
        return mon.poll() is None

    def _make_osd(self) -> None:
        # `ceph osd new` allocates the id and registers the OSD's cephx key in one step; the
        # same key goes into the OSD's own keyring, which mkfs and the daemon read.
        osd_uuid = str(uuid.uuid4())
        key = subprocess.run(["ceph-authtool", "--gen-print-key"], capture_output=True, text=True,
                             timeout=self.timeout, check=True).stdout.strip()  # fmt: skip
        secrets = self.directory / "osd-secrets.json"
        secrets.write_text(json.dumps({"cephx_secret": key}))
        self.osd_id = int(self.ceph("osd", "new", osd_uuid, "-i", str(secrets)).strip())
        secrets.unlink()
        osd_data = self.directory / f"osd.{self.osd_id}"
        osd_data.mkdir()
        self._tool("ceph-authtool", "--create-keyring", str(osd_data / "keyring"), "--name", f"osd.{self.osd_id}",
                   "--add-key", key)  # fmt: skip
        self.run("ceph-osd", "-i", str(self.osd_id), "--mkfs", "--osd-uuid", osd_uuid)

    def _start_osd(self) -> None:
        osd = self._spawn(f"osd.{self.osd_id}", "ceph-osd", "-i", str(self.osd_id))

        def up_and_in() -> bool:
            if osd.poll() is not None:
                raise ClusterError(f"ceph-osd exited with {osd.returncode} at start")
            dump = json.loads(self.ceph("osd", "dump", "--format", "json", timeout=60))
            return any(o["osd"] == self.osd_id and o["up"] and o["in"] for o in dump["osds"])

        wait_for(f"osd.{self.osd_id} to be up and in", up_and_in, self.timeout)

    def _make_pool(self) -> None:
        # `rbd pool init` writes to the pool and takes a self-managed snapshot in it, so when it
        # returns the placement groups are active and images can be created and written: the
        # readiness a test needs (HEALTH_OK alone says nothing of the PGs without a manager).
        self.ceph("osd", "pool", "create", POOL)
        self.rbd("pool", "init", POOL)

    def _spawn(self, name: str, program: str, *args: str) -> subprocess.Popen[bytes]:
        """Start a daemon in the foreground (-f: no fork, so its PID is the one we hold), its
        output in NAME.out.  setpriv --pdeathsig: if this process dies without stop(), the kernel
        kills the daemon too (exec keeps the PID, so the daemon is still our child by that PID).
        Its own session: a terminal's Ctrl-C reaches this process only, whose stop() then ends
        the daemons in order."""
        out = (self.directory / f"{name}.out").open("wb")
        with out:
            process = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", program, "-f", "-c", str(self.conf_path), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._daemons.append((name, process))
        return process

    def _log_tails(self, lines: int = 15) -> str:
        """The last lines of each daemon's log, for the error that says why start() failed."""
        parts = []
        for path in sorted(self.directory.glob("*.log")) + sorted(self.directory.glob("*.out")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            if tail:
                parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    # --- stopping ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every daemon this object started (the OSD before the monitor it reports to),
        then remove the directory unless ``keep``.  Safe to call twice, and after a failure."""
        while self._daemons:
            self._reap(self._daemons[-1][1])
        if self._owns_directory and not self.keep:
            shutil.rmtree(self.directory, ignore_errors=True)
            self._owns_directory = False

    def _reap(self, process: subprocess.Popen[bytes], grace: float = 30.0) -> None:
        """SIGTERM, and SIGKILL if it has not exited after ``grace`` seconds; always waited for,
        so no zombie and no daemon outlives stop()."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._daemons = [(name, p) for name, p in self._daemons if p is not process]

    def daemons(self) -> dict[str, int]:
        """The running daemons' names and PIDs."""
        return {name: p.pid for name, p in self._daemons if p.poll() is None}

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def up(args: argparse.Namespace) -> int:
    # SIGTERM as Ctrl-C: either way the finally below stops the daemons and removes the directory.
    # SIGINT too, explicitly: started in the background by a shell, Python inherits it ignored.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cluster = Cluster(Path(args.directory), objectstore=args.objectstore, osd_size=args.osd_size * GiB, keep=args.keep)
    try:
        cluster.start()
        steps = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in cluster.steps.items())
        print(f"up in {cluster.startup_seconds:.1f} s ({steps}); daemons {cluster.daemons()}", file=sys.stderr)
        print(cluster.conf_path, flush=True)
        print(f"e.g. rbd -c {cluster.conf_path} create --size 1G rbd/disk; Ctrl-C stops", file=sys.stderr)
        started = cluster.daemons()
        while True:
            gone = started.keys() - cluster.daemons().keys()
            if gone:
                print(f"{', '.join(sorted(gone))} exited on its own: see the logs", file=sys.stderr)
                return 1
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start a cluster in DIRECTORY (absent or empty) until Ctrl-C")
    start.add_argument("directory")
    start.add_argument("--objectstore", choices=("bluestore", "memstore"), default="bluestore")
    start.add_argument("--osd-size", type=int, default=4, help="GiB (sparse file or memory), default 4")
    start.add_argument("--keep", action="store_true", help="leave the directory (logs, data) at exit")
    args = parser.parse_args(argv)
    return up(args)


if __name__ == "__main__":
    sys.exit(main())
