"""``dataserver``: serve, launch, demo, cleanup. A thin layer over ServerConfig and Server."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from dataserver.errors import DataServerError
from dataserver.logs import setup_logging

__all__ = ["build_parser", "main"]

log = logging.getLogger("dataserver")


def _size_or_auto(value: str) -> int | None:
    from dataserver.config import parse_size

    return None if value == "auto" else parse_size(value, "--slot-bytes")


def add_serve_options(serve: argparse.ArgumentParser) -> None:
    """SPECs and every option of ``serve``, in groups; ``launch`` takes the very same, so the
    two can never drift apart."""
    serve.add_argument("spec", metavar="SPEC", nargs="*",
                       help="module:name of a Sequence instance, class or factory; several "
                            "named datasets as NAME=module:name (one pool serves them all)")
    serve.add_argument("--arg", action="append", default=[], metavar="[NAME.]KEY=VALUE",
                       help="argument for the class or factory (JSON where it parses); "
                            "NAME. limits it to one dataset")
    serve.add_argument("--generator", action="append", default=[], metavar="[NAME=]SPEC",
                       help="a dataset made by generators: each worker calls this factory once "
                            "(worker_info() says which worker it is, to shard the stream); "
                            "items come in the order made")
    serve.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=False,
                       help="serve each epoch in a permutation derived from --seed and the epoch")
    serve.add_argument("--seed", type=int, default=0)
    _add_worker_options(serve.add_argument_group("workers"))
    _add_ring_options(serve.add_argument_group("ring and consumers"))
    _add_watch_options(serve.add_argument_group("watching, caps and logs"))
    _add_ray_options(serve.add_argument_group("Ray"))


def _add_worker_options(g: argparse._ArgumentGroup) -> None:
    from dataserver.config import DEFAULT_START_METHOD

    g.add_argument("--workers", type=int, default=0, help="default: usable CPUs")
    g.add_argument("--worker-type", choices=["process", "thread"], default="process")
    g.add_argument("--start-method", choices=["spawn", "forkserver", "fork"],
                   default=DEFAULT_START_METHOD,
                   help="how process workers start (default %(default)s: forked from a server "
                        "that preloaded the Sequence's module; spawn if importing it starts "
                        "threads)")
    g.add_argument("--max-retries", type=int, default=2,
                   help="retries of a batch whose worker died, before reporting it")
    g.add_argument("--batch-timeout", type=float, default=None, metavar="SECONDS",
                   help="replace a worker stuck longer than this on one batch, and retry it")


def _add_ring_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--endpoint", default="",
                   help="ipc:///path.sock or tcp://127.0.0.1:PORT "
                        "(default: $DATASERVER_ENDPOINT or the private runtime directory)")
    g.add_argument("--prefetch", type=int, default=0,
                   help="batches made ahead of each consumer (default: as many as fit in 512 "
                        "MiB or half the free shared memory, 2 per worker (at least 4) to 64)")
    g.add_argument("--slots", type=int, default=0,
                   help="ring slots (default: prefetch + a quarter, at least 4 more)")
    g.add_argument("--slot-bytes", type=_size_or_auto, default=None, metavar="SIZE|auto",
                   help="bytes per slot, e.g. 64MiB (default auto: first batch + 25%%)")
    g.add_argument("--consumer-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="reclaim the leases of a consumer in another pid namespace that sent "
                        "no heartbeat for this long")
    g.add_argument("--curve-keys", default=None, metavar="DIR",
                   help="encrypt and authenticate consumers with ZeroMQ CURVE (keys from "
                        "`dataserver keys DIR`); required for tcp beyond loopback")
    g.add_argument("--insecure", action="store_true",
                   help="allow a tcp endpoint beyond loopback without authentication")


def _add_watch_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--max-worker-memory", default=None, metavar="SIZE",
                   help="replace a worker whose memory (see --memory-kind) exceeds this")
    g.add_argument("--memory-kind", choices=["uss", "pss", "rss"], default="uss",
                   help="the figure --max-worker-memory caps (default uss; the ring's pages "
                        "are left out)")
    g.add_argument("--max-worker-tasks", type=int, default=None, metavar="N",
                   help="replace a worker after it has made N batches")
    g.add_argument("--hang-threshold", type=float, default=60.0, metavar="SECONDS",
                   help="flag a batch in flight longer than this as stuck in status")
    g.add_argument("--metrics", default=None, metavar="ADDR:PORT",
                   help="serve Prometheus metrics over HTTP, e.g. 127.0.0.1:9464")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    g.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="json: one JSON object per line")


def _add_ray_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="ray: run the workers as Ray actors, anywhere in a Ray cluster "
                        "(pip install 'dataserver[ray]')")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="the Ray cluster to join, e.g. ray://head:10001 or auto "
                        "(default: start a private local Ray)")
    g.add_argument("--ray-transport", choices=["auto", "shm", "frames"], default="auto",
                   help="how Ray workers hand batches over: shared memory when on this host "
                        "(auto), or ZeroMQ frames over TCP")


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
        description="Start `dataserver serve SPEC... [options]` (without --endpoint: on a "
                    "fresh socket in the private runtime directory), wait until it is ready, run "
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

    keys = sub.add_parser("keys", help="make CURVE key pairs for --curve-keys")
    keys.add_argument("directory", metavar="DIR")

    status = sub.add_parser("status", help="one snapshot of a server: workers, memory, ring, "
                                           "consumers (exit 0 if it answers: a health check)")
    status.add_argument("--endpoint", default="",
                        help="default: $DATASERVER_ENDPOINT or the default socket")
    status.add_argument("--json", action="store_true", help="stable JSON (docs/status.md)")
    status.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS")
    status.add_argument("--stacks", action="store_true",
                        help="also show the Python stack of every worker (find a stuck "
                             "__getitem__)")

    top = sub.add_parser("top", help="the status view refreshed live, with a memory trend per "
                                     "worker, until Ctrl-C",
                         description="Redraw `dataserver status` every --interval seconds with a "
                                     "memory trend per worker until Ctrl-C (exit 0). Exits 1 if "
                                     "the server does not answer the first request; later "
                                     "outages are shown and retried.")
    top.add_argument("--endpoint", default="",
                     help="default: $DATASERVER_ENDPOINT or the default socket")
    top.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                     help="seconds between refreshes (default %(default)g)")
    top.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                     help="wait this long for each answer (default %(default)g)")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from dataserver.config import ServerConfig
    from dataserver.server import Server
    from dataserver.source import parse_specs

    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: SPECs in the current directory
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    config = ServerConfig(**{k: v for k, v in vars(args).items() if k in names})
    server = Server(config, parse_specs(args.spec, args.arg, args.generator))

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
    setup_logging(getattr(args, "log_level", "WARNING"), getattr(args, "log_format", "text"))
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "launch":
            return _launch(args, head, command)
        if args.command == "demo":
            from dataserver.demo import run_demo

            return run_demo(args.epochs, args.batches, args.workers)
        if args.command == "status":
            from dataserver.config import default_endpoint
            from dataserver.status import run_status

            return run_status(args.endpoint or default_endpoint(), args.json, args.timeout,
                              args.stacks)
        if args.command == "top":
            from dataserver.config import default_endpoint
            from dataserver.top import run_top

            return run_top(args.endpoint or default_endpoint(), args.interval, args.timeout)
        if args.command == "keys":
            from dataserver.curve import make_keys

            for made in make_keys(args.directory):
                print(f"made {made}")
            print(f"dataserver keys: server and consumer keys in {args.directory}; copy "
                  "server.key and client.key_secret (and client.key) to the trainer's host")
            return 0
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
