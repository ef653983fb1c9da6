"""The one exception type of the launcher: a problem the user can fix before anything is queued."""

from __future__ import annotations


class SubmitError(Exception):
    """Bad input to ``submit``; the message names the problem and the fix. The CLI prints it and exits 2."""
