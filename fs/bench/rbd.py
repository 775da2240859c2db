#!/usr/bin/env python3
"""nbdserver exporting a Ceph RBD image, against qemu-nbd's rbd driver and `rbd bench`.

    fs/bench/rbd.py [--conf CEPH_CONF [--id USER] [--osd-pid PID]] [--rounds 5] [--runtime 8]
                    [--servers nbdserver,qemu-nbd,rbd-bench] [--workloads 'randwrite-4k,*-1m']
                    [--size 1G] [--build mypyc] [--cluster-cpus 1] [--out results/rbd.md]

Without --conf it starts a throwaway cluster (fs/ceph/cluster.py: one monitor, one BlueStore OSD
on a sparse file, cephx, 127.0.0.1) in a temporary directory, and stops it at the end.  It creates
one image (features as `rbd create` picks them), writes it whole first (a read of a never-written
RBD object is answered without the OSD, and the first write to one creates it), and removes it at
the end.  For each workload and round, one after another (never two owners of the image at once:
the exclusive lock would bounce between them), each in a fresh process, the rotation starting one
later each round:

- nbdserver: `python -P -m nbdserver serve rbd:POOL/IMAGE --rbd-conf CONF --rbd-id USER` (the
  compiled build by default, as README command 1 installs it), driven by fio's nbd engine;
- qemu-nbd: `qemu-nbd -f raw -t --shared=16 'rbd:POOL/IMAGE:conf=CONF:id=USER'` with its default
  cache (writeback: librbd's cache on; nbdserver runs it off, so that a crash loses nothing it
  answered) and aio mode (threads; the rbd
  driver does its I/O through librbd's asynchronous calls whatever it is), the same fio job;
- rbd-bench: `rbd bench` with the same size, pattern and requests in flight: librbd alone, no
  NBD and no fio, the ceiling of a server on librbd.  It has no time bound: its --io-total is the
  rate last measured on the workload times --runtime.  The rbd tool sets
  rbd_cache_writethrough_until_flush=false at start: its writes are acknowledged by librbd's
  cache (Pacific's writearound policy, up to rbd_cache_max_dirty in flight) from the first one.

More variants for finding out what limits what (--servers): nbdserver-no-poll (--busy-poll 0,
which RBD exports no longer differ by: their connections do not poll),
qemu-nbd-flushed (rbd_cache_writethrough_until_flush=false: librbd as it is once a client has
sent its first flush, which fio's job never does; as rbd bench runs), qemu-nbd-no-cache
(--cache=none) and rbd-bench-no-cache (rbd_cache=false): librbd's cache off, as nbdserver always
runs it, so that a write is answered once the cluster has it: the ceiling of a server that answers
nothing the cluster does not hold.  (nbdserver-flushed and
nbdserver-flushed-no-poll measured nbdserver with librbd's cache on, before it was turned off
for good; they now measure what nbdserver does.)

With --cluster-cpus N the throwaway cluster's daemons run on the last N CPUs and everything else
on the others, as if the cluster were on machines of its own: on a small machine the servers'
CPU then no longer takes the OSD's, and what is compared is what each server makes of the same
cluster.

For each cell it reads the CPU time of the server (its processes, from /proc; for rbd bench its
rusage), of the thread that serves the connection (qemu-nbd's main thread, the event loop of
nbdserver's worker; the rest is librbd's threads), nbdserver's busy polling (its /metrics), and
the OSD's over the run.  The report gives per workload and server the median (min-max) over the
rounds of IOPS, MiB/s, the server's CPU µs per request, fio's, the OSD's CPU as cores used and per
request, and each nbdserver variant's ratio to the others, round by round: the OSD at about one
core is a cluster that cannot go faster, whoever drives it.  Servers and cluster are stopped by
PID, also when a run fails or is interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from builds import tree_of
from common import FioResult, Server, cpu_seconds, free_port, publish, run_fio, spread, start_server, tail

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ceph"))
import cluster as ceph

MiB = 1 << 20


@dataclass(frozen=True)
class Variant:
    """A server as run: its program, more arguments, and librbd options for it alone."""

    name: str
    kind: str  # "nbdserver", "qemu-nbd" or "rbd-bench"
    args: tuple[str, ...] = ()
    librbd: tuple[tuple[str, str], ...] = ()


# librbd as it is once a client has sent its first flush: its cache acknowledges writes before
# the OSD has them (Pacific's rbd_cache_policy writearound) instead of writing through until then.
# The rbd tool always runs so (it sets the option at start), hence rbd bench.
FLUSHED = (("rbd_cache_writethrough_until_flush", "false"),)
VARIANTS = [
    Variant("nbdserver", "nbdserver"),
    Variant("qemu-nbd", "qemu-nbd"),
    Variant("rbd-bench", "rbd-bench"),
    Variant("nbdserver-no-poll", "nbdserver", ("--busy-poll", "0")),
    Variant("nbdserver-flushed", "nbdserver", librbd=FLUSHED),
    Variant("nbdserver-flushed-no-poll", "nbdserver", ("--busy-poll", "0"), librbd=FLUSHED),
    Variant("qemu-nbd-flushed", "qemu-nbd", librbd=FLUSHED),
    Variant("qemu-nbd-no-cache", "qemu-nbd", ("--cache=none",)),
    Variant("rbd-bench-no-cache", "rbd-bench", librbd=(("rbd_cache", "false"),)),
]
DEFAULT_SERVERS = "nbdserver,qemu-nbd,rbd-bench"


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    read: bool
    block: int  # bytes per request
    depth: int  # requests in flight
    sequential: bool

    def fio(self) -> list[str]:
        rw = ("read" if self.sequential else "randread") if self.read else ("write" if self.sequential else "randwrite")
        return [f"--rw={rw}", f"--bs={self.block}", f"--iodepth={self.depth}"]

    def rbd_bench(self) -> list[str]:
        # full-seq: one stream from offset 0, wrapping at the end, as fio's sequential job does.
        pattern = "full-seq" if self.sequential else "rand"
        return [
            "--io-type", "read" if self.read else "write", "--io-size", f"{self.block}B",
            "--io-threads", str(self.depth), "--io-pattern", pattern,
        ]  # fmt: skip


WORKLOADS = [
    Workload("randwrite-4k", "4k rand write QD32", False, 4096, 32, False),
    Workload("write-1m", "1M seq write QD4", False, MiB, 4, True),
    Workload("read-1m", "1M seq read QD4", True, MiB, 4, True),
    Workload("randread-4k", "4k rand read QD32", True, 4096, 32, False),
]


@dataclass(frozen=True)
class Cell:
    """One run of one server on one workload."""

    iops: float
    mibs: float
    server_us: float  # the server's CPU (user and system) per request
    client_us: float  # fio's, 0 for rbd bench (it is the client)
    osd_cores: float  # the OSD's CPU seconds per second of the run
    osd_us: float  # the OSD's CPU per request
    poll_us: float = 0.0  # nbdserver's busy polling per request (part of loop_us)
    loop_us: float = 0.0  # the thread serving the connection, per request (part of server_us)
    p99_us: float = 0.0  # fio's completion latency, 99th percentile (0 for rbd bench: not reported)


@dataclass
class Target:
    """Where the image is and how to reach it."""

    conf: Path
    user: str
    pool: str
    image: str
    size: int
    osd_pid: int  # 0: unknown (then no OSD figures)

    @property
    def spec(self) -> str:
        return f"{self.pool}/{self.image}"

    def rbd(self, *args: str, timeout: float = 600) -> str:
        command = ["rbd", "-c", str(self.conf), "--id", self.user, *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {tail(done.stderr)}")
        return done.stdout


# The cluster and the image ------------------------------------------------------------------


@contextlib.contextmanager
def cluster_conf(conf: Path | None) -> Iterator[tuple[Path, int, list[int]]]:
    """The ceph.conf to use, the OSD's PID (0 if not known) and every daemon's (none if not
    known): ``conf``, or a throwaway cluster's, stopped when the block ends."""
    if conf is not None:
        yield conf, 0, []
        return
    with tempfile.TemporaryDirectory(prefix="nbdserver-rbd-") as tmp, ceph.Cluster(Path(tmp) / "ceph") as cluster:
        osd = [pid for name, pid in cluster.daemons().items() if name.startswith("osd.")]
        print(f"cluster up in {cluster.startup_seconds:.1f} s: {cluster.daemons()}", file=sys.stderr)
        yield cluster.conf_path, osd[0], list(cluster.daemons().values())


def split_cpus(daemons: list[int], count: int) -> str:
    """Give the cluster's daemons (every thread of each) the last ``count`` CPUs and this script,
    and so every server, fio and rbd bench it starts, the others: the cluster as if on machines
    of its own, whose CPU the servers do not compete for.  Returns the split, said plainly."""
    cpus = sorted(os.sched_getaffinity(0))
    if not daemons or not 0 < count < len(cpus):
        raise SystemExit(f"--cluster-cpus {count}: needs a throwaway cluster and fewer than {len(cpus)} CPUs")
    cluster, clients = set(cpus[-count:]), set(cpus[:-count])
    for pid in daemons:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(task.name), cluster)
    os.sched_setaffinity(0, clients)
    return f"the cluster's daemons on CPUs {sorted(cluster)}, servers, fio and rbd bench on {sorted(clients)}"


def find_osd(conf: Path) -> int:
    """The PID of the one ceph-osd whose command line names ``conf``, or 0."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if any(Path(a.decode(errors="replace")).name == "ceph-osd" for a in argv) and str(conf).encode() in argv:
                found.append(int(entry.name))
    return found[0] if len(found) == 1 else 0


@contextlib.contextmanager
def image(target: Target, prefill: bool) -> Iterator[Target]:
    """Create the image (default features), write it whole if ``prefill``, remove it at the end."""
    target.rbd("create", "--size", f"{target.size}B", target.spec)
    try:
        if prefill:
            began = time.monotonic()
            target.rbd("bench", "--io-type", "write", "--io-size", "4M", "--io-threads", "8",
                       "--io-pattern", "full-seq", "--io-total", f"{target.size}B", target.spec)  # fmt: skip
            print(f"image written whole in {time.monotonic() - began:.1f} s", file=sys.stderr)
        yield target
    finally:
        with contextlib.suppress(Exception):
            target.rbd("rm", "--no-progress", target.spec)


def image_facts(target: Target) -> str:
    info = target.rbd("info", target.spec)
    keep = [line.strip() for line in info.splitlines() if line.strip().startswith(("size", "order", "features"))]
    return "; ".join(keep)


# The servers ---------------------------------------------------------------------------------


def nbdserver(target: Target, variant: Variant, build: str) -> Server:
    tree = tree_of(build)
    argv = [
        sys.executable, "-P", "-m", "nbdserver", "serve", f"rbd:{target.spec}", "--rbd-conf", str(target.conf),
        "--rbd-id", target.user, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", *variant.args,
    ]  # fmt: skip
    env = {"PYTHONPATH": str(tree)}
    if variant.librbd:  # librados reads $CEPH_ARGS after the configuration file
        env["CEPH_ARGS"] = " ".join(f"--{option}={value}" for option, value in variant.librbd)
    return start_server(argv, env=env, cwd=tree)


def qemu_nbd(target: Target, variant: Variant) -> Server:
    port = free_port()
    # qemu's rbd driver sets the options of the file name it does not know itself in librados.
    options = "".join(f":{option}={value}" for option, value in variant.librbd)
    spec = f"rbd:{target.spec}:conf={target.conf}:id={target.user}{options}"
    argv = ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-t", "--shared=16", *variant.args, spec]
    return start_server(argv, port)


def polled_seconds(server: Server) -> float:
    """nbdserver's busy polling so far, from its /metrics (0 if it has none)."""
    found = [line.split("metrics on ", 1)[1].strip() for line in server.lines if "metrics on " in line]
    if not found:
        return 0.0
    with contextlib.suppress(OSError), urllib.request.urlopen(found[0], timeout=10) as answer:
        text = answer.read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(POLL_METRIC))
    return 0.0


POLL_METRIC = "nbdserver_busy_poll_seconds_total"


def fio_cell(server: Server, workload: Workload, target: Target, runtime: int) -> Cell:
    args = [
        "--name=bench", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{server.port}/", f"--size={target.size}",
        "--time_based", f"--runtime={runtime}", *workload.fio(),
    ]  # fmt: skip
    try:
        loop = loop_thread(server.pid)
        before, osd_before, began = sum(cpu_seconds(server.pid)), osd_cpu(target), time.monotonic()
        loop_before = thread_seconds(loop)
        result: FioResult = run_fio(args, runtime + 120)
        wall, osd = time.monotonic() - began, osd_cpu(target) - osd_before
        server_s, loop_s = sum(cpu_seconds(server.pid)) - before, thread_seconds(loop) - loop_before
        polled = polled_seconds(server)
    finally:
        log = server.stop()
    if server.proc.returncode not in (0, -signal.SIGTERM):
        raise RuntimeError(f"the server exited with status {server.proc.returncode}: {tail(log)}")
    requests = max(1, result.requests)
    return Cell(
        result.iops, result.mibs, server_s / requests * 1e6, result.client_us, osd / wall, osd / requests * 1e6,
        polled / requests * 1e6, loop_s / requests * 1e6, result.p99_us,
    )  # fmt: skip


def loop_thread(pid: int) -> int:
    """The thread that serves the connections: qemu-nbd's main thread, or that of nbdserver's
    worker process (its only child; the primary only accepts).  The rest of the server's CPU is
    librbd's and librados's own threads (messenger, completions, timers)."""
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if len(children) == 1:
            return int(children[0])
    return pid


def thread_seconds(tid: int) -> float:
    """User and system time of one thread, the main thread of process ``tid`` if it is one."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{tid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def rbd_bench_cell(workload: Workload, target: Target, variant: Variant, total: int) -> Cell:
    """`rbd bench` moving ``total`` bytes (whole requests, at least one per thread)."""
    total = max(total // workload.block, workload.depth) * workload.block
    options = [f"--{option}={value}" for option, value in variant.librbd]
    command = ["rbd", "-c", str(target.conf), "--id", target.user, *options, "bench", *workload.rbd_bench(),
               "--io-total", f"{total}B", target.spec]  # fmt: skip
    osd_before, began = osd_cpu(target), time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    wall, osd = time.monotonic() - began, osd_cpu(target) - osd_before
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}: {tail(out)}")
    # "elapsed: 7   ops: 65536   ops/sec: 9012.3   bytes/sec: 35 MiB/s": the rate from its own clock.
    summary = [line for line in out.splitlines() if line.startswith("elapsed:")][-1].split()
    ops, iops = int(summary[3]), float(summary[5])
    cpu = usage.ru_utime + usage.ru_stime
    return Cell(iops, iops * workload.block / MiB, cpu / ops * 1e6, 0.0, osd / wall, osd / ops * 1e6)


def osd_cpu(target: Target) -> float:
    return sum(cpu_seconds(target.osd_pid)) if target.osd_pid else 0.0


# The matrix ----------------------------------------------------------------------------------

Runs = dict[tuple[str, str], list[Cell]]


def run_matrix(
    target: Target, workloads: list[Workload], servers: list[Variant], rounds: int, runtime: int, build: str
) -> tuple[Runs, list[str]]:
    """Every cell, and the load average before each round."""
    runs: Runs = {(w.name, s.name): [] for w in workloads for s in servers}
    loads: list[str] = []
    rate: dict[str, float] = {}  # bytes/s last measured per workload: sizes rbd bench's run
    total, n = len(workloads) * rounds * len(servers), 0
    for workload in workloads:
        for r in range(rounds):
            loads.append(load_average())
            for server in servers[r % len(servers) :] + servers[: r % len(servers)]:
                n += 1
                cell = run_cell(server, workload, target, runtime, build, rate)
                rate[workload.name] = cell.mibs * MiB
                runs[(workload.name, server.name)].append(cell)
                print(
                    f"[{n}/{total}] {workload.name} {server.name}: {cell.iops:.0f} IOPS, {cell.mibs:.0f} MiB/s, "
                    f"server {cell.server_us:.1f} µs/req, OSD {cell.osd_cores:.2f} cores; load {load_average()}",
                    file=sys.stderr,
                    flush=True,
                )
    return runs, loads


def run_cell(
    server: Variant, workload: Workload, target: Target, runtime: int, build: str, rate: dict[str, float]
) -> Cell:
    starts: dict[str, Callable[[], Server]] = {
        "nbdserver": lambda: nbdserver(target, server, build),
        "qemu-nbd": lambda: qemu_nbd(target, server),
    }
    if server.kind == "rbd-bench":
        guess = rate.get(workload.name, (40 if workload.block < MiB else 400) * MiB)
        return rbd_bench_cell(workload, target, server, int(guess * runtime))
    return fio_cell(starts[server.kind](), workload, target, runtime)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# The report ----------------------------------------------------------------------------------


def render(runs: Runs, loads: list[str], workloads: list[Workload], variants: list[Variant], header: list[str]) -> str:
    servers = [v.name for v in variants]
    lines = [*header, ""]
    lines += [
        "| workload | server | IOPS | MiB/s | server CPU µs/req | of which serving thread | of which polling "
        "| fio CPU µs/req | p99 ms | OSD cores | OSD CPU µs/req |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in workloads:
        for s in servers:
            cells = runs[(w.name, s)]
            if not cells:
                continue
            fio_us = spread([c.client_us for c in cells], ".1f") if any(c.client_us for c in cells) else "-"
            p99 = spread([c.p99_us / 1000 for c in cells], ".1f") if any(c.p99_us for c in cells) else "-"
            poll_us = spread([c.poll_us for c in cells], ".1f") if s.startswith("nbdserver") else "-"
            loop_us = spread([c.loop_us for c in cells], ".1f") if any(c.loop_us for c in cells) else "-"
            iops, mibs = spread([c.iops for c in cells], ".0f"), spread([c.mibs for c in cells], ".0f")
            lines.append(
                f"| {w.title} | {s} | {iops} | {mibs} "
                f"| {spread([c.server_us for c in cells], '.1f')} | {loop_us} | {poll_us} | {fio_us} | {p99} "
                f"| {spread([c.osd_cores for c in cells], '.2f')} | {spread([c.osd_us for c in cells], '.1f')} |"
            )
    lines += ratios(runs, workloads, [v for v in variants if v.kind == "nbdserver"], variants)
    lines += ["", "Load average (1, 5, 15 min) before each round: " + "; ".join(loads)]
    return "\n".join(lines) + "\n"


def ratios(runs: Runs, workloads: list[Workload], ours: list[Variant], variants: list[Variant]) -> list[str]:
    """Each nbdserver variant's IOPS over every other server's, paired within each round (the
    machine's speed drifts between rounds more than within one)."""
    others = [v.name for v in variants if v.kind != "nbdserver"]
    if not ours or not others:
        return []
    lines = ["", "IOPS over the other servers', round by round: median (min-max)", ""]
    lines += ["| workload | server | " + " | ".join(f"/ {s}" for s in others) + " |", "|---" * (2 + len(others)) + "|"]
    for w in workloads:
        for v in ours:
            cells = []
            for other in others:
                pairs = [a.iops / b.iops for a, b in zip(runs[(w.name, v.name)], runs[(w.name, other)], strict=False)]
                cells.append(spread(pairs, ".2f") + "x" if pairs else "-")
            lines.append(f"| {w.title} | {v.name} | " + " | ".join(cells) + " |")
    return lines


def versions(build: str) -> str:
    def first_line(argv: list[str], env: dict[str, str] | None = None) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})})
        return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else "?"

    ours = first_line([sys.executable, "-P", "-m", "nbdserver", "--version"], {"PYTHONPATH": str(tree_of(build))})
    return (
        f"Versions: {ours}; {first_line(['qemu-nbd', '--version'])}; {first_line(['fio', '--version'])}; "
        f"{first_line(['rbd', '--version'])}"
    )


def pick(names: str | None, available: list[str]) -> list[str]:
    if not names:
        return available
    patterns = names.split(",")
    chosen = [a for a in available if any(fnmatch.fnmatch(a, p) for p in patterns)]
    if not chosen:
        raise SystemExit(f"nothing matches {names!r} among {', '.join(available)}")
    return chosen


def size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conf", type=Path, help="an existing cluster's ceph.conf (default: start one)")
    parser.add_argument("--id", default="admin", help="cephx user (default admin)")
    parser.add_argument("--pool", default=ceph.POOL, help="pool of the image (default rbd)")
    parser.add_argument("--osd-pid", type=int, default=0, help="with --conf: the OSD to measure (default: found)")
    parser.add_argument("--size", type=size, default=1 << 30, help="image size (default 1G)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runtime", type=int, default=8, help="seconds per run (default 8)")
    parser.add_argument(
        "--servers",
        default=DEFAULT_SERVERS,
        help=f"comma-separated names or patterns among {', '.join(v.name for v in VARIANTS)} "
        f"(default {DEFAULT_SERVERS})",
    )
    parser.add_argument("--workloads", help=f"among {', '.join(w.name for w in WORKLOADS)}")
    parser.add_argument("--build", choices=("mypyc", "pure"), default="mypyc", help="nbdserver's build")
    parser.add_argument(
        "--cluster-cpus",
        type=int,
        default=0,
        help="pin the throwaway cluster to this many CPUs (the last ones) and the rest to the others",
    )
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()
    names = pick(args.servers, [v.name for v in VARIANTS])
    servers = [v for v in VARIANTS if v.name in names]
    workloads = [w for w in WORKLOADS if w.name in pick(args.workloads, [w.name for w in WORKLOADS])]
    # SIGTERM as Ctrl-C: the with-blocks below then stop the servers and the cluster.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    header = [f"{versions(args.build)} ({args.build} build)"]
    began = time.strftime("%Y-%m-%d %H:%M")
    with cluster_conf(args.conf) as (conf, osd_pid, daemons):
        if args.cluster_cpus:
            header.append(split_cpus(daemons, args.cluster_cpus))
        osd_pid = osd_pid or args.osd_pid or find_osd(conf)
        target = Target(conf, args.id, args.pool, f"bench-{os.getpid()}", args.size, osd_pid)
        with image(target, prefill=True):
            header += [
                f"{began}, {'cluster ' + str(args.conf) if args.conf else 'throwaway cluster (fs/ceph/cluster.py)'}; "
                f"image {target.spec}: {image_facts(target)}, written whole first; "
                f"fio nbd engine, {args.runtime} s runs, median (min-max) of {args.rounds} rounds, "
                f"servers alternated within each round; {os.cpu_count()} CPUs",
            ]
            if not osd_pid:
                header.append("(OSD not found: its CPU is shown as 0)")
            runs, loads = run_matrix(target, workloads, servers, args.rounds, args.runtime, args.build)
    publish(render(runs, loads, workloads, servers, header), args.out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: servers and cluster are stopped by now
        print("interrupted", file=sys.stderr)
        sys.exit(130)
