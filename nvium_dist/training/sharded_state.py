"""The layout-independent checkpoint files, written by every rank for exactly what it owns.

model.safetensors (full fp32 weights) and optimizer.safetensors (full fp32 Adam moments) have a header
that the model config alone fixes, so rank 0 creates both at their final size and every rank writes the
bytes it owns at their offsets: its ZeRO fragment of the fp32 masters and moments of its TP-local
parameters (a fragment is a contiguous range of the flattened TP-local tensor; a row-parallel weight's
range lands in the full tensor as one piece per row). Nothing is gathered: a save needs no memory beyond
the rank's own state, and no byte travels between ranks. A parameter is owned once: by TP rank 0 when TP
replicates it, by the lowest pipeline stage holding it when stages share it (the output matrix), by its ZeRO
partition's rank (or DP rank 0 without ZeRO). Every rank counts the bytes it wrote and rank 0 checks that
they add up to the files' size, so a hole or an overlap is an error rather than a silent zero.

`collect` takes the (cheap) views in the training thread; `OwnedPieces.snapshot` copies them to host
memory for a save that writes in the background (async_save.HostCopy: the ZeRO partitions DeepSpeed's
state dicts point into are copied once for both); `OwnedPieces.write` writes. `ShareWriter` writes one rank's
share locally, then checks collectively that the ranks' bytes add up.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from nvium_dist.checkpoint_io import (MODEL_FILE, MODEL_METADATA, OPTIMIZER_FILE, create_safetensors,
                                      optimizer_metadata, safetensors_layout)
from nvium_dist.training.optimizer_state import MOMENTS, _inner_optimizer, _map_state_slices, adam_step

@dataclass
class Fragment:
    """Elements [start, start + numel) of one flattened TP-local parameter: its fp32 master and moments."""
    name: str
    start: int
    tensors: dict[str, torch.Tensor]  # "weight", "exp_avg", "exp_avg_sq" -> 1-D, numel elements


def _owned_fragment(engine, name: str, param, dp_rank: int, with_moments: bool) -> Fragment | None:
    """This rank's share of `param` under DeepSpeed's partitioning (None: another rank's)."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    keys = MOMENTS if with_moments else ()
    if hasattr(param, "ds_id"):  # ZeRO-3: rank i of the parameter's group holds partition i, padded at the end
        size = param.ds_tensor.ds_numel
        start = dist.get_rank(param.ds_process_group) * size
        numel = max(0, min(size, param.ds_numel - start))
        if numel == 0:
            return None
        tensors = {"weight": safe_get_local_fp32_param(param)}
        tensors.update({key: safe_get_local_optimizer_state(param, key) for key in keys})
        return Fragment(name, start, {k: t.reshape(-1)[:numel] for k, t in tensors.items()})
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2 and bf16: a slice of a flat fp32 partition
        mapping = param._hp_mapping
        if mapping is None:
            return None
        tensors = {"weight": mapping.get_hp_fragment()}
        tensors.update({key: mapping.get_hp_fragment(key) for key in keys})
        return Fragment(name, mapping.lp_fragment_address.start, tensors)
    if dp_rank != 0:  # no ZeRO: every data-parallel replica holds it whole; the first writes it
        return None
    state = _inner_optimizer(engine).state[param]
    tensors = {"weight": param.detach()}
    tensors.update({key: state[key] for key in keys})
    return Fragment(name, 0, {k: t.reshape(-1) for k, t in tensors.items()})


def runs(fragment: Fragment, local_shape: tuple[int, ...], full_shape: tuple[int, ...], dim: int | None,
         tp_rank: int, tp_size: int) -> list[tuple[int, int, int]]:
    """(offset in the fragment, element offset in the full tensor, length) of each contiguous piece the
    fragment fills; the vocab rows a TP shard pads with are dropped."""
    numel_local = int(torch.Size(local_shape).numel())
    cols = numel_local // local_shape[0] if local_shape else 1
    begin, end = fragment.start, fragment.start + fragment.tensors["weight"].numel()
    if dim == 1 and tp_size > 1:
        found, position = [], begin
        while position < end:
            row, col = divmod(position, cols)
            length = min(cols - col, end - position)
            found.append((position - begin, row * cols * tp_size + tp_rank * cols + col, length))
            position += length
        return found
    base = tp_rank * numel_local if dim == 0 and tp_size > 1 else 0
    length = min(end, int(torch.Size(full_shape).numel()) - base) - begin
    return [(0, base + begin, length)] if length > 0 else []


@dataclass
class OwnedPieces:
    """What one rank writes into the layout-independent files: fragments and where their runs go."""
    model_offsets: dict[str, int]
    optimizer_offsets: dict[str, int] | None
    placed: list[tuple[Fragment, list[tuple[int, int, int]]]] = field(default_factory=list)

    def snapshot(self, host_copy) -> "OwnedPieces":
        """A host-memory copy (the training step may change the live tensors while a background save writes)."""
        copies = [(Fragment(f.name, f.start, {k: host_copy(t) for k, t in f.tensors.items()}), where)
                  for f, where in self.placed]
        return OwnedPieces(self.model_offsets, self.optimizer_offsets, copies)

    def write(self, directory: Path) -> int:
        """Writes every run at its offset; -> bytes written (for rank 0's completeness check)."""
        written = 0
        targets = {"weight": (directory / MODEL_FILE, self.model_offsets)}
        if self.optimizer_offsets is not None:
            targets.update({key: (directory / OPTIMIZER_FILE, self.optimizer_offsets) for key in MOMENTS})
        handles = {path: os.open(path, os.O_WRONLY) for path, _ in targets.values()}
        try:
            for fragment, where in self.placed:
                for key, (path, offsets) in targets.items():
                    offset = offsets[fragment.name if key == "weight" else f"{key}.{fragment.name}"]
                    data = fragment.tensors[key].detach().to("cpu", torch.float32).contiguous().numpy()
                    for source, target, length in where:
                        written += _pwrite_all(handles[path], memoryview(data[source:source + length]).cast("B"),
                                               offset + 4 * target)
                    del data
            for fd in handles.values():
                os.fsync(fd)
        finally:
            for fd in handles.values():
                os.close(fd)
        return written


def _pwrite_all(fd: int, data: memoryview, offset: int) -> int:
    done = 0
    while done < len(data):  # one pwrite moves at most ~2 GiB on Linux
        done += os.pwrite(fd, data[done:], offset + done)
    return done


def file_shapes(full_shapes: dict[str, tuple[int, ...]], with_moments: bool):
    """-> (model.safetensors shapes, optimizer.safetensors shapes or None), in file order."""
    moments = {f"{key}.{name}": shape for key in MOMENTS for name, shape in full_shapes.items()}
    return full_shapes, (moments if with_moments else None)


def create_files(directory: Path, full_shapes: dict[str, tuple[int, ...]], step: int | None) -> list[str]:
    """Rank 0, before any rank writes: both files at their final size. -> their names."""
    model, optimizer = file_shapes(full_shapes, step is not None)
    create_safetensors(directory / MODEL_FILE, model, MODEL_METADATA)
    if optimizer is None:
        return [MODEL_FILE]
    create_safetensors(directory / OPTIMIZER_FILE, optimizer, optimizer_metadata(step))
    return [MODEL_FILE, OPTIMIZER_FILE]


def expected_bytes(full_shapes: dict[str, tuple[int, ...]], with_moments: bool) -> int:
    per_copy = sum(4 * int(torch.Size(shape).numel()) for shape in full_shapes.values())
    return per_copy * (1 + 2 * with_moments)


def collect(engine, params: dict, dims: dict, full_shapes: dict[str, tuple[int, ...]], skip: set[str], tp_rank: int,
            tp_size: int, dp_rank: int) -> OwnedPieces:
    """This rank's pieces (views of the live state). `skip`: names a lower pipeline stage writes."""
    step = adam_step(engine)
    with_moments = step > 0
    if with_moments:
        _map_state_slices(engine)
    model_shapes, optimizer_shapes = file_shapes(full_shapes, with_moments)
    pieces = OwnedPieces(safetensors_layout(model_shapes, MODEL_METADATA)[1],
                         safetensors_layout(optimizer_shapes, optimizer_metadata(step))[1] if with_moments else None)
    for name, param in params.items():
        dim = dims.get(name)
        if name in skip or (dim is None and tp_rank != 0):
            continue
        fragment = _owned_fragment(engine, name, param, dp_rank, with_moments)
        if fragment is None:
            continue
        local_shape = tuple(getattr(param, "ds_shape", param.shape))
        pieces.placed.append((fragment, runs(fragment, local_shape, full_shapes[name], dim, tp_rank, tp_size)))
    return pieces


def lower_stage_names(names: list[str], pp_rank: int) -> set[str]:
    """Collective: which of this stage's `names` (the parameters stages share, few) a lower stage also holds."""
    from nvium_dist.parallel import broadcast_object, gather_object

    stages = broadcast_object(gather_object((pp_rank, names)))
    return {name for stage, theirs in stages if stage < pp_rank for name in theirs} & set(names)


class ShareWriter:
    """This rank's share of a save's layout-independent files. `write()` is local: it writes the share (and any
    file `add`ed) and returns the names this rank reports (and hashes) for the manifest. It may fail on one rank
    alone, so the caller lets every rank learn of that and of the bytes each wrote (`written`) before `check`."""

    def __init__(self, directory: Path, pieces: OwnedPieces, expected: int, reported: list[str]):
        self.directory, self.pieces, self.expected = directory, pieces, expected
        self.reported = list(reported)
        self.written = 0
        self._extra: list = []

    def add(self, name: str, write) -> None:
        """Another file this rank writes (`write()`) and reports with its share."""
        self._extra.append(write)
        self.reported.append(name)

    def write(self) -> list[str]:
        self.written = self.pieces.write(self.directory)
        for write in self._extra:
            write()
        return self.reported

    def check(self, written_by_all: int) -> None:
        """The ranks' bytes (the sum of their `written`) cover both files exactly: a hole or an overlap is an error."""
        from nvium_dist.checkpoint_io import CheckpointError

        if written_by_all != self.expected:
            raise CheckpointError(f"{self.directory}: the ranks wrote {written_by_all} bytes of weights and moments, "
                                  f"the files hold {self.expected}; the ownership of some parameter is wrong")


def save_files(directory: Path, engine, config, params: dict, dims: dict, info, skip: set[str],
               host_copy=None) -> ShareWriter:
    """Collective. Rank 0 creates model.safetensors, optimizer.safetensors (after the first optimizer step) and
    config.json (its failure is raised on every rank); every rank collects its share (copied to host memory by
    `host_copy`, if given). -> the ShareWriter that writes it (in a background thread for an async save)."""
    from dataclasses import asdict

    from nvium_dist.checkpoint_io import CONFIG_FILE, atomic_write_json, expected_parameter_shapes
    from nvium_dist.training.checkpoint import raise_rank0_error

    full_shapes = expected_parameter_shapes(config.model)
    step = adam_step(engine)
    error = None
    if info.rank == 0:
        try:
            create_files(directory, full_shapes, step if step > 0 else None)
            atomic_write_json(directory / CONFIG_FILE, asdict(config))
        except OSError as err:  # every rank raises it below, before writing into files that are not there
            error = err
    raise_rank0_error(error, f"create the checkpoint files in {directory}")
    pieces = collect(engine, params, dims, full_shapes, skip, info.tp_rank, info.tp_size, info.dp_rank)
    if host_copy is not None:
        pieces = pieces.snapshot(host_copy)
    reported = [CONFIG_FILE, MODEL_FILE] if info.rank == 0 else []
    if step > 0 and info.rank == info.world_size - 1:  # another rank than the model file's, to hash in parallel
        reported.append(OPTIMIZER_FILE)
    return ShareWriter(directory, pieces, expected_bytes(full_shapes, step > 0), reported)
