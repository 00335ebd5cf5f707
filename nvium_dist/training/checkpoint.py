"""Training checkpoints: atomic, verified before use, pruned within their lineage, with a fallback.

RUN_DIR/checkpoints/step_XXXXXXXX/
    config.json, model.safetensors, sample_check.safetensors   layout-independent (nvium_dist.checkpoint_io)
    optimizer.safetensors                                        Adam moments per full parameter (layout independent)
    trainer_state.json                                           step, consumed samples, beta, controller, lineage
    rng/rank_XXXXX.pt                                            per-rank RNG states (tensors only)
    deepspeed/state/*.pt                                         DeepSpeed's layout-specific model+optimizer state
    manifest.json                                                size and sha256 of every file above
RUN_DIR/checkpoints/latest                                       name of the newest complete checkpoint

Every rank writes into `.tmp_step_X`; rank 0 writes the manifest once all ranks are done, renames the
directory to `step_X` and only then rewrites `latest`, so a job killed at any point leaves either the old
or the new checkpoint. On resume rank 0 alone chooses: the newest checkpoint of the run's lineage whose
every file matches its manifest (nothing planted, nothing changed) and reads back whole; every rank then
loads that one. DeepSpeed's pickles are read with torch.load(weights_only=True). A lineage is one run's
chain of checkpoints: a fresh start begins a new one, so pruning never touches another run's steps.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import sys
import uuid
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from nvium_dist.checkpoint_io import (LATEST_FILE, MODEL_FILE, TRAINER_STATE_FILE, CheckpointError,
                                      atomic_write_json, file_record, list_files, load_tensors, read_checkpoint,
                                      read_json_object, step_dir_name, update_latest, verify_manifest, write_manifest)
from nvium_dist.config import NviumConfig
from nvium_dist.parallel import broadcast_object, gather_object
from nvium_dist.tp_layout import shard_named

DEEPSPEED_TAG = "state"
STEP_DIR = re.compile(r"step_(\d{8})")
# DeepSpeed copies these into every ZeRO checkpoint; they are programs, and tools/export_checkpoint.py covers their use
DEEPSPEED_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


class CheckpointMismatchError(CheckpointError):
    """The checkpoint belongs to a different run than the config describes (model or data order)."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def layout_key(config: NviumConfig, world_size: int) -> dict:
    """What DeepSpeed's own state depends on; any change resumes from the layout-independent files."""
    p = config.parallel
    return {"tensor_parallel": p.tensor_parallel, "pipeline_parallel": p.pipeline_parallel,
            "zero_stage": p.engine_zero_stage(world_size), "world_size": world_size}


def new_lineage() -> str:
    return uuid.uuid4().hex


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


# -- failures every rank must hear about -----------------------------------------------------------------

class RankZeroError(RuntimeError):
    """Raised on ranks > 0 when rank 0 failed at something all ranks wait on; rank 0 raises the original."""


def raise_rank0_error(error: Exception | None, what: str) -> None:
    """Collective: rank 0 passes the exception it hit (None elsewhere or when it succeeded); rank 0 re-raises
    it and every other rank raises RankZeroError, so no rank waits forever for one that gave up."""
    message = broadcast_object(f"{type(error).__name__}: {error}" if error is not None else None)
    if error is not None:
        raise error
    if message is not None:
        raise RankZeroError(f"rank 0 could not {what}: {message}")


# -- DeepSpeed's files without unpickling code ---------------------------------------------------------

def deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed's model and ZeRO optimizer files hold (found by loading real
    checkpoints of ZeRO 0-3, PP, TP, bf16 and CPU offload with torch.serialization.get_unsafe_globals_in_checkpoint)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path, map_location=None):
    """torch.load restricted to tensors, plain containers and `deepspeed_safe_globals()`: a planted pickle
    that names anything else (os.system, a __reduce__ gadget) raises instead of running."""
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # noqa: BLE001 - pickle and zip errors carry many types; name the file
            raise CheckpointError(f"{path} could not be loaded with weights_only=True ({err})") from None


def install_weights_only_loading(engine) -> None:
    """Replaces the engine's checkpoint engine by one whose `load` is `load_weights_only` (DeepSpeed's own
    TorchCheckpointEngine unpickles with weights_only=False); saving stays DeepSpeed's."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}; "
                           "only the torch engine is supported (it is loaded with weights_only=True)")

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_weights_only(path, map_location)

    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)


# -- saving --------------------------------------------------------------------------------------------

def save_checkpoint(engine, config: NviumConfig, step: int, trainer_state: dict, write_parts, rank: int,
                    world_size: int) -> Path:
    """Collective: every rank calls it. `write_parts(tmp_dir)` writes the layout-independent files
    (model, optimizer, sample) into the temporary step directory; it may run collectives."""
    root = checkpoint_root(config.training.run_dir)
    final, tmp = root / step_dir_name(step), root / f".tmp_{step_dir_name(step)}"
    if rank == 0:
        for leftover in root.glob(".tmp_step_*"):  # from saves a kill interrupted; the run-dir lock rules out a writer
            shutil.rmtree(leftover)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp / "deepspeed"), tag=DEEPSPEED_TAG, save_latest=False)
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    write_parts(tmp)
    dist.barrier()
    if rank == 0:
        for script in DEEPSPEED_SCRIPTS:
            (tmp / "deepspeed" / script).unlink(missing_ok=True)
        state = dict(trainer_state, step=step, layout=layout_key(config, world_size))
        atomic_write_json(tmp / TRAINER_STATE_FILE, state)
    dist.barrier()
    # every rank hashes a share of the files; rank 0 writes the manifest
    files = list_files(tmp)
    records = gather_object({name: file_record(tmp, name) for name in files[rank::world_size]})
    if rank == 0:
        write_manifest(tmp, {name: record for part in records for name, record in part.items()})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        update_latest(root, final.name)
        prune(root, trainer_state["lineage"], config.training.keep_checkpoints)
    dist.barrier()
    return final


def _step_dirs(root: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()}


def _lineage(step_dir: Path) -> str | None:
    try:
        state = read_json_object(step_dir / TRAINER_STATE_FILE)
    except CheckpointError:
        return None
    return state.get("lineage")


def prune(root: Path, lineage: str, keep: int) -> None:
    """Keeps the `keep` newest checkpoints of this lineage (by step number; 0 keeps all); other runs'
    checkpoints in the same directory are never touched."""
    if keep <= 0:
        return
    ours = sorted(step for step, path in _step_dirs(root).items() if _lineage(path) == lineage)
    for step in ours[:-keep]:
        shutil.rmtree(root / step_dir_name(step))


# -- choosing the checkpoint to resume from ----------------------------------------------------------------

def _candidates(root: Path) -> list[Path]:
    """Newest first, within the lineage of the checkpoint `latest` names (all step dirs when that is unknown)."""
    steps = _step_dirs(root)
    pointer = root / LATEST_FILE
    lineage = None
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named.is_dir():
            lineage = _lineage(named)
        else:
            warn(f"{pointer} names {named.name}, which does not exist")
    if lineage is not None:
        steps = {step: path for step, path in steps.items() if _lineage(path) == lineage}
    return [steps[s] for s in sorted(steps, reverse=True)]


def warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _check_same_run(checkpoint_config: NviumConfig, config: NviumConfig, path: Path) -> None:
    """A resume must continue the same model on the same sample order; anything else is another run."""
    ours, theirs = asdict(config.model), asdict(checkpoint_config.model)
    diff = {f"model.{k}": (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
    if checkpoint_config.training.seed != config.training.seed:
        diff["training.seed"] = (checkpoint_config.training.seed, config.training.seed)
    if diff:
        lines = "; ".join(f"{k}: checkpoint {old!r} != config {new!r}" for k, (old, new) in diff.items())
        raise CheckpointMismatchError(
            f"{path} belongs to a different run than the config ({lines}). The model must match, and the seed "
            "fixes the sample order; use the checkpoint's values, or a fresh training.run_dir")


def _verify(path: Path, config: NviumConfig) -> None:
    """Everything a resume reads, checked: the manifest (every file, sha256), config, weights, trainer state."""
    verify_manifest(path)
    checkpoint_config, _, _, trainer_state = read_checkpoint(path, verified=True, load_weights=False)
    if "step" not in trainer_state or "consumed_samples" not in trainer_state:
        raise CheckpointError(f"{path / TRAINER_STATE_FILE} lacks step or consumed_samples")
    _check_same_run(checkpoint_config, config, path)


def choose_checkpoint(run_dir: str | Path, config: NviumConfig) -> Path | None:
    """Rank 0's choice: the newest verified checkpoint of the lineage, falling back past broken ones with a
    loud warning. Broken checkpoints and none good is an error unless training.allow_fresh_start."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    refused = []
    for candidate in _candidates(root):
        try:
            _verify(candidate, config)
            return candidate
        except CheckpointMismatchError:
            raise
        except CheckpointError as error:
            refused.append(f"{candidate.name}: {error}")
            warn(f"checkpoint {candidate} is unusable ({error}); falling back to the previous one")
    if refused:
        summary = " | ".join(refused)
        if not config.training.allow_fresh_start:
            raise CheckpointError(
                f"no usable checkpoint in {root} ({summary}). Restore or remove the broken checkpoints, or set "
                "training.allow_fresh_start=true to start this run from step 0 (its steps are then a new lineage)")
        warn(f"no usable checkpoint in {root}; starting from step 0 because training.allow_fresh_start=true")
    return None


def find_resume(run_dir: str | Path, config: NviumConfig, rank: int) -> dict | None:
    """Collective: rank 0 chooses (`choose_checkpoint`) and broadcasts its choice, or its error, which
    every rank then raises. -> {"path", "trainer_state"} of the chosen checkpoint, or None."""
    choice, error = None, None
    if rank == 0:
        try:
            choice = choose_checkpoint(run_dir, config)
        except Exception as err:  # noqa: BLE001 - raised again on every rank by raise_rank0_error
            error = err
    raise_rank0_error(error, "choose a checkpoint to resume from")
    choice = broadcast_object(str(choice) if choice is not None else None)
    if choice is None:
        return None
    return {"path": Path(choice), "trainer_state": read_json_object(Path(choice) / TRAINER_STATE_FILE)}


def read_full_state(path: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The chosen checkpoint's full weights, or just `names` of them (rank 0 verified them against the
    manifest)."""
    if names is not None:
        return load_tensors(Path(path) / MODEL_FILE, names)
    return read_checkpoint(path, verified=True)[1]


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
        raise CheckpointError(f"DeepSpeed could not load {path / 'deepspeed'}")
    restore_rng_state(load_weights_only(path / "rng" / f"rank_{rank:05d}.pt"))
