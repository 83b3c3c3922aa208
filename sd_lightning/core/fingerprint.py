"""SHA-256 of weight files (a file's bytes, as AUTOMATIC1111 and civitai hash models; a folder's
weight files in name order), remembered per user by path, sizes and modification times, so a
file that is read again (a LoRA's base, the metric networks of every evaluation) is not hashed
again."""

from __future__ import annotations

import hashlib
import json
import os

CHUNK = 16 << 20


def _files(path: str) -> list[str]:
    """The file, or a diffusers folder's weight files (sorted, relative order fixed)."""
    if not os.path.isdir(path):
        return [path]
    found = []
    for root, _, names in os.walk(path):
        for name in names:
            if name.endswith((".safetensors", ".bin")):
                found.append(os.path.join(root, name))
    return sorted(found)


def fingerprint(path: str) -> str:
    """SHA-256 of the weights (a file's bytes, as AUTOMATIC1111 and civitai hash models; a
    folder's weight files in name order)."""
    digest = hashlib.sha256()
    for name in _files(path):
        with open(name, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _cache_file() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "sd_lightning", "sha256.json")


def cached_fingerprint(path: str) -> str:
    """:func:`fingerprint`, remembered per user by path, sizes and modification times (as
    AUTOMATIC1111 caches model hashes): a LoRA checkpoint resumed or sampled again does not read
    its 4 GB base again. A changed file is hashed anew."""
    key = os.path.abspath(path)
    stamp = [[os.path.getsize(f), os.stat(f).st_mtime_ns] for f in _files(path)]
    cache_path = _cache_file()
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key)
    if entry and entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = fingerprint(path)
    cache[key] = {"stamp": stamp, "sha256": digest}
    try:  # best effort: a read-only home only costs the hash next time
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        tmp = f"{cache_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, cache_path)
    except OSError:
        pass
    return digest
