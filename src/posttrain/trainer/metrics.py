"""Where metrics go: `metrics.jsonl` in the run folder (always), TensorBoard (optional), a progress bar.

Only the main process writes. On resume the JSONL keeps the records up to the checkpoint's step and drops
the rest, so a resumed run's file reads as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from posttrain.errors import ConfigError
from posttrain.files import naming


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        tensorboard: bool,
        total_steps: int,
        start_step: int,
        progress: bool,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "run.tensorboard is true but the tensorboard package is not installed; "
                    "pip install 'posttrain[tensorboard]' or set run.tensorboard=false"
                ) from None
            # a resumed run's steps after its checkpoint were logged once already: purged, so each step shows once
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)  # (a restart too)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with naming(self.path), self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def progress(self, n: int, postfix: dict) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(postfix, refresh=False)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
