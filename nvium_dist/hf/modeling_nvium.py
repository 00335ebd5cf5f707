"""N-vium mixture-of-exits language model for Hugging Face transformers (trust_remote_code=True).

This file is copied verbatim into every N-vium directory that `tools/convert_to_hf.py` writes; it imports
only torch and transformers. A LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, untied embedding/output, no
biases) whose heads read the residual stream after the layers listed in `config.exits` and after the last
layer. Each head: its own RMSNorm, a residual adapter n + W2 SiLU(W1 n), the shared output matrix;
early heads add a router MLP on the normed state giving [continue, exit] logits.

`forward` returns log p_mix, the exact mixture distribution, as `logits`: every head runs on every token
(full depth), so `generate(do_sample=True)` draws from p_mix exactly (with the generation_config shipped
next to this file: top_k=0, top_p=1, temperature=1) and anything that scores logits scores the mixture.
The per-head log-softmaxes, the router exit probabilities and the mixture weights come with the output.
Deferred (early-exit) decoding that runs fewer layers lives in nvium's own runtime (nvium_dist.inference).

The layers restate nvium_dist/model.py in plain torch (this file must stand alone wherever it is copied);
tests/test_hf_export.py compares the logits, per-head outputs and mixture with nvium's to 1e-5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# pi_k is floored at PI_MIN inside the log of p_mix, as in nvium_dist/mixture.py (tests compare the two).
PI_MIN = 1e-8


def log_mixture(head_log_probs: torch.Tensor, router_logits: torch.Tensor | None):
    """Head log-softmaxes [..., K, V] and router logits [..., K-1, 2] ([continue, exit]) ->
    (log p_mix [..., V], exit probabilities q [..., K-1], log mixture weights log pi [..., K]).

    q_k = softmax(router_k)[exit]; pi_k = q_k prod_{j<k} (1 - q_j) for early heads, pi_K = prod_{j<K} (1 - q_j);
    log p_mix = logsumexp_k(log max(pi_k, PI_MIN) + log p_k). fp32, log space.
    """
    head_log_probs = head_log_probs.float()
    if router_logits is None:
        zeros = head_log_probs.new_zeros(head_log_probs.shape[:-1])
        return head_log_probs[..., -1, :], zeros[..., :0], zeros
    log_router = torch.log_softmax(router_logits.float(), dim=-1)
    log_q, log_continue = log_router[..., 1], log_router[..., 0]
    log_reach = torch.cumsum(log_continue, dim=-1)
    reached_before = torch.cat([torch.zeros_like(log_reach[..., :1]), log_reach[..., :-1]], dim=-1)
    log_pi = torch.cat([reached_before + log_q, log_reach[..., -1:]], dim=-1)
    floored = log_pi.clamp_min(math.log(PI_MIN))
    log_p_mix = torch.logsumexp(floored.unsqueeze(-1) + head_log_probs, dim=-2)
    return log_p_mix, log_q.exp(), log_pi


class NviumConfig(PretrainedConfig):
    model_type = "nvium"

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 768, num_hidden_layers: int = 24,
                 num_attention_heads: int = 12, intermediate_size: int = 2048, exits=(6, 12, 18),
                 router_hidden_size: int = 512, max_position_embeddings: int = 1024,
                 rope_theta: float = 10000.0, rms_norm_eps: float = 1e-6, initializer_range: float = 0.02,
                 use_cache: bool = True, tie_word_embeddings: bool = False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.exits = list(exits)
        self.router_hidden_size = router_hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


@dataclass
class NviumCausalLMOutput(CausalLMOutputWithPast):
    """`logits` are log p_mix [b, s, V]; the rest describe the heads behind it."""
    head_log_probs: torch.Tensor | None = None  # [b, s, K, V] log-softmax of each head
    exit_probs: torch.Tensor | None = None  # [b, s, K-1] router exit probabilities q_k
    mixture_weights: torch.Tensor | None = None  # [b, s, K] pi_k


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half convention) of [b, heads, s, hd] at `positions` [b, s]."""
    angles = positions.unsqueeze(-1).float() * inv_freq
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).unsqueeze(1)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).unsqueeze(1)
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: NviumConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.layer_idx, self.num_heads, self.head_dim = layer_idx, config.num_attention_heads, config.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.register_buffer("inv_freq", rope_frequencies(self.head_dim, config.rope_theta), persistent=False)

    def forward(self, x, positions, mask, cache):
        b, s, _ = x.shape

        def heads(projection):
            return projection(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

        q = rotate(heads(self.q_proj), positions, self.inv_freq)
        k = rotate(heads(self.k_proj), positions, self.inv_freq)
        v = heads(self.v_proj)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, config: NviumConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: NviumConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, positions, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), positions, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Adapter(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.w1, self.w2 = nn.Linear(hidden, hidden, bias=False), nn.Linear(hidden, hidden, bias=False)

    def forward(self, n):
        return n + self.w2(F.silu(self.w1(n)))


class Router(nn.Module):
    def __init__(self, config: NviumConfig):
        super().__init__()
        d, h = config.hidden_size, config.router_hidden_size
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.logits = nn.Linear(d, 2)

    def forward(self, n):
        return self.logits(self.norm(self.fc2(F.gelu(self.fc1(n)))))


class Head(nn.Module):
    def __init__(self, config: NviumConfig, early: bool):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.adapter = Adapter(config.hidden_size)
        self.router = Router(config) if early else None

    def forward(self, hidden):
        """-> (state for the output matrix, router logits or None); the router reads the normed state."""
        normed = self.norm(hidden)
        return self.adapter(normed), (self.router(normed) if self.router is not None else None)


class NviumBackbone(nn.Module):
    def __init__(self, config: NviumConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))


class NviumPreTrainedModel(PreTrainedModel):
    config_class = NviumConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        if isinstance(module, Adapter):  # a fresh adapter is the identity
            nn.init.zeros_(module.w2.weight)
        if isinstance(module, Attention):  # a computed buffer: from_pretrained materialises it empty
            with torch.no_grad():
                module.inv_freq.copy_(rope_frequencies(module.head_dim, self.config.rope_theta))


class NviumForCausalLM(NviumPreTrainedModel, GenerationMixin):
    def __init__(self, config: NviumConfig):
        super().__init__(config)
        self.model = NviumBackbone(config)
        self.heads = nn.ModuleList(Head(config, early=k < len(config.exits)) for k in range(len(config.exits) + 1))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @staticmethod
    def _positions_and_mask(attention_mask, batch: int, length: int, past: int, device):
        """Positions [b, s] and a boolean attention mask [b, 1, s, past + s] (or None: plain causal).

        With a 2-D padding mask (1 = token, 0 = padding; left padding in batched generate), a row's positions
        count its real tokens only, so a padded prompt sees the same positions as an unpadded one.
        """
        total = past + length
        if attention_mask is None:
            positions = torch.arange(past, total, device=device).expand(batch, -1)
            if length == 1:
                return positions, None
            causal = torch.ones(length, total, dtype=torch.bool, device=device).tril(past)
            return positions, causal[None, None]
        keep = attention_mask[:, -total:].to(device=device, dtype=torch.bool)
        positions = (keep.long().cumsum(-1) - 1).clamp_min(0)[:, -length:]
        causal = torch.ones(length, total, dtype=torch.bool, device=device).tril(past)
        mask = causal[None] & keep[:, None, :]
        # a padding query row that sees nothing would give NaN: let it see itself (its output is never used)
        rows = torch.arange(length, device=device)
        mask[:, rows, past + rows] = True
        return positions, mask[:, None]

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None, labels=None,
                use_cache=None, position_ids=None, return_dict=None, **kwargs):
        hidden = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            from transformers import DynamicCache

            past_key_values = DynamicCache(config=self.config)
        cache = past_key_values if use_cache else None
        past = cache.get_seq_length() if cache is not None else 0
        positions, mask = self._positions_and_mask(attention_mask, batch, length, past, hidden.device)
        if position_ids is not None:
            positions = position_ids
        bounds = [0] + list(self.config.exits) + [self.config.num_hidden_layers]
        head_log_probs, router_logits = [], []
        for k, head in enumerate(self.heads):
            for layer in self.model.layers[bounds[k]:bounds[k + 1]]:
                hidden = layer(hidden, positions, mask, cache)
            adapted, router = head(hidden)
            head_log_probs.append(torch.log_softmax(self.lm_head(adapted).float(), dim=-1))
            if router is not None:
                router_logits.append(router)
        head_log_probs = torch.stack(head_log_probs, dim=-2)
        log_p_mix, exit_probs, log_pi = log_mixture(
            head_log_probs, torch.stack(router_logits, dim=-2) if router_logits else None)
        loss = None
        if labels is not None:
            loss = F.nll_loss(log_p_mix[:, :-1].reshape(-1, log_p_mix.shape[-1]), labels[:, 1:].reshape(-1),
                              ignore_index=-100)
        return NviumCausalLMOutput(loss=loss, logits=log_p_mix, past_key_values=cache,
                                   head_log_probs=head_log_probs, exit_probs=exit_probs,
                                   mixture_weights=log_pi.exp())

