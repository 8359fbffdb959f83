"""Imported by the fork server (start method ``forkserver``) after dataserver's own modules.

It imports the Sequences' modules named in ``DATASERVER_PRELOAD`` (set by the pool), so every
worker forked from the fork server shares their pages copy-on-write instead of importing them
again: a Sequence module that imports torch costs each spawned worker ~130 MiB of its own.
A module that fails to import here is left to the worker, which imports it again and reports
the error as it would without this.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys

ENV = "DATASERVER_PRELOAD"
#: The server's sys.path (os.pathsep-joined): the fork server starts with Python's default one.
PATH_ENV = "DATASERVER_PRELOAD_PATH"

for _entry in filter(None, os.environ.get(PATH_ENV, "").split(os.pathsep)):
    if _entry not in sys.path:
        sys.path.append(_entry)
for _name in filter(None, os.environ.get(ENV, "").split(",")):
    with contextlib.suppress(BaseException):
        importlib.import_module(_name)

# Freeze what is loaded by now: the collector then never walks these objects again, and a walk
# writes to every object it visits, which in a forked worker copies each page it touches (a
# worker of a Sequence module that imports torch: 49 MiB of its own without this, 14 with).
gc.freeze()
