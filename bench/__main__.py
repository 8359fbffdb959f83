"""``python -m bench [--quick] [--sizes 4KiB,1MiB] [--cpu-us 0] [--only inline,process]``.

Spawned server and worker processes re-import this module under another name; the guard keeps
them from running the benchmark again.
"""

import sys

from bench.run import main

if __name__ == "__main__":
    sys.exit(main())
