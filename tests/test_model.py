"""The model on real megatron-core layers: reference equivalence, causality, tensor parallelism, learning."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from distributed_runner import run_distributed
from nvium_dist.config import ConfigError, ModelConfig, ParallelConfig, load_config
from nvium_dist.mixture import nvium_loss

TINY = dict(vocab_size=300, hidden_size=64, num_layers=6, num_heads=4, ffn_hidden_size=96, exits=[1, 2, 4],
            seq_length=32, make_vocab_size_divisible_by=64)


@pytest.fixture(scope="module")
def single_process():
    from nvium_dist.parallel import init_distributed

    init_distributed(ParallelConfig())
    yield


def build(seed=0, **overrides):
    from nvium_dist.model import NviumModel

    torch.manual_seed(seed)
    return NviumModel(ModelConfig(**{**TINY, **overrides}))


def _rms(x, weight, config):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.norm_eps) * weight


def reference_hidden_states(sd, config, tokens):
    """A plain LLaMA trunk written from scratch over the full weights: the residual stream after each layer."""

    def rope(x):
        hd = x.shape[-1]
        inv = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.arange(x.shape[2]).float()[:, None] * inv
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        return x * cos + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin

    b, s = tokens.shape
    h, hd = config.num_heads, config.head_dim
    x = sd["embedding.weight"][tokens]
    states = []
    for i in range(config.num_layers):
        p = f"layers.{i}."
        qkv = (_rms(x, sd[p + "attn_norm.weight"], config) @ sd[p + "attn.qkv.weight"].T).view(b, s, h, 3, hd)
        q, k, v = (qkv[:, :, :, j].transpose(1, 2) for j in range(3))
        att = torch.softmax((rope(q) @ rope(k).transpose(-1, -2)) / math.sqrt(hd)
                            + torch.full((s, s), float("-inf")).triu(1), -1) @ v
        x = x + att.transpose(1, 2).reshape(b, s, h * hd) @ sd[p + "attn.out.weight"].T
        n = _rms(x, sd[p + "mlp_norm.weight"], config)
        x = x + (F.silu(n @ sd[p + "mlp.gate.weight"].T) * (n @ sd[p + "mlp.up.weight"].T)) @ sd[p + "mlp.down.weight"].T
        states.append(x)
    return states


def reference_transformer(sd, config, tokens):
    """Plain LLaMA: final norm -> output matrix, log-softmax over the real vocab."""
    last = config.num_heads_total - 1
    logits = _rms(reference_hidden_states(sd, config, tokens)[-1], sd[f"heads.{last}.norm.weight"], config) \
        @ sd["output.weight"].T
    return torch.log_softmax(logits[..., : config.vocab_size], -1)


def reference_nvium(sd, config, tokens, labels):
    """The paper's N-vium written from scratch in its own terms (one loop over exits, probability space):
    head k reads the stream after layer l_k through its norm n, the adapter n + W2 SiLU(W1 n) and the shared
    output matrix; its router maps n through fc1 -> GELU -> fc2 -> RMSNorm -> [continue, exit]. Exit weights
    are stick-breaking products of the router softmax, log p_mix = log sum_k max(pi_k, 1e-8) p_k(y), the
    warmup term reads q clamped to [1e-6, 1 - 1e-6]."""
    states = reference_hidden_states(sd, config, tokens)
    K = config.num_heads_total
    log_p, routers, pis, depth, warmup = [], [], [], 0.0, 0.0
    reach = torch.ones(tokens.shape)
    for k, layer in enumerate(config.exit_layers):
        h = f"heads.{k}."
        n = _rms(states[layer - 1], sd[h + "norm.weight"], config)
        adapted = n + F.silu(n @ sd[h + "adapter.w1.weight"].T) @ sd[h + "adapter.w2.weight"].T
        logits = (adapted @ sd["output.weight"].T)[..., : config.vocab_size]
        log_p.append(torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0])
        if k < K - 1:
            r = h + "router."
            body = F.gelu(n @ sd[r + "fc1.weight"].T + sd[r + "fc1.bias"]) @ sd[r + "fc2.weight"].T + sd[r + "fc2.bias"]
            router = _rms(body, sd[r + "norm.weight"], config) @ sd[r + "logits.weight"].T + sd[r + "logits.bias"]
            routers.append(router)
            p_continue, p_exit = torch.softmax(router, -1).unbind(-1)
            pis.append(reach * p_exit)
            reach = reach * p_continue
            warmup = warmup + (p_exit.clamp(1e-6, 1 - 1e-6) - 1 / (K - k)) ** 2
        else:
            pis.append(reach)
        depth = depth + pis[-1] * layer / config.num_layers
    log_p, pi = torch.stack(log_p, -1), torch.stack(pis, -1)
    p_mix = (pi.clamp(1e-8, 1.0) * log_p.exp()).sum(-1)
    return dict(log_p_heads=log_p, router_logits=torch.stack(routers, -2), pi=pi, log_p_mix=p_mix.log(),
                mix_loss=-p_mix.log().mean(), depth_loss=depth.mean(), warmup_loss=warmup.mean())


def test_forced_continue_equals_plain_transformer(single_process):
    model = build()
    tokens = torch.randint(0, 300, (2, 24))
    labels = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        terms = model(tokens, labels, force_continue=True)
        reference = reference_transformer(model.state_dict(), model.config, tokens)
    # zero routing mass: the mixture is exactly the final head ...
    assert torch.equal(terms.log_p_mix, terms.log_p_heads[..., -1])
    # ... and with the adapters at their zero init, the final head is a plain transformer
    torch.testing.assert_close(terms.log_p_mix, reference.gather(-1, labels[..., None])[..., 0], atol=2e-5, rtol=1e-5)


def test_rope_tables_are_built_once_per_forward(single_process, monkeypatch):
    from nvium_dist import model as model_module

    built = []
    original = model_module.Rotary.at
    monkeypatch.setattr(model_module.Rotary, "at", lambda positions, inv_freq: built.append(1) or original(positions,
                                                                                                        inv_freq))
    model = build()
    tokens = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        model(tokens, tokens)
    assert model.config.num_heads_total > 1 and len(built) == 1


def test_one_tp_rank_skips_megatron_wrappers_with_the_same_numbers(single_process, monkeypatch):
    """At one TP rank the linear layers and the embedding run the plain torch op on their weight, in training
    (autograd) and in decoding alike: megatron's wrappers are never entered, and every output and every
    gradient is bitwise what the wrappers give."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    import nvium_dist.model as model_module

    model = build()
    wrapped = [m for m in model.modules()
               if isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding))]
    calls = []
    for module in wrapped:
        module.register_forward_pre_hook(lambda module, args: calls.append(module))
    tokens, labels = torch.randint(0, 300, (2, 2, 24)).unbind(0)

    def loss_and_gradients():
        model.zero_grad()
        loss = nvium_loss(model(tokens, labels), torch.ones(tokens.shape), 0.15, False).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    with torch.no_grad():
        plain_inference = model(tokens, labels)
    plain_loss, plain_grads = loss_and_gradients()
    assert not calls
    monkeypatch.setattr(model_module, "plain_torch_suffices", lambda layer: False)
    with torch.no_grad():
        wrapped_inference = model(tokens, labels)
    wrapped_loss, wrapped_grads = loss_and_gradients()
    assert {id(m) for m in calls} == {id(m) for m in wrapped}
    for field, value in plain_inference._asdict().items():
        assert torch.equal(value, getattr(wrapped_inference, field)), field
    assert torch.equal(plain_loss, wrapped_loss)
    for name, grad in plain_grads.items():
        assert torch.equal(grad, wrapped_grads[name]), name


def test_full_model_matches_the_papers_layout(single_process):
    """Same weights -> the paper's per-head log-probs, router logits, pi, log p_mix and the three loss terms."""
    model = build(seed=4)
    with torch.no_grad():  # move the zero/unit inits so every path (adapters, norms, biases) is exercised
        for name, param in model.named_parameters():
            if "adapter.w2" in name or name.endswith("norm.weight") or name.endswith("bias"):
                param.add_(0.05 * torch.randn_like(param))
            if name.endswith("router.logits.weight"):  # confident routers: q reaches the clamp, pi the floor
                param.mul_(40.0)
    g = torch.Generator().manual_seed(9)
    tokens, labels = torch.randint(0, 300, (2, 24), generator=g), torch.randint(0, 300, (2, 24), generator=g)
    sd = {name: param.detach() for name, param in model.named_parameters()}
    with torch.no_grad():
        terms = model(tokens, labels)
        routers = torch.stack([model.head_router(k, h)[1] for k, h in model.head_inputs(tokens) if k < 3], -2)
        reference = reference_nvium(sd, model.config, tokens, labels)
    mask = torch.ones_like(labels)
    main = nvium_loss(terms, mask, beta=0.15, in_router_warmup=False)
    warm = nvium_loss(terms, mask, beta=0.15, in_router_warmup=True)
    close = functools.partial(torch.testing.assert_close, atol=2e-6, rtol=2e-6)
    close(terms.log_p_heads, reference["log_p_heads"])
    close(routers, reference["router_logits"], atol=1e-5, rtol=1e-5)  # logits up to ~50: fp32 rounding
    close(terms.pi, reference["pi"])
    close(terms.log_p_mix, reference["log_p_mix"])
    close(main.lm_loss, reference["mix_loss"])
    close(main.depth_loss, reference["depth_loss"])
    close(warm.warmup_loss, reference["warmup_loss"])
    close(main.loss, reference["mix_loss"] + 0.15 * reference["depth_loss"])
    # not a degenerate case: some q beyond the warmup clamp, some pi under the floor, heads that disagree
    q = torch.softmax(reference["router_logits"], -1)[..., 1]
    assert q.min() < 1e-6 and (reference["pi"] < 1e-8).any() and reference["log_p_heads"].std() > 0.1


def test_padded_vocab_is_masked(single_process):
    model = build()
    assert model.padded_vocab_size == 320
    logits, router = model.head_logits(0, torch.randn(1, 3, 64))
    assert torch.isinf(logits[..., 300:]).all() and torch.isfinite(logits[..., :300]).all()
    assert router.shape == (1, 3, 2)


def test_causality_every_head_and_router(single_process):
    model = build(seed=3)
    with torch.no_grad():  # give adapters weight so they are exercised too
        for head in model.heads:
            if head.adapter is not None:
                head.adapter.w2.weight.normal_(std=0.02)
    tokens = torch.randint(0, 300, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = torch.randint(0, 300, (2, 8))
    outputs = []
    with torch.no_grad():
        for toks in (tokens, changed):
            hidden, positions = model.embed(toks), model.default_positions(toks)
            per_head = []
            for k in range(model.config.num_heads_total):
                hidden = model.run_segment(k, hidden, model.rotary(positions))
                per_head.append(model.head_logits(k, hidden))
            outputs.append(per_head)
    for (logits_a, router_a), (logits_b, router_b) in zip(*outputs):
        assert torch.equal(logits_a[:, :12], logits_b[:, :12])
        assert not torch.allclose(logits_a[:, 12:], logits_b[:, 12:])
        if router_a is not None:
            assert torch.equal(router_a[:, :12], router_b[:, :12])


def _tp_worker(rank, world_size, full_state, tokens, labels):
    from nvium_dist.model import NviumModel
    from nvium_dist.parallel import init_distributed
    from nvium_dist.tp_layout import gather_full_state_dict, load_full_state_dict, partition_dims
    from megatron.core import parallel_state

    init_distributed(ParallelConfig(tensor_parallel=world_size))
    model = NviumModel(ModelConfig(**TINY), tensor_parallel=world_size, initialise=False)
    load_full_state_dict(model, full_state, parallel_state.get_tensor_model_parallel_rank(), world_size)
    terms = model(tokens, labels)
    loss = nvium_loss(terms, torch.ones_like(labels), beta=0.15, in_router_warmup=False).loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name, param in model.named_parameters():  # gather gradients like weights
        param.data = param.grad
    full_grads = gather_full_state_dict(model, parallel_state.get_tensor_model_parallel_group())
    logits, _ = model.head_logits(1, torch.ones(1, 2, 64))
    return dict(log_p_heads=terms.log_p_heads.detach(), log_p_mix=terms.log_p_mix.detach(), q=terms.q.detach(),
                loss=loss.item(), grads=full_grads, local_vocab=logits.shape[-1],
                split={k: v for k, v in partition_dims(model).items() if v is not None}, n_grads=len(grads))


def test_tensor_parallel_2_equals_1():
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(5))
    labels = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(6))
    reference = run_distributed(_tp_worker, 1, _full_state(), tokens, labels)[0]
    results = run_distributed(_tp_worker, 2, _full_state(), tokens, labels)
    assert results[0]["local_vocab"] == 192 and reference["local_vocab"] == 320
    assert "layers.0.attn.out.weight" in results[0]["split"] and "heads.0.router.fc1.weight" not in results[0]["split"]
    for result in results:
        assert abs(result["loss"] - reference["loss"]) < 1e-5
        torch.testing.assert_close(result["log_p_heads"], reference["log_p_heads"], atol=1e-5, rtol=0)
        torch.testing.assert_close(result["q"], reference["q"], atol=1e-5, rtol=0)
        for name, grad in reference["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, atol=1e-5, rtol=0, msg=name)
    worst = max((results[0]["grads"][n] - g).abs().max().item() for n, g in reference["grads"].items())
    print(f"TP=2 vs TP=1: loss diff {abs(results[0]['loss'] - reference['loss']):.2e}, max grad diff {worst:.2e}")


def _memory_switch_worker(rank, world_size, full_state, tokens, labels):
    """Losses, mixture terms and every gradient with each memory switch, against the plain model."""
    from megatron.core import parallel_state

    from nvium_dist.model import NviumModel
    from nvium_dist.parallel import init_distributed
    from nvium_dist.tp_layout import load_full_state_dict

    init_distributed(ParallelConfig(tensor_parallel=world_size))
    outputs = {}
    for name, switches in {"plain": {}, "chunked": {"loss_chunk_tokens": 7},
                           "checkpointed": {"activation_checkpointing": True},
                           "both": {"activation_checkpointing": True, "loss_chunk_tokens": 20}}.items():
        model = NviumModel(ModelConfig(**TINY), tensor_parallel=world_size, initialise=False, **switches)
        load_full_state_dict(model, full_state, parallel_state.get_tensor_model_parallel_rank(), world_size)
        vocab_sized = []  # tensors kept for backward outside any checkpoint, with a vocab-sized last dim
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: vocab_sized.append(t.shape) or t if t.shape and t.shape[-1] == model.output.weight.shape[0]
                else t, lambda t: t):
            terms = model(tokens, labels)
        loss = nvium_loss(terms, torch.ones_like(labels), beta=0.15, in_router_warmup=False).loss
        loss.backward()
        outputs[name] = (terms.log_p_heads.detach(), terms.log_p_mix.detach(), loss.item(),
                         {n: p.grad for n, p in model.named_parameters()}, len(vocab_sized))
    plain = outputs.pop("plain")
    return {"plain_vocab_sized": plain[4],
            **{name: {"values": max((out[0] - plain[0]).abs().max().item(), (out[1] - plain[1]).abs().max().item(),
                                    abs(out[2] - plain[2])),
                      "grads": max((g - plain[3][n]).abs().max().item() for n, g in out[3].items()),
                      "vocab_sized": out[4]} for name, out in outputs.items()}}


@pytest.mark.parametrize("world_size", [1, 2], ids=["tp1", "tp2"])
def test_memory_switches_change_no_number(world_size):
    """Activation checkpointing and the chunked vocab loss (chunks that split rows and a ragged last chunk):
    same log-probabilities, loss and gradients within 1e-6 in fp32, vocab-parallel TP=2 too; with the
    chunked loss no vocab-sized tensor waits for backward."""
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(5))
    labels = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(6))
    for result in run_distributed(_memory_switch_worker, world_size, _full_state(), tokens, labels):
        assert result["plain_vocab_sized"] >= 4  # every head's softmax (+ the padding mask), without chunking
        for name in ("chunked", "checkpointed", "both"):
            assert result[name]["values"] < 1e-6 and result[name]["grads"] < 1e-6, (name, result[name])
        assert result["chunked"]["vocab_sized"] == result["both"]["vocab_sized"] == 0


def _full_state():
    from nvium_dist.parallel import init_distributed
    from nvium_dist.tp_layout import gather_full_state_dict

    init_distributed(ParallelConfig())
    model = build(seed=11)
    with torch.no_grad():
        for head in model.heads:
            if head.adapter is not None:
                head.adapter.w2.weight.normal_(std=0.02)
    return gather_full_state_dict(model)


@pytest.mark.slow
def test_tiny_model_learns_repeating_corpus(single_process):
    torch.manual_seed(0)
    model = build(seed=0, vocab_size=256, make_vocab_size_divisible_by=128, hidden_size=64, num_layers=4,
                  exits=[1, 2, 3], ffn_hidden_size=128)
    pattern = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(1))
    stream = pattern.repeat(50)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(300):
        starts = torch.randint(0, len(stream) - 33, (8,))
        batch = torch.stack([stream[s:s + 33] for s in starts])
        terms = model(batch[:, :-1], batch[:, 1:])
        loss = nvium_loss(terms, torch.ones(8, 32), beta=0.15, in_router_warmup=step < 15).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head_ce = -terms.log_p_heads.mean((0, 1))
    mix_ce = -terms.log_p_mix.mean()
    print(f"after 300 steps: mixture CE {mix_ce:.3f}, head CE {head_ce.tolist()}, log V {math.log(256):.3f}")
    assert mix_ce < 0.1 * math.log(256)
    assert (head_ce[:-1] < 0.5 * math.log(256)).all()  # the early heads learn too


@pytest.mark.parametrize("override, message", [
    ("model.num_heads=5", "not divisible by model.num_heads"),
    ("model.exits=[2,2]", "strictly increasing"),
    ("model.exits=[0,3]", "outside 1..5"),
    ("model.exits=[1,6]", "outside 1..5"),
    ("parallel.tensor_parallel=3", "num_heads=4 is not divisible by parallel.tensor_parallel=3"),
    ("parallel.zero_stage=2", "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1"),
    ("model.hidden_sz=3", "unknown config key"),
    ("model.num_layers=abc", "model.num_layers must be int"),
    ("parallel.dtype=bf16", "bf16 training needs parallel.zero_stage >= 1"),
    ("training.loss_chunk_tokens=-1", "training.loss_chunk_tokens must be >= 0"),
])
def test_bad_configs_fail_clearly(override, message):
    overrides = ["model.hidden_size=64", "model.num_heads=4", "model.num_layers=6", override]
    if "zero_stage" in override:
        overrides.append("parallel.pipeline_parallel=2")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, overrides)


def test_world_size_and_vocab_padding_messages():
    config = load_config(None, ["parallel.tensor_parallel=2", "model.vocab_size=1000"])
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        config.validate(world_size=3)
    assert config.model.padded_vocab_size(2) == 1024
    assert "padded to 1024" in config.vocab_padding_note()
    with pytest.raises(ConfigError, match="needs at least one transformer block"):
        load_config(None, ["parallel.pipeline_parallel=8", "model.num_layers=6"])
    compiled_zero3 = load_config(None, ["training.compile=true", "parallel.zero_stage=3"])
    compiled_zero3.validate(world_size=1)  # one process: the lean path runs ZeRO-0
    with pytest.raises(ConfigError, match="training.compile with parallel.zero_stage=3 and data parallelism"):
        compiled_zero3.validate(world_size=2)
