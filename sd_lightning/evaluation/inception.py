"""Inception-v3 features for FID and KID: torch-fidelity's network with the TF-ported weights
that papers report FID with (``pt_inception-2015-12-05``), and the two resize protocols.

The resize to the network's 299x299 is one of clean-fid's three modes, which differ by several FID
points, so ``eval.json`` records which one made a number:

- ``clean``: PIL bicubic (antialiased), each channel in float, not rounded (clean-fid's default);
- ``legacy_tensorflow``: TF-1's bilinear resize of the uint8 image (the original TF FID code,
  torch-fidelity, torchmetrics with ``antialias=False``);
- ``legacy_pytorch``: ``F.interpolate`` bilinear of the image in [0, 1], then ``2x - 1``
  (pytorch-fid, and so MLPerf's Stable Diffusion reference). The weights are read from a local file (the
``eval.inception`` option) or torch hub's cache; nothing is downloaded at run time.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sd_lightning.core.errors import InputError
from sd_lightning.core.fingerprint import cached_fingerprint

log = logging.getLogger(__name__)

# torch-fidelity's and torchmetrics' name for the file, then pytorch-fid's (the same tensors)
FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
CLASSIC_SHA256 = "6726825d"  # torch hub names files by the first digits of their sha256
URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + FILES[0]
DIMS = (64, 192, 768, 2048)  # the pooled widths torch-fidelity provides
RESIZES = ("clean", "legacy_tensorflow", "legacy_pytorch")
SIZE = 299
UNSAVED = "num_batches_tracked"  # batch norm's step counters: not in the converted files


def cached_file() -> str | None:
    """The classic weights in torch hub's cache (``$TORCH_HOME/hub/checkpoints``), if there."""
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    return next(
        (os.path.join(folder, f) for f in FILES if os.path.isfile(os.path.join(folder, f))), None
    )


def weights_path(option: str | None) -> str:
    """The file ``eval.inception`` names (a path, or null for torch hub's cache), or one error
    naming the file and the option; ``random`` is returned as is."""
    if option == "random":
        return option
    path = str(option) if option else cached_file()
    if path is None:
        where = os.path.join(torch.hub.get_dir(), "checkpoints", FILES[0])
        raise InputError(
            f"FID needs Inception-v3's classic weights ({FILES[0]}) and they are not in torch "
            f"hub's cache ({where}). Fetch {URL} where there is network and copy it there (or set "
            f"TORCH_HOME), or set eval.inception=/path/to/{FILES[1]} (pytorch-fid's copy: the "
            "same tensors)"
        )
    if not os.path.isfile(path):
        raise InputError(
            f"eval.inception={path!r}: no such file. Point it at {FILES[0]} (or pytorch-fid's "
            f"{FILES[1]}), from {URL}"
        )
    return path


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random Inception-v3 weights in the classic file's layout (torchvision's initialisation,
    batch-norm statistics measured on noise so the features stay finite): tests and demos."""
    import torchvision
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(seed)
    net = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=True
    )
    own = _network_from(net.state_dict(), FeatureExtractorInceptionV3)
    for module in own.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batch
    own.train()
    with torch.no_grad():
        noise = torch.Generator().manual_seed(seed)
        own(torch.randint(0, 256, (8, 3, SIZE, SIZE), generator=noise, dtype=torch.uint8))
    # as the published file holds them: no batch-norm step counters (torch-fidelity's converter)
    return {k: v.clone() for k, v in own.state_dict().items() if not k.endswith(UNSAVED)}


def _network_from(state: dict[str, torch.Tensor], cls) -> nn.Module:
    """torch-fidelity's network (``cls``) holding ``state``: its constructor reads a file."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "inception.pth")
        torch.save(state, path)
        return cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)


class InceptionFeatures(nn.Module):
    """Pooled Inception-v3 features of uint8 images (N, 3, H, W) of any size, ``dims`` wide.
    ``size``: the images are first brought to that size (PIL Lanczos, rounded to uint8), as
    papers that generate at 512 px and report FID at 256 px do (GigaGAN's COCO protocol)."""

    def __init__(
        self, weights: str, dims: int = 2048, resize: str = "clean", size: int | None = None
    ) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if dims not in DIMS:
            raise InputError(f"eval.feature_dim={dims}: choose one of {', '.join(map(str, DIMS))}")
        if resize not in RESIZES:
            raise InputError(
                f"eval.resize={resize!r}: choose {', '.join(RESIZES)} (docs/evaluation.md)"
            )
        self.dims, self.resize, self.size = dims, resize, size
        if weights == "random":
            log.warning(
                "FID uses a RANDOMLY INITIALISED Inception-v3 (eval.inception=random): fine for "
                "tests and the demo, its numbers compare with nothing"
            )
            state, self.sha256 = random_state(), "random"
        else:
            state = _read(weights)
            self.sha256 = cached_fingerprint(weights)
            if not self.sha256.startswith(CLASSIC_SHA256):
                log.warning(
                    "eval.inception=%s is not the classic pt_inception-2015-12-05 file (sha256 "
                    "%s...): its FIDs compare only with FIDs of the same file",
                    weights,
                    self.sha256[:12],
                )
        self.net = _network_from(state, FeatureExtractorInceptionV3)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """float32 features (N, dims) of uint8 images."""
        from torch_fidelity.interpolate_compat_tensorflow import (
            interpolate_bilinear_2d_like_tensorflow1x,
        )

        device = next(self.net.parameters()).device
        if self.size and images.shape[-1] != self.size:
            images = lanczos(images, self.size)
        if self.resize == "legacy_pytorch":
            x = images.to(device).float() / 255
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
            return self._trunk(2 * x - 1)
        if self.resize == "clean":
            x = clean_resize(images).to(device)
        else:
            x = interpolate_bilinear_2d_like_tensorflow1x(
                images.to(device).float(), size=(SIZE, SIZE), align_corners=False
            )
        return self._trunk((x - 128) / 128)

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        """torch-fidelity's forward from its normalised 299x299 input, to the ``dims`` pooling."""
        n = self.net
        x = n.MaxPool_1(n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x))))
        if self.dims == 64:
            return F.adaptive_avg_pool2d(x, 1).flatten(1).float()
        x = n.MaxPool_2(n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x)))
        if self.dims == 192:
            return F.adaptive_avg_pool2d(x, 1).flatten(1).float()
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e"):
            x = getattr(n, f"Mixed_{name}")(x)
        if self.dims == 768:
            return F.adaptive_avg_pool2d(x, 1).flatten(1).float()
        x = n.Mixed_7c(n.Mixed_7b(n.Mixed_7a(x)))
        return n.AvgPool(x).flatten(1).float()


def lanczos(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images resized to ``size`` x ``size`` with PIL's Lanczos filter."""
    from PIL import Image

    out = [
        np.asarray(
            Image.fromarray(im.permute(1, 2, 0).cpu().numpy()).resize((size, size), Image.LANCZOS)
        )
        for im in images
    ]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def clean_resize(images: torch.Tensor) -> torch.Tensor:
    """clean-fid's resize: each channel as a float PIL image, bicubic to 299x299, clipped to
    [0, 255] and not rounded (float32, N x 3 x 299 x 299)."""
    from PIL import Image

    out = np.empty((len(images), 3, SIZE, SIZE), dtype=np.float32)
    array = images.cpu().numpy()
    for i, image in enumerate(array):
        for c in range(3):
            channel = Image.fromarray(image[c].astype(np.float32), mode="F")
            out[i, c] = np.asarray(channel.resize((SIZE, SIZE), resample=Image.BICUBIC))
    return torch.from_numpy(out.clip(0, 255))


def _read(path: str) -> dict[str, torch.Tensor]:
    """The file's tensors, loaded without pickle, every one the shape the network needs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle refused, or not a torch file at all
        raise InputError(
            f"eval.inception={path!r} cannot be read as a tensor file without pickle ({e}). Give "
            f"{FILES[0]} as published, or re-save a plain state dict: torch.save(dict(state), path)"
        ) from None
    expected = _shapes()
    got = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
    wrong = [k for k in expected if got.get(k) != expected[k]]
    if wrong:
        k = wrong[0]
        raise InputError(
            f"eval.inception={path!r} is not Inception-v3's FID weights: {len(wrong)} of "
            f"{len(expected)} tensors missing or of another shape (e.g. {k}: {got.get(k)} where "
            f"{expected[k]} is needed). Give {FILES[0]} ({URL})"
        )
    return state


_SHAPES: dict[str, tuple[int, ...]] = {}


def _shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the classic file (from torchvision's identical layout)."""
    if not _SHAPES:
        import torchvision

        with torch.device("meta"):
            net = torchvision.models.inception_v3(
                weights=None, aux_logits=False, num_classes=1008, init_weights=False
            )
        shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        _SHAPES.update({k: v for k, v in shapes.items() if not k.endswith(UNSAVED)})
    return _SHAPES
