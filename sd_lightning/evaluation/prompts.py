"""The captions an evaluation generates from: a text file (one caption a line) or the captions
of shards, ``num_images`` of them, the first ones or a seeded pick (MLPerf's COCO set: 30,000
captions picked with seed 2023)."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np

from sd_lightning.core.errors import InputError

OPTION = "eval.prompts"


def read_prompts(source: str, count: int, pick_seed: int | None = None) -> list[str]:
    """``count`` captions of ``source``; fewer there, an empty file or no file: an error."""
    captions = _captions(str(source))
    if not captions:
        raise InputError(
            f"{OPTION}={source!r} holds no caption: give a text file with one caption a line, or "
            "shards with .txt captions"
        )
    if len(captions) < count:
        raise InputError(
            f"{OPTION}={source!r} holds {len(captions)} captions and eval.num_images={count}: "
            f"give more captions or set eval.num_images={len(captions)} or fewer"
        )
    if pick_seed is None:
        return captions[:count]
    picked = np.random.RandomState(int(pick_seed)).permutation(len(captions))[:count]
    return [captions[i] for i in picked]


def _captions(source: str) -> list[str]:
    if source.endswith(".tar") or "{" in source or "::" in source:
        return _shard_captions(source)
    if not os.path.isfile(source):
        raise InputError(
            f"{OPTION}={source!r}: no such file. Give a text file with one caption a line (e.g. "
            "COCO's captions, docs/evaluation.md), or shards (/data/coco/{00000..00009}.tar)"
        )
    with open(source, encoding="utf-8-sig", newline="") as f:  # "\r" inside a caption stays
        try:
            lines = [line.rstrip("\r") for line in f.read().split("\n")]  # only newlines end one
        except UnicodeDecodeError as e:
            raise InputError(f"{OPTION}={source!r} is not UTF-8 text ({e})") from None
    return [line.strip() for line in lines if line.strip()]


def _shard_captions(source: str) -> list[str]:
    from sd_lightning.data.pipeline import Skip, caption_of
    from sd_lightning.data.shards import expand_urls
    from sd_lightning.data.tar import shard_samples

    try:
        urls = expand_urls(source, OPTION)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    captions, skipped = [], Counter()
    for sample in shard_samples(urls, skipped):
        try:
            captions.append(caption_of(sample))
        except (Skip, ValueError):
            skipped["caption"] += 1
    return [c for c in captions if c]
