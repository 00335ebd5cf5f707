"""Preallocated KV caches with explicit positions (the `KVCacheLayer` protocol of nvium_dist.model).

One `KVCache` holds keys and values of the layers a process owns, for B sequences and `max_len`
positions plus one trash slot (index `max_len`) that padding tokens write to. Before each segment
call the decoder `prepare`s a `SegmentBatch` (which rows take part, the positions of their tokens,
padding) once; every layer of the segment then reuses its write indices and attention mask.

Layer caches fill strictly in position order (the deferred decoder guarantees it), so "key j is
visible to the query at position p" is simply j <= p.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SegmentBatch:
    """The tokens one segment call runs on: R rows, n tokens each (padded), positions [R, n]."""
    rows: list[int]
    starts: list[int]
    counts: list[int]
    positions: torch.Tensor  # [R, n] RoPE positions (padding: clamped to a valid value)
    single: bool  # one row: contiguous slices, no index tensors
    row_index: torch.Tensor | None  # [R, 1] (general path)
    write_index: torch.Tensor | None  # [R, n] positions, padding -> trash slot (general path)
    all_rows: bool  # rows == 0..B-1 in order: reads are views
    kv_len: int
    mask: torch.Tensor | None  # [R, 1, n, kv_len] or None (every query sees every key)
    last_index: torch.Tensor | None  # [R] index of each row's last real token (general path)

    @property
    def key(self):
        return (tuple(self.rows), tuple(self.starts), tuple(self.counts))


class _LayerCache:
    __slots__ = ("owner", "layer")

    def __init__(self, owner: "KVCache", layer: int):
        self.owner, self.layer = owner, layer

    def update(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
        return self.owner.update(self.layer, keys, values)


class KVCache:
    def __init__(self, layers: list[int], num_layers: int, batch: int, max_len: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.batch, self.max_len = batch, max_len
        self.trash = max_len
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        for layer in layers:
            self.keys[layer] = torch.zeros(batch, heads, max_len + 1, head_dim, dtype=dtype, device=device)
            self.values[layer] = torch.zeros_like(self.keys[layer])
        self.layer_caches: list[_LayerCache | None] = [
            _LayerCache(self, i) if i in self.keys else None for i in range(num_layers)]
        self.arange = torch.arange(max_len + 1, device=device)
        self.batch_rows = list(range(batch))
        self.current: SegmentBatch | None = None

    def prepare(self, rows: list[int], starts: list[int], counts: list[int]) -> SegmentBatch:
        """The SegmentBatch for rows[i] running positions starts[i] .. starts[i]+counts[i]-1."""
        current = self.current
        if current is not None and current.rows == rows and current.starts == starts and current.counts == counts:
            return current
        ar = self.arange
        if len(rows) == 1:
            start, n = starts[0], counts[0]
            end = start + n
            positions = ar[start:end].unsqueeze(0)
            mask = None if n == 1 else (ar[:end].unsqueeze(0) <= positions.unsqueeze(-1)).unsqueeze(1)
            batch = SegmentBatch(rows, starts, counts, positions, True, None, None, False, end, mask, None)
        else:
            device = ar.device
            n = max(counts)
            starts_t = torch.tensor(starts, device=device)
            counts_t = torch.tensor(counts, device=device)
            ends = [s + c for s, c in zip(starts, counts)]
            kv_len = max(ends)
            offsets = ar[:n]
            positions = starts_t.unsqueeze(1) + offsets
            valid = offsets < counts_t.unsqueeze(1)
            write_index = torch.where(valid, positions, self.trash)
            query_pos = torch.where(valid, positions, 0)
            if n == 1 and all(e == kv_len for e in ends):
                mask = None
            else:
                mask = (ar[:kv_len] <= query_pos.unsqueeze(-1)).unsqueeze(1)
            all_rows = rows == self.batch_rows
            batch = SegmentBatch(rows, starts, counts, query_pos, False,
                                 torch.tensor(rows, device=device).unsqueeze(1), write_index, all_rows, kv_len, mask,
                                 counts_t - 1)
        self.current = batch
        return batch

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        """keys/values [R, heads, n, hd] of the prepared batch -> (keys, values, mask) to attend over."""
        batch = self.current
        k_all, v_all = self.keys[layer], self.values[layer]
        if batch.single:
            row, start = batch.rows[0], batch.starts[0]
            end = start + batch.counts[0]
            k_all[row, :, start:end] = keys[0]
            v_all[row, :, start:end] = values[0]
            return k_all[row:row + 1, :, :end], v_all[row:row + 1, :, :end], batch.mask
        k_all[batch.row_index, :, batch.write_index] = keys.transpose(1, 2)
        v_all[batch.row_index, :, batch.write_index] = values.transpose(1, 2)
        if batch.all_rows:
            return k_all[:, :, :batch.kv_len], v_all[:, :, :batch.kv_len], batch.mask
        rows = batch.row_index.squeeze(1)
        return k_all[rows, :, :batch.kv_len], v_all[rows, :, :batch.kv_len], batch.mask
