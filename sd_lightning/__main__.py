"""Command line: ``python -m sd_lightning stage=<stage> [overrides]``.

    # stage 1 on the embedded demo data (CPU or GPU)
    python -m sd_lightning experiment=demo_vae
    # stage 1 on your shards, 4 nodes x 8 GPUs, logging to wandb
    python -m sd_lightning stage=vae vae=sd data.urls='/data/laion/{000000..012345}.tar' \\
        data.image_size=256 trainer.devices=8 trainer.num_nodes=4 logger=wandb
    # resume in the same run directory
    python -m sd_lightning stage=vae hydra.run.dir=outputs/vae/runs/X \\
        ckpt_path=outputs/vae/runs/X/checkpoints/last.ckpt
    # a sweep
    python -m sd_lightning -m experiment=demo_vae model.optimizer.lr=1e-4,3e-4
    # stage 2 on a stage-1 checkpoint, then images from prompts
    python -m sd_lightning stage=ldm vae_ckpt=outputs/vae/runs/X/checkpoints/last.ckpt
    python -m sd_lightning stage=sample ckpt=outputs/ldm/runs/Y/checkpoints/last.ckpt \
        prompts='["a red circle at the top left", "a blue square"]' steps=50 guidance=7.5
"""

from __future__ import annotations

import logging
import re
import sys

import hydra
from hydra.utils import get_method
from omegaconf import DictConfig

import sd_lightning  # noqa: F401 - registers the config resolvers
from sd_lightning.core import stopping
from sd_lightning.core.console import tidy_console
from sd_lightning.core.errors import InputError

# `key=/data/{000000..012345}.tar`: a WebDataset brace pattern, which Hydra's override grammar would
# read as a dict. Such values are quoted for Hydra, so shard lists can be passed as users write them.
_BRACE_VALUE = re.compile(
    r"^(?P<key>[+~]{0,2}[\w.\-/@]+)=(?P<value>[^'\"].*\{[^{}:]*(\.\.|,)[^{}:]*\}.*)$"
)


def quote_brace_patterns(args: list[str]) -> list[str]:
    """Quote override values holding brace-expansion patterns (left alone if already quoted)."""
    out = []
    for arg in args:
        m = _BRACE_VALUE.match(arg)
        if m and not m["key"].startswith("hydra."):
            value = m["value"].replace("\\", "\\\\").replace("'", "\\'")
            arg = f"{m['key']}='{value}'"
        out.append(arg)
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Run the stage's entry function (``cfg.entry``, set by the ``stage`` config group). Bad
    input (an option, a file, shards without usable samples) ends the run with its message and
    no traceback, on the console and in the run's log."""
    try:
        if cfg.get("preflight"):  # the stage's checks, before its imports (Lightning: seconds)
            get_method(cfg.preflight)(cfg)
        tidy_console()
        metrics = get_method(cfg.entry)(cfg)
    except stopping.Stopped as stop:
        stopped(stop)
        raise SystemExit(stop.status) from None
    except Exception as exn:
        cause = input_error(exn)
        if cause is None:
            raise
        report(cause)
        raise SystemExit(1) from None
    objective = cfg.get("optimized_metric")
    return metrics.get(objective) if objective and isinstance(metrics, dict) else None


def input_error(exn: BaseException | None) -> InputError | None:
    """The :class:`InputError` behind ``exn`` (Hydra wraps what a constructor raises), if any."""
    while exn is not None and not isinstance(exn, InputError):
        exn = exn.__cause__
    return exn


def report(exn: InputError) -> None:
    """``Error: <message>`` on stderr, and as an ERROR record in the run's log file."""
    # one write of the whole line: ranks sharing a stderr pipe never splice their messages
    sys.stderr.write(f"Error: {exn}\n")
    sys.stderr.flush()
    record = logging.LogRecord("sd_lightning", logging.ERROR, __file__, 0, "%s", (exn,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def stopped(stop: stopping.Stopped) -> None:
    """One line for a command stopped by a signal outside the training loop; under SLURM (not
    Ctrl-C) the job is requeued, and the next run goes on from what was finished."""
    from sd_lightning.callbacks.preemption import in_slurm_batch_job, requeue_slurm_job

    logging.getLogger("sd_lightning").warning(
        "stopped by %s during %s; what was finished is kept: run the same command again to go on",
        stop.signal_name,
        stop.where,
    )
    if stop.signal_name != "SIGINT" and in_slurm_batch_job():
        requeue_slurm_job()


def main() -> None:
    sys.argv[1:] = quote_brace_patterns(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
