"""The demo model, trained once per test session: both stages on the demo data at 32 px (the
demo's own configs, shortened), then exported as a diffusers folder that fine-tunes start from
with ``pretrained=``. Used by the prompt-following and the fine-tuning learning checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conftest import compose_config

SMALL = [  # 32 px images, 8x8 latents: the demo at a quarter of its pixels
    "logger=none",
    "data.image_size=32",
    "data.demo.image_size=32",
    "trainer.limit_val_batches=0",
    "trainer.num_sanity_val_steps=0",
    "callbacks.model_checkpoint.every_n_train_steps=100000",
]


@dataclass
class DemoModel:
    ckpt: Path  # the stage-2 checkpoint
    folder: Path  # its diffusers export (no text encoder: the random tower is the stage's default)


def train_demo_model(root: Path, data_dir: Path) -> DemoModel:
    from sd_lightning.commands.export import export
    from sd_lightning.commands.train import train

    vae_run, ldm_run = root / "vae", root / "ldm"
    train(
        compose_config([*SMALL, "experiment=demo_vae", "trainer.max_steps=350"], vae_run, data_dir)
    )
    ckpt = vae_run / "checkpoints" / "last.ckpt"
    overrides = [*SMALL, "experiment=demo_ldm", f"vae_ckpt={ckpt}", "trainer.max_steps=800"]
    train(compose_config(overrides, ldm_run, data_dir))
    ckpt, folder = ldm_run / "checkpoints" / "last.ckpt", root / "diffusers"
    cfg = compose_config(
        ["stage=export", f"ckpt={ckpt}", "format=diffusers", f"output={folder}"],
        root / "export",
        data_dir,
    )
    export(cfg)
    return DemoModel(ckpt, folder)
