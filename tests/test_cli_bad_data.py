"""Shards without a usable sample stop a two-rank run (real gloo processes) within a bounded time,
with one message per rank naming the shards and the reasons, and a log that stays small: zip
files named .tar, empty files, images without captions, a failing ``pipe:`` command."""

from __future__ import annotations

import time

import pytest
from bad_shards import BAD_KINDS, BAD_MESSAGES, bad_shards
from conftest import run_cli_all
from test_cli import CLI_TINY

pytestmark = pytest.mark.slow


def test_shards_without_usable_samples_stop_both_ranks_with_the_reason(tmp_path):
    common = [
        "stage=vae",
        *[a for a in CLI_TINY if not a.startswith("data.num_workers")],
        "data.num_workers=1",
        "data.val_shards=0",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.max_steps=5",
    ]
    runs = {kind: tmp_path / kind for kind in BAD_KINDS}
    commands = [
        [*common, f"data.urls={bad_shards(tmp_path / 'shards', kind)}", f"hydra.run.dir={run}"]
        for kind, run in runs.items()
    ]
    started = time.monotonic()
    results = run_cli_all(commands, timeout=240)  # a hang fails here
    elapsed = time.monotonic() - started
    for (kind, run), out in zip(runs.items(), results):
        where = f"{kind}: {out.stderr[-3000:]}"
        assert out.returncode == 1, where
        errors = [line for line in out.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 2, where  # one per rank
        for line in errors:
            assert line.startswith("Error: 0 usable samples from 8 shards in a row (rank "), where
            assert BAD_MESSAGES[kind] in line and "Shards: " in line, where
        assert "Traceback" not in out.stderr, where
        assert len(out.stdout) + len(out.stderr) < 20_000, where  # no flood
        log = sum(p.stat().st_size for p in run.glob("*.log"))
        assert 0 < log < 10_000, where
        assert not (run / "checkpoints").exists()
    assert elapsed < 200
