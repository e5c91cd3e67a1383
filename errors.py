"""The errors that mean "the user asked for something that cannot be done", as opposed to bugs.

The CLI prints a `UserError` as one `error: ...` line and exits 2; any other exception is a bug and
keeps its traceback. Each subclass that is also a `ValueError` stays catchable as one, as callers
and tests did before the hierarchy existed.
"""

from __future__ import annotations


class UserError(Exception):
    """A user's mistake or an unusable input; the message names the fix."""


class ConfigError(UserError, ValueError):
    """A config key, value or file is wrong (unknown key, bad type, value out of range, bad YAML)."""


class InputError(UserError, ValueError):
    """An input the user named (a corpus, a teacher, a checkpoint, a data folder) is missing or unusable."""
