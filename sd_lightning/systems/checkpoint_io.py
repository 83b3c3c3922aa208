"""Checkpoint files that survive being killed: written to a temporary file beside the target,
synced and renamed over it; read back with ``weights_only=True``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, ``fsync``, then ``os.replace``: a
    reader (or a resumed job) sees the old checkpoint or the new one, never half of one. Lightning's
    own save goes through a temporary file in ``/tmp`` and a move, which is a copy, not atomic,
    when the run directory is on another file system (NFS, Lustre)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Resuming loads with ``weights_only=True``, as everything here does (our checkpoints
        hold tensors and plain values only; Lightning's default would unpickle anything)."""
        kwargs = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(path, weights_only=True, **kwargs)


def checkpoint_folder(trainer) -> str:
    """Where the run's checkpoints go: the ModelCheckpoint's folder, else
    ``<root>/checkpoints``."""
    folder = getattr(trainer.checkpoint_callback, "dirpath", None)
    return folder or os.path.join(trainer.default_root_dir, "checkpoints")
