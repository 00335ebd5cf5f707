"""The N-vium transformer on megatron-core tensor-parallel layers.

A LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, untied embedding/output, no biases) whose layers are
split into segments at the exits. After each segment a head reads the residual stream: its own
RMSNorm, a zero-initialised residual adapter, the shared vocab-parallel output matrix and (for early
exits) a router giving [continue, exit] logits. Segments and heads are callable on their own so the
decoder and pipeline stages can run them one at a time; the mixture math lives in `mixture.py`.

Activations are [batch, seq, hidden]; attention runs through `scaled_dot_product_attention`. At one TP rank
the megatron layers' plain torch op runs on their weights (same numbers, no wrapper overhead).

Memory switches for training (both off by default, neither changes a number): per-block activation
checkpointing (`activation_checkpointing`: a block keeps only its input and is recomputed in backward)
and the chunked vocab loss (`loss_chunk_tokens`: log p_k(label) is computed that many tokens at a time and
each chunk's vocab logits are recomputed in backward, so at most one chunk of one head's softmax is alive).
"""
from __future__ import annotations

import functools
import hashlib
import math
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nvium_dist.config import ModelConfig
from nvium_dist.mixture import MixtureTerms, mixture_terms
from nvium_dist.parallel import tensor_parallel_group


class KVCacheLayer(Protocol):
    """One layer's cache: stores the new keys/values and attends the queries over everything it holds (the
    cache knows which tokens share a sequence and at which positions they sit, so it owns the mask)."""

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """queries/keys/values [b, heads, s, hd] -> attention output [b, heads, s, hd]."""


def _parallel_config(tensor_parallel: int, params_dtype: torch.dtype, initialise: bool):
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tensor_parallel,
        use_cpu_initialization=True,
        perform_initialization=initialise,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
    )


class ParameterInit:
    """Initialisation as a pure function of (seed, parameter name): every TP/PP layout, and every stage
    building only its own layers, starts from the same full weights."""

    def __init__(self, seed: int):
        self.seed = seed

    def generator(self, name: str) -> torch.Generator:
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def normal(self, name: str, std: float):
        """An init_method for megatron's layers; they call it on the full (master) weight."""
        return lambda weight: nn.init.normal_(weight, mean=0.0, std=std, generator=self.generator(name))


@functools.cache
def apex_rms_norm():
    """NVIDIA apex's fused RMSNorm function when apex and its compiled CUDA extension are installed, else
    None (the PyPI package named `apex` is unrelated and has no `apex.normalization`)."""
    try:
        import fused_layer_norm_cuda  # noqa: F401 - apex's extension; without it apex's function cannot run
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    except ImportError:
        return None
    return fused_rms_norm_affine


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32. On CUDA apex's fused kernel when installed, else torch's
    `F.rms_norm` (a fused kernel on CUDA; on CPU the same fp32 arithmetic as the textbook formula)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and apex_rms_norm() is not None:
            return apex_rms_norm()(x, self.weight, self.weight.shape, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def plain_torch_suffices(layer) -> bool:
    """True when a megatron tensor-parallel layer may be replaced by the plain torch op on its weight: one TP
    rank, where its region copies and reductions are identities and its autograd Function computes the same
    products as torch's own backward (bitwise: tests/test_model.py). Its wrapper (those identities, the
    Function, config checks) costs about 14 us a call on CPU, as much as a matrix product for a decode step's
    few tokens, and torch.compile cannot fuse across it."""
    return layer.tp_group is None or layer.tp_group.size() == 1


def parallel_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """The output of a megatron Column/RowParallelLinear without bias (this rank's slice): the layer computes
    torch.matmul(x, W^T), as F.linear does."""
    return F.linear(x, layer.weight) if plain_torch_suffices(layer) else layer(x)[0]


class Rotary(NamedTuple):
    """RoPE's cos and sin [b, 1, s, hd] at one call's positions (rotate-half convention), computed once and
    shared by the call's layers."""
    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def at(cls, positions: torch.Tensor, inv_freq: torch.Tensor) -> "Rotary":
        """positions [b, s]; inv_freq [hd/2]."""
        angles = positions.unsqueeze(-1).float() * inv_freq  # [b, s, hd/2]
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
        return cls(angles.cos(), angles.sin())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotates [..., b, heads, s, hd]."""
        x32 = x.float()
        half = x32.shape[-1] // 2
        rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
        return (x32 * self.cos + rotated * self.sin).to(x.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i / head_dim) for i < head_dim / 2."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_config, tp_group, init: ParameterInit, name: str,
                 output_init_std: float):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        tp = layer_config.tensor_model_parallel_size
        self.local_heads = config.num_heads // tp
        self.head_dim = config.head_dim
        # Output features are laid out head-major [head, (q, k, v), head_dim], so a contiguous TP split
        # hands each rank whole heads.
        self.qkv = ColumnParallelLinear(
            config.hidden_size, 3 * config.hidden_size, config=layer_config, init_method=init.normal(f"{name}.qkv.weight", config.init_std),
            bias=False, gather_output=False, tp_group=tp_group)
        self.out = RowParallelLinear(
            config.hidden_size, config.hidden_size, config=layer_config,
            init_method=init.normal(f"{name}.out.weight", output_init_std),
            bias=False, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)

    def project(self, x: torch.Tensor, rotary: Rotary):
        """x [b, s, d] -> rotated q, k and v, each [b, local_heads, s, head_dim]."""
        b, s, _ = x.shape
        qkv = parallel_linear(self.qkv, x)
        qkv = qkv.view(b, s, self.local_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k = rotary.apply(qkv[:2])
        return q, k, qkv[2]

    def forward(self, x: torch.Tensor, rotary: Rotary, cache: KVCacheLayer | None = None):
        q, k, v = self.project(x, rotary)
        if cache is None:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            attended = cache.attend(q, k, v)
        b, _, s, _ = attended.shape
        return parallel_linear(self.out, attended.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim))


class SwiGLU(nn.Module):
    """down(SiLU(gate(x)) * up(x)); gate and up are separate column-parallel matrices so TP splits stay aligned."""

    def __init__(self, hidden: int, ffn: int, layer_config, tp_group, init: ParameterInit, name: str,
                 init_std: float, output_init_std: float):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        def column(part):
            return ColumnParallelLinear(hidden, ffn, config=layer_config,
                                        init_method=init.normal(f"{name}.{part}.weight", init_std),
                                        bias=False, gather_output=False, tp_group=tp_group)

        self.gate, self.up = column("gate"), column("up")
        self.down = RowParallelLinear(ffn, hidden, config=layer_config,
                                      init_method=init.normal(f"{name}.down.weight", output_init_std),
                                      bias=False, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return parallel_linear(self.down, F.silu(parallel_linear(self.gate, x)) * parallel_linear(self.up, x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_config, tp_group, dtype: torch.dtype, init: ParameterInit,
                 name: str):
        super().__init__()
        output_std = config.init_std / math.sqrt(2 * config.num_layers) if config.scaled_output_init else config.init_std
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps, dtype)
        self.attn = Attention(config, layer_config, tp_group, init, f"{name}.attn", output_std)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps, dtype)
        self.mlp = SwiGLU(config.hidden_size, config.ffn_hidden_size, layer_config, tp_group, init, f"{name}.mlp",
                          config.init_std, output_std)

    def forward(self, x: torch.Tensor, rotary: Rotary, cache: KVCacheLayer | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rotary, cache)
        return x + self.mlp(self.mlp_norm(x))


class ResidualAdapter(nn.Module):
    """a(n) = n + W2 SiLU(W1 n), W2 zero-initialised so a fresh adapter is the identity."""

    def __init__(self, hidden: int, layer_config, tp_group, init: ParameterInit, name: str, init_std: float):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        self.w1 = ColumnParallelLinear(hidden, hidden, config=layer_config,
                                       init_method=init.normal(f"{name}.w1.weight", init_std),
                                       bias=False, gather_output=False, tp_group=tp_group)
        self.w2 = RowParallelLinear(hidden, hidden, config=layer_config, init_method=nn.init.zeros_,
                                    bias=False, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)

    def forward(self, n: torch.Tensor) -> torch.Tensor:
        return n + parallel_linear(self.w2, F.silu(parallel_linear(self.w1, n)))


class Router(nn.Module):
    """Per-token MLP on the exit's normalised state: d -> ~0.66d -> GELU -> d -> RMSNorm -> [continue, exit].

    Small and replicated on every TP rank (identical inputs and seeds keep the replicas identical).
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype, init: ParameterInit, name: str):
        super().__init__()
        d, h = config.hidden_size, config.router_hidden_size
        self.fc1 = nn.Linear(d, h, dtype=dtype)
        self.fc2 = nn.Linear(h, d, dtype=dtype)
        self.norm = RMSNorm(d, config.norm_eps, dtype)
        self.logits = nn.Linear(d, 2, dtype=dtype)
        stds = {"fc1": config.init_std, "fc2": config.init_std, "logits": 0.4 / math.sqrt(d)}
        with torch.no_grad():
            for part, std in stds.items():
                layer = getattr(self, part)
                if layer.weight.device.type != "meta":
                    init.normal(f"{name}.{part}.weight", std)(layer.weight)
                    layer.bias.zero_()

    def forward(self, n: torch.Tensor) -> torch.Tensor:
        return self.logits(self.norm(self.fc2(F.gelu(self.fc1(n)))))


class ExitHead(nn.Module):
    """Norm (+ residual adapter) in front of the shared output matrix; early exits also carry a router.

    A dense model's final head has no adapter: it is a plain LLaMA's final norm."""

    def __init__(self, config: ModelConfig, layer_config, tp_group, dtype: torch.dtype, init: ParameterInit,
                 name: str, with_router: bool, with_adapter: bool):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, dtype)
        self.adapter = ResidualAdapter(config.hidden_size, layer_config, tp_group, init, f"{name}.adapter",
                                       config.adapter_std) if with_adapter else None
        self.router = Router(config, dtype, init, f"{name}.router") if with_router else None

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (normed state, router logits [..., 2] or None); the router reads the normed state."""
        normed = self.norm(hidden)
        return normed, (self.router(normed) if self.router is not None else None)

    def adapt(self, normed: torch.Tensor) -> torch.Tensor:
        """The state the output matrix reads."""
        return self.adapter(normed) if self.adapter is not None else normed

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (adapted state for the output matrix, router logits or None)."""
        normed, router_logits = self.route(hidden)
        return self.adapt(normed), router_logits


def vocab_logits(output, padding_mask: torch.Tensor | None, adapted: torch.Tensor) -> torch.Tensor:
    """This rank's vocab slice of the shared output matrix's logits, padded columns at -inf
    (`padding_mask` None: this rank holds no padding)."""
    logits = parallel_linear(output, adapted)
    if padding_mask is not None:
        logits = logits.masked_fill(padding_mask, float("-inf"))
    return logits


def label_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) from vocab-parallel logits, without gathering the vocab."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # vocab_parallel_cross_entropy overwrites its input; these logits are not needed afterwards.
    return -vocab_parallel_cross_entropy(logits.float(), labels)


def output_label_log_probs(output, padding_mask: torch.Tensor | None, adapted: torch.Tensor, labels: torch.Tensor,
                           chunk_tokens: int = 0) -> torch.Tensor:
    """log p(label) [...] of the output matrix applied to `adapted` [..., d].

    `chunk_tokens` > 0: the tokens go through in chunks of that many, and while gradients are recorded
    each chunk is checkpointed: its vocab logits and softmax are freed right after its forward and
    recomputed in backward, so at most one chunk of one head's softmax is alive at any time (same
    numbers; the cost is one more output-matrix matmul per head in backward). 0: all tokens at once,
    the logits kept for backward.
    """
    def chunk(states, chunk_labels):
        return label_log_probs(vocab_logits(output, padding_mask, states), chunk_labels)

    if chunk_tokens <= 0:
        return chunk(adapted, labels)
    recompute = torch.is_grad_enabled()
    pieces = [checkpoint(chunk, states, chunk_labels, use_reentrant=False) if recompute else chunk(states, chunk_labels)
              for states, chunk_labels in zip(adapted.reshape(-1, adapted.shape[-1]).split(chunk_tokens),
                                              labels.reshape(-1).split(chunk_tokens))]
    return torch.cat(pieces).reshape(labels.shape)


class ModelParts:
    """Builds the model's modules one by one, named as in NviumModel, so pipeline stages can build
    only the layers and heads they own."""

    def __init__(self, config: ModelConfig, tensor_parallel: int, dtype: torch.dtype, initialise: bool, seed: int):
        config.validate()
        self.config, self.dtype, self.tensor_parallel = config, dtype, tensor_parallel
        self.padded_vocab_size = config.padded_vocab_size(tensor_parallel)
        self.tp_group = tensor_parallel_group(tensor_parallel)
        self.layer_config = _parallel_config(tensor_parallel, dtype, initialise)
        self.init = ParameterInit(seed)

    def _vocab_init(self, name: str):
        """Normal init of the real vocab rows of the full [padded vocab, d] matrix; padding rows zero."""
        normal = self.init.normal(name, self.config.init_std)

        def init_method(weight):
            with torch.no_grad():
                weight.zero_()
                normal(weight[: self.config.vocab_size])
        return init_method

    def embedding(self):
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        return VocabParallelEmbedding(self.padded_vocab_size, self.config.hidden_size,
                                      init_method=self._vocab_init("embedding.weight"),
                                      config=self.layer_config, tp_group=self.tp_group)

    def block(self, index: int) -> Block:
        return Block(self.config, self.layer_config, self.tp_group, self.dtype, self.init, f"layers.{index}")

    def head(self, index: int) -> ExitHead:
        is_final = index == self.config.num_heads_total - 1
        return ExitHead(self.config, self.layer_config, self.tp_group, self.dtype, self.init, f"heads.{index}",
                        with_router=not is_final, with_adapter=not is_final or self.config.has_final_adapter)

    def output(self):
        from megatron.core.tensor_parallel import ColumnParallelLinear

        return ColumnParallelLinear(self.config.hidden_size, self.padded_vocab_size, config=self.layer_config,
                                    init_method=self._vocab_init("output.weight"), bias=False,
                                    gather_output=False, tp_group=self.tp_group)

    def padding_mask(self) -> torch.Tensor | None:
        """True at this rank's logit columns that are vocab padding; None when it holds none."""
        local_vocab = self.padded_vocab_size // self.tensor_parallel
        tp_rank = self.tp_group.rank() if self.tp_group is not None else 0
        first = tp_rank * local_vocab
        if first + local_vocab <= self.config.vocab_size:
            return None
        return torch.arange(local_vocab) + first >= self.config.vocab_size


class NviumModel(nn.Module):
    def __init__(self, config: ModelConfig, tensor_parallel: int = 1, dtype: torch.dtype = torch.float32,
                 initialise: bool = True, seed: int = 0, activation_checkpointing: bool = False,
                 loss_chunk_tokens: int = 0):
        """Builds the TP shard of this rank (parallel_state must be initialised when tensor_parallel > 1).

        Weights depend only on (seed, parameter name), never on the layout. `initialise=False` skips
        initialisation, for building on the meta device or right before loading weights.
        `activation_checkpointing` and `loss_chunk_tokens` trade compute for activation memory in
        training (see the module docstring); they change no number.
        """
        super().__init__()
        parts = ModelParts(config, tensor_parallel, dtype, initialise, seed)
        self.config = config
        self.activation_checkpointing = activation_checkpointing
        self.loss_chunk_tokens = loss_chunk_tokens
        self.padded_vocab_size = parts.padded_vocab_size
        self.embedding = parts.embedding()
        self.layers = nn.ModuleList(parts.block(i) for i in range(config.num_layers))
        self.register_buffer("inv_freq", rope_inverse_frequencies(config.head_dim, config.rope_theta),
                             persistent=False)
        self.heads = nn.ModuleList(parts.head(k) for k in range(config.num_heads_total))
        # One output matrix for every head (vocab-parallel logits, never gathered).
        self.output = parts.output()
        self.register_buffer("padding_mask", parts.padding_mask(), persistent=False)

    # -- the pieces every forward is assembled from (training, pipeline stages, generator, decoder) -------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if plain_torch_suffices(self.embedding):
            return F.embedding(tokens, self.embedding.weight)
        return self.embedding(tokens)

    def rotary(self, positions: torch.Tensor) -> Rotary:
        """RoPE tables at `positions` [b, s], built once per forward and shared by every segment that runs there."""
        return Rotary.at(positions, self.inv_freq)

    def run_segment(self, segment: int, hidden: torch.Tensor, rotary: Rotary,
                    caches: list[KVCacheLayer] | None = None) -> torch.Tensor:
        """Runs the layers between head `segment - 1` and head `segment` at the positions of `rotary`
        (self.rotary); `caches` is indexed by layer.

        With activation checkpointing (training: no caches, gradients on) each block keeps only its input
        and runs again in backward."""
        start, end = self.config.segment_ranges[segment]
        recompute = self.activation_checkpointing and caches is None and torch.is_grad_enabled()
        for layer in range(start, end):
            if recompute:
                hidden = checkpoint(self.layers[layer], hidden, rotary, use_reentrant=False)
            else:
                hidden = self.layers[layer](hidden, rotary, caches[layer] if caches is not None else None)
        return hidden

    def head_router(self, head: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (normed state, router logits [..., 2] or None). The decoder routes every token reaching an exit
        but computes vocab logits only for those that exit there."""
        return self.heads[head].route(hidden)

    def head_vocab_logits(self, head: int, normed: torch.Tensor) -> torch.Tensor:
        """Normed state -> this rank's vocab slice of the head's logits, padding at -inf."""
        return vocab_logits(self.output, self.padding_mask, self.heads[head].adapt(normed))

    def head_logits(self, head: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (this rank's vocab slice of the logits, padding at -inf; router logits [..., 2] or None)."""
        normed, router_logits = self.head_router(head, hidden)
        return self.head_vocab_logits(head, normed), router_logits

    def head_label_log_probs(self, head: int, hidden: torch.Tensor, labels: torch.Tensor):
        """-> (log p_head(label) [b, s] through vocab-parallel cross entropy, router logits or None);
        `loss_chunk_tokens` at a time when set."""
        adapted, router_logits = self.heads[head](hidden)  # through forward: what training.compile compiles
        return output_label_log_probs(self.output, self.padding_mask, adapted, labels,
                                      self.loss_chunk_tokens), router_logits

    @staticmethod
    def default_positions(tokens: torch.Tensor) -> torch.Tensor:
        return torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)

    def head_inputs(self, tokens: torch.Tensor):
        """Full-depth pass: yields (head index, the hidden state that head reads) in order."""
        rotary = self.rotary(self.default_positions(tokens))
        hidden = self.embed(tokens)
        for head in range(self.config.num_heads_total):
            hidden = self.run_segment(head, hidden, rotary)
            yield head, hidden

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, force_continue: bool = False) -> MixtureTerms:
        """Full-depth training forward: every head on every token, combined into the mixture."""
        head_log_probs, router_logits = [], []
        for head, hidden in self.head_inputs(tokens):
            log_p, router = self.head_label_log_probs(head, hidden, labels)
            head_log_probs.append(log_p)
            if router is not None:
                router_logits.append(router)
        return mixture_terms(
            torch.stack(head_log_probs, dim=-1),
            torch.stack(router_logits, dim=-2) if router_logits else None,
            self.config.exit_layers, self.config.num_layers, force_continue=force_continue)
