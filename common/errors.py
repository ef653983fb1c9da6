"""The one base class of every error a user can cause and fix.

Each CLI (``python -m pretrain.train``, ``python -m transfer.<stage>``, ``submit``, ``intl-convert``, the
detection entry point) catches ``UserError`` only: it prints the message, which names the problem and
the fix, and exits 2. Anything else is a bug and keeps its traceback. Subclasses keep the builtin type
callers relied on before (``ValueError``, ``FileNotFoundError``, ...) as a second base.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input (config, data, weights, paths); the message names it and the fix."""


class ConfigError(UserError, ValueError):
    """A stage config that cannot run; the message names the key and the fix."""
