"""Runs a function in N real torch.distributed (gloo) processes.

Processes come from a forkserver that has already imported torch and megatron-core, so each test pays
well under a second of start-up instead of ~10 s per spawned process.
"""
from __future__ import annotations

import os
import traceback

from nvium_dist.parallel import forkserver_context, free_port, get_result, put_result

_PRELOAD = ("torch", "megatron.core.tensor_parallel", "nvium_dist.model", "nvium_dist.mixture")


def _worker(fn, rank, world_size, port, args, queue):
    import torch
    import torch.distributed as dist

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


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """fn(rank, world_size, *args) in `world_size` processes; returns their results ordered by rank."""
    ctx = forkserver_context(_PRELOAD)
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, value = get_result(queue, timeout=timeout)
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
