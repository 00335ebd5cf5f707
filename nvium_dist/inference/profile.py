"""Where decoding time goes: wall time per part of an engine tick (each segment's layers, routers, adapters,
the output matrix, sampling, the engine's index and cache bookkeeping) and everything else.

    profiler = TickProfiler(cuda=False)
    out = generator.generate(prompts, 64, timer=profiler)
    profiler.report(out.num_tokens, out.seconds)   # microseconds per generated token, by part

The engine wraps each part in `timer(name)`; on CUDA every section synchronises first, so the numbers
are exact but the profiled run is slower than an unprofiled one.
"""
from __future__ import annotations

import time
from collections import defaultdict


class _Section:
    __slots__ = ("profiler", "name", "call", "start")

    def __init__(self, profiler: "TickProfiler", name: str, call):
        self.profiler, self.name, self.call = profiler, name, call

    def __enter__(self):
        self.profiler.sync()
        self.start = self.profiler.clock()

    def __exit__(self, *exc):
        self.profiler.sync()
        elapsed = self.profiler.clock() - self.start
        self.profiler.seconds[self.name] += elapsed
        if self.call is not None:
            self.profiler.calls.append((*self.call, elapsed))
        return False


class TickProfiler:
    def __init__(self, cuda: bool = False, clock=time.perf_counter):
        """clock: wall time by default; time.process_time counts only this process's CPU time (one thread on a
        shared machine: leaves out waiting for a core)."""
        import torch

        self.clock = clock
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: list[tuple[int, int, float]] = []  # (segment, tokens, seconds) of every segment call

    def __call__(self, name: str, call: tuple[int, int] | None = None) -> _Section:
        """A timed section; `call` = (segment, tokens) also records the call for cost fits."""
        return _Section(self, name, call)

    def report(self, tokens: int, total_seconds: float) -> dict:
        """{part: microseconds per generated token}, plus "driver and other" (embedding, the decode loop,
        Python outside the sections) and "total"."""
        parts = {name: 1e6 * s / tokens for name, s in sorted(self.seconds.items())}
        parts["driver and other"] = 1e6 * (total_seconds - sum(self.seconds.values())) / tokens
        parts["total"] = 1e6 * total_seconds / tokens
        return {name: round(us, 1) for name, us in parts.items()}
