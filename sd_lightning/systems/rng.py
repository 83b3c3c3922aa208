"""Randomness of a training step from the step itself.

Noise, timesteps, posterior samples and caption dropout come from a generator re-seeded for every
batch from (seed, rank, global step, micro-batch within the step): ranks draw differently (the
global RNG is seeded alike on every rank), micro-batches of one accumulated step differ, and a run
resumed from a checkpoint draws exactly what the uninterrupted run would have, with no RNG state
to save. (Lightning's ``batch_idx`` is not used: after a resume it can restart differently.)
"""

from __future__ import annotations

import torch


class StepSeededMixin:
    """For LightningModules with a ``seed`` attribute; call :meth:`step_rng` once per batch."""

    seed: int
    _step_generator: torch.Generator | None = None
    _seeded_step: tuple[int, int] = (-1, 0)  # (global step, micro-batches drawn at it)

    def step_rng(self) -> torch.Generator:
        device = self.device
        if self._step_generator is None or self._step_generator.device != device:
            self._step_generator = torch.Generator(device=device)
        step, micro = self._seeded_step
        micro = micro + 1 if step == self.global_step else 0
        self._seeded_step = (self.global_step, micro)
        key = hash((int(self.seed), self.global_rank, self.global_step, micro)) % (2**63)
        return self._step_generator.manual_seed(key)
