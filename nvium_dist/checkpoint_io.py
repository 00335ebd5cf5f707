"""On-disk formats: the layout-independent training checkpoint and the inference export.

Training checkpoint (written by every trainer rank for its own share, training/sharded_state.py; by
`write_model_files` for a weights-only checkpoint)::

    RUN_DIR/checkpoints/latest                   text: name of the newest complete step dir
    RUN_DIR/checkpoints/step_XXXXXXXX/
        config.json              the full NviumConfig (dataclasses.asdict; sections model/parallel/data/training)
        model.safetensors        FULL weights, names of NviumModel.named_parameters() at TP=1, vocab rows unpadded
        sample_check.safetensors tokens/labels [2, s] int64, log_p_heads [2, s, K], log_p_mix [2, s] (fp32)
        optimizer.safetensors    Adam moments per full parameter (`exp_avg.<name>`, `exp_avg_sq.<name>`; step in
                                 the metadata), so a resume in another layout keeps the optimizer
        trainer_state.json       step, consumed_samples, beta, lineage, ...
        deepspeed/               DeepSpeed's own layout-specific state (never read here)
        manifest.json            relative path, size and sha256 of every other file; written last

Export (`save_export`)::

    EXPORT_DIR/config.json       {"format": "nvium-export", "version": 1, "model": {...}, "tokenizer": {...}, ...}
    EXPORT_DIR/model.safetensors the same full weights
    EXPORT_DIR/tokenizer.model   the SentencePiece model (when there is one)

Everything is read without unpickling (safetensors + json). A step directory is trusted only as far as its
manifest: `verify_manifest` refuses a directory with a file the manifest does not list (a planted file), a
missing file, or one whose size or sha256 differs. Every write goes to `<target>.tmp-<pid>` first
and is moved into place with `os.replace`, so a reader never sees a half-written file or directory.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nvium_dist.config import ConfigError, ModelConfig, NviumConfig, _build, model_config_from_dict
from nvium_dist.data.tokenizer import file_sha256
from nvium_dist.output_dir import same_or_inside, building, check_output_dir, install_dir, write_marker

EXPORT_FORMAT = "nvium-export"
EXPORT_VERSION = 1
MODEL_FILE = "model.safetensors"
SAMPLE_FILE = "sample_check.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "nvium-checkpoint-manifest"
CONFIG_FILE = "config.json"
TRAINER_STATE_FILE = "trainer_state.json"
TOKENIZER_FILE = "tokenizer.model"
LATEST_FILE = "latest"
SAMPLE_KEYS = ("tokens", "labels", "log_p_heads", "log_p_mix")
MODEL_METADATA = {"format": "nvium-full-state"}


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


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = _tmp_name(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600; colleagues on a shared file system read the weights too
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


def load_tensors(path: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, or only `names` (read without loading the rest)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    header = check_safetensors(path)
    missing = sorted(set(names or ()) - set(header))
    if missing:
        raise CheckpointError(f"{path} has no tensor(s) {missing[:5]}; it is not the checkpoint of this model")
    try:
        if names is None:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in names}
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
    check_shapes_match(model_config, {name: tuple(t.shape) for name, t in state.items()}, where)


def check_shapes_match(model_config: ModelConfig, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """check_state_matches on parameter shapes alone (e.g. a safetensors header)."""
    expected = expected_parameter_shapes(model_config)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{n}: file {shapes[n]} vs config {expected[n]}"
             for n in sorted(set(expected) & set(shapes)) if shapes[n] != expected[n]]
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


USABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_weights_usable(state: dict[str, torch.Tensor], where: str) -> None:
    """Raises CheckpointError on weights that cannot serve: a non-float dtype, or NaN / infinite values."""
    for name, tensor in state.items():
        if tensor.dtype not in USABLE_DTYPES:
            raise CheckpointError(f"{where}: {name} has dtype {tensor.dtype}; weights must be float32, bfloat16 "
                                  "or float16. The file was not written by nvium; re-export from the checkpoint")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{where}: {name} holds NaN or infinite values; the training run diverged "
                                  "before this checkpoint. Use an earlier checkpoint")


# -- manifests -------------------------------------------------------------------------------------------

def list_files(step_dir: Path) -> list[str]:
    """Every file under `step_dir` (relative, sorted) except the manifest; a symlink is an error."""
    found = []
    for path in sorted(step_dir.rglob("*")):
        if path.is_symlink():
            raise CheckpointError(f"{path} is a symbolic link; a checkpoint holds plain files only")
        if path.is_file() and path != step_dir / MANIFEST_FILE:
            found.append(path.relative_to(step_dir).as_posix())
    return found


def file_record(step_dir: Path, relative: str) -> dict:
    path = step_dir / relative
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def write_manifest(step_dir: str | os.PathLike, records: dict[str, dict] | None = None) -> None:
    """Writes manifest.json into `step_dir`: over exactly the files of `records` (relative path -> size and
    sha256: what the writers reported, never a directory listing, which on a shared file system can miss
    what another node just wrote), or, without `records`, over every file this process finds there."""
    step_dir = Path(step_dir)
    if records is None:
        records = {relative: file_record(step_dir, relative) for relative in list_files(step_dir)}
    atomic_write_json(step_dir / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "version": 1,
                                                 "files": dict(sorted(records.items()))})


def verify_manifest(step_dir: str | os.PathLike, only: list[str] | None = None) -> None:
    """Raises CheckpointError unless every file of `step_dir` is in its manifest with the same size and
    sha256, and every file the manifest lists exists. `only`: check just these files (and no extra ones)."""
    step_dir = Path(step_dir)
    raw = read_json_object(step_dir / MANIFEST_FILE)
    if raw.get("format") != MANIFEST_FORMAT or not isinstance(raw.get("files"), dict):
        raise CheckpointError(f"{step_dir / MANIFEST_FILE} is not an nvium checkpoint manifest")
    listed = raw["files"]
    if only is None:
        planted = sorted(set(list_files(step_dir)) - set(listed))
        if planted:
            raise CheckpointError(f"{step_dir} holds file(s) its manifest does not list: {planted[:5]}; "
                                  "something other than the trainer wrote into it")
        names = sorted(listed)
    else:
        unlisted = [n for n in only if n not in listed and (step_dir / n).exists()]
        if unlisted:
            raise CheckpointError(f"{step_dir} holds file(s) its manifest does not list: {unlisted}; "
                                  "something other than the trainer wrote into it")
        names = [n for n in only if n in listed]
    for relative in names:
        path = step_dir / relative
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(f"{path} is listed in the manifest but missing (or not a plain file)")
        expected = listed[relative]
        size = path.stat().st_size
        if size != expected.get("size"):
            raise CheckpointError(f"{path} has {size} bytes, the manifest says {expected.get('size')}; "
                                  "the file was truncated or changed after the checkpoint was written")
        if file_sha256(path) != expected.get("sha256"):
            raise CheckpointError(f"{path} does not match the sha256 in the manifest; "
                                  "the file was corrupted or changed after the checkpoint was written")


# -- training checkpoints --------------------------------------------------------------------------------

def write_sample_check(ckpt_dir: str | os.PathLike, sample: dict[str, torch.Tensor]) -> None:
    missing = [k for k in SAMPLE_KEYS if k not in sample]
    if missing:
        raise ValueError(f"sample is missing {missing}; it needs {list(SAMPLE_KEYS)}")
    sample = {k: v.detach().float() if v.is_floating_point() else v.detach().long() for k, v in sample.items()}
    save_tensors(Path(ckpt_dir) / SAMPLE_FILE, sample)


def optimizer_metadata(step: int) -> dict[str, str]:
    """optimizer.safetensors' metadata: full fp32 Adam moments by `exp_avg.<name>` / `exp_avg_sq.<name>`."""
    return {"format": "nvium-adam-moments", "step": str(int(step))}


def optimizer_file_step(ckpt_dir: str | os.PathLike, model_config: ModelConfig) -> int | None:
    """The Adam step of optimizer.safetensors after checking from its header that it holds both moments of
    every parameter of this model (None when the checkpoint has none: saved before the first step). The
    moments themselves are read slice by slice by the ranks that need them (tp_layout.read_shards)."""
    path = Path(ckpt_dir) / OPTIMIZER_FILE
    if not path.is_file():
        return None
    header = check_safetensors(path)
    step = header.get("__metadata__", {}).get("step")
    found = {name: tuple(info.get("shape", ())) for name, info in header.items() if name != "__metadata__"}
    shapes = expected_parameter_shapes(model_config)
    expected = {f"{key}.{name}": shape for key in ("exp_avg", "exp_avg_sq") for name, shape in shapes.items()}
    wrong = sorted(k for k in expected if found.get(k) != expected[k])
    if step is None or not step.isdigit() or wrong or set(found) - set(expected):
        raise CheckpointError(f"{path} does not hold Adam moments for this model (step {step!r}; missing or "
                              f"misshapen: {wrong[:3]}); the file is corrupt or from another model")
    return int(step)


SAFETENSORS_ALIGNMENT = 8


def safetensors_layout(shapes: dict[str, tuple[int, ...]],
                       metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """The file a safetensors writer would make for fp32 tensors of `shapes` (in that order), laid out before
    any data exists: -> (the bytes before the data, each tensor's byte offset in the file). Ranks that each
    hold part of the data write it at these offsets into one file (training.sharded_state)."""
    entries, offset = {"__metadata__": metadata}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        entries[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % SAFETENSORS_ALIGNMENT)
    prefix = struct.pack("<Q", len(header)) + header
    return prefix, {name: len(prefix) + entries[name]["data_offsets"][0] for name in shapes}


def create_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> None:
    """Creates `path` at its final size with its header written and its data still zero."""
    prefix, _ = safetensors_layout(shapes, metadata)
    data = sum(4 * math.prod(shape) for shape in shapes.values())
    with open(path, "wb") as f:
        f.write(prefix)
        f.truncate(len(prefix) + data)


def write_model_files(ckpt_dir: str | os.PathLike, config: NviumConfig, full_state: dict[str, torch.Tensor],
                      sample: dict[str, torch.Tensor] | None) -> Path:
    """Writes config.json, model.safetensors and sample_check.safetensors into `ckpt_dir` (a weights-only
    checkpoint made from a full state dict in one process).

    A new directory is built as `<ckpt_dir>.tmp-<pid>` and renamed into place; into an existing directory
    (e.g. one DeepSpeed already wrote its `deepspeed/` state into) each file is replaced atomically.
    Does not touch `latest`: call `update_latest` once the whole checkpoint (DeepSpeed state too) is complete.
    """
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.exists():
        target, final = ckpt_dir, None
    else:
        ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
        target, final = _tmp_name(ckpt_dir), ckpt_dir
        if target.exists():
            shutil.rmtree(target)
        target.mkdir()
    save_tensors(target / MODEL_FILE, full_state, MODEL_METADATA)
    if sample is not None:
        write_sample_check(target, sample)
    atomic_write_json(target / CONFIG_FILE, asdict(config))
    if final is not None:
        os.replace(target, final)
    return ckpt_dir


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/step_X -> the step directory to read."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a file; pass RUN_DIR, RUN_DIR/checkpoints or a step "
                              "directory")
    if is_export_dir(path):
        raise CheckpointError(f"{path} is an export (what export_checkpoint.py writes), not a training checkpoint; "
                              "pass the run directory or one of its step directories")
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


def read_json_object(path: Path) -> dict:
    """The object in a JSON file (every config, trainer state and manifest file holds one); CheckpointError
    for a missing file, one that is not JSON (or not text), or JSON that is not an object."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; the checkpoint is incomplete")
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path} is not valid JSON ({err}); the file is corrupt") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, not an object; the file is corrupt")
    return raw


CHECKPOINT_FILES_READ = [CONFIG_FILE, MODEL_FILE, SAMPLE_FILE, TRAINER_STATE_FILE]


def read_checkpoint(path: str | os.PathLike, verified: bool = False, load_weights: bool = True
                    ) -> tuple[NviumConfig, dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None, dict]:
    """-> (config, full_state, sample or None, trainer_state) of a training checkpoint (RUN_DIR resolves to latest).

    The files read are checked against the step's manifest when it has one (`verified`: the caller already
    checked the whole directory). The weights must fit the config; `load_weights=False` checks that from the
    file's header and returns None for them."""
    step_dir = resolve_checkpoint_dir(path)
    if not verified and (step_dir / MANIFEST_FILE).is_file():
        verify_manifest(step_dir, only=CHECKPOINT_FILES_READ)
    raw = read_json_object(step_dir / CONFIG_FILE)
    try:
        config = config_from_dict(raw)
    except ConfigError as err:
        raise CheckpointError(f"{step_dir / CONFIG_FILE}: {err}") from None
    if not (step_dir / MODEL_FILE).is_file():
        raise CheckpointError(f"{step_dir} has no {MODEL_FILE}; the checkpoint is incomplete (use an earlier step)")
    if load_weights:
        state = load_tensors(step_dir / MODEL_FILE)
        check_state_matches(config.model, state, str(step_dir))
    else:
        state = None
        header = check_safetensors(step_dir / MODEL_FILE)
        check_shapes_match(config.model, {name: tuple(info.get("shape", ())) for name, info in header.items()
                                          if name != "__metadata__"}, str(step_dir))
    sample = load_tensors(step_dir / SAMPLE_FILE) if (step_dir / SAMPLE_FILE).is_file() else None
    trainer_state = read_json_object(step_dir / TRAINER_STATE_FILE) if (step_dir / TRAINER_STATE_FILE).is_file() else {}
    return config, state, sample, trainer_state


def run_dir_of(step_dir: Path) -> Path:
    """RUN_DIR of RUN_DIR/checkpoints/step_X (the step's parent for a step directory elsewhere)."""
    return step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent


def find_tokenizer(config: NviumConfig, checkpoint_path: str | os.PathLike) -> Path | None:
    """The checkpoint's SentencePiece model: data.tokenizer_model (absolute, cwd- or run-dir-relative),
    else RUN_DIR/data/tokenizer.model. None when there is none."""
    step_dir = resolve_checkpoint_dir(checkpoint_path)
    run_dir = run_dir_of(step_dir)
    candidates = []
    if config.data.tokenizer_model:
        given = Path(config.data.tokenizer_model)
        candidates += [given, run_dir / given, run_dir / "data" / given.name]
    candidates.append(run_dir / "data" / TOKENIZER_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def write_resharded_checkpoint(output_run_dir: str | os.PathLike, source_step_dir: str | os.PathLike,
                               config: NviumConfig, trainer_state: dict, tensor_parallel: int, pipeline_parallel: int,
                               check=None) -> Path:
    """A training checkpoint for another TP/PP layout: OUTPUT/checkpoints/step_X/ (+ latest), no deepspeed/.

    Weights and Adam moments are layout independent, so resharding copies model.safetensors and
    optimizer.safetensors and rewrites parallel.tensor_parallel/pipeline_parallel (validated against the
    model); the trainer shards both at load time. The step is built under a temporary name, `check(tmp)`
    runs on it, and only then is it renamed into place and `latest` written. `config` and `trainer_state` are
    the source's, as read_checkpoint returned them (which verified the files it reads against the manifest).
    """
    source = resolve_checkpoint_dir(source_step_dir)
    if (source / MANIFEST_FILE).is_file():  # read_checkpoint verified what it reads; this copies the moments too
        verify_manifest(source, only=[OPTIMIZER_FILE])
    output_run_dir = Path(output_run_dir)
    source_run = run_dir_of(source)
    check_outside_run(output_run_dir, source_run)
    checkpoints = output_run_dir / "checkpoints"
    if output_run_dir.exists() and not output_run_dir.is_dir():
        raise CheckpointError(f"--output {output_run_dir} is a file; choose a new directory for the resharded run")
    if checkpoints.exists():
        raise CheckpointError(f"{checkpoints} already exists: {output_run_dir} is another run's directory; "
                              "choose a new --output directory")
    new = config_from_dict(asdict(config))
    new.parallel.tensor_parallel, new.parallel.pipeline_parallel = tensor_parallel, pipeline_parallel
    if pipeline_parallel > 1 and new.parallel.zero_stage > 1:
        new.parallel.zero_stage = 1
    try:
        new.validate()
    except ConfigError as err:
        raise CheckpointError(f"cannot reshard to --tp {tensor_parallel} --pp {pipeline_parallel}: {err}") from None
    step_dir = checkpoints / step_dir_name(int(trainer_state.get("step", 0)))
    tmp = checkpoints / f".tmp_{step_dir.name}"
    tmp.mkdir(parents=True)
    try:
        for name in (MODEL_FILE, SAMPLE_FILE, OPTIMIZER_FILE):
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        atomic_write_json(tmp / CONFIG_FILE, asdict(new))
        state = dict(trainer_state)
        state["resharded_from"] = {"tensor_parallel": config.parallel.tensor_parallel,
                                   "pipeline_parallel": config.parallel.pipeline_parallel}
        atomic_write_json(tmp / TRAINER_STATE_FILE, state)
        write_manifest(tmp)
        if check is not None:
            check(tmp)
    except BaseException:
        shutil.rmtree(checkpoints)
        raise
    os.replace(tmp, step_dir)
    update_latest(checkpoints, step_dir.name)
    return step_dir


def write_weights_only_checkpoint(run_dir: str | os.PathLike, config: NviumConfig, full_state: dict[str, torch.Tensor],
                                  sample: dict[str, torch.Tensor] | None, trainer_state: dict) -> Path:
    """RUN_DIR/checkpoints/step_X/ (+ latest, + manifest) without DeepSpeed state: the trainer resumes these
    weights (and trainer_state's step, consumed samples and beta) with a fresh optimizer."""
    step = int(trainer_state.get("step", 0))
    checkpoints = Path(run_dir) / "checkpoints"
    step_dir = checkpoints / step_dir_name(step)
    if step_dir.exists():
        raise CheckpointError(f"{step_dir} already exists; choose an empty --output directory")
    write_model_files(step_dir, config, full_state, sample)
    atomic_write_json(step_dir / TRAINER_STATE_FILE, trainer_state)
    write_manifest(step_dir)
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


def check_outside_run(output: Path, run_dir: Path) -> None:
    """Raises unless writing `output` leaves `run_dir` alone: `output` is neither the run directory, nor
    anything that holds it, nor anything inside its checkpoints."""
    if same_or_inside(run_dir, output) or same_or_inside(output, run_dir / "checkpoints"):
        raise CheckpointError(f"--output {output} would replace or write into the checkpoint's run directory "
                              f"{run_dir}; choose another directory")


def is_export_dir(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG_FILE).read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_export_target(export_dir: Path, force: bool, protected: Path | None = None,
                        tool: str = "export_checkpoint.py", sources: tuple[Path, ...] = ()) -> None:
    """Raises unless `export_dir` may be written (nvium_dist.output_dir's rules: new, an empty directory or an
    earlier export of `tool`, apart from `sources`; an export of an older version only with `force`). Never
    `protected` (the source checkpoint's run directory), anything that holds it, or anything inside its
    checkpoints."""
    if protected is not None:
        check_outside_run(export_dir, protected)

    def older_export(path: Path) -> bool:  # an export of this tool from before exports carried a file list
        if not is_export_dir(path):
            return False
        metadata = read_json_object(path / CONFIG_FILE).get("metadata")
        converted_by = metadata.get("converted_by") if isinstance(metadata, dict) else None
        return converted_by == (tool if tool != "export_checkpoint.py" else None)

    check_output_dir(export_dir, tool, force, sources, older_output=older_export)


def save_export(export_dir: str | os.PathLike, model_config: ModelConfig, full_state: dict[str, torch.Tensor],
                tokenizer_path: str | os.PathLike | None, metadata: dict | None = None, check=None,
                force: bool = False, protected: str | os.PathLike | None = None, tool: str = "export_checkpoint.py",
                sources: tuple[Path, ...] = ()) -> Path:
    """Writes EXPORT_DIR (config.json, model.safetensors, tokenizer.model, nvium_conversion.json) atomically.

    `tokenizer_path`: a SentencePiece .model file, the string "bytes" (ids are byte values, vocab >= 256),
    or None (no tokenizer; generate with token ids). The export is built under a temporary name and
    `check(tmp_dir)` runs on it first; only when it passes does it replace EXPORT_DIR, which must be new,
    empty or an earlier export of `tool` (see `check_export_target`; `protected`: a run directory that is
    never touched; `sources`: inputs the export may not be, hold or sit inside).
    """
    export_dir = Path(export_dir)
    check_export_target(export_dir, force, Path(protected) if protected is not None else None, tool, sources)
    check_state_matches(model_config, full_state, "export")
    check_weights_usable(full_state, "export")
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
    with building(export_dir) as tmp:
        save_tensors(tmp / MODEL_FILE, full_state, MODEL_METADATA)
        if tokenizer["type"] == "sentencepiece":
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
        atomic_write_json(tmp / CONFIG_FILE, {"format": EXPORT_FORMAT, "version": EXPORT_VERSION,
                                               "model": asdict(model_config), "tokenizer": tokenizer,
                                               "metadata": metadata or {}})
        write_marker(tmp, tool)
        if check is not None:
            check(tmp)
    install_dir(tmp, export_dir)
    return export_dir


def read_export_config(export_dir: str | os.PathLike) -> dict:
    """EXPORT_DIR/config.json, after checking that EXPORT_DIR is an export (not a file, a training run
    directory or a transformers directory); cheap, so a tool can check its input before slow imports."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        what = "is a file, not an export directory" if export_dir.exists() else "does not exist"
        raise CheckpointError(f"export directory {export_dir} {what}; create one with tools/export_checkpoint.py")
    export_it = f"export it with tools/export_checkpoint.py --checkpoint {export_dir} --output EXPORT_DIR"
    if not (export_dir / CONFIG_FILE).exists():
        if (export_dir / "checkpoints").is_dir() or (export_dir / "latest").is_file():
            raise CheckpointError(f"{export_dir} is a training run directory, not an export: {export_it}")
        raise CheckpointError(f"{export_dir} is not an nvium export (it has no {CONFIG_FILE}); create one with "
                              "tools/export_checkpoint.py")
    raw = read_json_object(export_dir / CONFIG_FILE)
    if raw.get("format") != EXPORT_FORMAT:
        if "parallel" in raw:
            hint = f" (this looks like a training checkpoint: {export_it})"
        elif "architectures" in raw:
            hint = " (this looks like a transformers directory: convert it with tools/convert_from_hf.py)"
        else:
            hint = ""
        raise CheckpointError(f"{export_dir / CONFIG_FILE} is not an nvium export{hint}")
    return raw


def load_export(export_dir: str | os.PathLike, check_weights: bool = True) -> Export:
    export_dir = Path(export_dir)
    raw = read_export_config(export_dir)
    version, model, tokenizer = raw.get("version", 0), raw.get("model"), raw.get("tokenizer", {"type": "none"})
    if not isinstance(version, int) or not isinstance(model, dict) or not isinstance(tokenizer, dict):
        raise CheckpointError(f"{export_dir / CONFIG_FILE} is corrupt: version, model and tokenizer must be an "
                              "integer and two objects; re-export from the checkpoint")
    if version > EXPORT_VERSION:
        raise CheckpointError(f"{export_dir} has export version {version}; this code reads <= {EXPORT_VERSION}")
    try:
        model_config = model_config_from_dict(model)
    except ConfigError as err:
        raise CheckpointError(f"{export_dir / CONFIG_FILE}: {err}") from None
    state = load_tensors(export_dir / MODEL_FILE)
    if check_weights:
        check_state_matches(model_config, state, str(export_dir))
        check_weights_usable(state, str(export_dir))
    tokenizer_path = None
    if tokenizer.get("type") == "sentencepiece":
        name = tokenizer.get("file", TOKENIZER_FILE)
        if not isinstance(name, str) or Path(name).name != name:
            raise CheckpointError(f"{export_dir / CONFIG_FILE} names tokenizer file {name!r}; it must be a file name "
                                  "inside the export")
        tokenizer_path = export_dir / name
        if not tokenizer_path.is_file():
            raise CheckpointError(f"{export_dir} names a tokenizer file {tokenizer_path.name} that is missing")
    return Export(model_config, state, tokenizer_path, tokenizer.get("type", "none"), raw.get("metadata", {}))
