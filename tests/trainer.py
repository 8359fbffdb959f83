"""A tiny trainer for tests/test_launch.py, run by ``dataserver launch ... -- python trainer.py``.

    python trainer.py EXIT_CODE [--wait] [--slow]

Reads the server that launch started (``RemoteSequence()``: the endpoint comes from
``$DATASERVER_ENDPOINT``) and exits with EXIT_CODE. Prints one line per event on stdout:

* default: reads one epoch, checks order, prints ``trainer: read N batches in order``;
* ``--wait``: reads one batch, prints ``trainer: waiting``, then waits for SIGINT or SIGTERM,
  prints ``trainer: got SIGNAME`` and exits with EXIT_CODE;
* ``--slow``: prints ``trainer: reading``, then reads a batch every 50 ms; a
  ``ServerUnavailable`` is printed as ``trainer: ServerUnavailable: ...`` and ends it (exit 1).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from types import FrameType

from dataserver.client import RemoteSequence, ServerUnavailable

WAIT_LIMIT_S = 60.0  # a test that forgets to signal must not leave this running forever


def say(line: str) -> None:
    print(f"trainer: {line}", flush=True)


def wait_for_signal(code: int) -> int:
    def on_signal(signum: int, _frame: FrameType | None) -> None:
        say(f"got {signal.Signals(signum).name}")
        raise SystemExit(code)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    say("waiting")
    deadline = time.monotonic() + WAIT_LIMIT_S
    while time.monotonic() < deadline:
        time.sleep(0.05)
    say("no signal came")
    return 99


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("code", type=int)
    parser.add_argument("--wait", action="store_true")
    parser.add_argument("--slow", action="store_true")
    args = parser.parse_args()
    say(f"endpoint {os.environ['DATASERVER_ENDPOINT']}")
    with RemoteSequence(timeout=10) as seq:
        it = iter(seq)
        got = [int(next(it)[1][0])]
        if args.wait:
            return wait_for_signal(args.code)
        if args.slow:
            say("reading")
            try:
                for _x, y in it:
                    got.append(int(y[0]))
                    time.sleep(0.05)
            except ServerUnavailable as exc:
                say(f"ServerUnavailable: {exc}")
                return 1
        got += [int(y[0]) for _x, y in it]
    if got != list(range(len(got))):
        say(f"out of order: {got}")
        return 98
    say(f"read {len(got)} batches in order")
    return args.code


if __name__ == "__main__":
    sys.exit(main())
