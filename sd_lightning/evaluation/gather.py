"""Evaluation over ranks: which items a rank takes, and the rows of all ranks gathered once, in
the order of the items, whatever the number of ranks (``all_gather``: Lightning's, which stacks
the ranks' tensors; ``world == 1``: the tensor unchanged)."""

from __future__ import annotations

from collections.abc import Callable

import torch

AllGather = Callable[[torch.Tensor], torch.Tensor]
PAD = -1  # an index that pads a rank's share: generated (ranks stay in step), never counted


def padded_share(count: int, rank: int, world: int) -> list[int]:
    """The items of ``rank``: every ``world``-th from ``rank``, padded with ``PAD`` to the same
    length on every rank (a sharded U-Net needs every rank in every forward)."""
    mine = list(range(rank, count, world))
    return mine + [PAD] * (-(-count // world) - len(mine))


def _stacked(all_gather: AllGather, tensor: torch.Tensor, world: int) -> torch.Tensor:
    gathered = all_gather(tensor)
    return gathered.unsqueeze(0) if world == 1 else gathered


def gather_rows(
    all_gather: AllGather, rows: torch.Tensor, keys: torch.Tensor, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``rows`` (any number each) with their integer ``keys``, sorted by key."""
    count = torch.tensor([len(rows)], device=rows.device)
    most = int(_stacked(all_gather, count, world).max())
    padded = rows.new_zeros((most, *rows.shape[1:]))
    padded[: len(rows)] = rows
    marks = torch.full((most,), -1, dtype=torch.long, device=rows.device)
    marks[: len(keys)] = keys
    all_rows = _stacked(all_gather, padded, world).flatten(0, 1)
    all_keys = _stacked(all_gather, marks, world).flatten()
    kept = all_keys >= 0
    order = torch.argsort(all_keys[kept])
    return all_rows[kept][order], all_keys[kept][order]
