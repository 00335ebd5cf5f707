"""Typed configuration: model, parallelism, data and training, loaded from YAML with `--set a.b=v` overrides.

Validation happens here, before any process group or weight exists, so a bad config fails in
milliseconds with a message that says what to change.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which field and what to change."""


def quadrivium_exits(num_layers: int) -> list[int]:
    """The paper's "Quadrivium" (K=4): early exits after L/4, L/2 and 3L/4 layers, rounded down, except at L=6,
    where the paper's grid puts them after layers 1, 2 and 4. The one rule for configs, replication and imports."""
    if num_layers < 4:
        raise ConfigError(f"a Quadrivium needs at least 4 layers (3 early exits inside 1..L-1); got {num_layers}")
    if num_layers == 6:
        return [1, 2, 4]
    return [num_layers // 4, num_layers // 2, 3 * num_layers // 4]


POSITIVE = (lambda v: v > 0, "> 0")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
ADAM_BETA = (lambda v: 0 <= v < 1, "in [0, 1)")


def check_ranges(section: str, values, rules: dict[str, tuple]) -> None:
    """Raises ConfigError for the first field of `values` outside its rule (predicate, description)."""
    for name, (ok, what) in rules.items():
        value = getattr(values, name)
        if not ok(value):
            raise ConfigError(f"{section}.{name} must be {what}, got {value!r}")


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 6
    num_heads: int = 4
    ffn_hidden_size: int = 344
    # Early exits sit after these layer counts (1-based, strictly increasing, inside 1..L-1).
    # An empty list is the dense baseline: the final head only.
    exits: list[int] = field(default_factory=lambda: [1, 2, 4])
    seq_length: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6  # LLaMA's config, as the paper's code
    init_std: float = 0.02
    # Adapter W1 ~ N(0, adapter_init_std); 0 means 1/sqrt(hidden_size) (fan-in scaled, as the paper's code).
    adapter_init_std: float = 0.0
    # True: attention-output and MLP-down projections at init_std / sqrt(2 L) (GPT-2/Megatron style);
    # False: init_std like every other matrix (the paper's code).
    scaled_output_init: bool = False
    router_hidden_ratio: float = 0.66
    # Router MLP width; 0 derives it from router_hidden_ratio. The paper's grid lists it per width.
    router_hidden_width: int = 0
    # Megatron's make-vocab-size-divisible-by: the vocab is padded to a multiple of this times TP.
    make_vocab_size_divisible_by: int = 128

    @property
    def num_heads_total(self) -> int:
        return len(self.exits) + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def router_hidden_size(self) -> int:
        """router_hidden_width when set; else router_hidden_ratio x hidden rounded up to a multiple of 8, which
        gives the paper's grid (88, 176, 344, 512, 1016 for d = 128, 256, 512, 768, 1536) except at d1024,
        where the grid has 688 (the rule: 680), so its configs set the width explicitly."""
        return self.router_hidden_width or 8 * math.ceil(self.router_hidden_ratio * self.hidden_size / 8)

    @property
    def has_final_adapter(self) -> bool:
        """N-vium models put an adapter in front of the final head too; a dense model (no exits) is a
        plain LLaMA without one."""
        return bool(self.exits)

    @property
    def adapter_std(self) -> float:
        return self.adapter_init_std or 1.0 / math.sqrt(self.hidden_size)

    @property
    def exit_layers(self) -> list[int]:
        """Depth (in layers) at which each head reads the residual stream; the last is L."""
        return list(self.exits) + [self.num_layers]

    @property
    def segment_ranges(self) -> list[tuple[int, int]]:
        """Layer ranges [start, end) that each run before one head."""
        bounds = [0] + self.exit_layers
        return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "seq_length",
                    "rope_theta", "norm_eps", "init_std", "router_hidden_ratio", "make_vocab_size_divisible_by")
        check_ranges("model", self, {name: POSITIVE for name in positive} | {
            "adapter_init_std": NON_NEGATIVE, "router_hidden_width": NON_NEGATIVE})
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}; "
                f"choose num_heads among {[h for h in range(1, 65) if self.hidden_size % h == 0]}")
        if self.head_dim % 2:
            raise ConfigError(f"head dimension {self.head_dim} must be even for rotary embeddings")
        exits = list(self.exits)
        if any(b <= a for a, b in zip(exits, exits[1:])):
            raise ConfigError(f"model.exits={exits} must be strictly increasing")
        bad = [e for e in exits if not 1 <= e <= self.num_layers - 1]
        if bad:
            raise ConfigError(
                f"model.exits={exits}: exits {bad} are outside 1..{self.num_layers - 1} "
                f"(an exit after layer L is the final head, which always exists)")


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    device: str = "cpu"  # "cpu" (gloo, fp32) or "cuda" (nccl)
    dtype: str = "auto"  # "auto" = bf16 on cuda, fp32 on cpu; or "fp32" / "bf16"
    # DeepSpeed's shared-memory allreduce for CPU ranks on one node: JIT-compiled at first use (~60 s).
    cpu_shm_allreduce: bool = False
    # Dtype of the data-parallel gradient reduction. DeepSpeed's default is the model dtype (bf16 on GPU),
    # which rounds every summed gradient to 8 mantissa bits before the fp32 optimizer sees it.
    grad_reduce_dtype: str = "fp32"
    # ZeRO-2/3: reduce gradient buckets during backward instead of after it. Buckets are counted in
    # elements; with overlap DeepSpeed holds about 4.5 x (reduce + allgather) bucket bytes.
    overlap_comm: bool = True
    reduce_bucket_size: int = 25_000_000
    allgather_bucket_size: int = 25_000_000
    # One fp32 process has nothing to partition or reduce: run DeepSpeed at ZeRO-0 without its gradient
    # allreduce whatever zero_stage says (nvium_dist/training/lean.py). False keeps the configured stage.
    lean_single_process: bool = True

    def engine_zero_stage(self, world_size: int) -> int:
        """The ZeRO stage DeepSpeed runs with: 0 on the lean path, else zero_stage."""
        return 0 if self.is_lean(world_size) else self.zero_stage

    def is_lean(self, world_size: int) -> bool:
        """One process, fp32 (bf16 needs ZeRO's fp32 masters), no offload, and lean_single_process on."""
        return (self.lean_single_process and world_size == 1 and self.torch_dtype_name == "float32"
                and not (self.offload_optimizer or self.offload_params))

    @property
    def torch_dtype_name(self) -> str:
        if self.dtype == "auto":
            return "bfloat16" if self.device == "cuda" else "float32"
        return {"fp32": "float32", "bf16": "bfloat16"}[self.dtype]

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.torch_dtype_name == "bfloat16" else 4

    def validate(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"parallel.device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"parallel.dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        if self.grad_reduce_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"parallel.grad_reduce_dtype must be fp32 or bf16, got {self.grad_reduce_dtype!r}")
        check_ranges("parallel", self, {"reduce_bucket_size": POSITIVE, "allgather_bucket_size": POSITIVE})
        if self.tensor_parallel < 1 or self.pipeline_parallel < 1:
            raise ConfigError("parallel.tensor_parallel and parallel.pipeline_parallel must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.pipeline_parallel > 1 and self.zero_stage > 1:
            raise ConfigError(
                f"parallel.zero_stage={self.zero_stage} with pipeline_parallel={self.pipeline_parallel}: "
                "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only; set parallel.zero_stage=1")
        if (self.offload_optimizer or self.offload_params) and self.zero_stage == 0:
            raise ConfigError("CPU offload needs ZeRO: set parallel.zero_stage to 1, 2 or 3 (offload_params needs 3)")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("parallel.offload_params needs parallel.zero_stage=3")
        if self.torch_dtype_name == "bfloat16" and self.zero_stage == 0:
            raise ConfigError(
                "bf16 training needs parallel.zero_stage >= 1: DeepSpeed keeps fp32 master weights and accumulates "
                "gradients in fp32 only under ZeRO (stage 1 is its BF16 optimizer); set parallel.zero_stage=1")

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tensor_parallel * self.pipeline_parallel
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel = "
                f"{self.tensor_parallel} x {self.pipeline_parallel}; launch a multiple of {model_parallel} processes")
        return world_size // model_parallel


@dataclass
class DataConfig:
    # Megatron blend: ["PREFIX"] or ["0.3", "A", "0.7", "B"]. Empty: build the bundled default corpus.
    train_data: list[str] = field(default_factory=list)
    valid_data: list[str] = field(default_factory=list)
    split: str = "969,30,1"
    tokenizer_model: str = ""
    cache_dir: str = ""  # GPTDataset index cache; default RUN_DIR/data/cache
    # An empty train_data trains on the bundled Shakespeare corpus; for a model larger than the
    # quickstart's that is almost certainly a forgotten data path, so it must be asked for.
    allow_default_corpus: bool = False


@dataclass
class BetaControllerConfig:
    enabled: bool = False
    baseline_metrics: str = ""  # the dense run's metrics.jsonl (eval records)
    # the paper's 1.5B run (its only controlled run): k_up 8, k_down 4, max_step 100 (no cap), max weight 10
    dead_band: float = 0.005
    k_up: float = 8.0
    k_down: float = 4.0
    max_step: float = 100.0
    beta_min: float = 0.0
    beta_max: float = 10.0
    # The baseline's nearest evaluation may be at most this many steps away; 0 means eval_interval.
    max_baseline_lag: int = 0
    # true: a missing or stale baseline stops training with an error instead of a warning at each evaluation.
    strict: bool = False

    def validate(self) -> None:
        check_ranges("training.beta_controller", self,
                     {name: NON_NEGATIVE for name in ("dead_band", "k_up", "k_down", "max_step", "beta_min",
                                                      "max_baseline_lag")})
        if self.beta_max < self.beta_min:
            raise ConfigError(f"training.beta_controller.beta_max={self.beta_max} is below beta_min={self.beta_min}")


@dataclass
class TrainingConfig:
    run_dir: str = "runs/tiny"
    seed: int = 1234
    train_iters: int = 200
    micro_batch_size: int = 8
    global_batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    lr_schedule: str = "cosine"  # "cosine" or "wsd"
    warmup_fraction: float = 0.01
    decay_fraction: float = 0.1  # wsd: the final fraction of steps decays to min_lr
    # wsd's shape. "cosine": the paper's code (transformers' get_wsd_schedule defaults with min_lr_ratio: linear
    # warmup from min_lr_ratio x lr, cosine decay, step counts floored); "linear": warmup from ~0, linear decay.
    wsd_decay: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    beta: float = 0.15
    router_warmup_steps: int = 0  # the warmup lasts max(this, router_warmup_fraction * train_iters)
    router_warmup_fraction: float = 0.05
    # Opt-in remedy for routing collapse (not in the paper): adds this weight x the mean of the K heads'
    # own cross entropies to the loss, so every head keeps learning whatever routing mass it holds.
    aux_head_loss: float = 0.0
    log_interval: int = 10
    eval_interval: int = 100
    eval_iters: int = 10
    save_interval: int = 100
    keep_checkpoints: int = 3  # newest checkpoints of this run kept; 0 keeps all
    # When checkpoints exist but none verifies, start from step 0 instead of stopping with an error.
    allow_fresh_start: bool = False
    # A save blocks the step only while this rank's state is copied to host memory; writing, hashing and the
    # manifest run in a background thread (training/async_save.py). Costs host memory for that copy.
    async_save: bool = False
    # Memory for compute (neither changes a number): each transformer block keeps only its input and is
    # recomputed in backward; the vocab loss runs loss_chunk_tokens tokens at a time, recomputed in backward
    # (0: all tokens of a micro-batch at once, every head's logits kept until backward).
    activation_checkpointing: bool = False
    loss_chunk_tokens: int = 0
    # Divergence (nvium_dist/training/fault.py): a step whose loss or gradients are non-finite on any rank is
    # skipped on every rank. max_skipped_steps consecutive skips (0: never) roll back to the newest checkpoint
    # with finite weights and a finite last evaluation, and skip the next rollback_skip_batches global batches
    # past it; after max_rollbacks rollbacks the run stops (exit code nvium_dist.exit_codes.DIVERGED).
    max_skipped_steps: int = 10
    rollback_skip_batches: int = 100
    max_rollbacks: int = 3
    # Opt-in loss-spike guard: a step whose loss exceeds the mean + loss_spike_sigmas x std of the last
    # loss_spike_window accepted steps is skipped like a non-finite one (0: off).
    loss_spike_window: int = 0
    loss_spike_sigmas: float = 6.0
    # Hang watchdog (nvium_dist/training/watchdog.py): a step, save or evaluation that makes no progress for
    # this long dumps every thread's stack and exits (exit code nvium_dist.exit_codes.HUNG); collectives time
    # out at twice this (0: no watchdog, collectives time out after 30 minutes).
    hang_timeout_s: float = 1800.0
    # Test hook: on these global batches (1-based positions in the data order; equal to the step numbers until
    # a rollback skips data) the loss of rank inject_loss_rank is multiplied by inject_loss_scale (0: NaN).
    inject_loss_batches: list[int] = field(default_factory=list)
    inject_loss_rank: int = 0
    inject_loss_scale: float = 0.0
    # Test hook: after this step (0: never) rank inject_loss_rank's weights turn NaN, as a silent corruption would
    # leave them; every later step is skipped and no checkpoint of them is written.
    inject_nan_weights_step: int = 0
    # "auto": torch AdamW (fused on CUDA; DeepSpeedCPUAdam for an optimizer offloaded from CUDA);
    # "torch": torch AdamW everywhere; "deepspeed": DeepSpeed's FusedAdam on CUDA, DeepSpeedCPUAdam on CPU
    # (both JIT-compiled at first use).
    optimizer: str = "auto"
    # torch.compile each transformer block and head (nvium_dist/training/compile.py). Same losses within
    # float rounding; costs a compilation in the first step (about a minute per new shape on a 2-core CPU,
    # seconds from inductor's on-disk cache), so it is off by default (docs/performance.md has the numbers).
    compile: bool = False
    wandb_project: str = ""  # empty: wandb off; otherwise offline unless WANDB_MODE says otherwise
    tensorboard: bool = False
    beta_controller: BetaControllerConfig = field(default_factory=BetaControllerConfig)

    def validate(self) -> None:
        if self.lr_schedule not in ("cosine", "wsd"):
            raise ConfigError(f"training.lr_schedule must be 'cosine' or 'wsd', got {self.lr_schedule!r}")
        if self.wsd_decay not in ("cosine", "linear"):
            raise ConfigError(f"training.wsd_decay must be 'cosine' or 'linear', got {self.wsd_decay!r}")
        if self.optimizer not in ("auto", "torch", "deepspeed"):
            raise ConfigError(f"training.optimizer must be auto, torch or deepspeed, got {self.optimizer!r}")
        positive = ("train_iters", "micro_batch_size", "global_batch_size", "lr", "adam_eps", "log_interval",
                    "eval_interval", "eval_iters", "save_interval")
        check_ranges("training", self, {name: POSITIVE for name in positive} | {
            name: FRACTION for name in ("min_lr_ratio", "warmup_fraction", "decay_fraction", "router_warmup_fraction")
        } | {name: NON_NEGATIVE for name in ("weight_decay", "clip_grad", "beta", "router_warmup_steps", "aux_head_loss",
                                              "keep_checkpoints", "loss_chunk_tokens", "max_skipped_steps",
                                              "rollback_skip_batches", "max_rollbacks", "loss_spike_window",
                                              "hang_timeout_s", "inject_loss_rank",
                                              "inject_nan_weights_step")} | {
            "loss_spike_sigmas": POSITIVE,
            "inject_loss_batches": (lambda v: all(b >= 1 for b in v), "global batch numbers >= 1"),
            "adam_beta1": ADAM_BETA, "adam_beta2": ADAM_BETA,
            "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32) (numpy seeds the sample order with it)")})
        self.beta_controller.validate()


@dataclass
class NviumConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def validate(self, world_size: int | None = None) -> None:
        self.model.validate()
        self.parallel.validate()
        self.training.validate()
        tp, pp = self.parallel.tensor_parallel, self.parallel.pipeline_parallel
        if self.model.num_heads % tp:
            raise ConfigError(
                f"model.num_heads={self.model.num_heads} is not divisible by parallel.tensor_parallel={tp}")
        for name in ("ffn_hidden_size", "hidden_size"):
            if getattr(self.model, name) % tp:
                raise ConfigError(f"model.{name}={getattr(self.model, name)} is not divisible by tensor_parallel={tp}")
        if pp > self.model.num_layers:
            raise ConfigError(
                f"parallel.pipeline_parallel={pp} but the model has {self.model.num_layers} layers: "
                "each pipeline stage needs at least one transformer block")
        if world_size is not None:
            dp = self.parallel.data_parallel_size(world_size)
            per_step = self.training.micro_batch_size * dp
            if self.training.global_batch_size % per_step:
                raise ConfigError(
                    f"training.global_batch_size={self.training.global_batch_size} is not divisible by "
                    f"micro_batch_size x data_parallel = {self.training.micro_batch_size} x {dp}")
            injects = self.training.inject_loss_batches or self.training.inject_nan_weights_step
            if injects and self.training.inject_loss_rank >= world_size:
                raise ConfigError(f"training.inject_loss_rank={self.training.inject_loss_rank} is not a rank "
                                  f"of this world of {world_size}")
            if self.training.compile and dp > 1 and self.parallel.engine_zero_stage(world_size) == 3:
                raise ConfigError(
                    "training.compile with parallel.zero_stage=3 and data parallelism: ZeRO-3 partitions every weight "
                    "over the data-parallel ranks and gathers it in module hooks that torch.compile traces past. "
                    "Use zero_stage 1 or 2, or set training.compile=false")

    def vocab_padding_note(self) -> str | None:
        padded = self.model.padded_vocab_size(self.parallel.tensor_parallel)
        if padded == self.model.vocab_size:
            return None
        return (f"vocab {self.model.vocab_size} padded to {padded} (multiple of make_vocab_size_divisible_by="
                f"{self.model.make_vocab_size_divisible_by} x tensor_parallel={self.parallel.tensor_parallel}); "
                "padded logits are masked out of every softmax")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return _build(annotation, value, key)
    if origin is list:
        (item_type,) = get_args(annotation)
        if isinstance(value, str):
            value = _parse_yaml(value, key) if value.strip().startswith("[") else value.split(",") if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item_type, key) for v in value]
    if annotation is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation in (int, float, str):
        try:
            if annotation is not str and isinstance(value, bool):
                raise ValueError  # YAML's true/false would become 1/0
            if annotation is not str and isinstance(value, (dict, list)):
                raise ValueError
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            coerced = annotation(value)
            if annotation is float and not math.isfinite(coerced):
                raise ValueError
            return coerced
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key} must be {'a finite ' if annotation is float else ''}{annotation.__name__}, "
                              f"got {value!r}") from None
    return value


def _build(cls, values: dict[str, Any], prefix: str = ""):
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(f"unknown config key(s) {unknown} at {where}; valid keys: {sorted(names)}")
    kwargs = {name: _coerce(v, hints[name], f"{prefix}.{name}" if prefix else name) for name, v in values.items()}
    return cls(**kwargs)


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently, which
    can drop a whole section)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (each key may appear once per section)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, where: str) -> Any:
    """YAML -> Python, or a one-line ConfigError naming `where`, the line and the problem."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML{at}: {problem}") from None


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = _parse_yaml(raw, f"--set {assignment}") if raw != "" else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> NviumConfig:
    """Reads a YAML config (sections model/parallel/data/training), applies `a.b=value` overrides, validates."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {path} cannot be read as text ({err})") from None
        tree = _parse_yaml(text, str(path)) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for assignment in overrides or []:
        _apply_override(tree, assignment)
    config = _build(NviumConfig, tree)
    config.validate()
    return config


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    config = _build(ModelConfig, values, "model")
    config.validate()
    return config
