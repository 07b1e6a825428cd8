"""A run's training curves as TensorBoard event files: ``tensorboard --logdir EXP`` shows every
trial of every round (a run writes them into its run folder, ``RUN/tensorboard``).

Written with tensorboardX, which Ray Tune also uses: writing needs no TensorBoard install; the
viewer is an optional extra (``pip install "raysc[viewers]"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter

FOLDER = "tensorboard"  # inside a run folder


class Curves:
    """The loss and learning rate per optimiser step, and the validation metrics per epoch, of
    one run; without a folder (ranks other than 0, runs without a run folder) it writes nothing.

    Args:
        run_dir: the run folder, or None.
        resumed_at_step: the optimiser step a resumed run continues from: what a killed run wrote
            after it is dropped, so no step appears twice.
    """

    def __init__(self, run_dir: Path | None, *, resumed_at_step: int = 0) -> None:
        self._writer = None
        if run_dir is not None:
            self._writer = SummaryWriter(str(run_dir / FOLDER), purge_step=resumed_at_step or None)

    def step(self, step: int, loss: float, lr: float) -> None:
        if self._writer is not None:
            self._writer.add_scalar("train/loss", loss, step)
            self._writer.add_scalar("train/lr", lr, step)

    def epoch(self, step: int, metrics: dict[str, Any]) -> None:
        """An epoch's numbers, at the optimiser step it ended on (one x-axis for every curve)."""
        if self._writer is None:
            return
        for key, value in metrics.items():
            if isinstance(value, float) and key not in ("finished_at", "epoch_seconds"):
                self._writer.add_scalar(f"epoch/{key}", value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
