"""Divergence: skip a bad step on every rank, roll back after too many in a row, stop after too many rollbacks.

At each optimizer step (inside DeepSpeed's `_take_model_step`, so the same for the plain and the pipeline
engine) one all-reduce over the world adds up every rank's share of the step's loss and a flag for a
non-finite loss or gradient on that rank. A non-finite sum, or a loss spike (opt-in), makes every rank take
the optimizer's own overflow path: no update, gradients cleared, the learning-rate schedule held, as
DeepSpeed does for an fp16 overflow. fp32 on CPU has no loss scaler, so nothing else would notice. The data
position still advances. DeepSpeed's ZeRO optimizers also skip by themselves on a non-finite gradient norm;
such a step counts as skipped too.

The trainer asks `after_step` what to do next: carry on, or roll back (training.max_skipped_steps skips in a
row); `check_rollback_left` raises DivergedError once training.max_rollbacks rollbacks are used up.
"""
from __future__ import annotations

import contextlib
import logging
import statistics
import sys
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from nvium_dist.config import TrainingConfig
from nvium_dist.parallel import all_reduce


class DivergedError(RuntimeError):
    """The run keeps diverging and cannot roll back any further (exit code exit_codes.DIVERGED)."""


@dataclass
class StepVerdict:
    skipped: bool
    reason: str | None = None


class DivergenceGuard:
    def __init__(self, training: TrainingConfig, rank: int):
        self.config = training
        self.rank = rank
        self.recent_losses: deque[float] = deque(maxlen=training.loss_spike_window or None)
        self.consecutive_skips = 0
        self.skipped_steps = 0
        self.rollbacks = 0
        self.batch = 0  # the global batch (1-based position in the data order) the current step trains on
        self.verdict = StepVerdict(skipped=False)
        self._poisoned_batches = set(training.inject_loss_batches)

    # -- the test hook ------------------------------------------------------------------------------

    def poison(self, loss: torch.Tensor) -> torch.Tensor:
        """training.inject_loss_*: this rank's loss on those batches times inject_loss_scale, or NaN."""
        if self.batch in self._poisoned_batches and self.rank == self.config.inject_loss_rank:
            return loss * (self.config.inject_loss_scale or float("nan"))
        return loss

    def poison_weights(self, engine, step: int) -> None:
        """training.inject_nan_weights_step: after that step, rank inject_loss_rank's weights (its ZeRO-3
        partitions) are NaN."""
        if step == self.config.inject_nan_weights_step and self.rank == self.config.inject_loss_rank:
            with torch.no_grad():
                for param in engine.module.parameters():
                    getattr(param, "ds_tensor", param).fill_(float("nan"))

    # -- the decision at the optimizer step -----------------------------------------------------------

    def install(self, engine, loss_share: Callable[[], torch.Tensor]) -> None:
        """Gates every optimizer step of `engine`. `loss_share()` is this rank's part of the step's mean loss:
        the shares of all ranks add up to it (0 on ranks that hold no loss)."""
        take_model_step = getattr(engine, "_take_model_step", None)
        if not callable(take_model_step):  # a private method: another DeepSpeed version may not have it
            import deepspeed

            raise ValueError(f"the divergence guard gates DeepSpeed's engine._take_model_step, which deepspeed "
                             f"{deepspeed.__version__} does not have; install the version requirements.txt pins")

        def gated_model_step(lr_kwargs=None):
            reason = self._reason_to_skip(engine, loss_share())
            with forced_overflow(engine.optimizer) if reason else contextlib.nullcontext():
                take_model_step(lr_kwargs)
            if reason is None and not engine._step_applied:
                reason = "non-finite gradient norm (DeepSpeed skipped the update)"
            self.verdict = StepVerdict(skipped=reason is not None, reason=reason)

        engine._take_model_step = gated_model_step

    def _reason_to_skip(self, engine, share: torch.Tensor) -> str | None:
        share = share.detach().double().reshape(())
        local_bad = ~torch.isfinite(share)
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        if grads:  # ZeRO keeps partitioned gradients elsewhere and checks their norm itself
            local_bad |= ~torch.tensor(all_finite(grads), device=share.device)
        values = torch.stack([torch.where(local_bad, torch.zeros_like(share), share), local_bad.double()])
        loss, bad_ranks = all_reduce(values).tolist()
        if bad_ranks:
            return f"non-finite loss or gradients on {int(bad_ranks)} rank(s)"
        window = self.config.loss_spike_window
        if window and len(self.recent_losses) == window:
            mean, std = statistics.fmean(self.recent_losses), statistics.pstdev(self.recent_losses)
            limit = mean + self.config.loss_spike_sigmas * std
            if loss > limit:
                return (f"loss spike: {loss:.4f} > {limit:.4f} (mean {mean:.4f} + {self.config.loss_spike_sigmas:g} "
                        f"x std {std:.4f} of the last {window} steps)")
        self.recent_losses.append(loss)
        return None

    # -- what the loop does next ------------------------------------------------------------------------

    def after_step(self, step: int) -> bool:
        """Counts the step just taken; True when it is time to roll back."""
        if not self.verdict.skipped:
            self.consecutive_skips = 0
            return False
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.skipped_steps == 1:
            self.report(f"step {step} skipped: {self.verdict.reason}; no update, the data moves on (further "
                        "skips are counted in metrics.jsonl and summarised)")
        limit = self.config.max_skipped_steps
        return bool(limit) and self.consecutive_skips >= limit

    def check_rollback_left(self, step: int) -> None:
        """Raises DivergedError when no rollback is left."""
        if self.rollbacks >= self.config.max_rollbacks:
            raise DivergedError(
                f"training diverged: {self.consecutive_skips} steps in a row skipped at step {step} after "
                f"{self.rollbacks} rollback(s) (training.max_rollbacks={self.config.max_rollbacks}); lower "
                "training.lr, raise training.warmup_fraction, or inspect the data past the last good checkpoint")

    def rolled_back(self) -> None:
        self.rollbacks += 1
        self.consecutive_skips = 0
        self.recent_losses.clear()

    def summary(self) -> str | None:
        if not self.skipped_steps and not self.rollbacks:
            return None
        return f"{self.skipped_steps} step(s) skipped, {self.rollbacks} rollback(s) in this run"

    def report(self, text: str) -> None:
        if self.rank == 0:
            print(f"[fault] {text}", file=sys.stderr, flush=True)

    def state(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                "rollbacks": self.rollbacks}

    def load_state(self, state: dict) -> None:
        """A resume continues the counts (a rollback keeps its own: they include the steps it abandons)."""
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.rollbacks = int(state.get("rollbacks", 0))


@contextlib.contextmanager
def forced_overflow(optimizer):
    """The optimizer's step takes its overflow path: no update, its gradients cleared, and `overflow` set, so
    the engine holds the learning-rate schedule. DeepSpeed's own overflow message is held back (ours says it)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.utils import logger

    def overflowed(*_args, **_kwargs):
        optimizer.overflow = True
        return True

    def bf16_skip(closure=None):
        optimizer.overflow = True
        optimizer.clear_hp_grads()
        optimizer.clear_lp_grads()

    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        patches = {"check_grad_overflow": True, "check_overflow": overflowed}
    elif isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        patches = {"_overflow_check_and_loss_scale_update": overflowed}
    elif isinstance(optimizer, BF16_Optimizer):
        patches = {"step": bf16_skip}
    else:  # the torch optimizer itself (ZeRO 0, fp32): the engine zeroes the gradients after its step
        patches = {"step": lambda closure=None: None, "overflow": True}
    missing = object()
    saved = {name: optimizer.__dict__.get(name, missing) for name in patches}
    level = logger.level
    optimizer.__dict__.update(patches)
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        for name, value in saved.items():
            if value is missing:
                del optimizer.__dict__[name]
            else:
                optimizer.__dict__[name] = value


def all_finite(tensors) -> bool:
    """Local: no NaN or infinity in any of `tensors` (one host read; float64 sums, which do not overflow)."""
    sums = [torch.sum(t.detach(), dtype=torch.float64) for t in tensors]
    return not sums or bool(torch.isfinite(torch.stack(sums)).all())
