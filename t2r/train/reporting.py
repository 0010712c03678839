"""Where training logs go: RUN/log.jsonl always (plots and resume read it), and TensorBoard or Weights & Biases
when the recipe's ``report_to`` names them (and their packages are installed)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from t2r.errors import T2RError
from t2r.train.run_record import LOG_FILE


def read_log(run_dir: str | Path) -> list[dict]:
    """The log's entries; a last line cut short by a crash is ignored."""
    path = Path(run_dir) / LOG_FILE
    entries = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                break  # only the last line can be torn (appends); nothing after it was written
    return entries


def truncate_log(run_dir: str | Path, step: int) -> None:
    """Keep the entries up to global step STEP (a resumed run redoes the steps after it)."""
    path = Path(run_dir) / LOG_FILE
    if path.is_file():
        kept = [e for e in read_log(run_dir) if e.get("step", 0) <= step]
        from t2r.fsutil import atomic_write_text

        atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in kept))


def check_reporters(report_to: list[str]) -> None:
    """Fail before a run directory exists when a requested reporter's package is missing."""
    packages = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}
    for name in report_to:
        if name in packages:
            try:
                __import__(packages[name])
            except ImportError:
                raise T2RError(f"report_to {name} needs the {name} package installed") from None


class Reporter:
    """Appends every entry to RUN/log.jsonl; mirrors numbers to TensorBoard (RUN/tensorboard) and wandb."""

    def __init__(self, run_dir: Path, report_to: list[str], enabled: bool, config: dict[str, Any] | None = None):
        self.path = Path(run_dir) / LOG_FILE
        self.enabled = enabled
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise T2RError(
                    "report_to tensorboard needs the tensorboard package (pip install tensorboard)"
                ) from None
            self.tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if "wandb" in report_to:
            check_reporters(["wandb"])
            import wandb

            self.wandb = wandb.init(project="t2r", name=Path(run_dir).name, dir=str(run_dir), config=config,
                                    resume="allow")  # fmt: skip

    def log(self, **entry: Any) -> None:
        if not self.enabled:
            return
        entry = {"time": round(time.time(), 3), **entry}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        step = entry.get("step")
        numbers = {
            f"{entry.get('type', 'log')}/{k}": v
            for k, v in entry.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("time", "step") and math.isfinite(v)
        }
        if self.tensorboard is not None and step is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None and numbers:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
