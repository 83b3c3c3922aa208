"""Counting the samples the data pipeline skipped (bad tars, images, captions), for both stages.

The pipeline attaches each batch's new skips to it (``batch["skipped"]``). Each rank keeps its own
running count in a plain tensor, deliberately not a module buffer: DDP broadcasts buffers from
rank 0 before every forward, which would overwrite the other ranks' counts. The sum over ranks is
logged as ``data/skipped_<reason>`` and saved in checkpoints, and a resumed run continues from it.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from sd_lightning.data.pipeline import SKIP_REASONS

log = logging.getLogger(__name__)


class SkippedSamplesMixin(L.LightningModule):
    def init_skipped(self) -> None:
        self._skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)  # this rank's
        self._skipped_total = torch.zeros(len(SKIP_REASONS), dtype=torch.long)  # all ranks'

    def count_skipped(self, batch: dict) -> None:
        counts = batch.get("skipped") or {}
        self._skipped += torch.tensor([counts.get(r, 0) for r in SKIP_REASONS])

    def log_skipped(self) -> None:
        """Cumulative counts summed over ranks (one all-reduce, on every rank)."""
        local = self._skipped.to(self.device, torch.float32)
        total = self.trainer.strategy.reduce(local, reduce_op="sum")
        self._skipped_total = total.round().long()  # on the device: read at checkpoints only
        self.log_dict(
            {f"data/skipped_{r}": total[i] for i, r in enumerate(SKIP_REASONS)}, batch_size=1
        )
        self.log("data/skipped", total.sum(), batch_size=1)

    def skipped_state(self) -> dict[str, int]:
        return dict(zip(SKIP_REASONS, self._skipped_total.tolist()))

    def restore_skipped(self, checkpoint: dict[str, Any]) -> None:
        """Rank 0 carries the saved total on; the others start from zero, so sums stay right."""
        saved = checkpoint.get("sd_lightning", {}).get("skipped") or {}
        counts = torch.tensor([int(saved.get(r, 0)) for r in SKIP_REASONS])
        self._skipped_total = counts.clone()
        self._skipped = counts if self.global_rank == 0 else torch.zeros_like(counts)

    def on_train_end(self) -> None:
        total = int(self._skipped_total.sum())
        if self.trainer.is_global_zero and total:
            parts = ", ".join(f"{r}={n}" for r, n in self.skipped_state().items() if n)
            log.warning("skipped %d bad samples in all (%s)", total, parts)
