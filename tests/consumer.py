"""A consumer process for tests: reads epochs and prints what it saw as JSON.

    python consumer.py ENDPOINT EPOCHS [hold | shard=RANK/WORLD]

Prints one JSON line per epoch: [[index, sha1 of x], ...]. With ``hold``, it reads half of the
first epoch, keeps every batch, prints "holding", and sleeps until killed; with ``shard=``, it
reads that shard.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

from dataserver.client import RemoteSequence


def main() -> None:
    endpoint, epochs = sys.argv[1], int(sys.argv[2])
    hold = sys.argv[3:] == ["hold"]
    shard = (0, 1)
    if sys.argv[3:4] and sys.argv[3].startswith("shard="):
        rank, world = sys.argv[3].removeprefix("shard=").split("/")
        shard = (int(rank), int(world))
    with RemoteSequence(endpoint, timeout=20, shard=shard) as seq:
        kept = []
        for _ in range(epochs):
            seen = []
            for x, y in seq:
                seen.append([int(y[0]), hashlib.sha1(x.tobytes()).hexdigest()])
                if hold:
                    kept.append((x, y))
                    if len(kept) == len(seq) // 2:
                        print("holding", flush=True)
                        time.sleep(3600)
            print(json.dumps(seen), flush=True)
            seq.on_epoch_end()


if __name__ == "__main__":
    main()
