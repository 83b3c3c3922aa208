"""Exponential moving average of a network's weights, plain PyTorch.

The average is a frozen copy of the network (``ema.net``), registered as a submodule so that it
is saved in checkpoints and moves with ``.to()``, but with ``requires_grad=False``: optimizers and
DDP ignore it. Buffers (none in the U-Net) are copied, not averaged. Under FSDP the copy is
sharded like the network (``fully_shard_unet`` on both), and each rank averages its own shard.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sd_lightning.models.parallel import local


class EMA(nn.Module):
    """``ema.update(net)`` after each optimizer step: ``w_ema <- w_ema + (1 - d) (w - w_ema)``.

    Args:
        net: the network to average (copied at construction).
        decay: the target decay (0.9999 in SD).
        warmup: if true, the decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n``
            updates (CompVis's ``LitEma``), so early weights are forgotten quickly.
    """

    def __init__(self, net: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"model.ema_decay must be in [0, 1), got {decay}")
        self.net = copy.deepcopy(net).requires_grad_(False).eval()
        self.decay, self.warmup = decay, warmup
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # the count on the host: reading the buffer on a GPU every step would make the host wait
        # for the step to finish (a synchronisation); read once, then counted here
        self._host_updates: int | None = None

    def updates(self) -> int:
        if self._host_updates is None:
            self._host_updates = int(self.num_updates)
        return self._host_updates

    def resync(self) -> None:
        """Read the count from the buffer again (after the buffer was loaded or copied into)."""
        self._host_updates = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.resync()

    def current_decay(self) -> float:
        n = self.updates()
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        decay = self.current_decay()
        # sharded (FSDP2): both copies are sharded alike, so each rank averages its own shard
        ema_params = [local(p) for p in self.net.parameters()]
        params = [local(p.detach()).to(e.dtype) for p, e in zip(net.parameters(), ema_params)]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            local(b_ema).copy_(local(b))
        self.num_updates += 1
        self._host_updates = self.updates() + 1

    def train(self, mode: bool = True) -> EMA:
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)
