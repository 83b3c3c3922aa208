"""Textual inversion (Gal et al. 2022): a new word for a concept, learned as a few embedding
vectors of the frozen text encoder; nothing else trains.

The word (``token``, e.g. ``<my-teapot>``) joins the tokenizer as one token per vector (``<t>``,
``<t>_1``...: a prompt's ``<t>`` stands for all of them), its vectors start from ``init_word``'s
embedding, and only they reach the optimizer. Checkpoints hold the vectors and the base weights'
reference; exports are AUTOMATIC1111's embedding (``<name>.safetensors``, ``emb_params``: the
prompt word there is the file's name) and diffusers' ``learned_embeds.safetensors``
(``{token: vectors}``, for ``load_textual_inversion``) (:mod:`.embedding_files`). On SDXL the
word joins both text encoders, its vectors side by side (CLIP-L's, then bigG's), exported as
SDXL's ``clip_l``/``clip_g`` file and diffusers' two ``learned_embeds`` files.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from sd_lightning.core.errors import InputError
from sd_lightning.finetune.embedding_files import embedding_files

log = logging.getLogger(__name__)


class LearnedEmbeddings(nn.Module):
    """The trained vectors of a new word (``weight``: ``(vectors, width)``)."""

    def __init__(self, token: str, weight: torch.Tensor):
        super().__init__()
        self.token = token
        self.weight = nn.Parameter(weight.clone().float())

    def extra_repr(self) -> str:
        return f"{self.token!r}, {tuple(self.weight.shape)}"


class TextualInversion:
    """``finetune=textual_inversion``.

    Args:
        token: the new word (lower-case; not a word the tokenizer knows), e.g. ``<my-teapot>``.
        init_word: the word whose embedding the vectors start from (``teapot``); its tokens'
            mean when it is several.
        num_vectors: vectors for the word (1 to a few; more capture more, need more steps).
    """

    partial = True  # checkpoints hold the vectors, the base comes from pretrained=
    unshardable = (  # why not under trainer=fsdp
        "finetune=textual_inversion trains a few thousand parameters, nothing to shard: use "
        "trainer=ddp (or trainer=gpu) instead of trainer=fsdp"
    )

    def __init__(self, token: str = "<concept>", init_word: str = "object", num_vectors: int = 1):
        if not token or any(c.isspace() for c in token):
            raise InputError(
                f"finetune.token={token!r}: give one word without spaces, e.g. '<my-teapot>'"
            )
        if not isinstance(num_vectors, int) or num_vectors < 1:
            raise InputError(f"finetune.num_vectors={num_vectors!r}: give a whole number >= 1")
        if not init_word or not str(init_word).strip():
            raise InputError("finetune.init_word is empty: give the word the token starts from")
        self.token, self.init_word, self.num_vectors = token.lower(), str(init_word), num_vectors

    def apply(self, unet: nn.Module) -> nn.Module:
        return unet.requires_grad_(False)  # the U-Net stays the base's

    def embeddings(self, text_encoder: nn.Module) -> LearnedEmbeddings:
        """Add the word to ``text_encoder`` and return its trainable vectors."""
        ids = text_encoder.tokenizer.encode(self.init_word)
        if not ids:
            raise InputError(f"finetune.init_word={self.init_word!r} has no tokens")
        try:
            text_encoder.add_embedding(self.token, self.num_vectors)
        except ValueError as e:
            raise InputError(
                f"finetune.token={self.token!r}: {e}: choose another, e.g. "
                f"'<{self.token.strip('<>')}-1>'"
            ) from e
        rows = text_encoder.token_rows(ids)  # SDXL: both encoders' rows side by side
        start = rows.mean(0, keepdim=True).repeat(self.num_vectors, 1)
        log.info(
            "finetune: textual inversion of %r, %d vector(s) of %d from %r (%d token(s)); the "
            "U-Net and the text encoder%s frozen",
            self.token,
            self.num_vectors,
            rows.shape[1],
            self.init_word,
            len(ids),
            "s" if hasattr(text_encoder, "encoders") else "",
        )
        return LearnedEmbeddings(self.token, start)

    def prepare(self, system: Any) -> None:
        """Before the first step: every caption's tokens fit the context with the whole word,
        else the vectors past it never train; refused where none fits, said where some do not."""
        data = getattr(system.trainer, "datamodule", None)
        captions = {i.caption for i in getattr(data, "images", None) or [] if i.caption}
        encoder = system.conditioner.text_encoder
        room = encoder.context_length - 2  # start- and end-of-text
        cut = {}
        for caption in captions:
            if self.token not in caption.lower():
                continue
            tokens = encoder.tokenizer.encode(encoder.expand([caption.lower()])[0])
            first = next((i for i, t in enumerate(tokens) if t >= encoder.vocab_size), None)
            if first is not None and first + self.num_vectors > room:
                cut[caption] = max(0, room - first)
        if not cut:
            return
        example, fits = next(iter(cut.items()))
        what = (
            f"finetune.num_vectors={self.num_vectors}: in {len(cut)} of {len(captions)} captions "
            f"the word's vectors run past the {room + 2}-token context (only {fits} fit in "
            f"{example!r}), and those never train"
        )
        if len(cut) == len([c for c in captions if self.token in c.lower()]):
            raise InputError(f"{what}: lower finetune.num_vectors or shorten the captions")
        log.warning("%s there: shorten those captions or lower finetune.num_vectors", what)

    def files(self, system: nn.Module, net: nn.Module, state: dict) -> dict[str, Any]:
        encoder = system.conditioner.text_encoder
        widths = getattr(encoder, "widths", None)  # SDXL: clip_l's and clip_g's vectors
        return embedding_files(self.token, system.embeddings.weight.detach().float().cpu(), widths)
