"""Preemption without a scheduler: a signal checkpoints once, stops cleanly and the same command
resumes; on two ranks (FSDP, real gloo processes) a signal to one rank stops both at the same step
with one sharded checkpoint. (The SLURM requeue path is in test_slurm.py.)"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from conftest import run_ldm_two_ranks

from sd_lightning.commands.resume import checkpoint_step
from sd_lightning.commands.train import train

pytestmark = pytest.mark.slow
SIGNAL_AT = "+callbacks.fault._target_=fault_injection.SignalAt"


def test_preempt_signal_checkpoints_once_stops_and_resumes(ldm_cfg_factory, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run = tmp_path / "run"
    cfg = ldm_cfg_factory("trainer.max_steps=6", SIGNAL_AT, "+callbacks.fault.step=2")
    cfg.paths.output_dir = str(run)
    train(cfg)
    # one checkpoint at the step the signal arrived in; no last.ckpt written after it
    assert sorted(os.listdir(run / "checkpoints")) == ["preempted-step00000003.ckpt"]
    assert "preemption: stopped at" in caplog.text  # not in SLURM: run the command again
    assert not (run / "export").exists()  # unfinished runs export nothing

    cfg = ldm_cfg_factory("trainer.max_steps=6")
    cfg.paths.output_dir = str(run)
    train(cfg)
    assert "resume: continuing from" in caplog.text and "preempted-step00000003" in caplog.text
    assert "weights_only" not in caplog.text  # resumed with weights_only=True, as everything
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6


def test_preempt_signal_to_one_fsdp_rank_stops_both_with_one_sharded_checkpoint(
    tmp_path, data_dir, vae_ckpt
):
    run = tmp_path / "run"

    def cli(*extra: str):
        out = run_ldm_two_ranks(
            run,
            data_dir,
            vae_ckpt,
            "trainer.precision=32-true",
            "trainer.max_steps=6",
            "trainer.num_sanity_val_steps=0",
            "+callbacks.fault.rank=1",
            *extra,
            trainer="fsdp",
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    # rank 1 alone gets SIGUSR1 during step 2: both ranks stop after it, one checkpoint folder
    cli(SIGNAL_AT, "+callbacks.fault.step=2")
    names = sorted(os.listdir(run / "checkpoints"))
    assert names == ["preempted-step00000003.ckpt"]
    folder = run / "checkpoints" / names[0]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} <= set(os.listdir(folder))
    assert checkpoint_step(str(folder)) == 3

    # the same command (with a callback that does nothing) resumes from it and finishes
    out = cli(SIGNAL_AT, "+callbacks.fault.step=-1")
    assert "resume: continuing from" in out.stdout + out.stderr
    assert checkpoint_step(str(run / "checkpoints" / "last.ckpt")) == 6
