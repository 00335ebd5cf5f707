"""One trainer per run directory: an exclusive lock on RUN_DIR/.lock, held by rank 0 for the run's lifetime.

flock(2) locks belong to the open file, so the kernel drops the lock when the holder exits or is killed;
a stale RUN_DIR/.lock file left behind is harmless. The file names the holder for the error message.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunDirInUseError(RuntimeError):
    """Another trainer holds the run directory."""


class RunDirLock:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._file = None

    def acquire(self) -> None:
        """Takes the lock or raises RunDirInUseError naming the process that holds it."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise NotADirectoryError(f"training.run_dir {self.run_dir} is a file; choose a directory")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirInUseError(f"run directory {self.run_dir} is in use by {holder} (lock {self.path}); wait "
                                   "for that training to finish, stop it, or choose another training.run_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"trainer pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases the flock
            self._file = None
