"""Stage 1 under DDP: two real CPU processes (gloo) launched by Lightning from the Hydra CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli
from test_cli import CLI_TINY

pytestmark = pytest.mark.slow


def test_vae_trains_with_ddp_on_two_processes(tmp_path):
    run = tmp_path / "run"
    out = run_cli(
        "stage=vae",
        *CLI_TINY,
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={run}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.max_steps=3",
        "loss.disc_start=1",  # both optimizers step, the discriminator idles on step 0
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "world_size: 2" in out.stdout + out.stderr or "GLOBAL_RANK: 1" in out.stdout + out.stderr
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
