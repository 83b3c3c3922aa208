"""Every config group option composes, and its node instantiates into real objects."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF, LDM_TINY, TINY
from hydra.utils import instantiate
from omegaconf import OmegaConf

GROUPS = [
    "vae",
    "loss",
    "unet",
    "text_encoder",
    "model",
    "data",
    "trainer",
    "callbacks",
    "logger",
    "experiment",
    "stage",
    "finetune",
    "eval",
    "repa",
]


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
    # callbacks=eval measures against eval.prompts and eval.reference (read when fit starts)
    given = ["eval.prompts=captions.txt", "eval.reference=/data/real"] if option == "eval" else []
    cfg = cfg_factory(f"callbacks={option}", *given)
    callbacks = [instantiate(node) for node in (cfg.callbacks or {}).values()]
    assert all(callbacks)


def _stage_of(experiment: str | None) -> str:
    if experiment is None:
        return "vae"
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    if "override /stage: ldm" in text:
        return "ldm"
    # an experiment built on another (defaults: [demo_ldm, ...]) has its stage
    parents = OmegaConf.create(text).get("defaults") or []
    return "ldm" if any(_stage_of(p) == "ldm" for p in parents if isinstance(p, str)) else "vae"


@pytest.mark.parametrize("option", _options("experiment") + [None])
def test_experiments_and_stage_build_system_and_data(cfg_factory, option, vae_ckpt, tmp_path):
    overrides = [f"experiment={option}"] if option else []
    if _stage_of(option) == "ldm":
        base = [o for o in LDM_TINY if not o.startswith(("unet.", "text_encoder.", "model.val"))]
        if "override /data: folder" in (CONF / "experiment" / f"{option}.yaml").read_text():
            # a folder of photos: the shard options do not apply
            base = [o for o in base if not o.startswith("data.") or o.startswith("data.image_size")]
            overrides += [f"data.path={tmp_path}", "data.bucket_step=8"]
        cfg = cfg_factory(*base, *overrides, f"vae_ckpt={vae_ckpt}", tiny=False)
        system = instantiate(cfg.model)
        assert system.automatic_optimization is True
        assert system.unet.config["context_dim"] == system.conditioner.text_encoder.width
    else:
        # an experiment may switch LPIPS off (perceptual: null): then there is no trunk to set
        base = [o for o in TINY if not (option and o.startswith("loss.perceptual."))]
        cfg = cfg_factory(*base, *overrides, tiny=False)
        system = instantiate(cfg.model)
        assert system.automatic_optimization is False
    data = instantiate(cfg.data)
    assert data.image_size == cfg.data.image_size


@pytest.mark.parametrize("option", _options("finetune"))
def test_finetune_options_build_into_the_stage2_system(cfg_factory, option, vae_ckpt):
    base = [o for o in LDM_TINY if not o.startswith("model.val")]
    cfg = cfg_factory(*base, f"finetune={option}", f"vae_ckpt={vae_ckpt}", tiny=False)
    system = instantiate(cfg.model)
    trained = [n for n, p in system.named_parameters() if p.requires_grad]
    if option == "lora":
        assert trained and all(".lora_" in n for n in trained)
    elif option == "textual_inversion":
        assert trained == ["embeddings.weight"]
    else:  # none, dreambooth (the whole U-Net by default)
        assert len(trained) == len(list(system.unet.parameters()))


@pytest.mark.parametrize("option", _options("unet"))
def test_unet_presets_compose_and_build(cfg_factory, option):
    cfg = cfg_factory("stage=ldm", f"unet={option}", tiny=False)
    with torch.device("meta"):  # sd15/sd2 without allocating 860M parameters
        unet = instantiate(cfg.unet)
    assert unet.config["context_dim"] == cfg.unet.context_dim


def test_text_encoder_options_compose_and_the_real_one_is_wired_to_open_clip(cfg_factory, tmp_path):
    cfg = cfg_factory("stage=ldm", "text_encoder=random_tiny", tiny=False)
    assert instantiate(cfg.text_encoder)(["a red circle"]).shape[-1] == cfg.unet.context_dim
    weights = tmp_path / "missing" / "open_clip_pytorch_model.bin"
    cfg = cfg_factory(
        "stage=ldm", "text_encoder=openclip_vit_h", f"text_encoder.pretrained={weights}", tiny=False
    )
    with pytest.raises(Exception, match="no such file"):
        instantiate(cfg.text_encoder)
    # SD 1's CLIP ViT-L: 768-d like unet=sd15, padded with end-of-text (weights: test_sd_weights)
    cfg = cfg_factory("stage=ldm", "text_encoder=clip_vit_l", "unet=sd15", tiny=False)
    assert cfg.text_encoder.name == "ViT-L-14" and cfg.text_encoder.pad == "eot"
    assert cfg.unet.context_dim == 768 and cfg.text_encoder.layer == "last"


def test_unknown_stage_is_a_clear_error(cfg_factory):
    with pytest.raises(
        Exception, match="(?s)Could not find 'stage/nope'.*Available options in 'stage'"
    ):
        cfg_factory("stage=nope")


@pytest.mark.parametrize("option", _options("stage"))
def test_every_stage_composes_and_names_a_callable_entry(cfg_factory, option):
    from hydra.utils import get_method

    cfg = cfg_factory(f"stage={option}", tiny=False)
    assert cfg.stage == option
    assert callable(get_method(cfg.entry))


def test_the_commands_in_experiment_headers_survive_the_shell_and_hydra():
    """``# python -m sd_lightning ...`` lines of conf/experiment/*.yaml, split as bash splits
    them, give Hydra overrides that parse (the <...> of a textual-inversion token included)."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        lines = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
        start = next((i for i, line in enumerate(lines) if "python -m sd_lightning" in line), None)
        if start is None:
            continue
        command = []
        for line in lines[start:]:  # the command and its continuation lines
            command.append(line.rstrip("\\"))
            if not line.endswith("\\"):
                break
        command = " ".join(command).split("python -m sd_lightning", 1)[1]
        args = [a for a in shlex.split(command) if a.startswith("finetune.")]  # not <paths>
        for override in parser.parse_overrides(args):
            if override.key_or_group == "finetune.token":
                assert override.value() == "<my-teapot>", path.name
