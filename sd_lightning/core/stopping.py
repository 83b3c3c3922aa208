"""Stop requests outside the training loop: Ctrl-C, SIGTERM and SLURM's warning signals honoured in
every long phase (DreamBooth's class images, caching latents, ``stage=encode``), within a step.

The training loop stops at a step boundary with a checkpoint (:class:`~sd_lightning.callbacks.
Preemption`). Before or beside it, a long phase calls :func:`check` between units of work (an
image, a sampling step, a batch); when a signal has arrived it raises :class:`Stopped`, after the
unit in hand is written. What the phase finished stays (each unit is written atomically), and the
command exits with the signal's status (130 for Ctrl-C, 143 for SIGTERM...), or is requeued under
SLURM, so the next run goes on from there.

The handler only records the signal (:func:`record`, which :class:`Preemption` calls too): a
phase is never cut inside a write.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT")
_received: list[str] = []  # the signals this process saw, in order


class Stopped(BaseException):
    """A long phase stopped on ``signal_name``; what it finished is kept. A ``BaseException``,
    as ``KeyboardInterrupt`` is: no ``except Exception`` on the way swallows it."""

    def __init__(self, signal_name: str, where: str):
        super().__init__(f"stopped by {signal_name} during {where}")
        self.signal_name, self.where = signal_name, where

    @property
    def status(self) -> int:
        """The exit status a process killed by the signal would have (128 + its number)."""
        return 128 + int(signal.Signals[self.signal_name])


def record(name: str) -> bool:
    """Note that ``name`` arrived; True the first time a stop is requested."""
    first = not _received
    _received.append(name)
    return first


def requested() -> str | None:
    """The first signal that asked to stop, if any."""
    return _received[0] if _received else None


def reset() -> None:
    """Forget received signals (a new command in the same process, the tests)."""
    _received.clear()


def check(where: str) -> None:
    """Raise :class:`Stopped` if a signal has asked to stop; call it between units of work."""
    name = requested()
    if name is not None:
        raise Stopped(name, where)


def _handle(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if name == "SIGINT" and requested() == "SIGINT":  # Ctrl-C twice: stop now
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt
    if record(name):
        log.warning("received %s: stopping after the work in hand, keeping what is done", name)


def install(signals: tuple[str, ...] = SIGNALS) -> dict[int, Any]:
    """Record ``signals`` instead of dying on them (in the main thread); returns the handlers
    they had, for :func:`restore`."""
    previous: dict[int, Any] = {}
    try:
        for name in signals:
            signum = signal.Signals[name]
            previous[signum] = signal.signal(signum, _handle)
    except ValueError:  # not the main thread: signals are not ours to take
        pass
    return previous


def restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def handling(signals: tuple[str, ...] = SIGNALS) -> Iterator[None]:
    """Record ``signals`` while the block runs; the previous handlers come back after it."""
    previous = install(signals)
    try:
        yield
    finally:
        restore(previous)
