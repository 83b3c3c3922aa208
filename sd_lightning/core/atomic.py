"""Writing files that never destroy what a user has: a file is written beside its target and then
renamed over it (a crash or a full disk leaves the old file or the new one, never neither), a
folder is built beside its target and swapped in, and both get the permissions every other file
gets under the user's umask (safetensors creates its files 0600, which a ComfyUI or AUTOMATIC1111
server running as another user cannot read).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share(path: str) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the mode a new file or folder
    gets under the umask (0644 and 0755 under 022)."""
    mask = _umask()
    if os.path.isdir(path):
        for root, _dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def beside(path: str, tag: str) -> str:
    """A hidden name next to ``path`` (the same file system, so a rename is atomic)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{tag}-{os.getpid()}")


def save_safetensors(
    state: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` that is atomic and honours the umask."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = beside(path, "tmp")
    try:
        save_file(state, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        share(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def replaced_folder(path: str) -> Iterator[str]:
    """A new folder to fill, swapped in for ``path`` when the block ends without an error (the
    old one, if any, removed only then); on an error the old one stays as it was."""
    tmp = beside(path, "new")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        share(tmp)
        old = beside(path, "old") if os.path.exists(path) else None
        if old:
            os.replace(path, old)
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
