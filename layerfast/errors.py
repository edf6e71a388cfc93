"""The one exception type for bad input.

Everything a user can get wrong (a missing or truncated checkpoint, a pickle that wants to run
code, shape mismatches, an unknown arch, broken data, an unwritable out dir) raises
`LayerfastError` with one clear message. The CLI prints that message on one line and exits
with status 2; any other exception is an internal error (exit 1).
"""

from __future__ import annotations


class LayerfastError(Exception):
    """Bad input or usage. `str(err)` is a complete, user-facing message."""
