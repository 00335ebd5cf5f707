"""Fixed-shape single-token segment calls for batch-1 decoding, captured as CUDA graphs on CUDA.

At batch 1 most segment calls run one token: the new token at the first segment, or a token climbing past an
exit with nothing queued behind it. On a GPU such a call is bound by the host launching its kernels (a
segment of a few layers is a hundred or more of them, each a few microseconds of Python and driver time),
not by the GPU. A CUDA graph replays them as one launch, but it fixes every shape and address, so the call is
written to have the same shapes at every position:
- the token's key and value are stored at the position held in a device tensor (index_copy_),
- attention reads the row's whole cache [max_len] under a mask of the positions up to the token's own, so
  keys not written yet (or left from an earlier sequence in the row) get zero weight,
- RoPE tables come from the same position tensor.
The result equals the engine's default call up to float rounding (attention sums over more, masked, keys);
tests/test_inference_graphs.py compares both on CPU, where the same fixed-shape call runs without capture.

One graph per segment, captured at the segment's first single-token call: two warm-up runs and the capture
itself store the very key and value that the call is about to store, so capturing changes no cache content.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nvium_dist.inference.cache import KVCache


class _FixedShapeLayerCache:
    """The KVCacheLayer of one layer for row 0's single token at `calls.position`."""
    __slots__ = ("calls", "layer")

    def __init__(self, calls: "SingleTokenCalls", layer: int):
        self.calls, self.layer = calls, layer

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        calls = self.calls
        k_row, v_row = calls.cache.keys[self.layer][0], calls.cache.values[self.layer][0]  # [heads, max_len, hd]
        k_row.index_copy_(1, calls.position, keys[0])
        v_row.index_copy_(1, calls.position, values[0])
        return F.scaled_dot_product_attention(queries, k_row.unsqueeze(0), v_row.unsqueeze(0), attn_mask=calls.mask)


class SingleTokenCalls:
    """Runs segment j for the token of row 0 at one position with fixed shapes; on CUDA as a CUDA graph."""

    def __init__(self, model, cache: KVCache, hidden_size: int, dtype: torch.dtype, device: torch.device):
        if cache.batch != 1:
            raise ValueError(f"fixed-shape single-token calls decode a batch of one, not {cache.batch} rows")
        self.model, self.cache = model, cache
        self.capture = device.type == "cuda"
        self.input = torch.zeros(1, 1, hidden_size, dtype=dtype, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.mask = torch.zeros(1, 1, 1, cache.max_len, dtype=torch.bool, device=device)
        self.layer_caches = [_FixedShapeLayerCache(self, i) if cache_layer is not None else None
                             for i, cache_layer in enumerate(cache.layer_caches)]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def run(self, segment: int, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """hidden [1, 1, d] of the token at `position` -> segment's output [1, 1, d]. On CUDA the output is the
        graph's own buffer, valid until the segment runs again."""
        self.input.copy_(hidden)
        self.position.fill_(position)
        if not self.capture:
            return self._call(segment)
        if segment not in self.graphs:
            self.graphs[segment] = self._captured(segment)
        graph, output = self.graphs[segment]
        graph.replay()
        return output

    def _call(self, segment: int) -> torch.Tensor:
        torch.le(self.cache.arange, self.position, out=self.mask.view(-1))
        rotary = self.model.rotary(self.position.view(1, 1))
        return self.model.run_segment(segment, self.input, rotary, self.layer_caches)

    def _captured(self, segment: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # warm-up on a side stream, as torch.cuda.graphs asks: lazy initialisations happen outside the capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._call(segment)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self._call(segment)
        return graph, output
