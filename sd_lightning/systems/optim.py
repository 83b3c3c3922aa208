"""The stage-2 optimizer and what makes it fit a card: AdamW; bitsandbytes' 8-bit AdamW
(``model.optimizer.eight_bit=true``), whose two moment buffers take a quarter of the memory
(SD 1.5's U-Net: 6.9 GB -> 1.7 GB; CUDA and ``pip install bitsandbytes``); Adafactor
(``model.optimizer.name=adafactor``, ``torch.optim.Adafactor``: factored second moments, no first
moment, a few MB for any U-Net); and any of them stepped inside the backward pass
(``model.optimizer.step_in_backward=true``, :class:`StepInBackward`), so the gradients of the
whole U-Net never exist at once.

    python -m sd_lightning stage=ldm pretrained=sd_xl_base_1.0.safetensors \\
        model.optimizer.name=adafactor model.optimizer.step_in_backward=true ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch

from sd_lightning.core.errors import InputError

NAMES = ("adamw", "adafactor")


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str = "adamw",
    eight_bit: bool = False,
    fused: bool | None = None,
    step_in_backward: bool = False,
    max_grad_norm: float | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params`` (``lr``, ``weight_decay`` and, for AdamW,
    ``betas`` and ``eps`` in ``kwargs``); ``step_in_backward``: one per parameter, stepped by
    :class:`StepInBackward` as each gradient is ready, each gradient clipped to
    ``max_grad_norm`` by its own norm (``trainer.gradient_clip_val``; a global norm needs every
    gradient at once)."""
    params = [p for p in params if p.requires_grad]
    if name not in NAMES:
        raise InputError(f"model.optimizer.name={name!r}: choose adamw or adafactor")
    if name == "adafactor":
        if eight_bit:
            raise InputError(
                "model.optimizer.eight_bit=true is 8-bit AdamW; Adafactor keeps factored moments "
                "already: set model.optimizer.eight_bit=false"
            )
        # torch's Adafactor takes no betas or eps of AdamW's form: lr (a relative step size,
        # scaled by each parameter's RMS) and weight decay
        kwargs = {k: kwargs[k] for k in ("lr", "weight_decay") if k in kwargs}
        make: Callable = partial(torch.optim.Adafactor, foreach=False, **kwargs)
    elif eight_bit:
        make = partial(_adamw_8bit, **kwargs)
    else:
        # one kernel per optimizer: a fused AdamW per parameter gains nothing
        make = partial(torch.optim.AdamW, fused=None if step_in_backward else fused, **kwargs)
    if step_in_backward:
        return StepInBackward(params, make, max_grad_norm)
    return make(params)


def adamw(params: Iterable[torch.nn.Parameter], **kwargs: Any) -> torch.optim.Optimizer:
    """:func:`make_optimizer` under the name configs stored by earlier versions use."""
    return make_optimizer(params, **kwargs)


def _adamw_8bit(params: list[torch.nn.Parameter], **kwargs: Any) -> torch.optim.Optimizer:
    if not all(p.device.type == "cuda" for p in params):
        raise InputError(
            "model.optimizer.eight_bit=true needs the parameters on a CUDA GPU (bitsandbytes' "
            "8-bit AdamW); on this machine use model.optimizer.eight_bit=false"
        )
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise InputError(
            "model.optimizer.eight_bit=true needs bitsandbytes: pip install bitsandbytes "
            "(or model.optimizer.eight_bit=false)"
        ) from e
    return bnb.optim.AdamW8bit(params, **kwargs)


class StepInBackward(torch.optim.Optimizer):
    """One optimizer per parameter, each stepped (and its gradient freed) by a hook the moment
    backward has accumulated that parameter's gradient (``register_post_accumulate_grad_hook``;
    PyTorch's optimizer-in-backward recipe, kohya's ``--fused_backward_pass``): at most one
    parameter's gradient is alive, instead of the whole U-Net's (SDXL's: 10 GB in float32).

    To Lightning it is one optimizer of one parameter group: ``step(closure)`` runs the closure
    (forward and backward, during which the hooks step), an LR scheduler sets the group's
    ``lr``, which each parameter's optimizer takes before it steps, and ``state_dict`` holds
    every parameter's state (checkpoints resume exactly). ``max_grad_norm`` clips each gradient
    by its own norm, as kohya's does. ``skip`` (set by the non-finite guard from the loss before
    backward) frees the gradients without a step. What needs all gradients at once is refused
    before training (``commands.options``): accumulation, float16's loss scaling, more than one
    device (DDP would step on unreduced gradients)."""

    SYNCED = ("lr", "weight_decay")

    def __init__(
        self, params: list[torch.nn.Parameter], make: Callable, max_grad_norm: float | None = None
    ):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                raise InputError(
                    "model.optimizer.step_in_backward=true runs on one device: each rank would "
                    "step on its own gradients before they are averaged; use it with "
                    "trainer.devices=1, or turn it off for multi-GPU runs"
                )
        self.optimizers = [make([p]) for p in params]
        super().__init__(params, dict(self.optimizers[0].defaults))
        self.max_grad_norm, self.skip = max_grad_norm, False
        self._hooks = [
            p.register_post_accumulate_grad_hook(partial(self._step_one, opt))
            for p, opt in zip(params, self.optimizers)
        ]

    def _step_one(self, optimizer: torch.optim.Optimizer, param: torch.nn.Parameter) -> None:
        if not self.skip:
            group, theirs = self.param_groups[0], optimizer.param_groups[0]
            for key in self.SYNCED:
                if key in theirs:
                    theirs[key] = group[key]
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)
            optimizer.step()
        param.grad = None

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Any:
        """The closure's loss; the parameters stepped in its backward."""
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: every gradient is freed as its parameter steps."""

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "per_parameter": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = state_dict["per_parameter"]
        if len(inner) != len(self.optimizers):
            raise InputError(
                f"the checkpoint's optimizer stepped {len(inner)} parameters in backward, this "
                f"run {len(self.optimizers)}: resume with the same model and fine-tuning method"
            )
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "per_parameter"})
        for optimizer, state in zip(self.optimizers, inner):
            optimizer.load_state_dict(state)


def clipped_step(system: Any, optimizer: Any, clip: float | None) -> None:
    """Manual optimization's step of one optimizer (stage 1, REPA-E): its gradients' norm
    clipped to ``clip`` (``None``/0: not clipped) through Lightning, the step, the gradients
    dropped."""
    if clip:
        system.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
