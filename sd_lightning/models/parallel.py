"""Sharding (FSDP2) and compiling the U-Net, plain PyTorch.

``fully_shard_unet`` applies ``torch.distributed.fsdp.fully_shard`` to every block of the U-Net
(each entry of ``input_blocks``, ``middle_block``, each of ``output_blocks``) and then to the root,
which keeps ``time_embed`` and ``out``: a block's weights are all-gathered just before its forward
and freed after it (and again for backward), gradients are reduce-scattered per block, and the
optimizer sees only this rank's shard. Parameter names do not change (``input_blocks.1.0...``), so
checkpoints and exports keep the single-file layout.

``compile_unet`` compiles every layer of every block in place (``nn.Module.compile``), again
without changing a parameter name; FSDP's hooks sit on the blocks, outside the compiled code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

RECOMPILE_LIMIT = 64
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """The U-Net's blocks in forward order: the units that are sharded and compiled."""
    return [*unet.input_blocks, unet.middle_block, *unet.output_blocks]


def mixed_precision_policy(param_dtype: str | None, reduce_dtype: str | None = "float32"):
    """FSDP2's ``MixedPrecisionPolicy``: weights all-gathered and computed in ``param_dtype``
    (``None``: as stored, float32), gradients reduced in ``reduce_dtype``; the sharded weights
    the optimizer updates stay float32 either way."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
        if value is not None and value not in DTYPES:
            raise ValueError(
                f"trainer.strategy.{name}={value!r}: choose one of {sorted(DTYPES)} or null"
            )
    return MixedPrecisionPolicy(
        param_dtype=DTYPES[param_dtype] if param_dtype else None,
        reduce_dtype=DTYPES[reduce_dtype] if reduce_dtype else None,
    )


def fully_shard_unet(
    unet: nn.Module, mesh: Any, mp_policy: Any = None, reshard_after_forward: bool = True
) -> nn.Module:
    """Shard ``unet`` in place over the 1-D device ``mesh``, one FSDP unit per block."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # FSDP2 shards contiguous parameters only: NHWC weights go back to NCHW (the activations
    # stay NHWC when ``unet.channels_last`` is set, and the convolutions follow them)
    unet.to(memory_format=torch.contiguous_format)
    kwargs = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": mp_policy or MixedPrecisionPolicy(),
    }
    for block in unet_blocks(unet):
        fully_shard(block, **kwargs)
    fully_shard(unet, **kwargs)  # the rest: time_embed, out
    return unet


def is_sharded(module: nn.Module) -> bool:
    return any(is_dtensor(p) for p in module.parameters())


def is_dtensor(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (a DTensor), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole ``state_dict`` on the CPU; for a sharded module, a collective that every rank
    must call (the shards are gathered)."""
    state = module.state_dict()
    if any(is_dtensor(v) for v in state.values()):
        state = {k: v.full_tensor() if is_dtensor(v) else v for k, v in state.items()}
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


COMPILE_SCOPES = ("layers", "model")


def check_compile_scope(scope: str) -> None:
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"model.compile_scope={scope!r}: choose one of {list(COMPILE_SCOPES)}")


def compile_unet(unet: nn.Module, scope: str = "layers", **options: Any) -> nn.Module:
    """``torch.compile`` the U-Net in place (``options``: ``mode``, ``dynamic``, ``fullgraph``...);
    parameter names and ``state_dict`` keys stay the same.

    ``scope="layers"``: each layer of each block is compiled on its own, so FSDP's per-block
    hooks and DDP's gradient buckets stay outside the compiled code. Layers of one class but
    other widths (SD 1.5 has 12 kinds of ResNet block) are compiled one version each; Dynamo's
    default of 8 versions per function would leave the rest eager, so the limit is raised
    (process-wide) to at least ``RECOMPILE_LIMIT``. ``scope="model"``: the whole forward is one
    graph (fusions across layers, and CUDA graphs with ``mode="reduce-overhead"``); not with
    FSDP."""
    check_compile_scope(scope)
    if scope == "model":
        unet.compile(**options)
        return unet
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    for block in unet_blocks(unet):
        for layer in block:
            layer.compile(**options)
    return unet
