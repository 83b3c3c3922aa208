"""The steady-state stage-2 step through the real Trainer (EMA, the NaN guard, clipping, logging,
the progress bar, preemption) reads nothing back from the device but at logging steps: counted
by a probe that wraps torch's blocking calls (tests/probes.py) over whole iterations after
warm-up. On a GPU each such read makes the host wait until the device has finished all it was
given; reads at one logging step cost one wait."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import LDM_TINY, compose_config

pytestmark = pytest.mark.slow


def test_the_steady_state_step_waits_for_the_device_only_to_log(tmp_path, data_dir, vae_ckpt):
    from sd_lightning.commands.train import train

    every, start, stop = 4, 4, 12
    cfg = compose_config(
        [
            *LDM_TINY,
            f"vae_ckpt={vae_ckpt}",
            "logger=csv",
            f"trainer.max_steps={stop + 2}",
            f"trainer.log_every_n_steps={every}",
            "trainer.val_check_interval=1000",
            "trainer.limit_val_batches=0",
            "+callbacks.syncs._target_=probes.HostSyncs",
            f"+callbacks.syncs.start={start}",
            f"+callbacks.syncs.stop={stop}",
        ],
        tmp_path / "run",
        data_dir,
    )
    train(cfg)
    calls = json.loads((tmp_path / "run" / "syncs.json").read_text())["calls"]
    # the loader's own reads are of host tensors (the next batch is made on the CPU)
    calls = [c for c in calls if "combined_loader" not in str(c["lightning"])]
    where = Counter((c["step"], c["call"], c["where"], c["lightning"]) for c in calls)
    reading = sorted({c["step"] for c in calls})  # the steps where the host waited
    assert len(reading) <= (stop - start) // every, where.most_common(12)
    assert all(b - a == every for a, b in zip(reading, reading[1:])), reading
    assert not [c for c in calls if c["where"].startswith("sd_lightning/systems")], where
