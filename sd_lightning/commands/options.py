"""Every option's value checked with the others before anything is built: the data, the fine-tuning
method, the text encoder's layer, the diffusion settings, and sampling's LoRA files and scales.
Each error names the option, the value and the fix; all of it reads the config (and at most the
shapes of a weights file), so a mistake costs a second, not a model build.
"""

from __future__ import annotations

import math
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sd_lightning.core.errors import InputError


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def whole(value: Any, option: str, low: int = 1, example: str = "") -> None:
    """A whole number of at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        hint = f" (e.g. {example})" if example else ""
        raise InputError(f"{option}={value!r}: give a whole number of at least {low}{hint}")


def fraction(value: Any, option: str, top_open: bool = True, what: str = "") -> None:
    """A number in [0, 1) (or [0, 1])."""
    ok = _number(value) and 0 <= value and (value < 1 if top_open else value <= 1)
    if not ok:
        interval = "[0, 1)" if top_open else "[0, 1]"
        raise InputError(f"{option}={value!r}: give a number in {interval}{what}")


def positive(value: Any, option: str, nullable: bool = False, example: str = "") -> None:
    if value is None and nullable:
        return
    if not _number(value) or not math.isfinite(value) or value <= 0:
        also = " or null" if nullable else ""
        hint = f" (e.g. {example})" if example else ""
        raise InputError(f"{option}={value!r}: give a positive number{also}{hint}")


def choice(value: Any, option: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{option}={value!r}: choose {', '.join(map(str, choices))}")


# -- the groups ---------------------------------------------------------------------------------
def check_data_options(data: DictConfig | None) -> None:
    if not data:
        return
    for key, low in (("batch_size", 1), ("image_size", 8), ("bucket_step", 8), ("repeats", 1)):
        if data.get(key) is not None:
            whole(data[key], f"data.{key}", low)
    if data.get("buckets") and data.get("image_size") and data.get("bucket_step"):
        if data.image_size % data.bucket_step:
            raise InputError(
                f"data.image_size={data.image_size} is not a multiple of data.bucket_step="
                f"{data.bucket_step}: every bucket's sides are multiples of it"
            )
    if data.get("max_aspect") is not None and not (
        _number(data.max_aspect) and data.max_aspect >= 1
    ):
        raise InputError(f"data.max_aspect={data.max_aspect!r}: give a number >= 1 (e.g. 2.0)")
    for key in ("num_workers", "val_images", "shuffle_buffer"):
        if data.get(key) is not None:
            whole(data[key], f"data.{key}", 0)


def _lora_options(node: Any, option: str) -> None:
    if not OmegaConf.is_dict(node) and not isinstance(node, dict):
        raise InputError(
            f"{option}={node!r}: give the LoRA's options as a mapping, e.g. "
            f'"+{option}={{rank: 16}}" (a string is not read as one)'
        )
    if "rank" in node:
        whole(node["rank"], f"{option}.rank", 1, "16")
    alpha = node.get("alpha")
    if alpha is not None:
        positive(alpha, f"{option}.alpha", example="the rank, or half of it")
    if node.get("dropout") is not None:
        fraction(node["dropout"], f"{option}.dropout")
    if node.get("targets") is not None:
        choice(node["targets"], f"{option}.targets", ("attention", "attention_ff", "all"))


def check_finetune_options(finetune: DictConfig | None, context_length: int | None) -> None:
    if not finetune or not finetune.get("_target_"):
        return
    target = str(finetune["_target_"]).rsplit(".", 1)[-1]
    if target == "LoRA":
        _lora_options(finetune, "finetune")
    elif target == "DreamBooth":
        if finetune.get("lora") is not None:
            _lora_options(finetune.lora, "finetune.lora")
        whole(finetune.num_class_images, "finetune.num_class_images", 1)
        positive(finetune.prior_loss_weight, "finetune.prior_loss_weight")
        whole(finetune.sampler.steps, "finetune.sampler.steps", 1)
    elif target == "TextualInversion":
        whole(finetune.num_vectors, "finetune.num_vectors", 1)
        room = (context_length or 77) - 2  # start- and end-of-text take two places
        if finetune.num_vectors > room:
            raise InputError(
                f"finetune.num_vectors={finetune.num_vectors}: at most {room} fit in the text "
                f"encoder's {room + 2}-token context (with the caption's other words, fewer)"
            )


def text_nodes(text: DictConfig | None) -> list[tuple[str, DictConfig]]:
    """``(option prefix, config)`` of each text encoder ``text_encoder`` builds: itself, or each
    of SDXL's (``text_encoder.encoders.clip_l``...)."""
    if not text:
        return []
    encoders = text.get("encoders")
    if encoders is None:
        return [("text_encoder", text)]
    items = encoders.items() if OmegaConf.is_dict(encoders) else enumerate(encoders)
    return [(f"text_encoder.encoders.{k}", node) for k, node in items]


def check_text_layer(text: DictConfig | None) -> None:
    """``text_encoder.layer`` (of each encoder): last, penultimate, auto or a number of blocks
    the tower has."""
    for prefix, node in text_nodes(text):
        _check_layer(node, f"{prefix}.layer")


def _check_layer(text: DictConfig, option: str) -> None:
    layer = text.get("layer")
    if isinstance(layer, str):
        choice(layer, option, ("last", "penultimate", "auto"))
        return
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise InputError(
            f"{option}={layer!r}: give last, penultimate, auto or a number of final "
            "blocks to skip (clip skip 2 is 1)"
        )
    blocks = text_blocks(text)
    if blocks is not None and layer >= blocks:
        raise InputError(
            f"{option}={layer} skips {layer} of the text encoder's {blocks} blocks: "
            f"give at most {blocks - 1}"
        )


def text_blocks(text: DictConfig) -> int | None:
    """How many blocks the configured text tower has, from its config or the names of its
    OpenCLIP model; ``None`` where only its weights tell (SD weights, checked when read)."""
    if text.get("random_text_cfg") is not None:
        return int(text.random_text_cfg.get("layers", 12))
    pretrained = text.get("pretrained")
    if pretrained and os.path.exists(str(pretrained)):
        return None
    name = text.get("name")
    if name:
        import open_clip

        cfg = open_clip.get_model_config(str(name))
        return int(cfg["text_cfg"]["layers"]) if cfg else None
    return None


def check_step_in_backward(trainer: DictConfig) -> None:
    """What ``model.optimizer.step_in_backward=true`` cannot run with, named before training:
    it steps each parameter as its gradient is ready, so nothing may need every gradient."""
    devices, nodes = trainer.get("devices", 1), int(trainer.get("num_nodes", 1) or 1)
    many = devices == -1 or (isinstance(devices, int) and devices * nodes > 1) or nodes > 1
    many = many or not (isinstance(devices, int) or devices == "auto")  # a list of devices
    problems = {
        "trainer.accumulate_grad_batches > 1": int(trainer.get("accumulate_grad_batches", 1)) > 1,
        "trainer.precision=16-mixed (loss scaling)": str(trainer.get("precision")).startswith("16"),
        "more than one device (gradients averaged after backward)": many,
    }
    found = [name for name, bad in problems.items() if bad]
    if found:
        raise InputError(
            f"model.optimizer.step_in_backward=true steps each parameter as its gradient is "
            f"ready, which {found[0]} cannot go with: use one device, bf16-mixed or 32-true and "
            "no gradient accumulation, or model.optimizer.step_in_backward=false"
        )


def check_model_options(model: DictConfig | None) -> None:
    if not model or "caption_dropout" not in model:
        return
    fraction(model.caption_dropout, "model.caption_dropout")
    if model.get("prediction") is not None:
        choice(model.prediction, "model.prediction", ("epsilon", "v_prediction"))
    scale = model.get("latent_scale")
    if scale is not None and not (_number(scale) and math.isfinite(scale) and scale > 0):
        raise InputError(
            f"model.latent_scale={scale}: give a positive number (SD's VAE: 0.18215), or null to "
            "estimate it from the first batch"
        )
    positive(model.get("min_snr_gamma"), "model.min_snr_gamma", nullable=True, example="5.0")
    decay = model.get("ema_decay")
    if decay is not None and not (_number(decay) and 0 < decay < 1):
        raise InputError(f"model.ema_decay={decay!r}: give a number in (0, 1), or null for no EMA")


def _finite_scales(scales: Any, count: int) -> None:
    values = list(scales) if OmegaConf.is_list(scales) or isinstance(scales, list) else [scales]
    for value in values:
        if not _number(value) or not math.isfinite(value):
            raise InputError(
                f"lora_scale={scales!r}: give a number (e.g. 0.8) or a list of numbers, one per "
                "LoRA file"
            )
    if len(values) > 1 and len(values) != count:
        raise InputError(
            f"lora_scale has {len(values)} values for {count} LoRA files: give one for all, or "
            "one per file"
        )


def check_add_ons(cfg: DictConfig) -> None:
    """``lora=``/``lora_scale=``/``embeddings=`` of sampling and export: files that exist,
    scales that are numbers."""
    for option in ("lora", "embeddings"):
        value = cfg.get(option)
        paths = [value] if isinstance(value, str) else list(value or [])
        for path in paths:
            if not isinstance(path, str) or not os.path.isfile(path):
                raise InputError(f"{option}: {path!r} is not a file (give .safetensors paths)")
    base = cfg.get("base")
    if base is not None and not os.path.exists(str(base)):
        raise InputError(f"base={base!r} does not exist: give the base weights (file or folder)")
    loras = cfg.get("lora")
    count = 1 if isinstance(loras, str) else len(loras or [])
    if cfg.get("lora_scale") is not None:
        _finite_scales(cfg.lora_scale, count)


def check_training_options(cfg: DictConfig) -> None:
    """The options of a training run, before any model is built."""
    check_data_options(cfg.get("data"))
    text = cfg.get("text_encoder")
    context = None
    first = (text_nodes(text) or [("", {})])[0][1]
    if first.get("random_text_cfg") is not None:
        context = first.random_text_cfg.get("context_length")
    check_finetune_options(cfg.get("finetune"), context)
    if cfg.get("stage") == "e2e":
        check_e2e(cfg)
    if cfg.get("stage") in ("ldm", "e2e"):
        check_text_layer(text)
        check_model_options(cfg.get("model"))
        optimizer = (cfg.get("model") or {}).get("optimizer") or {}
        choice(optimizer.get("name", "adamw"), "model.optimizer.name", ("adamw", "adafactor"))
        if optimizer.get("step_in_backward"):
            check_step_in_backward(cfg.trainer)
        check_repa(cfg)


def check_e2e(cfg: DictConfig) -> None:
    """``stage=e2e``: images to train the VAE on, an alignment to train it through."""
    data = str((cfg.get("data") or {}).get("_target_", ""))
    if data.endswith("LatentDataModule"):
        raise InputError(
            "stage=e2e trains the VAE, so it reads images: data=webdataset or data=folder, not "
            "data=latents (stored latents are those of the VAE before tuning)"
        )
    if not cfg.get("repa"):
        raise InputError(
            "stage=e2e tunes the VAE through the alignment loss: keep repa=urepa (the stage's "
            "default) and give repa.encoder=/path/to/dinov2-base"
        )
    model = cfg.get("model") or {}
    if float(model.get("vae_align_weight", 0)) < 0:
        raise InputError(f"model.vae_align_weight={model.vae_align_weight}: give a number >= 0")
    norm = model.get("latent_norm") or {}
    if not 0 < float(norm.get("momentum", 0.1)) <= 1:
        raise InputError(f"model.latent_norm.momentum={norm.momentum}: give a number in (0, 1]")


def check_repa(cfg: DictConfig) -> None:
    """``repa=urepa``: an encoder folder of the right kind, images to align with, DDP."""
    repa = cfg.get("repa")
    if not repa:
        return
    if OmegaConf.is_missing(repa, "encoder"):
        raise InputError(
            "repa=urepa needs repa.encoder=/path/to/dinov2-base: a DINOv2 folder as the hub holds "
            "it (config.json, model.safetensors; docs/repa.md)"
        )
    for key in ("weight", "manifold_weight"):
        value = repa.get(key)
        if not _number(value) or not math.isfinite(value) or value < 0:
            raise InputError(f"repa.{key}={value!r}: give a number >= 0")
    whole(repa.get("resolution"), "repa.resolution", 14, "224")
    encoder = str(repa.encoder)
    if os.path.isfile(encoder):  # a weights file for timm: a ViT's, from its header
        from sd_lightning.weights.vision_timm import check_vit_file

        check_vit_file(encoder)
    elif encoder != "random":
        from sd_lightning.weights.vision import read_config

        read_config(encoder)  # a missing folder or another model: now, not at step 1
    strategy = (cfg.get("trainer") or {}).get("strategy")
    if "FSDP2Strategy" in str(strategy):
        raise InputError(
            "repa=urepa runs with DDP (trainer=ddp); trainer=fsdp is not supported yet"
        )
