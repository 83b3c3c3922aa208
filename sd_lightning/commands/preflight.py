"""Checks before anything is built: options a stage requires, the seed, the step limit, the files
given (``ckpt_path=``, ``ckpt=``), a run directory that already holds another run's checkpoints,
and sampling's values. Each error names the option and the fix.

``python -m sd_lightning`` runs the stage's checks (``preflight:`` in ``conf/stage/``) before it
imports Lightning, so a mistake costs a second, not a model build; the stages' entry functions
run them too, for callers from Python.
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from sd_lightning.commands.options import check_add_ons, check_training_options, text_nodes
from sd_lightning.core.errors import InputError

PROMPTS_EXAMPLE = """prompts='["a red circle", "a blue square"]'"""
LDM_HINT = (
    "the checkpoints/last.ckpt of a stage=ldm run, or Stable Diffusion's weights (a single file "
    "or a diffusers folder)"
)

SEED_MAX = 2**32 - 1  # numpy's limit, which Lightning's seed_everything enforces


def require(cfg: DictConfig) -> None:
    """Top-level values a stage marks ``???`` (``vae_ckpt``, ``ckpt``) must be given."""
    for key in cfg:
        if OmegaConf.is_missing(cfg, key):
            raise InputError(
                f"stage={cfg.get('stage')} needs {key}=... on the command line "
                f"(see conf/stage/{cfg.get('stage')}.yaml for what it takes)"
            )


def check_seed(seed: object, option: str = "seed") -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise InputError(f"{option}={seed!r}: give a whole number from 0 to {SEED_MAX}")


def check_training(cfg: DictConfig) -> None:
    """The values and files a training run checks before it builds anything."""
    require(cfg)
    check_seed(cfg.get("seed"))
    check_data(cfg.get("data"))
    check_training_options(cfg)
    max_steps = cfg.trainer.get("max_steps", -1)
    if max_steps is not None and (max_steps == 0 or max_steps < -1):
        raise InputError(
            f"trainer.max_steps={max_steps} trains nothing: give a positive number of steps, or "
            "-1 for no step limit (trainer.max_epochs then ends the run)"
        )
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path not in (None, "auto"):
        from sd_lightning.commands.resume import check_resume_file  # torch: only for a file

        check_resume_file(str(ckpt_path), cfg.get("stage"))
    if cfg.get("pretrained"):
        check_pretrained(str(cfg.pretrained))
    finetune = cfg.get("finetune")
    if finetune and finetune.get("_target_") and not cfg.get("pretrained"):
        raise InputError(
            "a fine-tuning method (finetune=...) trains on base weights: give pretrained=... "
            "(Stable Diffusion weights, a single file or a diffusers folder)"
        )
    stage = cfg.get("stage")
    if stage in ("ldm", "e2e"):
        check_component_files(cfg)
    sources = [cfg.get(k) for k in ("vae_ckpt", "pretrained", "ldm_ckpt")]
    if stage in ("ldm", "e2e") and not any(sources):
        raise InputError(
            f"stage={stage} needs vae_ckpt=... (a stage=vae run's checkpoints/last.ckpt, or "
            "Stable Diffusion's VAE) or pretrained=... (Stable Diffusion weights"
            + (" to fine-tune)" if stage == "ldm" else "), or ldm_ckpt=... (a stage=ldm run's)")
        )
    if stage == "e2e" and cfg.get("ldm_ckpt"):  # a whole stage-2 checkpoint, not another file
        from sd_lightning.weights.files import read_weight_file

        found = read_weight_file(str(cfg.ldm_ckpt), "ldm_ckpt", LDM_HINT, mmap=True)
        found.require_stage("ldm", exports=False)
    check_run_dir(cfg.paths.output_dir, ckpt_path)
    if ckpt_path == "auto":
        check_resumed_run(cfg)


def check_data(data: DictConfig | None) -> None:
    """The data group's required values, and a folder of photos that is there."""
    if not data:
        return
    for key in data:
        if OmegaConf.is_missing(data, key):
            raise InputError(
                f"this data config needs data.{key}=... (data=folder: data.path=/photos/my_cat, "
                "a folder of images; data=latents: data.urls=..., stage=encode's shards)"
            )
    if str(data.get("_target_", "")).endswith("FolderDataModule"):
        path = str(data.path)
        if not os.path.isdir(path):
            raise InputError(
                f"data.path={path!r} is not a folder: give a folder of images (.jpg, .png, "
                ".webp), each with an optional same-named .txt caption"
            )


def check_pretrained(path: str) -> None:
    """``pretrained=``: Stable Diffusion's weights (a readable file, or a folder), not a
    checkpoint of ours."""
    from sd_lightning.weights.files import read_weight_file

    expected = "Stable Diffusion weights (a single file or a diffusers folder)"
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "meta.pt")):
        return  # a diffusers folder: its parts are checked as they are read
    found = read_weight_file(path, "pretrained", expected, mmap=True)
    if found.stage is not None:
        raise InputError(
            f"pretrained={path!r} is a stage={found.stage} checkpoint of sd_lightning: "
            "pretrained= takes Stable Diffusion weights. Resume a run with ckpt_path=, or "
            "give a stage-1 checkpoint as vae_ckpt="
        )


# what each option takes, by what :func:`files.identify` calls a file
TAKES = {
    "vae_ckpt": (
        "a VAE",
        "a whole Stable Diffusion single file",
        "a stage=vae file of sd_lightning",
    ),
    "text_encoder.pretrained": ("a text encoder", "a whole Stable Diffusion single file"),
}


def check_component_files(cfg: DictConfig) -> None:
    """``vae_ckpt=``, ``text_encoder.pretrained=`` and a ``pretrained=`` folder: the wrong kind
    of file (a LoRA, an embedding, another part) is named before anything is built; only file
    headers and config.json files are read."""
    from sd_lightning.weights.files import identify, identify_folder, read_weight_file

    texts = [
        (f"{p}.pretrained", n.get("pretrained")) for p, n in text_nodes(cfg.get("text_encoder"))
    ]
    for option, value in [("vae_ckpt", cfg.get("vae_ckpt")), *texts]:
        if not value or not os.path.isfile(str(value)):
            continue
        found = read_weight_file(str(value), option, "weights")
        keys = list(found.lazy_tensors(meta=True)) if found.kind == "safetensors" else []
        what = identify(keys, found.stage) if found.kind == "safetensors" else None
        takes = TAKES["vae_ckpt" if option == "vae_ckpt" else "text_encoder.pretrained"]
        if what and not what.startswith(takes):
            raise InputError(f"{option}={str(value)!r} is {what}, not what {option}= takes")
    folders = {  # option -> (the folders it takes, what to say)
        "pretrained": ("a diffusers U-Net", "a whole pipeline folder or a unet/ folder"),
        "vae_ckpt": ("a diffusers VAE", "a whole pipeline folder or a vae/ folder"),
        "text_encoder.pretrained": ("a text encoder", "a whole pipeline or a text_encoder/ folder"),
    }
    values = {"pretrained": cfg.get("pretrained"), "vae_ckpt": cfg.get("vae_ckpt"), **dict(texts)}
    for option, value in values.items():
        if not value or not os.path.isdir(str(value)):
            continue
        what = identify_folder(str(value))
        takes, said = folders[option if option in folders else "text_encoder.pretrained"]
        if what and not what.startswith(("a diffusers pipeline", takes)):
            raise InputError(f"{option}={str(value)!r} is {what}: {option}= takes {said}")


def check_run_dir(output_dir: str, ckpt_path: str | None) -> None:
    """Refuse to start a second run in a run directory whose ``checkpoints/`` holds another run's:
    both would write ``last.ckpt`` and ``export/``, and ``ckpt_path=auto`` would resume whichever
    has the higher step. Resuming one of its own checkpoints (``auto``, or a path inside it) is
    the same run and goes on."""
    folder = os.path.join(output_dir, "checkpoints")
    found = sorted(
        n for n in (os.listdir(folder) if os.path.isdir(folder) else []) if n.endswith(".ckpt")
    )
    if not found or ckpt_path == "auto":
        return
    if ckpt_path is not None and os.path.dirname(os.path.abspath(ckpt_path)) == os.path.abspath(
        folder
    ):
        return
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    start = "ckpt_path=null (start fresh)" if ckpt_path is None else f"ckpt_path={ckpt_path}"
    raise InputError(
        f"the run directory {output_dir} already holds another run's checkpoints ({shown}); "
        f"{start} there would mix the two runs' checkpoints and exports. Start this run in a new "
        "directory (hydra.run.dir=...), resume the one there with ckpt_path=auto, or remove "
        f"{folder} first"
    )


def method(config: dict[str, Any] | DictConfig) -> str:
    """``stage=ldm finetune=lora``: what a run trains, from its config."""
    stage = config.get("stage")
    finetune = config.get("finetune") or {}
    target = str(finetune.get("_target_") or "").rsplit(".", 1)[-1]
    name = {"LoRA": "lora", "DreamBooth": "dreambooth", "TextualInversion": "textual_inversion"}
    what = f"stage={stage}"
    if stage == "ldm":
        what += f" finetune={name.get(target, 'none')}"
        if target == "DreamBooth" and finetune.get("lora"):
            what += " (a LoRA)"
    return what


def check_resumed_run(cfg: DictConfig) -> None:
    """``ckpt_path=auto`` in a run directory that holds checkpoints: they must be of what this
    command trains, or resuming would load another method's tensors (after the model is built)."""
    from sd_lightning.commands.resume import newest_checkpoint
    from sd_lightning.weights.files import sharded_meta

    found = newest_checkpoint(os.path.join(cfg.paths.output_dir, "checkpoints"))
    if found is None:
        return
    import torch

    meta_path = sharded_meta(found) if os.path.isdir(found) else found
    meta = torch.load(meta_path, map_location="cpu", weights_only=True, mmap=True)
    saved = (meta.get("sd_lightning") or {}).get("config") or {}
    theirs, ours = method(saved), method(cfg)
    if saved and theirs != ours:
        raise InputError(
            f"the run directory {cfg.paths.output_dir} holds a {theirs} run's checkpoints "
            f"({os.path.basename(found)}), and this command trains {ours}: resuming would load "
            "the other run's tensors. Start this run in a new directory (hydra.run.dir=...), or "
            "run that run's own command there to resume it"
        )


def _strings(value: Any, option: str, example: str) -> list[str]:
    """A string or a list of strings (Hydra gives ListConfigs), as a list."""
    items = [value] if isinstance(value, str) else value
    if not OmegaConf.is_list(items) and not isinstance(items, (list, tuple)):
        raise InputError(f"{option}={value!r}: give a string or a list of strings, {example}")
    items = list(items)
    if not all(isinstance(p, str) for p in items):
        raise InputError(f"{option}={value!r}: give a string or a list of strings, {example}")
    return items


def check_sampling(cfg: DictConfig) -> tuple[list[str], list[str] | str]:
    """The prompts and negative prompt(s) of ``stage=sample``; every number and the checkpoint's
    file checked, each error naming the option and the fix."""
    require(cfg)
    prompts = _strings(cfg.prompts, "prompts", PROMPTS_EXAMPLE)
    if not prompts:
        raise InputError(f"prompts is empty: give {PROMPTS_EXAMPLE}")
    negative = cfg.negative_prompt if cfg.negative_prompt is not None else ""
    negatives = _strings(negative, "negative_prompt", "one for all prompts or one per prompt")
    if not isinstance(negative, str) and len(negatives) != len(prompts):
        raise InputError(
            f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts: give one "
            "string for all prompts, or one per prompt"
        )
    for option, low in (("batch_size", 1), ("steps", 1)):
        value = cfg.get(option)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{option}={value!r}: give a whole number of at least {low}")
    if not isinstance(cfg.guidance, (int, float)) or cfg.guidance < 0:
        raise InputError(f"guidance={cfg.guidance!r}: give a number >= 0 (1: no guidance)")
    if cfg.seed is None:
        raise InputError("seed=null: sampling needs a seed (image i starts from seed + i)")
    check_seed(cfg.seed)
    if int(cfg.seed) + len(prompts) - 1 > SEED_MAX:
        raise InputError(f"seed={cfg.seed}: image i uses seed + i, which must stay <= {SEED_MAX}")
    for option, low in (("original_size", 1), ("crop", 0)):
        size_pair(cfg.get(option), option, low)
    check_add_ons(cfg)
    check_sampling_source(str(cfg.ckpt))
    return prompts, negative if isinstance(negative, str) else negatives


def size_pair(value: Any, option: str, low: int) -> tuple[int, int] | None:
    """SDXL's micro-conditioning sizes: ``null`` or two whole numbers of at least ``low``."""
    if value is None:
        return None
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if len(values) != 2 or any(
        isinstance(v, bool) or not isinstance(v, int) or v < low for v in values
    ):
        what = "[height, width]" if option == "original_size" else "[top, left]"
        raise InputError(
            f"{option}={value!r}: give {what}, two whole numbers of at least {low} (e.g. "
            f"{option}=[{'1024,1024' if low else '0,0'}])"
        )
    return int(values[0]), int(values[1])


def check_sampling_source(path: str) -> bool:
    """``ckpt=`` for sampling: a stage-2 checkpoint of ours (True), or Stable Diffusion's weights
    (False: a file without our stage record, or a diffusers folder; read in full later)."""
    from sd_lightning.weights.files import read_weight_file

    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "meta.pt")):
        return False  # a diffusers folder (a folder of ours has its meta.pt)
    found = read_weight_file(path, "ckpt", LDM_HINT, mmap=True)
    if found.stage is None:
        return False
    found.require_stage(("ldm", "e2e"), exports=False)  # e2e: a U-Net with its tuned VAE
    return True
