"""Non-finite gradients (from a NaN/inf loss, an overflow, a bad sample) on any rank: every rank
skips that optimizer step, counts it, and after ``max_consecutive`` in a row training stops with a
checkpoint of the last good weights and an error that says what to try.

The check runs in ``on_before_optimizer_step`` (automatic and manual optimization alike, before
gradient clipping): each rank tests its gradients and the ranks all-gather the answer. With
torch's fused Adam or AdamW (the default) nothing waits for it: the answer becomes the
optimizer's ``found_inf``, which its kernel reads on the device to leave parameters and state
(moments, step counts) untouched, and the host reads the flags of the steps since at the next
logging step (``trainer.log_every_n_steps``), where the skips are counted, said and, after too
many in a row, stopped on. Other optimizers wait for the answer: if any rank failed, every rank
drops its gradients (``zero_grad(set_to_none=True)``) and the optimizer leaves parameters and
state untouched. DDP has already averaged the gradients
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
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, each rank's flag) unread

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
        ranks = trainer.strategy.all_gather(finite).reshape(-1)  # a collective, on the device
        if skips_on_device(optimizer):
            # fused Adam(W) reads found_inf in its kernel: parameters, moments and step counts
            # stay as they were where it is 1; the host reads the flags at the next logging step
            optimizer.found_inf = (ranks.min() == 0).float()
            self._pending.append((trainer.global_step, ranks))
            return
        if bool(ranks.all()):
            self.consecutive = 0
            return
        optimizer.zero_grad(set_to_none=True)  # the optimizer skips parameters without gradients
        bad = [i for i, ok in enumerate(ranks.tolist()) if not ok]
        self._skipped(trainer, pl_module, bad, "gradients")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = max(1, int(trainer.log_every_n_steps or 1))
        if self._pending and (trainer.global_step % every == 0 or trainer.should_stop):
            self._settle(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._settle(trainer, pl_module)

    def _settle(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The flags of the steps since the last read, in one read (one synchronisation)."""
        if not self._pending:
            return
        steps = [step for step, _ in self._pending]
        flags = torch.stack([ranks for _, ranks in self._pending]).tolist()
        self._pending = []
        for step, ranks in zip(steps, flags):
            if all(ranks):
                self.consecutive = 0
            else:
                bad = [i for i, ok in enumerate(ranks) if not ok]
                self._skipped(trainer, pl_module, bad, "gradients", step)

    def _skipped(
        self, trainer: L.Trainer, pl_module, bad: list[int], what: str, step: int | None = None
    ) -> None:
        step = trainer.global_step if step is None else step
        self.skipped += 1
        self.consecutive += 1
        pl_module.log("train/nonfinite_skipped", float(self.skipped), reduce_fx="max")
        if trainer.is_global_zero:
            log.warning(
                "non-finite %s on rank(s) %s at step %d: step skipped on every rank "
                "(%d in a row, %d in all)",
                what,
                bad,
                step,
                self.consecutive,
                self.skipped,
            )
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            path = os.path.join(checkpoint_folder(trainer), self.filename.format(step=step))
            trainer.save_checkpoint(path, weights_only=False)  # the last good step, whole
            raise NonFiniteTrainingError(
                f"{self.consecutive} optimizer steps in a row had non-finite gradients (last on "
                f"rank(s) {bad}, step {step}); the last good weights are saved in "
                f"{path}. Lower the learning rate (model.optimizer.lr), keep gradient clipping on "
                "(trainer.gradient_clip_val), or look for bad samples; resume with "
                f"ckpt_path={path}. callbacks.nonfinite.max_consecutive sets this limit."
            )


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` skips its own step on a device flag (``found_inf``): torch's fused
    Adam and AdamW (``fused=True``: the default of ``model.optimizer``), on plain tensors (a
    sharded parameter takes the synchronising path)."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    params = (p for g in optimizer.param_groups for p in g["params"])
    return not any(type(p.data) is not torch.Tensor for p in params)
