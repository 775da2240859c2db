#!/usr/bin/env python3
"""nbdserver's engines and cache modes against nbdkit and qemu-nbd, side by side in one run.

Every server serves the same file on ext4, driven by fio's nbd engine. For each workload the
servers alternate within each repeat, each repeat starting one server later (A, B, C, then
B, C, A: no server always runs first, or right after the same one), and every run gets a fresh
server process. The tables give the median (min-max) MiB/s, IOPS for 4k, the p99 completion
latency, and each nbdserver variant's median MiB/s relative to nbdkit's file plugin.

    fs/bench/engines.py [--servers 'nbdserver*,nbdkit'] [--workloads randwrite-4k,read-hole-1m]
                        [--runtime 5] [--repeat 3] [--size 1G] [--dir DIR] [--out results/engines.md]

The backing file (--size, at least 1 GiB) is laid out for the job files in fs/fio/:
  [0, 512M)    data, written once before the first run; every other workload stays in here
  [512M, 768M) never written: "read of a hole" (read-1m.fio's read-hole-1m)
  [768M, 1G)   "write + fsync, new blocks", punched back to a hole before each of its runs
Before each run the file is flushed and dropped from the page cache, so that no server inherits
dirty or cached pages from the one before.

Without --dir the file lives on a new ext4 image in /dev/shm, loop-mounted for the run (root only)
and removed afterwards: O_DIRECT needs a real filesystem, which tmpfs is not.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from builds import tree_of
from common import (
    OWN_METRICS_PORT,
    FioResult,
    Server,
    ServerError,
    cpu_seconds,
    fill,
    free_port,
    nbdserver_command,
    publish,
    run_fio,
    spread,
    start_server,
    tail,
)

MiB = 1 << 20
DATA_END = 512 * MiB
FRESH_START, FRESH_END = 768 * MiB, 1024 * MiB
MIN_SIZE = FRESH_END
FIO_DIR = Path(__file__).resolve().parent.parent / "fio"
BASELINE = "nbdkit"
# How a server that cannot run this here says so (qemu-nbd built without io_uring, a kernel without it, ...).
UNSUPPORTED = re.compile(r"not supported|unsupported|invalid aio|unable to use io_uring", re.IGNORECASE)


class Unsupported(Exception):
    pass


class Chroot(Protocol):
    """Another system's root the program runs in (fs/chroot/current.py), keeping its PID."""

    def command(self, argv: Sequence[str], binds: Sequence[Path] = ()) -> list[str]: ...


@dataclass(frozen=True)
class Variant:
    name: str
    program: str
    args: tuple[str, ...]  # "{file}", "{port}" and "{config}" are filled in; nbdserver reports its own port
    config: str = ""  # a configuration file to write (with "{file}" and "{port}" filled in) for "{config}"
    daemon: bool = False  # forks into the background, writing its PID to "{pidfile}"
    export: str = ""  # the name clients ask for
    chroot: Chroot | None = None  # where the program comes from, if not from this machine's PATH
    where: str = ""  # that place, for the report
    version_args: tuple[str, ...] = ("--version",)
    build: str = "pure"  # nbdserver's: "pure", or "mypyc" (the hot modules compiled, see builds.py)

    def command(
        self, image: Path | str, port: int | str, config: Path | str = "CONFIG", pidfile: Path | str = "PIDFILE"
    ) -> list[str]:
        argv = self.argv(image, port, config, pidfile)
        # The image's directory (and so the configuration and PID files beside it) is shared with the chroot.
        return self.chroot.command(argv, [Path(image).parent]) if self.chroot else argv

    def argv(self, image: Path | str, port: int | str, config: Path | str, pidfile: Path | str) -> list[str]:
        """The server's own command line."""
        if self.program == "nbdserver":
            return nbdserver_command(image, [*self.args, *OWN_METRICS_PORT])
        args = (arg.format(file=image, port=port, config=config, pidfile=pidfile) for arg in self.args)
        return [self.program, *args]

    def version(self) -> str:
        """The first line the server prints about its version."""
        program = [sys.executable, "-P", "-m", "nbdserver"] if self.program == "nbdserver" else [self.program]
        argv = [*program, *self.version_args]
        if self.program == "nbdserver":
            tree = tree_of(self.build)
            said = subprocess.run(
                argv, capture_output=True, text=True, env=self.env(), cwd=tree, timeout=60, check=False
            )
            return said.stdout.strip()
        if self.chroot:
            argv = self.chroot.command(argv)
        elif shutil.which(argv[0]) is None:
            return f"{self.program}: not installed"
        said = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        lines = (said.stdout + said.stderr).strip().splitlines()
        return lines[0] if lines else f"{self.program}: exit status {said.returncode}"

    def env(self) -> dict[str, str]:
        """nbdserver's build, by where it is imported from."""
        return {"PYTHONPATH": str(tree_of(self.build))} if self.program == "nbdserver" else {}

    def start(self, image: Path) -> Server:
        if self.program == "nbdserver":
            # From the build's own tree: ``-m`` looks in the working directory before PYTHONPATH.
            return start_server(self.command(image, 0), env=self.env(), cwd=tree_of(self.build))
        if self.chroot is None and shutil.which(self.program) is None:
            raise Unsupported(f"{self.program} is not installed")
        for attempt in range(3):
            port = free_port()
            config = image.with_name(f"{self.name}.conf")  # beside the image, gone with its directory
            if self.config:
                config.write_text(self.config.format(file=image, port=port))
            pidfile = image.with_name(f"{self.name}.pid")
            command = self.command(image, port, config, pidfile)
            if self.daemon:
                command = _foreground(command, pidfile)
            try:
                server = start_server(command, port=port)
                if self.daemon:
                    server.pid = int(pidfile.read_text())
                return server
            except ServerError as exc:
                # The port was free when picked; something else may have taken it since.
                if attempt == 2 or "in use" not in str(exc):
                    raise
        raise AssertionError("unreachable")


def versions(variants: Sequence[Variant]) -> str:
    """What each program says of its version, once per program (and place), for a report's header."""
    seen: dict[tuple[str, str, str], str] = {}
    for v in variants:
        if (v.program, v.where, v.build) not in seen:
            seen[(v.program, v.where, v.build)] = v.version() + (f" ({v.where})" if v.where else "")
    return "; ".join(seen.values())


def _foreground(command: list[str], pidfile: Path) -> list[str]:
    """A shell that starts a forking server and stays until it exits; SIGTERM to it stops the server."""
    return [
        "sh",
        "-c",
        f'trap \'kill "$(cat {pidfile})"; exit 0\' TERM INT; rm -f {pidfile}; "$@"; '
        f'while [ ! -s {pidfile} ] || kill -0 "$(cat {pidfile})" 2>/dev/null; do sleep 0.2 & wait $!; done',
        "sh",
        *command,
    ]


NBDKIT = ("-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", "{port}", "file", "{file}")
QEMU_NBD = ("-b", "127.0.0.1", "-p", "{port}", "-t", "--shared=16")
# The image, raw, without qemu's file locks: with --persistent every server has the file open at once.
QEMU_IMAGE = ("--image-opts", "driver=raw,file.driver=file,file.filename={file},file.locking=off")
VARIANTS = [
    Variant("nbdserver", "nbdserver", ()),  # the defaults, whatever they are
    *(
        Variant(f"nbdserver-{engine}-{cache}", "nbdserver", ("--engine", engine, "--cache", cache))
        for engine in ("threads", "uring")
        for cache in ("buffered", "direct")
    ),
    Variant("nbdkit", "nbdkit", NBDKIT),
    # Not O_DIRECT: the plugin evicts what it read or wrote from the page cache afterwards.
    Variant("nbdkit-cache-none", "nbdkit", (*NBDKIT, "cache=none")),
    Variant("qemu-nbd-native", "qemu-nbd", (*QEMU_NBD, "--cache=none", "--aio=native", *QEMU_IMAGE)),
    Variant("qemu-nbd-io_uring", "qemu-nbd", (*QEMU_NBD, "--cache=none", "--aio=io_uring", *QEMU_IMAGE)),
]


def job(file: str, section: str | None = None) -> tuple[str, ...]:
    return (*([f"--section={section}"] if section else []), str(FIO_DIR / file))


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    group: str
    fio: tuple[str, ...]  # options, then the job file if any
    time_based: bool = True
    fresh: bool = False  # writes blocks not allocated yet: the range is punched before each run
    iops: bool = False
    jobs: int = 1  # JOBS, for the job files that read it


QUEUED = "4k at QD32, 1M at QD4"
QD1 = "QD1, one job (psync-like)"
WORKLOADS = [
    Workload("randwrite-4k", "4k rand write QD32", QUEUED, job("randwrite-4k.fio"), iops=True),
    Workload(
        "randread-4k",
        "4k rand read QD32",
        QUEUED,
        ("--name=randread-4k", "--rw=randread", "--bs=4k", "--iodepth=32", "--size=256m"),  # the range of the others
        iops=True,
    ),
    Workload("randrw-4k", "4k rand 70/30 read/write QD32", QUEUED, job("randrw-4k.fio"), iops=True),
    Workload("seqwrite-1m", "1M seq write QD4", QUEUED, ("--name=seqwrite-1m", "--rw=write", "--bs=1m", "--iodepth=4")),
    Workload("seqread-1m", "1M seq read QD4", QUEUED, ("--name=seqread-1m", "--rw=read", "--bs=1m", "--iodepth=4")),
]
# The seed workloads, psync-like with one job; peers.py runs them too.
SEED_WORKLOADS = [
    # Not time-based: a second pass would overwrite. --runtime still caps it.
    Workload(
        "write-fsync-1m",
        "1M write + fsync, new blocks",
        QD1,
        (f"--offset={FRESH_START}", *job("write-fsync-1m.fio", "write-fsync-1m")),
        time_based=False,
        fresh=True,
    ),
    Workload("overwrite-fsync-1m", "1M overwrite + fsync", QD1, job("write-fsync-1m.fio", "overwrite-fsync-1m")),
    Workload("read-hole-1m", "1M read of a hole", QD1, job("read-1m.fio", "read-hole-1m")),
    Workload("read-data-1m", "1M read of data", QD1, job("read-1m.fio", "read-data-1m")),
]
WORKLOADS += SEED_WORKLOADS


@dataclass
class Cell:
    runs: list[FioResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cpu_per_gib: list[float] = field(default_factory=list)  # the server's CPU seconds per GiB moved
    cpu_per_request: list[float] = field(default_factory=list)  # and µs per request
    kernel_per_request: list[float] = field(default_factory=list)  # of which in the kernel (system time)
    merged: list[float] = field(default_factory=list)  # nbdserver's requests per submission


def fio_args(workload: Workload, port: int, runtime: int, export: str = "") -> tuple[list[str], dict[str, str]]:
    """Options given before a job file only fill in what the file leaves unset."""
    uri = f"nbd://127.0.0.1:{port}/{export}"
    # Jobs as threads: a killed fio then leaves no job process behind.
    args = ["--thread", "--ioengine=nbd", f"--uri={uri}", f"--runtime={runtime}", f"--size={DATA_END}"]
    if workload.time_based:
        args.append("--time_based")
    return [*args, *workload.fio], {"NBD_URI": uri, "RUNTIME": str(runtime), "JOBS": str(workload.jobs)}


def run(cmd: Sequence[str | Path]) -> None:
    cmd = [str(arg) for arg in cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {tail(proc.stderr + proc.stdout)}")


def create_image(image: Path, size: int) -> None:
    """Data up to DATA_END, a hole after it."""
    fill(image, DATA_END)
    with open(image, "r+b") as f:
        f.truncate(size)
        os.fsync(f.fileno())


def settle(image: Path, workload: Workload) -> None:
    """Same starting point for every run, whichever server ran before."""
    if workload.fresh:
        length = FRESH_END - FRESH_START
        run(["fallocate", "--punch-hole", "--offset", str(FRESH_START), "--length", str(length), image])
    fd = os.open(image, os.O_RDWR)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@contextlib.contextmanager
def backing_dir(parent: Path | None, fs_size: int) -> Iterator[tuple[Path, str]]:
    """A directory for the backing file and a description of where it is."""
    if parent is not None:
        fstype = subprocess.run(["findmnt", "-no", "FSTYPE", "-T", parent], capture_output=True, text=True).stdout
        with tempfile.TemporaryDirectory(dir=parent, prefix="engines-") as tmp:
            yield Path(tmp), f"{fstype.strip() or 'unknown filesystem'} in {parent}"
        return
    fd, name = tempfile.mkstemp(dir="/dev/shm", prefix="engines-", suffix=".ext4")
    os.close(fd)
    fs_image, mountpoint, mounted = Path(name), Path(tempfile.mkdtemp(prefix="engines-")), False
    try:
        os.truncate(fs_image, fs_size)
        run(["mkfs.ext4", "-q", "-F", fs_image])
        run(["mount", "-o", "loop", fs_image, mountpoint])
        mounted = True
        yield mountpoint, "ext4 on a loop image in /dev/shm"
    finally:
        if mounted:
            unmount(mountpoint)
        mountpoint.rmdir()
        fs_image.unlink()


def unmount(mountpoint: Path) -> None:
    # A server that was just killed may hold the file for a moment longer.
    for _ in range(20):
        if subprocess.run(["umount", mountpoint], capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.25)
    print(f"{mountpoint} still busy, detaching it lazily", file=sys.stderr)
    run(["umount", "--lazy", mountpoint])


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMGT]?)i?B?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text}")
    size = int(match.group(1)) << 10 * " KMGT".index(match.group(2).upper() or " ")
    if size < MIN_SIZE:
        raise argparse.ArgumentTypeError("the layout of the job files needs at least 1G")
    return size


T = TypeVar("T")


def pick(items: Sequence[T], spec: str | None, name: Callable[[T], str], what: str) -> list[T]:
    """Comma-separated names or shell patterns, kept in the canonical order."""
    if not spec:
        return list(items)
    patterns = [p.strip() for p in spec.split(",") if p.strip()]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name(item), pattern) for item in items):
            known = ", ".join(name(item) for item in items)
            raise SystemExit(f"no {what} matches {pattern!r} (known: {known})")
    return [item for item in items if any(fnmatch.fnmatchcase(name(item), p) for p in patterns)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = "comma-separated names or shell patterns out of: "
    parser.add_argument("--servers", help=names + ", ".join(v.name for v in VARIANTS))
    parser.add_argument("--workloads", help=names + ", ".join(w.name for w in WORKLOADS))
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio run (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per workload and server (default %(default)s)")
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="backing file size (default 1G, at least 1G)")
    parser.add_argument("--dir", type=Path, help="put the backing file here instead of a new ext4 image")
    parser.add_argument("--out", type=Path, default=Path("results/engines.md"), help="default %(default)s")
    args = parser.parse_args()
    variants = pick(VARIANTS, args.servers, lambda v: v.name, "server")
    workloads = pick(WORKLOADS, args.workloads, lambda w: w.name, "workload")
    # SIGTERM unwinds like Ctrl-C, so servers stop and the image is unmounted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    with backing_dir(args.dir, args.size + (1 << 30)) as (directory, where):
        image = directory / "bench.img"
        create_image(image, args.size)
        cells, unavailable = run_matrix(image, workloads, variants, args.runtime, args.repeat)

    ran = [v for v in variants if v.name not in unavailable]
    header = (
        f"Server engines: fio nbd engine, {args.size // MiB} MiB file, {where}, {args.runtime} s runs, "
        f"median (min-max) of {args.repeat}, {time.strftime('%Y-%m-%d')}\n\nVersions: {versions(ran)}"
    )
    report = render(header, workloads, variants, cells, unavailable)
    publish(report, args.out)
    return 0


def run_matrix(
    image: Path,
    workloads: list[Workload],
    variants: list[Variant],
    runtime: int,
    repeat: int,
    progress: Callable[[str], str] = lambda line: line,
    persistent: bool = False,
) -> tuple[dict, dict[str, str]]:
    """Every workload ``repeat`` times, the servers alternating within each repeat (rotated by one
    per repeat); a progress line per run.  ``persistent``: each server started once and kept for
    every run (all serving the file at once, one driven at a time), so that the servers of one
    workload run within seconds of each other, however long a start takes; else a fresh server
    process per run.

    Returns the cells by (workload, variant) name and, for servers that could not run, why.
    """
    cells = {(w.name, v.name): Cell() for w in workloads for v in variants}
    unavailable: dict[str, str] = {}
    kept: dict[str, Server] | None = {} if persistent else None
    total, n = len(workloads) * repeat * len(variants), 0
    try:
        for workload in workloads:
            for turn in range(repeat):
                for variant in variants[turn % len(variants) :] + variants[: turn % len(variants)]:
                    n += 1
                    if variant.name not in unavailable:
                        line = run_cell(image, workload, variant, runtime, cells, unavailable, kept)
                        print(
                            progress(f"[{n}/{total}] {workload.title}, {variant.name}: {line}"),
                            file=sys.stderr,
                            flush=True,
                        )
    finally:
        for server in (kept or {}).values():
            server.stop()
    return cells, unavailable


def run_cell(
    image: Path,
    workload: Workload,
    variant: Variant,
    runtime: int,
    cells: dict,
    unavailable: dict[str, str],
    kept: dict[str, Server] | None = None,
) -> str:
    """One fio run, against a fresh server or (``kept``) the one kept for ``variant``, started if
    none is; returns the progress line."""
    settle(image, workload)
    server = kept.get(variant.name) if kept is not None else None
    if server is not None and server.proc.poll() is not None:
        server = None  # it exited: started again below, and the run says so
    if server is None:
        try:
            server = variant.start(image)
        except Unsupported as exc:
            unavailable[variant.name] = f"unsupported: {exc}"
            return unavailable[variant.name]
        except ServerError as exc:
            kind = "unsupported" if UNSUPPORTED.search(str(exc)) else "failed"
            unavailable[variant.name] = f"{kind}: {exc}"
            return unavailable[variant.name]
        if kept is not None:
            kept[variant.name] = server
    cell: Cell = cells[(workload.name, variant.name)]
    fio, env = fio_args(workload, server.port, runtime, variant.export)
    failed = False
    try:
        user_before, system_before = cpu_seconds(server.pid)
        requests_before, completed_before = submission_counts(server) if variant.program == "nbdserver" else (0, 0)
        result = run_fio(fio, timeout=runtime + 120, env=env)
        user, system = cpu_seconds(server.pid)
        user, system = user - user_before, system - system_before
        cpu = user + system
        if variant.program == "nbdserver":
            requests, completed = submission_counts(server)
            completed -= completed_before
            cell.merged.append((requests - requests_before) / completed if completed else 0.0)
    except (RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
        failed = True
        cell.errors.append(f"{exc} (server: {tail(server.stop())})")
        return f"error: {cell.errors[-1]}"
    finally:
        if kept is None or failed:
            server.stop()
            if kept is not None:
                kept.pop(variant.name, None)
    cell.runs.append(result)
    moved_gib = result.mibs * runtime / 1024
    if moved_gib:
        cell.cpu_per_gib.append(cpu / moved_gib)
        cell.cpu_per_request.append(cpu / (result.iops * runtime) * 1e6)
        cell.kernel_per_request.append(system / (result.iops * runtime) * 1e6)
    iops = f", {result.iops:.0f} IOPS" if workload.iops else ""
    return f"{result.mibs:.0f} MiB/s{iops}, p99 {result.p99_us:.0f} µs"


def submission_counts(server: Server) -> tuple[float, float]:
    """READ and WRITE requests, and the submissions that completed them, so far (the server's
    /metrics): their ratio over a run is its requests per submission."""
    match = re.search(r"metrics on (http://\S+)", server.log())
    if match is None:
        return 0.0, 0.0
    with urllib.request.urlopen(match.group(1), timeout=10) as response:
        text = response.read().decode()
    requests = completed = 0.0
    for line in text.splitlines():
        if re.match(r'nbdserver_requests_total\{.*op="(read|write)"', line):
            requests += float(line.rsplit(" ", 1)[1])
        elif re.match(r"nbdserver_(reads|writes)_completed_total\{", line):
            completed += float(line.rsplit(" ", 1)[1])
    return requests, completed


def render(
    header: str,
    workloads: list[Workload],
    variants: list[Variant],
    cells: dict,
    unavailable: dict[str, str],
    baseline: str = BASELINE,
) -> str:
    def table(title: str, rows: list[Workload], values: Callable[[Cell], list[float]], fmt: str = ".0f") -> list[str]:
        out = [f"{title}:", "", "| workload | " + " | ".join(v.name for v in variants) + " |"]
        out.append("|---" * (len(variants) + 1) + "|")
        for w in rows:
            row = " | ".join(text(cells[(w.name, v.name)], v, values, fmt) for v in variants)
            out.append(f"| {w.title} | {row} |")
        return [*out, ""]

    def text(cell: Cell, variant: Variant, values: Callable[[Cell], list[float]], fmt: str) -> str:
        if values(cell):
            failed = f", {len(cell.errors)} failed" if cell.errors else ""
            return spread(values(cell), fmt) + failed
        if variant.name in unavailable:
            return unavailable[variant.name].split(":")[0]
        return "error" if cell.errors else "-"

    def median_mibs(workload: Workload, variant: str) -> float | None:
        runs = cells[(workload.name, variant)].runs
        return statistics.median(r.mibs for r in runs) if runs else None

    ours = [v for v in variants if v.program == "nbdserver"]
    lines = [header, ""]
    for group in dict.fromkeys(w.group for w in workloads):
        rows = [w for w in workloads if w.group == group]
        lines += [f"## {group}", ""]
        lines += table("MiB/s", rows, lambda c: [r.mibs for r in c.runs])
        if any(w.iops for w in rows):
            lines += table("IOPS", [w for w in rows if w.iops], lambda c: [r.iops for r in c.runs])
        latency = "p99 completion latency, µs (of the slower direction; without fsync)"
        lines += table(latency, rows, lambda c: [r.p99_us for r in c.runs])
        lines += table("Server CPU seconds per GiB moved", rows, lambda c: c.cpu_per_gib, ".2f")
        lines += table("Server CPU µs per request", rows, lambda c: c.cpu_per_request, ".1f")
        lines += table("of which in the kernel (system time)", rows, lambda c: c.kernel_per_request, ".1f")
        lines += table(
            "fio's own CPU µs per request (the client's cost)", rows, lambda c: [r.client_us for r in c.runs], ".1f"
        )
        if ours:
            lines += table("nbdserver's requests per submission (merging)", rows, lambda c: c.merged, ".1f")
        if ours and any(v.name == baseline for v in variants):
            lines += [f"Median MiB/s relative to {baseline}:", ""]
            lines.append("| workload | " + " | ".join(v.name for v in ours) + " |")
            lines.append("|---" * (len(ours) + 1) + "|")
            for w in rows:
                base = median_mibs(w, baseline)
                ratios = [median_mibs(w, v.name) for v in ours]
                lines.append(
                    f"| {w.title} | " + " | ".join(f"{r / base:.2f}x" if r and base else "-" for r in ratios) + " |"
                )
            lines.append("")
    lines += ["## Servers", ""]
    for v in variants:
        shown = " ".join(v.argv("FILE", "PORT", "CONFIG", "PIDFILE")).replace(sys.executable, "python")
        lines.append(f"- {v.name}: `{shown}`" + (f" (in the {v.where})" if v.where else ""))
        if v.name in unavailable:
            lines.append(f"  - {unavailable[v.name]}")
        for w in workloads:
            lines += [f"  - {w.title}: {error}" for error in cells[(w.name, v.name)].errors]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
