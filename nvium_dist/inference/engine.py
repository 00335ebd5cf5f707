"""The decoding engine of one process: a contiguous range of segments, their caches and exit queues.

Bookkeeping per row b (a slot that holds one sequence at a time) and owned segment j:
    done[b][j]  positions that have been through segment j (its layers' KV is filled up to there)
    avail[b]    positions whose input to the first owned segment is in `hidden[lo - 1]`
Segment j's pending work for row b is positions done[b][j] .. (done[b][j-1] or avail[b]) - 1: the tokens
queued at exit j-1 plus, when the row's current token continued past exit j-1, that token. Running them
together ("carrying" the queue) keeps every cache filled in position order, so after completing the queues
the KV equals a full forward pass. Queues are contiguous position ranges; their hidden states live in
preallocated buffers `hidden[j]` [B, max_len, d].

A row is `deciding` while its current token (its last available position) has no sampled successor yet;
`level[b]` is then the owned segment that token runs next. A row is `eager` when everything pending must be
completed through every owned segment without decisions (flush, the rest of a full-depth step, work that
an earlier pipeline stage forwarded).

One `tick` runs every owned segment at most once, in order, as one packed call over all work waiting there:
new tokens, continuing tokens with their carried queues, eager work. Rows advance independently: a row whose
token exited early gets its next token in the next tick, while another row's token may still be waiting to
climb. With a `TickSchedule` a segment above the first may hold its waiting tokens for a few ticks when
that saves a call whose weight reads cost more than the waiting rows' share of a tick; without one every
waiting token climbs at once, so each tick completes every current token (the full-depth baseline and
pipeline stages work that way).

Sampled tokens of a tick are drawn together at its end: each exit's adapter on its tokens, then one
output-matrix product for all of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from nvium_dist.inference.cache import KVCache, SegmentBatch, host_to_device
from nvium_dist.inference.graphs import SingleTokenCalls
from nvium_dist.inference.sampling import (STREAM_EXIT, STREAM_TOKEN, SamplingTransform, sample_from_logits,
                                           uniform, uniform_keys, uniforms)
from nvium_dist.mixture import log_mixture_distribution, router_log_probs


@dataclass(frozen=True)
class TickSchedule:
    """When tokens waiting at a segment above the first climb: at once, unless holding them one more tick is
    cheaper. Small-batch decoding is bound by reading weights, so a segment call costs about its weights
    whether it runs one token or several, and a row that waits loses its share of a tick:
        hold  iff  waiting rows x (full-depth weights / rows with a current token)
                   < segment weights x P(more tokens arrive there next tick)
    with arrivals counted as a running mean (`arrival_decay`). So a batch of one never waits, and a wide
    batch gathers the tokens that rarely climb into one call. A token waits at most `max_wait` ticks; a
    segment also runs its waiting tokens when it runs anyway (eager work) or nothing below it had work."""
    max_wait: int = 4
    arrival_decay: float = 0.9


@dataclass
class ForwardWork:
    """Work for the next pipeline stage: rows[i] positions starts[i] .. + counts[i] - 1, packed hidden [1, T, d]."""
    rows: list[int]
    starts: list[int]
    counts: list[int]
    decide: list[bool]  # the last position is a current token still to be decided (else: complete eagerly)
    hidden: torch.Tensor


@dataclass
class TickOutput:
    results: dict[int, tuple[int, int]] = field(default_factory=dict)  # row -> (token, exit); exit -1: transformed
    forward: ForwardWork | None = None


class StageEngine:
    def __init__(self, model, segments: range, batch: int, max_len: int, seed: int, full_depth: bool = False,
                 transform: SamplingTransform | None = None, schedule: TickSchedule | None = None,
                 trace: bool = False, timer=None, fixed_shape_calls: bool = False):
        config = model.config
        self.model, self.config = model, config
        self.lo, self.hi = segments.start, segments.stop
        self.num_heads = config.num_heads_total
        self.is_last = self.hi == self.num_heads
        self.batch, self.max_len, self.seed = batch, max_len, seed
        self.full_depth, self.transform = full_depth, transform
        if transform is not None and not full_depth:
            raise ValueError("sampling transforms need the full mixture: use full_depth=True")
        self.schedule = None if full_depth else schedule
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        ranges = config.segment_ranges
        layers = [i for j in segments for i in range(*ranges[j])]
        self.cache = KVCache(layers, config.num_layers, batch, max_len, config.num_heads, config.head_dim,
                             self.dtype, self.device)
        self.caches = self.cache.layer_caches
        # batch 1: single-token segment calls in fixed shapes, replayed as CUDA graphs on CUDA (inference.graphs)
        self.single_token_calls = SingleTokenCalls(model, self.cache, config.hidden_size, self.dtype, self.device) \
            if fixed_shape_calls else None
        # hidden[j] = output of segment j (input of segment j + 1); hidden[lo - 1] is this stage's input
        # (the embeddings on stage 0). The final segment's output is never queued.
        self.hidden = {j: torch.zeros(batch, max_len, config.hidden_size, dtype=self.dtype, device=self.device)
                       for j in range(self.lo - 1, min(self.hi, self.num_heads - 1))}
        self.vocab = config.vocab_size
        self.output_matrix = decode_output_matrix(model)
        self.sequence_ids = [0] * batch
        self.seeds = [seed] * batch  # a server gives each request its own seed
        self.transforms: list[SamplingTransform | None] = [transform] * batch
        self.done = [[0] * self.num_heads for _ in range(batch)]
        self.avail = [0] * batch
        self.sent = [0] * batch  # positions forwarded to the next stage
        self.level: list[int | None] = [None] * batch
        self.waited = [0] * batch
        self.deciding: set[int] = set()
        self.eager: set[int] = set()
        self.rows_deciding = 0
        # TickSchedule statistics: weights read per segment call (layers and router) and per full-depth
        # step, and the running mean of tokens arriving at each segment per tick
        weights = [sum(p.numel() for i in range(*ranges[j]) for p in model.layers[i].parameters())
                   + sum(p.numel() for p in model.heads[j].parameters()) for j in range(self.num_heads)]
        self.segment_weights = weights
        self.full_weights = sum(weights) + model.output.weight.numel()
        self.arrivals = [0.0] * self.num_heads
        self.arrived = [0] * self.num_heads
        self.mixture_parts: dict[int, list] = {}
        # full depth in one process on a GPU: every segment runs whatever the routers say, so the exit decisions
        # stay on the device until the tick's tokens are drawn (one read-back a tick instead of one per exit), for
        # the price of every head's adapter on every token; on CPU there is no read-back to save
        self.decide_per_tick = (full_depth and transform is None and self.lo == 0 and self.is_last
                                and self.device.type == "cuda")
        self.head_states: list[tuple[torch.Tensor, torch.Tensor]] = []  # this tick's (normed, exits here) per head
        self.segment_calls = [0] * self.num_heads  # statistics: calls and tokens run per segment
        self.segment_tokens = [0] * self.num_heads
        self.trace = [] if trace else None
        # timer(name) -> context manager around each part of a tick (nvium_dist.inference.profile); default: none
        self.timer = timer or _no_timer

    # -- rows ----------------------------------------------------------------------------------------------

    def reset_row(self, row: int, sequence_id: int, seed: int | None = None,
                  transform: SamplingTransform | None = None) -> None:
        """Starts a new sequence in `row` (continuous batching): empty queues; old keys are never read again,
        because a query at position p only sees positions <= p, which the new sequence rewrites first.
        seed / transform: this sequence's own (default: the engine's); a transform needs a transform engine."""
        if transform is not None and self.transform is None:
            raise ValueError("a per-row sampling transform needs an engine built with a transform")
        self.free_row(row)
        self.sequence_ids[row] = sequence_id
        self.seeds[row] = self.seed if seed is None else seed
        self.transforms[row] = transform or self.transform
        self.done[row] = [0] * self.num_heads
        self.avail[row] = self.sent[row] = 0

    def free_row(self, row: int) -> None:
        """The row's sequence leaves between ticks (finished or cancelled): its pending work is dropped, so the
        next tick runs nothing for it and the row can take a new sequence."""
        self.level[row] = None
        self.deciding.discard(row)
        self.eager.discard(row)
        self.mixture_parts.pop(row, None)

    def write_input(self, rows: list[int], starts: list[int], counts: list[int], hidden: torch.Tensor) -> None:
        """Packed hidden [1, T, d] for rows[i] at positions starts[i] .. -> the stage input buffer."""
        buffer = self.hidden[self.lo - 1]
        offset = 0
        for row, start, count in zip(rows, starts, counts):
            if start != self.avail[row]:
                raise RuntimeError(f"row {row}: input for position {start} but {self.avail[row]} positions are queued; "
                                   "inputs must arrive in position order")
            buffer[row, start:start + count] = hidden[0, offset:offset + count]
            offset += count
            self.avail[row] = start + count

    def start_tokens(self, rows: list[int]) -> None:
        """The last available position of each row is its current token: route it from the first owned segment."""
        for row in rows:
            self.deciding.add(row)
            self.level[row] = self.lo
            self.waited[row] = 0

    def complete(self, rows: list[int]) -> None:
        """Complete everything pending in these rows through all owned segments (no decisions)."""
        self.eager.update(rows)

    def pending(self, row: int) -> int:
        """Positions received but not yet through every owned segment."""
        return self.avail[row] - self.done[row][self.hi - 1]

    def busy(self, row: int) -> bool:
        return row in self.deciding or row in self.eager

    # -- one tick ------------------------------------------------------------------------------------------

    def tick(self) -> TickOutput:
        out = TickOutput()
        exits: list[tuple[int, int, torch.Tensor]] = []  # (row, head, normed state) of tokens to sample
        ran = False
        previous: tuple[int, SegmentBatch, torch.Tensor] | None = None  # the last segment call of this tick
        forward_rows: list[int] = []
        done, avail, level = self.done, self.avail, self.level
        self.rows_deciding = len(self.deciding)  # rows with a current token as the tick starts
        for j in range(self.lo, self.hi):
            waiting = [row for row in sorted(self.deciding) if level[row] == j]
            eager = [row for row in sorted(self.eager)
                     if (avail[row] if j == self.lo else done[row][j - 1]) > done[row][j]]
            if waiting and not eager and ran and not self._climb_now(j, waiting):
                waiting = []
            if not waiting and not eager:
                continue
            rows = sorted(waiting + eager) if eager and waiting else (waiting or eager)
            starts = [done[row][j] for row in rows]
            counts = [(avail[row] if j == self.lo else done[row][j - 1]) - start for row, start in zip(rows, starts)]
            hidden, batch = self._run_segment(j, rows, starts, counts, previous)
            previous = (j, batch, hidden)
            ran = True
            self.segment_calls[j] += 1
            self.segment_tokens[j] += batch.total
            for row, start, count in zip(rows, starts, counts):
                done[row][j] = start + count
            if waiting:
                self._decide(j, waiting, batch, hidden, exits, out)
            if j == self.hi - 1 and not self.is_last:
                forward_rows = rows
        for row in self.deciding:
            self.waited[row] += 1
        if self.schedule is not None:
            decay = self.schedule.arrival_decay
            self.arrivals = [decay * mean + (1 - decay) * n for mean, n in zip(self.arrivals, self.arrived)]
            self.arrived = [0] * self.num_heads
        if exits:
            self._sample(exits, out)
        if forward_rows:
            out.forward = self._forward_work(forward_rows)
        self.eager = {row for row in self.eager if self.pending(row) > 0}
        return out

    def _climb_now(self, j: int, waiting: list[int]) -> bool:
        schedule = self.schedule
        if schedule is None or max(self.waited[row] for row in waiting) >= schedule.max_wait:
            return True
        idle_cost = len(waiting) * self.full_weights / self.rows_deciding
        saving = self.segment_weights[j] * (1.0 - math.exp(-self.arrivals[j]))
        return idle_cost >= saving

    def _run_segment(self, j, rows, starts, counts, previous):
        timer = self.timer
        with timer("bookkeeping"):
            if previous is not None and previous[0] == j - 1 and previous[1].same_tokens(rows, starts, counts):
                _, batch, hidden = previous  # same tokens as segment j - 1: its output is this input
                self.cache.current = batch
            else:
                batch = self.cache.prepare(rows, starts, counts)
                source = self.hidden[j - 1]
                if batch.single:
                    row, start = rows[0], starts[0]
                    hidden = source[row:row + 1, start:start + counts[0]]
                else:
                    hidden = source[batch.token_rows, batch.token_positions].unsqueeze(0)
        with timer(f"segment {j}", (j, batch.total)):
            if self.single_token_calls is not None and batch.total == 1:
                hidden = self.single_token_calls.run(j, hidden, batch.starts[0])
            else:
                hidden = self.model.run_segment(j, hidden, self.model.rotary(batch.positions), self.caches)
        if j < self.num_heads - 1:
            with timer("bookkeeping"):
                if batch.single:
                    row, start = rows[0], starts[0]
                    self.hidden[j][row:row + 1, start:start + counts[0]] = hidden
                else:
                    self.hidden[j][batch.token_rows, batch.token_positions] = hidden[0]
        return hidden, batch

    def _decide(self, j: int, rows: list[int], batch: SegmentBatch, hidden: torch.Tensor, exits: list,
                out: TickOutput) -> None:
        """Exit decisions at head j for the current tokens of `rows` (all ran segment j in `batch`)."""
        timer = self.timer
        if batch.single:
            last = hidden[:, -1]
        else:
            index = batch.last_index
            if len(rows) != len(batch.rows):
                deciding = set(rows)
                index = index[host_to_device(torch.tensor([i for i, row in enumerate(batch.rows) if row in deciding]),
                                             self.device)]
            last = hidden[0, index]
        positions = [self.avail[row] for row in rows]  # position of the token being sampled
        if self.transform is not None:
            self._mixture_decide(j, rows, positions, last, out)
            return
        final = j == self.num_heads - 1
        with timer("router"):
            # the router runs on every token reaching exit j, the adapter and output matrix only on those exiting
            normed, router = self.model.head_router(j, last)
            exits_here = None if final else self._exit_draws(j, rows, positions, router)
            if not self.decide_per_tick:
                # the host's one wait per decision: the rows that continue make the next segment's call
                stop = [True] * len(rows) if final else exits_here.tolist()
        if self.trace is not None and router is not None:
            for i, (row, pos) in enumerate(zip(rows, positions)):
                self.trace.append(("router", self.sequence_ids[row], pos, j, router[i].detach().clone()))
        if self.decide_per_tick:
            self._decide_at_final_head(j, rows, positions, normed, exits_here, out)
            return
        level, nxt = self.level, j + 1
        for i, row in enumerate(rows):
            if stop[i]:
                exits.append((row, j, normed[i]))
                self.deciding.discard(row)
                level[row] = None
                if self.full_depth:
                    self.eager.add(row)  # the full-depth baseline still runs every layer
            else:
                level[row] = nxt
                self.waited[row] = 0
                self.arrived[nxt] += 1
                if nxt == self.hi:  # continues in the next stage
                    self.deciding.discard(row)

    def _sample(self, exits: list, out: TickOutput) -> None:
        """Draws every token sampled this tick: adapters per exit, one output-matrix product for all."""
        timer = self.timer
        with timer("adapter"):
            heads = sorted({head for _, head, _ in exits})
            order = [e for head in heads for e in exits if e[1] == head]
            adapted = [self.model.heads[head].adapt(torch.stack([n for _, h, n in order if h == head]))
                       for head in heads]
            adapted = adapted[0] if len(adapted) == 1 else torch.cat(adapted)
        with timer("output"):
            logits = adapted @ self.output_matrix
        with timer("sampling"):
            u = self._uniforms([(self.seeds[row], self.sequence_ids[row], self.avail[row], head, STREAM_TOKEN)
                                for row, head, _ in order])
            tokens = sample_from_logits(logits, u).tolist()
        for n, ((row, head, _), token) in enumerate(zip(order, tokens)):
            out.results[row] = (token, head)
            if self.trace is not None:
                self.trace.append(("logits", self.sequence_ids[row], self.avail[row], head, logits[n].clone()))

    def _exit_draws(self, j: int, rows: list[int], positions: list[int], router: torch.Tensor) -> torch.Tensor:
        """Per row, on the device: does its token exit at head j (its draw below the exit probability)?"""
        log_q, _ = router_log_probs(router)
        u = self._uniforms([(self.seeds[row], self.sequence_ids[row], pos, j, STREAM_EXIT)
                            for row, pos in zip(rows, positions)])
        return u < log_q.double().exp()

    def _decide_at_final_head(self, j, rows, positions, normed, exits_here, out: TickOutput) -> None:
        """Full depth (decide_per_tick): the same decisions and draws as the exit-by-exit path, taken on the device
        at the final head: a token exits at the first head whose draw is below its exit probability. Every
        current token climbs in every tick at full depth, so `rows` are the same at each head of a tick."""
        if j < self.num_heads - 1:
            self.head_states.append((normed, exits_here))
            for row in rows:
                self.level[row] = j + 1
            return
        self.head_states.append((normed, torch.ones(len(rows), dtype=torch.bool, device=normed.device)))
        states, self.head_states = self.head_states, []
        exits_here = torch.stack([stop for _, stop in states])  # [K, R]
        head = exits_here.int().argmax(0)  # the first head a token exits at (argmax returns the first maximum)
        picked = torch.arange(len(rows), device=head.device)
        with self.timer("adapter"):
            adapted = torch.stack([self.model.heads[k].adapt(n) for k, (n, _) in enumerate(states)])[head, picked]
        with self.timer("output"):
            logits = adapted @ self.output_matrix
        with self.timer("sampling"):
            u = self._uniforms([(self.seeds[row], self.sequence_ids[row], pos, k, STREAM_TOKEN)
                                for k in range(self.num_heads) for row, pos in zip(rows, positions)])
            tokens = sample_from_logits(logits, u.view(self.num_heads, len(rows))[head, picked])
            tokens, heads = torch.stack([tokens, head]).tolist()  # the tick's one wait for the device
        for n, (row, token, k) in enumerate(zip(rows, tokens, heads)):
            out.results[row] = (token, k)
            self.deciding.discard(row)
            self.level[row] = None
            if self.trace is not None:
                self.trace.append(("logits", self.sequence_ids[row], self.avail[row], k, logits[n].clone()))

    def _mixture_decide(self, j, rows, positions, last, out: TickOutput) -> None:
        """Transformed sampling: collect every head's log-softmax and router, sample at the final head."""
        logits, router = self.model.head_logits(j, last)
        log_p = torch.log_softmax(logits[..., :self.vocab].float(), -1)
        for i, row in enumerate(rows):
            self.mixture_parts.setdefault(row, []).append((log_p[i], router[i] if router is not None else None))
        if j < self.num_heads - 1:
            for row in rows:
                self.level[row] = j + 1
                if j + 1 == self.hi:
                    self.deciding.discard(row)
            return
        log_heads = torch.stack([torch.stack([p for p, _ in self.mixture_parts[row]]) for row in rows])  # [R, K, V]
        routers = None
        if self.num_heads > 1:
            routers = torch.stack([torch.stack([r for _, r in self.mixture_parts[row][:-1]]) for row in rows])
        log_mix = log_mixture_distribution(log_heads, routers)
        u = self._uniforms([(self.seeds[row], self.sequence_ids[row], pos, -1, STREAM_TOKEN)
                            for row, pos in zip(rows, positions)])
        tokens = [0] * len(rows)
        for transform in {self.transforms[row] for row in rows}:  # rows of a server may each transform differently
            picked = [i for i, row in enumerate(rows) if self.transforms[row] is transform]
            for i, token in zip(picked, transform.sample(log_mix[picked], u[picked]).tolist()):
                tokens[i] = token
        for row, token in zip(rows, tokens):
            out.results[row] = (token, -1)
            self.deciding.discard(row)
            self.level[row] = None
            del self.mixture_parts[row]

    def _uniforms(self, keys: list[tuple[int, int, int, int, int]]) -> torch.Tensor:
        """The draws of `keys` (sampling.uniform's arguments) on the engine's device, bitwise equal either way:
        on a GPU computed there (no host round trip); on CPU by the Python hash, which for a tick's few draws
        costs ~5 us where the ~40 small tensor operations of `uniforms` cost ~120 us."""
        if self.device.type == "cpu":
            return torch.tensor([uniform(*key) for key in keys], dtype=torch.float64)
        return uniforms(host_to_device(uniform_keys(keys), self.device))

    def _forward_work(self, rows: list[int]) -> ForwardWork | None:
        """Everything that passed this stage's last exit and was not forwarded yet: continuing tokens with their
        carried queue, and eagerly the tokens that exited exactly at the boundary."""
        boundary = self.hi - 1
        rows = [row for row in rows if self.done[row][boundary] > self.sent[row]]
        if not rows:
            return None
        starts = [self.sent[row] for row in rows]
        counts = [self.done[row][boundary] - start for row, start in zip(rows, starts)]
        buffer = self.hidden[boundary]
        payload = torch.cat([buffer[row, start:start + count] for row, start, count in zip(rows, starts, counts)])
        decide = [self.level[row] == self.hi for row in rows]
        for row, start, count in zip(rows, starts, counts):
            self.sent[row] = start + count
            if self.level[row] == self.hi:
                self.level[row] = None
        return ForwardWork(rows, starts, counts, decide, payload.unsqueeze(0))


def use_decode_layout(model) -> None:
    """Stores every weight matrix the model multiplies activations with (x @ W^T) column-major: W^T
    contiguous, the parameter keeps its shape and values (a view of the transposed copy, which replaces the
    original, so no memory is added). On CPU, MKL runs a decode call's products (1 to a few dozen tokens)
    against this layout about 25% faster than against W itself, and each further token of a call costs less
    (measured on 768 x 256 weights read from memory: 44/49/57 us for 1/2/3 tokens against 61/70/83 us).
    Idempotent; every forward gives the same values up to float rounding."""
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.nn.Parameter) and weight.dim() == 2 and module is not model.embedding:
                weight.data = weight.data.t().contiguous().t()


def decode_output_matrix(model) -> torch.Tensor:
    """The output matrix as the decoder multiplies it: [hidden, vocab], vocab padding dropped (TP=1); a view
    when the model is in the decode layout. It is the largest matrix a shallow token reads (vocab x hidden;
    8000 x 256 is 2.6 layers of the benchmark model)."""
    return model.output.weight.t()[:, :model.config.vocab_size]


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NULL = _NullContext()


def _no_timer(name: str, call=None) -> _NullContext:
    return _NULL

