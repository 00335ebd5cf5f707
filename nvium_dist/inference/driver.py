"""The first decoding stage's loop (Driver) and loading an export for decoding; shared by the single-process
generator and the pipeline stages, so neither imports the other's module."""
from __future__ import annotations

import os
from collections import deque

import torch

from nvium_dist.inference.cache import host_to_device
from nvium_dist.inference.engine import StageEngine


def ensure_process_group(device: str = "cpu"):
    """A 1-process gloo (or NCCL) group and megatron parallel_state, unless some are already up."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nvium_dist.config import ParallelConfig
    from nvium_dist.parallel import init_distributed

    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        if not dist.is_initialized() and os.environ.get("WORLD_SIZE", "1") == "1":
            # a lone process: never reuse a MASTER_PORT inherited from a parent (its store holds that port)
            from nvium_dist.parallel import free_port

            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_PORT=str(free_port()))
        init_distributed(ParallelConfig(device=device))


def load_decode_model(export, device: str = "cpu", dtype: torch.dtype | None = None,
                      keep_layers: set[int] | None = None):
    """The model of a loaded export (checkpoint_io.load_export), for decoding: no gradients, on `device`
    (bf16 on CUDA, fp32 on CPU by default). `keep_layers` (pipeline stages) frees the other layers' weights."""
    from nvium_dist.model import NviumModel
    from nvium_dist.tp_layout import load_full_state_dict

    ensure_process_group(device)
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    model = NviumModel(export.model_config, tensor_parallel=1, dtype=dtype, initialise=False)
    load_full_state_dict(model, {k: v.to(dtype) for k, v in export.state.items()})
    if keep_layers is not None:
        for i in range(export.model_config.num_layers):
            if i not in keep_layers:
                model.layers[i] = torch.nn.Identity()
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Driver:
    """Feeds sequences through the rows of a first-stage engine: admits prompts into free rows (continuous
    batching), embeds each row's next input, records sampled tokens, stops sequences at EOS or
    max_new_tokens (completing their queues first with flush=True) and frees their rows.

    A prompt enters whole: its last token is the first current token, the others are queued behind it like
    deferred tokens and climb with it (mode="full": every layer at once)."""

    def __init__(self, engine: StageEngine, model, prompts, sequence_ids, max_new_tokens: list[int], eos_id, flush: bool,
                 on_step=None):
        self.engine, self.model, self.prompts, self.sequence_ids = engine, model, prompts, sequence_ids
        self.max_new_tokens, self.eos_id, self.flush, self.on_step = max_new_tokens, eos_id, flush, on_step
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.exits: list[list[int]] = [[] for _ in prompts]
        self.rows: list[int | None] = [None] * len(prompts)  # the row each sequence ran in
        self.ticks = 0

    def run(self, step) -> None:
        """step() runs one engine tick (and, in a pipeline, the later stages) -> {row: (token, exit)}."""
        engine = self.engine
        queue = deque(range(len(self.prompts)))
        occupant: list[int | None] = [None] * engine.batch
        free = list(range(engine.batch))
        inputs: dict[int, tuple[list[int], int, bool]] = {}  # row -> (token ids, first position, decide)
        finishing: set[int] = set()

        def release(row):
            occupant[row] = None
            free.append(row)
            free.sort()

        while queue or any(o is not None for o in occupant):
            while free and queue:
                row, i = free.pop(0), queue.popleft()
                engine.reset_row(row, self.sequence_ids[i])
                occupant[row], self.rows[i] = i, row
                if self.max_new_tokens[i] > 0 or self.flush:
                    inputs[row] = (self.prompts[i], 0, self.max_new_tokens[i] > 0)
                else:
                    release(row)
            if inputs:
                feed_rows(engine, self.model, inputs)
                finishing.update(row for row, (_, _, decide) in inputs.items() if not decide)
                inputs.clear()
            if not (engine.deciding or engine.eager):
                continue  # nothing admitted needs decoding (max_new_tokens 0)
            results = step()
            sampled = {}
            for row in sorted(results):
                i = occupant[row]
                token, exit = sampled[i] = results[row]
                self.tokens[i].append(token)
                self.exits[i].append(exit)
                position = len(self.prompts[i]) + len(self.tokens[i]) - 1
                if len(self.tokens[i]) < self.max_new_tokens[i] and token != self.eos_id:
                    inputs[row] = ([token], position, True)
                elif self.flush:
                    inputs[row] = ([token], position, False)
                else:
                    release(row)
            for row in [r for r in finishing if not engine.busy(r)]:
                finishing.discard(row)
                release(row)
            if self.on_step is not None and sampled:
                self.on_step(self.ticks, sampled)
            self.ticks += 1


def feed_rows(engine: StageEngine, model, inputs: dict[int, tuple[list[int], int, bool]]) -> None:
    """Embeds each row's next input {row: (token ids, first position, decide)} into a first-stage engine: the
    last token of a deciding row is its current token, the rest are completed without decisions."""
    rows = sorted(inputs)
    ids = [t for row in rows for t in inputs[row][0]]
    hidden = model.embed(host_to_device(torch.tensor([ids], dtype=torch.long), engine.device))
    engine.write_input(rows, [inputs[row][1] for row in rows], [len(inputs[row][0]) for row in rows], hidden)
    engine.start_tokens([row for row in rows if inputs[row][2]])
    engine.complete([row for row in rows if not inputs[row][2]])
