"""The pretraining loop: DeepSpeed engine (ZeRO 0-3) over the TP model, or DeepSpeed's pipeline engine
for PP > 1; the N-vium objective with router warmup and the beta controller; evaluation, metrics,
atomic checkpoints and exact resume."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from nvium_dist.config import ConfigError, NviumConfig
from nvium_dist.mixture import LossComponents, evaluation_sums, nvium_loss, router_warmup_steps
from nvium_dist.parallel import DeepSpeedMPU, ParallelInfo, all_reduce, check_rank_layout, init_distributed
from nvium_dist.training import checkpoint as ckpt
from nvium_dist.training.async_save import BackgroundSaver
from nvium_dist.training.beta_controller import BaselineUnavailable, BetaController
from nvium_dist.training.compile import compile_blocks_and_heads, compile_summary
from nvium_dist.training.fault import DivergedError, DivergenceGuard, all_finite
from nvium_dist.training.lean import make_lean
from nvium_dist.training.metrics import MetricsLogger
from nvium_dist.training.run_lock import RunDirLock
from nvium_dist.training.schedule import build_optimizer, lr_multiplier
from nvium_dist.training.watchdog import HangWatchdog

TOOLS = Path(__file__).resolve().parents[2] / "tools"
SAMPLE_ROWS = 2


def default_data_paths(data_dir: Path) -> dict[str, Path]:
    """{"train"/"valid": output prefix of preprocess_data.py, "tokenizer": SentencePiece model} under `data_dir`."""
    return {"train": data_dir / "shakespeare_train", "valid": data_dir / "shakespeare_valid",
            "tokenizer": data_dir / "tokenizer.model"}


def build_default_data(data_dir: Path, vocab_size: int, workers: int = 1, tokenizer_args: tuple = (),
                       env: dict | None = None, stdout=None) -> dict[str, Path]:
    """The bundled Shakespeare corpus -> SentencePiece model -> train/valid .bin/.idx under `data_dir`, through
    the CLIs, unless an earlier call finished (its READY marker). -> default_data_paths(data_dir)."""
    paths = default_data_paths(data_dir)
    done = data_dir / "READY"
    if done.is_file():
        return paths

    def tool(name, *args):
        subprocess.run([sys.executable, str(TOOLS / name), *map(str, args)], check=True, env=env, stdout=stdout)

    tool("build_default_corpus.py", "--output-dir", data_dir / "corpus")
    tool("train_tokenizer.py", "--input", data_dir / "corpus" / "train.jsonl", "--vocab-size", vocab_size,
         "--output-prefix", data_dir / "tokenizer", *tokenizer_args)
    for split in ("train", "valid"):
        tool("preprocess_data.py", "--input", data_dir / "corpus" / f"{split}.jsonl", "--json-keys", "text",
             "--tokenizer-model", paths["tokenizer"], "--output-prefix", paths[split], "--append-eod",
             "--workers", workers)
    done.write_text("ok\n")
    return paths


def prepare_default_data(config: NviumConfig, info: ParallelInfo) -> None:
    """An empty data.train_data means: the bundled Shakespeare corpus, tokenised under RUN_DIR/data."""
    data_dir = (Path(config.training.run_dir) / "data").resolve()
    if info.rank == 0 and not (data_dir / "READY").is_file():
        print(f"[data] building the default corpus, tokenizer and .bin/.idx under {data_dir}", flush=True)
        build_default_data(data_dir, config.model.vocab_size)
    dist.barrier()
    paths = default_data_paths(data_dir)
    config.data.train_data = [f"{paths['train']}_text_document"]
    config.data.valid_data = [f"{paths['valid']}_text_document"]
    config.data.tokenizer_model = str(paths["tokenizer"])


def check_data_config(config: NviumConfig) -> None:
    """Before any process starts talking: the data and its tokenizer go together, and the tokenizer's ids fit
    the model's vocabulary. Raises ConfigError, FileNotFoundError or ValueError (an unreadable tokenizer)."""
    from nvium_dist.data.tokenizer import SentencePieceTokenizer, check_vocab_fits

    data = config.data
    if not data.train_data:
        if data.tokenizer_model:  # the default corpus gets a tokenizer of its own at RUN_DIR/data/tokenizer.model
            raise ConfigError(f"data.tokenizer_model={data.tokenizer_model} but data.train_data is empty, so the "
                              "bundled default corpus would be used with a tokenizer of its own. Set data.train_data "
                              "(and valid_data) to data made with that tokenizer, or leave data.tokenizer_model empty")
        check_default_corpus_fits(config)
        return
    if not data.tokenizer_model:
        raise ConfigError("data.train_data is set but data.tokenizer_model is empty: name the SentencePiece model "
                          "the data was made with")
    tokenizer = SentencePieceTokenizer(data.tokenizer_model)
    try:
        check_vocab_fits(tokenizer.vocab_size, config.model.vocab_size, data.tokenizer_model)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_default_corpus_fits(config: NviumConfig) -> None:
    """The bundled Shakespeare corpus (1.8M tokens) is for the quickstart's model; a larger model with no
    data.train_data is almost surely a forgotten data path, and must opt in to train on it."""
    from nvium_dist.config import ModelConfig
    from nvium_dist.model_info import parameter_breakdown

    if config.data.allow_default_corpus:
        return
    parameters = parameter_breakdown(config.model)["total"]
    quickstart = parameter_breakdown(ModelConfig())["total"]
    if parameters > quickstart:
        raise ConfigError(f"data.train_data is empty, so this {parameters:,}-parameter model would train on the bundled "
                          f"Shakespeare corpus meant for the {quickstart:,}-parameter quickstart model. Set "
                          "data.train_data, data.valid_data and data.tokenizer_model to your corpus, or set "
                          "data.allow_default_corpus=true to train on the bundled one")


def peak_memory_mb() -> float:
    """Peak GPU memory allocated on CUDA; peak resident set size of this process on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Trainer:
    def __init__(self, config: NviumConfig):
        self.config = config
        check_data_config(config)
        hang_timeout = config.training.hang_timeout_s
        # the watchdog, which names the phase and dumps the stacks, speaks first; a collective's timeout is the backstop
        self.info = init_distributed(config.parallel, timeout_minutes=2 * hang_timeout / 60 if hang_timeout else 30)
        config.validate(world_size=self.info.world_size)
        check_rank_layout(self.info)
        self._init_deepspeed_comm()
        self.is_logger = self.info.rank == 0
        self.run_dir = Path(config.training.run_dir)
        t = config.training
        self.grad_accumulation = t.global_batch_size // (t.micro_batch_size * self.info.dp_size)
        self.warmup_steps = router_warmup_steps(t.train_iters, t.router_warmup_steps, t.router_warmup_fraction)
        self.controller = BetaController(t.beta_controller, beta=t.beta,
                                         max_lag=t.beta_controller.max_baseline_lag or t.eval_interval)
        self.pipelined = config.parallel.pipeline_parallel > 1
        self.is_last_stage = self.info.pp_rank == self.info.pp_size - 1
        self.step = 0
        self.consumed_samples = 0
        self.resumed_step: int | None = None
        self.good_checkpoint_step: int | None = None  # of the newest checkpoint this run wrote or resumed from
        self.lineage = ckpt.new_lineage()
        self._stop_reason: str | None = None
        self._launcher_pid: int | None = None
        self.guard = DivergenceGuard(t, self.info.rank)
        self.watchdog = HangWatchdog(t.hang_timeout_s, self.info.rank)
        self.last_eval_ce: float | None = None
        self._lower_stage_names: set[str] | None = None  # shared parameters a lower pipeline stage writes
        self._background: BackgroundSaver | None = None  # training.async_save's writer, made at the first save
        self._lock_run_dir()
        if self.is_logger:
            note = config.vocab_padding_note()
            if note:
                print(f"[config] {note}", flush=True)

    # -- setup --------------------------------------------------------------------------------------

    def _lock_run_dir(self) -> None:
        """Rank 0 holds RUN_DIR/.lock until the process ends; a second trainer on this run dir stops here."""
        self._lock = RunDirLock(self.run_dir)
        error = None
        if self.is_logger:
            try:
                self._lock.acquire()
            except Exception as err:  # noqa: BLE001 - every rank raises it below
                error = err
        ckpt.raise_rank0_error(error, "lock the run directory")

    def _init_deepspeed_comm(self) -> None:
        """DeepSpeed's communication layer over the process group torch.distributed already has."""
        import deepspeed

        parallel = self.config.parallel
        if parallel.device == "cpu" and not parallel.cpu_shm_allreduce:
            # gloo does the allreduce; skip the ~60 s JIT build of DeepSpeed's shared-memory op
            # (`deepspeed.comm.torch` as an attribute is the torch package, hence sys.modules)
            sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend=dist.get_backend())

    def _build_data(self):
        from nvium_dist.data.gpt_data import (SentencePieceTokenizer, build_gpt_datasets, check_vocab_fits,
                                              ensure_helpers)

        c = self.config
        if not c.data.train_data:
            prepare_default_data(c, self.info)
        tokenizer = SentencePieceTokenizer(c.data.tokenizer_model)
        check_vocab_fits(tokenizer.vocab_size, c.model.vocab_size, c.data.tokenizer_model)
        t = c.training
        # an evaluation reads eval_iters global batches, the same samples whatever the layout
        samples = (t.train_iters * t.global_batch_size, t.eval_iters * t.global_batch_size, 0)
        cache = c.data.cache_dir or str(self.run_dir / "data" / "cache")

        ensure_helpers()  # collective when megatron's C++ helpers must be compiled: every rank, before the build
        self._check_corpora(tokenizer, cache)

        def build():
            return build_gpt_datasets(c.data.train_data, c.data.split, c.model.seq_length, t.seed, samples, tokenizer,
                                      cache_dir=cache, valid_blend=c.data.valid_data or None, check_data=False)

        # rank 0 writes the index caches; the others read them
        if self.info.rank == 0:
            datasets = build()
        dist.barrier()
        if self.info.rank != 0:
            datasets = build()
        self.train_data, self.valid_data, _ = datasets
        if self.valid_data is None:
            raise ValueError("no validation data: give data.valid_data or a split with a validation share")

    def _check_corpora(self, tokenizer, cache: str) -> None:
        """Rank 0 alone checks every data set against the tokenizer (scanning the ids of those no summary vouches
        for, once per file: the result is kept under the cache dir); every rank learns the outcome."""
        from nvium_dist.data.gpt_data import check_corpora, parse_blend

        data = self.config.data
        prefixes = parse_blend(data.train_data)[0] + (parse_blend(data.valid_data)[0] if data.valid_data else [])
        error = None
        if self.is_logger:
            try:
                for note in check_corpora(prefixes, tokenizer, cache):
                    print(f"[data] {note}", flush=True)
            except (OSError, ValueError) as err:  # every rank raises it below
                error = err
        ckpt.raise_rank0_error(error, "check the training data")

    def _build_model(self, resume: dict | None):
        from nvium_dist.checkpoint_io import MODEL_FILE
        from nvium_dist.model import NviumModel
        from nvium_dist.tp_layout import load_named_from_file

        c, t = self.config, self.config.training
        if self.pipelined:
            from nvium_dist.training.pipeline import PipelineLoss, build_pipeline_module

            self.pipeline_loss = PipelineLoss(c.model, self.info.device, aux_head_loss=t.aux_head_loss,
                                              loss_hook=self.guard.poison)
            model = build_pipeline_module(c.model, self.info, t.seed, self.pipeline_loss,
                                          t.activation_checkpointing, t.loss_chunk_tokens)
        else:
            model = NviumModel(c.model, tensor_parallel=c.parallel.tensor_parallel, seed=t.seed,
                               activation_checkpointing=t.activation_checkpointing,
                               loss_chunk_tokens=t.loss_chunk_tokens)
        if t.compile:
            compile_blocks_and_heads(model)
        if resume is not None and not resume["same_layout"]:
            load_named_from_file(*self._named_parameters(model), resume["path"] / MODEL_FILE, self.info.tp_rank,
                                 self.info.tp_size, c.model.vocab_size)
        return model.to(self.info.device)

    def _named_parameters(self, module) -> tuple[dict, dict]:
        """(parameters by NviumModel name, their TP split dims) of this rank's module or pipeline stage."""
        from nvium_dist.tp_layout import partition_dims

        if self.pipelined:
            from nvium_dist.training.pipeline import pipeline_named_parameters

            return pipeline_named_parameters(module)
        return dict(module.named_parameters()), partition_dims(module)

    def _deepspeed_config(self) -> dict:
        from nvium_dist.training.engine_config import deepspeed_config

        return deepspeed_config(self.config, self.grad_accumulation, self.info.world_size)

    def _build_engine(self, model, lr_offset: int):
        import deepspeed

        t, p = self.config.training, self.config.parallel
        optimizer = build_optimizer(model, t, p.device, p.offload_optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s + lr_offset, t))
        # a PipelineModule brings its own topology, which DeepSpeed uses as mpu
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=self._deepspeed_config(),
                                               mpu=None if self.pipelined else DeepSpeedMPU())
        ckpt.install_checkpoint_engine(engine)
        self.guard.install(engine, self._loss_share)
        if p.is_lean(self.info.world_size):
            make_lean(engine)
        return engine

    def _resume_point(self) -> dict | None:
        found = ckpt.find_resume(self.run_dir, self.config, self.info.rank)
        if found is None:
            return None
        state = found["trainer_state"]
        found["same_layout"] = (state.get("layout") == ckpt.layout_key(self.config, self.info.world_size)
                                and (found["path"] / "deepspeed").is_dir())
        if not found["same_layout"]:
            if self.is_logger:
                ckpt.warn(f"{found['path']} was written with layout {state.get('layout')}; resuming from its "
                          "layout-independent weights and optimizer moments")
        return found

    def _load_optimizer_moments(self, path: Path) -> None:
        """After a layout change: the Adam moments and step from the checkpoint's optimizer.safetensors."""
        from nvium_dist.checkpoint_io import OPTIMIZER_FILE, optimizer_file_step
        from nvium_dist.training.optimizer_state import load_moments

        adam_step = optimizer_file_step(path, self.config.model)
        if adam_step is None:
            if self.is_logger:
                ckpt.warn(f"{path} has no optimizer moments; the optimizer starts fresh")
            return
        params, dims = self._named_parameters(self.engine.module)
        load_moments(self.engine, params, dims, path / OPTIMIZER_FILE, adam_step, self.info.tp_rank,
                     self.info.tp_size, self.config.model.vocab_size)

    def _restore_tied_weights(self, path: Path) -> None:
        """DeepSpeed's pipeline checkpoints hold one file per layer that is a module; a tied module called
        through a forward_fn (the shared output matrix) is in none of them and would come back with its
        initial weights. It comes from the checkpoint's full weights instead (its Adam state and, under
        ZeRO, its fp32 master are in DeepSpeed's optimizer files)."""
        from nvium_dist.checkpoint_io import MODEL_FILE
        from nvium_dist.tp_layout import load_named_from_file

        load_named_from_file(*self._tied_parameters(), path / MODEL_FILE, self.info.tp_rank, self.info.tp_size,
                             self.config.model.vocab_size)

    def _tied_parameters(self) -> tuple[dict, dict]:
        """(parameters by NviumModel name, TP split dims) of this pipeline stage's tied modules."""
        params, dims = self._named_parameters(self.engine.module)
        tied = {id(p) for module in self.engine.module.tied_modules.values() for p in module.parameters()}
        return {name: p for name, p in params.items() if id(p) in tied}, dims

    # -- one step -----------------------------------------------------------------------------------

    def _micro_batch(self, iterator):
        batch = next(iterator)
        if self.info.device.type == "cuda":  # from page-locked memory the copy runs without stalling the host
            return {k: v.pin_memory().to(self.info.device, non_blocking=True) for k, v in batch.items()}
        return {k: v.to(self.info.device) for k, v in batch.items()}

    def _pipeline_batches(self, iterator):
        """DeepSpeed's pipe engine reads (inputs for the first stage, labels for the last stage)."""
        while True:
            batch = self._micro_batch(iterator)
            yield (batch["tokens"], batch["labels"]), batch["loss_mask"]

    def _last_stage_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sums over the world what the last stage's TP-rank-0 processes hold (each DP replica once)."""
        if not (self.is_last_stage and self.info.tp_rank == 0):
            values = torch.zeros_like(values)
        return all_reduce(values)

    def _train_step_pipelined(self, iterator) -> dict:
        loss_fn = self.pipeline_loss
        loss_fn.beta, loss_fn.in_router_warmup = self.controller.beta, self.step < self.warmup_steps
        loss_fn.reset()
        self.engine.train_batch(data_iter=iterator)
        local = loss_fn.train_sums / max(1, loss_fn.micro_batches)
        totals = self._last_stage_sum(local) / self.info.dp_size
        return dict(zip(LossComponents.NAMES, totals.tolist()))

    def _loss_share(self) -> torch.Tensor:
        """This rank's part of the current step's mean loss; the parts of all ranks add up to it."""
        if self.pipelined:
            loss_fn = self.pipeline_loss
            if not (self.is_last_stage and self.info.tp_rank == 0):
                return torch.zeros((), dtype=torch.float64)
            return loss_fn.train_sums[0] / max(1, loss_fn.micro_batches) / self.info.dp_size
        return self._step_loss / (self.grad_accumulation * self.info.world_size)  # TP ranks hold the same loss

    def _train_step(self, iterator) -> dict:
        self.guard.batch = self.consumed_samples // self.config.training.global_batch_size + 1
        if self.pipelined:
            return self._train_step_pipelined(iterator)
        beta, in_warmup = self.controller.beta, self.step < self.warmup_steps
        totals = torch.zeros(len(LossComponents.NAMES), dtype=torch.float64, device=self.info.device)  # on device: no host read per micro-batch
        self._step_loss = totals[0]  # a view: the optimizer step's gate reads the loss so far
        for _ in range(self.grad_accumulation):
            batch = self._micro_batch(iterator)
            terms = self.engine(batch["tokens"], batch["labels"])
            losses = nvium_loss(terms, batch["loss_mask"], beta, in_warmup, self.config.training.aux_head_loss)
            losses.loss = self.guard.poison(losses.loss)
            self.engine.backward(losses.loss)
            totals += losses.logged()
            self.engine.step()
        totals /= self.grad_accumulation
        all_reduce(totals, group=self._dp_group())
        totals /= self.info.dp_size
        return dict(zip(LossComponents.NAMES, totals.tolist()))

    def _dp_group(self):
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()

    # -- evaluation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        from nvium_dist.data.gpt_data import batch_iterator

        c = self.config
        K = c.model.num_heads_total
        iterator = batch_iterator(self.valid_data, c.training.micro_batch_size, self.info.dp_rank,
                                  self.info.dp_size, consumed_samples=0, cycle=True)
        if self.pipelined:
            sums = self._evaluate_pipelined(iterator)
        else:
            sums = self._evaluate_local(iterator)
        tokens = sums[0].item()
        eval_ce = sums[1].item() / tokens
        depth = sums[2].item() / tokens
        return {"eval_ce": eval_ce, "eval_ppl": math.exp(min(eval_ce, 50.0)),
                "head_ce": (sums[3:3 + K] / tokens).tolist(), "exit_usage": (sums[3 + K:] / tokens).tolist(),
                "expected_depth": depth, "ideal_speedup": 1.0 / depth, "eval_tokens": int(tokens)}

    def _evaluate_pipelined(self, iterator) -> torch.Tensor:
        loss_fn = self.pipeline_loss
        loss_fn.reset()
        loss_fn.collect_eval = True
        batches = self._pipeline_batches(iterator)
        for _ in range(self.config.training.eval_iters):  # each call runs grad_accumulation micro-batches
            self.engine.eval_batch(batches)
        loss_fn.collect_eval = False
        self.engine.train()
        return self._last_stage_sum(loss_fn.eval_sums.clone())

    def _evaluate_local(self, iterator) -> torch.Tensor:
        K = self.config.model.num_heads_total
        self.engine.eval()
        sums = torch.zeros(3 + 2 * K, dtype=torch.float64)  # tokens, nll, depth, head nll x K, pi x K
        for _ in range(self.config.training.eval_iters * self.grad_accumulation):
            batch = self._micro_batch(iterator)
            sums += evaluation_sums(self.engine(batch["tokens"], batch["labels"]), batch["loss_mask"])
        self.engine.train()
        return all_reduce(sums, group=self._dp_group())

    # -- checkpoint pieces ------------------------------------------------------------------------------

    def _write_layout_independent_files(self, directory: Path, host_copy=None):
        """Collective. model.safetensors and optimizer.safetensors get every rank's own share of the fp32 master
        weights (not the bf16 module weights) and Adam moments, written at its offsets, nothing gathered
        (training/sharded_state.py); the sample check comes from the rank that computed it. -> this rank's
        sharded_state.ShareWriter (see checkpoint.save_checkpoint)."""
        from nvium_dist.checkpoint_io import SAMPLE_FILE, write_sample_check
        from nvium_dist.training import sharded_state

        params, dims = self._named_parameters(self.engine.module)
        if self.pipelined and self._lower_stage_names is None:
            self._lower_stage_names = sharded_state.lower_stage_names(list(self._tied_parameters()[0]),
                                                                      self.info.pp_rank)
        share = sharded_state.save_files(directory, self.engine, self.config, params, dims, self.info,
                                         self._lower_stage_names or set(), host_copy)
        sample = self._sample_check()
        if sample is not None:
            share.add(SAMPLE_FILE, lambda: write_sample_check(directory, sample))
        return share

    @torch.no_grad()
    def _sample_check(self):
        """The live model's outputs on a fixed validation sample, for export to verify its weights against."""
        from nvium_dist.data.gpt_data import batch_iterator

        rows = min(SAMPLE_ROWS, self.config.training.micro_batch_size)
        batch = self._micro_batch(batch_iterator(self.valid_data, self.config.training.micro_batch_size, 0, 1, 0))
        if self.pipelined:
            return self._sample_check_pipelined(batch)
        tokens, labels = batch["tokens"][:rows], batch["labels"][:rows]
        self.engine.eval()
        terms = self.engine(tokens, labels)
        self.engine.train()
        if self.info.rank != 0:
            return None
        return {"tokens": tokens.cpu(), "labels": labels.cpu(), "log_p_heads": terms.log_p_heads.float().cpu(),
                "log_p_mix": terms.log_p_mix.float().cpu()}

    def _sample_check_pipelined(self, batch):
        """The whole micro-batch goes through the pipe engine once; the last stage's first rank returns the
        terms (None elsewhere)."""
        from nvium_dist.mixture import mixture_terms

        model = self.config.model
        batches = iter([((batch["tokens"], batch["labels"]), batch["loss_mask"])] * self.grad_accumulation)
        _, outputs = self.engine.eval_batch(batches, return_logits=True)
        self.engine.train()
        if not (self.is_last_stage and self.info.tp_rank == 0 and self.info.dp_rank == 0):
            return None
        _, _, log_p_heads, *routers = outputs
        terms = mixture_terms(log_p_heads, routers[0] if routers else None, model.exit_layers, model.num_layers)
        return {"tokens": batch["tokens"].cpu(), "labels": batch["labels"].cpu(),
                "log_p_heads": terms.log_p_heads.float().cpu(), "log_p_mix": terms.log_p_mix.float().cpu()}

    def _model_is_good(self) -> bool:
        """Collective: finite weights on every rank (ZeRO-3: each rank's partition) and a finite last evaluation."""
        params = [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()]
        bad = torch.tensor([0.0 if all_finite(params) else 1.0])
        finite_eval = self.last_eval_ce is None or math.isfinite(self.last_eval_ce)
        return finite_eval and not all_reduce(bad, op=dist.ReduceOp.MAX).item()

    def save(self) -> Path | None:
        """Collective. A model with non-finite weights or evaluation is not saved: it would become `latest` and
        prune good checkpoints. -> the checkpoint, or None."""
        self.watchdog.beat("save", self.step)
        if not self._model_is_good():
            self.guard.report(f"step {self.step}: the model is not finite (weights or last evaluation ce "
                              f"{self.last_eval_ce}); no checkpoint written")
            return None
        state = {"consumed_samples": self.consumed_samples, "controller": self.controller.state(),
                 "router_warmup_steps": self.warmup_steps, "lineage": self.lineage,
                 "last_eval_ce": self.last_eval_ce, **self.guard.state()}
        if self.config.training.async_save and self._background is None:
            self._background = BackgroundSaver()
        started = time.perf_counter()
        path = ckpt.save_checkpoint(self.engine, self.config, self.step, state, self._write_layout_independent_files,
                                    self.info.rank, self.info.world_size, self._background)
        seconds = time.perf_counter() - started
        self.good_checkpoint_step = self.step
        if self._background is None:  # slurm/pretrain.sbatch reads the seconds from this line to time its signal
            self.metrics.message(f"[checkpoint] step {self.step} -> {path} ({seconds:.1f} s)")
        else:
            self.metrics.message(f"[checkpoint] step {self.step} -> {path} (blocked training {seconds:.2f} s; "
                                 "writing in the background)")
        return path

    # -- signals ----------------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        """SIGTERM, SIGUSR1 (Slurm's warning) and SIGINT (Ctrl-C) all finish the step, checkpoint and stop.
        Under torchrun a worker whose launcher died (its parent changed) does the same rather than train on
        unsupervised."""
        def request_stop(signum, _frame):
            self._stop_reason = f"{signal.Signals(signum).name} received"

        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, request_stop)
        if "TORCHELASTIC_RUN_ID" in os.environ:
            self._launcher_pid = os.getppid()

    def _any_rank_stopping(self) -> bool:
        """Collective, once a step: whether any rank was told to stop. A background save that failed on any
        rank raises here on every rank (each rank's writer raised the same error at the save's agreement), so
        the run ends within a step rather than at the next save."""
        if self._launcher_pid is not None and os.getppid() != self._launcher_pid:
            self._stop_reason = f"the launcher (pid {self._launcher_pid}) died"
        failed = self._background is not None and self._background.failed
        flags = torch.tensor([1.0 if self._stop_reason else 0.0, 1.0 if failed else 0.0])
        stop, failed = all_reduce(flags, op=dist.ReduceOp.MAX).tolist()
        if failed:
            self._background.wait()
        return bool(stop)

    # -- the loop ---------------------------------------------------------------------------------------

    def train(self) -> int:
        try:
            return self._train()
        finally:
            if self._background is not None:  # the end of training, a preemption or an error: the save completes
                self._background.wait()

    def _train(self) -> int:
        c, t = self.config, self.config.training
        self._install_signal_handlers()
        self._build_data()
        resume = self._resume_point()
        if resume is not None:
            self.step = self.resumed_step = self.good_checkpoint_step = int(resume["trainer_state"]["step"])
            self.lineage = resume["trainer_state"].get("lineage", self.lineage)
            self.guard.load_state(resume["trainer_state"])
        model = self._build_model(resume)
        self.engine = self._build_engine(model, lr_offset=self.step if resume and not resume["same_layout"] else 0)
        if resume is not None:
            self._load_checkpoint(resume)
        self.metrics = MetricsLogger(c, self.step, enabled=self.is_logger)
        self._announce(model, resume)
        if self.step >= t.train_iters:
            self.metrics.message(f"[train] already at step {self.step} of {t.train_iters}; nothing to do")
            self.metrics.close()
            return 0
        try:
            with self.watchdog.peers_watched():
                self._train_loop()
        finally:
            self.watchdog.stop()
            summary = self.guard.summary()
            if summary:
                self.guard.report(summary)
            self.metrics.close()
        return 0

    def _train_iterator(self):
        from nvium_dist.data.gpt_data import batch_iterator

        t = self.config.training
        iterator = batch_iterator(self.train_data, t.micro_batch_size, self.info.dp_rank, self.info.dp_size,
                                  consumed_samples=self.consumed_samples)
        return self._pipeline_batches(iterator) if self.pipelined else iterator

    def _train_loop(self) -> None:
        c, t = self.config, self.config.training
        iterator = self._train_iterator()
        tokens_per_step = t.global_batch_size * c.model.seq_length
        last_saved, save_due = self.step, False
        while self.step < t.train_iters:
            self.watchdog.beat("step", self.step + 1)
            started, cpu_started = time.perf_counter(), time.process_time()
            lr = self.engine.get_lr()[0]
            losses = self._train_step(iterator)
            self.step += 1
            self.guard.poison_weights(self.engine, self.step)
            self.consumed_samples += t.global_batch_size
            elapsed, cpu_elapsed = time.perf_counter() - started, time.process_time() - cpu_started
            if t.compile and self.step == (self.resumed_step or 0) + 1:
                compiled = compile_summary()
                self.metrics.message(f"[compile] first step {elapsed:.1f} s, of which {compiled['seconds']} s compiling "
                                     f"{compiled['graphs']} graphs")
            verdict, roll_back = self.guard.verdict, self.guard.after_step(self.step)
            if verdict.skipped or self.step % t.log_interval == 0 or self.step == t.train_iters:
                grad_norm = self.engine.get_global_grad_norm()
                record = {"step": self.step, **losses, "lr": lr, "beta": self.controller.beta,
                          "tokens_per_s": tokens_per_step / elapsed, "step_cpu_s": cpu_elapsed,
                          "consumed_samples": self.consumed_samples,
                          "grad_norm": float(grad_norm) if grad_norm is not None else None,
                          "router_warmup": self.step <= self.warmup_steps, "peak_memory_mb": peak_memory_mb(),
                          "skipped": verdict.skipped, "skipped_steps": self.guard.skipped_steps}
                if verdict.skipped:
                    record["skip_reason"] = verdict.reason
                if t.compile:  # a count that grows after the first step means recompilation
                    record["compiled_graphs"] = compile_summary()["graphs"]
                self.metrics.log(record)
                self.metrics.progress(self.step, {"loss": f"{losses['loss']:.4f}", "lr": f"{lr:.2e}",
                                                  "tok/s": f"{record['tokens_per_s']:.0f}"})
            if roll_back:
                self._roll_back()
                iterator = self._train_iterator()
                last_saved, save_due = self.step, False
                continue
            if self.step % t.eval_interval == 0 or self.step == t.train_iters:
                self.watchdog.beat("eval", self.step)
                self._evaluate_and_control()
            stopping = self._any_rank_stopping()
            save_due = save_due or self.step % t.save_interval == 0
            # a periodic save waits out a run of skipped steps: it could become the target of a rollback
            if stopping or self.step == t.train_iters or (save_due and not self.guard.consecutive_skips):
                saved = self.save()
                last_saved, save_due = self.step, False
            if stopping:
                self.metrics.message(f"[train] stopping early: {self._stop_reason or 'another rank was told to stop'}")
                self.metrics.message(self._preemption_line(saved))
                break
        if last_saved != self.step:
            self.save()

    def _preemption_line(self, saved: Path | None) -> str:
        """What a stop says about its checkpoint; slurm/pretrain.sbatch requeues on the "preempted: " prefix of
        either line (a refused save still restarts, from the newest good checkpoint)."""
        if saved is not None:
            return f"preempted: checkpoint saved at step {self.step}"
        resumes = (f"resumes from step {self.good_checkpoint_step}" if self.good_checkpoint_step is not None
                   else "starts from step 0 (this run has no good checkpoint)")
        return (f"preempted: no checkpoint written at step {self.step} (non-finite weights or evaluation); "
                f"the restart {resumes}")

    def _load_checkpoint(self, found: dict) -> None:
        """The chosen checkpoint (`_resume_point`'s answer) into the live engine and the trainer's counters."""
        if found["same_layout"]:
            ckpt.load_deepspeed_state(self.engine, found["path"], self.info.rank)
            if self.pipelined:
                self._restore_tied_weights(found["path"])
        else:  # the engine made its masters from the (bf16) module weights: restore the checkpoint's fp32 ones
            ckpt.load_fp32_master_weights(*self._named_parameters(self.engine.module), found["path"],
                                          self.info.tp_rank, self.info.tp_size, self.config.model.vocab_size)
            self._load_optimizer_moments(found["path"])
        state = found["trainer_state"]
        self.step = int(state["step"])
        self.consumed_samples = int(state["consumed_samples"])
        self.controller.load_state(state["controller"])
        self.last_eval_ce = state.get("last_eval_ce")

    def _roll_back(self) -> None:
        """Back to the newest good checkpoint of this run, then past the next rollback_skip_batches batches."""
        t = self.config.training
        diverged_at = self.step
        self.guard.check_rollback_left(diverged_at)
        if self._background is not None:  # the newest checkpoint may still be in the writer's hands
            self._background.wait()
        found = self._resume_point()
        if found is None:
            raise DivergedError(f"training diverged at step {diverged_at} ({t.max_skipped_steps} steps in a row "
                                "skipped) and there is no good checkpoint to roll back to; lower training.lr or "
                                "save earlier (training.save_interval)")
        if not found["same_layout"]:
            raise DivergedError(f"training diverged at step {diverged_at}; the newest good checkpoint {found['path']} "
                                "has another layout and a rollback reloads only its own layout: restart the job, "
                                "which resumes from it")
        self.watchdog.beat("rollback", diverged_at)
        self._load_checkpoint(found)
        self.good_checkpoint_step = self.step
        self.guard.rolled_back()
        self.consumed_samples += t.rollback_skip_batches * t.global_batch_size
        self.guard.report(f"rollback {self.guard.rollbacks} of at most {t.max_rollbacks}: step {diverged_at} -> "
                          f"{found['path'].name} (step {self.step}), skipping the next {t.rollback_skip_batches} "
                          f"global batches; {self.guard.summary()}")
        self.metrics.log({"step": self.step, "rollback": self.guard.rollbacks, "diverged_at": diverged_at,
                          "skipped_batches": t.rollback_skip_batches, "consumed_samples": self.consumed_samples})

    def _evaluate_and_control(self) -> None:
        result = self.evaluate()
        self.last_eval_ce = result["eval_ce"]
        record = {"step": self.step, **result}
        control = self.config.training.beta_controller
        if self.config.model.exits and control.enabled:
            problem = self.controller.update_from_rank0(self.step, result["eval_ce"], self.info.rank)
            if problem is not None:
                if control.strict:
                    raise BaselineUnavailable(f"beta controller at step {self.step}: {problem} "
                                              "(training.beta_controller.strict is true)")
                record["beta_controller_warning"] = problem
                if self.is_logger:
                    print(f"[beta] WARNING step {self.step}: {problem}; beta stays at {self.controller.beta:.4f}",
                          file=sys.stderr, flush=True)
        record["beta"] = self.controller.beta
        self.metrics.log(record)
        self.metrics.message(
            f"[eval] step {self.step}: ce {result['eval_ce']:.4f} ppl {result['eval_ppl']:.2f} "
            f"depth {result['expected_depth']:.3f} exits {[round(u, 3) for u in result['exit_usage']]} "
            f"beta {self.controller.beta:.3f}")

    def _announce(self, model, resume) -> None:
        if not self.is_logger:
            return
        from nvium_dist.model_info import activation_memory, model_report, model_state_memory

        c, t, info = self.config, self.config.training, self.info
        report = model_report(c.model)
        zero_stage = c.parallel.engine_zero_stage(info.world_size)
        memory = model_state_memory(report["total_parameters"], report["largest_module_parameters"], zero_stage,
                                    info.world_size, 1, info.tp_size * info.pp_size, c.parallel.offload_optimizer)
        activations = activation_memory(
            c.model, t.micro_batch_size, tensor_parallel=info.tp_size, pipeline_parallel=info.pp_size,
            dtype_bytes=c.parallel.dtype_bytes, fused_norm=info.device.type == "cuda",
            activation_checkpointing=t.activation_checkpointing, loss_chunk_tokens=t.loss_chunk_tokens)
        where = f"resumed from {resume['path']} at step {self.step}" if resume else "fresh start"
        print(f"[setup] {report['total_parameters']:,} parameters {report['parameters_by_part']}\n"
              f"[setup] world {info.world_size} = TP {info.tp_size} x PP {info.pp_size} x DP {info.dp_size}, "
              f"ZeRO-{zero_stage}{' (lean single process)' if c.parallel.is_lean(info.world_size) else ''}, "
              f"grad accumulation {self.grad_accumulation}, device {info.device}, "
              f"{c.parallel.torch_dtype_name}, optimizer {type(self.engine.basic_optimizer).__name__}, gradient "
              f"reduction {str(self.engine.communication_data_type).removeprefix('torch.')}\n"
              f"[setup] memory estimate per GPU: model states {memory['per_gpu_gib']} GiB (DeepSpeed; CPU "
              f"{memory['cpu_gib']} GiB) + activations {activations['peak_gib']} GiB (activation checkpointing "
              f"{'on' if t.activation_checkpointing else 'off'}, loss chunk {t.loss_chunk_tokens or 'off'})\n"
              f"[setup] torch.compile {'on: blocks and heads compile in the first step' if t.compile else 'off'}\n"
              f"[setup] run dir {self.run_dir.resolve()} ({where})", flush=True)

