"""The frozen OpenCLIP text encoder that conditions the U-Net (SD 2.x's ``FrozenOpenCLIPEmbedder``).

Captions -> OpenCLIP's tokenizer -> token embedding + positions -> the text transformer, stopping
``layer`` blocks early ("penultimate" as SD 2 does, or "last") -> ``ln_final`` -> token states
``(batch, context_length, width)`` for cross-attention. Always under ``no_grad``, never trained.

Real weights come from ``open_clip.create_model(name, pretrained=tag or local file)``; the vision
tower is dropped. Where they cannot be had (no network, no cache), the error says how to provide
them. ``random_text_cfg`` builds OpenCLIP's own ``TextTransformer`` at a small size with seeded
random weights instead: prompts stay distinguishable (the demo and the tests learn from them) but
carry no CLIP semantics, and the log says so.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

LAYERS = {"last": 0, "penultimate": 1}
SD_HINT = "Stable Diffusion weights (a single file, or a diffusers folder with text_encoder/)"


class OpenCLIPTextEncoder(nn.Module):
    """``encoder(captions) -> (batch, context_length, width)`` token states.

    Args:
        name: OpenCLIP architecture (``ViT-H-14`` for SD 2.x).
        pretrained: OpenCLIP tag (``laion2b_s32b_b79k``, ``openai``), a local OpenCLIP weights
            file, or Stable Diffusion's weights (a single file, or a diffusers folder with
            ``text_encoder/``): SD 1.x's CLIP ViT-L/14, SD 2.x's OpenCLIP ViT-H/14.
        layer: ``"penultimate"`` (SD 2.x), ``"last"`` (SD 1.x), the number of final blocks to
            skip ("clip skip"), or ``"auto"``: what the SD weights were trained with.
        pad: what fills a prompt after its end-of-text token: ``"zero"`` (OpenCLIP, SD 2.x) or
            ``"eot"`` (SD 1.x's tokenizer); ``None``: the SD weights', else zero.
        quick_gelu: the random tower with CLIP ViT-L/14's activation.
        random_text_cfg: if set (``width``, ``heads``, ``layers``, ``context_length``...), a
            random-initialised ``open_clip`` ``TextTransformer`` of that size instead of ``name``.
        seed: seeds the random tower, so every process and every run builds the same one.
        cache_dir: where OpenCLIP looks for and stores downloaded weights.
    """

    def __init__(
        self,
        name: str = "ViT-H-14",
        pretrained: str | None = "laion2b_s32b_b79k",
        layer: str | int = "penultimate",
        random_text_cfg: dict[str, Any] | None = None,
        seed: int = 0,
        cache_dir: str | None = None,
        pad: str | None = None,
        quick_gelu: bool = False,
    ):
        super().__init__()
        import open_clip

        if pad not in (None, "zero", "eot"):
            raise ValueError(f"text_encoder.pad must be null, 'zero' or 'eot', got {pad!r}")
        from sd_lightning.weights.text import is_sd_source

        sd = pretrained is not None and random_text_cfg is None and is_sd_source(str(pretrained))
        if random_text_cfg is not None:
            cfg = dict(random_text_cfg)
            act = open_clip.transformer.QuickGELU if quick_gelu else nn.GELU
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                tower = open_clip.transformer.TextTransformer(**cfg, act_layer=act)
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(
                context_length=tower.context_length
            )
            log.warning(
                "text encoder: a RANDOM-initialised OpenCLIP text tower (%s, seed %d), not "
                "pretrained CLIP: prompts are told apart but carry no meaning (demo/tests only)",
                ", ".join(f"{k}={v}" for k, v in cfg.items()),
                seed,
            )
        elif sd:  # Stable Diffusion's own text encoder, from its single file or folder
            tower, found = _sd_tower(str(pretrained))
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(
                context_length=tower.context_length
            )
            pad = pad or found["pad"]
            layer = found["layer"] if layer == "auto" else layer
        else:
            tower = _create_pretrained(name, pretrained, cache_dir)
            self.tokenizer = open_clip.get_tokenizer(name)
        if layer == "auto":
            layer = "penultimate"
        if isinstance(layer, str):
            if layer not in LAYERS:
                raise ValueError(
                    f"text_encoder.layer must be 'last', 'penultimate' or a number of final "
                    f"blocks to skip, got {layer!r}"
                )
            layer = LAYERS[layer]
        blocks = len(tower.transformer.resblocks)
        if not 0 <= layer < blocks:
            raise ValueError(f"text_encoder.layer={layer} skips too many of {blocks} blocks")
        self.skip = layer
        self.random = random_text_cfg is not None  # no release's weights: exports leave it out
        self.pad_eot = pad == "eot"  # SD 1's CLIP: padded with the end-of-text token, not 0
        self.tower = tower.requires_grad_(False).eval()
        self.width = tower.transformer.width
        self.context_length = tower.context_length

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        tower = self.tower
        device = tower.positional_embedding.device
        tokens = self.tokenizer(list(captions)).to(device)
        if self.pad_eot:  # everything after the first end-of-text becomes end-of-text
            eot = self.tokenizer.eot_token_id
            tokens = torch.where((tokens == eot).cumsum(-1) > 0, eot, tokens)
        x = tower.token_embedding(tokens) + tower.positional_embedding
        mask = tower.attn_mask
        batch_first = getattr(tower.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        for block in tower.transformer.resblocks[: len(tower.transformer.resblocks) - self.skip]:
            x = block(x, attn_mask=mask)
        x = x if batch_first else x.transpose(0, 1)
        return tower.ln_final(x)


def _sd_tower(path: str) -> tuple[nn.Module, dict[str, Any]]:
    """OpenCLIP's ``TextTransformer`` with Stable Diffusion's text weights (every key checked)."""
    import open_clip

    from sd_lightning.weights.read import check_keys
    from sd_lightning.weights.text import read_sd_text

    part = read_sd_text(path, "text_encoder.pretrained", SD_HINT)
    cfg = part.config
    act = open_clip.transformer.QuickGELU if cfg["quick_gelu"] else nn.GELU
    tower = open_clip.transformer.TextTransformer(
        context_length=cfg["context_length"],
        vocab_size=cfg["vocab_size"],
        width=cfg["width"],
        heads=cfg["heads"],
        layers=cfg["layers"],
        mlp_ratio=cfg["mlp_ratio"],
        output_dim=None,  # SD reads the token states, not the pooled projection
        act_layer=act,
    )
    check_keys(tower, part.state, f"text_encoder.pretrained={path!r}")
    tower.load_state_dict(part.state)
    log.info(
        "text encoder: %s's %d-layer CLIP text tower from %s", part.family, cfg["layers"], path
    )
    return tower, cfg


def _create_pretrained(name: str, pretrained: str | None, cache_dir: str | None) -> nn.Module:
    import open_clip

    if pretrained is None:
        raise ValueError(
            f"text_encoder.pretrained is null for {name!r}: give an OpenCLIP tag (e.g. "
            f"laion2b_s32b_b79k for ViT-H-14) or a local weights file, or use "
            f"text_encoder=random_tiny for a random tower (demo and tests only)"
        )
    looks_like_file = os.sep in pretrained or pretrained.endswith((".bin", ".pt", ".safetensors"))
    if looks_like_file and not os.path.isfile(pretrained):
        raise FileNotFoundError(
            f"text_encoder.pretrained={pretrained!r}: no such file. Point it at an OpenCLIP "
            f"weights file (open_clip_pytorch_model.bin or open_clip_model.safetensors of {name})"
        )
    try:
        model = open_clip.create_model(name, pretrained=pretrained, cache_dir=cache_dir)
    except Exception as e:  # open_clip raises RuntimeError after the hub's retries
        raise RuntimeError(
            f"could not load OpenCLIP {name!r} weights {pretrained!r} ({e}). Fixes: download them "
            f"where there is network (open_clip.create_model({name!r}, pretrained={pretrained!r}) "
            f"fills the Hugging Face cache; copy it or set text_encoder.cache_dir), or set "
            f"text_encoder.pretrained=/path/to/open_clip_pytorch_model.bin"
        ) from e
    if hasattr(model, "visual"):
        del model.visual  # SD conditions on text only
    return model.text if hasattr(model, "text") else model
