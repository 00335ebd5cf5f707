"""Pipeline-stage decoding: S processes, each owning contiguous segments (stage boundaries at exits).

Stage 0 embeds the current tokens and runs its segments. A token that exits inside stage 0 is done:
stage 0 moves on to the next token at once. A token that continues past stage 0's last exit is sent on
(with the tokens queued at that exit, "carried") and stage 0 waits for its sampled token, which comes
back from whichever stage it exits in. Tokens that exit exactly at a stage's last exit are forwarded
right away as eager work: the next stages complete their upper layers while stage 0 is busy with later
tokens, instead of waiting for a future token to carry them. Randomness is keyed by (seed, sequence,
position, exit), so the tokens equal single-process decoding.

Messages (torch.distributed point-to-point; gloo on CPU, NCCL on GPU), B = rows:
    stage s -> s+1  header int64 [kind, R, T, rows(B), starts(B), counts(B), decide(B), sequence ids(B)],
                    then the packed hidden [1, T, d]
    stage s -> 0    result int64 [count, rows(B), tokens(B), exits(B)]
kind 1 = work, 0 = stop. Work that starts at position 0 begins a new sequence in its row (continuous
batching), so every stage resets that row's queues. A stage answers every work message that has deciding
rows exactly once (count may be 0 when all of them went on), so stage 0 receives from stages 1, 2, ... in
order with explicit sources (NCCL has no receive-from-any). Every channel is FIFO, and stage 0 starts its
next tick only after all results of the current one arrived, so there is no cycle of blocking sends.
Each tick of stage 0 therefore completes every current token (the engine runs without a TickSchedule): the
rows of a pipeline advance in lockstep, while prompts still enter freed rows as in single-process decoding.
"""
from __future__ import annotations

import os
import time
import traceback

import torch

from nvium_dist.inference.driver import Driver, load_decode_model
from nvium_dist.inference.engine import StageEngine, use_decode_layout

WORK, STOP = 1, 0
_PRELOAD = ("torch", "megatron.core.tensor_parallel", "nvium_dist.model", "nvium_dist.mixture",
            "nvium_dist.inference.generator")


def stage_segments(num_segments: int, segment_layers: list[int], stages: int) -> list[range]:
    """Contiguous split of the segments into `stages` parts minimising the largest layer count
    (ties: lighter early stages, since stage 0 runs for every token)."""
    if not 1 <= stages <= num_segments:
        raise ValueError(f"pipeline_stages={stages}: the model has {num_segments} segments (stages split at exits); "
                         f"use 1..{num_segments}")
    best = None
    from itertools import combinations

    for cuts in combinations(range(1, num_segments), stages - 1):
        bounds = [0, *cuts, num_segments]
        loads = [sum(segment_layers[bounds[i]:bounds[i + 1]]) for i in range(stages)]
        key = (max(loads), loads)
        if best is None or key < best[0]:
            best = (key, bounds)
    bounds = best[1]
    return [range(bounds[i], bounds[i + 1]) for i in range(stages)]


def _header_size(batch: int) -> int:
    return 3 + 5 * batch


def _send_work(work, engine, dst: int, device) -> None:
    import torch.distributed as dist

    batch = engine.batch
    header = torch.zeros(_header_size(batch), dtype=torch.long)
    r = len(work.rows)
    header[0], header[1], header[2] = WORK, r, work.hidden.shape[1]
    for k, values in enumerate((work.rows, work.starts, work.counts, [int(d) for d in work.decide],
                                [engine.sequence_ids[row] for row in work.rows])):
        header[3 + k * batch:3 + k * batch + r] = torch.tensor(values)
    dist.send(header.to(device), dst)
    dist.send(work.hidden.contiguous(), dst)


def _send_stop(batch: int, dst: int, device) -> None:
    import torch.distributed as dist

    header = torch.zeros(_header_size(batch), dtype=torch.long)
    header[0] = STOP
    dist.send(header.to(device), dst)


def _send_results(results: dict, batch: int, device) -> None:
    import torch.distributed as dist

    message = torch.zeros(1 + 3 * batch, dtype=torch.long)
    rows = sorted(results)
    message[0] = len(rows)
    for i, row in enumerate(rows):
        token, exit = results[row]
        message[1 + i], message[1 + batch + i], message[1 + 2 * batch + i] = row, token, exit
    dist.send(message.to(device), 0)


def _worker_loop(engine, rank: int, stages: int, hidden_size: int, device) -> None:
    import torch.distributed as dist

    batch = engine.batch
    header = torch.zeros(_header_size(batch), dtype=torch.long, device=device)
    while True:
        dist.recv(header, rank - 1)
        h = header.cpu()
        if int(h[0]) == STOP:
            if rank + 1 < stages:
                _send_stop(batch, rank + 1, device)
            return
        r, total = int(h[1]), int(h[2])
        rows, starts, counts, decide_flags, sequence_ids = (h[3 + k * batch:3 + k * batch + r].tolist()
                                                            for k in range(5))
        hidden = torch.empty(1, total, hidden_size, dtype=engine.dtype, device=device)
        dist.recv(hidden, rank - 1)
        for row, start, sequence_id in zip(rows, starts, sequence_ids):
            if start == 0:
                engine.reset_row(row, sequence_id)
        engine.write_input(rows, starts, counts, hidden)
        decide = [row for row, flag in zip(rows, decide_flags) if flag]
        engine.start_tokens(decide)
        engine.complete([row for row, flag in zip(rows, decide_flags) if not flag])
        out = engine.tick()
        if decide:  # exactly one answer per message with deciding rows (possibly empty: all went on)
            _send_results(out.results, batch, device)
        if out.forward is not None and rank + 1 < stages:
            _send_work(out.forward, engine, rank + 1, device)


def _driver_loop(engine, model, stages: int, prompts, sequence_ids, max_new_tokens, eos_id, flush: bool, device):
    """Stage 0: the single-process Driver, with the upper stages in other processes."""
    import torch.distributed as dist

    batch = engine.batch
    message = torch.zeros(1 + 3 * batch, dtype=torch.long, device=device)

    def step():
        out = engine.tick()
        results = dict(out.results)
        waiting = 0
        if out.forward is not None:
            _send_work(out.forward, engine, 1, device)
            waiting = sum(out.forward.decide)
        source = 1
        while waiting:  # stage 1 answers first, then each later stage that still had deciding rows
            dist.recv(message, source)
            source += 1
            m = message.cpu()
            count = int(m[0])
            for i in range(count):
                results[int(m[1 + i])] = (int(m[1 + batch + i]), int(m[1 + 2 * batch + i]))
            waiting -= count
        return results

    driver = Driver(engine, model, prompts, sequence_ids, max_new_tokens, eos_id, flush)
    driver.run(step)
    _send_stop(batch, 1, device)
    return driver


def stage_device(rank: int, stages: int, device: str) -> torch.device:
    """Stage `rank`'s device: on CUDA GPU `rank` (its LOCAL_RANK, which init_distributed selects), since
    NCCL cannot put two ranks on one GPU; else the CPU. Fewer visible GPUs than stages is an error."""
    if device != "cuda":
        return torch.device("cpu")
    available = torch.cuda.device_count()
    if stages > available:
        raise ValueError(f"pipeline_stages={stages} on CUDA needs {stages} GPUs but {available} are visible (NCCL "
                         f"cannot share a GPU between stages): use at most {available} stages, or device='cpu'")
    return torch.device("cuda", rank)


def _stage_main(rank: int, stages: int, port: int, job: dict, queue) -> None:
    import torch.distributed as dist

    from nvium_dist.parallel import put_result

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(stages), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(job["threads"])
    try:
        from nvium_dist.checkpoint_io import load_export

        device = job["device"]
        if device == "cuda":
            torch.cuda.set_device(stage_device(rank, stages, device))
        export_config = _model_config(job["export_dir"])
        ranges = export_config.segment_ranges
        segments = stage_segments(len(ranges), [b - a for a, b in ranges], stages)[rank]
        keep = {i for j in segments for i in range(*ranges[j])}
        model = load_decode_model(load_export(job["export_dir"]), device=device, keep_layers=keep)
        use_decode_layout(model)
        device = next(model.parameters()).device
        prompts, max_new_tokens = job["prompts"], job["max_new_tokens"]
        max_len = max(len(p) + n for p, n in zip(prompts, max_new_tokens))
        with torch.inference_mode():
            engine = StageEngine(model, segments, job["rows"], max_len, job["seed"], full_depth=job["mode"] == "full")
            dist.barrier()
            start = time.perf_counter()
            if rank == 0:
                driver = _driver_loop(engine, model, stages, prompts, job["sequence_ids"], max_new_tokens,
                                      job["eos_id"], job["flush"], device)
                result = {"tokens": driver.tokens, "exits": driver.exits, "rows": driver.rows,
                          "seconds": time.perf_counter() - start}
            else:
                _worker_loop(engine, rank, stages, export_config.hidden_size, device)
                result = {}
        if job.get("return_caches"):
            result["caches"] = {layer: (engine.cache.keys[layer].cpu(), engine.cache.values[layer].cpu())
                                for layer in engine.cache.keys}
        put_result(queue, rank, "ok", result)
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        put_result(queue, rank, "error", traceback.format_exc())
    finally:
        try:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def _model_config(export_dir):
    import json
    from pathlib import Path

    from nvium_dist.config import model_config_from_dict

    return model_config_from_dict(json.loads((Path(export_dir) / "config.json").read_text())["model"])


def run_pipeline(export_dir: str, stages: int, prompts, max_new_tokens: list[int], seed: int, mode: str, eos_id,
                 sequence_ids, flush: bool, device: str = "cpu", rows: int | None = None, threads: int = 1,
                 return_caches: bool = False, timeout: float = 600.0) -> dict:
    """Decodes with `stages` processes over `rows` rows (default: one per prompt);
    -> {"tokens", "exits", "rows", "seconds" (stage 0's decode time), "caches"?}."""
    from nvium_dist.parallel import WorkerFailure, collect_results, forkserver_context, free_port

    config = _model_config(export_dir)
    stage_segments(config.num_heads_total, [b - a for a, b in config.segment_ranges], stages)  # validates
    stage_device(stages - 1, stages, device)  # validates: one GPU per stage
    ctx = forkserver_context(_PRELOAD)
    queue = ctx.Queue()
    port = free_port()
    job = dict(export_dir=str(export_dir), prompts=prompts, max_new_tokens=list(max_new_tokens), seed=seed,
               mode=mode, eos_id=eos_id, sequence_ids=list(sequence_ids), flush=flush, device=device, threads=threads,
               rows=rows or len(prompts), return_caches=return_caches)
    procs = [ctx.Process(target=_stage_main, args=(rank, stages, port, job, queue), daemon=True)
             for rank in range(stages)]
    for p in procs:
        p.start()
    try:
        results = collect_results(queue, procs, timeout)
    except WorkerFailure as failure:
        raise RuntimeError(f"pipeline decoding failed: {failure}") from None
    result = dict(results[0])
    if return_caches:
        caches = {}
        for rank in range(stages):
            caches.update(results[rank]["caches"])
        result["caches"] = caches
    return result
