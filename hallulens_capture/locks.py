"""Lock files that a live process holds (flock): how one process tells a live writer from a
dead one's leftovers (a store's shard writer, a vLLM worker's hand-over directory). The kernel
drops a lock when its holder dies, whatever the pid namespace."""

from __future__ import annotations

import fcntl
import os


def held(path: str) -> bool | None:
    """Whether a process holds the lock file at `path` now (False when there is no such file;
    None: cannot tell, e.g. another user's)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # also drops the shared lock just taken
    return False
