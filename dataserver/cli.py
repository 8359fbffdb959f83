"""``dataserver``: serve, launch, demo, cleanup. A thin layer over ServerConfig and Server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from dataserver.errors import DataServerError

__all__ = ["build_parser", "main"]

log = logging.getLogger("dataserver")


def _size_or_auto(value: str) -> int | None:
    from dataserver.config import parse_size

    return None if value == "auto" else parse_size(value, "--slot-bytes")


def add_serve_options(serve: argparse.ArgumentParser) -> None:
    """SPECs and every option of ``serve``; ``launch`` takes the very same, so the two can
    never drift apart."""
    serve.add_argument("spec", metavar="SPEC", nargs="+",
                       help="module:name of a Sequence instance, class or factory; several "
                            "named datasets as NAME=module:name (one pool serves them all)")
    serve.add_argument("--arg", action="append", default=[], metavar="[NAME.]KEY=VALUE",
                       help="argument for the class or factory (JSON where it parses); "
                            "NAME. limits it to one dataset")
    serve.add_argument("--endpoint", default="",
                       help="ipc:///path.sock or tcp://127.0.0.1:PORT "
                            "(default: $DATASERVER_ENDPOINT or the private runtime directory)")
    serve.add_argument("--workers", type=int, default=0, help="default: usable CPUs")
    serve.add_argument("--worker-type", choices=["process", "thread"], default="process")
    serve.add_argument("--slots", type=int, default=0, help="ring slots (default prefetch + 4)")
    serve.add_argument("--slot-bytes", type=_size_or_auto, default=None, metavar="SIZE|auto",
                       help="bytes per slot, e.g. 64MiB (default auto: first batch + 25%%)")
    serve.add_argument("--prefetch", type=int, default=0,
                       help="batches made ahead of each consumer (default 2 per worker, min 4)")
    serve.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=False,
                       help="serve each epoch in a permutation derived from --seed and the epoch")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--start-method", choices=["spawn", "forkserver", "fork"],
                       default="spawn")
    serve.add_argument("--max-retries", type=int, default=2,
                       help="retries of a batch whose worker died, before reporting it")
    serve.add_argument("--batch-timeout", type=float, default=None, metavar="SECONDS",
                       help="replace a worker stuck longer than this on one batch, and retry it")
    serve.add_argument("--consumer-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="reclaim the leases of a consumer in another pid namespace that "
                            "sent no heartbeat for this long")
    serve.add_argument("--insecure", action="store_true",
                       help="allow a tcp endpoint beyond loopback without authentication")
    serve.add_argument("--log-level", default="INFO",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _add_launch_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``launch`` that are its own, not passed on to the server."""
    from dataserver.launch import READY_TIMEOUT_S

    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S,
                        metavar="SECONDS",
                        help="give up if the server is not ready this long after its start "
                             "(default %(default)g)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dataserver",
        description="Serve a Keras-style Sequence from worker processes through shared memory.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve a Sequence until SIGINT/SIGTERM")
    add_serve_options(serve)

    launch = sub.add_parser(
        "launch", help="run a server beside a trainer command until the trainer exits",
        usage="dataserver launch SPEC... [serve options] [--ready-timeout SECONDS] "
              "-- COMMAND [ARG...]",
        description="Start `dataserver serve SPEC... [options]`, wait until it is ready, run "
                    "COMMAND with DATASERVER_ENDPOINT set, forward SIGINT/SIGTERM to it, stop the "
                    "server when it exits and exit with its code.",
    )
    add_serve_options(launch)
    _add_launch_options(launch)
    launch.set_defaults(usage_error=launch.error)

    demo = sub.add_parser("demo", help="serve the bundled example and read it: a quick check")
    demo.add_argument("--epochs", type=int, default=2)
    demo.add_argument("--batches", type=int, default=200)
    demo.add_argument("--workers", type=int, default=2)

    sub.add_parser("cleanup", help="remove shared memory and sockets left by dead servers")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from dataserver.config import ServerConfig
    from dataserver.server import Server
    from dataserver.source import parse_specs

    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: SPECs in the current directory
    config = ServerConfig(
        endpoint=args.endpoint, workers=args.workers, worker_type=args.worker_type,
        prefetch=args.prefetch, slots=args.slots, slot_bytes=args.slot_bytes,
        shuffle=args.shuffle, seed=args.seed, start_method=args.start_method,
        max_retries=args.max_retries, batch_timeout=args.batch_timeout,
        consumer_timeout=args.consumer_timeout, insecure=args.insecure,
        log_level=args.log_level,
    )
    server = Server(config, parse_specs(args.spec, args.arg))

    def ready(endpoint: str) -> None:
        print(f"dataserver: ready at {endpoint}", flush=True)

    return server.run(ready)


def _split_launch(argv: list[str]) -> tuple[list[str], list[str]]:
    """``launch ... -- COMMAND...``: the arguments before the first ``--``, and the trainer
    command after it (split first: argparse cannot end SPEC... before a command)."""
    if argv[:1] != ["launch"] or "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def _launch(args: argparse.Namespace, head: list[str], command: list[str]) -> int:
    from dataserver.launch import launch

    if not command:
        args.usage_error("give the trainer command after --, e.g. "
                         "dataserver launch mypkg.data:Train -- python train.py")
    own = argparse.ArgumentParser(add_help=False)
    _add_launch_options(own)
    serve_args = own.parse_known_args(head[1:])[1]  # the SPECs and serve options, as written
    return launch(serve_args, command, endpoint=args.endpoint,
                  ready_timeout_s=args.ready_timeout)


def main(argv: Sequence[str] | None = None) -> int:
    head, command = _split_launch(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(head)
    level = getattr(args, "log_level", "WARNING")
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s dataserver %(levelname)s %(message)s")
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "launch":
            return _launch(args, head, command)
        if args.command == "demo":
            from dataserver.demo import run_demo

            return run_demo(args.epochs, args.batches, args.workers)
        if args.command == "cleanup":
            from dataserver.shm import sweep

            removed = sweep()
            for path in removed:
                print(f"removed {path}")
            print(f"dataserver cleanup: removed {len(removed)} leftover"
                  f"{'s' if len(removed) != 1 else ''} of dead servers")
            return 0
    except DataServerError as exc:
        print(f"dataserver: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)
