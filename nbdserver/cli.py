"""Command line: ``nbdserver serve ...``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import build, configfile
from .backing import DEFAULT_WORKERS, ENGINES
from .backing.librbd import PREFIX as RBD_PREFIX
from .config import (
    AUTO_PROCESSES_MAX,
    CACHE_MODES,
    DEFAULT_CONTROL,
    DEFAULT_METRICS,
    DEFAULT_WINDOW_US,
    LOG_LEVELS,
    TLS_MODES,
    ConfigError,
    ExportConfig,
    ServerConfig,
    parse_export,
    parse_listener,
    parse_mode,
    parse_networks,
    parse_processes,
    parse_size,
)
from .control import client, state
from .metrics import top
from .process import daemon, eventloop
from .process.systemd import configure_logging
from .serving.tls import tls_context


def build_parser() -> argparse.ArgumentParser:
    # Raw: the version line (with the package's folder in it) is not folded to the terminal's width.
    parser = argparse.ArgumentParser(
        prog="nbdserver",
        description="Network Block Device server.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=build.describe())
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="serve backing files over NBD",
        description="Serve one or more backing files or block devices over NBD.",
        epilog=(
            "examples:\n"
            "  nbdserver serve disk.img\n"
            "  nbdserver serve --size 1G new.img\n"
            "  nbdserver serve --export name=a,path=a.img --export name=b,path=b.img,read-only\n"
            "  nbdserver serve --listen '[::1]:10809' --listen unix:/run/nbd.sock disk.img\n"
            "  nbdserver serve --rbd-conf /etc/ceph/ceph.conf --rbd-id nbd rbd:rbd/vm1"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"read settings and exports from this TOML file (e.g. {configfile.DEFAULT_PATH}); flags override it",
    )
    serve.add_argument(
        "path",
        nargs="?",
        type=Path,
        help="backing file or block device of the export named by --name, or a Ceph RBD image: "
        "rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE",
    )
    serve.add_argument("--name", default="", help="name of that export (default: the empty name)")
    serve.add_argument("--description", default="", help="description of that export")
    serve.add_argument("--read-only", "-r", action="store_true", help="export it read-only")
    serve.add_argument(
        "--size", type=_arg(parse_size), help="create a sparse image of SIZE (e.g. 1G) if PATH does not exist"
    )
    serve.add_argument(
        "--export",
        "-e",
        action="append",
        default=[],
        type=_arg(parse_export),
        metavar="SPEC",
        help="another export: name=NAME,path=PATH[,read-only][,size=SIZE][,cache=MODE][,tls=require]"
        "[,allow=NET+NET][,rbd-conf=FILE][,rbd-id=USER][,rbd-exclusive][,dirty-bitmap=NAME][,description=TEXT] "
        "(repeatable; PATH may be rbd:POOL/IMAGE)",
    )
    serve.add_argument(
        "--rbd-conf",
        type=Path,
        metavar="FILE",
        help="the ceph.conf of RBD exports (default: as librados finds it: $CEPH_CONF, /etc/ceph/ceph.conf)",
    )
    serve.add_argument("--rbd-id", metavar="USER", help="the cephx user RBD exports connect as (default admin)")
    serve.add_argument(
        "--rbd-timeout",
        type=float,
        metavar="SECONDS",
        help="for connecting to the Ceph cluster, opening an image, and each request to it; "
        "a request not answered in time fails with EIO (default 30)",
    )
    serve.add_argument(
        "--rbd-exclusive",
        action="store_true",
        default=None,
        help="take each RBD image's exclusive lock for good: another server refuses to start on it, "
        "other clients' writes fail (default: the lock passes to whichever client writes)",
    )
    serve.add_argument(
        "--cache",
        choices=CACHE_MODES,
        default="buffered",
        help="of PATH: buffered (through the page cache, the default) or direct (O_DIRECT); "
        "no cache for an RBD image either way (librbd's is off)",
    )
    serve.add_argument(
        "--engine",
        choices=ENGINES,
        help="how I/O that must wait is issued: uring (io_uring), threads (a thread pool), "
        "or auto (uring where it works, else threads; the default); RBD images always go through librbd",
    )
    serve.add_argument(
        "--default-export", help='export chosen by the empty name (default: the export named "", else the first)'
    )
    serve.add_argument(
        "--listen",
        "-l",
        action="append",
        default=[],
        type=_arg(parse_listener),
        metavar="ADDR",
        help="HOST:PORT, [IPV6]:PORT or unix:PATH (repeatable; default 127.0.0.1:10809). "
        "Listening beyond loopback must be asked for, e.g. 0.0.0.0:10809",
    )
    serve.add_argument(
        "--metrics",
        type=_arg(parse_listener),
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default 127.0.0.1:10810)",
    )
    serve.add_argument("--no-metrics", action="store_true", help="serve no metrics")
    serve.add_argument("--workers", type=int, help=f"I/O threads per export (default {DEFAULT_WORKERS})")
    serve.add_argument(
        "--processes",
        type=_arg(parse_processes),
        metavar="N",
        help=f"processes serving connections: auto (default: one per CPU, at most {AUTO_PROCESSES_MAX}) "
        "or N (1: this process serves them all)",
    )
    serve.add_argument(
        "--worker-timeout",
        type=float,
        metavar="SECONDS",
        help="replace a worker process that has not answered for this long (default 30; 0: never)",
    )
    serve.add_argument(
        "--no-merge",
        dest="merge",
        action="store_const",
        const=False,
        help="issue every request on its own (for A/B measurements)",
    )
    serve.add_argument(
        "--max-submission-bytes",
        type=_arg(parse_size),
        metavar="SIZE",
        help="largest merged read or write (default 1M)",
    )
    serve.add_argument(
        "--max-segments",
        type=int,
        metavar="N",
        help=f"most requests in one merged submission (default {ServerConfig.max_segments}, at most 1024)",
    )
    serve.add_argument(
        "--max-inflight",
        type=_arg(parse_size),
        metavar="SIZE",
        help="READ/WRITE bytes in flight per connection before it stops reading (default 256M)",
    )
    serve.add_argument(
        "--max-export-inflight",
        type=_arg(parse_size),
        metavar="SIZE",
        help="the same across all connections of one export (default 512M)",
    )
    serve.add_argument(
        "--buffer-pool",
        type=_arg(parse_size),
        metavar="SIZE",
        help="idle request buffers kept for reuse (default 64M)",
    )
    serve.add_argument(
        "--tls",
        choices=TLS_MODES,
        help="off (the default): refuse STARTTLS; on: offer it; require: serve nothing without it",
    )
    serve.add_argument("--tls-certificate", type=Path, metavar="PEM", help="the server's certificate (chain)")
    serve.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key")
    serve.add_argument(
        "--tls-ca", type=Path, metavar="PEM", help="accept only clients with a certificate signed by this CA"
    )
    serve.add_argument(
        "--allow",
        type=_arg(parse_networks),
        metavar="NET[+NET...]",
        help="serve only TCP clients in these networks, e.g. 10.0.0.0/8+::1 (exports may set their own allow=)",
    )
    serve.add_argument(
        "--unix-socket-mode", type=_arg(parse_mode), metavar="MODE", help="of created Unix sockets (default 0660)"
    )
    serve.add_argument("--max-connections", type=int, metavar="N", help="open at once (default 1024)")
    serve.add_argument(
        "--max-server-inflight",
        type=_arg(parse_size),
        metavar="SIZE",
        help="READ/WRITE bytes in flight across all exports (default 1G)",
    )
    serve.add_argument(
        "--handshake-timeout", type=float, metavar="SECONDS", help="to finish option haggling (default 30)"
    )
    serve.add_argument(
        "--idle-timeout", type=float, metavar="SECONDS", help="close connections idle this long (default 0: never)"
    )
    serve.add_argument(
        "--busy-poll",
        type=int,
        metavar="MICROSECONDS",
        help=f"poll this long after a request arrives or a reply leaves (default {DEFAULT_WINDOW_US}; 0: off)",
    )
    serve.add_argument(
        "--no-gather",
        dest="gather",
        action="store_const",
        const=False,
        help="receive every request as it comes, even from a client with a deep queue",
    )
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="what to log: debug, info (the default), warning, error")
    serve.add_argument(
        "--control",
        type=Path,
        metavar="PATH",
        help="take nbdserver ctl's commands on a Unix socket at PATH, mode 0600 (default: none)",
    )
    serve.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="keep the exports added and removed through the control socket in DIR, "
        "applied over the configuration at start (default: none, not kept)",
    )
    serve.add_argument(
        "--pid-file",
        type=Path,
        metavar="PATH",
        help="write the main process's PID to PATH once serving (an upgrade's successor rewrites it)",
    )
    check = commands.add_parser(
        "check-config",
        help="check a configuration file",
        description="Check a configuration file and the exports it names; exit 0 if the server would start.",
    )
    check.add_argument(
        "config",
        nargs="?",
        type=Path,
        default=configfile.DEFAULT_PATH,
        metavar="FILE",
        help="default %(default)s",
    )
    _add_ctl(commands)
    live = commands.add_parser(
        "top",
        help="iostat -x for a running server's exports",
        description="A live view of a server's exports with the columns of iostat -x, from its /metrics.",
    )
    live.add_argument(
        "url",
        nargs="?",
        default=str(DEFAULT_METRICS),
        type=_arg(top.metrics_url),
        metavar="ADDR|URL",
        help="the server's metrics: HOST:PORT or [IPV6]:PORT as serve --metrics takes it, or a URL "
        "(default %(default)s)",
    )
    live.add_argument("--interval", "-i", type=float, default=1.0, help="seconds between reports (default 1)")
    live.add_argument("--once", action="store_true", help="print one report (over one interval) and exit")
    live.add_argument("--count", "-c", type=int, help="stop after this many reports")
    return parser


def _add_ctl(commands: argparse._SubParsersAction) -> None:
    ctl = commands.add_parser(
        "ctl",
        help="drive a running server through its control socket",
        description="Ask a running server (serve --control PATH) for its status, or change its exports.",
        epilog=(
            "examples:\n"
            "  nbdserver ctl status\n"
            "  nbdserver ctl export add backup /srv/backup.img --size 10G\n"
            "  nbdserver ctl export remove backup --force\n"
            "  nbdserver ctl bitmap add disk backup-1 --granularity 64K\n"
            "  nbdserver ctl checkpoint disk monday\n"
            "  nbdserver ctl snapshot remove disk monday"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ctl.add_argument(
        "--control", type=Path, default=DEFAULT_CONTROL, metavar="PATH", help="the control socket (default %(default)s)"
    )
    ctl.add_argument("--json", action="store_true", help="print the server's reply as JSON")
    what = ctl.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")
    what.add_parser("status", help="exports and connections")
    export = what.add_parser("export", help="add or remove an export").add_subparsers(
        dest="export_command", required=True, metavar="add|remove"
    )
    add = export.add_parser("add", help="serve another export, in every worker process")
    add.add_argument("name")
    add.add_argument("path", help="backing file or block device (or rbd:POOL/IMAGE)")
    add.add_argument("--read-only", "-r", action="store_true", help="export it read-only")
    add.add_argument("--size", type=_arg(parse_size), help="create a sparse image of SIZE if PATH does not exist")
    add.add_argument("--cache", choices=CACHE_MODES, default="buffered", help="buffered (default) or direct")
    add.add_argument("--description", default="", help="shown by nbdinfo --list")
    remove = export.add_parser("remove", help="stop serving an export")
    remove.add_argument("name")
    remove.add_argument(
        "--force", action="store_true", help="disconnect its clients (their requests in flight answered first)"
    )
    _add_ctl_bitmap(what)
    _add_ctl_snapshot(what)


def _add_ctl_snapshot(what: argparse._SubParsersAction) -> None:
    snapshot = what.add_parser(
        "snapshot", help="read-only copies of an export, served as EXPORT@NAME (XFS, btrfs)"
    ).add_subparsers(dest="snapshot_command", required=True, metavar="add|remove|list")
    add = snapshot.add_parser("add", help="copy the export at one request boundary (a reflink: needs --state-dir)")
    remove = snapshot.add_parser("remove", help="stop serving a snapshot or checkpoint and delete it")
    for one in (add, remove):
        one.add_argument("export")
        one.add_argument("name")
    remove.add_argument("--force", action="store_true", help="disconnect its clients")
    listing = snapshot.add_parser("list", help="the snapshots of an export, or of every export")
    listing.add_argument("export", nargs="?")
    checkpoint = what.add_parser(
        "checkpoint",
        help="a snapshot with the bitmap of what changed since the previous checkpoint, for a backup",
        description=(
            "At one request boundary: snapshot EXPORT as EXPORT@NAME, freeze onto it the bitmap of what "
            "changed since the previous checkpoint (all of it, for the first), and start bitmap NAME on "
            "EXPORT for what changes from now on.  A backup reads EXPORT@NAME's dirty extents from "
            "qemu:dirty-bitmap:NAME, then removes it with 'snapshot remove'."
        ),
    )
    checkpoint.add_argument("export")
    checkpoint.add_argument("name")


def _add_ctl_bitmap(what: argparse._SubParsersAction) -> None:
    bitmap = what.add_parser("bitmap", help="dirty bitmaps: which blocks were written").add_subparsers(
        dest="bitmap_command", required=True, metavar="add|remove|clear|list"
    )
    add = bitmap.add_parser("add", help="track the writes to an export from now on (needs --state-dir)")
    add.add_argument("export")
    add.add_argument("name")
    add.add_argument(
        "--granularity", type=_arg(parse_size), default=64 * 1024, help="bytes per mark: 4K to 64M (default 64K)"
    )
    for command, text in (("remove", "stop tracking and delete the bitmap"), ("clear", "mark everything clean")):
        one = bitmap.add_parser(command, help=text)
        one.add_argument("export")
        one.add_argument("name")
    listing = bitmap.add_parser("list", help="the bitmaps of an export, or of every export")
    listing.add_argument("export", nargs="?")


def _ctl_request(args: argparse.Namespace) -> tuple[str, dict]:
    """The control socket's command and arguments for ``nbdserver ctl ...``."""
    if args.ctl_command == "status":
        return "status", {}
    if args.ctl_command == "bitmap":
        return _ctl_bitmap(args)
    if args.ctl_command == "checkpoint":
        return "checkpoint", {"export": args.export, "name": args.name}
    if args.ctl_command == "snapshot":
        return _ctl_snapshot(args)
    if args.export_command == "remove":
        return "export.remove", {"name": args.name, "force": args.force}
    path = args.path if args.path.startswith(RBD_PREFIX) else os.path.abspath(args.path)  # the server's cwd is not ours
    return "export.add", {
        "name": args.name,
        "path": path,
        "read_only": args.read_only,
        "size": args.size,
        "cache": args.cache,
        "description": args.description,
    }


def _ctl_bitmap(args: argparse.Namespace) -> tuple[str, dict]:
    command = args.bitmap_command
    if command == "list":
        return "bitmap.list", {} if args.export is None else {"export": args.export}
    request = {"export": args.export, "name": args.name}
    if command == "add":
        request["granularity"] = args.granularity
    return f"bitmap.{command}", request


def _ctl_snapshot(args: argparse.Namespace) -> tuple[str, dict]:
    command = args.snapshot_command
    if command == "list":
        return "snapshot.list", {} if args.export is None else {"export": args.export}
    request = {"export": args.export, "name": args.name}
    if command == "remove":
        request["force"] = args.force
    return f"snapshot.{command}", request


def _arg(parse):
    """Adapt a config parser for argparse, keeping its error message."""

    def convert(text: str):
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return convert


# Command-line flags and the ServerConfig fields they override.
_OVERRIDES = {
    "engine": "engine",
    "workers": "workers",
    "processes": "processes",
    "merge": "merge",
    "max_submission_bytes": "max_submission_bytes",
    "max_segments": "max_segments",
    "max_inflight": "max_inflight_bytes",
    "max_export_inflight": "max_export_inflight_bytes",
    "buffer_pool": "buffer_pool_bytes",
    "log_level": "log_level",
    "default_export": "default_export",
    "metrics": "metrics",
    "tls": "tls",
    "tls_certificate": "tls_certificate",
    "tls_key": "tls_key",
    "tls_ca": "tls_ca",
    "allow": "allow",
    "unix_socket_mode": "unix_socket_mode",
    "max_connections": "max_connections",
    "max_server_inflight": "max_server_inflight_bytes",
    "handshake_timeout": "handshake_timeout",
    "idle_timeout": "idle_timeout",
    "busy_poll": "busy_poll_us",
    "gather": "gather",
    "worker_timeout": "worker_timeout",
    "rbd_conf": "rbd_conf",
    "rbd_id": "rbd_id",
    "rbd_timeout": "rbd_timeout",
    "rbd_exclusive": "rbd_exclusive",
    "control": "control",
    "state_dir": "state_dir",
    "pid_file": "pid_file",
}


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The configuration file (if any), then the flags over it."""
    config = configfile.load(args.config) if args.config else ServerConfig(exports=[])
    if args.path is not None:
        config.exports.append(
            ExportConfig(
                args.name, args.path, args.read_only, args.description, create_size=args.size, cache=args.cache
            )
        )
    elif args.size is not None or args.read_only or args.name or args.description or args.cache != "buffered":
        raise ConfigError("--name, --description, --read-only, --size and --cache describe PATH, which is missing")
    config.exports.extend(args.export)
    for flag, name in _OVERRIDES.items():
        value = getattr(args, flag)
        if value is not None:
            setattr(config, name, value)
    if args.no_metrics:
        config.metrics = None
    if args.listen:
        config.listeners = args.listen
    config.validate()
    return config


def check_config(path: Path) -> int:
    """``nbdserver check-config``: the file, then each export's backing file."""
    try:
        config = configfile.load(path)
        try:
            config.validate()
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    except ConfigError as exc:
        print(f"nbdserver: {exc}", file=sys.stderr)
        return 1
    problems = [
        f"{path}: export {e.name!r}: {problem}" for e in config.exports if (problem := _backing_problem(e, config))
    ]
    try:
        tls_context(config)
    except ConfigError as exc:
        problems.append(f"{path}: {exc}")
    for problem in problems:
        print(f"nbdserver: {problem}", file=sys.stderr)
    if problems:
        return 1
    names = ", ".join(repr(e.name) for e in config.exports)
    listeners = ", ".join(map(str, config.listeners))
    images = sum(e.rbd is not None for e in config.exports)
    unchecked = f" ({images} RBD image(s) not checked: the cluster is not contacted)" if images else ""
    print(f"{path}: OK: {len(config.exports)} export(s) ({names}) on {listeners}{unchecked}")
    return 0


def _backing_problem(export: ExportConfig, server: ServerConfig) -> str | None:
    """Why the server could not open this export's backing file, as far as can be told without opening it."""
    if export.rbd is not None:
        return _rbd_problem(export.rbd_conf or server.rbd_conf)
    path = export.path
    if not path.exists():
        if export.create_size is None:
            return f"path {path}: does not exist (and no size is given to create it)"
        if not os.access(path.parent, os.W_OK):
            return f"path {path}: does not exist, and its directory is not writable to create it"
        return None
    if not (path.is_file() or path.is_block_device()):
        return f"path {path}: not a regular file or block device"
    if not os.access(path, os.R_OK if export.read_only else os.R_OK | os.W_OK):
        return f"path {path}: not {'readable' if export.read_only else 'readable and writable'} by this user"
    return None


def _rbd_problem(conf: Path | None) -> str | None:
    """An RBD image's Ceph configuration file, if one is named, must be readable; the image itself
    is not looked for (that would take connecting to the cluster)."""
    if conf is not None and not os.access(conf, os.R_OK):
        return f"rbd-conf {conf}: {'not readable by this user' if conf.exists() else 'does not exist'}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "top":
        if args.interval <= 0:
            parser.error("--interval must be positive")
        return top.run(args.url, args.interval, once=args.once, count=args.count)
    if args.command == "check-config":
        return check_config(args.config)
    if args.command == "ctl":
        command, request = _ctl_request(args)
        return client.run(args.control, command, request, args.json)
    if args.command == "serve":
        try:
            config = config_from_args(args)
        except ConfigError as exc:
            parser.error(str(exc))
        configure_logging(config.log_level)
        try:
            changes = state.initial(config.state_dir)  # exports added and removed at run time
            config = changes.apply(config)
            config.validate()
        except ConfigError as exc:
            print(f"nbdserver: {exc}", file=sys.stderr)
            return 2
        reread = (lambda: changes.apply(config_from_args(args))) if args.config else None
        return eventloop.run(daemon.run(config, reread, changes))
    parser.error(f"unknown command {args.command}")
    return 2
