"""Shared fixtures: tiny real shards, the real Hydra config composed with tiny overrides."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from omegaconf import DictConfig

import sd_lightning  # noqa: F401 - registers resolvers
from sd_lightning.core import config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Sizes every test run uses: a 32 px demo set of a few small shards, a ~100K-parameter VAE and a
# ~200K-parameter U-Net with a 32-wide random text tower.
DATA_TINY = [
    "trainer=debug",
    "logger=none",
    "data.image_size=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.shuffle_buffer=8",
    "data.samples_per_epoch=32",
    "data.demo.image_size=32",
    "data.demo.train_shards=3",
    "data.demo.val_shards=1",
    "data.demo.samples_per_shard=16",
]
TINY = [
    *DATA_TINY,
    "vae.ch=16",
    "vae.norm_groups=8",
    "loss.discriminator.ndf=8",
    "loss.discriminator.n_layers=2",
    "loss.perceptual.trunk=random",
]
LDM_TINY = [
    *DATA_TINY,
    "stage=ldm",
    "unet.model_channels=32",
    "unet.channel_mult=[1,2]",
    "unet.attention_levels=[1]",
    "unet.num_head_channels=16",
    "unet.norm_groups=8",
    "unet.context_dim=32",
    "text_encoder.random_text_cfg.width=32",
    "text_encoder.random_text_cfg.output_dim=32",
    "text_encoder.random_text_cfg.layers=2",
    "text_encoder.random_text_cfg.context_length=16",
    "model.val_prompts=['a red circle','a blue square']",
    "model.val_sampler.steps=2",
    "model.lr_scheduler=null",
    "model.optimizer.lr=1e-3",
]


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """The rows of ``logger=csv`` in a run directory, over every (re)start of the run in order
    (``csv/version_N/metrics.csv``)."""
    import csv

    files = sorted(
        (run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])
    )
    rows: list[dict[str, str]] = []
    for path in files:
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def compose_config(overrides: list[str], output_dir: Path, data_dir: Path) -> DictConfig:
    """The real conf/ composed as ``python -m sd_lightning`` would, with ``${hydra:...}`` resolvable."""
    return config.compose_config([f"paths.data_dir={data_dir}", *overrides], output_dir)


def straight_and_resumed(overrides: list[str], root: Path, data_dir: Path, steps: int = 16):
    """Train ``steps`` straight, and half of them then the rest resumed (stopped at the tiny
    data's epoch end, 8 batches, where a resumed stream goes on exactly): both last checkpoints
    and the two run folders."""
    import torch

    from sd_lightning.commands.train import train

    through, resumed = root / "through", root / "resumed"
    train(compose_config([*overrides, f"trainer.max_steps={steps}"], through, data_dir))
    train(compose_config([*overrides, f"trainer.max_steps={steps // 2}"], resumed, data_dir))
    train(compose_config([*overrides, f"trainer.max_steps={steps}"], resumed, data_dir))
    a = torch.load(through / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    return a, b, through, resumed


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A session-wide data folder (the tiny demo set is generated once into it)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def vae_ckpt(tmp_path_factory, data_dir) -> Path:
    """A stage-1 checkpoint of the tiny VAE (two real training steps), shared by stage-2 tests."""
    from sd_lightning.commands.train import train

    run = tmp_path_factory.mktemp("vae_run")
    train(compose_config([*TINY, "trainer.max_steps=2"], run, data_dir))
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory, data_dir):
    """The demo's two stages trained at 32 px, and their diffusers export (tests/demo_model.py)."""
    from demo_model import train_demo_model

    return train_demo_model(tmp_path_factory.mktemp("demo_model"), data_dir)


@pytest.fixture
def cfg_factory(tmp_path, data_dir):
    def make(*overrides: str, tiny: bool = True) -> DictConfig:
        return compose_config([*(TINY if tiny else []), *overrides], tmp_path / "run", data_dir)

    return make


# Ports for the rendezvous of multi-process runs, one per command this session starts. Lightning
# would pick a free port itself, but it releases the port before rank 0 binds it, so runs started
# together (test_fsdp runs three) could pick the same one: the second run's rank 0 then fails with
# EADDRINUSE and its rank 1 joins the first run's store and waits until the timeout. Ports below
# the kernel's ephemeral range are never handed out by bind(0) or to outgoing connections (gloo's
# own sockets), so one reserved here stays free until its run binds it.
_PORTS = itertools.count(20000 + os.getpid() % 10000)
_PORTS_LOCK = threading.Lock()


def free_port() -> int:
    """A port below the ephemeral range, free now and never handed out before in this session."""
    with _PORTS_LOCK:
        while True:
            port = 20000 + (next(_PORTS) - 20000) % 12000
            with socket.socket() as s:
                try:
                    s.bind(("", port))
                except OSError:
                    continue
                return port


def run_cli(
    *args: str,
    cwd: Path | None = None,
    timeout: float = 300,
    env: dict | None = None,
    unset: tuple[str, ...] = (),
):
    """``python -m sd_lightning ARGS`` in a real subprocess; returns the CompletedProcess.

    wandb runs offline unless ``unset`` removes ``WANDB_MODE``."""
    full_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "WANDB_MODE": "offline",
        "MASTER_PORT": str(free_port()),
        **(env or {}),
    }
    for var in unset:
        full_env.pop(var, None)
    return subprocess.run(
        [sys.executable, "-m", "sd_lightning", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli_all(commands: list[list[str]], jobs: int = 2, **kwargs) -> list:
    """:func:`run_cli` for each argument list, ``jobs`` processes at a time (their imports are
    most of their time); the results in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda args: run_cli(*args, **kwargs), commands))


def run_ldm_two_ranks(run: Path, data_dir, vae_ckpt, *overrides: str, trainer: str = "debug"):
    """Stage 2 at tiny sizes from the CLI on two CPU processes (gloo) with ``trainer=<trainer>``
    and ``logger=csv`` into ``run``; ``tests/`` is importable (``fault_injection`` callbacks).
    A rank left waiting fails on the timeout instead of blocking the suite."""
    return run_cli(
        *[o for o in LDM_TINY if not o.startswith(("logger=", "trainer="))],
        f"trainer={trainer}",
        "logger=csv",
        f"paths.data_dir={data_dir}",
        f"vae_ckpt={vae_ckpt}",
        f"hydra.run.dir={run}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        *overrides,
        env={
            "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
        },
        timeout=600,  # three such runs start together in test_fsdp (six processes, two cores)
    )


@pytest.fixture(scope="session")
def ldm_ckpt(tmp_path_factory, data_dir, vae_ckpt) -> Path:
    """A stage-2 checkpoint of the tiny U-Net (one real training step) on :func:`vae_ckpt`."""
    from sd_lightning.commands.train import train

    run = tmp_path_factory.mktemp("ldm_run")
    train(compose_config([*LDM_TINY, f"vae_ckpt={vae_ckpt}", "trainer.max_steps=1"], run, data_dir))
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def small_base(tmp_path_factory) -> Path:
    """A tiny two-level SD 1-like pipeline folder written by diffusers (tests/sd_fixtures.py),
    the base the fine-tuning tests start from with ``pretrained=``."""
    from sd_fixtures import SMALL_UNET, SMALL_VAE, pipeline_folder

    folder, *_ = pipeline_folder(tmp_path_factory.mktemp("small_base"), SMALL_UNET, SMALL_VAE, 16)
    return folder


def start_cli(*args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    """``python -m sd_lightning ARGS`` started, its stdout and stderr merged into one text pipe
    (``tests/`` importable, for the fault-injection callbacks)."""
    full_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "tests"),
        "PYTHONUNBUFFERED": "1",
        "WANDB_MODE": "offline",
        "MASTER_PORT": str(free_port()),
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "sd_lightning", *args],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


@pytest.fixture
def ldm_cfg_factory(tmp_path, data_dir, vae_ckpt):
    """The stage-2 config at tiny sizes, on the shared tiny stage-1 checkpoint."""

    def make(*overrides: str) -> DictConfig:
        return compose_config(
            [*LDM_TINY, f"vae_ckpt={vae_ckpt}", *overrides], tmp_path / "run", data_dir
        )

    return make
