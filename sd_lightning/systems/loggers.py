"""Logger factories that need more than a ``_target_``."""

from __future__ import annotations

import logging
import os
import uuid

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        path = os.environ.get("NETRC", os.path.expanduser("~/.netrc"))
        return os.path.isfile(path) and netrc.netrc(path).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def run_id(save_dir: str) -> str:
    """The wandb run id of this run directory: read from ``<save_dir>/wandb/run_id``, or made and
    written there (by rank 0) the first time."""
    path = os.path.join(save_dir, "wandb", "run_id")
    if os.path.isfile(path):
        with open(path) as f:
            found = f.read().strip()
        if found:
            return found
    return _new_run_id(save_dir)


def _new_run_id(save_dir: str) -> str:
    new = uuid.uuid4().hex[:8]  # wandb's form: 8 lower-case letters and digits
    if rank_zero_only.rank == 0:
        path = os.path.join(save_dir, "wandb", "run_id")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(new + "\n")
        os.replace(path + ".tmp", path)
    return new


def wandb_logger(save_dir: str, offline: bool | None = None, **kwargs) -> WandbLogger:
    """A ``WandbLogger`` that never prompts and never needs the network to start.

    ``offline=None`` (the default) logs online when an API key is configured (``WANDB_API_KEY`` or
    ``wandb login``) and ``WANDB_MODE`` does not say otherwise; else it logs offline into
    ``save_dir/wandb`` and says how to upload the run later.
    """
    os.makedirs(save_dir, exist_ok=True)
    mode = os.environ.get("WANDB_MODE")
    if offline is None:
        offline = mode in ("offline", "dryrun", "disabled") or (
            mode is None and not _has_wandb_key()
        )
    if offline:
        log.warning(
            "wandb: no API key found (or WANDB_MODE=%s): logging OFFLINE to %s/wandb. "
            "Upload later with `wandb sync %s/wandb/offline-run-*`, or run `wandb login` first.",
            mode or "offline",
            save_dir,
            save_dir,
        )
    os.environ.setdefault("WANDB_SILENT", "true")
    # wandb ignores settings given as a DictConfig (as Hydra passes them): a plain dict
    settings = kwargs.get("settings") or {}
    if OmegaConf.is_config(settings):
        settings = OmegaConf.to_container(settings, resolve=True)
    kwargs["settings"] = {"init_timeout": 90, **settings}  # bound a stalled network
    if kwargs.get("id") is None:  # a requeued or resumed job continues the same wandb run
        kwargs["id"] = run_id(save_dir)
        kwargs.setdefault("resume", "allow")
    return FallbackWandbLogger(save_dir=save_dir, offline=offline, **kwargs)


class FallbackWandbLogger(WandbLogger):
    """A ``WandbLogger`` that falls back to offline mode when ``wandb.init`` fails online
    (no network, server down, bad key) instead of crashing the run."""

    @property
    def experiment(self):
        if self._experiment is None and not self._offline:
            try:
                return super().experiment
            except Exception as err:  # noqa: BLE001 - any failure to reach wandb
                log.warning(
                    "wandb: could not start an online run (%s); logging OFFLINE to %s/wandb instead. "
                    "Upload later with `wandb sync %s/wandb/offline-run-*`.",
                    err,
                    self.save_dir,
                    self.save_dir,
                )
                self._offline = True
                self._wandb_init["mode"] = "offline"
                # wandb's service still holds the failed run's id: the offline run gets a new
                # one, which the run directory keeps for the next (requeued) job
                self._wandb_init["id"] = _new_run_id(self.save_dir)
                self._experiment = None
        return super().experiment
