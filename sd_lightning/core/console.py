"""One line per event on the console: Lightning's messages go through the run's own logging
(Hydra's console and log file) once, not also through Lightning's handlers, and notices the user
cannot act on (an advertisement, an `srun` hint on a run that is not a SLURM job, a code example
about manual optimization, a deprecation inside Lightning) are dropped."""

from __future__ import annotations

import logging
import warnings

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
NOT_ACTIONABLE = (  # Lightning's INFO lines that say nothing about this run
    "litlogger",
    "already configured with model summary callbacks",
    "TPU available",
)
WARNINGS = (
    r"The `srun` command is available on your system but is not used",
    # our checkpoints hold the weights after the step, as they should; the warning is a tutorial
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


class _DropNotActionable(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in NOT_ACTIONABLE)


def tidy_console() -> None:
    """Call once the run's logging is configured (inside ``python -m sd_lightning``'s job); it
    imports Lightning, whose import adds the handler removed here."""
    import lightning  # noqa: F401

    for pattern in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    root = logging.getLogger()
    if not root.handlers:  # called without the run's logging: leave Lightning's own
        return
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # console only, never a file
                logger.removeHandler(handler)
        logger.propagate = True
    for handler in root.handlers:
        if not any(isinstance(f, _DropNotActionable) for f in handler.filters):
            handler.addFilter(_DropNotActionable())
