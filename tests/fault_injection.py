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
        from sd_lightning.models.parallel import full_state_dict

        guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
        # the whole weights (gathered from the shards under trainer=fsdp: every rank gets here)
        params = torch.cat([v.flatten() for v in full_state_dict(pl_module.unet).values()])
        report = {
            "global_step": trainer.global_step,
            "skipped": guard.skipped,
            "finite_params": bool(params.isfinite().all()),
            "checksum": float(params.double().sum()),
        }
        path = os.path.join(trainer.default_root_dir, f"rank{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump(report, f)


class SignalAt(L.Callback):
    """Sends ``signal`` to this process on rank ``rank`` as the batch of ``step`` starts, as a
    scheduler would (``scancel --signal=USR1``) but to one rank only."""

    def __init__(self, step: int, rank: int = 0, signal: str = "SIGUSR1"):
        self.step, self.rank, self.signal = step, rank, signal

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        import signal

        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.Signals[self.signal])


class PauseAt(L.Callback):
    """Holds the batch of ``step`` for ``seconds`` after writing ``<run dir>/paused``, so a test
    can signal the process (Ctrl-C) while a step is in progress."""

    def __init__(self, step: int, seconds: float):
        self.step, self.seconds = step, seconds

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        import time

        if trainer.global_step == self.step and trainer.is_global_zero:
            with open(os.path.join(trainer.default_root_dir, "paused"), "w") as f:
                f.write(str(os.getpid()))
            time.sleep(self.seconds)  # a signal's handler runs, then the sleep goes on
