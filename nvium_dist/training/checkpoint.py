"""Training checkpoints: atomic, pruned, verified on resume, with a fallback to the previous good one.

RUN_DIR/checkpoints/step_XXXXXXXX/
    config.json, model.safetensors, sample_check.safetensors   layout-independent (nvium_dist.checkpoint_io)
    trainer_state.json                                           step, consumed samples, beta, controller
    rng/rank_XXXXX.pt                                            per-rank RNG states (tensors only)
    deepspeed/                                                   DeepSpeed's layout-specific model+optimizer state
RUN_DIR/checkpoints/latest                                       name of the newest complete checkpoint

Every rank writes into `.tmp_step_X`; rank 0 renames it to `step_X` once all ranks are done and only
then rewrites `latest`, so a job killed at any point leaves either the old or the new checkpoint.
"""
from __future__ import annotations

import os
import random
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from nvium_dist.checkpoint_io import (LATEST_FILE, atomic_write_json, read_checkpoint, step_dir_name, update_latest,
                                      write_model_files)
from nvium_dist.config import NviumConfig
from nvium_dist.tp_layout import shard_named

DEEPSPEED_TAG = "state"


class CheckpointMismatchError(RuntimeError):
    """The checkpoint holds a different model than the config asks for."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def layout_key(config: NviumConfig, world_size: int) -> dict:
    """What DeepSpeed's own state depends on; any change needs a weights-only resume."""
    p = config.parallel
    return {"tensor_parallel": p.tensor_parallel, "pipeline_parallel": p.pipeline_parallel,
            "zero_stage": p.zero_stage, "world_size": world_size}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, config: NviumConfig, step: int, trainer_state: dict, full_state_fn, sample_fn,
                    rank: int, world_size: int) -> Path:
    """Collective: every rank calls it. `full_state_fn()` returns the full weights on rank 0 (None
    elsewhere) and `sample_fn()` the sample-check tensors on rank 0; both may run collectives."""
    root = checkpoint_root(config.training.run_dir)
    final, tmp = root / step_dir_name(step), root / f".tmp_{step_dir_name(step)}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp / "deepspeed"), tag=DEEPSPEED_TAG, save_latest=False)
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    full_state = full_state_fn()
    sample = sample_fn()
    if rank == 0:
        write_model_files(tmp, config, full_state, sample)
        state = dict(trainer_state, step=step, layout=layout_key(config, world_size))
        atomic_write_json(tmp / "trainer_state.json", state)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        update_latest(root, final.name)
        _prune(root, config.training.keep_checkpoints)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _candidates(root: Path) -> list[Path]:
    """Checkpoints newest first: the one `latest` names, then every other step directory."""
    found = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in found:
            found.remove(named)
        found.insert(0, named)
    return found


def _verify(path: Path) -> dict:
    """Reads what a resume needs and checks it is complete; raises on anything missing or corrupt."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    config, full_state, _, trainer_state = read_checkpoint(path)
    return {"path": path, "config": config, "full_state": full_state, "trainer_state": trainer_state}


def find_resumable(run_dir: str | Path, rank: int) -> dict | None:
    """The newest checkpoint that reads back whole; warns about each newer one that does not."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    for candidate in _candidates(root):
        try:
            return _verify(candidate)
        except Exception as error:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous one
            if rank == 0:
                warnings.warn(f"checkpoint {candidate} is unusable ({error}); falling back to the previous one")
    return None


def check_same_model(checkpoint_config: NviumConfig, config: NviumConfig, path: Path) -> None:
    ours, theirs = asdict(config.model), asdict(checkpoint_config.model)
    diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
    if diff:
        lines = "\n".join(f"  model.{k}: checkpoint {old!r} != config {new!r}" for k, (old, new) in diff.items())
        raise CheckpointMismatchError(
            f"{path} holds a different model than the config:\n{lines}\n"
            "use the checkpoint's model settings, or a fresh training.run_dir")


def fp32_master_weights(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The optimizer's fp32 master copy of each of this rank's (TP-local) parameters, whole.

    DeepSpeed's ZeRO 1/2/3 and BF16 optimizers keep the masters partitioned over the data-parallel ranks,
    so this is a collective over that group: every rank calls it. A parameter without a separate master
    (fp32 without ZeRO) is its own master.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    for name, param in params.items():
        master = safe_get_full_fp32_param(param)
        masters[name] = (master if master is not None else param.detach()).float()
    return masters


def load_fp32_master_weights(params: dict[str, torch.Tensor], dims: dict[str, int | None],
                             full_state: dict[str, torch.Tensor], tp_rank: int, tp_size: int, vocab_size: int) -> None:
    """Sets the optimizer's fp32 masters of this rank's parameters from a full (layout-independent) state,
    so a weights-only resume of a bf16 run keeps the checkpoint's fp32 precision."""
    from deepspeed.utils import safe_set_full_fp32_param

    shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in params.items()}  # ZeRO-3: full shape
    shards = shard_named({name: torch.empty(shape) for name, shape in shapes.items()}, dims, full_state,
                         tp_rank, tp_size, vocab_size)
    for name, param in params.items():
        safe_set_full_fp32_param(param, shards[name].to(param.device, torch.float32))


def load_deepspeed_state(engine, path: Path, rank: int) -> None:
    load_path, _ = engine.load_checkpoint(str(path / "deepspeed"), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {path / 'deepspeed'}")
    rng_file = path / "rng" / f"rank_{rank:05d}.pt"
    if rng_file.is_file():
        restore_rng_state(torch.load(rng_file, weights_only=True))
