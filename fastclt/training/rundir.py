"""One writer per run folder, and workers that die with their launcher.

``RunLock``: rank 0 holds an exclusive ``flock`` on ``out_dir/.lock`` while the run writes there.
The kernel releases it when the process exits, however it exits (``kill -9`` included), so a
crashed run never leaves a stale lock; a second run on the same folder is refused with the holder's
pid, host and start time (recorded in the file). ``flock`` needs a filesystem that implements it
across the processes that share ``out_dir`` (local filesystems; NFSv4 and Lustre with flock
enabled for several nodes).

``die_with_parent``: a worker started by ``torchrun`` runs in its own process session, so killing
the launcher with SIGKILL would leave the workers training (and racing a rerun). On Linux the
worker asks the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

__all__ = ["RunLock", "LOCK_FILE", "probe_writable", "die_with_parent"]

LOCK_FILE = ".lock"


class RunLock:
    """An exclusive, non-blocking lock on a run folder (see the module docstring)."""

    def __init__(self, out_dir) -> None:
        self.path = Path(out_dir) / LOCK_FILE
        self.fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """Take the lock: None on success, else who holds it (a sentence). OSError when the folder
        cannot be written."""
        import fcntl
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.read(fd, 4096) or b"{}")
            except (ValueError, OSError):
                holder = {}
            os.close(fd)
            if not isinstance(holder, dict):
                holder = {}
            return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, running since "
                    f"{holder.get('started', '?')}")
        except OSError:
            os.close(fd)
            raise
        try:  # who holds it, for the message a second run gets; also proves the folder takes writes
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
            os.fsync(fd)
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


def probe_writable(folder: Path, rank: int) -> None:
    """Create, write, fsync and delete a small file in ``folder``: OSError when it cannot be written
    (read-only, full, missing permissions). The name is a temporary file's, cleaned if left over."""
    path = Path(folder) / f".write_test.rank{rank}.tmp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.write(fd, b"fastclt\n" * 512)
        os.fsync(fd)
    finally:
        os.close(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent (the torchrun agent) dies; exit at once
    when the parent is already gone. True when set (Linux), False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal
    parent = os.getppid()
    PR_SET_PDEATHSIG = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent or parent == 1:  # the launcher died before the request took effect
        os._exit(1)
    return True
