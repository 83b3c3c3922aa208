"""The embedded demo data set: coloured shapes on plain backgrounds, with captions that state the
shape, the colour and the position ("a red circle at the top left").

Generated once, deterministically from a seed, as real WebDataset shards (``.jpg`` + ``.txt`` +
``.json`` per sample) plus a ``sizes.json``, so the demo goes through the same loader as real data.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import tarfile
import tempfile

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 190),
    "orange": (245, 135, 30),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # centre of the shape as a fraction of the image side
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill):
    """A shape of radius ``r`` centred at (cx, cy): the demo's three, or a five-pointed ``star``
    (which the demo set never shows: the fine-tuning checks teach it)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    elif shape == "star":
        points = []
        for k in range(10):
            angle, radius = math.pi * (k / 5 - 0.5), r if k % 2 == 0 else 0.4 * r
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def draw_sample(rng: np.random.Generator, size: int) -> tuple[Image.Image, str, dict]:
    """One image and its caption; every random choice comes from ``rng``."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    gray = int(rng.integers(200, 246))
    tint = rng.integers(-10, 11, size=3)
    background = tuple(int(np.clip(gray + t, 0, 255)) for t in tint)
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    fx, fy = POSITIONS[position]
    jitter = rng.uniform(-0.04, 0.04, size=2)
    cx, cy = (fx + jitter[0]) * size, (fy + jitter[1]) * size
    r = rng.uniform(0.13, 0.2) * size
    fill = tuple(
        int(np.clip(c + d, 0, 255)) for c, d in zip(COLORS[color], rng.integers(-15, 16, 3))
    )
    draw_shape(draw, shape, cx, cy, r, fill)
    caption = (
        f"a {color} {shape} at the {position}"
        if position != "center"
        else f"a {color} {shape} in the center"
    )
    meta = {"width": size, "height": size, "shape": shape, "color": color, "position": position}
    return img, caption, meta


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # byte-identical shards for the same seed
    tar.addfile(info, io.BytesIO(data))


def _write_split(
    out: str, prefix: str, n_shards: int, per_shard: int, size: int, seed: int
) -> dict:
    sizes = {}
    for s in range(n_shards):
        rng = np.random.default_rng([seed, s])
        name = f"{prefix}-{s:06d}.tar"
        with tarfile.open(os.path.join(out, name), "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(per_shard):
                img, caption, meta = draw_sample(rng, size)
                key = f"{prefix}{s:04d}{i:05d}"
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=95)
                meta["key"] = key
                _add(tar, f"{key}.jpg", buf.getvalue())
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
        sizes[name] = per_shard
    return sizes


def make_demo_shards(
    root: str,
    image_size: int = 64,
    train_shards: int = 8,
    val_shards: int = 1,
    samples_per_shard: int = 256,
    seed: int = 0,
) -> dict[str, str]:
    """Write the demo set under ``root/<hash of the arguments>/`` unless it is already there.

    Returns ``{"train": url, "val": url}`` as brace-expandable WebDataset URLs. Written to a
    temporary folder and renamed into place, so an interrupted run never leaves half a data set.
    """
    args = dict(
        size=image_size, train=train_shards, val=val_shards, per=samples_per_shard, seed=seed
    )
    tag = hashlib.sha1(json.dumps(args, sort_keys=True).encode()).hexdigest()[:10]
    out = os.path.join(os.path.abspath(os.path.expanduser(root)), f"demo-{tag}")
    urls = {
        "train": os.path.join(out, f"train-{{000000..{train_shards - 1:06d}}}.tar"),
        "val": os.path.join(out, f"val-{{000000..{val_shards - 1:06d}}}.tar"),
    }
    if os.path.isfile(os.path.join(out, "sizes.json")):
        return urls
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=os.path.dirname(out))
    try:
        log.info("Generating the demo data set (%s) in %s", args, out)
        sizes = _write_split(tmp, "train", train_shards, samples_per_shard, image_size, seed)
        sizes |= _write_split(tmp, "val", val_shards, samples_per_shard, image_size, seed + 1)
        with open(os.path.join(tmp, "sizes.json"), "w") as f:
            json.dump(sizes, f, indent=1)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first
            if not os.path.isfile(os.path.join(out, "sizes.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return urls


# -- scoring generated images against their prompts (the demo's prompt-following figure) --------
def _foreground(image: np.ndarray, min_saturation: int = 60) -> np.ndarray:
    """Mask of the coloured shape's pixels: backgrounds are near-gray, shapes saturated."""
    image = image.astype(np.int16)
    return (image.max(axis=-1) - image.min(axis=-1)) > min_saturation


def dominant_color(image: np.ndarray) -> str | None:
    """The demo palette colour nearest the mean of an image's saturated pixels (uint8 HWC), or
    ``None`` when nothing in it is coloured."""
    mask = _foreground(image)
    if mask.sum() < 4:
        return None
    mean = image[mask].astype(np.float64).mean(axis=0)
    return min(COLORS, key=lambda c: float(np.sum((np.array(COLORS[c]) - mean) ** 2)))


def shape_position(image: np.ndarray) -> str | None:
    """The demo position nearest the centroid of an image's saturated pixels."""
    mask = _foreground(image)
    if mask.sum() < 4:
        return None
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    cx, cy = xs.mean() / w, ys.mean() / h
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)


def _named(prompt: str, names) -> str | None:
    words = prompt.replace("_", " ").lower()
    found = [n for n in names if f" {n} " in f" {words} "]
    return max(found, key=len) if found else None  # "top left" before "left"


def prompt_following(images: list[np.ndarray], prompts: list[str]) -> dict[str, tuple[int, int]]:
    """``{"color": (hits, n), "position": (hits, n)}`` over the prompts that name one."""
    scores = {"color": [0, 0], "position": [0, 0]}
    for image, prompt in zip(images, prompts):
        for key, names, measure in (
            ("color", COLORS, dominant_color),
            ("position", POSITIONS, shape_position),
        ):
            wanted = _named(prompt, names)
            if wanted is not None:
                scores[key][1] += 1
                scores[key][0] += int(measure(image) == wanted)
    return {k: (v[0], v[1]) for k, v in scores.items()}


def main(argv: list[str] | None = None) -> None:
    """``python -m sd_lightning.data.score DIR``: prompt following of ``stage=sample`` PNGs
    (their file names carry the prompts)."""
    import argparse
    import glob

    parser = argparse.ArgumentParser(prog="python -m sd_lightning.data.score")
    parser.add_argument("folder")
    args = parser.parse_args(argv)
    paths = sorted(p for p in glob.glob(os.path.join(args.folder, "*.png")) if "grid" not in p)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    prompts = [os.path.splitext(os.path.basename(p))[0].split("_", 1)[-1] for p in paths]
    scores = prompt_following(images, prompts)
    c, p = scores["color"], scores["position"]
    print(
        f"prompt following in {args.folder}: colour {c[0]}/{c[1]} (chance 1/{len(COLORS)}), "
        f"position {p[0]}/{p[1]} (chance 1/{len(POSITIONS)})"
    )
