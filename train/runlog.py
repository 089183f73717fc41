"""What a run leaves behind besides checkpoints: config.json, metrics.jsonl, samples.txt, loss.png."""
from __future__ import annotations

import json
import math
from pathlib import Path

from model.io.files import atomic_write_text


class RunLog:
    """Appends one JSON line per logged step to metrics.jsonl and draws the loss curve."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.run_dir / "config.json", json.dumps(config, indent=2, default=str))

    def log(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past step (left by a run that died after its last checkpoint) before resuming."""
        if self.metrics_path.exists():
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= step]
            atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def records(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def sample(self, step: int, text: str) -> None:
        with open(self.run_dir / "samples.txt", "a") as f:
            f.write(f"----- step {step} -----\n{text}\n")

    def plot(self) -> Path | None:
        """loss.png with the train and validation curves; None when matplotlib is missing."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        records = self.records()
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in (("train_loss", "train"), ("val_loss", "validation")):
            points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.run_dir / "loss.png"
        tmp = self.run_dir / ".loss.tmp.png"
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        plt.close(fig)
        tmp.replace(path)
        return path
