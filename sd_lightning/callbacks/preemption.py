"""Preemption and Ctrl-C: on SIGUSR1 (SLURM's warning before the time limit,
``--signal=SIGUSR1@90``), SIGUSR2 (the same from submitit, ``hydra/launcher=slurm``), SIGTERM
(preemption, ``scancel``, a container stopping) or SIGINT (Ctrl-C), every rank agrees at the next
step boundary, one checkpoint is written atomically, training stops cleanly and, inside a SLURM
batch job and unless it was Ctrl-C, the job requeues itself. The requeued job runs in the same run
directory and resumes from that checkpoint (``ckpt_path=auto``). A second Ctrl-C aborts at once,
without a checkpoint.

The signal handler only sets a flag: saving inside a handler could interrupt a collective or an
optimizer step half-way. One process acts on it after the batch; several all-reduce the flag
after each training batch (one small collective), so a signal seen by any rank stops every rank
at the same step. Lightning's own SLURM
handlers (checkpoint and ``scontrol requeue`` inside the handler, a broadcast inside the SIGTERM
handler) and its Ctrl-C handling (stop without a checkpoint) are replaced for the duration of
``fit``. Data-loading workers ignore SIGINT (a terminal's Ctrl-C reaches them too) and carry on
until the training process stops them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch

from sd_lightning.core import stopping
from sd_lightning.systems.checkpoint_io import checkpoint_folder

log = logging.getLogger(__name__)


def in_slurm_batch_job() -> bool:
    """Inside an ``sbatch`` job (not an interactive ``srun``/``salloc`` shell)."""
    return "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in (
        "bash",
        "interactive",
    )


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this job (array jobs by their array id); True when SLURM took it."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode == 0:
        log.warning("preemption: requeued SLURM job %s; it resumes in the same run directory", job)
        return True
    log.error(
        "preemption: `scontrol requeue %s` failed (%s); resubmit the job with the same run "
        "directory (hydra.run.dir=...) to resume from the checkpoint",
        job,
        result.stderr.strip(),
    )
    return False


class Preemption(L.Callback):
    """Checkpoint and stop on a signal; requeue under SLURM.

    Args:
        signals: signal names that trigger it.
        filename: the checkpoint file in the checkpoint folder (``{step}`` is filled in); older
            preemption checkpoints of the run are removed once the new one is written.
        requeue: ``auto`` requeues inside a SLURM batch job, ``true``/``false`` force it.
    """

    def __init__(
        self,
        signals: tuple[str, ...] | list[str] = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT"),
        filename: str = "preempted-step{step:08d}.ckpt",
        requeue: str | bool = "auto",
    ):
        self.signums = [signal.Signals[name] for name in signals]
        self.filename, self.requeue = filename, requeue
        self.received: str | None = None  # the signal this process saw
        self.stopped = False  # every rank agreed and a checkpoint was written
        self.checkpoint_path: str | None = None
        self._previous: dict[int, Any] = {}
        self.training = False  # the first step has begun (a stop then writes a checkpoint)

    # -- handlers ----------------------------------------------------------------------------------
    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":  # Ctrl-C twice: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        stopping.record(name)  # a phase before the first step stops too (class images...)
        if self.received is None:
            again = " (Ctrl-C again to stop at once, without it)" if name == "SIGINT" else ""
            what = (
                "checkpointing at the end of this step"
                if self.training
                else "stopping after the work in hand, before the first step (what is finished is "
                "kept)"
            )
            log.warning("preemption: received %s; %s%s", name, what, again)
        self.received = name

    def _install(self) -> None:
        for signum in self.signums:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # before Lightning registers its own, and before workers fork
            self._install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()  # Lightning has composed its SIGTERM handler in the meantime
        self.training = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    # -- the agreed stop ---------------------------------------------------------------------------
    def _agreed(self, trainer: L.Trainer) -> bool:
        """Whether any rank has received a signal: one process decides alone (no collective,
        nothing read back from the device); several all-reduce the flag after every batch."""
        if trainer.world_size == 1:
            return self.received is not None
        local = torch.tensor(self.received is not None)
        return bool(trainer.strategy.reduce_boolean_decision(local, all=False))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if not self._agreed(trainer):
            return
        folder = checkpoint_folder(trainer)
        path = os.path.join(folder, self.filename.format(step=trainer.global_step))
        trainer.save_checkpoint(path, weights_only=False)  # whole (optimizers too); all ranks
        if trainer.is_global_zero:
            for old in Path(folder).glob(self.filename.split("{")[0] + "*.ckpt"):
                if str(old) != path:  # a file, or a folder of shards (trainer=fsdp)
                    trainer.strategy.remove_checkpoint(old)
            log.warning(
                "preemption: checkpoint at step %d written to %s", trainer.global_step, path
            )
        self.checkpoint_path, self.stopped = path, True
        for callback in trainer.checkpoint_callbacks:  # no second save_last at the end of fit:
            if hasattr(callback, "_last_checkpoint_saved"):  # the grace period is for one write
                callback._last_checkpoint_saved = callback._last_checkpoint_saved or path
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # Lightning would validate on stopping: no time for that

    def finish(self, is_global_zero: bool) -> None:
        """After ``fit`` (and the loggers) have finished: requeue the SLURM job if asked."""
        if not self.stopped or not is_global_zero:
            return
        interrupted = self.received == "SIGINT"  # the user stopped it: no requeue
        auto = in_slurm_batch_job() and not interrupted
        requeue = auto if self.requeue == "auto" else bool(self.requeue)
        if requeue:
            requeue_slurm_job()
        else:
            log.warning(
                "preemption: stopped at %s; run the same command again to resume from it",
                self.checkpoint_path,
            )
