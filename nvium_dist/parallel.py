"""Process groups: torch.distributed + megatron-core parallel_state, and the adapter DeepSpeed expects.

Megatron lays ranks out tensor-parallel fastest, then data, then pipeline; DeepSpeed's
PipeModelDataParallelTopology(pipe, data, model) puts model fastest, then data, then pipe. The two
agree, and `check_rank_layout` asserts it at start-up rather than trusting it.

On GPU the default group is `cpu:gloo,cuda:nccl`, and every reduction of bookkeeping values (loss
totals, evaluation sums, stop flags) goes through `all_reduce` here, which runs it on the device of
the group's backend: NCCL accepts only CUDA tensors, and the megatron subgroups may be NCCL-only.
"""
from __future__ import annotations

import datetime
import functools
import os
import pickle
import queue as queue_module
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nvium_dist.config import ParallelConfig


@dataclass
class ParallelInfo:
    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def forkserver_context(preload: tuple[str, ...]):
    """A multiprocessing context whose server has already imported `preload` (torch, megatron-core):
    each process it starts costs well under a second instead of ~10 s of imports."""
    import torch.multiprocessing as mp

    context = mp.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    return context


def put_result(queue, rank: int, status: str, value) -> None:
    """Sends a worker's one result to its parent by value and returns once it is in the pipe. A tensor put on a
    torch.multiprocessing queue travels as a file descriptor that the parent fetches from the worker's process
    when it reads the queue; a worker that has exited by then makes the parent's read fail (FileNotFoundError
    on the resource sharer's socket). The queue's feeder thread writes the pipe and needs the GIL, so the
    result is flushed before the worker's teardown (destroy_process_group) can hold the GIL or hang."""
    queue.put((rank, status, pickle.dumps(value)))
    queue.close()
    queue.join_thread()


def get_result(queue, timeout: float) -> tuple[int, str, object]:
    """(rank, status, value) of the next result a worker sent with put_result."""
    rank, status, payload = queue.get(timeout=timeout)
    return rank, status, pickle.loads(payload)  # our own workers' bytes, never a file's


class WorkerFailure(RuntimeError):
    """A worker process raised, died without a result or sent none in time; `ranks` names those workers."""

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


def collect_results(queue, procs: list, timeout: float, on_timeout=None) -> dict[int, object]:
    """The value each worker in `procs` (index = rank) sent with put_result -> {rank: value}. Raises WorkerFailure
    at the first worker that raised (its traceback), or that exited without a result (its exit code: a crash is
    known at once, not at the timeout), or when `timeout` seconds pass, after `on_timeout(waiting ranks)`. Either
    way the workers are reaped: each gets 10 s to finish its teardown (0.5 s after a failure), then is killed."""
    results, deadline, failed = {}, time.monotonic() + timeout, True
    try:
        while len(results) < len(procs):
            rank, status, value = _next_result(queue, procs, results, deadline, timeout, on_timeout)
            if status != "ok":
                raise WorkerFailure(f"rank {rank}:\n{value}", [rank])
            results[rank] = value
        failed = False
    finally:
        for p in procs:
            p.join(timeout=0.5 if failed else 10)
            if p.is_alive():
                p.kill()
    return results


def _next_result(queue, procs: list, results: dict, deadline: float, timeout: float, on_timeout):
    while True:
        try:
            return get_result(queue, timeout=1.0)
        except queue_module.Empty:
            pass
        exited = [r for r, p in enumerate(procs) if r not in results and p.exitcode is not None]
        if exited:
            try:  # a result written just before its worker exited
                return get_result(queue, timeout=1.0)
            except queue_module.Empty:
                raise WorkerFailure("died without a result: " + ", ".join(
                    f"rank {r} exit code {procs[r].exitcode}" for r in exited), exited) from None
        if time.monotonic() > deadline:
            waiting = [r for r in range(len(procs)) if r not in results]
            if on_timeout is not None:
                on_timeout(waiting)
            raise WorkerFailure(f"workers {waiting} sent no result in time ({timeout:.0f} s)", waiting)


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def init_distributed(parallel: ParallelConfig, timeout_minutes: float = 30) -> ParallelInfo:
    """Initialises torch.distributed from torchrun's environment (a single process works without it)
    and megatron-core's parallel_state with the configured TP and PP sizes."""
    from megatron.core import parallel_state

    if parallel.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("parallel.device=cuda but no CUDA device is visible; use --set parallel.device=cpu")
    if not dist.is_initialized():
        rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        launched = "TORCHELASTIC_RUN_ID" in os.environ  # torchrun's own store serves that port
        if world_size > 1 and "MASTER_PORT" not in os.environ:
            raise RuntimeError("WORLD_SIZE > 1 without MASTER_PORT: launch with torchrun (or srun + torchrun)")
        if world_size == 1 and not launched:
            # a lone process may have inherited its parent's MASTER_PORT, which is already bound
            os.environ["MASTER_PORT"] = str(free_port())
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it
        if parallel.device == "cuda":
            torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
            # a collective that fails or passes `timeout` tears the process down instead of blocking forever
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(
            backend=process_group_backend(parallel.device),
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    world_size = dist.get_world_size()
    parallel.data_parallel_size(world_size)  # raises a ConfigError when the sizes do not divide
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
    )
    return current_parallel_info(parallel.device)


def process_group_backend(device: str) -> str:
    """gloo on CPU; on GPU NCCL for CUDA tensors plus gloo for whatever host-side collective remains."""
    return "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"


def collective_device(group=None) -> torch.device:
    """Where a collective over `group` must run: the current CUDA device if its backend is NCCL."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """In-place all-reduce of a tensor on any device, run on the group's collective device. A group of one
    process returns the tensor as it is (a gloo call there costs more than the step's loss arithmetic)."""
    if dist.get_world_size(group) == 1:
        return tensor
    device = collective_device(group)
    if tensor.device == device:
        dist.all_reduce(tensor, op=op, group=group)
        return tensor
    on_device = tensor.to(device)
    dist.all_reduce(on_device, op=op, group=group)
    return tensor.copy_(on_device)


def broadcast_object(obj, src: int = 0, group=None):
    """`obj` from global rank `src` on every rank of `group` (picklable, small: decisions, not weights)."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=group, device=collective_device(group))
    return holder[0]


def gather_object(obj, dst: int = 0, group=None) -> list | None:
    """Every rank's `obj` as a list on global rank `dst` (None elsewhere); small objects only (torch stages
    the pickles on the collective device, world-size of them on `dst`)."""
    gathered = [None] * dist.get_world_size(group) if dist.get_rank() == dst else None
    dist.gather_object(obj, gathered, dst=dst, group=group)
    return gathered


def all_gather_object(obj, group=None) -> list:
    """Every rank's `obj` as a list by rank in `group`, on every rank (small objects only)."""
    if dist.get_world_size(group) == 1:
        return [obj]
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def current_parallel_info(device: str = "cpu") -> ParallelInfo:
    from megatron.core import parallel_state as ps

    torch_device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    return ParallelInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        device=torch_device,
    )


_single_rank_group: tuple | None = None  # (the default group it was made under, the group)


def tensor_parallel_group(tensor_parallel: int):
    """The process group a model built for `tensor_parallel` ranks splits its layers over.

    megatron's layers fall back to parallel_state's TP group whenever they get None, so a full (TP=1)
    model built inside a TP>1 job (checking a checkpoint's shapes, counting parameters) would come out
    sharded. For TP=1 this returns a group of this process alone; for TP>1 parallel_state's TP group,
    which must have that size. None without torch.distributed (building on the meta device).
    """
    from megatron.core import parallel_state

    global _single_rank_group
    if not dist.is_initialized():
        if tensor_parallel > 1:
            raise RuntimeError("tensor_parallel > 1 needs torch.distributed and parallel_state initialised first")
        return None
    if tensor_parallel == 1:
        if _single_rank_group is None or _single_rank_group[0] is not dist.group.WORLD:
            # only this rank takes part in creating it, so any rank may ask for it at any time
            group = dist.new_group([dist.get_rank()], use_local_synchronization=True)
            _single_rank_group = (dist.group.WORLD, group)
        return _single_rank_group[1]
    live = parallel_state.get_tensor_model_parallel_group() if parallel_state.model_parallel_is_initialized() else None
    if live is None or live.size() != tensor_parallel:
        raise RuntimeError(f"a model for tensor_parallel={tensor_parallel} needs parallel_state initialised with that "
                           f"TP size (it has {live.size() if live is not None else 'none'})")
    return live


class DeepSpeedMPU:
    """The legacy accessor names `deepspeed.initialize(mpu=...)` calls, over megatron-core parallel_state.

    DeepSpeed treats "model parallel" as the tensor-parallel group here; pipeline stages are DeepSpeed's
    own business through PipelineModule's topology.
    """

    def __init__(self):
        from megatron.core import parallel_state

        self._ps = parallel_state

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    # ZeRO-3 and the pipeline engine ask for these names as well.
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_group = get_model_parallel_group


def check_rank_layout(info: ParallelInfo) -> None:
    """Asserts that DeepSpeed's pipe/data/model topology gives this rank the coordinates megatron gave it."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topology = PipeModelDataParallelTopology(num_pp=info.pp_size, num_mp=info.tp_size, num_dp=info.dp_size)
    coord = topology.get_coord(info.rank)
    expected = (info.pp_rank, info.dp_rank, info.tp_rank)
    if (coord.pipe, coord.data, coord.model) != expected:
        raise RuntimeError(
            f"rank {info.rank}: DeepSpeed topology says (pipe, data, model) = {(coord.pipe, coord.data, coord.model)} "
            f"but megatron parallel_state says {expected}; the two layouts disagree")
