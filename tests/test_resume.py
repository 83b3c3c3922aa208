"""Resume: a run stopped and resumed (ckpt_path=auto, the same run directory) ends with the same
weights and optimizer state as one that ran through; torn checkpoints are skipped; checkpoints
are written atomically."""

from __future__ import annotations

import pytest
import torch
from conftest import LDM_TINY, TINY, compose_config

from sd_lightning.commands.resume import newest_checkpoint, resolve_ckpt_path
from sd_lightning.commands.train import train
from sd_lightning.systems.checkpoint_io import AtomicCheckpointIO

pytestmark = pytest.mark.slow

# 8 batches per epoch (32 samples, batch 4, one process); validation every 4 steps
COMMON = ["trainer.val_check_interval=4", "callbacks.model_checkpoint.every_n_train_steps=4"]


def _overrides(stage: str, vae_ckpt) -> list[str]:
    if stage == "vae":  # the discriminator joins at step 6, so both optimizers are resumed
        return [*TINY, *COMMON, "loss.disc_start=6"]
    return [*LDM_TINY, *COMMON, f"vae_ckpt={vae_ckpt}", "model.ema_decay=0.9"]


def _final(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for slot_a, slot_b in zip(opt_a["state"].values(), opt_b["state"].values(), strict=True):
            for name, value in slot_a.items():
                assert torch.equal(value, slot_b[name]), name
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.mark.parametrize("stage", ["vae", "ldm"])
def test_resume_parity_interrupted_run_ends_like_an_uninterrupted_one(
    stage, tmp_path, data_dir, vae_ckpt
):
    overrides = _overrides(stage, vae_ckpt)
    through = tmp_path / "through"
    train(compose_config([*overrides, "trainer.max_steps=16"], through, data_dir))

    resumed = tmp_path / "resumed"
    train(compose_config([*overrides, "trainer.max_steps=8"], resumed, data_dir))
    assert _final(resumed)["global_step"] == 8
    train(compose_config([*overrides, "trainer.max_steps=16"], resumed, data_dir))  # auto
    assert _final(resumed)["global_step"] == 16
    _assert_same_state(_final(through), _final(resumed))
    if stage == "ldm":  # the EMA weights are in the state dict; their update count too
        assert any(k.startswith("ema.") for k in _final(resumed)["state_dict"])


def test_resume_mid_epoch_draws_a_new_stream_reproducibly(tmp_path, data_dir, vae_ckpt):
    overrides = _overrides("ldm", vae_ckpt)
    through = tmp_path / "through"
    train(compose_config([*overrides, "trainer.max_steps=12"], through, data_dir))
    finals = []
    for name in ("a", "b"):
        run = tmp_path / name
        train(compose_config([*overrides, "trainer.max_steps=5"], run, data_dir))
        train(compose_config([*overrides, "trainer.max_steps=12"], run, data_dir))
        finals.append(_final(run))
        assert finals[-1]["global_step"] == 12
        assert finals[-1]["WebDataModule"] == {"batches": 12}  # where the stream is
    _assert_same_state(finals[0], finals[1])  # a resume is reproducible...
    weights = finals[0]["state_dict"]
    other = _final(through)["state_dict"]  # ...and does not replay the epoch's first batches
    assert any(not torch.equal(weights[k], other[k]) for k in weights if k.startswith("unet."))


def test_newest_complete_checkpoint_skips_torn_files(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 10, "state_dict": {"w": torch.ones(3)}}, folder / "a.ckpt")
    io.save_checkpoint({"global_step": 30, "state_dict": {"w": torch.ones(3)}}, folder / "b.ckpt")
    io.save_checkpoint({"global_step": 20, "state_dict": {"w": torch.ones(3)}}, folder / "c.ckpt")
    assert newest_checkpoint(str(folder)) == str(folder / "b.ckpt")
    data = (folder / "b.ckpt").read_bytes()
    (folder / "b.ckpt").write_bytes(data[: len(data) // 2])  # torn: a crash mid-write
    (folder / "notes.txt").write_text("not a checkpoint")
    assert newest_checkpoint(str(folder)) == str(folder / "c.ckpt")
    assert "skipping" in caplog.text and "b.ckpt" in caplog.text
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]  # no temporary files left
    assert resolve_ckpt_path("auto", str(tmp_path / "nothing")) is None
    assert resolve_ckpt_path(None, str(folder)) is None
    with pytest.raises(
        ValueError, match="missing.ckpt' does not exist: .* ckpt_path=auto to resume"
    ):
        resolve_ckpt_path(str(tmp_path / "missing.ckpt"), str(folder))
