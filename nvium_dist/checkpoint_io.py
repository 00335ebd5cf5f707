"""On-disk formats: the layout-independent training checkpoint and the inference export.

Training checkpoint (written by the trainer through `write_model_files`)::

    RUN_DIR/checkpoints/latest                   text: name of the newest complete step dir
    RUN_DIR/checkpoints/step_XXXXXXXX/
        config.json              the full NviumConfig (dataclasses.asdict; sections model/parallel/data/training)
        model.safetensors        FULL weights, names of NviumModel.named_parameters() at TP=1, vocab rows unpadded
        sample_check.safetensors tokens/labels [2, s] int64, log_p_heads [2, s, K], log_p_mix [2, s] (fp32)
        trainer_state.json       step, consumed_samples, beta, ...
        deepspeed/               DeepSpeed's own layout-specific state (never read here)

Export (`save_export`)::

    EXPORT_DIR/config.json       {"format": "nvium-export", "version": 1, "model": {...}, "tokenizer": {...}, ...}
    EXPORT_DIR/model.safetensors the same full weights
    EXPORT_DIR/tokenizer.model   the SentencePiece model (when there is one)

Everything is read without unpickling (safetensors + json). Every write goes to `<target>.tmp-<pid>` first
and is moved into place with `os.replace`, so a reader never sees a half-written file or directory.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nvium_dist.config import ConfigError, ModelConfig, NviumConfig, _build, model_config_from_dict

EXPORT_FORMAT = "nvium-export"
EXPORT_VERSION = 1
MODEL_FILE = "model.safetensors"
SAMPLE_FILE = "sample_check.safetensors"
CONFIG_FILE = "config.json"
TRAINER_STATE_FILE = "trainer_state.json"
TOKENIZER_FILE = "tokenizer.model"
LATEST_FILE = "latest"
SAMPLE_KEYS = ("tokens", "labels", "log_p_heads", "log_p_mix")


class CheckpointError(RuntimeError):
    """A checkpoint or export that is missing, incomplete, corrupt or does not match its config."""


# -- small atomic-write helpers --------------------------------------------------------------------------

def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, value: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode())


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = _tmp_name(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def config_from_dict(values: dict[str, Any]) -> NviumConfig:
    """A full NviumConfig from its `dataclasses.asdict` form (validated; unknown keys are errors)."""
    config = _build(NviumConfig, values)
    config.validate()
    return config


def update_latest(checkpoints_dir: str | os.PathLike, step_dir_name: str) -> None:
    """Points `checkpoints/latest` at `step_dir_name` (atomically)."""
    checkpoints_dir = Path(checkpoints_dir)
    if not (checkpoints_dir / step_dir_name).is_dir():
        raise CheckpointError(f"{checkpoints_dir / step_dir_name} does not exist; write it before pointing latest at it")
    _atomic_write_bytes(checkpoints_dir / LATEST_FILE, (step_dir_name + "\n").encode())


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# -- safetensors validation ------------------------------------------------------------------------------

def check_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """Validates a .safetensors file's header and size without loading it; returns the parsed header.

    Catches truncation (a copy or save that stopped early) and corruption with a message naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    size = path.stat().st_size
    what = f"{path} ({size} bytes)"
    if size < 8:
        raise CheckpointError(f"{what} is truncated: too short for a safetensors header; re-export or re-copy it")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointError(f"{what} is truncated or not a safetensors file (header claims {header_len} bytes)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{what} has a corrupt safetensors header ({err}); re-export or re-copy it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{what} has a corrupt safetensors header")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{what}: tensor {name!r} has no valid data_offsets; the file is corrupt") from None
        end = max(end, int(stop))
    expected = 8 + header_len + end
    if size < expected:
        raise CheckpointError(
            f"{what} is truncated: its header describes {expected} bytes; the write or copy stopped early. "
            "Use an earlier checkpoint or copy it again")
    return header


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises SafetensorError with a terse message
        raise CheckpointError(f"{path} could not be read as safetensors ({err}); the file is corrupt") from err


def expected_parameter_shapes(model_config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of the full (TP=1, unpadded vocab) state dict, from a meta-device model."""
    from nvium_dist.model import NviumModel
    from nvium_dist.tp_layout import VOCAB_PARAMETERS

    with torch.device("meta"):
        model = NviumModel(model_config, tensor_parallel=1, initialise=False)
    shapes = {}
    for name, param in model.named_parameters():
        shape = tuple(param.shape)
        if name.endswith(VOCAB_PARAMETERS):
            shape = (model_config.vocab_size,) + shape[1:]
        shapes[name] = shape
    return shapes


def check_state_matches(model_config: ModelConfig, state: dict[str, torch.Tensor], where: str) -> None:
    """Raises CheckpointError when the weights in `where` do not belong to a model with this config."""
    expected = expected_parameter_shapes(model_config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{n}: file {tuple(state[n].shape)} vs config {expected[n]}"
             for n in sorted(set(expected) & set(state)) if tuple(state[n].shape) != expected[n]]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} parameter(s), e.g. {missing[:4]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected parameter(s), e.g. {unexpected[:4]}")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[:3]}")
        raise CheckpointError(
            f"{where}: the weights do not match the config (exits={model_config.exits}, layers="
            f"{model_config.num_layers}, hidden={model_config.hidden_size}, vocab={model_config.vocab_size}): "
            + "; ".join(parts) + ". The config.json and model.safetensors come from different models; "
            "re-export from the original checkpoint")


# -- training checkpoints --------------------------------------------------------------------------------

def write_model_files(ckpt_dir: str | os.PathLike, config: NviumConfig, full_state: dict[str, torch.Tensor],
                      sample: dict[str, torch.Tensor] | None) -> Path:
    """Writes config.json, model.safetensors and sample_check.safetensors into `ckpt_dir` (the trainer calls
    this on one rank with `gather_full_state_dict`'s result).

    A new directory is built as `<ckpt_dir>.tmp-<pid>` and renamed into place; into an existing directory
    (e.g. one DeepSpeed already wrote its `deepspeed/` state into) each file is replaced atomically.
    Does not touch `latest`: call `update_latest` once the whole checkpoint (DeepSpeed state too) is complete.
    """
    ckpt_dir = Path(ckpt_dir)
    if sample is not None:
        missing = [k for k in SAMPLE_KEYS if k not in sample]
        if missing:
            raise ValueError(f"sample is missing {missing}; it needs {list(SAMPLE_KEYS)}")
    if ckpt_dir.exists():
        target, final = ckpt_dir, None
    else:
        ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
        target, final = _tmp_name(ckpt_dir), ckpt_dir
        if target.exists():
            shutil.rmtree(target)
        target.mkdir()
    _save_safetensors(target / MODEL_FILE, full_state, {"format": "nvium-full-state"})
    if sample is not None:
        sample = {k: v.detach().float() if v.is_floating_point() else v.detach().long() for k, v in sample.items()}
        _save_safetensors(target / SAMPLE_FILE, sample)
    atomic_write_json(target / CONFIG_FILE, asdict(config))
    if final is not None:
        os.replace(target, final)
    return ckpt_dir


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/step_X -> the step directory to read."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / MODEL_FILE).is_file() or (path / CONFIG_FILE).is_file():
        return path
    for candidate in (path / "checkpoints", path):
        latest = candidate / LATEST_FILE
        if latest.is_file():
            name = latest.read_text().strip()
            if not name:
                raise CheckpointError(f"{latest} is empty; pass a step directory explicitly ({candidate}/step_XXXXXXXX)")
            step_dir = candidate / name
            if not step_dir.is_dir():
                raise CheckpointError(f"{latest} points at {name}, which does not exist under {candidate}")
            return step_dir
    steps = sorted(p.name for p in (path / "checkpoints").glob("step_*")) if (path / "checkpoints").is_dir() else []
    hint = f" (found {steps[-3:]}; pass one of them explicitly)" if steps else ""
    raise CheckpointError(
        f"{path} is not a checkpoint: expected RUN_DIR/checkpoints/latest, a checkpoints dir with `latest`, "
        f"or a step directory with {MODEL_FILE}{hint}")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; the checkpoint is incomplete")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt") from None


def read_checkpoint(path: str | os.PathLike, check_weights: bool = True
                    ) -> tuple[NviumConfig, dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict]:
    """-> (config, full_state, sample or None, trainer_state) of a training checkpoint (RUN_DIR resolves to latest)."""
    step_dir = resolve_checkpoint_dir(path)
    raw = _read_json(step_dir / CONFIG_FILE)
    try:
        config = config_from_dict(raw)
    except ConfigError as err:
        raise CheckpointError(f"{step_dir / CONFIG_FILE}: {err}") from None
    if not (step_dir / MODEL_FILE).is_file():
        raise CheckpointError(f"{step_dir} has no {MODEL_FILE}; the checkpoint is incomplete (use an earlier step)")
    state = _load_safetensors(step_dir / MODEL_FILE)
    if check_weights:
        check_state_matches(config.model, state, str(step_dir))
    sample = _load_safetensors(step_dir / SAMPLE_FILE) if (step_dir / SAMPLE_FILE).is_file() else None
    trainer_state = _read_json(step_dir / TRAINER_STATE_FILE) if (step_dir / TRAINER_STATE_FILE).is_file() else {}
    return config, state, sample, trainer_state


def find_tokenizer(config: NviumConfig, checkpoint_path: str | os.PathLike) -> Path | None:
    """The checkpoint's SentencePiece model: data.tokenizer_model (absolute, cwd- or run-dir-relative),
    else RUN_DIR/data/tokenizer.model. None when there is none."""
    step_dir = resolve_checkpoint_dir(checkpoint_path)
    run_dir = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent
    candidates = []
    if config.data.tokenizer_model:
        given = Path(config.data.tokenizer_model)
        candidates += [given, run_dir / given, run_dir / "data" / given.name]
    candidates.append(run_dir / "data" / TOKENIZER_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def write_resharded_checkpoint(output_run_dir: str | os.PathLike, config: NviumConfig,
                               full_state: dict[str, torch.Tensor], sample: dict[str, torch.Tensor] | None,
                               trainer_state: dict, tensor_parallel: int, pipeline_parallel: int) -> Path:
    """A training checkpoint for another TP/PP layout: OUTPUT/checkpoints/step_X/ (+ latest), no deepspeed/.

    The full state is layout independent, so resharding rewrites parallel.tensor_parallel/pipeline_parallel
    (validated against the model) and leaves the weights as they are; the trainer shards them at load time
    and starts fresh optimizer state because there is no DeepSpeed state for the new layout.
    """
    new = config_from_dict(asdict(config))
    new.parallel.tensor_parallel, new.parallel.pipeline_parallel = tensor_parallel, pipeline_parallel
    if pipeline_parallel > 1 and new.parallel.zero_stage > 1:
        new.parallel.zero_stage = 1
    try:
        new.validate()
    except ConfigError as err:
        raise CheckpointError(f"cannot reshard to --tp {tensor_parallel} --pp {pipeline_parallel}: {err}") from None
    state = dict(trainer_state)
    state["resharded_from"] = {"tensor_parallel": config.parallel.tensor_parallel,
                               "pipeline_parallel": config.parallel.pipeline_parallel}
    return write_weights_only_checkpoint(output_run_dir, new, full_state, sample, state)


def write_weights_only_checkpoint(run_dir: str | os.PathLike, config: NviumConfig, full_state: dict[str, torch.Tensor],
                                  sample: dict[str, torch.Tensor] | None, trainer_state: dict) -> Path:
    """RUN_DIR/checkpoints/step_X/ (+ latest) without DeepSpeed state: the trainer resumes these weights (and
    trainer_state's step, consumed samples and beta) with a fresh optimizer."""
    step = int(trainer_state.get("step", 0))
    checkpoints = Path(run_dir) / "checkpoints"
    step_dir = checkpoints / step_dir_name(step)
    if step_dir.exists():
        raise CheckpointError(f"{step_dir} already exists; choose an empty --output directory")
    write_model_files(step_dir, config, full_state, sample)
    atomic_write_json(step_dir / TRAINER_STATE_FILE, trainer_state)
    update_latest(checkpoints, step_dir.name)
    return step_dir


# -- exports ---------------------------------------------------------------------------------------------

@dataclass
class Export:
    model_config: ModelConfig
    state: dict[str, torch.Tensor]
    tokenizer_path: Path | None  # the SentencePiece model, or None
    tokenizer_type: str  # "sentencepiece", "bytes" (token id = byte value) or "none"
    metadata: dict = field(default_factory=dict)


def save_export(export_dir: str | os.PathLike, model_config: ModelConfig, full_state: dict[str, torch.Tensor],
                tokenizer_path: str | os.PathLike | None, metadata: dict | None = None) -> Path:
    """Writes EXPORT_DIR (config.json, model.safetensors, tokenizer.model) atomically (replaces an old export).

    `tokenizer_path`: a SentencePiece .model file, the string "bytes" (ids are byte values, vocab >= 256),
    or None (no tokenizer; generate with token ids).
    """
    export_dir = Path(export_dir)
    check_state_matches(model_config, full_state, "export")
    if tokenizer_path is None:
        tokenizer = {"type": "none"}
    elif str(tokenizer_path) == "bytes":
        if model_config.vocab_size < 256:
            raise ValueError(f"a byte tokenizer needs vocab_size >= 256, the model has {model_config.vocab_size}")
        tokenizer = {"type": "bytes"}
    else:
        if not Path(tokenizer_path).is_file():
            raise CheckpointError(f"tokenizer {tokenizer_path} does not exist; pass --tokenizer PATH or 'none'")
        tokenizer = {"type": "sentencepiece", "file": TOKENIZER_FILE}
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(export_dir)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _save_safetensors(tmp / MODEL_FILE, full_state, {"format": "nvium-full-state"})
    if tokenizer["type"] == "sentencepiece":
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
    atomic_write_json(tmp / CONFIG_FILE, {"format": EXPORT_FORMAT, "version": EXPORT_VERSION,
                                           "model": asdict(model_config), "tokenizer": tokenizer,
                                           "metadata": metadata or {}})
    if export_dir.exists():
        old = export_dir.with_name(f"{export_dir.name}.old-{os.getpid()}")
        os.replace(export_dir, old)
        os.replace(tmp, export_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, export_dir)
    return export_dir


def load_export(export_dir: str | os.PathLike, check_weights: bool = True) -> Export:
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise CheckpointError(f"export directory {export_dir} does not exist; create one with tools/export_checkpoint.py")
    raw = _read_json(export_dir / CONFIG_FILE)
    if raw.get("format") != EXPORT_FORMAT:
        hint = (" (this looks like a training checkpoint: export it with tools/export_checkpoint.py "
                f"--checkpoint {export_dir} --output EXPORT_DIR)") if "parallel" in raw else ""
        raise CheckpointError(f"{export_dir / CONFIG_FILE} is not an nvium export{hint}")
    if int(raw.get("version", 0)) > EXPORT_VERSION:
        raise CheckpointError(f"{export_dir} has export version {raw['version']}; this code reads <= {EXPORT_VERSION}")
    try:
        model_config = model_config_from_dict(raw["model"])
    except ConfigError as err:
        raise CheckpointError(f"{export_dir / CONFIG_FILE}: {err}") from None
    state = _load_safetensors(export_dir / MODEL_FILE)
    if check_weights:
        check_state_matches(model_config, state, str(export_dir))
    tokenizer = raw.get("tokenizer", {"type": "none"})
    tokenizer_path = None
    if tokenizer.get("type") == "sentencepiece":
        tokenizer_path = export_dir / tokenizer.get("file", TOKENIZER_FILE)
        if not tokenizer_path.is_file():
            raise CheckpointError(f"{export_dir} names a tokenizer file {tokenizer_path.name} that is missing")
    return Export(model_config, state, tokenizer_path, tokenizer.get("type", "none"), raw.get("metadata", {}))
