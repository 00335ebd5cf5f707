"""The mixture math against an explicit sum over heads, its gradients and its numerical range."""
import math

import pytest
import torch

from nvium_dist.mixture import (log_mixture_distribution, mixture_terms, nvium_loss, router_warmup_steps,
                                warmup_targets)

EXIT_LAYERS = [1, 2, 4, 6]
NUM_LAYERS = 6


def brute_force(log_p_heads, router_logits):
    """p_mix = sum_k max(pi_k, 1e-8) p_k in probability space, in float64, pi from the unclamped q (the
    paper's code)."""
    q = torch.softmax(router_logits.double(), dim=-1)[..., 1]
    K = log_p_heads.shape[-1]
    pis, reach = [], torch.ones_like(q[..., 0])
    for k in range(K - 1):
        pis.append(reach * q[..., k])
        reach = reach * (1 - q[..., k])
    pis.append(reach)
    pi = torch.stack(pis, dim=-1)
    p_mix = (pi.clamp_min(1e-8) * log_p_heads.double().exp()).sum(-1)
    depth = (pi * torch.tensor([l / NUM_LAYERS for l in EXIT_LAYERS], dtype=torch.float64)).sum(-1)
    return pi, p_mix.log(), depth, q


def random_inputs(scale, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_p = torch.log_softmax(torch.randn(5, 7, 4, 11, generator=g) * 3, dim=-1)[..., 0]
    router = torch.randn(5, 7, 3, 2, generator=g) * scale
    return log_p.to(dtype), router.to(dtype)


@pytest.mark.parametrize("scale", [0.5, 3.0, 80.0])
def test_mixture_matches_explicit_sum(scale):
    log_p, router = random_inputs(scale)
    terms = mixture_terms(log_p, router, EXIT_LAYERS, NUM_LAYERS)
    pi, log_p_mix, depth, q = brute_force(log_p, router)
    torch.testing.assert_close(terms.pi.double(), pi, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(terms.log_p_mix.double(), log_p_mix, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms.expected_depth.double(), depth, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(terms.q.double(), q, atol=1e-7, rtol=1e-5)
    assert torch.allclose(terms.pi.sum(-1), torch.ones(()), atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 80.0])
def test_mixture_gradients_match_explicit_sum(scale):
    log_p, router = random_inputs(scale, seed=1)
    log_p64, router64 = log_p.double().requires_grad_(), router.double().requires_grad_()
    log_p32, router32 = log_p.clone().requires_grad_(), router.clone().requires_grad_()
    weights = torch.randn(log_p.shape[:-1], generator=torch.Generator().manual_seed(2))
    (brute_force(log_p64, router64)[1] * weights).sum().backward()
    (mixture_terms(log_p32, router32, EXIT_LAYERS, NUM_LAYERS).log_p_mix * weights).sum().backward()
    torch.testing.assert_close(log_p32.grad.double(), log_p64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(router32.grad.double(), router64.grad, atol=1e-5, rtol=1e-4)


def test_extreme_router_logits_stay_finite_in_fp32_and_bf16():
    for dtype in (torch.float32, torch.bfloat16):
        log_p, router = random_inputs(1.0, dtype=dtype, seed=3)
        router = (torch.sign(router.float()) * 80).to(dtype).requires_grad_()
        terms = mixture_terms(log_p, router, EXIT_LAYERS, NUM_LAYERS)
        assert terms.log_p_mix.dtype == torch.float32
        loss = nvium_loss(terms, torch.ones(log_p.shape[:-1]), beta=0.15, in_router_warmup=False).loss
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(router.grad.float()).all()
        # bf16 inputs are upcast, so the result equals the fp32 computation on the same (rounded) values
        reference = mixture_terms(log_p.float(), router.detach().float(), EXIT_LAYERS, NUM_LAYERS)
        torch.testing.assert_close(terms.log_p_mix, reference.log_p_mix)


def test_forced_continue_is_the_final_head():
    log_p, router = random_inputs(2.0)
    terms = mixture_terms(log_p, router, EXIT_LAYERS, NUM_LAYERS, force_continue=True)
    assert torch.equal(terms.log_p_mix, log_p[..., -1])
    assert torch.equal(terms.expected_depth, torch.ones_like(terms.expected_depth))
    full = torch.log_softmax(torch.randn(3, 4, 9), dim=-1)
    assert torch.equal(log_mixture_distribution(full, torch.randn(3, 3, 2), force_continue=True), full[..., -1, :])


def test_full_vocab_mixture_normalises_and_agrees_with_label_form():
    head_log_probs = torch.log_softmax(torch.randn(6, 4, 13), dim=-1)
    router = torch.randn(6, 3, 2) * 4
    log_mix = log_mixture_distribution(head_log_probs, router)
    torch.testing.assert_close(log_mix.exp().sum(-1), torch.ones(6))
    labels = torch.randint(0, 13, (6,))
    label_form = mixture_terms(head_log_probs.gather(-1, labels[:, None, None].expand(6, 4, 1))[..., 0], router,
                               EXIT_LAYERS, NUM_LAYERS)
    torch.testing.assert_close(label_form.log_p_mix, log_mix.gather(-1, labels[:, None])[:, 0])


def test_loss_components_and_warmup():
    log_p, router = random_inputs(1.0)
    terms = mixture_terms(log_p, router, EXIT_LAYERS, NUM_LAYERS)
    mask = torch.ones(log_p.shape[:-1])
    mask[0] = 0
    normal = nvium_loss(terms, mask, beta=0.5, in_router_warmup=False)
    torch.testing.assert_close(normal.lm_loss, -terms.log_p_mix[1:].mean())
    torch.testing.assert_close(normal.loss, normal.lm_loss + 0.5 * terms.expected_depth[1:].mean())
    warm = nvium_loss(terms, mask, beta=0.5, in_router_warmup=True)
    # the penalty reads q clamped to [1e-6, 1 - 1e-6], as the paper's code
    clamped_q = terms.q.clamp(1e-6, 1 - 1e-6)
    expected_penalty = ((clamped_q - torch.tensor([1 / 4, 1 / 3, 1 / 2])) ** 2).sum(-1)[1:].mean()
    torch.testing.assert_close(warm.loss, warm.lm_loss + expected_penalty)
    assert torch.allclose(warmup_targets(4), torch.tensor([0.25, 1 / 3, 0.5]))
    assert router_warmup_steps(1000, 10, 0.05) == 50 and router_warmup_steps(100, 10, 0.05) == 10


def test_aux_head_loss_is_the_mean_of_the_heads_own_cross_entropies():
    log_p, router = random_inputs(1.0, seed=3)
    terms = mixture_terms(log_p, router, EXIT_LAYERS, NUM_LAYERS)
    mask = torch.ones(log_p.shape[:-1])
    mask[1, 2:] = 0
    per_head_ce = [-(log_p[..., k] * mask).sum() / mask.sum() for k in range(4)]
    expected = sum(per_head_ce) / 4
    for warmup in (False, True):
        paper = nvium_loss(terms, mask, beta=0.3, in_router_warmup=warmup)
        remedy = nvium_loss(terms, mask, beta=0.3, in_router_warmup=warmup, aux_head_loss=0.1)
        torch.testing.assert_close(remedy.head_loss, expected)
        torch.testing.assert_close(paper.head_loss, expected)  # logged either way, added only when asked
        torch.testing.assert_close(remedy.loss, paper.loss + 0.1 * expected)
    # its gradient reaches every head's log-prob even where the routers give that head no mass
    log_p_req = log_p.clone().requires_grad_()
    dead_final = router.clone()
    dead_final[..., 0, :] = torch.tensor([-30.0, 30.0])  # everything exits at the first head
    loss = nvium_loss(mixture_terms(log_p_req, dead_final, EXIT_LAYERS, NUM_LAYERS), mask, 0.0, False, 0.1).loss
    loss.backward()
    final_grad = log_p_req.grad[..., -1][mask.bool()]
    # (p_mix's own share is the 1e-8 floor of pi: at most a few percent of it here)
    torch.testing.assert_close(final_grad, torch.full_like(final_grad, -0.1 / 4 / mask.sum()), atol=0, rtol=0.01)
    # a dense model (one head) never gets the term
    dense_terms = mixture_terms(log_p[..., :1], None, [6], NUM_LAYERS)
    torch.testing.assert_close(nvium_loss(dense_terms, mask, 0.0, False, 0.1).loss,
                               nvium_loss(dense_terms, mask, 0.0, False).loss)


def test_dense_model_has_single_head():
    log_p = torch.log_softmax(torch.randn(4, 5, 1, 7), -1)[..., 0]
    terms = mixture_terms(log_p, None, [6], NUM_LAYERS)
    assert torch.equal(terms.log_p_mix, log_p[..., 0])
    assert terms.q.shape[-1] == 0 and math.isclose(float(terms.expected_depth.mean()), 1.0)
