"""The errors a user fixes (a bad option value, file or shard). ``python -m sd_lightning`` prints
them as one message, without a traceback; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: the message names the option or file, what is wrong and the fix."""
