"""Pipeline parallelism: the N-vium model as a DeepSpeed PipelineModule.

Pipeline layers are the embedding, one layer per transformer block, and per head a "prep" layer (norm,
router, adapter) followed by the shared output matrix as a TiedLayerSpec (DeepSpeed keeps its copies on
different stages in sync). Stages balance transformer blocks. Between layers a tuple travels:

    (hidden, labels, log_p_heads [b, s, K], router_logits [b, s, K-1, 2])   (+ adapted state after a prep)

Each head fills its column of log p_k(y) and its router logits, so the last stage holds every head's
terms and the mixture loss is computed once, by `mixture.py`, exactly as with PP=1 — at the cost of
3K-2 floats per token on the wire next to the hidden state. Router logits are absent for a dense model.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nvium_dist.config import ModelConfig
from nvium_dist.mixture import LossComponents, evaluation_sums, mixture_terms, nvium_loss
from nvium_dist.model import ModelParts, Rotary, output_label_log_probs, rope_inverse_frequencies


def _parts(config: ModelConfig, tensor_parallel: int, seed: int) -> ModelParts:
    return ModelParts(config, tensor_parallel, torch.float32, initialise=True, seed=seed)


class PipeEmbedding(nn.Module):
    def __init__(self, config: ModelConfig, tensor_parallel: int, seed: int):
        super().__init__()
        self.num_heads = config.num_heads_total
        self.embedding = _parts(config, tensor_parallel, seed).embedding()

    def full_name(self, local: str) -> str:
        return local

    def forward(self, inputs):
        tokens, labels = inputs
        hidden = self.embedding(tokens)
        b, s = tokens.shape
        # leaves that require grad: the pipe engine back-propagates through every float it sends, and a
        # stage may pass these on before any head has written to them
        log_p_heads = torch.zeros(b, s, self.num_heads, device=hidden.device, requires_grad=True)
        if self.num_heads == 1:
            return hidden, labels, log_p_heads
        routers = torch.zeros(b, s, self.num_heads - 1, 2, device=hidden.device, requires_grad=True)
        return hidden, labels, log_p_heads, routers


class PipeBlock(nn.Module):
    def __init__(self, config: ModelConfig, tensor_parallel: int, seed: int, index: int):
        super().__init__()
        self.index = index
        self.block = _parts(config, tensor_parallel, seed).block(index)
        self.register_buffer("inv_freq", rope_inverse_frequencies(config.head_dim, config.rope_theta),
                             persistent=False)

    def full_name(self, local: str) -> str:
        return local.replace("block.", f"layers.{self.index}.", 1)

    def forward(self, carried):
        hidden, *rest = carried
        positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        return (self.block(hidden, Rotary.at(positions, self.inv_freq)), *rest)


class PipeHeadPrep(nn.Module):
    """Norm, router and adapter of head `index`; appends the adapted state for the output layer."""

    def __init__(self, config: ModelConfig, tensor_parallel: int, seed: int, index: int):
        super().__init__()
        self.index = index
        self.head = _parts(config, tensor_parallel, seed).head(index)

    def full_name(self, local: str) -> str:
        return local.replace("head.", f"heads.{self.index}.", 1)

    def forward(self, carried):
        hidden, labels, log_p_heads, *routers = carried
        adapted, router_logits = self.head(hidden)
        if router_logits is not None:
            filled = routers[0].clone()
            filled[:, :, self.index] = router_logits.float()
            routers = [filled]
        return (hidden, labels, log_p_heads, *routers, adapted)


class PipeOutput(nn.Module):
    """The shared output matrix; one instance per stage that needs it, tied across stages."""

    def __init__(self, config: ModelConfig, tensor_parallel: int, seed: int, loss_chunk_tokens: int):
        super().__init__()
        parts = _parts(config, tensor_parallel, seed)
        self.loss_chunk_tokens = loss_chunk_tokens
        self.output = parts.output()
        self.register_buffer("padding_mask", parts.padding_mask(), persistent=False)

    def full_name(self, local: str) -> str:
        return local


def head_output(index: int, module: PipeOutput, carried):
    """Forward of the tied output layer for head `index`: fills log p_index(label)."""
    hidden, labels, log_p_heads, *rest = carried
    *routers, adapted = rest
    filled = log_p_heads.clone()
    filled[:, :, index] = output_label_log_probs(module.output, module.padding_mask, adapted, labels,
                                                 module.loss_chunk_tokens)
    return (hidden, labels, filled, *routers)


class PipelineLoss:
    """loss_fn of the PipelineModule: the mixture loss from the carried per-head terms.

    Also keeps the components of the last micro-batches (train: summed on `device`, so no micro-batch waits
    for a host read) or running sums (eval) on the last stage.
    """

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu", aux_head_loss: float = 0.0,
                 loss_hook=None):
        self.config = config
        self.device = torch.device(device)
        self.aux_head_loss = aux_head_loss
        self.loss_hook = loss_hook  # the trainer's fault-injection test hook, applied to each training loss
        self.beta = 0.0
        self.in_router_warmup = False
        self.collect_eval = False
        self.reset()

    def reset(self) -> None:
        self.train_sums = torch.zeros(len(LossComponents.NAMES), dtype=torch.float64, device=self.device)
        self.micro_batches = 0
        K = self.config.num_heads_total
        self.eval_sums = torch.zeros(3 + 2 * K, dtype=torch.float64)

    def __call__(self, outputs, loss_mask):
        _, _, log_p_heads, *routers = outputs
        terms = mixture_terms(log_p_heads, routers[0] if routers else None, self.config.exit_layers,
                              self.config.num_layers)
        losses = nvium_loss(terms, loss_mask, self.beta, self.in_router_warmup, self.aux_head_loss)
        if self.collect_eval:
            self.eval_sums += evaluation_sums(terms, loss_mask)
            return losses.loss
        if self.loss_hook is not None:
            losses.loss = self.loss_hook(losses.loss)
        self.train_sums += losses.logged()
        self.micro_batches += 1
        return losses.loss


def build_pipeline_module(config: ModelConfig, info, seed: int, loss: PipelineLoss,
                          activation_checkpointing: bool = False, loss_chunk_tokens: int = 0):
    """`activation_checkpointing`: DeepSpeed checkpoints every transformer block (interval 1, PipeBlock
    only), the pipeline's counterpart of NviumModel's per-block checkpointing."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    tp = info.tp_size
    specs = [LayerSpec(PipeEmbedding, config, tp, seed)]
    head_after = {layer - 1: head for head, layer in enumerate(config.exit_layers)}
    for index in range(config.num_layers):
        specs.append(LayerSpec(PipeBlock, config, tp, seed, index))
        if index in head_after:
            head = head_after[index]
            specs.append(LayerSpec(PipeHeadPrep, config, tp, seed, head))
            specs.append(TiedLayerSpec("output", PipeOutput, config, tp, seed, loss_chunk_tokens,
                                       forward_fn=functools.partial(head_output, head), tied_weight_attr=["output.weight"]))
    topology = PipeModelDataParallelTopology(num_pp=info.pp_size, num_mp=tp, num_dp=info.dp_size)
    # torch's non-reentrant checkpoint: DeepSpeed's own (reentrant) one frees its inputs after one backward,
    # but the pipe engine runs backward once per grad-carrying tensor of the tuple
    return PipelineModule(layers=specs, topology=topology, loss_fn=loss, partition_method="type:PipeBlock",
                          activation_checkpoint_interval=1 if activation_checkpointing else 0,
                          activation_checkpoint_func=functools.partial(checkpoint, use_reentrant=False),
                          checkpointable_layers=[PipeBlock.__name__])


def pipeline_named_parameters(pipe_module) -> tuple[dict[str, nn.Parameter], dict[str, int | None]]:
    """This stage's parameters and their TP split dims, by NviumModel name (a tied copy appears once)."""
    from nvium_dist.tp_layout import partition_dims

    params, dims = {}, {}
    for child_name, child in pipe_module._modules.items():
        modules = child.values() if child_name == "tied_modules" else [child]
        for module in modules:
            if not hasattr(module, "full_name"):
                continue
            local_dims = partition_dims(module)
            for local, param in module.named_parameters():
                params[module.full_name(local)] = param
                dims[module.full_name(local)] = local_dims.get(local)
    return params, dims
