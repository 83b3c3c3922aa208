"""Probes for tests, added to a real run as a callback from the command line (with ``tests/`` on
``PYTHONPATH``), that record what each rank holds at the end:

    python -m sd_lightning ... +callbacks.probe._target_=probes.RankState
"""

from __future__ import annotations

import json
import os

import lightning as L
import torch


class RankState(L.Callback):
    """Writes ``<run dir>/state<rank>.json``: every buffer of the modules named in ``buffers_of``
    and, per top-level network, the sum and the sum of squares of its parameters (replicas kept
    equal by DDP give the same numbers on every rank)."""

    def __init__(self, buffers_of: list[str] = ("latent_norm",), nets: list[str] = ("unet", "vae")):
        self.buffers_of, self.nets = list(buffers_of), list(nets)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record: dict[str, object] = {"rank": trainer.global_rank, "step": trainer.global_step}
        for name in self.buffers_of:
            module = pl_module.get_submodule(name)
            for key, value in module.state_dict().items():
                record[f"{name}.{key}"] = value.double().flatten().tolist()
        for name in self.nets:
            params = [p.detach().double() for p in pl_module.get_submodule(name).parameters()]
            record[f"{name}.sum"] = float(sum(p.sum() for p in params))
            record[f"{name}.sumsq"] = float(sum(p.pow(2).sum() for p in params))
        path = os.path.join(trainer.default_root_dir, f"state{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump(record, f)
        torch.distributed.barrier() if torch.distributed.is_initialized() else None


BLOCKING = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


class HostSyncs(L.Callback):
    """Counts the tensor calls that block the host on a GPU (a value read back: ``item``,
    ``tolist``, ``bool``, ``float``, ``int``, ``cpu``, ``numpy``) made in whole training
    iterations from step ``start`` to step ``stop`` (data loading, the step, every callback and
    the logging between), with the frame outside torch and Lightning that asked, and writes
    ``<run dir>/syncs.json``. Torch's methods are wrapped for the span, never our code."""

    def __init__(self, start: int = 4, stop: int = 12):
        self.start, self.stop = start, stop
        self.calls: list[dict] = []
        self._originals: dict[str, object] = {}
        self._step: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.start:
            self._patch()
        if step == self.stop:
            self._unpatch(trainer)
        self._step = step

    def on_train_end(self, trainer, pl_module) -> None:
        self._unpatch(trainer)

    def _patch(self) -> None:
        import traceback

        probe = self

        def wrap(name, original):
            def counted(tensor, *args, **kwargs):
                if not getattr(counted, "busy", False):
                    counted.busy = True
                    try:
                        frames = traceback.extract_stack()[:-1]
                        ours = [f for f in frames if "site-packages" not in f.filename]
                        where = ours[-1] if ours else frames[-1]
                        lightning = next(
                            (f for f in reversed(frames) if "/lightning/" in f.filename), None
                        )
                        chain = [
                            f"{f.filename.split('/lightning/')[-1]}:{f.lineno}:{f.name}"
                            for f in frames
                            if "/lightning/" in f.filename
                        ][-12:]
                        probe.calls.append(
                            {
                                "step": probe._step,
                                "call": name,
                                "where": f"{os.path.relpath(where.filename)}:{where.lineno}",
                                "lightning": f"{lightning.filename.split('/lightning/')[-1]}:{lightning.lineno}"
                                if lightning
                                else None,
                                "chain": chain,
                            }
                        )
                    finally:
                        counted.busy = False
                return original(tensor, *args, **kwargs)

            return counted

        for name in BLOCKING:
            original = getattr(torch.Tensor, name)
            self._originals[name] = original
            setattr(torch.Tensor, name, wrap(name, original))

    def _unpatch(self, trainer) -> None:
        if not self._originals:
            return
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        self._originals = {}
        path = os.path.join(trainer.default_root_dir, "syncs.json")
        with open(path, "w") as f:
            json.dump({"start": self.start, "stop": self.stop, "calls": self.calls}, f, indent=1)
