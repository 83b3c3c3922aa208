"""Image transforms: resize (antialiased) the shorter side, crop, optional flip, to [-1, 1]."""

from __future__ import annotations

import torch
import torchvision.transforms.v2 as T
from PIL import Image


class ImageTransform:
    """PIL image -> float tensor (3, size, size) in [-1, 1]."""

    def __init__(self, size: int, crop: str = "center", hflip: bool = False):
        if crop not in ("center", "random"):
            raise ValueError(f"data.crop must be 'center' or 'random', got {crop!r}")
        self.size = size
        steps = [
            T.PILToTensor(),
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(size) if crop == "center" else T.RandomCrop(size),
        ]
        if hflip:
            steps.append(T.RandomHorizontalFlip())
        steps += [T.ToDtype(torch.float32, scale=True), T.Normalize([0.5] * 3, [0.5] * 3)]
        self.transform = T.Compose(steps)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image).clamp_(-1.0, 1.0)
