"""Called in the loader fork server (``_server_dies_with_parent``, its preload) and in every loader worker: the
process is killed when its parent ends, however the parent ends (``kill -9`` of the trainer, the OOM killer).

Linux's ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the fork server's parent is the trainer, a worker's parent the fork
server, so a dead trainer takes the server with it and the server its workers. (They keep the stop signals
blocked on purpose, and a worker's parent is the live server, so neither torch's worker watchdog nor SIGTERM
would end them.) The setting is not inherited across fork, hence one call per process. Elsewhere: nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent ends; True where that is possible (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent ended before the request took effect
        os._exit(1)
    return True

