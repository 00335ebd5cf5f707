"""The N-vium mixture: the one place where its math lives.

Heads are indexed k = 0..K-1; heads 0..K-2 are early exits with routers, head K-1 is the final head.
Per token, router k gives q_k = P(exit at k | reached k); the mixture weights are the sequential-halting
(stick-breaking) probabilities

    pi_k = q_k * prod_{j<k} (1 - q_j),   pi_{K-1} = prod_{j<K-1} (1 - q_j)

and log p_mix(y) = logsumexp_k(log max(pi_k, 1e-8) + log p_k(y)), as in the paper's code: pi comes from
the unclamped q, and only inside the log is it floored at 1e-8. The router-warmup penalty reads q clamped
to [1e-6, 1 - 1e-6]. Everything is computed in log space in fp32.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

Q_MIN = 1e-6  # the warmup penalty's clamp of q
PI_MIN = 1e-8  # the floor of pi inside log p_mix
_LOG_PI_MIN = math.log(PI_MIN)


def router_log_probs(router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., 2] router logits ([continue, exit]) -> (log q, log(1 - q)), unclamped (a log-softmax, so
    finite for router logits of any magnitude)."""
    log_probs = torch.log_softmax(router_logits.float(), dim=-1)
    return log_probs[..., 1], log_probs[..., 0]


def floored_log_pi(log_pi: torch.Tensor) -> torch.Tensor:
    """log max(pi, 1e-8): the weights log p_mix uses."""
    return log_pi.clamp_min(_LOG_PI_MIN)


def log_exit_weights(log_q: torch.Tensor, log_continue: torch.Tensor) -> torch.Tensor:
    """[..., K-1] router log-probabilities -> [..., K] log pi_k."""
    log_reach = torch.cumsum(log_continue, dim=-1)  # log prod_{j<=k} (1 - q_j)
    reached_before = torch.cat([torch.zeros_like(log_reach[..., :1]), log_reach[..., :-1]], dim=-1)
    return torch.cat([reached_before + log_q, log_reach[..., -1:]], dim=-1)


class MixtureTerms(NamedTuple):
    """Per-token quantities; leading dims are those of the labels, heads are the last dim.

    A NamedTuple so that DeepSpeed's ZeRO-3 module hooks see the tensors a model forward returns."""
    log_p_heads: torch.Tensor  # [..., K] log p_k(y)
    q: torch.Tensor  # [..., K-1] exit probabilities
    log_pi: torch.Tensor  # [..., K] unclamped
    log_p_mix: torch.Tensor  # [...]
    expected_depth: torch.Tensor  # [...] sum_k pi_k l_k / L
    warmup_penalty: torch.Tensor  # [...] sum_k (q_k - 1/(K-k+1))^2 (1-based k)

    @property
    def pi(self) -> torch.Tensor:
        return self.log_pi.exp()


@functools.lru_cache(maxsize=64)
def _constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A small float32 constant made once per device: torch.tensor(..., device="cuda") at every forward
    would be a blocking host-to-device copy each time. Callers only read it."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def depth_fractions(exit_layers: list[int], num_layers: int, device=None) -> torch.Tensor:
    return _constant(tuple(layer / num_layers for layer in exit_layers), torch.device(device or "cpu"))


def warmup_targets(num_heads: int, device=None) -> torch.Tensor:
    """Targets 1/(K-k+1) for the K-1 routers (K=4: 1/4, 1/3, 1/2): a uniform exit marginal."""
    return _constant(tuple(1.0 / (num_heads - k) for k in range(num_heads - 1)), torch.device(device or "cpu"))


def mixture_terms(
    log_p_heads: torch.Tensor,
    router_logits: torch.Tensor | None,
    exit_layers: list[int],
    num_layers: int,
    force_continue: bool = False,
) -> MixtureTerms:
    """Combines per-head label log-probabilities [..., K] and router logits [..., K-1, 2] into the mixture.

    `force_continue` sets q = 0 exactly (no floor on pi): the mixture is then the final head alone, i.e. a
    plain transformer; used to check that equivalence and for full-depth reference runs.
    """
    log_p_heads = log_p_heads.float()
    num_heads = log_p_heads.shape[-1]
    depth = depth_fractions(exit_layers, num_layers, device=log_p_heads.device)
    if num_heads == 1 or force_continue:
        shape = log_p_heads.shape[:-1] + (num_heads - 1,)
        q = log_p_heads.new_zeros(shape)
        log_pi = torch.full_like(log_p_heads, -math.inf)
        log_pi[..., -1] = 0.0
        mixture_log_pi = log_pi
    else:
        log_q, log_continue = router_log_probs(router_logits)
        q = log_q.exp()
        log_pi = log_exit_weights(log_q, log_continue)
        mixture_log_pi = floored_log_pi(log_pi)
    log_p_mix = torch.logsumexp(mixture_log_pi + log_p_heads, dim=-1)
    expected_depth = (log_pi.exp() * depth).sum(-1)
    clamped_q = q.clamp(Q_MIN, 1.0 - Q_MIN)
    warmup_penalty = ((clamped_q - warmup_targets(num_heads, device=q.device)) ** 2).sum(-1)
    return MixtureTerms(log_p_heads, q, log_pi, log_p_mix, expected_depth, warmup_penalty)


@dataclass
class LossComponents:
    loss: torch.Tensor  # what is back-propagated
    lm_loss: torch.Tensor  # mean -log p_mix(y)
    depth_loss: torch.Tensor  # mean expected normalised depth (before beta)
    warmup_loss: torch.Tensor  # mean router-warmup penalty (0 outside the warmup)
    head_loss: torch.Tensor  # mean over heads of each head's own CE (added only with aux_head_loss > 0)

    NAMES = ("loss", "lm_loss", "depth_loss", "warmup_loss", "head_loss")

    def logged(self) -> torch.Tensor:
        """The components as float64 numbers in NAMES order, on the loss's device (no host read), to add up
        over micro-batches and ranks."""
        return torch.stack([getattr(self, name).detach() for name in self.NAMES]).double()


def nvium_loss(terms: MixtureTerms, loss_mask: torch.Tensor, beta: float, in_router_warmup: bool,
               aux_head_loss: float = 0.0) -> LossComponents:
    """-log p_mix + beta * E[depth] (no depth penalty during the router warmup, which adds its own term).

    `aux_head_loss` > 0 (opt-in; the paper's objective has none) adds that weight times the mean over the
    K heads of each head's own cross entropy, at every step: every head then gets gradient whatever
    routing mass it holds, which keeps heads that the routers stopped sending tokens to from dying. A
    dense model (one head) never gets the term.
    """
    mask = loss_mask.float()
    count = mask.sum().clamp_min(1.0)
    lm_loss = (-terms.log_p_mix * mask).sum() / count
    depth_loss = (terms.expected_depth * mask).sum() / count
    num_heads = terms.log_p_heads.shape[-1]
    head_loss = (-terms.log_p_heads * mask[..., None]).sum() / (count * num_heads)
    if in_router_warmup:
        warmup_loss = (terms.warmup_penalty * mask).sum() / count
        loss = lm_loss + warmup_loss
    else:
        warmup_loss = torch.zeros_like(lm_loss)
        loss = lm_loss + beta * depth_loss
    if aux_head_loss > 0 and num_heads > 1:
        loss = loss + aux_head_loss * head_loss
    return LossComponents(loss, lm_loss, depth_loss, warmup_loss, head_loss)


def evaluation_sums(terms: MixtureTerms, loss_mask: torch.Tensor) -> torch.Tensor:
    """Masked sums [tokens, -log p_mix, depth, -log p_k x K, pi_k x K] (float64, CPU), to add up
    over micro-batches and ranks before dividing by the token count."""
    mask = loss_mask.double()
    per_head = mask[..., None]
    return torch.cat([
        mask.sum().reshape(1), (-terms.log_p_mix.double() * mask).sum().reshape(1),
        (terms.expected_depth.double() * mask).sum().reshape(1),
        (-terms.log_p_heads.double() * per_head).flatten(0, -2).sum(0),
        (terms.pi.double() * per_head).flatten(0, -2).sum(0),
    ]).cpu()


def router_warmup_steps(train_iters: int, warmup_steps: int, warmup_fraction: float) -> int:
    """The router warmup lasts max(warmup_steps, fraction x total steps rounded down), as the paper's code."""
    return max(warmup_steps, int(warmup_fraction * train_iters))


def log_mixture_distribution(
    head_log_probs: torch.Tensor, router_logits: torch.Tensor | None, force_continue: bool = False
) -> torch.Tensor:
    """Full-vocab log p_mix: head log-softmaxes [..., K, V] and router logits [..., K-1, 2] -> [..., V]."""
    num_heads = head_log_probs.shape[-2]
    if num_heads == 1 or force_continue:
        return head_log_probs[..., -1, :].float()
    log_q, log_continue = router_log_probs(router_logits)
    log_pi = floored_log_pi(log_exit_weights(log_q, log_continue))
    return torch.logsumexp(log_pi.unsqueeze(-1) + head_log_probs.float(), dim=-2)
