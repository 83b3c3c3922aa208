"""Callbacks for running on clusters: preemption, non-finite steps, evaluation during training,
a progress bar that does not wait for the device."""

from sd_lightning.callbacks.evaluation import Evaluation
from sd_lightning.callbacks.nonfinite import NonFiniteGuard
from sd_lightning.callbacks.preemption import Preemption
from sd_lightning.callbacks.progress import ProgressBar

__all__ = ["Evaluation", "NonFiniteGuard", "Preemption", "ProgressBar"]
