"""Data-stream health: a stream that yields nothing fails with the reasons instead of spinning.

Each pipeline worker reports every shard it reads (how many samples it held, what went wrong with
it) and every sample it decoded or skipped. A shard *settles* once each sample read from it has
been decoded or skipped (the shuffle buffer holds samples of several shards at a time). When
``limit`` shards in a row settle without one usable sample, or a one-pass stream ends without
one, the worker raises :class:`DataStreamError` naming the shards and the skip reasons counted.

Each bad shard is logged once per worker; a shard drawn again is counted, not logged again. While a
worker has not yet found a usable sample, a status line with its counts is logged now and then, so
skips show before the first batch.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

from sd_lightning.core.errors import InputError

log = logging.getLogger(__name__)

# what a shard-level problem means, and what to do about it
SHARD_HINTS = {
    "not a tar file": "WebDataset shards are tar archives (a .zip, or a compressed tar named .tar, "
    "is not one)",
    "empty": "the shard holds no files",
    "truncated": "the shard ends early or is corrupt (an interrupted copy?)",
    "command failed": "run the pipe: command by hand to see why (expired credentials, a wrong path)",
    "unreadable": "check that the shard exists and can be read",
}
SAMPLE_HINTS = {
    "no_caption": "each sample needs a .txt or .caption file beside its image",
    "no_image": "each sample needs a .jpg, .jpeg, .png or .webp file (latent shards: .mean.npy "
    "and .logvar.npy)",
    "decode": "the samples do not decode",
    "too_small": "every image is smaller than data.min_size",
    "duplicate": "every key repeats an earlier one",
}


class DataStreamError(InputError):
    """The data stream yields no usable sample; the message says what was found and the fix.

    A DataLoader worker's exception reaches the training process wrapped with the worker's
    traceback; the message is unwrapped to the part written here."""

    def __init__(self, message: str):
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


@dataclass
class _Shard:
    url: str
    read: int = 0  # samples read from it
    done: int = 0  # of those, decoded or skipped
    usable: int = 0
    closed: bool = False  # reading finished
    problem: str | None = None  # a SHARD_HINTS key


def _shown(urls: list[str], limit: int = 3) -> str:
    times = Counter(urls)
    names = [u + (f" ({times[u]} times)" if times[u] > 1 else "") for u in times]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class StreamHealth:
    """Shard and sample outcomes of one worker's stream.

    Args:
        limit: shards in a row without a usable sample before :class:`DataStreamError`;
            ``None``: no limit (a one-pass stream still fails when it ends with none).
        counts: the worker's skip counter (reasons -> samples), read for the error message.
        where: the stream's place ("rank 0 worker 1") in messages.
        option: the config option that sets ``limit``, named in the error.
        status_every: seconds between status lines while no usable sample has come.
    """

    def __init__(
        self,
        limit: int | None,
        counts: Counter,
        where: str = "",
        option: str = "data.max_bad_shards",
        status_every: float = 60.0,
    ):
        self.limit, self.counts, self.where, self.option = limit, counts, where, option
        self.status_every = status_every
        self.usable = 0
        self.shards = 0
        self._open: dict[int, _Shard] = {}
        self._dry: list[_Shard] = []  # settled without a usable sample since the last usable one
        self._dry_counts = Counter(counts)  # skip counts when the dry spell began
        self._logged: Counter[str] = Counter()  # bad shard -> times seen
        self._first_error: str | None = None
        self._last_status = time.monotonic()

    # -- reports from the reader and the decoder -------------------------------------------------
    def opened(self, url: str) -> int:
        self.shards += 1
        self._open[self.shards] = _Shard(url)
        return self.shards

    def read(self, seq: int) -> None:
        self._open[seq].read += 1

    def closed(self, seq: int, problem: str | None = None, detail: str = "") -> None:
        """Reading shard ``seq`` ended; ``problem`` (a :data:`SHARD_HINTS` key) when it failed."""
        shard = self._open[seq]
        shard.closed, shard.problem = True, problem
        if problem is not None:
            self._log_bad(shard.url, problem, detail)
        self._settle(seq)

    def decoded(self, seq: int | None, usable: bool, error: str | None = None) -> None:
        """A sample of shard ``seq`` was decoded (``usable``) or skipped; ``error``: why it did
        not decode (the first one is quoted in the error)."""
        if error is not None and self._first_error is None:
            self._first_error = error
        if usable:
            self.usable += 1
            self._dry, self._dry_counts = [], Counter(self.counts)
        shard = self._open.get(seq) if seq is not None else None
        if shard is None:
            return
        shard.done += 1
        shard.usable += usable
        self._settle(seq)

    def finish(self) -> None:
        """A one-pass stream ended: fail when it read shards and found nothing usable."""
        if self.usable == 0 and self.shards:
            raise DataStreamError(self._message(f"all {self.shards} shard(s) of this pass"))

    def log_summary(self) -> None:
        """At the end of a worker's stream: the bad shards drawn more than once, with how often
        (the first time each was logged; the repeats were only counted)."""
        if any(n > 1 for n in self._logged.values()):
            log.warning(
                "%d bad shard(s) skipped %d times in all%s: %s",
                len(self._logged),
                sum(self._logged.values()),
                self._place(),
                _shown(list(self._logged.elements())),
            )

    # -- bookkeeping -----------------------------------------------------------------------------
    def _log_bad(self, url: str, problem: str, detail: str) -> None:
        what = f"{problem}: {detail}" if detail else problem
        self._logged[url] += 1
        if self._logged[url] == 1:
            log.warning("skipping shard %s (%s)%s", url, what, self._place())
        if self._first_error is None and detail:
            self._first_error = what

    def _settle(self, seq: int) -> None:
        shard = self._open[seq]
        if not shard.closed or shard.done < shard.read:
            return
        del self._open[seq]
        if shard.usable:
            return
        self._dry.append(shard)
        if self.limit is not None and len(self._dry) >= self.limit:
            raise DataStreamError(self._message(f"{len(self._dry)} shards in a row"))
        now = time.monotonic()
        if self.usable == 0 and now - self._last_status >= self.status_every:
            self._last_status = now
            log.warning(
                "no usable sample yet%s after %d shard(s): %s",
                self._place(),
                self.shards,
                self._reasons(),
            )

    def _place(self) -> str:
        return f" ({self.where})" if self.where else ""

    def _reasons(self) -> str:
        problems = Counter(s.problem for s in self._dry if s.problem)
        parts = [f"{n} {p}" for p, n in problems.items()]
        skipped = {r: n - self._dry_counts[r] for r, n in self.counts.items()}
        parts += [f"{n} samples skipped as {r}" for r, n in skipped.items() if n and r != "tar"]
        return "; ".join(parts) or "no samples"

    def _message(self, what: str) -> str:
        problems = {s.problem for s in self._dry if s.problem}
        skipped = {r for r, n in self.counts.items() if n - self._dry_counts[r] and r != "tar"}
        hints = [SHARD_HINTS[p] for p in SHARD_HINTS if p in problems]
        hints += [SAMPLE_HINTS[r] for r in SAMPLE_HINTS if r in skipped]
        first = f" (first error: {self._first_error})" if self._first_error else ""
        stop = (
            f"; the stream stops after {self.option}={self.limit} such shards in a row"
            if self.limit is not None
            else ""
        )
        return (
            f"0 usable samples from {what}{self._place()}: {self._reasons()}{first}. "
            f"Shards: {_shown([s.url for s in self._dry])}. "
            f"Fix the data or data.urls: {'; '.join(hints) or 'see the warnings above'}{stop}."
        )
