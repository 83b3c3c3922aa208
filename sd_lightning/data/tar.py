"""A lean streaming reader for WebDataset shards: tar members grouped into samples.

It reads the 512-byte tar headers itself (POSIX ustar, pax extended headers, GNU long names,
base-256 sizes) instead of going through :mod:`tarfile` and webdataset's per-file pipeline, which
spend more Python per sample than a small image takes to decode. Samples are grouped as
WebDataset does: the key is the member's path up to the first dot of its file name, the rest
(lower-cased) is the field, files named ``__*__`` are metadata and skipped. URLs open through
``webdataset.gopen``, so local paths, ``file:``, ``pipe:`` and ``http(s):`` all work.

Nothing here raises on bad data: an unreadable shard or a truncated, corrupt tar ends that shard
(the incomplete sample at the break is dropped) and a file name repeated within a sample keeps the
first copy; each is counted in the caller's counter (``tar``, ``duplicate``) and logged.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import BinaryIO

log = logging.getLogger(__name__)

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class TarError(ValueError):
    """The bytes are not a (complete) tar archive."""


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:  # pipes may return short reads
        more = stream.read(n - len(data))
        if not more:
            raise TarError(f"unexpected end of data: wanted {n} bytes, got {len(data)}")
        data += more
    return data


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big") | ((field[0] & 0x7F) << (8 * (len(field) - 1)))
    digits = field.rstrip(b"\0 ").strip(b" ")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarError(
            f"invalid number {field!r} in a tar header (corrupt or not a tar file)"
        ) from None


def _pax_records(data: bytes) -> dict[str, str]:
    """``"<len> key=value\\n"`` records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """``(path, bytes)`` of each regular file in a tar stream, in archive order.

    Raises :class:`TarError` on a truncated archive or a header whose checksum does not match.
    """
    pending: dict[str, str] = {}  # pax / GNU long-name overrides for the next member
    while True:
        header = stream.read(BLOCK)
        if not header or header == _ZERO_BLOCK:  # end of archive (with or without end blocks)
            return
        if len(header) < BLOCK:
            header += _read_exact(stream, BLOCK - len(header))
        stored = _number(header[148:156])
        if stored != sum(header[:148]) + 256 + sum(header[156:]):  # checksum field as spaces
            raise TarError("tar header checksum mismatch (corrupt or not a tar file)")
        kind = header[156:157]
        override = "size" in pending and kind in _REGULAR  # a pax size is the next member's
        size = int(pending["size"]) if override else _number(header[124:136])
        data = _read_exact(stream, size) if size else b""
        if size % BLOCK:
            _read_exact(stream, BLOCK - size % BLOCK)
        if kind == b"x":  # pax extended header for the next member
            pending.update(_pax_records(data))
            continue
        if kind == b"L":  # GNU long name for the next member
            pending["path"] = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind not in _REGULAR:  # global pax header, directory, link, ...
            pending.clear()
            continue
        name = pending.get("path")
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:263] == b"ustar\0":  # POSIX: long paths are split into prefix/name
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        pending.clear()
        if not name.endswith("/"):  # old tars mark folders by the slash alone
            yield name, data


def _close(stream: BinaryIO, url: str, skipped: Counter, counted: bool) -> None:
    try:
        stream.close()  # a pipe: URL reports its command's failure here
    except Exception as exn:  # noqa: BLE001 - a failing source is counted, never fatal
        if not counted:  # the same failure may already have shown up in a read
            skipped["tar"] += 1
            log.warning("skipping the rest of shard %s: %r", url, exn)


def _fresh(sample: dict, seen: set[str], skipped: Counter) -> bool:
    """First time this key comes in this reading of a shard (else counted as a duplicate)."""
    if sample["__key__"] in seen:
        skipped["duplicate"] += 1
        return False
    seen.add(sample["__key__"])
    return True


def shard_samples(urls: Iterable[dict | str], skipped: Counter) -> Iterator[dict]:
    """Samples (``{"__key__", "__url__", ext: bytes, ...}``) of each shard in ``urls`` in turn.

    ``urls`` yields URLs or ``{"url": ...}`` dicts (shard samplers yield the latter; the same
    shard may come twice in a row). A key seen before in the same reading of a shard is skipped
    and counted (``duplicate``), as is a file repeated within a sample.
    """
    from webdataset.gopen import gopen

    for item in urls:
        url = item["url"] if isinstance(item, dict) else item
        try:
            stream = gopen(url, "rb")
        except Exception as exn:  # noqa: BLE001 - an unreadable shard is counted, never fatal
            skipped["tar"] += 1
            log.warning("skipping unreadable shard %s: %r", url, exn)
            continue
        sample: dict | None = None
        failed = False
        seen: set[str] = set()  # keys of this reading of the shard
        try:
            for name, data in tar_members(stream):
                base = name.rsplit("/", 1)[-1]
                if base.startswith("__") and base.endswith("__"):
                    continue
                match = _KEY_EXT.match(name)
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if sample is None or key != sample["__key__"]:
                    if sample is not None and _fresh(sample, seen, skipped):
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                if ext in sample:
                    skipped["duplicate"] += 1
                    log.warning("skipping a repeated file %s in %s", name, url)
                    continue
                sample[ext] = data
            if sample is not None and _fresh(sample, seen, skipped):
                yield sample
        except (TarError, OSError) as exn:
            failed = True
            skipped["tar"] += 1
            log.warning("skipping the rest of shard %s (sample in progress dropped): %r", url, exn)
        finally:
            _close(stream, url, skipped, counted=failed)
