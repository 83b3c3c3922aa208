"""``trainer=fsdp``: Lightning's ``ModelParallelStrategy`` as fully sharded data parallelism (FSDP2)
over every process, with a mixed precision policy and checkpoints that are never torn.

The system shards itself in ``configure_model`` (``LatentDiffusionSystem``: each U-Net block and
the EMA copy, ``models/parallel.py``) with this strategy's device mesh and ``mp_policy``; the
frozen VAE and text encoder stay whole on every rank and out of the optimizer.

Checkpoints are folders (``last.ckpt/``: one ``.distcp`` shard per rank, ``.metadata``, and
``meta.pt`` with the step, loops, callbacks and ``sd_lightning`` entries), written by every rank
into ``.<name>.tmp`` and moved into place by rank 0 once all shards and ``meta.pt`` are complete,
so a job killed while saving leaves the previous checkpoint intact. ``ckpt_path=auto`` resumes from
them (``resume.py``); ``stage=sample ckpt=`` reads them on one process.
``save_distributed_checkpoint=false`` gathers one ordinary ``.ckpt`` file on rank 0 instead.

Stage 1 (``stage=vae``) trains two networks with manual optimization and stays on DDP
(``trainer=ddp``): at 84M parameters it does not need sharding.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden

from sd_lightning.models.parallel import mixed_precision_policy


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all ranks (no tensor parallelism by default).

    Args:
        param_dtype: dtype of the all-gathered weights and the forward/backward compute:
            ``auto`` = ``bfloat16`` when ``trainer.precision`` is ``bf16-*``, else as stored
            (float32); or ``bfloat16`` / ``float32``.
        reduce_dtype: dtype in which gradients are reduce-scattered (``float32``).
        reshard_after_forward: free gathered weights after each block's forward (ZeRO-3; less
            memory) or keep them for backward (ZeRO-2; one all-gather less per block).
        data_parallel_size / tensor_parallel_size: the device mesh; ``auto`` shards over the
            whole world (every GPU of every node).
        save_distributed_checkpoint: one shard per rank (``true``) or one gathered file.
    """

    def __init__(
        self,
        param_dtype: str | None = "auto",
        reduce_dtype: str | None = "float32",
        reshard_after_forward: bool = True,
        data_parallel_size: int | str = "auto",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = True,
        **kwargs: Any,
    ):
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )
        mixed_precision_policy(None if param_dtype == "auto" else param_dtype, reduce_dtype)
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.reshard_after_forward = reshard_after_forward

    @property
    def mp_policy(self):
        """The ``MixedPrecisionPolicy`` the system passes to ``fully_shard``."""
        dtype = self.param_dtype
        if dtype == "auto":
            precision = str(getattr(self.precision_plugin, "precision", "32-true"))
            dtype = "bfloat16" if precision.startswith("bf16") else None
        return mixed_precision_policy(dtype, self.reduce_dtype)

    @property
    def shard_mesh(self):
        """The 1-D mesh the weights are sharded over (the data-parallel dimension)."""
        return self.device_mesh["data_parallel"]

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer) -> None:
        if not is_overridden("configure_model", self.lightning_module):
            raise TypeError(
                f"trainer=fsdp shards what the system's configure_model() shards, and "
                f"{type(self.lightning_module).__name__} has none: only stage=ldm is sharded; "
                "use trainer=ddp here (stage=vae trains the autoencoder and the discriminator "
                "with manual optimization, on DDP)"
            )
        super().setup(trainer)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None
    ) -> None:
        if not self._save_distributed_checkpoint:  # one file through the (atomic) CheckpointIO
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(os.fspath(filepath)))
        tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
        if self.is_global_zero:
            _remove(tmp)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)  # every rank writes its shard
        self.barrier()  # all shards and meta.pt are on disk
        if self.is_global_zero:
            _remove(old)
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        self.barrier()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
