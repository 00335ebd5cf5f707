"""Preallocated KV caches for packed, ragged decoding batches (the `KVCacheLayer` protocol of nvium_dist.model).

One `KVCache` holds keys and values of the layers a process owns for B rows (sequences) and `max_len`
positions. A segment call runs T tokens packed into one [1, T, d] activation, with no padding in the
layers' matrix products: row rows[i] contributes counts[i] consecutive positions starting at starts[i]
(its carried queue and, maybe, its current token). Before the call the decoder `prepare`s a `SegmentBatch`
once; every layer of the segment reuses its indices and mask.

Attention is the only place where rows meet: each token attends to its own row's keys at positions <= its
own (layer caches fill strictly in position order, so that is the causal mask). `attend` regroups the
packed queries as [S, heads, n, hd] over the span of rows from the lowest to the highest (n = the longest
run; shorter runs are padded with copies of their last query, rows of the span without work get dummy
queries, and those outputs are dropped), so the keys are read as views of the cache and the padding costs
only attention over a few positions. Rows scattered over more than twice their number gather their keys.

One row (batch 1, or a single row with work) takes a lean path: slices and views, no index tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def host_to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait: on CUDA through pinned memory, a non-blocking
    copy (a copy from pageable memory would wait for the GPU to finish its queued work)."""
    if values.device == device:
        return values
    return values.pin_memory().to(device, non_blocking=True)


@dataclass
class SegmentBatch:
    """The tokens of one segment call: rows[i] runs positions starts[i] .. starts[i] + counts[i] - 1."""
    rows: list[int]
    starts: list[int]
    counts: list[int]
    positions: torch.Tensor  # [1, T] RoPE positions, packed row by row
    kv_len: int  # keys 0 .. kv_len - 1 are read (the largest end over the rows)
    mask: torch.Tensor | None  # [R, 1, n, kv_len] or [1, 1, n, kv_len]; None: every query sees every key
    # general path (more than one row); None on the single-row path
    token_rows: torch.Tensor | None = None  # [T] row of each packed token
    token_positions: torch.Tensor | None = None  # [T] position of each packed token
    row_index: torch.Tensor | None = None  # [S] rows whose keys are gathered (None: the span of the rows, a view)
    query_index: torch.Tensor | None = None  # [S * n] packed token of each query slot (None: one slot per token)
    unpad_index: torch.Tensor | None = None  # [T] query slot of each packed token
    last_index: torch.Tensor | None = None  # [R] packed index of each row's last token
    first_slot: int = 0  # the first row of the key span (when row_index is None)
    slots: int = 1  # query groups: rows of the span, or gathered rows

    @property
    def single(self) -> bool:
        return self.token_rows is None

    @property
    def total(self) -> int:
        return self.positions.shape[1]

    def same_tokens(self, rows: list[int], starts: list[int], counts: list[int]) -> bool:
        return self.rows == rows and self.starts == starts and self.counts == counts


class _LayerCache:
    __slots__ = ("owner", "layer")

    def __init__(self, owner: "KVCache", layer: int):
        self.owner, self.layer = owner, layer

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return self.owner.attend(self.layer, queries, keys, values)


class KVCache:
    def __init__(self, layers: list[int], num_layers: int, batch: int, max_len: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.batch, self.max_len = batch, max_len
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        for layer in layers:
            self.keys[layer] = torch.zeros(batch, heads, max_len, head_dim, dtype=dtype, device=device)
            self.values[layer] = torch.zeros_like(self.keys[layer])
        self.layer_caches: list[_LayerCache | None] = [
            _LayerCache(self, i) if i in self.keys else None for i in range(num_layers)]
        self.device = device
        self.arange = torch.arange(max_len, device=device)
        # causal[p, j]: key j is visible to the query at position p; single-row masks are views of it
        self.causal = self.arange.unsqueeze(1) >= self.arange.unsqueeze(0)
        self.current: SegmentBatch | None = None

    def prepare(self, rows: list[int], starts: list[int], counts: list[int]) -> SegmentBatch:
        """The SegmentBatch for rows[i] running positions starts[i] .. starts[i] + counts[i] - 1."""
        if len(rows) == 1:
            start, end = starts[0], starts[0] + counts[0]
            mask = None if counts[0] == 1 else self.causal[start:end, :end].view(1, 1, counts[0], end)
            batch = SegmentBatch(rows, starts, counts, self.arange[start:end].view(1, -1), end, mask)
        else:
            batch = self._prepare_rows(rows, starts, counts)
        self.current = batch
        return batch

    def _prepare_rows(self, rows, starts, counts) -> SegmentBatch:
        r, n = len(rows), max(counts)
        ends = [s + c for s, c in zip(starts, counts)]
        kv_len = max(ends)
        # Attention reads the keys of a span of rows as a view when the rows fill at least half of it (rows of
        # the span without work get dummy queries, copies of packed token 0, whose outputs are dropped);
        # gathering the keys of the rows instead copies them in every layer (+50% on a 16-row call missing 2 rows).
        first, span = min(rows), max(rows) - min(rows) + 1
        slot_rows = range(first, first + span) if span <= 2 * r else rows
        slot = {row: i for i, row in enumerate(slot_rows)}
        packed, offset = {}, 0  # row -> its packed tokens
        token_rows, token_positions, unpad_index, last_index = [], [], [], []
        for row, start, count in zip(rows, starts, counts):
            token_rows += [row] * count
            token_positions += range(start, start + count)
            unpad_index += range(slot[row] * n, slot[row] * n + count)
            packed[row] = range(offset, offset + count)
            offset += count
            last_index.append(offset - 1)
        query_index = []
        for row in slot_rows:  # a row's tokens, then copies of its last one; a row without work: dummies
            tokens = packed.get(row, range(1))
            query_index += tokens
            query_index += [tokens[-1]] * (n - len(tokens))
        padded = len(query_index) != offset
        # one host -> device copy for every index list
        flat = host_to_device(torch.tensor(token_rows + token_positions + last_index + list(slot_rows)
                                           + (query_index + unpad_index if padded else [])), self.device)
        t, slots = offset, len(slot_rows)
        views = flat.split([t, t, r, slots] + ([slots * n, t] if padded else []))
        token_rows_t, token_positions_t, last_t, slot_rows_t = views[:4]
        query_positions = token_positions_t[views[4]].view(slots, n) if padded else token_positions_t.view(slots, n)
        if n == 1 and all(e == kv_len for e in ends):
            mask = None
        else:
            mask = (self.arange[:kv_len] <= query_positions.unsqueeze(-1)).unsqueeze(1)
        return SegmentBatch(rows, starts, counts, token_positions_t.view(1, t), kv_len, mask, token_rows_t,
                            token_positions_t, None if isinstance(slot_rows, range) else slot_rows_t,
                            views[4] if padded else None, views[5] if padded else None, last_t, first, slots)

    def attend(self, layer: int, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Stores the batch's keys/values [1, heads, T, hd] and attends its queries over their rows' caches."""
        batch = self.current
        k_all, v_all = self.keys[layer], self.values[layer]
        if batch.single:
            row, start, end = batch.rows[0], batch.starts[0], batch.kv_len
            k_all[row, :, start:end] = keys[0]
            v_all[row, :, start:end] = values[0]
            return F.scaled_dot_product_attention(queries, k_all[row:row + 1, :, :end], v_all[row:row + 1, :, :end],
                                                  attn_mask=batch.mask)
        rows_t, pos_t = batch.token_rows, batch.token_positions
        k_all[rows_t, :, pos_t] = keys[0].transpose(0, 1)
        v_all[rows_t, :, pos_t] = values[0].transpose(0, 1)
        kv_len, slots = batch.kv_len, batch.slots
        if batch.row_index is None:  # the span of the rows: views
            r0 = batch.first_slot
            k_rows, v_rows = k_all[r0:r0 + slots, :, :kv_len], v_all[r0:r0 + slots, :, :kv_len]
        else:
            k_rows, v_rows = k_all[batch.row_index, :, :kv_len], v_all[batch.row_index, :, :kv_len]
        heads, hd = queries.shape[1], queries.shape[3]
        q = queries[0].transpose(0, 1)  # [T, heads, hd]
        if batch.query_index is not None:
            q = q[batch.query_index]
        q = q.view(slots, -1, heads, hd).transpose(1, 2)  # [S, heads, n, hd]
        out = F.scaled_dot_product_attention(q, k_rows, v_rows, attn_mask=batch.mask)
        out = out.transpose(1, 2).reshape(-1, heads, hd)  # [S * n, heads, hd]
        if batch.unpad_index is not None:
            out = out[batch.unpad_index]
        return out.transpose(0, 1).unsqueeze(0)  # [1, heads, T, hd]
