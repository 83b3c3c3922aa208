"""CLIP score with an OpenCLIP model read from local files: the cosine between an image's and
its caption's embeddings, reported as torchmetrics reports it (max(100 x mean cosine, 0)) and raw
(MLPerf's). ``eval.clip.model`` is an OpenCLIP name (``ViT-L-14``; MLPerf: ``ViT-H-14``) whose
``eval.clip.pretrained`` tag is read from the Hugging Face cache or a file, or ``local-dir:<folder>``
(a folder as the hub holds it: ``open_clip_config.json`` beside the weights). Images go through
the model's own evaluation transform (resize, centre crop, normalise)."""

from __future__ import annotations

import glob
import logging
import os
from contextlib import contextmanager

import torch
from torch import nn

from sd_lightning.core.errors import InputError
from sd_lightning.core.fingerprint import cached_fingerprint
from sd_lightning.weights.openclip import tag_quick_gelu, weights_file

log = logging.getLogger(__name__)
LOCAL = "local-dir:"


class ClipScorer(nn.Module):
    """``forward(images, captions)``: the cosine per image (uint8 N x 3 x H x W)."""

    def __init__(
        self,
        model: str = "ViT-L-14",
        pretrained: str | None = "openai",
        cache_dir=None,
        quick_gelu: bool | None = None,
    ) -> None:
        super().__init__()
        import open_clip

        self.name = str(model)
        self.tag = "local-dir" if self.name.startswith(LOCAL) else pretrained
        with _quiet(logging.ERROR if pretrained == "random" else logging.WARNING):
            net, preprocess, path = self._build(model, pretrained, cache_dir, quick_gelu)
            self.tokenizer = open_clip.get_tokenizer(self.name)
        self.sha256 = cached_fingerprint(path) if path else "random"
        self.net = net.eval().requires_grad_(False)
        blocks = getattr(getattr(self.net, "transformer", None), "resblocks", None)  # text tower
        gelu = type(getattr(blocks[0].mlp, "gelu", None)).__name__ if blocks else ""
        self.activation = "quick_gelu" if gelu == "QuickGELU" else "gelu"
        self.preprocess = preprocess
        log.info("CLIP score: OpenCLIP %s (%s) from %s", self.name, self.tag, path or "nowhere")

    def _build(self, model, pretrained, cache_dir, quick_gelu):
        import open_clip

        if self.name.startswith(LOCAL):
            path = _local_weights(self.name[len(LOCAL) :])
            net, _, preprocess = open_clip.create_model_and_transforms(self.name)
        else:
            if open_clip.get_model_config(self.name) is None:
                raise InputError(
                    f"eval.clip.model={self.name!r} is not an OpenCLIP model (ViT-L-14, "
                    "ViT-H-14, ...) nor local-dir:/path/to/folder"
                )
            if pretrained == "random":
                path = None
                log.warning(
                    "CLIP score uses a RANDOMLY INITIALISED %s (eval.clip.pretrained=random): "
                    "fine for tests and the demo, its numbers compare with nothing",
                    self.name,
                )
            else:
                path = weights_file(self.name, str(pretrained), cache_dir, "eval.clip.pretrained")
            is_file = path is not None and os.path.isfile(str(pretrained))
            if quick_gelu is None and is_file:
                raise InputError(
                    f"eval.clip.pretrained={pretrained!r} is a file: its activation cannot be read "
                    "from it; set eval.clip.quick_gelu=true for OpenAI's weights (trained with "
                    "QuickGELU), false for LAION's, or give the tag (openai, laion2b_s32b_b79k)"
                )
            if quick_gelu is None:
                quick_gelu = tag_quick_gelu(self.name, pretrained if path else None)
            net, _, preprocess = open_clip.create_model_and_transforms(
                self.name, pretrained=path, force_quick_gelu=bool(quick_gelu)
            )
        return net, preprocess, path

    @torch.no_grad()
    def forward(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        from PIL import Image

        device = next(self.net.parameters()).device
        pixels = torch.stack(
            [self.preprocess(Image.fromarray(im.permute(1, 2, 0).cpu().numpy())) for im in images]
        )
        image = self.net.encode_image(pixels.to(device), normalize=True)
        text = self.net.encode_text(self.tokenizer(captions).to(device), normalize=True)
        return (image.float() * text.float()).sum(-1)


@contextmanager
def _quiet(level: int):
    """open_clip reports each step of a model's creation on the root logger: not ours to show."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(max(level, before))
    try:
        yield
    finally:
        root.setLevel(before)


def _local_weights(folder: str) -> str:
    """The weights file of an OpenCLIP folder, or an error naming what is missing."""
    if not os.path.isfile(os.path.join(folder, "open_clip_config.json")):
        raise InputError(
            f"eval.clip.model=local-dir:{folder}: no open_clip_config.json there. Give a folder "
            "as the Hugging Face hub holds an OpenCLIP model (open_clip_config.json and "
            "open_clip_model.safetensors), or an OpenCLIP name with eval.clip.pretrained"
        )
    found = sorted(
        glob.glob(os.path.join(folder, "open_clip_model.safetensors"))
        + glob.glob(os.path.join(folder, "open_clip_pytorch_model.bin"))
    )
    if not found:
        raise InputError(
            f"eval.clip.model=local-dir:{folder} has no open_clip_model.safetensors nor "
            "open_clip_pytorch_model.bin: copy the model's weights beside its config"
        )
    return found[0]


def architecture(model: str, tag: str | None) -> nn.Module:
    """The network ``model`` with the activation the weights of ``tag`` were trained with, on
    the meta device (no memory): what a preset's weights would be loaded into."""
    import open_clip

    quick = tag_quick_gelu(model, tag)
    with _quiet(logging.ERROR), torch.device("meta"):
        return open_clip.create_model(model, pretrained=None, force_quick_gelu=quick, device="meta")


def torchmetrics_score(cosines: torch.Tensor) -> float:
    """torchmetrics' CLIP score of a set: max(100 x the mean cosine, 0) (``CLIPScore.compute``)."""
    return max(100 * float(cosines.double().mean()), 0.0)
