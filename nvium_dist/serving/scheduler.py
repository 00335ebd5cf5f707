"""Continuous batching for the server: one thread owns the decoding engines and ticks them.

Requests arrive from the HTTP event loop (`submit`, `cancel`) through a thread-safe control queue and wait in
a bounded FIFO. Between two ticks the scheduler frees the rows of finished or cancelled sequences
(`StageEngine.free_row`), admits waiting sequences into free rows (`reset_row` with the request's seed, then
its prompt is embedded and queued behind its last token, as in `generate`), and then ticks every engine that
has work. Each sampled token goes back to its request's asyncio queue as it is drawn.

Two engines share the row budget (--max-batch rows in all):
    exact      plain sampling from p_mix: deferred decoding (or every layer, for a full-depth server)
    transform  temperature / top-k / top-p / greedy: every head, the request's transform of p_mix; made with
               its own KV cache when the first such request arrives
A choice `i` of a request with seed s draws the tokens of `NviumGenerator.generate(prompts, seed=s)` for its
sequence i whatever shares the batch: every random number is keyed by (seed, sequence, position, exit).
"""
from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from nvium_dist.inference.engine import StageEngine, TickSchedule
from nvium_dist.inference.driver import feed_rows
from nvium_dist.inference.generator import NviumGenerator
from nvium_dist.inference.sampling import SamplingTransform


@dataclass
class Choice:
    """One sequence of a request: prompt `index` // n, sampled as sequence `index` of the request's seed."""
    request: "Request"
    index: int
    prompt: list[int]
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    row: int | None = None
    last_time: float = 0.0


@dataclass
class Request:
    prompts: list[list[int]]
    max_tokens: int
    n: int
    seed: int
    transform: SamplingTransform | None  # None: exact sampling from p_mix
    events: asyncio.Queue  # ("token", choice, token, exit) / ("done", choice, finish_reason)
    loop: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.perf_counter)
    choices: list[Choice] = field(default_factory=list)
    unadmitted: int = 0  # choices still waiting for a row

    def __post_init__(self):
        self.choices = [Choice(self, i, self.prompts[i // self.n], self.max_tokens)
                        for i in range(len(self.prompts) * self.n)]
        self.unadmitted = len(self.choices)

    def emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


class _Lane:
    """One engine and its rows: which choice holds each row, and the inputs to embed before the next tick."""

    def __init__(self, engine: StageEngine):
        self.engine = engine
        self.occupant: list[Choice | None] = [None] * engine.batch
        self.inputs: dict[int, tuple[list[int], int, bool]] = {}

    def free_rows(self) -> list[int]:
        return [row for row, choice in enumerate(self.occupant) if choice is None]

    def release(self, row: int) -> None:
        self.engine.free_row(row)
        self.occupant[row] = None
        self.inputs.pop(row, None)


class Scheduler:
    def __init__(self, generator: NviumGenerator, max_batch: int, max_queue: int, full_depth: bool = False,
                 metrics=None):
        self.generator, self.model = generator, generator.model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.full_depth = full_depth
        self.metrics = metrics
        self.eos_id = generator.tokenizer.eos_id
        config = generator.config
        self.num_layers = config.num_layers
        self.exit_layers = config.exit_layers
        self.segment_layers = [b - a for a, b in config.segment_ranges]
        self.lanes = {"exact": _Lane(StageEngine(self.model, range(config.num_heads_total), max_batch,
                                                 config.seq_length, seed=0, full_depth=full_depth,
                                                 schedule=TickSchedule()))}
        self.waiting: deque[Choice] = deque()
        self.control: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.queued_requests = 0
        self.active = 0
        self.accepting = True
        self.thread = threading.Thread(target=self._run, name="nvium-scheduler", daemon=True)
        # the engine's own layer counts: layer reads spent vs what full depth would read for the same tokens
        self.layers_read = 0.0
        self.layers_full_depth = 0.0

    @property
    def path(self) -> str:
        return "full" if self.full_depth else "deferred"

    # -- called from the event loop ------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def submit(self, request: Request) -> None:
        with self.lock:
            if not self.accepting:
                raise ShuttingDown()
            if self.queued_requests >= self.max_queue:
                raise QueueFull()
            self.queued_requests += 1
        self.control.put(("submit", request))

    def cancel(self, request: Request, choice: int | None = None) -> None:
        """Frees the rows of a request (or one of its choices) before the next tick."""
        self.control.put(("cancel", (request, choice)))

    def stop(self) -> None:
        with self.lock:
            self.accepting = False
        self.control.put(("stop", None))
        self.thread.join()

    def queue_depth(self) -> int:
        with self.lock:
            return self.queued_requests

    # -- the scheduler thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                idle = not self.active and not self.waiting
                try:
                    kind, value = self.control.get(block=idle)
                except queue.Empty:
                    kind = None
                while kind is not None:
                    if kind == "stop":
                        return
                    self._handle(kind, value)
                    try:
                        kind, value = self.control.get_nowait()
                    except queue.Empty:
                        kind = None
                self._admit()
                for lane in list(self.lanes.values()):
                    if lane.inputs:
                        feed_rows(lane.engine, self.model, lane.inputs)
                        lane.inputs.clear()
                    if lane.engine.deciding or lane.engine.eager:
                        self._tick(lane)
                self._update_gauges()

    def _handle(self, kind: str, value) -> None:
        if kind == "submit":
            self.waiting.extend(value.choices)
            return
        request, index = value
        for lane in self.lanes.values():
            for row, choice in enumerate(lane.occupant):
                if choice is not None and choice.request is request and index in (None, choice.index):
                    lane.release(row)
                    self.active -= 1
        kept = deque()
        for choice in self.waiting:
            if choice.request is request and index in (None, choice.index):
                self._left_queue(request)
            else:
                kept.append(choice)
        self.waiting = kept

    def _left_queue(self, request: Request) -> None:
        """One of the request's choices left the queue (admitted or cancelled); the last one frees its place."""
        request.unadmitted -= 1
        if request.unadmitted == 0:
            with self.lock:
                self.queued_requests -= 1

    def _admit(self) -> None:
        while self.waiting and self.active < self.max_batch:
            choice = self.waiting[0]
            request = choice.request
            lane = self.lanes["exact"] if request.transform is None else self._transform_lane()
            free = lane.free_rows()
            if not free:
                break
            self.waiting.popleft()
            self._left_queue(request)
            if choice.max_tokens == 0:
                request.emit("done", choice.index, "length")
                continue
            row = free[0]
            lane.engine.reset_row(row, choice.index, seed=request.seed, transform=request.transform)
            lane.occupant[row] = choice
            lane.inputs[row] = (choice.prompt, 0, True)
            choice.row = row
            choice.last_time = request.arrival
            self.active += 1

    def _transform_lane(self) -> _Lane:
        """The engine of transformed sampling, made (with its own KV cache) for the first request that needs it."""
        if "transform" not in self.lanes:
            config = self.generator.config
            self.lanes["transform"] = _Lane(StageEngine(self.model, range(config.num_heads_total), self.max_batch,
                                                        config.seq_length, seed=0, full_depth=True,
                                                        transform=SamplingTransform()))
        return self.lanes["transform"]

    def _tick(self, lane: _Lane) -> None:
        engine = lane.engine
        calls = list(engine.segment_calls)
        results = engine.tick().results
        depth = sum(layers * (after - before)
                    for layers, after, before in zip(self.segment_layers, engine.segment_calls, calls))
        if self.metrics is not None:
            self.metrics.tick_rows.observe(engine.rows_deciding)
        if results:
            self.layers_read += depth
            self.layers_full_depth += len(results) * self.num_layers / max(1, engine.rows_deciding)
        now = time.perf_counter()
        for row in sorted(results):
            choice = lane.occupant[row]
            token, exit = results[row]
            choice.tokens.append(token)
            choice.exits.append(exit)
            choice.request.emit("token", choice.index, token, exit)
            if self.metrics is not None:
                self.metrics.token(first=len(choice.tokens) == 1, seconds=now - choice.last_time,
                                   exit_layer=self.exit_layers[exit] if exit >= 0 else None)
            choice.last_time = now
            position = len(choice.prompt) + len(choice.tokens) - 1
            if token == self.eos_id or len(choice.tokens) >= choice.max_tokens:
                choice.request.emit("done", choice.index, "stop" if token == self.eos_id else "length")
                lane.release(row)
                self.active -= 1
            else:
                lane.inputs[row] = ([token], position, True)

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            speedup = self.layers_full_depth / self.layers_read if self.layers_read else math.nan
            self.metrics.gauges(self.queue_depth(), self.active, self.max_batch, speedup)
