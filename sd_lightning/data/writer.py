"""``stage=shards``: write WebDataset shards from a folder of captioned images, or re-shard an
img2dataset output folder, with a fixed number of samples per shard and a ``sizes.json``.

    python -m sd_lightning stage=shards input=/data/raw output=/data/shards samples_per_shard=10000

A folder of images (``.jpg``/``.jpeg``/``.png``/``.webp``, searched recursively) takes each image's
caption from the ``.txt`` beside it with the same name; image bytes are stored as they are (no
re-encoding) with a ``.json`` holding width, height and the source path. A folder that holds
``.tar`` shards (img2dataset's output) is re-sharded: every sample keeps all its files. Samples
without caption and unreadable images or tar members are skipped and counted. Each shard is
written to a temporary name and renamed when complete; ``sizes.json`` is written last.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def _folder_samples(root: str, skipped: Counter) -> Iterator[dict[str, bytes]]:
    """Captioned images under ``root`` in sorted path order."""
    paths = []
    for folder, _, files in os.walk(root):
        paths += [os.path.join(folder, f) for f in files if f.lower().endswith(IMAGE_EXTS)]
    for path in sorted(paths):
        stem, ext = os.path.splitext(path)
        caption_path = stem + ".txt"
        if not os.path.isfile(caption_path):
            skipped["no_caption"] += 1
            continue
        with open(path, "rb") as f:
            data = f.read()
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.verify()
                width, height = img.size
        except Exception as exn:  # noqa: BLE001 - any unreadable image is skipped and counted
            skipped["decode"] += 1
            log.warning("skipping unreadable image %s: %r", path, exn)
            continue
        with open(caption_path, "rb") as f:
            caption = f.read().strip()
        meta = {"width": width, "height": height, "source": os.path.relpath(path, root)}
        ext = ".jpg" if ext.lower() == ".jpeg" else ext.lower()
        yield {ext[1:]: data, "txt": caption, "json": json.dumps(meta).encode()}


def _tar_samples(shards: list[str], skipped: Counter) -> Iterator[dict[str, bytes]]:
    """Samples of existing shards with all their files (img2dataset writes jpg, txt, json)."""
    from sd_lightning.data.tar import shard_samples

    for sample in shard_samples(shards, skipped):
        files = {k: v for k, v in sample.items() if not k.startswith("__")}
        if not any(k in files for k in ("txt", "caption")):
            skipped["no_caption"] += 1
            continue
        yield files


class ShardWriter:
    """Writes numbered shards of ``samples_per_shard`` samples each, atomically."""

    def __init__(
        self,
        output: str,
        samples_per_shard: int,
        prefix: str = "",
        sizes_name: str | None = "sizes.json",
    ):
        import webdataset as wds

        self._wds = wds
        self.output, self.per_shard, self.prefix = output, samples_per_shard, prefix
        self.sizes_name = sizes_name
        self.sizes: dict[str, int] = {}
        self._tar = None
        self._count = 0

    def _open(self) -> None:
        name = f"{self.prefix}{len(self.sizes):06d}.tar"
        self._name, self._tmp = name, os.path.join(self.output, f".{name}.tmp")
        self._stream = open(self._tmp, "wb")
        self._tar = self._wds.TarWriter(self._stream)
        self._count = 0

    def _close(self) -> None:
        self._tar.close()
        if not self._stream.closed:
            self._stream.close()
        os.replace(self._tmp, os.path.join(self.output, self._name))
        self.sizes[self._name] = self._count
        self._tar = None

    def write(self, sample: dict[str, bytes]) -> None:
        if self._tar is None:
            self._open()
        index = sum(self.sizes.values()) + self._count
        self._tar.write({"__key__": f"{index:09d}", **sample})
        self._count += 1
        if self._count == self.per_shard:
            self._close()

    def finish(self) -> dict[str, int]:
        if self._tar is not None:
            self._close()
        if self.sizes_name:
            with open(os.path.join(self.output, self.sizes_name), "w") as f:
                json.dump(self.sizes, f, indent=1)
        return self.sizes


def refuse_existing_shards(output: str) -> None:
    """Writers never mix new shards with old ones: an output folder with shards is an error."""
    if os.path.isdir(output) and any(f.endswith(".tar") for f in os.listdir(output)):
        raise FileExistsError(
            f"output={output!r} already holds shards: choose an empty or new folder (nothing "
            f"there is overwritten)"
        )


def write_shards(
    input: str, output: str, samples_per_shard: int = 10000, prefix: str = ""
) -> dict[str, Any]:
    """Shards from ``input`` (captioned images, or shards to re-shard) into ``output``; returns
    ``{"shards", "samples", "skipped", "urls"}``."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not os.path.isdir(input):
        raise FileNotFoundError(f"input={input!r}: no such folder")
    refuse_existing_shards(output)
    os.makedirs(output, exist_ok=True)
    skipped: Counter[str] = Counter()
    tars = sorted(
        os.path.join(folder, f)
        for folder, _, files in os.walk(input)
        for f in files
        if f.endswith(".tar")
    )
    samples = _tar_samples(tars, skipped) if tars else _folder_samples(input, skipped)
    writer = ShardWriter(output, samples_per_shard, prefix)
    source = f"{len(tars)} shards" if tars else "an image folder"
    for sample in tqdm(samples, desc=f"shards from {source}", unit="sample"):
        writer.write(sample)
    sizes = writer.finish()
    total = sum(sizes.values())
    if not total:
        raise ValueError(f"input={input!r} held no captioned images (skipped: {dict(skipped)})")
    urls = os.path.join(output, f"{prefix}{{000000..{len(sizes) - 1:06d}}}.tar")
    return {"shards": len(sizes), "samples": total, "skipped": dict(skipped), "urls": urls}
