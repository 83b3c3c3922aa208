"""wandb never prompts and never crashes a run: offline without a key, fallback without a server."""

from __future__ import annotations

import logging

import pytest
from conftest import TINY, run_cli

from sd_lightning.commands.train import train

pytestmark = pytest.mark.slow


@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no saved login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    return monkeypatch


def _offline_runs(run_dir):
    return list((run_dir / "wandb").glob("offline-run-*"))


def test_without_api_key_logs_offline_and_says_how_to_sync(
    cfg_factory, tmp_path, no_wandb_env, caplog
):
    cfg = cfg_factory("logger=wandb", "trainer.max_steps=2")
    with caplog.at_level(logging.WARNING):
        train(cfg)
    assert _offline_runs(tmp_path / "run")
    assert "wandb sync" in caplog.text and "OFFLINE" in caplog.text


def test_unreachable_server_falls_back_to_offline(tmp_path):
    """A configured key but no reachable server (a fresh process: wandb keeps global state)."""
    env = {
        "WANDB_API_KEY": "x" * 40,
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # nothing listens there
        "HOME": str(tmp_path / "home"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
    }
    run = tmp_path / "run"
    out = run_cli(
        *[o for o in TINY if not o.startswith("logger=")],
        "logger=wandb",
        "logger.wandb.settings.init_timeout=5",  # nothing answers: it falls back either way
        "trainer.max_steps=2",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={run}",
        env=env,
        unset=("WANDB_MODE",),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "could not start an online run" in out.stdout + out.stderr
    assert _offline_runs(run) and (run / "checkpoints" / "last.ckpt").is_file()


def test_run_directory_keeps_its_wandb_run_id(tmp_path):
    """A requeued or resumed job logs into the same wandb run: the id lives in the run dir."""
    from sd_lightning.systems.loggers import run_id

    first = run_id(str(tmp_path))
    assert len(first) == 8 and first.isalnum()
    assert (tmp_path / "wandb" / "run_id").read_text().strip() == first
    assert run_id(str(tmp_path)) == first
    assert run_id(str(tmp_path / "other")) != first


def test_settings_from_the_config_reach_wandb_as_a_plain_dict(tmp_path, no_wandb_env):
    """Hydra passes ``logger.wandb.settings`` as a DictConfig, which wandb.init ignores (so
    ``init_timeout`` stayed at 90 s); the factory hands wandb a dict, our default included."""
    from omegaconf import OmegaConf

    from sd_lightning.systems.loggers import wandb_logger

    given = OmegaConf.create({"init_timeout": 15, "console": "off"})
    settings = wandb_logger(str(tmp_path), offline=True, settings=given)._wandb_init["settings"]
    assert type(settings) is dict and settings == {"init_timeout": 15, "console": "off"}
    default = wandb_logger(str(tmp_path), offline=True)._wandb_init["settings"]
    assert default == {"init_timeout": 90}
