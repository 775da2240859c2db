#!/usr/bin/env python3
"""nbdserver against the NBD servers users choose between, side by side in one run.

    fs/bench/peers.py [--fs tmpfs,ext4] [--servers 'nbdserver*,nbdkit*'] [--workloads 'randwrite-4k*']
                      [--runtime 5] [--repeat 3] [--baseline nbdkit-1.42] [--persistent] [--out results/peers]

Every server serves the same file (a fresh server process for each fio run, or with --persistent
one process per server kept for the whole run), driven by the job options below through fio's nbd
engine; for each workload the servers alternate within each repeat, each repeat starting one server
later.  With --persistent the servers of one workload run seconds apart (the length of a run), which
matters where the machine's speed drifts over tens of seconds.
Per filesystem, the report (results/peers/peers.md) gives the median (min-max) MiB/s, IOPS, p99
latency, the server's CPU seconds per GiB moved and nbdserver's ratio to the baseline (--baseline:
by default the newest nbdkit's file plugin there is), and one PNG per workload group plots the
medians relative to it.  The header gives every server's version.

Servers: nbdserver (defaults, with merging off, without busy polling, and with the thread-pool engine), nbdkit's file
plugin, nbdkit's Python plugin with the minimal file plugin beside this script, qemu-nbd (cache=none
with native AIO, and cache=writeback), nbd-server: Debian 12's, from this machine, and where the
Debian 13 chroot has been built (fs/chroot/current.py build), the same from Debian 13 beside them,
named with their version (nbdkit-1.42, qemu-nbd-10-none-native, qemu-nbd-10-writeback,
nbd-server-3.26).  One that is not installed is reported as unsupported.  The Python plugin comes
with Debian's nbdkit-plugin-python; the plots need matplotlib.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import signal
import statistics
import sys
import time
from pathlib import Path

from common import publish
from engines import (
    BASELINE,
    NBDKIT,
    QD1,
    QEMU_IMAGE,
    QEMU_NBD,
    SEED_WORKLOADS,
    Cell,
    Variant,
    Workload,
    backing_dir,
    create_image,
    job,
    pick,
    render,
    run_matrix,
    versions,
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "chroot"))
import current  # noqa: E402

PLUGIN = HERE / "nbdkit_file_plugin.py"
NBD_SERVER_CONFIG = """[generic]
listenaddr = 127.0.0.1
port = {port}
allowlist = false
[bench]
exportname = {file}
flush = true
fua = true
trim = true
multifile = false
"""

VARIANTS = [
    # What README command 1 installs where a compiler is found: compiled, a worker process per CPU.
    Variant("nbdserver", "nbdserver", (), build="mypyc"),
    Variant("nbdserver-1proc", "nbdserver", ("--processes", "1"), build="mypyc"),
    Variant("nbdserver-pure", "nbdserver", ()),  # where no compiler is
    Variant("nbdserver-pure-1proc", "nbdserver", ("--processes", "1")),
    Variant("nbdserver-no-merge", "nbdserver", ("--no-merge",), build="mypyc"),
    Variant("nbdserver-no-poll", "nbdserver", ("--busy-poll", "0"), build="mypyc"),  # the event loop sleeps at once
    Variant("nbdserver-threads", "nbdserver", ("--engine", "threads"), build="mypyc"),  # where io_uring is not
    Variant(BASELINE, "nbdkit", NBDKIT),
    Variant("nbdkit-python", "nbdkit", (*NBDKIT[:-2], "python", str(PLUGIN), "file={file}")),
    Variant("qemu-nbd-none-native", "qemu-nbd", (*QEMU_NBD, "--cache=none", "--aio=native", *QEMU_IMAGE)),
    Variant("qemu-nbd-writeback", "qemu-nbd", (*QEMU_NBD, "--cache=writeback", *QEMU_IMAGE)),
    # It forks into the background: a shell stays in its place (its CPU time is the daemon's own).
    Variant(
        "nbd-server",
        "nbd-server",
        ("-C", "{config}", "-p", "{pidfile}"),
        config=NBD_SERVER_CONFIG,
        daemon=True,
        export="bench",
        version_args=("-V",),
    ),
]


def with_current(variants: list[Variant], chroot: current.Chroot | None) -> list[Variant]:
    """``variants`` and, after each of Debian 12's nbdkit (file plugin), qemu-nbd and nbd-server, the same
    from the Debian 13 chroot with the same options, named with its version."""
    if chroot is None:
        return list(variants)
    nbdkit, qemu, nbd_server = chroot.release("nbdkit"), chroot.release("qemu-utils", 1), chroot.release("nbd-server")
    names = {
        BASELINE: f"nbdkit-{nbdkit}",
        "qemu-nbd-none-native": f"qemu-nbd-{qemu}-none-native",
        "qemu-nbd-writeback": f"qemu-nbd-{qemu}-writeback",
        "nbd-server": f"nbd-server-{nbd_server}",
    }
    where = f"{current.RELEASE} chroot"
    out = []
    for v in variants:
        out.append(v)
        if v.name in names:
            out.append(dataclasses.replace(v, name=names[v.name], chroot=chroot, where=where))
    return out


QUEUED = "queued"
WORKLOADS = [
    Workload("randwrite-4k-qd1", "4k rand write QD1", QD1, ("--name=w", "--rw=randwrite", "--bs=4k"), iops=True),
    Workload("randread-4k-qd1", "4k rand read QD1", QD1, ("--name=r", "--rw=randread", "--bs=4k"), iops=True),
    Workload(
        "randwrite-4k",
        "4k rand write QD32",
        QUEUED,
        ("--name=w", "--rw=randwrite", "--bs=4k", "--iodepth=32"),
        iops=True,
    ),
    Workload(
        "seqwrite-4k", "4k seq write QD32", QUEUED, ("--name=w", "--rw=write", "--bs=4k", "--iodepth=32"), iops=True
    ),
    Workload(
        "seqwrite-4k-qd256",
        "4k seq write QD256",
        QUEUED,
        ("--name=w", "--rw=write", "--bs=4k", "--iodepth=256"),
        iops=True,
    ),
    Workload(
        "randwrite-4k-qd256",
        "4k rand write QD256",
        QUEUED,
        ("--name=w", "--rw=randwrite", "--bs=4k", "--iodepth=256"),
        iops=True,
    ),
    Workload(
        "seqwrite-4k-4conn",
        "4k seq write 4 conns x QD8",
        QUEUED,
        ("--name=w", "--rw=write", "--bs=4k", "--iodepth=8", "--numjobs=4", "--offset_increment=128m", "--size=128m"),
        iops=True,
    ),
    Workload("seqwrite-64k", "64k seq write QD8", QUEUED, ("--name=w", "--rw=write", "--bs=64k", "--iodepth=8")),
    Workload("seqwrite-128k", "128k seq write QD8", QUEUED, ("--name=w", "--rw=write", "--bs=128k", "--iodepth=8")),
    Workload(
        "seqwrite-1m-flush",
        "1M seq write QD4 + flush every 16",
        QUEUED,
        ("--name=w", "--rw=write", "--bs=1m", "--iodepth=4", "--fsync=16"),
    ),
    Workload(
        "randread-4k", "4k rand read QD32", QUEUED, ("--name=r", "--rw=randread", "--bs=4k", "--iodepth=32"), iops=True
    ),
    Workload("seqread-1m", "1M seq read QD4", QUEUED, ("--name=r", "--rw=read", "--bs=1m", "--iodepth=4")),
    Workload("randrw-4k", "4k rand 70/30 read/write QD32", QUEUED, job("randrw-4k.fio"), iops=True),
    *SEED_WORKLOADS,
    *(
        Workload(
            f"randwrite-4k-{jobs}jobs",
            f"4k rand write, {jobs} jobs x QD32",
            "jobs",
            job("randwrite-4k.fio"),
            iops=True,
            jobs=jobs,
        )
        for jobs in (1, 4, 8, 16)
    ),
]


def plot(
    report_dir: Path, fs: str, workloads: list[Workload], variants: list[Variant], cells: dict, baseline: str
) -> list[Path]:
    """Per workload group, a bar chart of each server's median MiB/s relative to the baseline
    (so that 4k and 1M workloads share one scale); none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    paths = []
    for group in dict.fromkeys(w.group for w in workloads):
        rows = [w for w in workloads if w.group == group]
        fig, ax = plt.subplots(figsize=(max(7, 1.4 * len(rows) + 3), 4.5))
        width = 0.8 / len(variants)
        for i, variant in enumerate(variants):
            ratios = []
            for w in rows:
                base = _median(cells[(w.name, baseline)]) if (w.name, baseline) in cells else 0.0
                ratios.append(_median(cells[(w.name, variant.name)]) / base if base else 0.0)
            ax.bar([x + i * width for x in range(len(rows))], ratios, width, label=variant.name)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], [w.title for w in rows], rotation=20, ha="right")
        ax.set_ylabel(f"median MiB/s relative to {baseline}")
        ax.set_title(f"{group}, {fs}")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        slug = re.sub(r"[^a-z0-9]+", "-", group.split()[0].lower()).strip("-")
        path = report_dir / f"peers-{fs}-{slug}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _median(cell: Cell) -> float:
    return statistics.median(r.mibs for r in cell.runs) if cell.runs else 0.0


def main() -> int:
    chroot = current.cached()
    if chroot is None:
        print("no Debian 13 chroot (fs/chroot/current.py build): Debian 12's servers only", file=sys.stderr)
    known = with_current(VARIANTS, chroot)
    # The newest nbdkit there is: the server the others are most often compared with.
    newest_nbdkit = [v.name for v in known if v.program == "nbdkit" and v.args == NBDKIT][-1]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = "comma-separated names or shell patterns out of: "
    parser.add_argument("--servers", help=names + ", ".join(v.name for v in known))
    parser.add_argument("--workloads", help=names + ", ".join(w.name for w in WORKLOADS))
    parser.add_argument("--fs", default="tmpfs,ext4", help="where the file lives: tmpfs, ext4 or both (default both)")
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio run (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per workload and server (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("results/peers"), help="report folder (default %(default)s)")
    parser.add_argument(
        "--persistent",
        action="store_true",
        help="start each server once and keep it for every run (all serving the file at once, one driven at a"
        " time): the servers of a workload then run seconds apart; default: a fresh server process per run",
    )
    parser.add_argument(
        "--baseline",
        default=newest_nbdkit,
        choices=[v.name for v in known],
        metavar="NAME",
        help="the server the ratios and plots are relative to (default %(default)s)",
    )
    args = parser.parse_args()
    variants = pick(known, args.servers, lambda v: v.name, "server")
    if args.baseline not in {v.name for v in variants}:
        print(f"the baseline {args.baseline} is not among the servers: no ratios", file=sys.stderr)
    workloads = pick(WORKLOADS, args.workloads, lambda w: w.name, "workload")
    filesystems = [f.strip() for f in args.fs.split(",") if f.strip()]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    args.out.mkdir(parents=True, exist_ok=True)
    sections = []
    for fs in filesystems:
        with _where(fs) as (directory, where):
            image = directory / "bench.img"
            create_image(image, 1 << 30)
            cells, unavailable = run_matrix(
                image,
                workloads,
                variants,
                args.runtime,
                args.repeat,
                lambda line, fs=fs: f"{fs}: {line}",
                persistent=args.persistent,
            )
        ran = [v for v in variants if v.name not in unavailable]
        servers = "persistent servers" if args.persistent else "a fresh server process per run"
        header = (
            f"# {where}\n\nfio nbd engine, 1 GiB file, {servers}, {args.runtime} s runs, "
            f"median (min-max) of {args.repeat}, {time.strftime('%Y-%m-%d')}\n\nVersions: {versions(ran)}"
        )
        plots = plot(args.out, fs, workloads, variants, cells, args.baseline)
        sections.append(render(header, workloads, variants, cells, unavailable, args.baseline))
        sections.append("".join(f"![{p.stem}]({p.name})\n" for p in plots))
    publish("\n".join(sections), args.out / "peers.md")
    return 0


def _where(fs: str):
    if fs == "tmpfs":
        return backing_dir(Path("/dev/shm"), 0)
    if fs == "ext4":
        return backing_dir(None, 2 << 30)
    raise SystemExit(f"--fs: {fs!r} is not tmpfs or ext4")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
