"""Command line: ``python -m sd_lightning stage=<stage> [overrides]``.

    # stage 1 on the embedded demo data (CPU or GPU)
    python -m sd_lightning experiment=demo
    # stage 1 on your shards, 4 nodes x 8 GPUs, logging to wandb
    python -m sd_lightning stage=vae vae=sd data.urls='/data/laion/{000000..012345}.tar' \\
        data.image_size=256 trainer.devices=8 trainer.num_nodes=4 logger=wandb
    # resume
    python -m sd_lightning stage=vae hydra.run.dir=outputs/vae/runs/X ckpt_path=outputs/vae/runs/X/checkpoints/last.ckpt
    # a sweep
    python -m sd_lightning -m experiment=demo model.optimizer.lr=1e-4,3e-4
"""

from __future__ import annotations

import hydra
from hydra.utils import get_method
from omegaconf import DictConfig

import sd_lightning  # noqa: F401 - registers the config resolvers


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run the stage's entry function (``cfg.entry``, set by the ``stage`` config group)."""
    metrics = get_method(cfg.entry)(cfg)
    objective = cfg.get("optimized_metric")
    return metrics.get(objective) if objective and isinstance(metrics, dict) else None


if __name__ == "__main__":
    main()
