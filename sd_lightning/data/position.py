"""Where the training stream is: the batches trained so far, counted on the device side and saved
in checkpoints, so a resumed run continues the sequence of data epochs (shared by the shard and
folder data modules)."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader, get_worker_info

from sd_lightning.data.transforms import to_model_range


def node_rank() -> tuple[int, int]:
    """(rank, world size) of this training process: torch.distributed's, else ``RANK`` and
    ``WORLD_SIZE``, else (0, 1). Call it in the training process: a DataLoader worker started
    by spawn or forkserver has no process group (datasets record it in ``set_epoch``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def worker_share() -> tuple[int, int]:
    """(worker id, workers) of the DataLoader worker this runs in; (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class EpochLoader(DataLoader):
    """A DataLoader that tells its dataset where the run is before each pass (``position_fn``:
    the data epoch, and the batches of it already trained), so streams differ per epoch and a
    resumed run continues the sequence."""

    def __init__(self, *args, position_fn, **kwargs):
        super().__init__(*args, **kwargs)
        self._position_fn = position_fn

    def __iter__(self):
        self.dataset.set_epoch(*self._position_fn())
        return super().__iter__()


class PositionedDataModule(L.LightningDataModule):
    """The data epoch and the seeds of its streams follow from the batches trained so far
    (counted here, saved in checkpoints), not from Lightning's epoch counter, whose bookkeeping
    around a checkpoint written at the end of an epoch differs between a run and its resumption.
    Subclasses define :meth:`batches_per_epoch`."""

    def __init__(self):
        super().__init__()
        self._trained = 0  # training batches of this rank so far, over all epochs

    def batches_per_epoch(self) -> int:
        raise NotImplementedError

    def state_dict(self) -> dict[str, int]:
        return {"batches": self._trained}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._trained = int(state["batches"])

    def _stream_position(self) -> tuple[int, int]:
        """(data epoch, batches of it already trained) for the train loader's next pass."""
        return divmod(self._trained, self.batches_per_epoch())

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Images travel as uint8 and become float in [-1, 1] on the device."""
        if self.trainer is not None and self.trainer.training:
            self._trained += 1  # batches that reached training, not prefetched ones
        if isinstance(batch, dict) and "image" in batch:
            batch["image"] = to_model_range(batch["image"])
        return batch

    def train_loader(self, dataset) -> EpochLoader:
        """The training DataLoader of a dataset that batches itself and takes ``set_epoch``."""
        return EpochLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            position_fn=self._stream_position,
        )

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1
