"""The progress bar without a wait for the device: Lightning's TQDM bar, moved every batch, with
the training loss (and what else ``show`` names) read at logging steps only
(``trainer.log_every_n_steps``), where Lightning reads the logged values anyway; in between it
shows the last values read.

Lightning converts every value logged with ``prog_bar=True`` to a Python number after every
batch, and reading a number back from a GPU makes the host wait until the GPU has finished all
the work queued before it, so the host cannot queue the next step meanwhile. Stage 2 logs its
loss without ``prog_bar`` and this bar shows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n


class ProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` that shows ``show`` (logged names) as read at logging steps."""

    def __init__(self, refresh_rate: int = 1, leave: bool = False, show: Sequence[str] = ()):
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self.show = tuple(show)
        self._shown: dict[str, float] = {}

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return {**super().get_metrics(trainer, pl_module), **self._shown}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if self.show and trainer._logger_connector.should_update_logs:  # Lightning reads now too
            metrics = trainer.callback_metrics
            self._shown = {k: float(metrics[k]) for k in self.show if k in metrics}
        bar, n = self.train_progress_bar, i + 1
        if bar is not None and self._should_update(n, bar.total):
            _update_n(bar, n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))
