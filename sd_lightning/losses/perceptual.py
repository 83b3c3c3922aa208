"""LPIPS (the ``lpips`` package) with an honest choice of VGG trunk.

``trunk="imagenet"`` is the real thing: torchvision's ImageNet VGG16, from ``weights_path`` when
given, else from torch hub's cache (downloaded there on machines with internet access).
``trunk="random"`` builds a randomly initialised VGG trunk (the learned linear heads still ship
inside the lpips package): it runs anywhere and is what the demo and the tests use, but it is not
a perceptual metric, and a warning says so.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import warnings

import torch
from torch import nn

log = logging.getLogger(__name__)

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are needed but neither cached nor downloadable."""


def _new_lpips(random_trunk: bool) -> nn.Module:
    import lpips

    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=`
        warnings.filterwarnings(
            "ignore", message=".*(pretrained|weight enum).*", category=UserWarning
        )
        return lpips.LPIPS(net="vgg", pnet_rand=random_trunk, verbose=False)


def _load_vgg_trunk(model: nn.Module, path: str) -> None:
    """Copy torchvision VGG16 ``features.*`` weights into lpips' sliced trunk (``net.sliceK.IDX``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    mapped = {}
    for name, _ in model.net.named_parameters():
        idx_and_param = name.split(".", 1)[1]  # "slice2.5.weight" -> "5.weight"
        mapped[name] = state[f"features.{idx_and_param}"]
    model.net.load_state_dict(mapped, strict=True)


def build_lpips(trunk: str = "imagenet", weights_path: str | None = None) -> nn.Module:
    """Return an ``lpips.LPIPS(net="vgg")`` module in eval mode with frozen weights.

    Inputs to the returned module are images in [-1, 1]; it returns one distance per image.
    """
    if trunk == "random":
        log.warning(
            "LPIPS uses a RANDOMLY INITIALISED VGG trunk (loss.perceptual.trunk=random): fine for "
            "tests and the demo, not a perceptual metric. Use trunk=imagenet for real training."
        )
        model = _new_lpips(random_trunk=True)
    elif trunk == "imagenet":
        if weights_path is not None:
            if not os.path.isfile(weights_path):
                raise MissingWeightsError(
                    f"loss.perceptual.weights_path={weights_path!r} does not exist; point it at "
                    f"torchvision's {VGG16_FILE} (from {VGG16_URL})"
                )
            model = _new_lpips(random_trunk=True)
            _load_vgg_trunk(model, weights_path)
        else:
            cached = os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)
            try:
                model = _new_lpips(random_trunk=False)
            except (urllib.error.URLError, OSError) as err:
                raise MissingWeightsError(
                    f"LPIPS needs torchvision's ImageNet VGG16 weights at {cached} and could not "
                    f"download them ({err}). Fetch {VGG16_URL} on a machine with internet access and "
                    f"copy it to that path (or set TORCH_HOME), or pass "
                    f"loss.perceptual.weights_path=/path/to/{VGG16_FILE}. For a smoke test without "
                    f"them: loss.perceptual.trunk=random."
                ) from err
    else:
        raise ValueError(f"loss.perceptual.trunk must be 'imagenet' or 'random', got {trunk!r}")
    model.requires_grad_(False).eval()
    return model
