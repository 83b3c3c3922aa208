"""Shard URL lists: brace expansion, globs, ``::``-joined sources, and existence checks."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import braceexpand

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")


def _is_local(url: str) -> bool:
    return not url.startswith(REMOTE_PREFIXES)


def expand_urls(urls: str | Sequence[str], name: str = "data.urls") -> list[str]:
    """Expand ``urls`` (brace patterns, globs, several sources joined by ``::`` or given as a
    list) into shard URLs, and check that every local shard exists.

    Raises ``FileNotFoundError`` naming the pattern when nothing matches, and naming the missing
    shards when only some do.
    """
    return [u for source in expand_sources(urls, name) for u in source]


def expand_sources(urls: str | Sequence[str], name: str = "data.urls") -> list[list[str]]:
    """Like :func:`expand_urls`, but one list of shards per ``::``-joined source."""
    if urls is None or (isinstance(urls, str) and not urls.strip()):
        raise ValueError(
            f"{name} is empty: give shard URLs such as /data/laion/{{000000..000099}}.tar"
        )
    sources = urls.split("::") if isinstance(urls, str) else [str(u) for u in urls]
    per_source: list[list[str]] = []
    for source in sources:
        expanded: list[str] = []
        for url in braceexpand.braceexpand(source.strip()):
            url = os.path.expanduser(url) if _is_local(url) else url
            if _is_local(url) and glob.has_magic(url):
                expanded.extend(sorted(glob.glob(url)))
            else:
                expanded.append(url)
        per_source.append(expanded)
    out = [u for source in per_source for u in source]
    local = [u for u in out if _is_local(u)]
    missing = [u for u in local if not os.path.isfile(u)]
    if local and len(missing) == len(local) and len(local) == len(out):
        raise FileNotFoundError(f"{name} matched no files: {urls}")
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise FileNotFoundError(f"{name}: {len(missing)} of {len(out)} shards are missing: {shown}")
    empty = [src for src, exp in zip(sources, per_source) if not exp]
    if not out or empty:
        raise FileNotFoundError(f"{name} matched no files: {empty[0] if empty else urls}")
    return per_source
