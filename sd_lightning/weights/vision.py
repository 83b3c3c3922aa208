"""The frozen vision encoder that representation alignment aligns with: DINOv2 (ViT-B/14 by
default, with or without registers) read through transformers from a local folder as the hub
holds it (``config.json`` and ``model.safetensors``), or through timm from a weights file
(:mod:`.vision_timm`); nothing is downloaded.

Images are prepared as REPA prepares them: [0, 1], ImageNet's mean and std, bicubic to the
encoder's resolution (224 px: a 16 x 16 grid of 14 px patches); the features are the patch
tokens after the final layer norm (no class or register tokens).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sd_lightning.core.errors import InputError

log = logging.getLogger(__name__)
KINDS = ("dinov2", "dinov2_with_registers")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPTION = "repa.encoder"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise InputError(
            "representation alignment reads DINOv2 through transformers: pip install transformers"
        ) from None
    return transformers


def read_config(path: str) -> dict[str, Any]:
    """The folder's ``config.json``, which must describe a DINOv2 model."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise InputError(
            f"{OPTION}={path!r}: no config.json there. Give a DINOv2 folder as the hub holds it "
            "(facebook/dinov2-base: config.json and model.safetensors), or random (tests)"
        )
    with open(config_file) as f:
        config = json.load(f)
    if config.get("model_type") not in KINDS:
        raise InputError(
            f"{OPTION}={path!r} holds a {config.get('model_type')!r} model, not DINOv2 "
            f"({' or '.join(KINDS)}): give a DINOv2 folder (facebook/dinov2-base)"
        )
    return config


class VisionEncoder(nn.Module):
    """``forward(images in [-1, 1])`` -> patch tokens ``(B, N, D)`` and their grid ``(gh, gw)``."""

    def __init__(
        self,
        path: str,
        resolution: int = 224,
        random_config: dict[str, Any] | None = None,
        timm_model: str | None = None,
        timm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backend = "timm" if os.path.isfile(str(path)) else "transformers"
        if self.backend == "timm":  # a weights file: timm builds the architecture it names
            from sd_lightning.weights.vision_timm import DEFAULT_MODEL, timm_vit

            model = timm_model or DEFAULT_MODEL
            net = timm_vit(str(path), model, int(resolution), timm_kwargs)
            self._timm_setup(net, int(resolution))
            log.info("representation alignment: %s (timm) from %s", model, path)
            return
        transformers = _transformers()
        if path == "random":
            config = dict(random_config or {})
            registers = int(config.pop("num_register_tokens", 0) or 0)
            if registers:
                cfg = transformers.Dinov2WithRegistersConfig(
                    num_register_tokens=registers, **config
                )
                net = transformers.Dinov2WithRegistersModel(cfg)
            else:
                net = transformers.Dinov2Model(transformers.Dinov2Config(**config))
            log.warning(
                "representation alignment aligns with a RANDOMLY INITIALISED DINOv2 "
                "(repa.encoder=random): tests and the demo only"
            )
        else:
            config = read_config(str(path))
            kind = config["model_type"]
            cls = (
                transformers.Dinov2WithRegistersModel
                if kind != "dinov2"
                else transformers.Dinov2Model
            )
            net = _load_strictly(cls, str(path))
            log.info("representation alignment: %s from %s", kind, path)
        self.net = net.eval().requires_grad_(False)
        self.registers = int(getattr(net.config, "num_register_tokens", 0) or 0)
        self.patch = int(net.config.patch_size)
        if resolution % self.patch:
            raise InputError(
                f"repa.resolution={resolution}: give a multiple of the encoder's patch "
                f"({self.patch} px), e.g. {16 * self.patch}"
            )
        self.resolution, self.dim = int(resolution), int(net.config.hidden_size)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def _timm_setup(self, net: nn.Module, resolution: int) -> None:
        self.net = net
        self.registers = int(net.num_prefix_tokens) - 1  # the class token and the registers
        self.patch = int(net.patch_embed.patch_size[0])
        self.resolution, self.dim = resolution, int(net.embed_dim)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.resolution // self.patch
        return side, side

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float().clamp(-1, 1) + 1) / 2
        x = (x - self.mean) / self.std
        size = (self.resolution, self.resolution)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        if self.backend == "timm":  # after the final norm, as DINOv2's x_norm_patchtokens
            return self.net.forward_features(x)[:, 1 + self.registers :]
        states = self.net(pixel_values=x).last_hidden_state
        return states[:, 1 + self.registers :]


def _load_strictly(cls: Any, path: str) -> nn.Module:
    """``cls.from_pretrained(path)``, refusing weights that do not fill the network its
    config.json describes (transformers would start the missing ones at random, silently)."""
    fix = (
        "the folder's weights and config.json must be one model's (the hub's facebook/dinov2-* "
        "folder as downloaded)"
    )
    try:
        net, info = cls.from_pretrained(path, output_loading_info=True)
    except (RuntimeError, ValueError, OSError) as exn:  # sizes that differ, a damaged file
        first = str(exn).strip().splitlines()[0][:300]
        raise InputError(
            f"repa.encoder={path!r}: its weights do not load ({first}); {fix}"
        ) from None
    wrong = [
        *info.get("missing_keys", []),
        *[m[0] if isinstance(m, tuple) else m for m in info.get("mismatched_keys", [])],
    ]
    if wrong:
        shown = ", ".join(sorted(wrong)[:3]) + (
            f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        )
        raise InputError(
            f"repa.encoder={path!r}: {len(wrong)} weights of the network its config.json "
            f"describes are missing or of another size ({shown}); {fix}"
        )
    return net
