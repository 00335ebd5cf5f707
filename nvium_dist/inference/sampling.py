"""Counter-based randomness and exact sampling helpers.

Every random number is a pure function of (seed, sequence, position, exit, stream): a splitmix64 hash
chain mapped to a double in (0, 1). Nothing depends on how many draws happened before, so deferred,
full-depth, batched and pipeline-stage decoding with one seed make the same decisions and tokens.

Exit decision at exit k for the token at `position`: exit iff u(seed, seq, position, k, 0) < q_k.
Token from head k: inverse CDF of softmax(z_k) at u(seed, seq, position, k, 1).
Transformed sampling (full mixture, then temperature/top-k/top-p) uses exit index -1.

`uniforms` computes the same numbers, bit for bit, as a tensor on the device that decides with them, so a
GPU decoder needs no host round trip to draw them.
"""
from __future__ import annotations

import math

import torch

_M64 = (1 << 64) - 1
STREAM_EXIT, STREAM_TOKEN = 0, 1


def _mix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def uniform(seed: int, sequence: int, position: int, exit: int, stream: int) -> float:
    """A uniform double in the open interval (0, 1), keyed by its arguments (no state)."""
    h = _mix64(seed & _M64)
    for part in (sequence, position, exit, stream):
        h = _mix64(h ^ (part & _M64))
    return ((h >> 11) + 0.5) * (1.0 / (1 << 53))


def _as_int64(value: int) -> int:
    """The two's-complement int64 with the same 64 bits as `value` mod 2^64."""
    value &= _M64
    return value - (1 << 64) if value >> 63 else value


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical shift of the 64 bits of an int64 tensor (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


# int64 arithmetic wraps modulo 2^64 like the masked Python integers of _mix64
_GOLDEN, _MIX1, _MIX2 = (_as_int64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _mix64_tensor(z: torch.Tensor) -> torch.Tensor:
    z = z + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def uniform_keys(keys: list[tuple[int, int, int, int, int]]) -> torch.Tensor:
    """(seed, sequence, position, exit, stream) per draw -> the int64 [R, 5] host tensor `uniforms` reads."""
    return torch.tensor([[_as_int64(part) for part in key] for key in keys], dtype=torch.int64)


def uniforms(keys: torch.Tensor) -> torch.Tensor:
    """keys [R, 5] int64 from uniform_keys, on any device -> [R] float64 on that device: uniform(*key) per row,
    bitwise equal."""
    h = _mix64_tensor(keys[:, 0])
    for part in range(1, 5):
        h = _mix64_tensor(h ^ keys[:, part])
    return (_shift_right(h, 11).double() + 0.5) * (1.0 / (1 << 53))


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [R, V] (need not be normalised), u [R] in (0,1) -> token ids [R]: the smallest y with CDF(y) > u."""
    cdf = probs.double().cumsum(-1)
    target = (u.double() * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return tokens.clamp_(max=probs.shape[-1] - 1)


def sample_from_logits(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Exact draw from softmax(logits) [R, V] with uniforms u [R]."""
    return inverse_cdf(torch.softmax(logits.float(), dim=-1), u)


class SamplingTransform:
    """temperature / top-k / top-p / greedy applied to a full log-distribution [R, V].

    These change the distribution, and none of them can be computed from a single head of the mixture,
    so they are only available where the full p_mix is computed (mode="full")."""

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False):
        if temperature <= 0 and not greedy:
            raise ValueError(f"temperature must be > 0 (got {temperature}); use greedy=True for argmax decoding")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_k, self.top_p, self.greedy = temperature, top_k, top_p, greedy

    @property
    def is_identity(self) -> bool:
        return not self.greedy and self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0

    def describe(self) -> str:
        if self.greedy:
            return "greedy"
        return f"temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}"

    def sample(self, log_probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        log_probs = log_probs.float()
        if self.greedy:
            return log_probs.argmax(-1)
        logits = log_probs / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, -1)
            before = probs.cumsum(-1) - probs  # mass strictly above each token
            drop_sorted = before >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, -math.inf)
        return sample_from_logits(logits, u)
