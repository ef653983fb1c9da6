"""The launcher's error: a problem the user can fix before anything is queued."""

from __future__ import annotations

from common.errors import UserError


class SubmitError(UserError):
    """Bad input to ``submit``; the message names the problem and the fix. The CLI prints it and exits 2."""
