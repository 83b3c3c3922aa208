"""``train(cfg)`` in-process, the way the CLI calls it."""

from __future__ import annotations

import torch

from sd_lightning.commands.train import train


def test_train_without_logger_returns_metrics_and_writes_checkpoint(cfg_factory, tmp_path):
    cfg = cfg_factory(
        "logger=none", "trainer.max_steps=2", "callbacks.model_checkpoint.every_n_train_steps=1"
    )
    metrics = train(cfg)
    assert "val/psnr" in metrics and metrics["val/psnr"] > 0
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
    assert (tmp_path / "run" / "export" / "vae.safetensors").is_file()
