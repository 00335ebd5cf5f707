"""Run metrics on rank 0: RUN_DIR/metrics.jsonl (one object per logged step or evaluation), a console
progress bar, wandb (offline unless WANDB_MODE says otherwise) and optional TensorBoard."""
from __future__ import annotations

import json
import os
from pathlib import Path

from nvium_dist.config import NviumConfig


class MetricsLogger:
    def __init__(self, config: NviumConfig, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = Path(config.training.run_dir) / "metrics.jsonl"
        self._bar = self._wandb = self._tensorboard = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_records_after(start_step)
        from tqdm import tqdm

        self._bar = tqdm(total=config.training.train_iters, initial=start_step, desc="train", unit="step",
                         dynamic_ncols=True, mininterval=1.0)
        if config.training.wandb_project:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(project=config.training.wandb_project, dir=str(self.path.parent),
                                     config=config.to_dict(), name=Path(config.training.run_dir).name,
                                     resume="allow", id=Path(config.training.run_dir).name)
        if config.training.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.path.parent / "tensorboard"))

    def _drop_records_after(self, step: int) -> None:
        """A resumed run re-does the steps after its checkpoint; their old records would be duplicates."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)

    def progress(self, step: int, postfix: dict) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(postfix, refresh=True)

    def message(self, text: str) -> None:
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tensorboard is not None:
            self._tensorboard.close()
