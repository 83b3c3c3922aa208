"""Faults for tests, added to a real run as a callback from the command line:

    python -m sd_lightning ... +callbacks.fault._target_=fault_injection.NaNGradients \\
        +callbacks.fault.rank=1 '+callbacks.fault.steps=[3]'

(with ``tests/`` on ``PYTHONPATH``). It also writes what each rank saw to ``<run dir>/rank<N>.json``.
"""

from __future__ import annotations

import json
import os

import lightning as L
import torch


class NaNGradients(L.Callback):
    """Turns one rank's gradients to NaN after backward (after DDP has averaged them, so only
    that rank sees it) at the given steps, or from ``from_step`` on."""

    def __init__(self, rank: int, steps: list[int] = (), from_step: int | None = None):
        self.rank, self.steps, self.from_step = rank, set(steps), from_step

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        hit = step in self.steps or (self.from_step is not None and step >= self.from_step)
        if trainer.global_rank == self.rank and hit:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.fill_(float("nan"))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._report(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exn) -> None:
        self._report(trainer, pl_module)

    @staticmethod
    def _report(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from sd_lightning.callbacks import NonFiniteGuard

        guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
        params = torch.cat([p.detach().flatten() for p in pl_module.unet.parameters()])
        report = {
            "global_step": trainer.global_step,
            "skipped": guard.skipped,
            "finite_params": bool(params.isfinite().all()),
            "checksum": float(params.double().sum()),
        }
        path = os.path.join(trainer.default_root_dir, f"rank{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump(report, f)
