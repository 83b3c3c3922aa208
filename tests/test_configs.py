"""Every config group option composes, and its node instantiates into real objects."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF
from hydra.utils import instantiate

GROUPS = ["vae", "loss", "model", "data", "trainer", "callbacks", "logger", "experiment", "stage"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in GROUPS:
        assert _options(group), f"conf/{group}/ is empty"


@pytest.mark.parametrize("option", _options("vae"))
def test_vae_presets_instantiate(cfg_factory, option):
    cfg = cfg_factory(f"vae={option}", "data.image_size=64", tiny=False)
    vae = instantiate(cfg.vae)
    x = torch.randn(1, 3, 64, 64)
    z = vae.encode(x).sample()
    assert z.shape == (1, 4, 64 // vae.downsample_factor, 64 // vae.downsample_factor)


def test_sd_vae_has_the_reference_parameter_count(cfg_factory):
    vae = instantiate(cfg_factory("vae=sd", tiny=False).vae)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # CompVis kl-f8


@pytest.mark.parametrize("option", _options("trainer"))
def test_trainer_options_instantiate(cfg_factory, option):
    cfg = cfg_factory(f"trainer={option}")
    if cfg.trainer.get("accelerator") == "gpu" and not torch.cuda.is_available():
        pytest.skip("trainer=gpu needs a CUDA GPU")
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("option", _options("logger"))
def test_logger_options_instantiate(cfg_factory, option, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = cfg_factory(f"logger={option}")
    loggers = [instantiate(node) for node in (cfg.logger or {}).values()]
    assert len(loggers) == len(cfg.logger or {})


@pytest.mark.parametrize("option", _options("callbacks"))
def test_callback_options_instantiate(cfg_factory, option):
    cfg = cfg_factory(f"callbacks={option}")
    callbacks = [instantiate(node) for node in (cfg.callbacks or {}).values()]
    assert all(callbacks)


@pytest.mark.parametrize("option", _options("experiment") + [None])
def test_experiments_and_stage_build_system_and_data(cfg_factory, option):
    overrides = [f"experiment={option}"] if option else []
    cfg = cfg_factory(*overrides)
    system = instantiate(cfg.model)
    data = instantiate(cfg.data)
    assert system.automatic_optimization is False
    assert data.image_size == cfg.data.image_size


def test_unknown_stage_is_a_clear_error(cfg_factory):
    with pytest.raises(
        Exception, match="(?s)Could not find 'stage/nope'.*Available options in 'stage'"
    ):
        cfg_factory("stage=nope")
