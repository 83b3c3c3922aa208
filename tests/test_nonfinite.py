"""Non-finite gradients on one rank of two (real gloo processes): both ranks take the same
decision, skip and count the step, keep identical finite weights, never hang; too many in a row
stop both ranks with a checkpoint and a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_ldm_two_ranks

pytestmark = pytest.mark.slow
FSDP = "{_target_:sd_lightning.systems.strategy.FSDP2Strategy}"  # trainer=fsdp's strategy, here on trainer=debug


def _run(tmp_path, vae_ckpt, data_dir, *extra: str):
    run = tmp_path / "run"
    out = run_ldm_two_ranks(  # trainer=debug, its strategy set by each test
        run,
        data_dir,
        vae_ckpt,
        "+callbacks.fault._target_=fault_injection.NaNGradients",
        "+callbacks.fault.rank=1",
        *extra,
    )
    reports = [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]
    return out, run, reports


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_nan_on_one_rank_is_skipped_on_both(tmp_path, vae_ckpt, data_dir, strategy):
    out, run, reports = _run(
        tmp_path,
        vae_ckpt,
        data_dir,
        "trainer.max_steps=6",
        "+callbacks.fault.steps=[2,3]",
        # fsdp: the NaN lands in rank 1's shard of the reduced gradient, which rank 0 never sees
        f"trainer.strategy={'ddp' if strategy == 'ddp' else FSDP}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert reports[0] == reports[1]  # same decisions, same weights on both ranks
    assert reports[0]["skipped"] == 2 and reports[0]["finite_params"]
    assert reports[0]["global_step"] == 6
    assert "non-finite gradients on rank(s) [1] at step 2" in out.stdout + out.stderr


def test_nan_every_step_stops_both_ranks_with_a_checkpoint(tmp_path, vae_ckpt, data_dir):
    out, run, reports = _run(
        tmp_path,
        vae_ckpt,
        data_dir,
        "trainer.max_steps=20",
        "+callbacks.fault.from_step=2",
        "callbacks.nonfinite.max_consecutive=3",
        "trainer.strategy=ddp",
    )
    assert out.returncode != 0
    assert "3 optimizer steps in a row had non-finite gradients" in out.stderr
    assert reports[0] == reports[1] and reports[0]["skipped"] == 3
    saved = list((run / "checkpoints").glob("nonfinite-step*.ckpt"))
    assert len(saved) == 1
    state = torch.load(saved[0], weights_only=True)["state_dict"]
    assert all(v.isfinite().all() for k, v in state.items() if v.is_floating_point())
