"""The one error type users see: a message for people, no traceback (unless --debug)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or an unmet precondition, explained for the person who caused it.

    The CLI prints ``str(err)`` and exits with ``exit_code`` (2 for invalid input, 1 for a
    runtime failure such as a rank that would not start).
    """

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def did_you_mean(given: str, options: list[str] | tuple[str, ...]) -> str:
    """A ' Did you mean X?' suffix when ``given`` is close to one of ``options``, else ''."""
    import difflib

    close = difflib.get_close_matches(given, list(options), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
