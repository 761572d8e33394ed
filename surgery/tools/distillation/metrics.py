"""metrics.jsonl of a distillation run (and TensorBoard when installed)."""

from __future__ import annotations

import json
from pathlib import Path

from clear_surgery.hub.atomic import write_text

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """metrics.jsonl (and TensorBoard when installed); a resumed run drops lines past its checkpoint."""

    def __init__(self, out: Path, enabled: bool = True):
        self.path, self.enabled, self.tensorboard = out / METRICS_FILE, enabled, None
        if enabled:
            out.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                pass

    def reset(self) -> None:
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_text(self.path, "".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()

    @staticmethod
    def first_eval(out: Path) -> float | None:
        for line in (out / METRICS_FILE).read_text().splitlines():
            record = json.loads(line)
            if "eval/student_teacher_mse" in record:
                return record["eval/student_teacher_mse"]
        return None


def plot_metrics(out: Path) -> Path:
    """metrics.png: the training losses and the held-out student-teacher error over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines() if line]
    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in ("train/loss", "train/flow_matching", "train/teacher_output", "train/attention"):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            train_ax.plot(*zip(*points), label=key.removeprefix("train/"))
    train_ax.set(xlabel="step", ylabel="loss", yscale="log", title="training losses")
    train_ax.legend(fontsize=7)
    points = [(r["step"], r["eval/student_teacher_mse"]) for r in records if "eval/student_teacher_mse" in r]
    eval_ax.plot(*zip(*points), marker="o")
    eval_ax.set(xlabel="step", ylabel="MSE", yscale="log", title="held-out student vs teacher velocity")
    fig.tight_layout()
    path = out / "metrics.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
