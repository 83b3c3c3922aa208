"""Resuming from the newest complete checkpoint of a run directory (checkpoints are written
atomically by :class:`sd_lightning.systems.checkpoint_io.AtomicCheckpointIO`).

``ckpt_path=auto`` (the default) looks in ``<run dir>/checkpoints`` for every ``*.ckpt`` (the
preemption checkpoint, ``last.ckpt``, the periodic ones; files, or folders of shards under
``trainer=fsdp``), opens each with
``torch.load(weights_only=True, mmap=True)`` (which reads the index, not the weights) and resumes
from the one with the highest step; a file that does not open (torn by a crash on a file system
without atomic rename, or foreign) is skipped with a warning. A fresh run directory has none and
starts from scratch, so a requeued SLURM job that reuses its run directory resumes by itself.
"""

from __future__ import annotations

import logging
import os

import torch

from sd_lightning.weights.files import read_weight_file, sharded_meta

log = logging.getLogger(__name__)


def checkpoint_step(path: str) -> int | None:
    """The ``global_step`` a checkpoint holds, or None when it cannot be read. A sharded checkpoint
    (a folder, ``trainer=fsdp``) is complete when it has the shards' index (``.metadata``, written
    after every shard) and Lightning's ``meta.pt`` (written last)."""
    try:
        if os.path.isdir(path):
            path = sharded_meta(path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(checkpoint["global_step"])
    except Exception as exn:  # noqa: BLE001 - any unreadable file is skipped, not fatal
        log.warning("resume: skipping %s, which does not load (%s)", path, exn)
        return None


def newest_checkpoint(folder: str) -> str | None:
    """The complete ``*.ckpt`` in ``folder`` with the highest step (the newest file on ties)."""
    if not os.path.isdir(folder):
        return None
    best: tuple[int, float, str] | None = None
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if not name.endswith(".ckpt") or name.startswith("."):  # .tmp files and folders
            continue
        step = checkpoint_step(path)
        if step is not None:
            key = (step, os.path.getmtime(path), path)
            best = key if best is None or key > best else best
    return best[2] if best else None


def check_resume_file(path: str, stage: str | None) -> str:
    """``ckpt_path=<file>``: a checkpoint (file or sharded folder) of ``stage``; its path."""
    of = f"a stage={stage} run" if stage else "this stage"
    expected = (
        f"a checkpoint of {of} (<run dir>/checkpoints/last.ckpt), ckpt_path=auto to resume from "
        "the run directory if it has one, or ckpt_path=null to start fresh"
    )
    found = read_weight_file(path, "ckpt_path", expected, mmap=True)
    if stage is not None:
        found.require_stage(stage, exports=False)
    return found.path


def resolve_ckpt_path(
    ckpt_path: str | None, checkpoint_dir: str, sharded: bool = False, stage: str | None = None
) -> str | None:
    """``auto``: the newest complete checkpoint in ``checkpoint_dir`` (None when there is none);
    ``null``: start fresh; anything else: that checkpoint, which must open (and, given ``stage``,
    be of that stage). ``sharded``: the run uses ``trainer=fsdp``; only then can it resume from a
    folder of shards."""
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "auto":
        found = newest_checkpoint(checkpoint_dir)
        if found:
            log.info("resume: continuing from %s (the newest complete checkpoint)", found)
        return _check_sharding(found, sharded)
    path = check_resume_file(str(ckpt_path), stage)
    return _check_sharding(path, sharded)


def _check_sharding(path: str | None, sharded: bool) -> str | None:
    if path and os.path.isdir(path) and not sharded:
        raise ValueError(
            f"ckpt_path={path!r} is a sharded checkpoint (a folder written by trainer=fsdp): "
            "resume it with trainer=fsdp, or start this run in another run directory "
            f"(hydra.run.dir=...); stage=sample ckpt={path} reads its weights"
        )
    return path
