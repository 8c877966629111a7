"""The base of every error caused by the user's input (files, configs, arguments).

The CLI prints these as one clear line instead of a traceback; everything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the file or field and what was expected."""


class OptionError(UserError, ValueError):
    """An unknown name (method, data set, output function) or an invalid option value."""


class ConditioningError(UserError, ValueError):
    """Images without the conditioning their model needs (prompts, captions, class labels)."""
