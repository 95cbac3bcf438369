"""What a training run writes as it goes: JSON lines, a PNG of the curves, optionally TensorBoard."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from gpu_ann.checkpoint import atomic_write

log = logging.getLogger("gpu_ann.training")

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"


class RunLog:
    """One JSON line per evaluation in ``metrics.jsonl``, ``curves.png`` redrawn each time.

    Lines are appended and flushed whole, so a crash leaves complete lines; the PNG is written to a
    temporary file and renamed. The run directory appears with the first checkpoint, whose files
    (this log's first line and PNG among them) are written into a staging directory first (see
    :mod:`gpu_ann.run_directory`).

    Parameters
    ----------
    run_dir : Path
        The run directory; it must exist before :meth:`write` without ``directory`` is called.
    popularity : float
        The popularity baseline's validation loss, drawn as a horizontal line when finite.
    tensorboard : bool
        Also log to ``run_dir/tensorboard``; skipped with a warning when TensorBoard is not installed.
    """

    def __init__(self, run_dir: Path, popularity: float, tensorboard: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.popularity = popularity
        self.records: list[dict] = []
        self._tb = None
        self._tensorboard = tensorboard

    def write(self, record: dict, directory: Path | None = None) -> None:
        """Append one evaluation's record to ``metrics.jsonl`` and redraw ``curves.png``.

        Parameters
        ----------
        record : dict
            JSON-serialisable; the curves need ``step``, ``train_loss`` and ``validation_loss``.
        directory : Path, optional
            Where the two files are; default the run directory (the first checkpoint gives its staging
            directory).
        """
        directory = self.run_dir if directory is None else Path(directory)
        self.records.append(record)
        with open(directory / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        self._plot(directory)

    def tensorboard(self, record: dict) -> None:
        """Log a record's losses and ``samples_per_s`` to ``run_dir/tensorboard`` when asked for.

        Called once the run directory exists: TensorBoard's files are not part of a checkpoint.

        Parameters
        ----------
        record : dict
            As for :meth:`write`.
        """
        if self._tensorboard:
            self._write_tensorboard(record)

    def restore(self, records: list[dict]) -> None:
        """Continue a resumed run: keep exactly the records up to its state, dropping any that a killed
        process wrote after its last saved state (they will be written again)."""
        self.records = list(records)
        text = "".join(json.dumps(r, allow_nan=True) + "\n" for r in records)
        atomic_write(self.run_dir / METRICS_FILE, lambda f: f.write(text), mode="w")

    def _plot(self, directory: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")  # headless: no display needed
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.records]
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
        ax.plot(steps, [r["train_loss"] for r in self.records], marker="o", ms=3, label="training (fixed batches)")
        ax.plot(
            steps, [r["validation_loss"] for r in self.records], marker="o", ms=3, label="validation (fixed batches)"
        )
        if math.isfinite(self.popularity):
            ax.axhline(self.popularity, color="grey", ls="--", lw=1, label="popularity baseline (validation)")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        ax.set_title(f"gpu-ann training curves: {self.run_dir.name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(directory / CURVES_FILE, lambda f: fig.savefig(f, format="png"))
        plt.close(fig)

    def _write_tensorboard(self, record: dict) -> None:
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                log.warning("TensorBoard logging asked for but not available (%s); pip install tensorboard", exc)
                self._tensorboard = False
                return
            self._tb = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR))
        for key in ("train_loss", "validation_loss", "samples_per_s"):
            self._tb.add_scalar(key, record[key], record["step"])
        self._tb.flush()

    def close(self) -> None:
        """Close the TensorBoard writer, if one was opened."""
        if self._tb is not None:
            self._tb.close()
