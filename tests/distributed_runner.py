"""Runs a function in N real torch.distributed (gloo) processes.

Processes come from a forkserver that has already imported torch and megatron-core, so each test pays
well under a second of start-up instead of ~10 s per spawned process.

A rank that dies (a crash, os._exit) fails the run at once with its exit code and, after a crash, its Python
stacks (faulthandler); a run that sends no result within `timeout` has every live rank write its stacks before
it is killed, and the error carries them, so a hang in CI says where it hung.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from nvium_dist.parallel import WorkerFailure, collect_results, forkserver_context, free_port, put_result

_PRELOAD = ("torch", "megatron.core.tensor_parallel", "nvium_dist.model", "nvium_dist.mixture")
STACKS_SIGNAL = signal.SIGUSR2  # the trainer handles SIGTERM, SIGUSR1 and SIGINT itself


def _worker(fn, rank, world_size, port, args, queue, stacks_dir=None):
    import torch
    import torch.distributed as dist

    stacks = open(Path(stacks_dir) / f"rank{rank}.txt", "w") if stacks_dir else sys.stderr
    faulthandler.enable(stacks, all_threads=True)
    faulthandler.register(STACKS_SIGNAL, stacks, all_threads=True)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        put_result(queue, rank, "ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the traceback
        put_result(queue, rank, "error", traceback.format_exc())
    finally:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def _stacks(stacks_dir: str, ranks: list[int]) -> str:
    """What faulthandler wrote for `ranks` (a crash report, or the stacks a hung rank dumped on STACKS_SIGNAL)."""
    dumps = {r: (Path(stacks_dir) / f"rank{r}.txt").read_text() for r in ranks}
    return "".join(f"\n--- rank {r} ---\n{text}" for r, text in dumps.items() if text)


def _dump_stacks(procs: list, ranks: list[int]) -> None:
    for r in ranks:
        if procs[r].is_alive():
            os.kill(procs[r].pid, STACKS_SIGNAL)
    time.sleep(2)


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """fn(rank, world_size, *args) in `world_size` processes; returns their results ordered by rank."""
    ctx = forkserver_context(_PRELOAD)
    queue = ctx.Queue()
    port = free_port()
    stacks_dir = tempfile.TemporaryDirectory(prefix="nvium-stacks-")
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, queue, stacks_dir.name))
             for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        results = collect_results(queue, procs, timeout, on_timeout=lambda ranks: _dump_stacks(procs, ranks))
    except WorkerFailure as failure:
        raise RuntimeError(f"distributed worker failed: {failure}{_stacks(stacks_dir.name, failure.ranks)}") \
            from None
    finally:
        stacks_dir.cleanup()
    return [results[r] for r in range(world_size)]
