"""Training checkpoints: atomic, verified before use, pruned within their lineage, with a fallback.

RUN_DIR/checkpoints/step_XXXXXXXX/
    config.json, model.safetensors, sample_check.safetensors   layout-independent (nvium_dist.checkpoint_io)
    optimizer.safetensors                                        Adam moments per full parameter (layout independent)
    trainer_state.json                                           step, consumed samples, beta, controller, lineage
    rng/rank_XXXXX.pt                                            per-rank RNG states (tensors only)
    deepspeed/state/*.pt                                         DeepSpeed's layout-specific model+optimizer state
    manifest.json                                                size and sha256 of every file above
RUN_DIR/checkpoints/latest                                       name of the newest complete checkpoint

Every rank writes its own share into `.tmp_step_X` (its DeepSpeed files and RNG state, and its fragment of
the weights and moments at their offsets in model.safetensors and optimizer.safetensors: sharded_state.py),
hashes what it wrote and reports it; rank 0 writes the manifest from the union of those reports (never a
directory listing, which on a shared file system can miss what another node just wrote), renames the
directory to `step_X` and only then rewrites `latest`, so a job killed at any point leaves either the old or
the new checkpoint. Each rank's write and hash errors travel in the same collectives as its byte counts and
hashes: a write failing on one rank fails the save on every rank, never leaving the others waiting for it.
With training.async_save all of that after the copy to host memory runs in a background thread
(async_save.py). On resume rank 0 alone chooses: the newest checkpoint of the run's lineage whose every file
matches its manifest (nothing planted, nothing changed) and reads back whole; every rank then loads that one
(in another layout: only its own slices, tp_layout.read_shards). DeepSpeed's pickles are read with
torch.load(weights_only=True). A lineage is one run's chain of checkpoints: a fresh start begins a new one,
so pruning never touches another run's steps.
"""
from __future__ import annotations

import math
import os
import random
import re
import shutil
import sys
import uuid
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from nvium_dist.checkpoint_io import (LATEST_FILE, MODEL_FILE, TRAINER_STATE_FILE, CheckpointError,
                                      atomic_write_json, check_weights_usable, file_record,
                                      read_checkpoint, read_json_object, step_dir_name,
                                      update_latest, verify_manifest, write_manifest)
from nvium_dist.config import NviumConfig
from nvium_dist.output_dir import disk_full_message, is_disk_full
from nvium_dist.parallel import all_gather_object, broadcast_object
from nvium_dist.tp_layout import read_shards
from nvium_dist.training.async_save import HostCopy

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


def own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` for torch.save without copying: torch.save writes a tensor's whole storage, so a view into a
    flat buffer (DeepSpeed's ZeRO and pipeline weights) gets a storage of its own bytes, aliasing them (host
    tensors) or copied to the host (device tensors, as DeepSpeed does)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        return tensor.cpu()
    if tensor.untyped_storage().nbytes() == tensor.nbytes or tensor.dim() == 0:
        return tensor
    if not tensor.is_contiguous():
        return tensor.clone()
    return torch.from_numpy(tensor.view(torch.uint8).numpy()).view(tensor.dtype)


class DeepSpeedWrites:
    """The files DeepSpeed's save_checkpoint asked for on this rank: written at once, or, for a save that
    writes in the background, their state copied to host memory now (`host_copy`, async_save.HostCopy) and
    written by `write()` later."""

    def __init__(self, host_copy=None):
        self.host_copy = host_copy
        self.paths: list[str] = []
        self._pending: list[tuple[object, str]] = []
        self._error: Exception | None = None

    def save(self, state_dict, path: str) -> None:
        from torch.utils._pytree import tree_map_only

        self.paths.append(path)
        if self.host_copy is not None:
            self._pending.append((tree_map_only(torch.Tensor, self.host_copy, state_dict), path))
        elif self._error is None:
            try:
                torch.save(tree_map_only(torch.Tensor, own_storage, state_dict), path)
            except (OSError, RuntimeError) as err:  # torch.save's zip writer reports a failed write as RuntimeError
                # DeepSpeed's save_checkpoint ends in a barrier: this rank must reach it, and raise in `write`
                self._error = err

    def write(self) -> None:
        """Writes what `save` held back; raises the error an immediate write hit."""
        from torch.utils._pytree import tree_map_only

        if self._error is not None:
            raise self._error
        while self._pending:
            state_dict, path = self._pending.pop(0)
            torch.save(tree_map_only(torch.Tensor, own_storage, state_dict), path)


def install_checkpoint_engine(engine) -> None:
    """Replaces the engine's checkpoint engine by one whose `load` is `load_weights_only` (DeepSpeed's own
    TorchCheckpointEngine unpickles with weights_only=False) and whose saves go to `DeepSpeedWrites`: every
    rank knows the files it wrote (the manifest is their union), and no state dict is cloned whole."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}; "
                           "only the torch engine is supported (it is loaded with weights_only=True)")

    class NviumCheckpointEngine(TorchCheckpointEngine):
        writes: DeepSpeedWrites | None = None

        def load(self, path: str, map_location=None):
            return load_weights_only(path, map_location)

        def preserves_storage_sharing(self):  # `own_storage` does what DeepSpeed's whole-state-dict clone did
            return False

        def save(self, state_dict, path: str):
            if self.writes is None:
                raise RuntimeError("DeepSpeed saves only through save_checkpoint here")
            self.writes.save(state_dict, path)

    engine.checkpoint_engine = NviumCheckpointEngine(engine._config)


# -- saving --------------------------------------------------------------------------------------------

def _error_line(err: BaseException, tmp: Path) -> str:
    """One line for a failed write; a full disk names the path and the free space (torch.save alone says
    "[enforce fail ...] unexpected pos")."""
    return disk_full_message(tmp, err) if is_disk_full(err) else f"{type(err).__name__}: {err}"


def _latest_note(root: Path) -> str:
    pointer = root / LATEST_FILE
    try:
        return f"{pointer} still names the last good checkpoint ({pointer.read_text().strip()})"
    except OSError:
        return f"there is no {pointer} yet"


@contextmanager
def _full_disk_is_one_line(tmp: Path, root: Path):
    """A full disk is one error line; the half-written step goes, the previous checkpoints and `latest` stay."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if not is_disk_full(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{disk_full_message(tmp, err)}; {_latest_note(root)}") from None


def _raise_failures(errors: list[str | None], what: str, final: Path, tmp: Path, rank: int) -> None:
    """Every rank calls it with the same `errors` (one line per rank, None where its part succeeded), so a
    failure on any rank ends the save on every rank with the same error; rank 0 removes the partial step."""
    failed = [(r, line) for r, line in enumerate(errors) if line is not None]
    if not failed:
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    first, line = failed[0]
    others = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
    raise CheckpointError(f"checkpoint {final.name} was not written: rank {first} could not {what} ({line}){others}; "
                          f"{_latest_note(final.parent)}")


def save_checkpoint(engine, config: NviumConfig, step: int, trainer_state: dict, write_parts, rank: int,
                    world_size: int, background=None) -> Path:
    """Collective: every rank calls it. `write_parts(tmp_dir, host_copy)` prepares this rank's share of the
    layout-independent files (model, optimizer, sample; it may run collectives; copied to host memory with
    `host_copy` for a background save, None otherwise) and returns its sharded_state.ShareWriter. With
    `background` (async_save.BackgroundSaver) the call returns once the state is copied to host memory;
    writing, hashing, the manifest, the rename and `latest` then run in its thread, on its own process group.

    A write that fails on one rank (its disk full, its mount gone) is a failure of the save on every rank: the
    ranks write their files without waiting for each other, then exchange their errors (and the bytes they
    wrote) in one collective, and likewise for hashing; any error raises the same CheckpointError on every
    rank, before anything is renamed, so `latest` keeps naming the previous checkpoint and no rank waits in a
    collective for one that gave up."""
    root = checkpoint_root(config.training.run_dir)
    final, tmp = root / step_dir_name(step), root / f".tmp_{step_dir_name(step)}"
    if background is not None:
        background.wait()  # at most one save in flight
    with _full_disk_is_one_line(tmp, root):
        error = None
        if rank == 0:
            try:
                # leftovers of saves a kill interrupted; the run-dir lock rules out a writer
                for leftover in root.glob(".tmp_step_*"):
                    shutil.rmtree(leftover)
                (tmp / "rng").mkdir(parents=True)
            except OSError as err:  # every rank raises it below
                error = err
        raise_rank0_error(error, f"create {tmp}")
        host_copy = HostCopy() if background is not None else None
        writes = engine.checkpoint_engine.writes = DeepSpeedWrites(host_copy)
        try:
            engine.save_checkpoint(str(tmp / "deepspeed"), tag=DEEPSPEED_TAG, save_latest=False)
        finally:
            engine.checkpoint_engine.writes = None
        rng = rng_state()
        share = write_parts(tmp, host_copy)
    state = dict(trainer_state, step=step, layout=layout_key(config, world_size))

    def finish(group=None) -> Path:
        rng_file = f"rng/rank_{rank:05d}.pt"
        error, mine = None, []
        try:
            writes.write()
            torch.save(rng, tmp / rng_file)
            mine = [Path(p).relative_to(tmp).as_posix() for p in writes.paths] + [rng_file] + share.write()
            if rank == 0:
                for script in DEEPSPEED_SCRIPTS:
                    (tmp / "deepspeed" / script).unlink(missing_ok=True)
                atomic_write_json(tmp / TRAINER_STATE_FILE, state)
                mine.append(TRAINER_STATE_FILE)
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
            error = _error_line(err, tmp)
        # also the barrier before hashing: other ranks write into the files this rank reports
        reports = all_gather_object((error, share.written), group=group)
        _raise_failures([line for line, _ in reports], "write its share", final, tmp, rank)
        share.check(sum(written for _, written in reports))
        error, records = None, {}
        try:  # every rank hashes what it reports; the manifest is the union, never a listing of the directory
            records = {name: file_record(tmp, name) for name in mine}
        except OSError as err:
            error = _error_line(err, tmp)
        reports = all_gather_object((error, records), group=group)
        _raise_failures([line for line, _ in reports], "read back its share", final, tmp, rank)
        error = None
        if rank == 0:
            renamed = False
            try:
                write_manifest(tmp, {name: record for _, part in reports for name, record in part.items()})
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                renamed = True
                update_latest(root, final.name)
            except OSError as err:
                error = _error_line(err, tmp)
                if renamed:  # a step `latest` does not name is not written: the next resume must not find it
                    shutil.rmtree(final, ignore_errors=True)
        _raise_failures(all_gather_object(error, group=group), "publish it (manifest, rename, `latest`)", final, tmp,
                        rank)
        if rank == 0:
            try:
                prune(root, trainer_state["lineage"], config.training.keep_checkpoints)
            except OSError as err:  # the new checkpoint is good; failing rank 0 alone would strand the others
                warn(f"could not prune old checkpoints in {root} ({err}); they stay")
        return final

    if background is None:
        return finish()
    background.submit(finish)
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


def check_pickles(step_dir: Path) -> None:
    """Every torch.save file of a step directory names only globals that weights_only loading allows, read from
    its pickle without running it: a planted pickle behind a forged manifest sends choose_checkpoint to the
    previous checkpoint, instead of failing one rank in the middle of DeepSpeed's collective load."""
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        for path in sorted(step_dir.rglob("*.pt")):
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            except Exception as err:  # noqa: BLE001 - zip and pickle errors carry many types; name the file
                raise CheckpointError(f"{path} is not a readable torch.save file ({err})") from None
            if unsafe:
                raise CheckpointError(f"{path} names {', '.join(unsafe[:3])}, which weights_only loading refuses "
                                      "(a pickle DeepSpeed did not write)")


def _verify(path: Path, config: NviumConfig) -> None:
    """Everything a resume reads, checked: the manifest (every file, sha256), the pickles' globals, config,
    weights (finite), trainer state (with a finite last evaluation)."""
    verify_manifest(path)
    check_pickles(path)
    checkpoint_config, _, _, trainer_state = read_checkpoint(path, verified=True, load_weights=False)
    if "step" not in trainer_state or "consumed_samples" not in trainer_state:
        raise CheckpointError(f"{path / TRAINER_STATE_FILE} lacks step or consumed_samples")
    _check_same_run(checkpoint_config, config, path)
    last_eval = trainer_state.get("last_eval_ce")
    if last_eval is not None and not (isinstance(last_eval, (int, float)) and math.isfinite(last_eval)):
        raise CheckpointError(f"{path}: its last evaluation (ce {last_eval}) was not finite; the run had diverged")
    _check_finite_weights(path / MODEL_FILE)


def _check_finite_weights(model_file: Path) -> None:
    """No NaN or infinity in the (manifest-verified) weights, read one tensor at a time."""
    from safetensors import safe_open

    with safe_open(str(model_file), framework="pt") as f:
        for name in f.keys():
            check_weights_usable({name: f.get_tensor(name)}, str(model_file.parent))


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


def load_fp32_master_weights(params: dict[str, torch.Tensor], dims: dict[str, int | None], path: Path, tp_rank: int,
                             tp_size: int, vocab_size: int) -> None:
    """Sets the optimizer's fp32 masters of this rank's parameters from the checkpoint's full weights, one
    TP slice at a time, so a weights-only resume of a bf16 run keeps the checkpoint's fp32 precision."""
    from deepspeed.utils import safe_set_full_fp32_param

    shapes = {name: torch.empty(getattr(p, "ds_shape", p.shape), device="meta") for name, p in params.items()}
    for name, shard in read_shards(Path(path) / MODEL_FILE, shapes, dims, tp_rank, tp_size, vocab_size):
        safe_set_full_fp32_param(params[name], shard.to(params[name].device, torch.float32))


def load_deepspeed_state(engine, path: Path, rank: int) -> None:
    load_path, _ = engine.load_checkpoint(str(path / "deepspeed"), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {path / 'deepspeed'}")
    restore_rng_state(load_weights_only(path / "rng" / f"rank_{rank:05d}.pt"))
