"""Stable Diffusion's weights as released, in our layout: original single files
(``v1-5-pruned-emaonly.safetensors``, ``.ckpt`` through ``torch.load(weights_only=True)``),
standalone VAE files (``vae-ft-mse-840000-ema-pruned.safetensors``) and diffusers folders (a whole
pipeline with ``model_index.json``, or one component such as ``sd-vae-ft-mse``).

Everything is opened through :func:`sd_lightning.weights.files.read_weight_file`, so a missing, damaged
or pickle-only file is the same clear error as anywhere else. Every key is accounted for: keys
the target network lacks, or has and the file does not, are an error listing them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sd_lightning.core.errors import InputError
from sd_lightning.weights import configs, layouts
from sd_lightning.weights.files import identify, identify_folder, read_weight_file

PREFIX = layouts.ORIGINAL_PREFIX
EMA_PREFIX = "model_ema."
UNET_META = "sd_lightning_unet"  # our single files: the U-Net's config (its heads)
VAE_META = "sd_lightning_vae"  # and the VAE's (its norm groups)
WEIGHT_NAMES = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' file stems


@dataclass
class Part:
    """One network of a Stable Diffusion release: our constructor's arguments and its weights
    in our names."""

    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    family: str | None = None
    source: str = ""
    latent_scale: float | None = None  # a VAE's: its family's scaling factor
    sample_size: int | None = None  # a diffusers U-Net's latent size (config.json)


# -- files and folders ----------------------------------------------------------------------------
def _tensors(
    path: str, option: str, expected: str, meta: bool = False
) -> Mapping[str, torch.Tensor]:
    """A weight file's tensors, each read when looked up (safetensors' memory map, torch's
    ``mmap=True``): the U-Net, VAE and text encoder readers each read only their own part of a
    whole Stable Diffusion file. ``meta``: their shapes only (nothing read)."""
    return read_weight_file(path, option, expected, mmap=True).lazy_tensors(meta)


def _under(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with ``prefix``, without it (only those are read)."""
    return {k[len(prefix) :]: state[k] for k in state if k.startswith(prefix)}


def _component_weights(
    folder: str, option: str, expected: str, meta: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of a diffusers/transformers component folder: one file, or shards with an
    ``.index.json``; safetensors first, ``.bin`` (weights_only) otherwise."""
    for stem in WEIGHT_NAMES:
        for ext in ("safetensors", "bin"):
            index = os.path.join(folder, f"{stem}.{ext}.index.json")
            if os.path.isfile(index):
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
                state: dict[str, torch.Tensor] = {}
                for name in files:
                    state.update(_tensors(os.path.join(folder, name), option, expected, meta))
                return state
            path = os.path.join(folder, f"{stem}.{ext}")
            if os.path.isfile(path):
                return dict(_tensors(path, option, expected, meta))
    raise InputError(
        f"{option}={folder!r} has no diffusion_pytorch_model.safetensors/.bin (or model.*): give "
        f"{expected}"
    )


def _read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _diffusers_part(folder: str, kind: str, option: str, expected: str, meta: bool) -> Part:
    """A diffusers ``unet/`` or ``vae/`` folder in our names (every key accounted for)."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise InputError(f"{option}={folder!r} has no config.json: give {expected}")
    d = _read_json(config_path)
    where = f"{option}={folder!r}"
    wanted = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}[kind]
    name = d.get("_class_name") or next(iter(d.get("architectures") or []), None)
    if name is not None and name != wanted:
        raise InputError(f"{where} is {identify_folder(folder)}, not a {kind}: give {expected}")
    if kind == "unet":
        config = configs.unet_config_from_diffusers(d, where)
        blocks = layouts.unet_blocks(config)
        family = configs.family_of_config(config)
    else:
        config, family = configs.vae_config_from_diffusers(d), None
        blocks = layouts.vae_blocks(config)
    state = _component_weights(folder, option, expected, meta)
    ours, unknown = layouts.convert(state, blocks, to_diffusers=False)
    if unknown:
        raise InputError(f"{where}: {len(unknown)} keys fit no {kind} block: {_listed(unknown)}")
    xl = os.path.isdir(os.path.join(os.path.dirname(folder), "text_encoder_2"))  # an SDXL pipeline
    default = configs.LATENT_SCALES["sdxl"] if xl else configs.LATENT_SCALE
    scale = float(d.get("scaling_factor", default)) if kind == "vae" else None
    if scale is not None:
        config["scaling_factor"] = scale
    size = d.get("sample_size") if kind == "unet" else None
    return Part(config, ours, family, folder, scale, size if isinstance(size, int) else None)


def _listed(keys: list[str], n: int = 5) -> str:
    return ", ".join(sorted(keys)[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _ema_weights(state: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """The U-Net's EMA copy in an original single file, under the online weights' ``names``:
    SD stores it as ``model_ema.`` + ``diffusion_model.<name>`` with the dots removed."""
    flat = {("diffusion_model." + name).replace(".", ""): name for name in names}
    n = len(EMA_PREFIX)
    return {flat[k[n:]]: state[k] for k in state if k.startswith(EMA_PREFIX) and k[n:] in flat}


def _file_or_folder(path: str, kind: str, option: str, expected: str, meta: bool) -> tuple:
    """``(Part, None)`` for a diffusers folder (a pipeline's ``<kind>/`` or the component
    itself), or ``(None, (all tensors, those under the single-file prefix of kind))``."""
    if os.path.isdir(path):
        sub = os.path.join(path, kind)
        folder = sub if os.path.isdir(sub) else path
        return _diffusers_part(folder, kind, option, expected, meta), None
    state = _tensors(path, option, expected, meta)
    return None, (state, _under(state, PREFIX[kind]))


# -- the public readers ---------------------------------------------------------------------------
def read_sd_unet(
    path: str, option: str, expected: str, use_ema: bool | str = False, meta: bool = False
) -> Part:
    """The U-Net of a single file or a diffusers pipeline / ``unet/`` folder; ``use_ema``: a
    single file's ``model_ema.`` copy (``"auto"``: where it has a whole one). ``meta``: the
    config and the weights' shapes only (nothing read)."""
    part, found = _file_or_folder(path, "unet", option, expected, meta)
    if part is not None:
        return part
    state, unet = found
    prefix = PREFIX["unet"]
    if not unet:
        what = identify(list(state)) or "a file without SD U-Net keys"
        raise InputError(
            f"{option}={path!r} is {what}, with no SD U-Net (no {prefix}* keys): give {expected}"
        )
    ema = _ema_weights(state, list(unet)) if use_ema else {}
    if use_ema == "auto":  # the copy where the file has a whole one
        use_ema = len(ema) == len(unet)
    if use_ema:
        if len(ema) != len(unet):
            raise InputError(
                f"{option}={path!r} has EMA weights for {len(ema)} of the U-Net's {len(unet)} "
                "tensors (an -emaonly or pruned file keeps only one copy): leave the EMA option off"
            )
        unet = ema
    recorded = read_weight_file(path, option, expected).metadata.get(UNET_META)
    if isinstance(recorded, dict):  # our single files say their heads (the weights do not)
        config = dict(recorded)
        family = configs.family_of_config(config)
    else:
        family, config = configs.unet_config_from_weights(unet, f"{option}={path!r}")
    return Part(config, unet, family, path)


def read_sd_unet_ema(
    path: str, option: str, expected: str, names: list[str]
) -> tuple[dict[str, torch.Tensor] | None, int]:
    """A single file's whole ``model_ema.`` copy of the U-Net (under the online weights'
    ``names``) and its update count; ``(None, 0)`` for folders and files without a whole copy."""
    if os.path.isdir(path):
        return None, 0
    state = _tensors(path, option, expected)
    ema = _ema_weights(state, names)
    if len(ema) != len(names):
        return None, 0
    count = EMA_PREFIX + "num_updates"
    return ema, int(state[count]) if count in state else 0


def read_sd_vae(path: str, option: str, expected: str, meta: bool = False) -> Part:
    """The VAE of a single file, a standalone VAE file, or a diffusers pipeline / ``vae/``
    folder, with its family's latent scale (also in ``config["scaling_factor"]``)."""
    where = f"{option}={path!r}"
    part, found = _file_or_folder(path, "vae", option, expected, meta)
    if part is not None:
        return part
    state, vae = found
    prefix = PREFIX["vae"]
    if not vae and "encoder.conv_in.weight" in state:  # a standalone VAE file
        vae = {k: state[k] for k in state if not k.startswith(("model_ema.", "loss."))}
    if not vae:
        what = identify(list(state)) or "a file without SD VAE keys"
        raise InputError(
            f"{where} is {what}, with no SD VAE (no {prefix}* or encoder.* keys): give {expected}"
        )
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in vae:  # one diffusers-named file
        raise InputError(
            f"{where} is a diffusers-named VAE file: give its folder (with config.json)"
        )
    # our exports record their scale (a VAE trained here has its own); SD's files do not: an
    # SDXL file's VAE (beside SGM's conditioner) has SDXL's
    meta = read_weight_file(path, option, expected).metadata
    xl = any(
        k.startswith(("conditioner.embedders.", "model.diffusion_model.label_emb.")) for k in state
    )
    default = configs.LATENT_SCALES["sdxl"] if xl else configs.LATENT_SCALE
    scale = float(meta.get("sd_lightning_latent_scale", default))
    recorded = meta.get(VAE_META)  # our single files: its norm groups (the weights do not say)
    config = dict(recorded) if isinstance(recorded, dict) else {}
    config = {**configs.vae_config_from_weights(vae, where), **config, "scaling_factor": scale}
    return Part(config, vae, None, path, scale)


def build(cls: type, part: Part, where: str) -> torch.nn.Module:
    """``cls(**part.config)`` holding ``part``'s weights, every key checked. Built on the meta
    device and given uninitialised memory, so no time goes into a random initialisation the
    weights replace (``UNetModel`` and ``AutoencoderKL`` have no buffers outside their state)."""
    with torch.device("meta"):
        net = cls(**part.config)
    check_keys(net, part.state, where)
    net = net.to_empty(device="cpu")
    net.load_state_dict(part.state)
    return net


def check_keys(
    module: torch.nn.Module, state: dict[str, torch.Tensor], where: str, skip: str | None = None
) -> None:
    """Every key accounted for, with the right shapes: else an error listing what differs.
    ``skip``: the module's keys containing it are not expected in ``state`` (adapters)."""
    own = {k: v for k, v in module.state_dict().items() if skip is None or skip not in k}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_listed(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_listed(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} of another shape ({_listed(shapes)})")
    if problems:
        raise InputError(f"{where} does not fit the network it describes: " + "; ".join(problems))
