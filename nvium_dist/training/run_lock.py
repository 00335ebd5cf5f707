"""One trainer per run directory: an exclusive lock on RUN_DIR/.lock, held by rank 0 for the run's lifetime.

flock(2) locks belong to the open file, so the kernel drops the lock when the holder exits or is killed;
a stale RUN_DIR/.lock file left behind is harmless. The file names the holder for the error message.

Some cluster filesystems have no flock (Lustre mounted `noflock`: ENOSYS). There the lock is a file created
with O_CREAT|O_EXCL (atomic on Lustre and NFSv3+), RUN_DIR/.lock.excl, that names its holder's host and pid
and is removed at release or exit. Its holder touches it every HEARTBEAT_SECONDS; a holder that was killed
leaves it behind, and the file counts as stale (and is replaced) when its pid is gone on this host or its
heartbeat is older than STALE_SECONDS (a job requeued onto another node after a crash).
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import os
import socket
import threading
import time
from pathlib import Path

from nvium_dist.output_dir import process_exists

LOCK_FILE = ".lock"
EXCLUSIVE_LOCK_FILE = ".lock.excl"
# flock unsupported by the filesystem (Lustre noflock: ENOSYS; some FUSE and NFS setups: the others)
NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK)
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0


class RunDirInUseError(RuntimeError):
    """Another trainer holds the run directory."""


def _holder_line() -> str:
    return f"trainer pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"


def _in_use(run_dir: Path, holder: str, lock: Path) -> RunDirInUseError:
    return RunDirInUseError(f"run directory {run_dir} is in use by {holder} (lock {lock}); wait for that training "
                            "to finish, stop it, or choose another training.run_dir")


class RunDirLock:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.exclusive_path = self.run_dir / EXCLUSIVE_LOCK_FILE
        self._file = None
        self._owns_exclusive_file = False

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
            raise _in_use(self.run_dir, holder, self.path) from None
        except OSError as err:
            handle.close()
            if err.errno not in NO_FLOCK:
                raise
            self._acquire_exclusive_file(err)
            return
        handle.seek(0)
        handle.truncate()
        handle.write(_holder_line())
        handle.flush()
        self._file = handle

    def _acquire_exclusive_file(self, flock_error: OSError) -> None:
        for _ in range(2):  # a second try after removing a dead holder's file
            try:
                fd = os.open(self.exclusive_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._remove_if_dead_holder():
                    break
                continue
            except OSError as err:  # an OSError, so the trainer's CLI prints it as one line
                raise OSError(
                    f"cannot lock run directory {self.run_dir}: flock is not supported there ({flock_error.strerror}) "
                    f"and creating {self.exclusive_path} failed ({err.strerror}); put training.run_dir on a "
                    "filesystem with flock or exclusive file creation") from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}\n{_holder_line()}")
            self._owns_exclusive_file = True
            atexit.register(self.release)
            self._start_heartbeat()
            return
        holder = self._read_exclusive_file()
        raise RunDirInUseError(
            f"run directory {self.run_dir} is in use by {holder[2] if holder else 'another process'} (lock "
            f"{self.exclusive_path}; this filesystem has no flock). If that trainer is no longer running, delete "
            f"{self.exclusive_path} or wait {STALE_SECONDS:.0f} s after its last heartbeat")

    def _read_exclusive_file(self) -> tuple[str, int, str] | None:
        """(host, pid, holder line) from the exclusive lock file; None when it is unreadable or half-written."""
        try:
            first, line = self.exclusive_path.read_text().splitlines()[:2]
            host, pid = first.split()
            return host, int(pid), line
        except (OSError, ValueError):
            return None

    def _start_heartbeat(self) -> None:
        stop = self._heartbeat_stop = threading.Event()

        def beat():
            while not stop.wait(HEARTBEAT_SECONDS):
                try:
                    os.utime(self.exclusive_path)
                except OSError:
                    return

        threading.Thread(target=beat, name="run-dir-lock-heartbeat", daemon=True).start()

    def _remove_if_dead_holder(self) -> bool:
        """Removes a lock file whose holder is gone (dead pid on this host, or no heartbeat for STALE_SECONDS);
        True if removed."""
        try:
            silent = time.time() - self.exclusive_path.stat().st_mtime
        except FileNotFoundError:
            return True
        holder = self._read_exclusive_file()
        dead_here = holder is not None and holder[0] == socket.gethostname() and not process_exists(holder[1])
        if not (dead_here or silent > STALE_SECONDS):
            return False
        self.exclusive_path.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases the flock
            self._file = None
        if self._owns_exclusive_file:
            self._heartbeat_stop.set()
            self.exclusive_path.unlink(missing_ok=True)
            self._owns_exclusive_file = False
