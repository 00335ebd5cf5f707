"""Hang watchdog: a daemon thread on every rank that ends the process when training stops making progress.

The loop calls `beat(phase, step)` whenever it starts a step, a save or an evaluation. If no beat comes for
training.hang_timeout_s (a rank stuck in a collective because a peer froze, a dead filesystem), the thread
writes every thread's stack to stderr (the rank's log) with faulthandler, one line naming the rank, the step
and the phase, and exits with exit_codes.HUNG, which slurm/pretrain.sbatch requeues. It exits with
os._exit: the main thread is stuck and would never run the interpreter's shutdown.

Once the first rank has gone, its peers' collectives fail with a broken connection rather than hang;
`peers_watched` turns that failure into the same kind of line and exit code.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time

from nvium_dist.exit_codes import HUNG


class HangWatchdog:
    def __init__(self, timeout_s: float, rank: int):
        self.timeout_s = timeout_s
        self.rank = rank
        self._progress = ("start-up", 0, time.monotonic())  # (phase, step, when): replaced whole, read whole
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, phase: str, step: int) -> None:
        """Progress: `phase` ("step", "save", "eval") starts at `step`. The first beat starts the thread."""
        self._progress = (phase, step, time.monotonic())
        if self._thread is None and self.timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="nvium-hang-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    @contextlib.contextmanager
    def peers_watched(self):
        """A collective that fails because a peer rank died or hung exits like a hang, naming where."""
        try:
            yield
        except RuntimeError as error:
            if not lost_peer(error):
                raise
            phase, step, _ = self._progress
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            self._exit(f"lost a peer in {phase} at step {step}: {first_line}")

    def _watch(self) -> None:
        poll = min(5.0, self.timeout_s / 4)
        while not self._stopped.wait(poll):
            phase, step, since = self._progress
            idle = time.monotonic() - since
            if idle >= self.timeout_s:
                self._fire(phase, step, idle)

    def _fire(self, phase: str, step: int, idle: float) -> None:
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        self._exit(f"hung in {phase} at step {step}: no progress for {idle:.0f} s "
                   f"(training.hang_timeout_s={self.timeout_s:g}); stacks above")

    def _exit(self, what: str) -> None:
        print(f"[watchdog] rank {self.rank} {what}; exiting with code {HUNG}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(HUNG)


def lost_peer(error: BaseException) -> bool:
    """A collective's failure because another rank went away or stopped answering (gloo raises a plain
    RuntimeError naming its transport; NCCL a DistBackendError)."""
    import torch.distributed as dist

    return isinstance(error, dist.DistBackendError) or "gloo/transport" in str(error)
