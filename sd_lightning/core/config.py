"""OmegaConf resolvers used by conf/ (registered on import of ``sd_lightning``)."""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf, open_dict

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # sd_lightning/
CONF_DIR = os.path.join(os.path.dirname(_PACKAGE), "conf")


def auto_precision() -> str:
    """``bf16-mixed`` where the GPU supports bfloat16 (A100, H100), else full fp32."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def given(value: object) -> bool:
    """``${sd.given:${oc.select:pretrained,null}}``: whether an option has a value."""
    return value not in (None, "")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("sd.precision"):
        OmegaConf.register_new_resolver("sd.precision", auto_precision)
    if not OmegaConf.has_resolver("sd.given"):
        OmegaConf.register_new_resolver("sd.given", given)


def compose_config(overrides: list[str], output_dir: str) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides`` as ``python -m sd_lightning`` would, for
    calling ``train(cfg)`` from Python (tests, benchmarks): ``${hydra:...}`` values resolve, and
    the run writes into ``output_dir``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg.hydra
    return cfg
