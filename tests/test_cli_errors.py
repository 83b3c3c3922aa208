"""Bad input on the command line, as a user meets it: files that are not checkpoints, a run
directory that holds another run, values out of range, Ctrl-C. Each error names the option, the
file or the value and the fix, prints no traceback, and nothing already written is touched.
(Shards without usable samples: test_cli_bad_data.py.)"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import LDM_TINY, run_cli, run_cli_all, start_cli
from test_cli import CLI_TINY

pytestmark = pytest.mark.slow

CLI_LDM = [o for o in LDM_TINY if not o.startswith(("logger=", "stage="))] + ["logger=csv"]


def _check(results, cases) -> None:
    for out, (args, message) in zip(results, cases):
        where = f"{args[:2]}: {out.stderr[-2000:]}"
        assert out.returncode == 1, where
        assert message in out.stderr, where
        assert "Traceback" not in out.stderr, where  # the message alone


def test_files_that_are_not_checkpoints_are_refused_naming_the_option(tmp_path, vae_ckpt, ldm_ckpt):
    text = tmp_path / "notes.ckpt"
    text.write_text("step 5000 looked good\n")
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(vae_ckpt.read_bytes()[:4096])  # an interrupted copy
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1e-4)}, pickled)
    export = ldm_ckpt.parent.parent / "export" / "ldm.safetensors"
    vae = ["stage=vae", *CLI_TINY, f"hydra.run.dir={tmp_path / 'vae'}"]
    ldm = ["stage=ldm", *CLI_LDM, f"hydra.run.dir={tmp_path / 'ldm'}"]
    sample = ["stage=sample", f"hydra.run.dir={tmp_path / 'sample'}"]
    ldm_hint = "give the checkpoints/last.ckpt of a stage=ldm run"
    cases = [
        ([*sample, f"ckpt={text}"], f"ckpt='{text}' is a text file (it starts with 'step 5000"),
        ([*sample, f"ckpt={tmp_path}/nope.ckpt"], f"ckpt='{tmp_path}/nope.ckpt' does not exist"),
        (
            [*sample, f"ckpt={export}"],
            f"ckpt='{export}' is the weights-only export of a stage=ldm run, not its checkpoint: "
            + ldm_hint,
        ),
        ([*vae, f"ckpt_path={text}"], f"ckpt_path='{text}' is a text file"),
        ([*vae, f"ckpt_path={empty}"], f"ckpt_path='{empty}' is an empty file"),
        (
            [*vae, f"ckpt_path={ldm_ckpt}"],
            f"ckpt_path='{ldm_ckpt}' is a checkpoint of stage 'ldm', not stage 'vae'",
        ),
        ([*ldm, f"vae_ckpt={cut}"], f"vae_ckpt='{cut}' is damaged or incomplete"),
        ([*ldm, f"vae_ckpt={pickled}"], f"vae_ckpt='{pickled}' needs pickle to load"),
    ]
    results = run_cli_all([args for args, _ in cases])
    _check(results, cases)
    assert "from safetensors.torch import save_file" in results[-1].stderr  # how to convert it
    assert not (tmp_path / "vae" / "checkpoints").exists()
    assert not (tmp_path / "ldm" / "checkpoints").exists()


def test_a_run_dir_holding_another_run_is_not_mixed(tmp_path, vae_ckpt):
    run = tmp_path / "run"
    args = ["stage=vae", *CLI_TINY, f"paths.data_dir={tmp_path}", f"hydra.run.dir={run}"]
    first = run_cli(*args, "trainer.max_steps=1")
    assert first.returncode == 0, first.stderr[-3000:]
    console = first.stdout + first.stderr  # one line per event, nothing the user cannot act on
    assert console.count("GPU available: ") == 1
    assert "litlogger" not in console and "srun" not in console and "LeafSpec" not in console
    files = [run / "checkpoints" / "last.ckpt", run / "export" / "vae.safetensors"]
    kept = [p.read_bytes() for p in files]
    cases = [
        ([*args, "trainer.max_steps=2", "ckpt_path=null"], "ckpt_path=null (start fresh) there"),
        ([*args, "trainer.max_steps=2", f"ckpt_path={vae_ckpt}"], f"ckpt_path={vae_ckpt} there"),
    ]
    results = run_cli_all([a for a, _ in cases])
    _check(results, cases)
    for out in results:
        assert f"the run directory {run} already holds another run's checkpoints (last.ckpt" in (
            out.stderr
        )
        assert "new directory (hydra.run.dir=...)" in out.stderr
    assert [p.read_bytes() for p in files] == kept  # nothing overwritten
    assert sorted(os.listdir(run / "checkpoints")) == ["last.ckpt"]  # no last-v1.ckpt


def test_values_out_of_range_name_the_option_and_the_fix(tmp_path, vae_ckpt, ldm_ckpt):
    vae = ["stage=vae", *CLI_TINY, f"hydra.run.dir={tmp_path / 'vae'}"]
    ldm = ["stage=ldm", *CLI_LDM, f"vae_ckpt={vae_ckpt}", f"hydra.run.dir={tmp_path / 'ldm'}"]
    sample = ["stage=sample", f"ckpt={ldm_ckpt}", f"hydra.run.dir={tmp_path / 'sample'}"]
    cases = [
        ([*vae, "seed=-5"], "seed=-5: give a whole number from 0 to 4294967295"),
        ([*vae, "trainer.max_steps=0"], "trainer.max_steps=0 trains nothing"),
        ([*sample, "seed=-5"], "seed=-5: give a whole number from 0 to 4294967295"),
        ([*sample, "batch_size=0"], "batch_size=0: give a whole number of at least 1"),
        (
            [*sample, "negative_prompt=[blurry,dark]"],
            "negative_prompt has 2 entries for 1 prompts: give one string for all prompts",
        ),
        (
            [*sample, "image_size=63"],
            "image_size=63 is not a positive multiple of 8 (the VAE's downsampling 4 x the "
            "U-Net's 2): use image_size=56 or 64",
        ),
        (
            [*ldm, "model.latent_scale=0"],
            "model.latent_scale=0: give a positive number (SD's VAE: 0.18215)",
        ),
    ]
    _check(run_cli_all([a for a, _ in cases]), cases)
    assert not (tmp_path / "vae" / "checkpoints").exists()
    assert not (tmp_path / "sample" / "grid.png").exists()


def _start(run, *extra: str) -> subprocess.Popen:
    """A tiny stage-1 run in its own process group, as a terminal runs it (Ctrl-C reaches the
    training process and its data-loading worker)."""
    args = [
        "stage=vae",
        *[a for a in CLI_TINY if not a.startswith("data.num_workers")],
        "data.num_workers=1",
        f"hydra.run.dir={run}",
        "trainer.max_steps=50",
        "+callbacks.pause._target_=fault_injection.PauseAt",
        "+callbacks.pause.step=2",
        *extra,
    ]
    return start_cli(*args, start_new_session=True)


def _when_paused(run, proc, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not (run / "paused").exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the run never reached step 2"
        time.sleep(0.2)


def test_ctrl_c_checkpoints_like_preemption_and_twice_stops_at_once(tmp_path, data_dir):
    once, twice = tmp_path / "once", tmp_path / "twice"
    first = _start(once, f"paths.data_dir={data_dir}", "+callbacks.pause.seconds=3")
    second = _start(twice, f"paths.data_dir={data_dir}", "+callbacks.pause.seconds=120")
    _when_paused(once, first)
    os.killpg(first.pid, signal.SIGINT)  # during step 2: checkpoint when it ends
    _when_paused(twice, second)
    os.killpg(second.pid, signal.SIGINT)
    time.sleep(1)
    started = time.monotonic()
    os.killpg(second.pid, signal.SIGINT)  # again: stop now, no checkpoint
    log_twice = second.communicate(timeout=60)[0]
    assert time.monotonic() - started < 60  # not waiting out the 120 s step
    log_once = first.communicate(timeout=180)[0]

    assert first.returncode == 130, log_once[-3000:]
    assert "received SIGINT; checkpointing at the end of this step (Ctrl-C again" in log_once
    assert sorted(os.listdir(once / "checkpoints")) == ["preempted-step00000003.ckpt"]
    ckpt = torch.load(once / "checkpoints" / "preempted-step00000003.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert not (once / "export").exists()  # unfinished: nothing exported
    assert "requeue" not in log_once.lower()  # Ctrl-C is the user's: never requeued

    assert second.returncode not in (0, 130), log_twice[-3000:]
    assert not (twice / "checkpoints").exists() or not os.listdir(twice / "checkpoints")
