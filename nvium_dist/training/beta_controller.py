"""Feedback control of the depth-penalty weight beta against the dense baseline's eval log.

At each evaluation, gap = CE_dense(nearest step) - CE_mix(step) in nats. Inside the dead band beta
holds; a positive gap (N-vium ahead) raises beta to buy more speed, a negative gap lowers it.

Only rank 0 reads the baseline (the dense run may be appending to it while we read) and every rank
takes its decision by broadcast, so all ranks always train with the same beta. A baseline that is
missing, has no evaluations, or whose nearest evaluation is further than `max_lag` steps away leaves
beta unchanged and is reported at every evaluation (an error with `strict`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nvium_dist.config import BetaControllerConfig


class BaselineUnavailable(RuntimeError):
    """The dense baseline's eval log cannot drive the controller at this step; the message says why."""


def read_eval_log(path: str | Path) -> list[tuple[int, float]]:
    """(step, eval_ce) pairs from a metrics.jsonl; unreadable lines are skipped (a run may be writing it)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "eval_ce" in record:
            records.append((int(record["step"]), float(record["eval_ce"])))
    return records


@dataclass
class BetaController:
    config: BetaControllerConfig
    beta: float
    max_lag: int = 0  # the nearest baseline evaluation may be this many steps away (0: no limit)
    history: list[dict] = field(default_factory=list)

    def baseline_ce(self, step: int) -> tuple[int, float]:
        """(step, eval_ce) of the baseline evaluation nearest to `step`; raises BaselineUnavailable."""
        path = Path(self.config.baseline_metrics)
        if not self.config.baseline_metrics or not path.is_file():
            raise BaselineUnavailable(f"the dense baseline's metrics file {str(path)!r} does not exist "
                                      "(training.beta_controller.baseline_metrics)")
        records = read_eval_log(path)
        if not records:
            raise BaselineUnavailable(f"{path} holds no evaluation yet")
        nearest = min(records, key=lambda record: abs(record[0] - step))
        if self.max_lag and abs(nearest[0] - step) > self.max_lag:
            raise BaselineUnavailable(
                f"{path} is stale: its evaluation nearest to step {step} is at step {nearest[0]} (more than "
                f"{self.max_lag} steps away; newest {max(r[0] for r in records)})")
        return nearest

    def update(self, step: int, eval_ce: float) -> float:
        """Moves beta after an evaluation and returns it; raises BaselineUnavailable (beta unchanged)."""
        baseline_step, baseline_ce = self.baseline_ce(step)
        gap = baseline_ce - eval_ce
        c = self.config
        if abs(gap) >= c.dead_band:
            if gap > 0:
                self.beta = min(self.beta + min(c.k_up * gap, c.max_step), c.beta_max)
            else:
                self.beta = max(self.beta + max(c.k_down * gap, -c.max_step), c.beta_min)
        self.history.append({"step": step, "baseline_step": baseline_step, "gap": gap, "beta": self.beta})
        return self.beta

    def update_from_rank0(self, step: int, eval_ce: float, rank: int) -> str | None:
        """Collective: rank 0 reads the baseline and updates; every rank takes rank 0's state.
        -> None, or why the baseline could not be used (the same on every rank)."""
        from nvium_dist.parallel import broadcast_object

        decision = None
        if rank == 0:
            try:
                self.update(step, eval_ce)
                problem = None
            except BaselineUnavailable as error:
                problem = str(error)
            decision = {"state": self.state(), "problem": problem}
        decision = broadcast_object(decision, src=0)
        self.load_state(decision["state"])
        return decision["problem"]

    def state(self) -> dict:
        return {"beta": self.beta, "history": self.history}

    def load_state(self, state: dict) -> None:
        self.beta = float(state["beta"])
        self.history = list(state.get("history", []))

    def __repr__(self) -> str:  # the config is long; the state is what matters in logs
        return f"BetaController(beta={self.beta:.4f}, evaluations={len(self.history)}, config={asdict(self.config)})"
