"""A holder for frozen networks (LPIPS's VGG, later the VAE and the text encoder in stage 2).

The wrapped network is kept *outside* ``named_parameters`` and ``state_dict``: optimizers, DDP and
FSDP never see it, and checkpoints do not carry its weights (they come from their own files). It
still follows ``.to()``/``.cuda()``/``.half()`` and stays in eval mode whatever ``.train()`` says.
Gradients flow through it to its *inputs* (LPIPS needs that), never into its weights.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class Frozen(nn.Module):
    """``offload``: the network stays where it is (the CPU) whatever ``.to()`` says; its outputs
    are for the caller to move."""

    def __init__(self, net: nn.Module, offload: bool = False):
        super().__init__()
        if not getattr(net, "trains", False):  # a text encoder with LoRA adapters keeps them
            net.requires_grad_(False)
        net.eval()
        object.__setattr__(self, "net", net)  # deliberately not registered as a submodule
        self.offload = offload

    def _apply(self, fn, *args, **kwargs):
        if not self.offload:
            self.net._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True) -> Frozen:
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.net(*args, **kwargs)

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.net.parameters())
        return f"{type(self.net).__name__}, {n:,} frozen parameters (not in state_dict)"
