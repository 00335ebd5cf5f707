"""Feedback control of the depth-penalty weight beta against the dense baseline's eval log.

At each evaluation, gap = CE_dense(nearest step) - CE_mix(step) in nats. Inside the dead band beta
holds; a positive gap (N-vium ahead) raises beta to buy more speed, a negative gap lowers it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nvium_dist.config import BetaControllerConfig


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
    history: list[dict] = field(default_factory=list)

    def baseline_ce(self, step: int) -> tuple[int, float] | None:
        path = Path(self.config.baseline_metrics)
        if not path.is_file():
            return None
        records = read_eval_log(path)
        if not records:
            return None
        return min(records, key=lambda record: abs(record[0] - step))

    def update(self, step: int, eval_ce: float) -> float:
        """Moves beta after an evaluation; returns the new value (unchanged when no baseline is available)."""
        baseline = self.baseline_ce(step)
        if baseline is None:
            return self.beta
        baseline_step, baseline_ce = baseline
        gap = baseline_ce - eval_ce
        c = self.config
        if abs(gap) >= c.dead_band:
            if gap > 0:
                self.beta = min(self.beta + min(c.k_up * gap, c.max_step), c.beta_max)
            else:
                self.beta = max(self.beta + max(c.k_down * gap, -c.max_step), c.beta_min)
        self.history.append({"step": step, "baseline_step": baseline_step, "gap": gap, "beta": self.beta})
        return self.beta

    def state(self) -> dict:
        return {"beta": self.beta, "history": self.history}

    def load_state(self, state: dict) -> None:
        self.beta = float(state["beta"])
        self.history = list(state.get("history", []))

    def __repr__(self) -> str:  # the config is long; the state is what matters in logs
        return f"BetaController(beta={self.beta:.4f}, evaluations={len(self.history)}, config={asdict(self.config)})"
