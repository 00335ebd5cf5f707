"""training.compile: torch.compile of each transformer block and each head, in place (torchtitan's per-block
compile).

Blocks of one model have the same code and shapes, so they share one compiled graph (the parameters are
graph inputs, not constants); heads with and without a router or adapter add one graph each. The vocab
loss (megatron's vocab-parallel cross entropy, a collective at TP > 1) and the mixture stay eager.
Compilation happens during the first step (forward graphs in the forward, backward graphs in the backward);
`compile_summary` reports what it cost, and a later step that compiles again shows up as more graphs.
"""
from __future__ import annotations

import torch
from torch import nn


def compile_blocks_and_heads(module: nn.Module) -> int:
    """Compiles every transformer block and exit head inside `module` (a NviumModel or a pipeline stage) in
    place: parameter names and state dicts stay as they were. -> how many modules were compiled."""
    from nvium_dist.model import Block, ExitHead

    # DeepSpeed's pipeline engine back-propagates in ways (retain_graph) that compiled backwards with donated
    # buffers refuse; not donating costs one activation buffer per graph
    torch._functorch.config.donated_buffer = False
    targets = [m for m in module.modules() if isinstance(m, (Block, ExitHead))]
    for target in targets:
        target.compile()
    return len(targets)


def compile_summary() -> dict:
    """{"graphs": distinct graphs compiled so far in this process, "seconds": time spent compiling them,
    forward and backward}."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    seconds = sum(sum(compilation_time_metrics.get(phase, ()))
                  for phase in ("_compile.compile_inner", "backward._backward_impl"))
    return {"graphs": int(counters["stats"]["unique_graphs"]), "seconds": round(seconds, 2)}

