"""NviumGenerator: loads an export and samples from the N-vium mixture exactly.

mode="deferred": each token runs only up to its sampled exit; upper layers are completed later by
carrying queued tokens (nvium_dist.inference.engine). mode="full": every layer every step (the
full-depth baseline). Both draw the same tokens for the same seed: exit decisions and tokens come from
counter-based uniforms keyed by (seed, sequence, position, exit) (nvium_dist.inference.sampling).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nvium_dist.config import ModelConfig
from nvium_dist.inference.driver import Driver, ensure_process_group, load_decode_model  # noqa: F401 (re-export)
from nvium_dist.inference.engine import StageEngine, TickSchedule, use_decode_layout
from nvium_dist.inference.pipeline import run_pipeline, stage_segments
from nvium_dist.inference.sampling import SamplingTransform
from nvium_dist.mixture import log_mixture_distribution


class GenerationError(ValueError):
    """Bad generation input (empty or too long prompt, unknown token ids, unsupported option)."""


@dataclass
class GenerationOutput:
    prompts: list[list[int]]
    tokens: list[list[int]]  # generated tokens per sequence
    exits: list[list[int]]  # head index (0..K-1) per generated token; -1 = sampled from the full (transformed) p_mix
    mode: str
    seconds: float
    exit_layers: list[int]
    num_layers: int
    trace: list | None = None
    engine: StageEngine | None = field(default=None, repr=False)
    rows: list[int] | None = None  # the row (batch slot) each sequence was decoded in
    ticks: int = 0  # engine ticks (single process)
    stage_caches: list | None = field(default=None, repr=False)

    @property
    def sequences(self) -> list[list[int]]:
        return [p + t for p, t in zip(self.prompts, self.tokens)]

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else float("nan")

    def exit_histogram(self) -> list[int]:
        counts = [0] * len(self.exit_layers)
        for row in self.exits:
            for e in row:
                if e >= 0:
                    counts[e] += 1
        return counts

    def mean_exit_layer(self) -> float:
        """Mean depth in layers of the sampled exits (the ideal deferred speedup is num_layers / this)."""
        hist = self.exit_histogram()
        total = sum(hist)
        if total == 0:
            return float(self.num_layers)
        return sum(c * layer for c, layer in zip(hist, self.exit_layers)) / total


class Tokenizer:
    """Text <-> ids for an export: SentencePiece, bytes (id = byte value) or none (ids only)."""

    def __init__(self, kind: str, path: Path | None):
        self.kind, self.path = kind, path
        self._sp = None
        if kind == "sentencepiece":
            from nvium_dist.data.tokenizer import SentencePieceTokenizer

            self._sp = SentencePieceTokenizer(str(path))

    def encode(self, text: str) -> list[int]:
        if self.kind == "sentencepiece":
            return list(self._sp.encode(text))
        if self.kind == "bytes":
            return list(text.encode("utf-8"))
        raise GenerationError("this export has no tokenizer; pass token ids (e.g. generate.py --prompt-ids 1,2,3)")

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._sp.decode(ids)
        if self.kind == "bytes":
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return " ".join(map(str, ids))

    @property
    def eos_id(self) -> int | None:
        return self._sp.eos if self.kind == "sentencepiece" else None


class NviumGenerator:
    def __init__(self, model, tokenizer: Tokenizer, export_dir: str | None = None, device: str = "cpu"):
        """Takes over `model`, an inference copy: its weights get the decode layout (engine.use_decode_layout)."""
        self.model, self.tokenizer, self.export_dir, self.device = model, tokenizer, export_dir, device
        self.config: ModelConfig = model.config
        use_decode_layout(model)

    @classmethod
    def from_pretrained(cls, export_dir: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None
                        ) -> "NviumGenerator":
        """Loads EXPORT_DIR (config.json + model.safetensors + tokenizer)."""
        from nvium_dist.checkpoint_io import load_export

        export = load_export(export_dir)
        model = load_decode_model(export, device, dtype)
        return cls(model, Tokenizer(export.tokenizer_type, export.tokenizer_path), str(export_dir), device)

    # -- full forward ------------------------------------------------------------------------------------

    def _as_batch(self, token_ids) -> torch.Tensor:
        tokens = torch.as_tensor(token_ids, dtype=torch.long)
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.numel() == 0:
            raise GenerationError("empty token sequence")
        self._check_ids(tokens.flatten().tolist())
        if tokens.shape[1] > self.config.seq_length:
            raise GenerationError(f"{tokens.shape[1]} tokens exceed the model context seq_length="
                                  f"{self.config.seq_length}; evaluate shorter windows")
        return tokens.to(self.device)

    @torch.inference_mode()
    def head_outputs(self, token_ids, at: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Full forward: (per-head log-softmax [b, s, K, V], router logits [b, s, K-1, 2] or None); with `at`
        = (rows, positions) only those tokens' heads run: [n, K, V], [n, K-1, 2]."""
        tokens = self._as_batch(token_ids)
        log_heads, routers = [], []
        for k, hidden in self.model.head_inputs(tokens):
            if at is not None:
                hidden = hidden[at[0].to(hidden.device), at[1].to(hidden.device)]
            logits, router = self.model.head_logits(k, hidden)
            log_heads.append(torch.log_softmax(logits[..., :self.config.vocab_size].float(), -1))
            if router is not None:
                routers.append(router.float())
        return torch.stack(log_heads, -2), (torch.stack(routers, -2) if routers else None)

    def mixture_logprobs(self, token_ids, at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """log p_mix over the vocab after every position: [b, s, V] (or [s, V] for a 1-d input; [n, V] after
        the (rows, positions) `at`)."""
        squeeze = torch.as_tensor(token_ids).dim() == 1 and at is None
        log_heads, routers = self.head_outputs(token_ids, at)
        log_mix = log_mixture_distribution(log_heads, routers)
        return log_mix[0] if squeeze else log_mix

    # -- generation --------------------------------------------------------------------------------------

    def _check_ids(self, ids) -> None:
        bad = [i for i in ids if not 0 <= int(i) < self.config.vocab_size]
        if bad:
            raise GenerationError(f"token ids {bad[:5]} are outside the vocabulary 0..{self.config.vocab_size - 1}")

    def prepare_prompts(self, prompts, max_new_tokens) -> tuple[list[list[int]], list[int]]:
        """-> (token-id prompts, max new tokens per prompt), checked against the vocabulary and the context."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], str)):
            prompts = [prompts] if isinstance(prompts, str) else prompts
            prompts = [self.tokenizer.encode(p) for p in prompts]
        elif isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
        elif isinstance(prompts, list) and prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise GenerationError("no prompts given: pass a list of token-id lists (or strings)")
        prompts = [list(map(int, p)) for p in prompts]
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != len(prompts):
            raise GenerationError(f"max_new_tokens has {len(limits)} entries for {len(prompts)} prompts: "
                                  "give one number, or one per prompt")
        context = self.config.seq_length
        for i, (prompt, limit) in enumerate(zip(prompts, limits)):
            if limit < 0:
                raise GenerationError(f"max_new_tokens must be >= 0, got {limit}")
            if not prompt:
                raise GenerationError(f"prompt {i} is empty: decoding needs at least one token to condition on "
                                      "(start it with a BOS token or some text)")
            if len(prompt) > context:
                raise GenerationError(f"prompt {i} has {len(prompt)} tokens, longer than the model context "
                                      f"seq_length={context}; shorten it")
            if len(prompt) + limit > context:
                raise GenerationError(
                    f"prompt {i} ({len(prompt)} tokens) + max_new_tokens={limit} exceeds the model context "
                    f"seq_length={context}; use max_new_tokens <= {context - len(prompt)}")
            self._check_ids(prompt)
        return prompts, limits

    def generate(self, prompts, max_new_tokens: int | list[int], seed: int = 0, mode: str = "deferred",
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                 eos_id: int | None = None, pipeline_stages: int = 1, flush: bool = False, trace: bool = False,
                 sequence_ids: list[int] | None = None, on_step=None, max_batch: int | None = None,
                 schedule: TickSchedule | None = TickSchedule(), timer=None,
                 fixed_shape_calls: bool = False) -> GenerationOutput:
        """Exact ancestral sampling from p_mix (see the module docstring).

        prompts: token-id lists (or strings, encoded with the export's tokenizer), ragged lengths allowed.
        max_new_tokens: one limit for every prompt, or one per prompt.
        max_batch: rows decoded together (default: all prompts). With more prompts than rows, a prompt is
        admitted into a row as soon as the row's previous sequence finishes (continuous batching).
        Transforms (temperature != 1, top_k, top_p < 1, greedy) need mode="full": they transform the full
        p_mix, which no single head gives; mode="deferred" with a transform raises GenerationError.
        flush: complete every queued token (and the last sampled one) through all layers when a sequence
        ends, so its row's caches equal a full forward over the sequence.
        on_step(tick, {sequence: (token, exit)}) streams the tokens sampled in each engine tick (sequence =
        prompt index; rows advance independently, so a tick holds any subset of the sequences).
        schedule: when deferred tokens climb past the first exit (engine.TickSchedule); None completes every
        current token in each tick, like a lockstep batch. timer: profiler hook (nvium_dist.inference.profile).
        fixed_shape_calls: one sequence at a time (max_batch=1), single-token segment calls in fixed shapes,
        replayed as CUDA graphs on CUDA (nvium_dist.inference.graphs); equal to the default up to float rounding.
        """
        if mode not in ("deferred", "full"):
            raise GenerationError(f"mode must be 'deferred' or 'full', got {mode!r}")
        transform = SamplingTransform(temperature, top_k, top_p, greedy)
        if transform.is_identity:
            transform = None
        elif mode == "deferred":
            raise GenerationError(
                f"sampling transform ({transform.describe()}) requested with mode='deferred': a transformed "
                "distribution is a function of the full mixture p_mix, which needs every head's logits, so it "
                "cannot be sampled by stopping at one exit. Use mode='full' (computes all heads and transforms "
                "p_mix exactly) or plain sampling (temperature=1, no top-k/top-p) for deferred decoding")
        if max_batch is not None and max_batch < 1:
            raise GenerationError(f"max_batch must be >= 1, got {max_batch}")
        prompts, max_new_tokens = self.prepare_prompts(prompts, max_new_tokens)
        if sequence_ids is None:
            sequence_ids = list(range(len(prompts)))
        if len(sequence_ids) != len(prompts):
            raise GenerationError("sequence_ids needs one id per prompt")
        if eos_id is not None:
            self._check_ids([eos_id])
        rows = min(len(prompts), max_batch or len(prompts))
        if fixed_shape_calls and (rows != 1 or pipeline_stages != 1):
            raise GenerationError("fixed-shape calls (CUDA graphs) decode one sequence at a time in one process: "
                                  "use max_batch=1 and pipeline_stages=1")
        max_len = max(len(p) + n for p, n in zip(prompts, max_new_tokens))
        if pipeline_stages < 1:
            raise GenerationError(f"pipeline_stages must be >= 1, got {pipeline_stages}")
        if pipeline_stages > 1:
            if transform is not None:
                raise GenerationError("sampling transforms are single-process only; use pipeline_stages=1")
            try:
                stage_segments(self.config.num_heads_total, [b - a for a, b in self.config.segment_ranges],
                               pipeline_stages)
            except ValueError as err:
                raise GenerationError(str(err)) from None

            if self.export_dir is None:
                raise GenerationError("pipeline decoding loads the model in every stage: use from_pretrained(EXPORT_DIR)")
            result = run_pipeline(self.export_dir, pipeline_stages, prompts, max_new_tokens, seed, mode, eos_id,
                                  sequence_ids, flush, self.device, rows=rows, return_caches=flush)
            return GenerationOutput(prompts, result["tokens"], result["exits"], mode, result["seconds"],
                                    self.config.exit_layers, self.config.num_layers, rows=result["rows"],
                                    stage_caches=result.get("caches"))
        with torch.inference_mode():
            engine = StageEngine(self.model, range(self.config.num_heads_total), rows, max_len, seed,
                                 full_depth=mode == "full", transform=transform, schedule=schedule, trace=trace,
                                 timer=timer, fixed_shape_calls=fixed_shape_calls)
            start = time.perf_counter()
            driver = Driver(engine, self.model, prompts, sequence_ids, max_new_tokens, eos_id, flush, on_step)
            driver.run(lambda: engine.tick().results)
            seconds = time.perf_counter() - start
        return GenerationOutput(prompts, driver.tokens, driver.exits, mode, seconds, self.config.exit_layers,
                                self.config.num_layers, trace=engine.trace, engine=engine, rows=driver.rows,
                                ticks=driver.ticks)
