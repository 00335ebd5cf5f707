"""The decoding engine of one process: a contiguous range of segments, their caches and exit queues.

Bookkeeping per sequence b (row) and owned segment j:
    done[b][j]  positions that have been through segment j (its layers' KV is filled up to there)
    avail[b]    positions whose input to the first owned segment is in `hidden[lo - 1]`
Segment j's pending work is positions done[b][j] .. (done[b][j-1] or avail[b]) - 1: the tokens queued
at exit j-1 plus, when the current token continued past exit j-1, the current token itself. Running
them together ("carrying" the queue) keeps every cache filled in position order, so after a flush the
KV equals a full forward pass. Queues are therefore contiguous position ranges; their hidden states
live in preallocated buffers `hidden[j]` [B, max_len + 1, d] (the last slot is the trash slot).

A step gets rows that `decide` (their last pending position is the current token: route it, maybe
sample) and rows that are `eager` (complete everything pending through all owned segments, no
decision). With `full_depth=True` deciding rows keep running every segment after their exit was
sampled (the full-depth baseline); the sampled token is the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from nvium_dist.inference.cache import KVCache
from nvium_dist.inference.sampling import STREAM_EXIT, STREAM_TOKEN, SamplingTransform, sample_from_logits, uniform
from nvium_dist.mixture import log_mixture_distribution, router_log_probs


@dataclass
class StepOutput:
    results: dict[int, tuple[int, int]] = field(default_factory=dict)  # row -> (token, exit); exit -1: transformed
    forward_rows: list[int] = field(default_factory=list)  # rows with work for the next stage
    forward_decide: list[bool] = field(default_factory=list)
    forward_starts: list[int] = field(default_factory=list)
    forward_counts: list[int] = field(default_factory=list)
    forward_hidden: torch.Tensor | None = None  # [R, n, d] padded


class StageEngine:
    def __init__(self, model, segments: range, batch: int, max_len: int, seed: int, sequence_ids: list[int],
                 full_depth: bool = False, transform: SamplingTransform | None = None, trace: bool = False):
        config = model.config
        self.model, self.config = model, config
        self.lo, self.hi = segments.start, segments.stop
        self.num_heads = config.num_heads_total
        self.is_last = self.hi == self.num_heads
        self.batch, self.max_len = batch, max_len
        self.seed, self.sequence_ids = seed, list(sequence_ids)
        self.full_depth, self.transform = full_depth, transform
        if transform is not None and not full_depth:
            raise ValueError("sampling transforms need the full mixture: use full_depth=True")
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        self.device = device
        ranges = config.segment_ranges
        layers = [i for j in segments for i in range(*ranges[j])]
        self.cache = KVCache(layers, config.num_layers, batch, max_len, config.num_heads, config.head_dim, dtype, device)
        self.caches = self.cache.layer_caches
        # hidden[j] = output of segment j (input of segment j + 1); hidden[lo - 1] is this stage's input
        # (the embeddings on stage 0). The final head's output is never queued.
        self.hidden = {j: torch.zeros(batch, max_len + 1, config.hidden_size, dtype=dtype, device=device)
                       for j in range(self.lo - 1, min(self.hi, self.num_heads - 1))}
        self.done = [[0] * self.num_heads for _ in range(batch)]
        self.avail = [0] * batch
        self.sent = [0] * batch  # positions forwarded to the next stage
        self.vocab = config.vocab_size
        self.trace = [] if trace else None
        self.mixture_parts: dict[int, list] = {}

    # -- input -------------------------------------------------------------------------------------------

    def write_input(self, rows: list[int], starts: list[int], hidden: torch.Tensor, counts: list[int]) -> None:
        """hidden [R, n, d] (padded) for rows[i] at positions starts[i].. -> the stage input buffer."""
        buffer = self.hidden[self.lo - 1]
        for i, (row, start, count) in enumerate(zip(rows, starts, counts)):
            if start != self.avail[row]:
                raise RuntimeError(f"row {row}: input for position {start} but {self.avail[row]} positions are queued; "
                                   "inputs must arrive in position order")
            buffer[row, start:start + count] = hidden[i, :count]
            self.avail[row] = start + count

    def pending(self, row: int) -> int:
        """Positions received but not yet through every owned segment."""
        return self.avail[row] - self.done[row][self.hi - 1]

    # -- one step ----------------------------------------------------------------------------------------

    def step(self, decide: list[int], eager: list[int]) -> StepOutput:
        """Runs the owned segments. `decide` rows have their current token as the last pending position."""
        out = StepOutput()
        deciding = set(decide)
        running = sorted(set(decide) | set(eager))
        done, avail = self.done, self.avail
        previous_out = None
        previous_key = None
        for j in range(self.lo, self.hi):
            rows, starts, counts = [], [], []
            for row in running:
                start = done[row][j]
                end = avail[row] if j == self.lo else done[row][j - 1]
                if end > start:
                    rows.append(row)
                    starts.append(start)
                    counts.append(end - start)
            if not rows:
                break
            batch = self.cache.prepare(rows, starts, counts)
            if previous_key is not None and previous_key == batch.key:
                hidden = previous_out  # same tokens as the previous segment: its output is the input
            elif batch.single:
                row, start = rows[0], starts[0]
                hidden = self.hidden[j - 1][row:row + 1, start:start + counts[0]]
            else:
                hidden = self.hidden[j - 1][batch.row_index, batch.write_index]
            hidden = self.model.run_segment(j, hidden, batch.positions, self.caches)
            previous_out, previous_key = hidden, batch.key
            if j < self.num_heads - 1:
                if batch.single:
                    self.hidden[j][rows[0]:rows[0] + 1, starts[0]:starts[0] + counts[0]] = hidden
                else:
                    self.hidden[j][batch.row_index, batch.write_index] = hidden
            for row, start, count in zip(rows, starts, counts):
                done[row][j] = start + count
            # decisions for the current tokens that reached exit j
            idx = [i for i, row in enumerate(rows) if row in deciding]
            if idx:
                if batch.single:
                    last = hidden[:, -1]
                else:
                    last_all = hidden[torch.arange(len(rows), device=self.device), batch.last_index]
                    last = last_all if len(idx) == len(rows) else last_all[idx]
                dec_rows = [rows[i] for i in idx]
                positions = [starts[i] + counts[i] for i in idx]  # position of the token being sampled
                stop = self._decide(j, dec_rows, positions, last, out)
                deciding -= stop
                if stop and not self.full_depth:
                    running = [r for r in running if r not in stop]
        if not self.is_last:
            self._collect_forward(decide, eager, deciding, out)
        return out

    def _decide(self, j: int, rows: list[int], positions: list[int], last: torch.Tensor, out: StepOutput) -> set[int]:
        """Exit decisions (and token draws) at head j for `rows`; -> the rows whose token was sampled here."""
        model, transform = self.model, self.transform
        if transform is not None:
            return self._mixture_decide(j, rows, positions, last, out)
        final = j == self.num_heads - 1
        # the router runs on every token reaching exit j, the adapter and output matrix only on those exiting
        normed, router = model.head_router(j, last)
        if final:
            exits = list(range(len(rows)))
        else:
            log_q, _ = router_log_probs(router)
            log_q = log_q.tolist()
            exits = [i for i, (row, pos) in enumerate(zip(rows, positions))
                     if uniform(self.seed, self.sequence_ids[row], pos, j, STREAM_EXIT) < math.exp(log_q[i])]
        if self.trace is not None and router is not None:
            for i, (row, pos) in enumerate(zip(rows, positions)):
                self.trace.append(("router", row, pos, j, router[i].detach().clone()))
        if not exits:
            return set()
        logits = model.head_vocab_logits(j, normed if len(exits) == len(rows) else normed[exits])[..., :self.vocab]
        u = torch.tensor([uniform(self.seed, self.sequence_ids[rows[i]], positions[i], j, STREAM_TOKEN) for i in exits],
                         dtype=torch.float64, device=logits.device)
        tokens = sample_from_logits(logits, u).tolist()
        stopped = set()
        for n, i in enumerate(exits):
            out.results[rows[i]] = (tokens[n], j)
            stopped.add(rows[i])
            if self.trace is not None:
                self.trace.append(("logits", rows[i], positions[i], j, logits[n].detach().clone()))
        return stopped

    def _mixture_decide(self, j, rows, positions, last, out) -> set[int]:
        """Transformed sampling: collect every head's log-softmax and router, sample at the final head."""
        logits, router = self.model.head_logits(j, last)
        log_p = torch.log_softmax(logits[..., :self.vocab].float(), -1)
        for i, row in enumerate(rows):
            self.mixture_parts.setdefault(row, []).append((log_p[i], router[i] if router is not None else None))
        if j < self.num_heads - 1:
            return set()
        stopped = set()
        log_heads = torch.stack([torch.stack([p for p, _ in self.mixture_parts[row]]) for row in rows])  # [R, K, V]
        routers = None
        if self.num_heads > 1:
            routers = torch.stack([torch.stack([r for _, r in self.mixture_parts[row][:-1]]) for row in rows])
        log_mix = log_mixture_distribution(log_heads, routers)
        u = torch.tensor([uniform(self.seed, self.sequence_ids[row], pos, -1, STREAM_TOKEN)
                          for row, pos in zip(rows, positions)], dtype=torch.float64, device=log_mix.device)
        tokens = self.transform.sample(log_mix, u).tolist()
        for row, token in zip(rows, tokens):
            out.results[row] = (token, -1)
            stopped.add(row)
            del self.mixture_parts[row]
        return stopped

    def _collect_forward(self, decide, eager, still_deciding, out: StepOutput) -> None:
        """Work for the next stage: everything that passed this stage's last exit and was not forwarded yet
        (continuing tokens with their carried queue, and eagerly tokens that exited exactly at the boundary)."""
        boundary = self.hi - 1
        rows = []
        for row in sorted(set(decide) | set(eager)):
            end = self.done[row][boundary]
            if end > self.sent[row]:
                rows.append(row)
        if not rows:
            return
        starts = [self.sent[row] for row in rows]
        counts = [self.done[row][boundary] - self.sent[row] for row in rows]
        n = max(counts)
        buffer = self.hidden[boundary]
        if len(rows) == 1:
            payload = buffer[rows[0]:rows[0] + 1, starts[0]:starts[0] + n]
        else:
            ar = torch.arange(n, device=self.device)
            index = torch.tensor(starts, device=self.device).unsqueeze(1) + ar
            index = torch.where(ar < torch.tensor(counts, device=self.device).unsqueeze(1), index, self.max_len)
            payload = buffer[torch.tensor(rows, device=self.device).unsqueeze(1), index]
        out.forward_rows, out.forward_starts, out.forward_counts = rows, starts, counts
        out.forward_decide = [row in still_deciding for row in rows]
        out.forward_hidden = payload.contiguous()
        for row, start, count in zip(rows, starts, counts):
            self.sent[row] = start + count

