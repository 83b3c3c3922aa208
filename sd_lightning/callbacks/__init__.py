"""Callbacks for running on clusters: preemption, non-finite steps, evaluation during training."""

from sd_lightning.callbacks.evaluation import Evaluation
from sd_lightning.callbacks.nonfinite import NonFiniteGuard
from sd_lightning.callbacks.preemption import Preemption

__all__ = ["Evaluation", "NonFiniteGuard", "Preemption"]
