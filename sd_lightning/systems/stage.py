"""What each training stage writes into its Lightning checkpoints and checks when resuming:
``checkpoint["sd_lightning"] = {"stage", "config", "skipped", ...}``. A checkpoint of another
stage given as ``ckpt_path`` is refused with what to pass instead."""

from __future__ import annotations

from typing import Any, ClassVar

from sd_lightning.systems.skipped import SkippedSamplesMixin


def check_stage(checkpoint: Any, stage: str, what: str, fix: str) -> None:
    """Raise ``ValueError("<what> of stage X, not stage Y: <fix>")`` unless ``checkpoint`` was
    written by ``stage``."""
    meta = checkpoint.get("sd_lightning") if isinstance(checkpoint, dict) else None
    found = (meta or {}).get("stage")
    if found != stage:
        raise ValueError(f"{what} of stage {found!r}, not stage {stage!r}: {fix}")


class StageCheckpointMixin(SkippedSamplesMixin):
    """For the stage systems: set ``checkpoint_stage`` and ``resume_fix`` (the error's advice);
    ``checkpoint_extras()`` adds stage-specific entries."""

    checkpoint_stage: ClassVar[str]
    resume_fix: ClassVar[str]
    run_config: dict[str, Any] | None = None  # the composed config, set by train()

    def checkpoint_extras(self) -> dict[str, Any]:
        return {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sd_lightning"] = {
            "stage": self.checkpoint_stage,
            "config": self.run_config,
            "skipped": self.skipped_state(),
            **self.checkpoint_extras(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_stage(checkpoint, self.checkpoint_stage, "ckpt_path is a checkpoint", self.resume_fix)
        self.restore_skipped(checkpoint)
