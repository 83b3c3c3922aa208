"""A lean streaming reader for WebDataset shards: tar members grouped into samples.

It reads the 512-byte tar headers itself (POSIX ustar, pax extended headers, GNU long names,
base-256 sizes) instead of going through :mod:`tarfile` and webdataset's per-file pipeline, which
spend more Python per sample than a small image takes to decode. Samples are grouped as
WebDataset does: the key is the member's path up to the first dot of its file name, the rest
(lower-cased) is the field, files named ``__*__`` are metadata and skipped. URLs open through
``webdataset.gopen``, so local paths, ``file:``, ``pipe:`` and ``http(s):`` all work.

Nothing here raises on bad data: an unreadable shard or a truncated, corrupt tar ends that shard
(the incomplete sample at the break is dropped) and a file name repeated within a sample keeps the
first copy; each is counted in the caller's counter (``tar``, ``duplicate``), and bad shards are
reported to a :class:`~sd_lightning.data.health.StreamHealth`, which logs each once and stops a
stream that yields nothing.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from sd_lightning.data.health import StreamHealth
from sd_lightning.data.shards import REMOTE_PREFIXES

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


def _retriable(url: str) -> bool:
    """Remote shards (a command, a download) may fail for a moment; local files fail for good."""
    return url.startswith(REMOTE_PREFIXES)


def _problem(url: str, stream: BinaryIO | None, exn: BaseException, members: int) -> tuple:
    """``(kind, detail)`` of a failed shard reading: a :data:`health.SHARD_HINTS` key and words."""
    status = getattr(stream, "status", None)  # webdataset's Pipe: the command's exit status
    if url.startswith("pipe:") and status not in (None, 0):
        return "command failed", f"`{url[5:]}` exited with status {status}"
    if stream is None:
        return "unreadable", repr(exn)
    if isinstance(exn, TarError) and members == 0:
        return "not a tar file", ""
    return "truncated", f"after {members} file(s): {exn}"


def _fresh(sample: dict, seen: set[str], skipped: Counter) -> bool:
    """First time this key comes in this reading of a shard (else counted as a duplicate)."""
    if sample["__key__"] in seen:
        skipped["duplicate"] += 1
        return False
    seen.add(sample["__key__"])
    return True


class _Reading:
    """One reading of one shard: its samples, then ``problem`` (``(kind, detail)`` or None)."""

    def __init__(self, url: str, skipped: Counter):
        self.url, self.skipped = url, skipped
        self.samples = 0
        self.problem: tuple[str, str] | None = None

    def __iter__(self) -> Iterator[dict]:
        from webdataset.gopen import gopen

        url, skipped = self.url, self.skipped
        stream = opened = None
        members = 0
        sample: dict | None = None
        seen: set[str] = set()  # keys of this reading of the shard
        try:
            stream = gopen(url, "rb")
            for name, data in tar_members(stream):
                members += 1
                base = name.rsplit("/", 1)[-1]
                if base.startswith("__") and base.endswith("__"):
                    continue
                match = _KEY_EXT.match(name)
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if sample is None or key != sample["__key__"]:
                    if sample is not None and _fresh(sample, seen, skipped):
                        self.samples += 1
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                if ext in sample:
                    skipped["duplicate"] += 1
                    log.warning("skipping a repeated file %s in %s", name, url)
                    continue
                sample[ext] = data
            if sample is not None and _fresh(sample, seen, skipped):
                self.samples += 1
                yield sample
            stream, opened = None, stream
            opened.close()  # a pipe: URL reports its command's failure here
            if members == 0:
                self.problem = ("empty", "")
        except Exception as exn:  # noqa: BLE001 - a bad shard is reported, never fatal here
            self.problem = _problem(url, stream or opened, exn, members)
        finally:
            if stream is not None:  # failed or abandoned half-way (the consumer stopped)
                try:
                    stream.close()
                except Exception:  # noqa: BLE001 - a failure is already reported, or moot
                    pass


def shard_samples(
    urls: Iterable[dict | str],
    skipped: Counter,
    health: StreamHealth | None = None,
    retries: int = 0,
    retry_wait: float = 1.0,
) -> Iterator[dict]:
    """Samples (``{"__key__", "__url__", "__shard__", ext: bytes, ...}``) of each shard in
    ``urls`` in turn.

    ``urls`` yields URLs or ``{"url": ...}`` dicts (shard samplers yield the latter; the same
    shard may come twice in a row). A key seen before in the same reading of a shard is skipped
    and counted (``duplicate``), as is a file repeated within a sample. A shard that cannot be
    read is counted as ``tar`` and reported to ``health`` (which logs it once, and raises
    :class:`~sd_lightning.data.health.DataStreamError` when too many in a row yield nothing);
    ``__shard__`` numbers the shard for those reports. A remote shard (``pipe:``, ``http:``...)
    that fails before its first sample is tried ``retries`` more times, ``retry_wait`` seconds
    apart (doubling).
    """
    health = health if health is not None else StreamHealth(None, skipped)
    for item in urls:
        url = item["url"] if isinstance(item, dict) else item
        seq = health.opened(url)
        tries = 1 + (retries if _retriable(url) else 0)
        for attempt in range(tries):
            reading = _Reading(url, skipped)
            for sample in reading:
                sample["__shard__"] = seq
                health.read(seq)
                yield sample
            failed = reading.problem is not None and reading.problem[0] != "empty"
            if not failed or reading.samples or attempt == tries - 1:
                break
            log.debug("shard %s failed (%s); trying again", url, reading.problem[1])
            time.sleep(retry_wait * 2**attempt)
        if reading.problem is not None:
            skipped["tar"] += 1
            kind, detail = reading.problem
            if tries > 1 and not reading.samples:
                detail += f" ({tries} tries)"
            health.closed(seq, kind, detail)
        else:
            health.closed(seq)
