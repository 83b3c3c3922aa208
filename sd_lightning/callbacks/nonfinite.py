"""Non-finite gradients (from a NaN/inf loss, an overflow, a bad sample) on any rank: every rank
skips that optimizer step, counts it, and after ``max_consecutive`` in a row training stops with a
checkpoint of the last good weights and an error that says what to try.

The check runs in ``on_before_optimizer_step`` (automatic and manual optimization alike, before
gradient clipping): each rank tests its gradients, the ranks all-gather the answer, and if any rank
failed every rank drops its gradients (``zero_grad(set_to_none=True)``), so the optimizer leaves
parameters and its state (moments, step counts) untouched. DDP has already averaged the gradients
at that point, so a NaN on one rank is a NaN on all; the all-gather makes the decision explicit
and covers strategies that do not average (and names the ranks that saw it).
"""

from __future__ import annotations

import logging
import os

import lightning as L
import torch

from sd_lightning.models.parallel import local
from sd_lightning.systems.checkpoint_io import checkpoint_folder
from sd_lightning.systems.optim import StepInBackward

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Training stopped after too many consecutive non-finite steps."""


class NonFiniteGuard(L.Callback):
    """Skip optimizer steps with non-finite gradients on any rank; stop after too many in a row.

    Args:
        max_consecutive: stop after this many skipped steps in a row (0: never stop).
        filename: the checkpoint written when stopping (``{step}`` is filled in).
    """

    def __init__(self, max_consecutive: int = 20, filename: str = "nonfinite-step{step:08d}.ckpt"):
        self.max_consecutive, self.filename = max_consecutive, filename
        self.skipped = 0  # steps skipped in this process's run
        self.consecutive = 0

    @staticmethod
    def _finite(optimizer: torch.optim.Optimizer) -> torch.Tensor:
        # sharded parameters (FSDP): this rank's shard; the all-gather below covers the rest
        grads = [
            local(p.grad) for g in optimizer.param_groups for p in g["params"] if p.grad is not None
        ]
        if not grads:
            return torch.tensor(True)
        norms = torch._foreach_norm(grads)
        return torch.stack(norms).sum().isfinite()  # nan or inf in any gradient -> nan or inf

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        """An optimizer that steps inside backward (``step_in_backward``) is told before it:
        a non-finite loss frees its gradients without a step (one device: no gather)."""
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if isinstance(optimizer, StepInBackward):
            optimizer.skip = not bool(torch.isfinite(loss))
            if optimizer.skip:
                self._skipped(trainer, pl_module, [trainer.global_rank], "loss")
            else:
                self.consecutive = 0

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if isinstance(optimizer, StepInBackward):  # stepped in backward, checked before it
            return
        finite = self._finite(optimizer).to(trainer.strategy.root_device, torch.int32)
        ranks = trainer.strategy.all_gather(finite).reshape(-1)
        if bool(ranks.all()):
            self.consecutive = 0
            return
        optimizer.zero_grad(set_to_none=True)  # the optimizer skips parameters without gradients
        bad = [i for i, ok in enumerate(ranks.tolist()) if not ok]
        self._skipped(trainer, pl_module, bad, "gradients")

    def _skipped(self, trainer: L.Trainer, pl_module, bad: list[int], what: str) -> None:
        self.skipped += 1
        self.consecutive += 1
        pl_module.log("train/nonfinite_skipped", float(self.skipped), reduce_fx="max")
        if trainer.is_global_zero:
            log.warning(
                "non-finite %s on rank(s) %s at step %d: step skipped on every rank "
                "(%d in a row, %d in all)",
                what,
                bad,
                trainer.global_step,
                self.consecutive,
                self.skipped,
            )
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            path = os.path.join(
                checkpoint_folder(trainer), self.filename.format(step=trainer.global_step)
            )
            trainer.save_checkpoint(path, weights_only=False)  # the last good step, whole
            raise NonFiniteTrainingError(
                f"{self.consecutive} optimizer steps in a row had non-finite gradients (last on "
                f"rank(s) {bad}, step {trainer.global_step}); the last good weights are saved in "
                f"{path}. Lower the learning rate (model.optimizer.lr), keep gradient clipping on "
                "(trainer.gradient_clip_val), or look for bad samples; resume with "
                f"ckpt_path={path}. callbacks.nonfinite.max_consecutive sets this limit."
            )
