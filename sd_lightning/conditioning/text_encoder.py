"""The frozen OpenCLIP text encoder that conditions the U-Net (SD 2.x's ``FrozenOpenCLIPEmbedder``,
and each of SDXL's two).

Captions -> OpenCLIP's tokenizer -> token embedding + positions -> the text transformer, stopping
``layer`` blocks early ("penultimate" as SD 2 does, or "last") -> ``ln_final`` (SD 1/2; SDXL
reads the states without it) -> token states ``(batch, context_length, width)`` for
cross-attention. With ``pooled``, also the pooled vector SDXL adds to the time embedding: the
last block's output after ``ln_final`` at the end-of-text token, through ``text_projection``.
Always under ``no_grad``, never trained.

Real weights come from ``open_clip.create_model(name, pretrained=tag or local file)``; the vision
tower is dropped. Where they cannot be had (no network, no cache), the error says how to provide
them. ``random_text_cfg`` builds OpenCLIP's own ``TextTransformer`` at a small size with seeded
random weights instead: prompts stay distinguishable (the demo and the tests learn from them) but
carry no CLIP semantics, and the log says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from sd_lightning.core.errors import InputError

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
        quick_gelu: the tower's activation: QuickGELU (CLIP ViT-L/14 as OpenAI trained it, SD 1)
            or GELU; ``None``: what the OpenCLIP tag records (``openai``: QuickGELU), GELU for
            a random tower. SD weights say it themselves.
        final_norm: the token states through ``ln_final`` (SD 1/2) or not (SDXL); ``None``: what
            the SD weights were trained with, else ``True``.
        pooled: also give the pooled, projected end-of-text vector (:meth:`encode`; SDXL's
            OpenCLIP ViT-bigG/14).
        component: which text encoder of SD weights: ``text_encoder`` or, in SDXL's,
            ``text_encoder_2`` (diffusers' folder names; SGM's ``conditioner.embedders.0/1``).
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
        quick_gelu: bool | None = None,
        final_norm: bool | None = None,
        pooled: bool = False,
        component: str = "text_encoder",
    ):
        super().__init__()
        import open_clip

        if pad not in (None, "zero", "eot"):
            raise ValueError(f"text_encoder.pad must be null, 'zero' or 'eot', got {pad!r}")
        from sd_lightning.weights.openclip import pretrained_tower
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
            tower, found = _sd_tower(str(pretrained), component)
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(
                context_length=tower.context_length
            )
            pad = pad or found["pad"]
            layer = found["layer"] if layer == "auto" else layer
            final_norm = found["final_norm"] if final_norm is None else final_norm
            self.pool = found.get("pool", "argmax")
        else:
            if pretrained is None:
                raise InputError(
                    f"text_encoder.pretrained is null for {name!r}: give an OpenCLIP tag (e.g. "
                    f"laion2b_s32b_b79k for ViT-H-14) or a local weights file, or use "
                    f"text_encoder=random_tiny for a random tower (demo and tests only)"
                )
            tower = pretrained_tower(name, str(pretrained), cache_dir, quick_gelu)
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
        if pooled and getattr(tower, "text_projection", None) is None:
            raise InputError(
                "text_encoder: pooled=true needs a tower with a text projection (SDXL's OpenCLIP "
                "ViT-bigG/14, or random_text_cfg.output_dim)"
            )
        self.pool = getattr(self, "pool", "argmax")  # where it pools (SD weights record it)
        self.skip = layer
        self.final_norm = True if final_norm is None else bool(final_norm)
        self.pooled = bool(pooled)
        self.pooled_dim = _projection_dim(tower) if pooled else None
        self.random = random_text_cfg is not None  # no release's weights: exports leave it out
        self.pad_eot = pad == "eot"  # SD 1's CLIP: padded with the end-of-text token, not 0
        self.tower = tower.requires_grad_(False).eval()
        self.width = tower.transformer.width
        self.context_length = tower.context_length
        self.trains = False  # LoRA adapters on the tower train (finetune.text_encoder=true)
        self.added: list[str] = []  # tokens past the vocabulary (textual inversion)
        self.expansions: dict[str, str] = {}
        self.register_buffer("added_rows", torch.zeros(0, self.width), persistent=False)

    def add_embedding(self, name: str, count: int = 1, rows: torch.Tensor | None = None):
        """A new word ``name`` of ``count`` vectors (tokens ``name``, ``name_1``...) after the
        vocabulary, one token each to the tokenizer whatever their spelling; a prompt's ``name``
        becomes all of them. ``rows``: their embeddings (fixed: loaded embeddings), or ``None``
        when the caller passes them to :meth:`forward` as ``extra`` (trained ones, added after
        every fixed one). Returns the ids. Names are lower-case (prompts are lower-cased)."""
        import regex
        from open_clip.tokenizer import SimpleTokenizer

        name = name.lower()
        if not regex.fullmatch(r"[!-~]+", name):
            raise ValueError(
                f"{name!r}: a new word is printable ASCII without spaces (e.g. '<my-teapot>')"
            )
        tokens = [name] + [f"{name}_{i}" for i in range(1, count)]
        known = self.tokenizer.encoder
        clash = [t for t in tokens if t in known or t + "</w>" in known]
        if clash:
            raise ValueError(f"{clash[0]!r} is already a word of the tokenizer")
        if not isinstance(self.tokenizer, SimpleTokenizer):
            raise ValueError(f"{type(self.tokenizer).__name__} cannot take new tokens")
        if rows is not None and len(self.added_rows) < len(self.added):
            raise ValueError(
                "an embedding is loaded after a trained word was added: load embeddings first"
            )
        if rows is not None:
            rows = rows.to(self.added_rows)
            if rows.shape != (count, self.width):
                raise ValueError(
                    f"{name!r}: {count} vector(s) of {self.width} numbers expected (this text "
                    f"encoder's width), got shape {tuple(rows.shape)}"
                )
            self.added_rows = torch.cat([self.added_rows, rows])
        self.added += tokens
        self.expansions[name] = " ".join(tokens)
        # the new words after the vocabulary, each one token (cached: never split by BPE);
        # matched before anything else, escaped, longest first (<t>_1 is not <t> and _1)
        tokenizer = SimpleTokenizer(context_length=self.context_length)
        for word in self.added:
            tokenizer.encoder[word] = len(tokenizer.decoder)
            tokenizer.decoder[len(tokenizer.decoder)] = word
            tokenizer.cache[word] = word
        tokenizer.vocab_size = len(tokenizer.encoder)
        words = sorted(["<start_of_text>", "<end_of_text>", *self.added], key=len, reverse=True)
        special = "|".join(map(regex.escape, words))
        rest = r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
        tokenizer.pat = regex.compile(special + rest, regex.IGNORECASE)
        self.tokenizer = tokenizer
        return [tokenizer.encoder[t] for t in tokens]

    def expand(self, captions: Sequence[str]) -> list[str]:
        """Multi-vector words spelled out: ``<t>`` -> ``<t> <t>_1 <t>_2``."""
        import regex

        out = list(captions)
        for name, tokens in self.expansions.items():
            if tokens != name:
                word = regex.compile(regex.escape(name) + r"(?!_\d)", regex.IGNORECASE)
                out = [word.sub(tokens, c) for c in out]
        return out

    @property
    def vocab_size(self) -> int:
        return self.tower.token_embedding.num_embeddings

    def token_rows(self, ids: list[int]) -> torch.Tensor:
        """The embedding rows of token ``ids`` (``(len(ids), width)``, float32)."""
        return self.tower.token_embedding.weight.detach()[ids].float()

    def embed_tokens(self, tokens: torch.Tensor, extra: torch.Tensor | None = None):
        """Token embeddings: the tower's table, then the added tokens' rows (fixed, then
        ``extra``)."""
        table = self.tower.token_embedding
        x = table(tokens.clamp(max=self.vocab_size - 1))
        if not self.added:
            return x
        rows = self.added_rows.to(x.dtype)
        if extra is not None:
            rows = torch.cat([rows, extra.to(x.dtype)])
        if not len(rows):  # trained tokens, not passed: the prompts must not use them
            return x
        past = tokens >= self.vocab_size
        added = rows[(tokens - self.vocab_size).clamp(min=0, max=len(rows) - 1)]
        return torch.where(past[..., None], added, x)

    def forward(self, captions: Sequence[str], extra: torch.Tensor | None = None) -> torch.Tensor:
        """Token states of ``captions``; ``extra``: the embeddings of the last added tokens, when
        they train (gradients reach them and the tower's LoRA adapters, never its weights)."""
        return self.encode(captions, extra)[0]

    def encode(
        self, captions: Sequence[str], extra: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(token states, pooled vector or None)`` of ``captions`` (see :meth:`forward`)."""
        trained = self.trains or (extra is not None and extra.requires_grad)
        with torch.set_grad_enabled(trained and torch.is_grad_enabled()):
            return self._states(captions, extra)

    def _states(self, captions: Sequence[str], extra: torch.Tensor | None) -> tuple:
        tower = self.tower
        device = tower.positional_embedding.device
        tokens = self.tokenizer(self.expand(captions)).to(device)
        if self.pad_eot:  # everything after the first end-of-text becomes end-of-text
            eot = self.tokenizer.eot_token_id
            tokens = torch.where((tokens == eot).cumsum(-1) > 0, eot, tokens)
        x = self.embed_tokens(tokens, extra) + tower.positional_embedding
        mask = tower.attn_mask
        batch_first = getattr(tower.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        blocks = tower.transformer.resblocks
        stop = len(blocks) - self.skip
        states = x
        for i, block in enumerate(blocks[: len(blocks) if self.pooled else stop]):
            x = block(x, attn_mask=mask)
            if i == stop - 1:
                states = x
        t = (lambda y: y) if batch_first else (lambda y: y.transpose(0, 1))
        states = tower.ln_final(t(states)) if self.final_norm else t(states)
        if not self.pooled:
            return states, None
        # the last block's output, normed, at the end-of-text token, projected: the highest id
        # of the vocabulary (OpenCLIP's and SGM's argmax; transformers' with SDXL's eos_token_id
        # 2), words added past it not counted (they would win the argmax: kohya's pool
        # workaround, ComfyUI and AUTOMATIC1111 pool at the end-of-text too), or the first
        # end-of-text where a folder's config says so
        last = tower.ln_final(t(x))
        if self.pool == "argmax":
            where = tokens.masked_fill(tokens >= self.vocab_size, 0).argmax(dim=-1)
        else:
            where = (tokens == self.tokenizer.eot_token_id).int().argmax(dim=-1)
        eot = last[torch.arange(len(last), device=device), where]
        proj = tower.text_projection
        return states, proj(eot) if isinstance(proj, nn.Linear) else eot @ proj


def _projection_dim(tower: nn.Module) -> int:
    proj = tower.text_projection
    return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]


def _sd_tower(path: str, component: str = "text_encoder") -> tuple[nn.Module, dict[str, Any]]:
    """OpenCLIP's ``TextTransformer`` with Stable Diffusion's text weights (every key checked)."""
    import open_clip

    from sd_lightning.weights.read import check_keys
    from sd_lightning.weights.text import read_sd_text

    part = read_sd_text(path, "text_encoder.pretrained", SD_HINT, component)
    cfg = part.config
    act = open_clip.transformer.QuickGELU if cfg["quick_gelu"] else nn.GELU
    norm = partial(open_clip.transformer.LayerNorm, eps=cfg["layer_norm_eps"])
    tower = open_clip.transformer.TextTransformer(
        context_length=cfg["context_length"],
        vocab_size=cfg["vocab_size"],
        width=cfg["width"],
        heads=cfg["heads"],
        layers=cfg["layers"],
        mlp_ratio=cfg["mlp_ratio"],
        output_dim=cfg.get("projection_dim"),  # SDXL's bigG pools; SD reads token states only
        act_layer=act,
        norm_layer=norm,
    )
    check_keys(tower, part.state, f"text_encoder.pretrained={path!r}")
    tower.load_state_dict(part.state)
    log.info(
        "text encoder: %s's CLIP text tower from %s (%d layers of %d, %d heads, %s)",
        part.family,
        path,
        cfg["layers"],
        cfg["width"],
        cfg["heads"],
        "quick-GELU" if cfg["quick_gelu"] else "GELU",
    )
    return tower, cfg
