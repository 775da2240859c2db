"""Command line: ``nbdserver serve ...``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

import uvloop

from . import __version__
from .backing import DEFAULT_WORKERS, ENGINES
from .config import CACHE_MODES, ConfigError, ExportConfig, ServerConfig, parse_export, parse_listener, parse_size
from .metrics import top
from .server import Server

log = logging.getLogger("nbdserver")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbdserver", description="Network Block Device server.")
    parser.add_argument("--version", action="version", version=f"nbdserver {__version__}")
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
            "  nbdserver serve --listen '[::1]:10809' --listen unix:/run/nbd.sock disk.img"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("path", nargs="?", type=Path, help="backing file or block device of the export named by --name")
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
        help="another export: name=NAME,path=PATH[,read-only][,size=SIZE][,cache=MODE][,description=TEXT] (repeatable)",
    )
    serve.add_argument(
        "--cache",
        choices=CACHE_MODES,
        default="buffered",
        help="of PATH: buffered (through the page cache, the default) or direct (O_DIRECT)",
    )
    serve.add_argument(
        "--engine",
        choices=ENGINES,
        default=ServerConfig.engine,
        help="how I/O is issued: threads (a thread pool, the default) or uring (io_uring)",
    )
    serve.add_argument("--default-export", help="export chosen by the empty name (default: the first)")
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
        default=ServerConfig.metrics,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default 127.0.0.1:10810)",
    )
    serve.add_argument("--no-metrics", action="store_true", help="serve no metrics")
    serve.add_argument(
        "--workers", type=int, default=DEFAULT_WORKERS, help="I/O threads per export (default %(default)s)"
    )
    serve.add_argument(
        "--no-merge", dest="merge", action="store_false", help="issue every request on its own (for A/B measurements)"
    )
    serve.add_argument(
        "--max-submission-bytes",
        type=_arg(parse_size),
        default=ServerConfig.max_submission_bytes,
        metavar="SIZE",
        help="largest merged read or write (default 1M)",
    )
    serve.add_argument(
        "--max-segments",
        type=int,
        default=ServerConfig.max_segments,
        metavar="N",
        help="most requests in one merged submission (default %(default)s, at most 1024)",
    )
    serve.add_argument(
        "--max-inflight",
        type=_arg(parse_size),
        default=ServerConfig.max_inflight_bytes,
        metavar="SIZE",
        help="READ/WRITE bytes in flight per connection before it stops reading (default 256M)",
    )
    serve.add_argument(
        "--max-export-inflight",
        type=_arg(parse_size),
        default=ServerConfig.max_export_inflight_bytes,
        metavar="SIZE",
        help="the same across all connections of one export (default 512M)",
    )
    serve.add_argument(
        "--buffer-pool",
        type=_arg(parse_size),
        default=ServerConfig.buffer_pool_bytes,
        metavar="SIZE",
        help="idle request buffers kept for reuse (default 64M)",
    )
    serve.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="default %(default)s"
    )
    top = commands.add_parser(
        "top",
        help="iostat -x for a running server's exports",
        description="A live view of a server's exports with the columns of iostat -x, from its /metrics.",
    )
    top.add_argument(
        "url", nargs="?", default="http://127.0.0.1:10810/metrics", help="the server's metrics (default %(default)s)"
    )
    top.add_argument("--interval", "-i", type=float, default=1.0, help="seconds between reports (default 1)")
    top.add_argument("--once", action="store_true", help="print one report (over one interval) and exit")
    top.add_argument("--count", "-c", type=int, help="stop after this many reports")
    return parser


def _arg(parse):
    """Adapt a config parser for argparse, keeping its error message."""

    def convert(text: str):
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return convert


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    exports = []
    if args.path is not None:
        exports.append(
            ExportConfig(
                args.name, args.path, args.read_only, args.description, create_size=args.size, cache=args.cache
            )
        )
    elif args.size is not None or args.read_only or args.name or args.description or args.cache != "buffered":
        raise ConfigError("--name, --description, --read-only, --size and --cache describe PATH, which is missing")
    exports.extend(args.export)
    config = ServerConfig(
        exports=exports,
        default_export=args.default_export,
        metrics=None if args.no_metrics else args.metrics,
        engine=args.engine,
        workers=args.workers,
        merge=args.merge,
        max_submission_bytes=args.max_submission_bytes,
        max_segments=args.max_segments,
        max_inflight_bytes=args.max_inflight,
        max_export_inflight_bytes=args.max_export_inflight,
        buffer_pool_bytes=args.buffer_pool,
    )
    if args.listen:
        config.listeners = args.listen
    config.validate()
    return config


async def serve(config: ServerConfig) -> int:
    server = Server(config)
    try:
        server.open_exports()
    except OSError as exc:
        log.error("cannot open export: %s", exc)
        return 1
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        await server.shutdown()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down")
    await server.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "top":
        if args.interval <= 0:
            parser.error("--interval must be positive")
        return top.run(args.url, args.interval, once=args.once, count=args.count)
    if args.command == "serve":
        logging.basicConfig(
            level=args.log_level.upper(), stream=sys.stderr, format="nbdserver[%(levelname)s] %(message)s"
        )
        try:
            config = config_from_args(args)
        except ConfigError as exc:
            parser.error(str(exc))
        return uvloop.run(serve(config))
    parser.error(f"unknown command {args.command}")
    return 2
