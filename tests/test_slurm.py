"""The project's own slurm/ scripts on a real SLURM (slurmctld + two slurmd as two nodes on this
machine; see tests/slurm_cluster.py): a 2-node DDP stage-2 job, preemption by SIGUSR1 that
checkpoints, requeues and resumes in the same run directory, and a multirun sweep through Hydra's
submitit launcher. ``pytest -k "slurm or preempt or requeue"`` selects these."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import LDM_TINY, ROOT
from slurm_cluster import LocalSlurm, unavailable_reason

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

REASON = unavailable_reason()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if REASON:
        pytest.skip(REASON)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


STRATEGIES = {"ddp": "ddp", "fsdp": "{_target_:sd_lightning.systems.strategy.FSDP2Strategy}"}


def _cpu_overrides(data_dir: Path, vae_ckpt: Path, strategy: str = "ddp") -> list[str]:
    return [
        *LDM_TINY,
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        f"trainer.strategy={STRATEGIES[strategy]}",
        "trainer.num_sanity_val_steps=0",
        "trainer.limit_val_batches=1",
        "data.demo.root=" + str(data_dir),
        f"vae_ckpt={vae_ckpt}",
        "logger=csv",
    ]


def _submit(slurm: LocalSlurm, run_root: Path, script: str, *overrides: str) -> str:
    """``sbatch slurm/<script>`` with the CPU resources of the local cluster (2 nodes x 1 CPU)."""
    return slurm.sbatch(
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        f"--output={run_root}/%x-%j.out",
        str(ROOT / "slurm" / script),
        *overrides,
        cwd=str(ROOT),
        env={"SD_PYTHON": sys.executable, "SD_RUN_ROOT": str(run_root), "WANDB_MODE": "offline"},
    )


def _output(run_root: Path, job: str) -> str:
    # two tasks write one file: a progress bar character can be cut by the other task's bytes
    return "\n".join(p.read_text(errors="replace") for p in run_root.glob(f"*-{job}.out"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_slurm_ldm_two_nodes(slurm, tmp_path, data_dir, vae_ckpt, strategy):
    overrides = _cpu_overrides(data_dir, vae_ckpt, strategy)
    job = _submit(slurm, tmp_path, "ldm.sbatch", *overrides, "trainer.max_steps=3")
    state = slurm.wait(job, timeout=400)
    out = _output(tmp_path, job)
    assert state == "COMPLETED", out + slurm.logs()
    run_dir = tmp_path / f"sd-ldm-{job}"
    assert "2 nodes x 1 tasks" in out
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out and "Starting with 2 processes" in out
    last = run_dir / "checkpoints" / "last.ckpt"
    if strategy == "fsdp":  # a folder: one shard from each node
        assert {"__0_0.distcp", "__1_0.distcp", "meta.pt"} <= set(os.listdir(last))
        last = last / "meta.pt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 3 and checkpoint["sd_lightning"]["stage"] == "ldm"


def test_slurm_preempt_requeue_resumes_in_same_run_dir(slurm, tmp_path, data_dir, vae_ckpt):
    job = _submit(
        slurm,
        tmp_path,
        "ldm.sbatch",
        *_cpu_overrides(data_dir, vae_ckpt),
        "trainer.max_steps=300",
        "trainer.val_check_interval=1000",
        "callbacks.model_checkpoint.every_n_train_steps=1000",
    )
    run_dir = tmp_path / f"sd-ldm-{job}"
    # wait until training is under way (the progress bar shows a loss), then signal every task
    deadline = time.time() + 300
    while time.time() < deadline and "train/loss=" not in _output(tmp_path, job):
        assert slurm.state(job) in ("PENDING", "RUNNING"), _output(tmp_path, job)
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", job)  # what --signal=SIGUSR1@90 sends before the limit
    state = slurm.wait(job, timeout=500)
    out = _output(tmp_path, job)
    assert state == "COMPLETED", out + slurm.logs()
    assert slurm.job_field(job, "Restarts") == "1", out
    assert "preemption: received SIGUSR1" in out
    assert "restart 1" in out  # the requeued job ran the script again
    assert "resume: continuing from" in out and "preempted-step" in out
    assert "val_samples" not in out.split("preemption: received SIGUSR1")[1].split("restart 1")[0]
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 300
    preempted = list((run_dir / "checkpoints").glob("preempted-step*.ckpt"))
    assert len(preempted) == 1
    stopped_at = torch.load(preempted[0], weights_only=True)["global_step"]
    assert 1 <= stopped_at < 300


def test_slurm_sweep_through_submitit_launcher(slurm, tmp_path, data_dir, vae_ckpt):
    sweep = tmp_path / "sweep"
    overrides = [o for o in _cpu_overrides(data_dir, vae_ckpt) if o != "trainer.strategy=ddp"]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sd_lightning",
            "-m",
            "hydra/launcher=slurm",
            *overrides,
            "hydra.launcher.tasks_per_node=1",
            "hydra.launcher.gpus_per_node=null",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=10",
            f"hydra.sweep.dir={sweep}",
            "trainer.devices=1",
            "trainer.max_steps=2",
            "model.optimizer.lr=1e-3,2e-3",
        ],
        cwd=ROOT,
        env={**slurm.env, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + slurm.logs()
    lrs = []
    for job in ("0", "1"):
        checkpoint = torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["global_step"] == 2
        lrs.append(checkpoint["sd_lightning"]["config"]["model"]["optimizer"]["lr"])
    assert lrs == [1e-3, 2e-3]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*.out"))
    assert "SLURM_JOB_ID" in logs or "submitit INFO" in logs


def test_slurm_eval_two_nodes(slurm, tmp_path, data_dir, ldm_ckpt):
    """slurm/eval.sbatch: stage=eval over two nodes, ranks from SLURM, one eval.json."""
    import json

    from eval_fixtures import clip_folder

    shards = sorted(str(p) for p in data_dir.glob("demo-*/train-*.tar"))
    job = _submit(
        slurm,
        tmp_path,
        "eval.sbatch",
        f"ckpt={ldm_ckpt}",
        f"eval.prompts={shards[0]}",
        f"eval.reference={'::'.join(shards)}",
        "eval.num_images=15",
        "eval.guidance=[2]",
        "eval.feature_dim=64",
        "eval.allow_few=true",
        "eval.inception=random",
        f"eval.clip.model=local-dir:{clip_folder(tmp_path / 'clip')}",
        f"eval.stats_dir={tmp_path / 'stats'}",
        "steps=2",
        "trainer.accelerator=cpu",
    )
    state = slurm.wait(job, timeout=400)
    out = _output(tmp_path, job)
    assert state == "COMPLETED", out + slurm.logs()
    assert "2 nodes x 1 tasks" in out
    record = json.loads((tmp_path / f"sd-eval-{job}" / "eval.json").read_text())
    assert record["world_size"] == 2 and record["results"][0]["images"] == 15
