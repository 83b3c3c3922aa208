"""Shards that yield no usable sample, as users meet them: zip files named .tar, empty files,
images without captions, and a ``pipe:`` command that fails (an expired cloud credential)."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

from PIL import Image

BAD_KINDS = ("zip", "empty", "no_caption", "pipe")
# what the error names for each kind
BAD_MESSAGES = {
    "zip": "not a tar file",
    "empty": "empty",
    "no_caption": "samples skipped as no_caption",
    "pipe": "exited with status 1",
}


def jpeg(color: str = "red", size: tuple[int, int] = (40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, files: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def bad_shards(folder: Path, kind: str, shards: int = 4, samples: int = 8) -> str:
    """``data.urls`` for ``shards`` shards of ``kind``, written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "pipe":
        return f"pipe:false {{0..{shards - 1}}}"
    for i in range(shards):
        path = folder / f"{kind}-{i}.tar"
        if kind == "zip":
            with zipfile.ZipFile(path, "w") as z:
                for k in range(samples):
                    z.writestr(f"{k:03d}.jpg", jpeg())
                    z.writestr(f"{k:03d}.txt", "a red square")
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "no_caption":
            write_tar(path, [(f"{i}{k:03d}.jpg", jpeg()) for k in range(samples)])
        else:
            raise ValueError(f"unknown kind {kind!r}; one of {BAD_KINDS}")
    return str(folder / f"{kind}-{{0..{shards - 1}}}.tar")


def good_shard(path: Path, samples: int = 8) -> Path:
    files = []
    for k in range(samples):
        files += [(f"{k:03d}.jpg", jpeg("blue")), (f"{k:03d}.txt", b"a blue square")]
    return write_tar(path, files)
