"""Callbacks for running on clusters: preemption and non-finite steps."""

from sd_lightning.callbacks.nonfinite import NonFiniteGuard
from sd_lightning.callbacks.preemption import Preemption

__all__ = ["NonFiniteGuard", "Preemption"]
