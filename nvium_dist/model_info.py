"""Parameter accounting on the meta device (no weights allocated), the parameter-matched dense
baseline, DeepSpeed's per-GPU memory estimate for model states, an activation-memory estimate, and the
whole per-GPU budget of a training setup with the fastest setting that fits a card."""
from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict

import torch

from nvium_dist.config import ModelConfig, NviumConfig


def _meta_model(config: ModelConfig):
    from nvium_dist.model import NviumModel

    with torch.device("meta"):
        return NviumModel(config, tensor_parallel=1, initialise=False)


def _part(name: str) -> str:
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("layers."):
        return "blocks"
    if name.startswith("output."):
        return "output"
    if ".router." in name:
        return "routers"
    if ".adapter." in name:
        return "adapters"
    return "exit_norms"


def parameter_breakdown(config: ModelConfig) -> dict:
    """Total and per-part parameter counts, and the largest single module (for the ZeRO-3 estimate)."""
    model = _meta_model(config)
    parts = OrderedDict((p, 0) for p in ("embedding", "blocks", "exit_norms", "adapters", "routers", "output"))
    for name, param in model.named_parameters():
        parts[_part(name)] += param.numel()
    # counts use the unpadded vocab: padding rows are an artefact of the TP layout, not of the model
    padding_rows = model.padded_vocab_size - config.vocab_size
    parts["embedding"] -= padding_rows * config.hidden_size
    parts["output"] -= padding_rows * config.hidden_size
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {"total": sum(parts.values()), "parts": dict(parts), "largest_module": largest}


def dense_twin(config: ModelConfig, ffn_hidden_size: int | None = None) -> ModelConfig:
    return dataclasses.replace(config, exits=[], ffn_hidden_size=ffn_hidden_size or config.ffn_hidden_size)


def matched_dense_ffn(config: ModelConfig) -> int:
    """Smallest multiple of 8 MLP width whose dense model has at least as many parameters as `config`."""
    target = parameter_breakdown(config)["total"]
    at_8 = parameter_breakdown(dense_twin(config, 8))["total"]
    per_unit = (parameter_breakdown(dense_twin(config, 16))["total"] - at_8) / 8  # parameters per MLP unit
    width = max(8, 8 + 8 * math.ceil((target - at_8) / per_unit / 8))
    while width > 8 and at_8 + per_unit * (width - 8 - 8) >= target:
        width -= 8
    return width


def model_state_memory(total_params: int, largest_module: int, zero_stage: int, gpus_per_node: int,
                       nodes: int, model_parallel: int = 1, offload: bool = False) -> dict:
    """Per-GPU bytes for parameters, gradients and AdamW states in bf16 mixed precision.

    ZeRO 1-3 use DeepSpeed's own estimators over the parameters one model-parallel rank holds;
    stage 0 keeps everything on every GPU (2+2 bytes bf16 params/grads, 16 bytes fp32 master + Adam).
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    per_rank = total_params // model_parallel
    data_parallel_gpus = max(1, gpus_per_node * nodes // model_parallel)
    if zero_stage == 0:
        gpu, cpu = 20 * per_rank, 0
    elif zero_stage in (1, 2):
        cpu, gpu = estimate_zero2_model_states_mem_needs(per_rank, data_parallel_gpus, 1, cpu_offload=offload)
    else:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            per_rank, largest_module // model_parallel, data_parallel_gpus, 1, cpu_offload=offload,
            cpu_offload_params=offload)
    return {"zero_stage": zero_stage, "gpus": gpus_per_node * nodes, "model_parallel": model_parallel,
            "offload": offload, "per_gpu_gib": round(gpu / 2**30, 3), "cpu_gib": round(cpu / 2**30, 3)}


def model_report(config: ModelConfig) -> dict:
    """What tools/model_info.py prints: counts per part, exits, segments and the matched dense twin."""
    counts = parameter_breakdown(config)
    report = {
        "total_parameters": counts["total"],
        "total_parameters_billions": round(counts["total"] / 1e9, 4),
        "parameters_by_part": counts["parts"],
        "largest_module_parameters": counts["largest_module"],
        "num_layers": config.num_layers,
        "exits": list(config.exits),
        "exit_layers": config.exit_layers,
        "segments": [list(r) for r in config.segment_ranges],
    }
    if config.exits:
        width = matched_dense_ffn(config)
        report["matched_dense"] = {"ffn_hidden_size": width,
                                   "total_parameters": parameter_breakdown(dense_twin(config, width))["total"]}
    return report


def _norm_bytes(d: int, p: int, fused: bool, input_counted: bool) -> int:
    """Per-token bytes an RMSNorm keeps for backward, its output included (saved by the next matmul).
    Fused kernels (CUDA) keep the input and a fp32 rstd; torch's CPU composite keeps fp32 copies of the
    input (the input itself in fp32) and of x * rstd."""
    if fused:
        return (0 if input_counted else p * d) + 4 + p * d
    fp32_input = 0 if (p == 4 and input_counted) else 4 * d
    return fp32_input + 4 + 4 * d + p * d


def activation_memory(config: ModelConfig, micro_batch: int, seq_length: int | None = None, *,
                      tensor_parallel: int = 1, pipeline_parallel: int = 1, dtype_bytes: int = 2,
                      fused_norm: bool = True, activation_checkpointing: bool = False,
                      loss_chunk_tokens: int = 0) -> dict:
    """Activation bytes of one training micro-batch on the busiest GPU, from a per-token count of what
    each op keeps for backward (this model's ops, as torch and megatron-core save them).

    saved: what lives from the forward into the backward; with per-block checkpointing a block keeps
    only its input, with the chunked loss a head keeps no vocab-sized tensor. transient: the largest
    extra during backward: one loss chunk's logits, softmax and their gradients, or one block recomputed
    plus its gradient temporaries (at the last block, once the head behind it has freed its tensors). Under PP the busiest stage is the one with the most
    micro-batches in flight (DeepSpeed's 1F1B schedule: stage s holds pp - s of them).
    """
    p, t = dtype_bytes, tensor_parallel
    d, f, heads, rh = config.hidden_size, config.ffn_hidden_size, config.num_heads, config.router_hidden_size
    vocab = config.padded_vocab_size(t) // t
    tokens = micro_batch * (seq_length or config.seq_length)
    fp32_norm_input = p == 4 or fused_norm  # a norm keeps its input itself (shared with the residual stream)
    residual = p * d if fp32_norm_input else 0
    full_block = (2 * (residual + _norm_bytes(d, p, fused_norm, input_counted=True))
                  + 6 * p * d // t  # qkv, rotated q and k, attention output
                  + 4 * heads // t  # softmax logsumexp
                  + 4 * p * f // t)  # gate, up, SiLU(gate), product
    # RoPE's fp32 cos and sin, made once per forward (NviumModel.rotary; per block in a pipeline stage) and kept
    # for backward by its blocks (checkpointed blocks keep them as inputs)
    rotary = 8 * config.head_dim
    block = p * d if activation_checkpointing else full_block

    def head(index: int) -> int:
        final = index == config.num_heads_total - 1
        total = _norm_bytes(d, p, fused_norm, input_counted=not final)
        if not final:  # router: fc1 and GELU outputs, its norm (input = fc2 output)
            total += 2 * p * rh + _norm_bytes(d, p, fused_norm, input_counted=False)
        if not final or config.has_final_adapter:  # adapter: W1 and SiLU outputs, the adapted state
            total += 2 * p * d // t + p * d
        if not loss_chunk_tokens:  # vocab_parallel_cross_entropy keeps the fp32 softmax (+ masks)
            total += 4 * vocab + 9
        return total

    # backward sums the shared output matrix's per-use gradients ([vocab, d] each) in a buffer until the
    # first head is done: one contribution plus the sum (unchunked), or the sum, a chunk's contribution
    # and their addition (chunked: many uses)
    weight_grad = p * vocab * d
    cast = p if p != 4 else 0  # bf16 logits next to their fp32 copy
    if loss_chunk_tokens:  # a recomputed chunk: its fp32 logits/softmax and (part of the time) bf16 logits
        chunk = min(loss_chunk_tokens, tokens)
        loss_transient = max(3 * weight_grad, 2 * weight_grad + chunk * vocab * (8 + cast) // 2)
    else:  # the fp32 softmax is saved already; the forward briefly holds the bf16 logits too
        loss_transient = max(weight_grad, tokens * vocab * cast)
    block_transient = (tokens * ((full_block - p * d if activation_checkpointing else 0) + p * (d + f // t))
                       + weight_grad)

    stages = []
    layers_per_stage = -(-config.num_layers // pipeline_parallel)
    for stage in range(pipeline_parallel):
        first, last = stage * layers_per_stage, min(config.num_layers, (stage + 1) * layers_per_stage)
        stage_heads = [k for k, layer in enumerate(config.exit_layers) if first < layer <= last]
        rotary_calls = last - first if pipeline_parallel > 1 else 1
        per_token = ((last - first) * block + rotary_calls * rotary + sum(head(k) for k in stage_heads)
                     + 24 * len(stage_heads) + 8)
        in_flight = pipeline_parallel - stage
        saved = per_token * tokens * in_flight
        # backward reaches the stage's last block after the head right behind it has freed its tensors
        behind = head(stage_heads[-1]) * tokens if stage_heads and config.exit_layers[stage_heads[-1]] == last else 0
        transient = max(loss_transient, block_transient - behind, 0)
        stages.append({"stage": stage, "layers": last - first, "heads": len(stage_heads),
                       "micro_batches_in_flight": in_flight, "saved": saved, "transient": transient})
    busiest = max(stages, key=lambda s: s["saved"] + s["transient"])
    saved, transient = busiest["saved"], busiest["transient"]
    peak = saved + transient
    gib = 2**30
    return {"micro_batch": micro_batch, "seq_length": seq_length or config.seq_length, "dtype_bytes": p,
            "tensor_parallel": t, "pipeline_parallel": pipeline_parallel, "fused_norm": fused_norm,
            "activation_checkpointing": activation_checkpointing, "loss_chunk_tokens": loss_chunk_tokens,
            "busiest_stage": busiest["stage"], "saved_bytes": saved, "transient_bytes": transient,
            "peak_bytes": peak, "peak_gib": round(peak / gib, 3)}


def forward_flops_per_token(model: ModelConfig, parts: dict) -> float:
    """2 x (multiply-adds of every matmul a token passes) + causal attention scores and mixing."""
    heads = model.num_heads_total
    matmul_params = parts["blocks"] + heads * parts["output"] + parts["adapters"] + parts["routers"]
    attention = 2 * model.num_layers * model.seq_length * model.hidden_size  # QK^T and AV, causal average
    return 2 * matmul_params + attention


# Device memory the allocator's tensors do not show, per GPU. The CUDA context with cuBLAS/cuDNN workspaces takes
# 0.5-1 GiB on an H100 under CUDA 12 (lazy module loading); an NCCL communicator holds 2 x up to 32 channels x
# NCCL_BUFFSIZE (4 MiB) = 0.25 GiB; the caching allocator's blocks exceed the live tensors by fragmentation, about
# 10% at peak in long runs (reserved over allocated).
CUDA_CONTEXT_GIB = 1.0
NCCL_COMMUNICATOR_GIB = 0.25
ALLOCATOR_SLACK = 0.10
# DeepSpeed's overlapped ZeRO-2/3 reduction holds about 4.5 x (reduce + allgather bucket) elements (its docs:
# 5e8-element buckets need 9 GB in fp16); without overlap one of each. ZeRO-0/1 reduce through a flat buffer of up
# to DeepSpeed's allreduce_bucket_size (5e8 elements) of the gradients.
OVERLAP_BUCKET_FACTOR = 4.5
ALLREDUCE_BUCKET_ELEMENTS = 500_000_000


def gpu_memory_budget(config: NviumConfig, world_size: int, gpus_per_node: int | None = None,
                      micro_batch: int | None = None, activation_checkpointing: bool | None = None,
                      loss_chunk_tokens: int | None = None, counts: dict | None = None) -> dict:
    """Per-GPU GiB of a training setup: model states (DeepSpeed's estimator), activations (activation_memory),
    DeepSpeed's gradient buckets, the CUDA context, NCCL buffers, the save transient (one fp32 tensor, gathered
    whole: the largest parameter) and allocator slack over all tensors. Unset settings come from the config."""
    p, t = config.parallel, config.training
    counts = counts or parameter_breakdown(config.model)
    micro_batch = micro_batch or t.micro_batch_size
    checkpointing = t.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    chunk = t.loss_chunk_tokens if loss_chunk_tokens is None else loss_chunk_tokens
    model_parallel = p.tensor_parallel * p.pipeline_parallel
    data_parallel = max(1, world_size // model_parallel)
    gpus_per_node = gpus_per_node or world_size
    states = model_state_memory(counts["total"], counts["largest_module"], p.zero_stage, gpus_per_node,
                                max(1, world_size // gpus_per_node), model_parallel, p.offload_optimizer)
    activations = activation_memory(config.model, micro_batch, tensor_parallel=p.tensor_parallel,
                                    pipeline_parallel=p.pipeline_parallel, dtype_bytes=p.dtype_bytes,
                                    fused_norm=p.device == "cuda", activation_checkpointing=checkpointing,
                                    loss_chunk_tokens=chunk)
    reduce_bytes = 4 if p.grad_reduce_dtype == "fp32" else 2
    if data_parallel == 1:
        bucket_elements = 0
    elif p.zero_stage >= 2:
        both = p.reduce_bucket_size + p.allgather_bucket_size
        bucket_elements = OVERLAP_BUCKET_FACTOR * both if p.overlap_comm else both
    else:
        bucket_elements = min(counts["total"] // model_parallel, ALLREDUCE_BUCKET_ELEMENTS)
    gib = 2**30
    buckets = bucket_elements * reduce_bytes / gib
    save = 4 * counts["largest_module"] / gib
    communicators = 1 + (data_parallel > 1) + (p.tensor_parallel > 1) + (p.pipeline_parallel > 1)
    tensors = states["per_gpu_gib"] + activations["peak_gib"] + buckets + save
    parts = {"model_states": states["per_gpu_gib"], "activations": activations["peak_gib"],
             "deepspeed_buckets": buckets, "save_transient": save, "allocator_slack": ALLOCATOR_SLACK * tensors,
             "cuda_context": CUDA_CONTEXT_GIB, "nccl_buffers": NCCL_COMMUNICATOR_GIB * communicators}
    return {"micro_batch": micro_batch, "activation_checkpointing": checkpointing, "loss_chunk_tokens": chunk,
            "world_size": world_size, "zero_stage": p.zero_stage, "parts_gib": {k: round(v, 3) for k, v in parts.items()},
            "total_gib": round(sum(parts.values()), 3)}


def training_flops_per_token(model: ModelConfig, parts: dict, activation_checkpointing: bool, loss_chunked: bool) -> float:
    """Forward + backward (3 x forward) plus what recomputation adds: the blocks' forward again under
    activation checkpointing, the heads' vocab projections again under the chunked loss."""
    forward = forward_flops_per_token(model, parts)
    recompute = 0.0
    if activation_checkpointing:
        recompute += 2 * parts["blocks"] + 2 * model.num_layers * model.seq_length * model.hidden_size
    if loss_chunked:
        recompute += 2 * model.num_heads_total * parts["output"]
    return 3 * forward + recompute


MICRO_BATCH_CHOICES = (1, 2, 4, 8, 16, 32, 64)
LOSS_CHUNK_CHOICES = (0, 4096, 1024)


def fastest_fitting_setting(config: NviumConfig, gpu_memory_gib: float, world_size: int,
                            gpus_per_node: int | None = None) -> dict:
    """The setting (micro-batch, activation checkpointing, loss chunk) with the fewest training FLOPs per token
    whose gpu_memory_budget fits `gpu_memory_gib`, the largest micro-batch among equals (fewer, larger
    kernels). Micro-batches divide the per-replica batch (global / data parallel). -> {"fits": False} if none."""
    counts = parameter_breakdown(config.model)
    model_parallel = config.parallel.tensor_parallel * config.parallel.pipeline_parallel
    per_replica = config.training.global_batch_size // max(1, world_size // model_parallel)
    candidates = []
    for checkpointing in (False, True):
        for chunk in LOSS_CHUNK_CHOICES:
            flops = training_flops_per_token(config.model, counts["parts"], checkpointing, chunk > 0)
            for micro in MICRO_BATCH_CHOICES:
                if micro > per_replica or per_replica % micro:
                    continue
                budget = gpu_memory_budget(config, world_size, gpus_per_node, micro, checkpointing, chunk, counts)
                if budget["total_gib"] <= gpu_memory_gib:
                    candidates.append((flops, -micro, budget))
    if not candidates:
        return {"fits": False, "gpu_memory_gib": gpu_memory_gib}
    flops, _, best = min(candidates, key=lambda c: c[:2])
    return {"fits": True, "gpu_memory_gib": gpu_memory_gib, **best,
            "recompute_overhead": round(flops / (3 * forward_flops_per_token(config.model, counts["parts"])) - 1, 4)}


class TensorMemoryTracker:
    """Counts the bytes of tensor storages that ops create while active, until those storages are freed;
    `peak` is the most alive at once. Deterministic on any device (it counts tensors, not allocator
    blocks), so it measures activation memory exactly where allocator statistics are unavailable (CPU).
    Views and in-place results share an input's storage and are not counted again; meta tensors hold nothing."""

    def __init__(self):
        self.live = self.peak = 0
        self.transient_peak = 0  # set on exit: the peak of the storages freed again by then
        self._refs: dict[int, object] = {}
        self._events: list[tuple[int, int]] = []  # (allocation number, +bytes when made / -bytes when freed)

    def __enter__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        def storages(tree):
            return [t.untyped_storage() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]

        def freed(key: int, size: int, serial: int) -> None:
            tracker.live -= size
            tracker._refs.pop(key, None)
            tracker._events.append((serial, -size))

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = {s.data_ptr() for s in storages((args, kwargs))}
                for storage in storages(out):
                    key, size = id(storage), storage.nbytes()
                    if key in tracker._refs or not size or storage.device.type == "meta" or \
                            storage.data_ptr() in inputs:
                        continue
                    tracker.live += size
                    tracker.peak = max(tracker.peak, tracker.live)
                    serial = len(tracker._events)
                    tracker._events.append((serial, size))
                    tracker._refs[key] = weakref.ref(storage, lambda _, k=key, n=size, i=serial: freed(k, n, i))
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        # what an operation needed on top of what it left behind (e.g. a save: its buffers, not the state)
        freed = {serial for serial, size in self._events if size < 0}
        live = 0
        for serial, size in self._events:
            if serial in freed:
                live += size
                self.transient_peak = max(self.transient_peak, live)


def training_loss(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The N-vium loss of one unmasked micro-batch after the router warmup (beta 0.15), for measurements."""
    from nvium_dist.mixture import nvium_loss

    mask = torch.ones_like(labels, dtype=torch.float32)
    return nvium_loss(model(tokens, labels), mask, beta=0.15, in_router_warmup=False).loss


def measure_training_step(model, tokens: torch.Tensor, labels: torch.Tensor) -> dict:
    """Activation bytes of one forward + backward of the N-vium loss (gradients allocated beforehand by a
    warm-up step, as in training): `saved` alive when the forward ends, `peak` the most at any time."""
    training_loss(model, tokens, labels).backward()
    with TensorMemoryTracker() as tracker:
        value = training_loss(model, tokens, labels)
        saved = tracker.live
        value.backward()
        del value
    return {"saved_bytes": saved, "peak_bytes": tracker.peak}


class ExtraMemory:
    """The extra memory an operation allocates and frees again (a checkpoint save or load: its buffers, not
    the state it leaves behind): torch storages on any device (`TensorMemoryTracker.transient_peak`) plus the
    Python heap's peak (tracemalloc: numpy arrays, the bytes safetensors reads). `bytes`: the two peaks
    added, an upper bound of their joint peak.

    Python-heap tracing starts with the first measurement (call `start_tracing` earlier, before the process
    starts threads) and stays on: tracemalloc.stop() races allocations made by other threads without the GIL
    and can crash the process on Python before 3.12.9 (cpython#128679)."""

    @staticmethod
    def start_tracing() -> None:
        import tracemalloc

        if not tracemalloc.is_tracing():
            tracemalloc.start()

    def __enter__(self):
        import tracemalloc

        self.start_tracing()
        tracemalloc.reset_peak()
        self._python_base = tracemalloc.get_traced_memory()[0]
        self._tensors = TensorMemoryTracker().__enter__()
        return self

    def __exit__(self, *exc):
        import tracemalloc

        self._tensors.__exit__(*exc)
        self.python_bytes = max(0, tracemalloc.get_traced_memory()[1] - self._python_base)
        self.torch_bytes = self._tensors.transient_peak
        self.bytes = self.torch_bytes + self.python_bytes
