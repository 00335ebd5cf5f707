"""Preallocated KV caches for packed, ragged decoding batches (the `KVCacheLayer` protocol of nvium_dist.model).

One `KVCache` holds keys and values of the layers a process owns for B rows (sequences) and `max_len`
positions. A segment call runs T tokens packed into one [1, T, d] activation, with no padding in the
layers' matrix products: row rows[i] contributes counts[i] consecutive positions starting at starts[i]
(its carried queue and, maybe, its current token). Before the call the decoder `prepare`s a `SegmentBatch`
once; every layer of the segment reuses its indices and mask.

Attention is the only place where rows meet: each token attends to its own row's keys at positions <= its
own (layer caches fill strictly in position order, so that is the causal mask). `attend` regroups the
packed queries as [R, heads, n, hd] (n = the longest run; shorter runs are padded with copies of their
last query, whose outputs are dropped), so the padding costs only attention over a few positions.

One row (batch 1, or a single row with work) takes a lean path: slices and views, no index tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    row_index: torch.Tensor | None = None  # [R] rows, for reading their keys (None: rows 0..R-1, a view)
    query_index: torch.Tensor | None = None  # [R * n] packed token of each padded query slot (None: all counts equal)
    unpad_index: torch.Tensor | None = None  # [T] padded slot of each packed token
    last_index: torch.Tensor | None = None  # [R] packed index of each row's last token

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
        token_rows, token_positions, query_index, unpad_index, last_index = [], [], [], [], []
        offset = 0
        for i, (row, start, count) in enumerate(zip(rows, starts, counts)):
            token_rows += [row] * count
            token_positions += range(start, start + count)
            query_index += range(offset, offset + count)
            query_index += [offset + count - 1] * (n - count)  # padding: repeat the last query
            unpad_index += range(i * n, i * n + count)
            offset += count
            last_index.append(offset - 1)
        ragged = any(c != n for c in counts)
        # one host -> device copy for every index list
        flat = torch.tensor(token_rows + token_positions + last_index + rows + (query_index + unpad_index if ragged
                                                                              else []), device=self.device)
        t = offset
        views = flat.split([t, t, r, r] + ([r * n, t] if ragged else []))
        token_rows_t, token_positions_t, last_t, rows_t = views[:4]
        query_positions = token_positions_t[views[4]].view(r, n) if ragged else token_positions_t.view(r, n)
        if n == 1 and all(e == kv_len for e in ends):
            mask = None
        else:
            mask = (self.arange[:kv_len] <= query_positions.unsqueeze(-1)).unsqueeze(1)
        contiguous = rows == list(range(rows[0], rows[0] + r))
        return SegmentBatch(rows, starts, counts, token_positions_t.view(1, t), kv_len, mask, token_rows_t,
                            token_positions_t, None if contiguous else rows_t, views[4] if ragged else None,
                            views[5] if ragged else None, last_t)

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
        kv_len = batch.kv_len
        if batch.row_index is None:  # rows r0 .. r0 + R - 1: views
            r0 = batch.rows[0]
            k_rows = k_all[r0:r0 + len(batch.rows), :, :kv_len]
            v_rows = v_all[r0:r0 + len(batch.rows), :, :kv_len]
        else:
            k_rows = k_all[batch.row_index, :, :kv_len]
            v_rows = v_all[batch.row_index, :, :kv_len]
        heads, hd = queries.shape[1], queries.shape[3]
        r = len(batch.rows)
        q = queries[0].transpose(0, 1)  # [T, heads, hd]
        if batch.query_index is not None:
            q = q[batch.query_index]
        q = q.view(r, -1, heads, hd).transpose(1, 2)  # [R, heads, n, hd]
        out = F.scaled_dot_product_attention(q, k_rows, v_rows, attn_mask=batch.mask)
        out = out.transpose(1, 2).reshape(-1, heads, hd)  # [R * n, heads, hd]
        if batch.unpad_index is not None:
            out = out[batch.unpad_index]
        return out.transpose(0, 1).unsqueeze(0)  # [1, heads, T, hd]
